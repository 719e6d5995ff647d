"""etcd 3.4 from Python: the server's command line, `etcdctl`, and the v3 JSON gateway over HTTP.

The JSON gateway (POST /v3/kv/..., served on every client port) carries the key-value calls:
it is quicker than an `etcdctl` process per call. `etcdctl` stays for what the gateway of 3.4
lacks or what has to run offline: `snapshot save|status|restore` and `endpoint hashkv`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from dataclasses import dataclass
from typing import Any

import httpx

from services.etcd_migration.drivers.base import DriverError
from shared.embedded import find_binary

# Keys the driver and the prober write for their own checks: excluded when keyspaces are compared.
INTERNAL_PREFIX = b"/flotilla/"
LEASE_PREFIX = b"/registry/leases/kube-node-lease/"
ALL_KEYS = b"\0"  # as a range_end: every key from the start key on


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that selects every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return ALL_KEYS


def initial_cluster(peer_ports: dict[str, int]) -> str:
    """The --initial-cluster value: name=peer URL for every member, in a stable order."""
    return ",".join(f"{name}=http://127.0.0.1:{port}" for name, port in sorted(peer_ports.items()))


def etcd_command(name: str, data_dir: str, client_port: int, peer_port: int, peer_ports: dict[str, int],
                 cluster_token: str) -> list[str]:  # fmt: skip
    """An etcd member on loopback. `peer_ports` maps member names to peer ports; etcd reads them only
    when the data directory is empty (a restored or restarted member keeps the membership it has)."""
    client = f"http://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    return [
        find_binary("etcd"), "--name", name, "--data-dir", data_dir,
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", initial_cluster(peer_ports), "--initial-cluster-token", cluster_token,
        "--initial-cluster-state", "new",
        "--logger", "zap", "--log-outputs", "stderr",
    ]  # fmt: skip


async def etcdctl(*args: str, endpoints: list[str] | None = None, timeout_s: float = 60.0) -> str:
    """Run etcdctl (API v3) and return its stdout; a failure is a retryable DriverError with its stderr."""
    argv = [find_binary("etcdctl")]
    if endpoints:
        argv += ["--endpoints", ",".join(endpoints)]
    argv += list(args)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "ETCDCTL_API": "3"}
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DriverError(f"etcdctl {args[0]} timed out after {timeout_s}s") from None
    if proc.returncode != 0:
        last = err.decode(errors="replace").strip().splitlines()[-3:]
        raise DriverError(f"etcdctl {' '.join(args[:2])} failed: {' | '.join(last)}")
    return out.decode()


async def snapshot_status(path: str) -> dict[str, int]:
    """`etcdctl snapshot status -w json`: hash, revision, totalKey, totalSize (it checks the file's integrity)."""
    return {k: int(v) for k, v in json.loads(await etcdctl("snapshot", "status", path, "-w", "json")).items()}


async def hashkv(endpoints: list[str], revision: int = 0) -> dict[str, tuple[int, int]]:
    """`etcdctl endpoint hashkv`: per endpoint (hash, revision hashed). The 3.4 gateway has no hashkv."""
    out = await etcdctl("endpoint", "hashkv", "-w", "json", f"--rev={revision}", endpoints=endpoints, timeout_s=15)
    return {e["Endpoint"]: (int(e["HashKV"]["hash"]), int(e["HashKV"]["header"]["revision"])) for e in json.loads(out)}


class EtcdHttpError(DriverError):
    pass


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int


class EtcdHttp:
    """A few v3 calls through the JSON gateway of one endpoint (a member or a proxy in front of some)."""

    def __init__(self, url: str, client: httpx.AsyncClient) -> None:
        self.url = url.rstrip("/")
        self.client = client

    async def call(self, path: str, body: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        try:
            kw: dict[str, Any] = {} if timeout_s is None else {"timeout": timeout_s}
            resp = await self.client.post(f"{self.url}/v3/{path}", json=body, **kw)
        except httpx.HTTPError as exc:
            raise EtcdHttpError(f"{self.url}/v3/{path}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code != 200:
            raise EtcdHttpError(f"{self.url}/v3/{path}: HTTP {resp.status_code}: {resp.text[:200]}")
        result: dict[str, Any] = resp.json()
        return result

    async def put(self, key: bytes, value: bytes, timeout_s: float | None = None) -> int:
        """Returns the revision of the write."""
        out = await self.call("kv/put", {"key": b64(key), "value": b64(value)}, timeout_s)
        return int(out["header"]["revision"])

    async def put_many(self, items: list[tuple[bytes, bytes]], batch: int = 128) -> None:
        """Puts in transactions of `batch` (etcd's default --max-txn-ops is 128): one revision per batch."""
        for i in range(0, len(items), batch):
            ops = [{"requestPut": {"key": b64(k), "value": b64(v)}} for k, v in items[i : i + batch]]
            await self.call("kv/txn", {"success": ops})

    async def range(self, key: bytes, range_end: bytes | None = None, limit: int = 0,
                    timeout_s: float | None = None) -> tuple[list[KeyValue], bool, int]:  # fmt: skip
        """(kvs, more, revision of the read)."""
        body: dict[str, Any] = {"key": b64(key), "limit": str(limit)}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        out = await self.call("kv/range", body, timeout_s)
        kvs = [KeyValue(unb64(kv["key"]), unb64(kv.get("value", "")), int(kv["mod_revision"]))
               for kv in out.get("kvs", [])]  # fmt: skip
        return kvs, bool(out.get("more", False)), int(out["header"]["revision"])

    async def get(self, key: bytes, timeout_s: float | None = None) -> bytes | None:
        kvs, _, _ = await self.range(key, timeout_s=timeout_s)
        return kvs[0].value if kvs else None

    async def scan(self, prefix: bytes = b"", page: int = 2000) -> list[KeyValue]:
        """Every key under `prefix` (all keys for b""), paged so no response grows unbounded."""
        start, end = (prefix or ALL_KEYS), (prefix_end(prefix) if prefix else ALL_KEYS)
        found: list[KeyValue] = []
        while True:
            kvs, more, _ = await self.range(start, end, limit=page)
            found += kvs
            if not more or not kvs:
                return found
            start = kvs[-1].key + b"\0"

    async def dump(self, exclude: bytes = INTERNAL_PREFIX) -> dict[bytes, bytes]:
        """The keyspace as a dict, without the driver's and prober's own keys (for comparisons)."""
        return {kv.key: kv.value for kv in await self.scan() if not kv.key.startswith(exclude)}

    async def delete(self, key: bytes, timeout_s: float | None = None) -> int:
        """Returns how many keys were deleted (a delete of nothing writes no revision)."""
        out = await self.call("kv/deleterange", {"key": b64(key)}, timeout_s)
        return int(out.get("deleted", 0))

    async def compact(self, revision: int) -> None:
        """Compact up to `revision` and wait until it is applied; an already compacted revision is success."""
        try:
            await self.call("kv/compaction", {"revision": str(revision), "physical": True})
        except EtcdHttpError as exc:
            if "required revision has been compacted" not in str(exc):
                raise

    async def status(self, timeout_s: float | None = None) -> dict[str, Any]:
        return await self.call("maintenance/status", {}, timeout_s)

    async def member_names(self) -> list[str]:
        out = await self.call("cluster/member/list", {})
        return sorted(m.get("name", "") for m in out.get("members", []))

    async def healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            resp = await self.client.get(f"{self.url}/health", timeout=timeout_s)
            return resp.status_code == 200 and resp.json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False


class GatewayProbeTarget:
    """The prober's client of an etcd endpoint: a new connection per request, so that every request goes
    through the load balancer's choice of backend (a pooled one would stay on one backend)."""

    def __init__(self, endpoint: str, timeout_s: float) -> None:
        self._client = httpx.AsyncClient(timeout=timeout_s, trust_env=False,
                                         limits=httpx.Limits(max_keepalive_connections=0))  # fmt: skip
        self._http = EtcdHttp(endpoint, self._client)

    async def put(self, key: bytes, value: bytes) -> object:
        return await self._http.put(key, value)

    async def get(self, key: bytes) -> object:
        return await self._http.get(key)

    async def aclose(self) -> None:
        await self._client.aclose()

