"""The Python client for Flotilla users: apply / delete ClusterSets, steer rollouts, request control-plane
migrations and upgrades, read the status API, watch READY clusters.

Writes go through the bus (intent events on CLUSTERSETS, answered by the planner, rotation or the fleet
orchestrator on FLEET); reads go through the status_projector's HTTP API. The CLI
(shared/cli.py) is a thin layer on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import yaml
from nats.aio.msg import Msg
from nats.js import api as jsapi
from nats.js.errors import NotFoundError
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.alias_generators import to_camel, to_snake

from shared.bus import Bus
from shared.config import Settings
from shared.events import Envelope, FieldError, new_event, subjects
from shared.events.clusterset import ClusterSpec, Name
from shared.events.factory import payload_as
from shared.events.models import (
    ClusterProtectionChanged,
    ClusterProtectionUpdated,
    ClusterReady,
    ClusterSetAccepted,
    ClusterSetApplied,
    ClusterSetDeleted,
    ClusterSetRejected,
    ClusterSetRetired,
    ControlPlaneChangeRequested,
    ControlPlanePipelineRequested,
    Event,
    FleetRolloutAborted,
    FleetRolloutApproved,
    FleetRolloutAwaitingApproval,
    FleetRolloutControlRequested,
    FleetRolloutPaused,
    FleetRolloutRejected,
    FleetRolloutRequested,
    FleetRolloutResumed,
    FleetRolloutStageStarted,
    FleetRolloutStarted,
    RolloutAborted,
    RolloutControlRequested,
    RolloutPaused,
    RolloutResumed,
    RolloutRolledBack,
    RolloutRollingBack,
)

SOURCE = "cli"
DEFAULT_APPLY_TIMEOUT_S = 30.0
DEFAULT_DELETE_TIMEOUT_S = 15.0
# Status-API filter names, accepted in Python spelling too (cluster_type -> clusterType).
CLUSTER_FILTERS = ("clusterset", "state", "env", "cloud", "region", "clusterType")
_FILTER_ALIASES = {"cluster_type": "clusterType", "type": "clusterType"}


class FlotillaError(RuntimeError):
    """Anything the user should see as one clear message (no traceback)."""


class FlotillaTimeout(FlotillaError, TimeoutError):
    pass


class FlotillaUnavailable(FlotillaError):
    """NATS unreachable or its streams missing: nothing else will work either."""


class ApiError(FlotillaError):
    def __init__(self, status: int, url: str, detail: str) -> None:
        super().__init__(f"status API {url} answered {status}: {detail}")
        self.status = status
        self.url = url
        self.detail = detail


class DocumentError(FlotillaError):
    """A file that cannot be read or parsed as ClusterSet YAML."""


class InvalidRequest(FlotillaError):
    """Input refused before anything was published; `errors` names every bad field."""

    def __init__(self, what: str, errors: list[FieldError]) -> None:
        super().__init__(f"invalid {what}: " + "; ".join(f"{e.field}: {e.message}" for e in errors))
        self.what = what
        self.errors = errors


# ----------------------------------------------------------------------------- loading files
@dataclass(frozen=True)
class SourceDocument:
    source: str  # "path" or "path#2" for the third document of a multi-document file
    document: dict[str, Any]

    @property
    def name(self) -> str | None:
        meta = self.document.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        return name if isinstance(name, str) else None


@dataclass
class LoadResult:
    documents: list[SourceDocument] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, why)


YAML_SUFFIXES = (".yaml", ".yml", ".json")


def _json_safe(value: Any) -> Any:
    """YAML turns unquoted dates/timestamps into objects: make them the strings the user typed."""
    return json.loads(json.dumps(value, default=str))


def load_clustersets(paths: Iterable[str | Path]) -> LoadResult:
    """Read ClusterSet documents from files (multi-document YAML allowed) or directories (*.yaml, *.yml, *.json).

    Documents whose `kind` is not ClusterSet (e.g. the status read-back example) are skipped and
    reported, not sent. Documents are NOT validated here: the planner validates and names every bad field.
    """
    result = LoadResult()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in YAML_SUFFIXES)
            if not files:
                raise DocumentError(f"{path}: no *.yaml/*.yml/*.json files in this directory")
        elif path.is_file() or str(raw) == "-":
            files = [path]
        else:
            raise DocumentError(f"{path}: no such file or directory")
        for file in files:
            _load_file(file, result)
    return result


def _load_file(path: Path, result: LoadResult) -> None:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
        docs = list(yaml.safe_load_all(text))
    except (OSError, UnicodeDecodeError) as exc:
        raise DocumentError(f"{path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise DocumentError(f"{path}: not valid YAML: {exc}") from exc
    docs = [d for d in docs if d is not None]  # '---' separators with nothing between them
    for index, doc in enumerate(docs):
        source = str(path) if len(docs) == 1 else f"{path}#{index}"
        if not isinstance(doc, dict):
            raise DocumentError(f"{source}: a ClusterSet must be a mapping, got {type(doc).__name__}")
        kind = doc.get("kind")
        if kind != "ClusterSet":
            result.skipped.append((source, f"kind is {kind!r}, not 'ClusterSet'" if kind else "no kind"))
            continue
        result.documents.append(SourceDocument(source=source, document=_json_safe(doc)))


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ApplyResult:
    accepted: bool
    name: str | None
    generation: int | None = None
    errors: list[FieldError] = field(default_factory=list)
    config_hash: str | None = None
    event_id: str = ""


@dataclass(frozen=True)
class DeleteResult:
    name: str
    retired: bool
    clusters: list[str] = field(default_factory=list)
    generation: int | None = None
    errors: list[FieldError] = field(default_factory=list)
    timed_out: bool = False  # nobody answered: usually the set is unknown
    event_id: str = ""


@dataclass(frozen=True)
class RequestResult:
    """An intent published to CLUSTERSETS, and the service's answer when one was waited for."""

    event_id: str
    subject: str
    waited: bool = False
    answer: Envelope | None = None  # None after waiting: no answer in time (the intent is stored all the same)

    @property
    def answered(self) -> bool:
        return self.answer is not None


