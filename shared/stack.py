"""The embedded stack behind `flotilla up` / `make run`.

Starts nats-server and redis-server (shared.embedded), the six services as separate
processes, waits for the status API, applies the example ClusterSets and shows live
progress until every expected cluster is READY. With `once`, prints `READY n/n` as the
very last line of stdout and exits 0 after stopping everything; otherwise serves until
Ctrl-C / SIGTERM. Any child that dies ends the run with its name and last log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from shared.client import FlotillaClient, FlotillaError, SourceDocument, load_clustersets
from shared.config import get_settings
from shared.embedded import SERVICES, ServerProcess, free_port, nats_server, redis_server, service_env, start_service
from shared.events.models import CLUSTER_STATES

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXAMPLES = Path(os.environ.get("FLOTILLA_EXAMPLES", REPO_ROOT.parent / "shared" / "examples"))
DEFAULT_RUN_DIR = REPO_ROOT / ".run"
# Demo latencies: fast enough that 12 clusters are READY in well under a minute, slow enough to watch.
DEMO_SIM = {"FLOTILLA_SIM_LATENCY_S": "0.3", "FLOTILLA_SIM_INSTALL_LATENCY_S": "0.1"}
POLL_S = 0.5
NATS_DEFAULT_PORT = 4222
LOG_TAIL_LINES = 25


@dataclass
class StackOptions:
    once: bool = False
    examples: Path | None = None
    api_port: int | None = None
    timeout_s: float = 300.0  # with once: give up (non-zero) if not everything is READY by then
    run_dir: Path | None = None
    keep_state: bool = False  # resume the previous run's streams and Redis instead of starting fresh
    services: tuple[str, ...] = SERVICES
    startup_timeout_s: float = 60.0
    apply_wait_s: float = 60.0
    stop_grace_s: float = 15.0


class StackFailure(Exception):
    """Ends the run with a non-zero exit; the message is what the operator needs to see."""


class Interrupted(Exception):
    """SIGINT / SIGTERM before the stack was up."""


class ChildDied(StackFailure):
    def __init__(self, name: str, returncode: int | None, log_path: Path) -> None:
        self.name, self.returncode, self.log_path = name, returncode, log_path
        super().__init__(f"{name} exited with code {returncode}")


# ----------------------------------------------------------------------------- progress (pure)
@dataclass(frozen=True)
class SetProgress:
    name: str
    expected: int
    ready: int
    counts: dict[str, int]
    title: str = ""

    @property
    def done(self) -> bool:
        return self.ready >= self.expected


@dataclass(frozen=True)
class Progress:
    sets: list[SetProgress]

    @property
    def expected(self) -> int:
        return sum(s.expected for s in self.sets)

    @property
    def ready(self) -> int:
        return sum(min(s.ready, s.expected) for s in self.sets)

    @property
    def done(self) -> bool:
        return all(s.done for s in self.sets)

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sets:
            for state, n in s.counts.items():
                out[state] = out.get(state, 0) + n
        return out

    def line(self) -> str:
        """One plain line for logs / non-terminal output (never starts with 'READY': that is the final line)."""
        states = " ".join(f"{k}={v}" for k, v in _ordered(self.totals()) if v)
        return f"progress: {self.ready}/{self.expected} ready  {states}".rstrip()


def _ordered(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    rank = {s: i for i, s in enumerate(CLUSTER_STATES)}
    return sorted(counts.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def set_progress(name: str, expected: int, item: Mapping[str, Any] | None) -> SetProgress:
    """Progress of one ClusterSet from its status-API item (tolerant: missing status means nothing yet)."""
    if not item:
        return SetProgress(name=name, expected=expected, ready=0, counts={}, title=name)
    status = item.get("status") or {}
    counts = {str(k): int(v) for k, v in (status.get("counts") or {}).items() if isinstance(v, int)}
    if not counts and isinstance(status.get("clusters"), list):
        for c in status["clusters"]:
            state = (c.get("status") or {}).get("state") if isinstance(c.get("status"), dict) else c.get("state")
            if state:
                counts[state] = counts.get(state, 0) + 1
    ready = status.get("readyClusters")
    if not isinstance(ready, int):
        ready = counts.get("READY", 0)
    loc = item.get("location") or {}
    where = "/".join(str(loc.get(k)) for k in ("env", "cloud", "region") if loc.get(k))
    generation = item.get("generation")
    title = "  ".join(
        x for x in (name, where, item.get("clusterType") or "",
                    f"gen {generation}" if generation is not None else "") if x
    )  # fmt: skip
    return SetProgress(name=name, expected=expected, ready=ready, counts=counts, title=title)


def progress_from(items: Iterable[Mapping[str, Any]], expected: Mapping[str, int]) -> Progress:
    by_name = {str(i.get("name")): i for i in items}
    return Progress([set_progress(name, count, by_name.get(name)) for name, count in expected.items()])


def render(progress: Progress, api_url: str, elapsed_s: float) -> RenderableType:
    """A table per ClusterSet: counts by state and READY x/y."""
    parts: list[RenderableType] = [
        Text.from_markup(f"[bold]flotilla[/] status API [cyan]{api_url}[/]   elapsed {elapsed_s:4.1f}s   "
                         f"[bold]{progress.ready}/{progress.expected} READY[/]")  # fmt: skip
    ]
    for s in progress.sets:
        # The title as its own line: a table title is wrapped to the (narrow) table width.
        parts.append(Text(s.title or s.name, style="bold"))
        table = Table(expand=False, show_edge=True)
        counts = [(k, v) for k, v in _ordered(s.counts) if v]
        for state, _ in counts:
            table.add_column(state, justify="right", style="green" if state == "READY" else
                             "red" if state == "FAILED" else None)  # fmt: skip
        table.add_column("READY x/y", justify="right", style="bold green" if s.done else "bold yellow")
        table.add_row(*(str(v) for _, v in counts), f"{min(s.ready, s.expected)}/{s.expected}")
        parts.append(table)
    return Group(*parts)


# ----------------------------------------------------------------------------- helpers
def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            return f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def expected_counts(docs: Iterable[SourceDocument]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in docs:
        spec = d.document.get("spec") if isinstance(d.document.get("spec"), dict) else {}
        count = spec.get("count") if isinstance(spec, dict) else None
        if d.name and isinstance(count, int):
            out[d.name] = count
    return out


# ----------------------------------------------------------------------------- the stack
@dataclass
class Stack:
    options: StackOptions
    out: Console = field(default_factory=Console)
    err: Console = field(default_factory=lambda: Console(stderr=True))
    run_dir: Path = field(init=False)
    log_dir: Path = field(init=False)
    servers: list[ServerProcess] = field(default_factory=list)
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    api_url: str = ""
    final_line: str | None = None
    _lock: IO[str] | None = None
    _stopping: asyncio.Event | None = None

    def __post_init__(self) -> None:
        self.run_dir = (self.options.run_dir or DEFAULT_RUN_DIR).resolve()
        self.log_dir = self.run_dir / "logs"

    @property
    def controlplane_dir(self) -> Path:
        """The local control-plane driver's machines (etcd data, proxies) for the self-managed examples."""
        return self.run_dir / "controlplanes"

    def say(self, message: str | Text) -> None:
        """Operator messages go to stderr (stdout's last line is the READY line); never wrapped mid-path."""
        self.err.print(message, soft_wrap=True)

    # ---------------------------------------------------------------- processes
    def _prepare_dirs(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # One stack per run dir: a second one would wipe the first one's state under it.
        self._lock = open(self.run_dir / "stack.lock", "a+")  # noqa: SIM115 (held until stop())
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "?"
            self._lock.close()
            self._lock = None
            raise StackFailure(f"another `flotilla up` (pid {holder}) is using {self.run_dir}; stop it first") from exc
        self._lock.truncate(0)
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        # Local control planes (etcd, load-balancer proxies) run in their own sessions: stop any a crashed run left.
        stop_control_planes(self.controlplane_dir)
        if not self.options.keep_state:
            for sub in ("nats", "redis", "logs", "controlplanes"):
                shutil.rmtree(self.run_dir / sub, ignore_errors=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def _start_servers(self) -> tuple[ServerProcess, ServerProcess]:
        # NATS on its usual port when free, so `flotilla apply` in another terminal works without flags.
        nats = nats_server(self.run_dir / "nats", port=NATS_DEFAULT_PORT if port_is_free(NATS_DEFAULT_PORT) else None)
        self.servers.append(nats)
        nats.start()
        redis = redis_server(self.run_dir / "redis")
        self.servers.append(redis)
        redis.start()
        return nats, redis

    def _service_env(self, nats: ServerProcess, redis: ServerProcess, api_port: int) -> dict[str, str]:
        sim = {k: os.environ.get(k, v) for k, v in DEMO_SIM.items()}  # an operator's own values win
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return service_env(nats.port, redis.port, prefix=os.environ.get("FLOTILLA_REDIS_PREFIX", "flotilla"),
                           FLOTILLA_API_HOST="127.0.0.1", FLOTILLA_API_PORT=str(api_port),
                           FLOTILLA_CONTROLPLANE_STATE_DIR=str(self.controlplane_dir), PYTHONPATH=pythonpath,
                           **sim)  # fmt: skip

    def _start_services(self, env: dict[str, str]) -> None:
        for name in self.options.services:
            self.children[name] = start_service(name, env, self.log_dir)

    def check_alive(self) -> None:
        for server in self.servers:
            if server.proc is not None and server.proc.poll() is not None:
                raise ChildDied(server.name, server.proc.returncode, server.log_path)
        for name, proc in self.children.items():
            if proc.poll() is not None:
                raise ChildDied(name, proc.returncode, self.log_dir / f"{name}.log")

    def stop(self) -> None:
        """SIGTERM every service's process group, wait, SIGKILL stragglers, then stop the servers. Idempotent."""
        deadline = time.monotonic() + self.options.stop_grace_s
        for proc in self.children.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in self.children.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"[yellow]{name} did not stop within {self.options.stop_grace_s:g}s: killing it[/]")
            # The group (not just the leader): a service may have started helpers (e.g. local etcd).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.children.clear()
        stop_control_planes(self.controlplane_dir)
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ---------------------------------------------------------------- async flow
    async def _guard(self, aw: Awaitable[T]) -> T:
        """Await `aw` while watching the children and the stop signal: a death or Ctrl-C cancels it."""
        task = asyncio.ensure_future(aw)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                self.check_alive()
                if self._stopping is not None and self._stopping.is_set():
                    raise Interrupted
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _wait_api(self, client: FlotillaClient) -> None:
        deadline = time.monotonic() + self.options.startup_timeout_s
        while not await client.ready():
            if time.monotonic() > deadline:
                raise StackFailure(
                    f"status API {self.api_url}/readyz not ready after {self.options.startup_timeout_s:g}s "
                    f"(see {self.log_dir / 'status_projector.log'})"
                )
            await asyncio.sleep(0.2)

    async def _apply(self, client: FlotillaClient, docs: list[SourceDocument]) -> None:
        for doc in docs:
            result = await client.apply(doc.document, wait_s=self.options.apply_wait_s)
            if not result.accepted:
                lines = "\n".join(f"  {e.field}: {e.message}" for e in result.errors)
                raise StackFailure(f"ClusterSet {doc.name} ({doc.source}) was rejected:\n{lines}")
            self.say(f"applied clusterset/{result.name} (generation {result.generation})")

    async def _progress(self, client: FlotillaClient, expected: dict[str, int]) -> Progress:
        return progress_from(await client.clustersets(), expected)

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        opts = self.options
        examples = (opts.examples or DEFAULT_EXAMPLES).resolve()
        loaded = load_clustersets([examples])
        for source, why in loaded.skipped:
            self.say(Text(f"skipping {source}: {why}", style="dim"))
        if not loaded.documents:
            raise StackFailure(f"no ClusterSet documents in {examples}")
        expected = expected_counts(loaded.documents)

        self._prepare_dirs()
        settings = get_settings()
        api_port = opts.api_port or (settings.api_port if port_is_free(settings.api_port) else free_port())
        if not port_is_free(api_port):
            raise StackFailure(f"API port {api_port} is in use: pass --api-port")
        self.api_url = f"http://127.0.0.1:{api_port}"
        nats, redis = self._start_servers()
        self.say(f"nats-server on {nats.port}, redis-server on {redis.port}, state in {self.run_dir}")
        self._start_services(self._service_env(nats, redis, api_port))
        self.say(f"started {', '.join(opts.services)} (logs in {self.log_dir})")

        async with FlotillaClient(f"nats://127.0.0.1:{nats.port}", self.api_url) as client:
            await self._guard(self._wait_api(client))
            self.out.print(f"status API: {self.api_url}  (e.g. curl {self.api_url}/v1/clustersets)", soft_wrap=True)
            self.say(f"other terminals: export FLOTILLA_NATS_URL=nats://127.0.0.1:{nats.port} "
                     f"FLOTILLA_API_URL={self.api_url}; flotilla get clusters")  # fmt: skip
            await self._guard(self._apply(client, loaded.documents))
            code = await self._watch(client, expected, until_ready=True)
            if code != 0 or self._stopping.is_set():
                return code
            await self._guard(self._migrate_self_managed(client, loaded.documents))
            return code if opts.once else await self._watch(client, expected, until_ready=False)

    async def _migrate_self_managed(self, client: FlotillaClient, docs: list[SourceDocument]) -> None:
        """Show the control-plane migration: every self-managed set with one control-plane node goes to three
        (HA) on the local driver (real etcd), and what the prober measured is printed."""
        for doc in docs:
            spec = doc.document.get("spec", {})
            plane = spec.get("controlPlane") or {}
            if plane.get("mode") != "self-managed" or plane.get("ha"):
                continue
            ha = copy.deepcopy(doc.document)
            ha["spec"]["controlPlane"] = {**plane, "ha": True}
            result = await client.apply(ha, wait_s=self.options.apply_wait_s)
            if not result.accepted:
                raise StackFailure(f"migrating {doc.name} to HA was refused: {result.errors}")
            self.say(f"clusterset/{doc.name}: controlPlane.ha true, migrating {spec.get('count')} control plane(s)")
            ops = await self._wait_migrations(client, str(doc.name), int(spec.get("count", 0)))
            for op in ops:
                a = op.get("availability") or {}
                self.say(f"  {op['clusterId']}: {op['state']}, {len(op.get('members') or [])} members, "
                         f"availability {a.get('availabilityPct', 0):.1f}% of {a.get('requests', 0)} requests, "
                         f"longest outage {a.get('downtimeS', 0):.2f}s "
                         f"({op.get('durationS') or 0:.1f}s in all)")  # fmt: skip

    async def _wait_migrations(self, client: FlotillaClient, clusterset: str, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.options.timeout_s
        while True:
            ops: list[dict[str, Any]] = []
            pipelines: list[dict[str, Any]] = []
            with contextlib.suppress(FlotillaError):
                ops = await client.migrations(kind="migration", clusterset=clusterset)
                pipelines = await client.migrations(kind="pipeline", clusterset=clusterset)
            final = [o for o in ops if o.get("state") in ("COMPLETED", "ROLLED_BACK", "FAILED")]
            halted = any(p.get("state") == "HALTED" for p in pipelines)
            if len(final) >= count or (halted and len(final) == len(ops)):
                details = [await client.migration(o["id"]) or o for o in final]
                failed = [o["clusterId"] for o in details if o.get("state") != "COMPLETED"]
                if failed:
                    raise StackFailure(f"control-plane migration did not complete for {', '.join(failed)}")
                return details
            if time.monotonic() > deadline:
                raise StackFailure(f"control-plane migrations of {clusterset} not done after "
                                   f"{self.options.timeout_s:g}s")
            await asyncio.sleep(POLL_S)

    async def _watch(self, client: FlotillaClient, expected: dict[str, int], until_ready: bool = False) -> int:
        opts = self.options
        started = time.monotonic()
        progress = progress_from([], expected)
        last_line = ""
        announced = False
        live = Live(render(progress, self.api_url, 0), console=self.out, refresh_per_second=4,
                    transient=False, auto_refresh=False) if self.out.is_terminal else None  # fmt: skip
        with live or contextlib.nullcontext():
            while True:
                assert self._stopping is not None
                if self._stopping.is_set():
                    self.say("stopping (signal)")
                    return 0 if not opts.once else 130
                self.check_alive()
                with contextlib.suppress(FlotillaError):  # the API may hiccup; the next poll tells
                    progress = await self._guard(self._progress(client, expected))
                elapsed = time.monotonic() - started
                if live is not None:
                    live.update(render(progress, self.api_url, elapsed), refresh=True)
                elif progress.line() != last_line:
                    last_line = progress.line()
                    print(last_line, flush=True)
                if progress.done and (until_ready or opts.once):
                    break
                if progress.done and not announced:
                    announced = True
                    self.say(f"all {progress.expected} clusters READY; serving {self.api_url} (Ctrl-C to stop)")
                if opts.once and elapsed > opts.timeout_s:
                    raise StackFailure(f"not everything READY after {opts.timeout_s:g}s: {progress.line()}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), POLL_S)
        # Printed by run() after everything has stopped, so that it is the last line even with 2>&1.
        self.final_line = f"READY {progress.ready}/{progress.expected}"
        return 0


def stop_control_planes(state_dir: Path) -> None:
    """Stop the local driver's etcd and proxy processes (they live in their own sessions)."""
    if not state_dir.exists():
        return
    from services.etcd_migration.drivers.local import LocalDriver

    # Its own thread and loop: this is called both from inside the stack's event loop and after it ended.
    worker = threading.Thread(target=lambda: asyncio.run(LocalDriver(state_dir).destroy_all()), daemon=True)
    worker.start()
    worker.join(60)


def run(options: StackOptions, out: Console | None = None, err: Console | None = None) -> int:
    """Run the stack; returns the process exit code. Always stops every child it started."""
    stack = Stack(options, out=out or Console(), err=err or Console(stderr=True))
    code = 1
    try:
        code = asyncio.run(stack.main())
    except ChildDied as exc:
        stack.say(f"[bold red]{escape(str(exc))}[/]; last lines of {escape(str(exc.log_path))}:")
        for line in tail(exc.log_path):
            stack.say(Text(f"  {line}"))
    except (StackFailure, FlotillaError) as exc:
        stack.say(Text(str(exc), style="bold red"))
    except (KeyboardInterrupt, Interrupted):
        stack.say("interrupted")
        code = 130
    finally:
        # SIGINT/SIGTERM during shutdown must not leave half the children running.
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            stack.stop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    if code == 0 and stack.final_line:
        # The contract with `make run ONCE=1`: the very last line of output.
        sys.stderr.flush()
        print(stack.final_line, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(run(StackOptions(once="--once" in sys.argv)))