# What answers each intent (matched on causation id). Rollback answers first with RolloutRollingBack.
ROLLOUT_ANSWERS: dict[str, list[str]] = {
    "pause": [RolloutPaused.type_name()],
    "resume": [RolloutResumed.type_name()],
    "abort": [RolloutAborted.type_name()],
    "rollback": [RolloutRollingBack.type_name(), RolloutRolledBack.type_name()],
}
FLEET_ANSWERS: dict[str, list[str]] = {
    "start": [FleetRolloutStarted.type_name(), FleetRolloutRejected.type_name()],
    "approve": [FleetRolloutStageStarted.type_name(), FleetRolloutAwaitingApproval.type_name()],
    "pause": [FleetRolloutPaused.type_name()],
    "resume": [FleetRolloutResumed.type_name()],
    "abort": [FleetRolloutAborted.type_name()],
}
ROLLOUT_KINDS = ("clusterset", "fleet")
# The planner answers a control-plane change request with the pipeline it starts over the clusters, or refuses it
# (unknown set, not self-managed, already HA, clusters not in the set, a rollout or pipeline running).
CONTROLPLANE_ANSWERS = [ControlPlanePipelineRequested.type_name(), ClusterSetRejected.type_name()]
CONTROLPLANE_OPERATIONS = ("migrate", "upgrade")
MIGRATION_KINDS = ("migration", "upgrade", "pipeline")
_SET_NAME: TypeAdapter[str] = TypeAdapter(Name)

# ----------------------------------------------------------------------------- fleet rollout files
# Nested objects of a FleetRolloutRequested whose keys users may write in camelCase. `patch` is not one of them:
# it is a patch of the ClusterSet spec, already in the document's own (camelCase) spelling.
_Nested = Mapping[str, "_Nested"]
_FLEET_NESTED: _Nested = {"selector": {}, "stages": {"selector": {}}}
# A fleet rollout may not change how many clusters a set has, nor how it updates them.
_UNPATCHABLE = ("count", "updateStrategy", "update_strategy")
_SPEC_FIELDS = frozenset({*ClusterSpec.model_fields, *(f.alias for f in ClusterSpec.model_fields.values() if f.alias)})


def _normalise(obj: Any, nested: _Nested, path: tuple[str | int, ...],
               spelled: dict[tuple[str | int, ...], str], errors: list[FieldError]) -> Any:  # fmt: skip
    """camelCase keys to python names, recursively into `nested`; remembers how the user spelled each key."""
    if isinstance(obj, list):
        return [_normalise(v, nested, (*path, i), spelled, errors) for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = to_snake(key) if isinstance(key, str) else key
        if name in out:
            errors.append(FieldError(field=_spell((*path, name), spelled), message=f"given twice (also as {key})"))
            continue
        spelled[(*path, name)] = str(key)
        out[name] = _normalise(value, nested[name], (*path, name), spelled, errors) if name in nested else value
    return out


def _spell(loc: tuple[str | int, ...], spelled: Mapping[tuple[str | int, ...], str]) -> str:
    """A field path as the user wrote it: stages[0].soakSeconds."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + spelled.get(loc[: i + 1], to_camel(part))
    return out or "(document)"


def parse_fleet_rollout(document: Any) -> tuple[FleetRolloutRequested | None, list[FieldError]]:
    """Validate a fleet rollout as users write it (YAML/JSON, camelCase or python keys). Never raises.

    The fields are FleetRolloutRequested's (rolloutId, clusterType, selector, patch, stages with name, selector,
    soakSeconds and approval, maxInFlight, failureBudget); an optional `kind: FleetRollout` is allowed. Returns
    the event payload or every problem, each named by its path as written.
    """
    if not isinstance(document, dict):
        return None, [FieldError(field="(document)", message="must be a mapping (a fleet rollout)")]
    doc = dict(document)
    kind = doc.pop("kind", "FleetRollout")
    errors: list[FieldError] = []
    if kind != "FleetRollout":
        errors.append(FieldError(field="kind", message=f"must be FleetRollout, not {kind!r}"))
    spelled: dict[tuple[str | int, ...], str] = {}
    data = _normalise(_json_safe(doc), _FLEET_NESTED, (), spelled, errors)
    patch = data.get("patch")
    if isinstance(patch, dict):
        if not patch:
            errors.append(FieldError(field=_spell(("patch",), spelled), message="is empty: nothing to roll out"))
        for key in patch:
            where = _spell(("patch",), spelled) + f".{key}"
            if key in _UNPATCHABLE:
                errors.append(FieldError(field=where, message="a fleet rollout may not change it"))
            elif key not in _SPEC_FIELDS:
                errors.append(FieldError(field=where, message="not a ClusterSet spec field"))
    stages = data.get("stages")
    if isinstance(stages, list):
        names = [s.get("name") for s in stages if isinstance(s, dict)]
        for i, name in enumerate(names):
            if name is not None and name in names[:i]:
                errors.append(FieldError(field=_spell(("stages", i, "name"), spelled), message=f"{name!r} twice"))
    try:
        model = FleetRolloutRequested.model_validate(data)
    except ValidationError as exc:
        for e in exc.errors(include_url=False):
            errors.append(FieldError(field=_spell(tuple(e["loc"]), spelled), message=e["msg"]))
        model = None
    return (None, errors) if errors else (model, [])


def load_fleet_rollout(path: str | Path) -> FleetRolloutRequested:
    """Read and validate a fleet rollout file (- for stdin). Raises DocumentError or InvalidRequest."""
    source = Path(path)
    try:
        text = sys.stdin.read() if str(path) == "-" else source.read_text()
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except (OSError, UnicodeDecodeError) as exc:
        raise DocumentError(f"{source}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise DocumentError(f"{source}: not valid YAML or JSON: {exc}") from exc
    if len(docs) != 1:
        raise DocumentError(f"{source}: expected one fleet rollout document, found {len(docs)}")
    model, errors = parse_fleet_rollout(docs[0])
    if model is None:
        raise InvalidRequest(f"fleet rollout {source}", errors)
    return model


def _intent(cls: type[Event], what: str, **fields: Any) -> Event:
    """An intent event, or InvalidRequest naming every bad field (nothing is published then)."""
    try:
        return cls(**fields)
    except ValidationError as exc:
        errors = [FieldError(field=_spell(tuple(e["loc"]), {}), message=e["msg"])
                  for e in exc.errors(include_url=False)]  # fmt: skip
        raise InvalidRequest(what, errors) from None


def control_plane_change(clusterset: str, operation: str, *, cluster_ids: Iterable[str] = (),
                         to_version: str | None = None, concurrency: int = 1,
                         failure_budget: int = 0) -> ControlPlaneChangeRequested:  # fmt: skip
    """A control-plane change request, or InvalidRequest naming every bad field (nothing is published then).

    Beyond the event's own constraints: the set must be a ClusterSet name, an upgrade needs `to_version` and a
    migration takes none (it keeps the version), and cluster ids are non-empty and given once.
    """
    ids = list(cluster_ids)
    errors: list[FieldError] = []
    try:
        _SET_NAME.validate_python(clusterset)
    except ValidationError:
        errors.append(FieldError(field="clusterset", message="must be a ClusterSet name (lowercase letters, digits "
                                                             "and '-', at most 58)"))  # fmt: skip
    if operation == "upgrade" and not to_version:
        errors.append(FieldError(field="toVersion", message="an upgrade needs the version to go to, e.g. 1.31"))
    elif operation == "migrate" and to_version:
        errors.append(FieldError(field="toVersion", message="a migration keeps the version; upgrade separately"))
    for i, cid in enumerate(ids):
        if not cid.strip():
            errors.append(FieldError(field=f"clusterIds[{i}]", message="is empty"))
        elif cid in ids[:i]:
            errors.append(FieldError(field=f"clusterIds[{i}]", message=f"{cid!r} given twice"))
    try:
        request = ControlPlaneChangeRequested.model_validate({
            "clusterset": clusterset, "operation": operation, "cluster_ids": ids, "to_version": to_version or None,
            "concurrency": concurrency, "failure_budget": failure_budget})  # fmt: skip
    except ValidationError as exc:
        errors += [FieldError(field=_spell(tuple(e["loc"]), {}), message=e["msg"])
                   for e in exc.errors(include_url=False)]  # fmt: skip
    if errors:
        raise InvalidRequest(f"control-plane {operation} request", errors)
    return request


def api_url_from_settings(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """FLOTILLA_API_URL, else where the projector listens (0.0.0.0 is a bind address: use loopback)."""
    env = os.environ if environ is None else environ
    if env.get("FLOTILLA_API_URL"):
        return env["FLOTILLA_API_URL"].rstrip("/")
    host = settings.api_host if settings.api_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{host}:{settings.api_port}"


# ----------------------------------------------------------------------------- the client
class FlotillaClient:
    """Async client. Use as `async with FlotillaClient(nats_url, api_url) as c: ...`.

    NATS and HTTP connections are opened lazily, so a read-only user never needs NATS and vice versa.
    """

    def __init__(self, nats_url: str, api_url: str, *, http_timeout: float = 10.0, page_size: int = 500) -> None:
        self.nats_url = nats_url
        self.api_url = api_url.rstrip("/")
        self.page_size = page_size
        self._bus: Bus | None = None
        self._http = httpx.AsyncClient(base_url=self.api_url, timeout=http_timeout)
        self._checked_streams: set[str] = set()

    async def __aenter__(self) -> FlotillaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()
        if self._bus is not None:
            nc, self._bus = self._bus.nc, None
            # Drain (deliver what is buffered) but never hang a CLI on exit: nats-py's drain waits up to 30s.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), 2)
            if not nc.is_closed:
                with contextlib.suppress(Exception):
                    await nc.close()

    # -------------------------------------------------------------- bus side
    async def _connect(self) -> Bus:
        if self._bus is None:
            async def quiet(exc: Exception) -> None:  # the CLI reports failures itself, once
                pass

            try:
                # Fail fast on the first connect (a user is waiting), but once connected reconnect forever so
                # a long `watch` survives a NATS restart (nats-py reads this option at every reconnect).
                nc = await nats.connect(self.nats_url, name="flotilla-client", connect_timeout=3,
                                        max_reconnect_attempts=2, reconnect_time_wait=0.5, error_cb=quiet)  # fmt: skip
            except Exception as exc:  # nats raises several unrelated types for "cannot connect"
                raise FlotillaUnavailable(f"cannot connect to NATS at {self.nats_url}: {exc!r}") from exc
            nc.options["max_reconnect_attempts"] = -1
            # Streams belong to the services (their replica settings): the client never creates or edits them.
            self._bus = Bus(nc=nc, js=nc.jetstream(timeout=10), settings=Settings(nats_url=self.nats_url))
        return self._bus

    async def _require_stream(self, bus: Bus, stream: str) -> None:
        # Without this a publish to a missing stream is retried for a minute (no responders) before failing.
        if stream in self._checked_streams:
            return
        try:
            await bus.js.stream_info(stream)
        except NotFoundError as exc:
            raise FlotillaUnavailable(
                f"stream {stream} does not exist on {self.nats_url}: are the Flotilla services running?"
            ) from exc
        self._checked_streams.add(stream)

    async def _request(self, envelope: Envelope, answer_types: list[str], wait_s: float) -> Envelope | None:
        """Publish an intent event and wait for the FLEET event caused by it (matched on causation_id).

        The core-NATS subscription is registered before the publish on the same connection, so the
        server knows it before the planner can possibly answer; JetStream-stored messages reach core
        subscribers too. Returns None on timeout, and at once when there is nothing to wait for
        (no answer types or wait_s <= 0): the intent is stored in CLUSTERSETS either way.
        """
        if wait_s <= 0:
            answer_types = []
        bus = await self._connect()
        await self._require_stream(bus, subjects.STREAM_CLUSTERSETS)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Envelope] = loop.create_future()

        async def on_msg(msg: Msg) -> None:
            if answer.done():
                return
            try:
                env = Envelope.from_bytes(msg.data)
            except ValidationError:
                return
            if env.causation_id == envelope.id and env.type in answer_types:
                answer.set_result(env)

        subs = [await bus.nc.subscribe(subjects.fleet_filter(t), cb=on_msg) for t in answer_types]
        try:
            try:
                await bus.nc.flush()
                await bus.publish(envelope)
            except Exception as exc:  # after retries: report it, don't dump a nats traceback on the user
                raise FlotillaUnavailable(f"could not publish {envelope.type} to {self.nats_url}: {exc!r}") from exc
            if not answer_types:
                return None
            try:
                return await asyncio.wait_for(answer, wait_s)
            except TimeoutError:
                return None
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def apply(self, document: Mapping[str, Any] | BaseModel, wait_s: float = DEFAULT_APPLY_TIMEOUT_S
                    ) -> ApplyResult:  # fmt: skip
        """Publish a ClusterSet document and wait for the planner's verdict.

        Raises FlotillaTimeout if the planner does not answer in time (the intent is stored and will
        still be processed when the planner runs).
        """
        if isinstance(document, BaseModel):
            doc: dict[str, Any] = document.model_dump(mode="json", by_alias=True)
        else:
            doc = _json_safe(dict(document))
        payload = ClusterSetApplied(document=doc)
        env = new_event(payload, source=SOURCE)
        answer = await self._request(
            env, [ClusterSetAccepted.type_name(), ClusterSetRejected.type_name()], wait_s
        )
        if answer is None:
            raise FlotillaTimeout(
                f"no answer from the planner for ClusterSet {payload.name() or '(unnamed)'} within {wait_s:g}s "
                f"(event {env.id} is stored in {subjects.STREAM_CLUSTERSETS}; is the planner running?)"
            )
        if answer.type == ClusterSetAccepted.type_name():
            accepted = payload_as(answer, ClusterSetAccepted)
            return ApplyResult(accepted=True, name=accepted.clusterset, generation=accepted.generation,
                               config_hash=accepted.config_hash, event_id=env.id)  # fmt: skip
        rejected = payload_as(answer, ClusterSetRejected)
        return ApplyResult(accepted=False, name=rejected.clusterset or payload.name(), errors=list(rejected.errors),
                           event_id=env.id)  # fmt: skip

    async def delete(self, name: str, wait_s: float = DEFAULT_DELETE_TIMEOUT_S) -> DeleteResult:
        """Ask for a ClusterSet to be deleted (its clusters retired). An unknown set gets no answer:
        that comes back as `timed_out=True`, not as an exception."""
        env = new_event(ClusterSetDeleted(name=name), source=SOURCE)
        answer = await self._request(env, [ClusterSetRetired.type_name(), ClusterSetRejected.type_name()], wait_s)
        if answer is None:
            return DeleteResult(name=name, retired=False, timed_out=True, event_id=env.id)
        if answer.type == ClusterSetRetired.type_name():
            retired = payload_as(answer, ClusterSetRetired)
            return DeleteResult(name=name, retired=True, clusters=list(retired.clusters),
                                generation=retired.generation, event_id=env.id)  # fmt: skip
        rejected = payload_as(answer, ClusterSetRejected)
        return DeleteResult(name=name, retired=False, errors=list(rejected.errors), event_id=env.id)

    async def protect(self, cluster_id: str, protected: bool = True, clusterset: str | None = None,
                      wait_s: float = DEFAULT_DELETE_TIMEOUT_S) -> ApplyResult:  # fmt: skip
        """Mark one cluster protected (never retired) or remove the mark. The set defaults to the id's prefix."""
        name = clusterset or cluster_id.rsplit("-", 1)[0]
        env = new_event(ClusterProtectionChanged(clusterset=name, cluster_id=cluster_id, protected=protected),
                        source=SOURCE)  # fmt: skip
        answer = await self._request(env, [ClusterProtectionUpdated.type_name(), ClusterSetRejected.type_name()],
                                     wait_s)  # fmt: skip
        if answer is None:
            raise FlotillaTimeout(f"no answer from the planner about {cluster_id} within {wait_s}s")
        if answer.type == ClusterProtectionUpdated.type_name():
            return ApplyResult(accepted=True, name=name, event_id=env.id)
        return ApplyResult(accepted=False, name=name, errors=list(payload_as(answer, ClusterSetRejected).errors),
                           event_id=env.id)  # fmt: skip

    async def _intent_request(self, payload: Event, answers: list[str], wait_s: float) -> RequestResult:
        env = new_event(payload, source=SOURCE)
        answer = await self._request(env, answers, wait_s)
        return RequestResult(event_id=env.id, subject=payload.subject(), waited=wait_s > 0, answer=answer)

    async def rollout_control(self, clusterset: str, action: str, *, rollout_id: str | None = None, reason: str = "",
                              wait_s: float = 0) -> RequestResult:  # fmt: skip
        """Pause, resume, abort or roll back the running rollout of a ClusterSet (only `rollout_id`, if given).

        With wait_s > 0, waits that long for rotation's answer (e.g. RolloutPaused); without, returns once the
        request is stored. Raises InvalidRequest (nothing published) for a bad action, name or reason.
        """
        payload = _intent(RolloutControlRequested, f"rollout {action} request", clusterset=clusterset, action=action,
                          rollout_id=rollout_id or None, reason=reason)  # fmt: skip
        return await self._intent_request(payload, ROLLOUT_ANSWERS.get(action, []), wait_s)

    async def start_fleet_rollout(self, request: FleetRolloutRequested | Mapping[str, Any],
                                  wait_s: float = 0) -> RequestResult:  # fmt: skip
        """Start a fleet rollout: a FleetRolloutRequested, or a mapping as users write it (camelCase allowed).

        With wait_s > 0, waits for FleetRolloutStarted or FleetRolloutRejected (see `RequestResult.answer`).
        """
        if not isinstance(request, FleetRolloutRequested):
            model, errors = parse_fleet_rollout(request)
            if model is None:
                raise InvalidRequest("fleet rollout", errors)
            request = model
        return await self._intent_request(request, FLEET_ANSWERS["start"], wait_s)

    async def approve_fleet_rollout(self, rollout_id: str, stage: str, approver: str = "",
                                    wait_s: float = 0) -> RequestResult:  # fmt: skip
        """Approve one stage of a fleet rollout that waits for approval."""
        payload = _intent(FleetRolloutApproved, "approval", rollout_id=rollout_id, stage=stage, approver=approver)
        return await self._intent_request(payload, FLEET_ANSWERS["approve"], wait_s)

    async def fleet_rollout_control(self, rollout_id: str, action: str, reason: str = "",
                                    wait_s: float = 0) -> RequestResult:  # fmt: skip
        """Pause, resume or abort a fleet rollout."""
        payload = _intent(FleetRolloutControlRequested, f"fleet rollout {action} request", rollout_id=rollout_id,
                          action=action, reason=reason)  # fmt: skip
        return await self._intent_request(payload, FLEET_ANSWERS.get(action, []), wait_s)

    async def request_control_plane_change(self, clusterset: str, operation: str, *,
                                           cluster_ids: Iterable[str] = (), to_version: str | None = None,
                                           concurrency: int = 1, failure_budget: int = 0,
                                           wait_s: float = 0) -> RequestResult:  # fmt: skip
        """Ask etcd_migration to migrate (one node to three) or upgrade the control planes of a set's clusters (all
        of its live ones unless `cluster_ids` names some), `concurrency` at a time, halting once more than
        `failure_budget` failed.

        With wait_s > 0, waits for the planner's answer: the ControlPlanePipelineRequested that starts the work, or
        a ClusterSetRejected naming what it refused. Raises InvalidRequest (nothing published) naming every bad
        field.
        """
        payload = control_plane_change(clusterset, operation, cluster_ids=cluster_ids, to_version=to_version,
                                       concurrency=concurrency, failure_budget=failure_budget)  # fmt: skip
        return await self._intent_request(payload, CONTROLPLANE_ANSWERS, wait_s)

    async def watch_ready_events(
        self, cloud: str | None = None, region: str | None = None, cluster_type: str | None = None,
        since_start: bool = False,
    ) -> AsyncGenerator[tuple[Envelope, ClusterReady], None]:  # fmt: skip
        """ClusterReady events with their envelopes, filtered by subject (cloud, region) and payload (type).

        An ordered JetStream consumer (ephemeral, no server-side state left behind) so a NATS
        reconnect resumes where it stopped instead of losing events.
        """
        bus = await self._connect()
        await self._require_stream(bus, subjects.STREAM_FLEET)
        policy = jsapi.DeliverPolicy.ALL if since_start else jsapi.DeliverPolicy.NEW
        sub = await bus.js.subscribe(
            subjects.fleet_filter(ClusterReady.type_name(), cloud, region),
            stream=subjects.STREAM_FLEET, ordered_consumer=True, deliver_policy=policy,
        )  # fmt: skip
        # An event id can be in the stream twice if it was re-published after the dedup window.
        seen: OrderedDict[str, None] = OrderedDict()
        try:
            async for msg in sub.messages:
                try:
                    env = Envelope.from_bytes(msg.data)
                    ready = payload_as(env, ClusterReady)
                except (ValidationError, TypeError):
                    continue
                if env.id in seen or (cluster_type and ready.cluster_type != cluster_type):
                    continue
                seen[env.id] = None
                if len(seen) > 100_000:
                    seen.popitem(last=False)
                yield env, ready
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            # The server drops an idle ephemeral consumer after a few seconds anyway; deleting it now is tidier.
            consumer = getattr(sub, "_consumer", None)
            if consumer:
                with contextlib.suppress(Exception):
                    await bus.js.delete_consumer(subjects.STREAM_FLEET, consumer)

    async def watch_ready(
        self, cloud: str | None = None, region: str | None = None, cluster_type: str | None = None,
        since_start: bool = False,
    ) -> AsyncGenerator[ClusterReady, None]:  # fmt: skip
        """Yields each cluster that became READY (only new ones unless since_start)."""
        events = self.watch_ready_events(cloud, region, cluster_type, since_start)
        async with contextlib.aclosing(events):
            async for _env, ready in events:
                yield ready

    # -------------------------------------------------------------- status API side
    async def _get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        try:
            response = await self._http.get(path, params={k: v for k, v in (params or {}).items() if v is not None})
        except httpx.HTTPError as exc:
            raise FlotillaError(f"status API at {self.api_url} not reachable: {exc!r}") from exc
        if response.status_code >= 400:
            try:  # the projector answers {"error", "message", "detail"}; FastAPI's default is {"detail"}
                body = response.json()
                detail = body.get("message") or body.get("detail") or response.text
            except (ValueError, AttributeError):
                detail = response.text
            raise ApiError(response.status_code, str(response.url), str(detail))
        return response.json()

    async def _get_optional(self, path: str) -> Any | None:
        try:
            return await self._get(path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def _paged(self, path: str, params: Mapping[str, Any], limit: int | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        seen_cursors: set[str] = set()
        while True:
            page = await self._get(path, {**params, "limit": self.page_size, "cursor": cursor})
            if isinstance(page, list):  # tolerate an unpaged list
                items.extend(page)
                break
            items.extend(page.get("items", []))
            cursor = page.get("next")
            if not cursor or cursor in seen_cursors or (limit is not None and len(items) >= limit):
                break
            seen_cursors.add(cursor)  # a server bug must not loop us forever
        return items[:limit] if limit is not None else items

    async def clustersets(self) -> list[dict[str, Any]]:
        return await self._paged("/v1/clustersets", {})

    async def clusterset(self, name: str) -> dict[str, Any] | None:
        return await self._get_optional(f"/v1/clustersets/{name}")

    async def clusters(self, limit: int | None = None, **filters: str | None) -> list[dict[str, Any]]:
        """Clusters matching the filters (clusterset, state, env, cloud, region, cluster_type); all pages."""
        params: dict[str, Any] = {}
        for key, value in filters.items():
            api_key = _FILTER_ALIASES.get(key, key)
            if api_key not in CLUSTER_FILTERS:
                raise TypeError(f"unknown cluster filter {key!r} (known: {', '.join(CLUSTER_FILTERS)}, cluster_type)")
            if value is not None:
                params[api_key] = value
        return await self._paged("/v1/clusters", params, limit=limit)

    async def cluster(self, cluster_id: str) -> dict[str, Any] | None:
        return await self._get_optional(f"/v1/clusters/{cluster_id}")

    async def cluster_events(self, cluster_id: str) -> list[dict[str, Any]]:
        body = await self._get(f"/v1/clusters/{cluster_id}/events")
        return body.get("items", []) if isinstance(body, dict) else list(body)

    async def rollouts(self, kind: str | None = None, clusterset: str | None = None, state: str | None = None,
                       limit: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """ClusterSet and fleet rollouts (kind: clusterset or fleet), all pages; listings leave out long lists."""
        if kind is not None and kind not in ROLLOUT_KINDS:
            raise TypeError(f"unknown rollout kind {kind!r} (known: {', '.join(ROLLOUT_KINDS)})")
        return await self._paged("/v1/rollouts", {"kind": kind, "clusterset": clusterset, "state": state},
                                 limit=limit)  # fmt: skip

    async def rollout(self, rollout_id: str, kind: str | None = None) -> dict[str, Any] | None:
        """One rollout of either kind, in full; None when unknown."""
        try:
            return await self._get(f"/v1/rollouts/{rollout_id}", {"kind": kind})
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def migrations(self, kind: str | None = None, clusterset: str | None = None, cluster: str | None = None,
                         state: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """Control-plane migrations, upgrades and their pipelines (kind: migration, upgrade or pipeline), all
        pages; listings leave out the step timelines and per-cluster entries."""
        if kind is not None and kind not in MIGRATION_KINDS:
            raise TypeError(f"unknown migration kind {kind!r} (known: {', '.join(MIGRATION_KINDS)})")
        return await self._paged("/v1/migrations", {"kind": kind, "clusterset": clusterset, "cluster": cluster,
                                                    "state": state}, limit=limit)  # fmt: skip

    async def migration(self, migration_id: str, kind: str | None = None) -> dict[str, Any] | None:
        """One migration or upgrade (by operation id) or pipeline (by pipeline id), in full; None when unknown."""
        try:
            return await self._get(f"/v1/migrations/{migration_id}", {"kind": kind})
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def discovery(self) -> Any:
        return await self._get("/v1/discovery")

    async def ready(self) -> bool:
        """True when the status API answers /readyz with 2xx."""
        try:
            response = await self._http.get("/readyz")
        except httpx.HTTPError:
            return False
        return response.status_code < 300
