"""flotilla: apply and delete ClusterSets, steer rollouts, migrate and upgrade control planes, read clustersets,
clusters, rollouts and control-plane operations, watch READY clusters, run the stack."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.client import (
    DEFAULT_APPLY_TIMEOUT_S,
    DEFAULT_DELETE_TIMEOUT_S,
    DocumentError,
    FlotillaClient,
    FlotillaError,
    FlotillaUnavailable,
    InvalidRequest,
    RequestResult,
    api_url_from_settings,
    control_plane_change,
    load_clustersets,
    load_fleet_rollout,
)
from shared.config import get_settings
from shared.events import Envelope, FieldError
from shared.events.models import CLUSTER_STATES, ClusterReady

T = TypeVar("T")

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
get_app = typer.Typer(no_args_is_help=True, help="Read clustersets and clusters from the status API.")
app.add_typer(get_app, name="get")
rollout_app = typer.Typer(no_args_is_help=True,
                          help="Steer a ClusterSet's rollout (pause, resume, abort, rollback); list and read rollouts.")
app.add_typer(rollout_app, name="rollout")
fleet_app = typer.Typer(no_args_is_help=True, help="Roll one change over many ClusterSets, stage by stage.")
app.add_typer(fleet_app, name="fleet-rollout")
controlplane_app = typer.Typer(no_args_is_help=True,
                               help="Migrate self-managed control planes to HA (one node to three) or upgrade them one "
                                    "node at a time; list and read those operations.")  # fmt: skip
app.add_typer(controlplane_app, name="controlplane")

out = Console()
err = Console(stderr=True)

# Tests replace this to run the commands against a stub; everything else uses the real client.
make_client: Callable[[str, str], FlotillaClient] = FlotillaClient

CLOUDS = ("aws", "azure", "gcp")


class Output(StrEnum):
    table = "table"
    json = "json"


@dataclass(frozen=True)
class Endpoints:
    nats_url: str
    api_url: str


def _endpoints(ctx: typer.Context) -> Endpoints:
    obj = ctx.find_root().obj
    assert isinstance(obj, Endpoints)
    return obj


def _run(coro_fn: Callable[[FlotillaClient], Awaitable[T]], ends: Endpoints) -> T:
    """Run one command's coroutine with a client; user-facing errors become one red line and exit 1."""

    async def go() -> T:
        client = make_client(ends.nats_url, ends.api_url)
        try:
            return await coro_fn(client)
        finally:
            await client.close()

    try:
        return asyncio.run(go())
    except InvalidRequest as exc:  # refused before anything was published: a usage error
        _invalid(exc)
    except FlotillaError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None


def _invalid(exc: InvalidRequest) -> NoReturn:
    err.print(f"[red]error:[/] invalid {escape(exc.what)}; nothing was published:")
    _print_errors(exc.errors)
    raise typer.Exit(2)


@app.callback()
def root(
    ctx: typer.Context,
    nats_url: str | None = typer.Option(None, "--nats-url", help="NATS server (default: FLOTILLA_NATS_URL)"),
    api_url: str | None = typer.Option(
        None, "--api-url", help="status API (default: FLOTILLA_API_URL or http://FLOTILLA_API_HOST:FLOTILLA_API_PORT)"
    ),
) -> None:
    settings = get_settings()
    ctx.obj = Endpoints(nats_url=nats_url or settings.nats_url, api_url=(api_url or api_url_from_settings(settings)))


# ----------------------------------------------------------------------------- apply / delete
@app.command()
def apply(
    ctx: typer.Context,
    files: list[Path] = typer.Option(
        ..., "-f", "--filename", help="ClusterSet YAML file or directory; repeatable; - for stdin"
    ),
    wait: float = typer.Option(
        DEFAULT_APPLY_TIMEOUT_S, "--wait", min=0.1, help="seconds to wait for the planner's answer"
    ),
) -> None:
    """Apply ClusterSets: publish each and wait until the planner accepts or rejects it."""
    try:
        loaded = load_clustersets(files)
    except FlotillaError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    for source, why in loaded.skipped:
        err.print(f"[dim]skipped {escape(source)}: {escape(why)}[/]")
    if not loaded.documents:
        err.print("[red]error:[/] no ClusterSet documents to apply")
        raise typer.Exit(2)

    async def go(client: FlotillaClient) -> bool:
        ok = True
        for doc in loaded.documents:
            label = f"clusterset/{doc.name or '(unnamed)'}"
            try:
                result = await client.apply(doc.document, wait_s=wait)
            except FlotillaUnavailable:
                raise  # nothing else will work either
            except FlotillaError as exc:
                err.print(f"[red]{escape(label)}: {escape(str(exc))}[/]")
                ok = False
                continue
            if result.accepted:
                out.print(f"{escape(label)} accepted (generation {result.generation}"
                          + (f", config {result.config_hash})" if result.config_hash else ")"))  # fmt: skip
            else:
                ok = False
                err.print(f"[red]{escape(label)} rejected[/] ({escape(doc.source)}):")
                _print_errors(result.errors)
        return ok

    if not _run(go, _endpoints(ctx)):
        raise typer.Exit(1)


def _print_errors(errors: list[FieldError]) -> None:
    """Every bad field on its own line, as the planner named it."""
    for e in errors:
        err.print(f"  [bold]{escape(e.field)}[/]: {escape(e.message)}")


@app.command()
def delete(
    ctx: typer.Context,
    names: list[str] = typer.Argument(..., help="ClusterSet name(s)"),
    wait: float = typer.Option(DEFAULT_DELETE_TIMEOUT_S, "--wait", min=0.1, help="seconds to wait for the answer"),
) -> None:
    """Delete ClusterSets: their clusters are drained and retired."""

    async def go(client: FlotillaClient) -> bool:
        ok = True
        for name in names:
            result = await client.delete(name, wait_s=wait)
            if result.retired:
                out.print(f"clusterset/{escape(name)} deleted ({len(result.clusters)} cluster(s) retiring)")
            elif result.timed_out:
                ok = False
                err.print(f"[yellow]clusterset/{escape(name)}: no answer within {wait:g}s; is it an applied "
                          "ClusterSet? (flotilla get clustersets)[/]")  # fmt: skip
            else:
                ok = False
                err.print(f"[red]clusterset/{escape(name)}: delete refused[/]")
                _print_errors(result.errors)
        return ok

    if not _run(go, _endpoints(ctx)):
        raise typer.Exit(1)


@app.command()
def protect(
    ctx: typer.Context,
    cluster_ids: list[str] = typer.Argument(..., help="cluster id(s), e.g. modelserving-prod-aws-us-east-1-7f3a"),
    off: bool = typer.Option(False, "--off", help="remove the mark instead of setting it"),
    clusterset: str | None = typer.Option(None, "--clusterset", help="the set (default: the id without its suffix)"),
    wait: float = typer.Option(DEFAULT_DELETE_TIMEOUT_S, "--wait", min=0.1, help="seconds to wait for the answer"),
) -> None:
    """Protect clusters from deprovisioning (scale-down and delete are refused while marked)."""

    async def go(client: FlotillaClient) -> bool:
        ok = True
        for cid in cluster_ids:
            result = await client.protect(cid, protected=not off, clusterset=clusterset, wait_s=wait)
            if result.accepted:
                out.print(f"cluster/{escape(cid)} {'unprotected' if off else 'protected'}")
            else:
                ok = False
                err.print(f"[red]cluster/{escape(cid)}: refused[/]")
                _print_errors(result.errors)
        return ok

    if not _run(go, _endpoints(ctx)):
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- get
def _state(value: str | None) -> str | None:
    if value is None:
        return None
    upper = value.upper()
    if upper not in CLUSTER_STATES:
        raise typer.BadParameter(f"{value!r} is not a cluster state ({', '.join(CLUSTER_STATES)})")
    return upper


def _cloud(value: str | None) -> str | None:
    if value is None:
        return None
    if value.lower() not in CLOUDS:
        raise typer.BadParameter(f"{value!r} is not a cloud ({', '.join(CLOUDS)})")
    return value.lower()


def _print_json(data: Any) -> None:
    # Plain stdout, no rich highlighting or wrapping: this output is for machines.
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _loc(item: dict[str, Any]) -> dict[str, Any]:
    loc = item.get("location")
    return loc if isinstance(loc, dict) else {}


def _counts_text(counts: dict[str, int]) -> str:
    rank = {s: i for i, s in enumerate(CLUSTER_STATES)}
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: rank.get(kv[0], 99)) if v)


def clustersets_table(items: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NAME", "ENV", "CLOUD", "REGION", "TYPE", "GEN", "READY", "STATES"):
        table.add_column(col, no_wrap=col != "STATES")
    for item in items:
        loc, status, spec = _loc(item), item.get("status") or {}, item.get("spec") or {}
        # The projector keeps count beside the cluster spec; desiredClusters is 0 once the set is deleted.
        candidates = (status.get("desiredClusters"), item.get("count"), spec.get("count"))
        count = next((v for v in candidates if v is not None), "?")
        notes = [n for n, on in (("deleted", item.get("deleted")), ("rejected", item.get("accepted") is False)) if on]
        gen = item.get("generation")
        table.add_row(
            str(item.get("name", "")), str(loc.get("env", "")), str(loc.get("cloud", "")), str(loc.get("region", "")),
            str(item.get("clusterType") or ""), "" if gen is None else str(gen),
            f"{status.get('readyClusters', 0)}/{count}", " ".join([_counts_text(status.get("counts") or {}), *notes]),
        )  # fmt: skip
    return table


def clusters_table(items: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("ID", "CLUSTERSET", "ENV", "CLOUD", "REGION", "TYPE", "STATE", "CONFIG", "ENDPOINT"):
        table.add_column(col, no_wrap=True, overflow="fold")
    for item in items:
        loc, state = _loc(item), str(item.get("state", ""))
        style = "green" if state == "READY" else "red" if state == "FAILED" else None
        table.add_row(
            str(item.get("id", "")), str(item.get("clusterset", "")), str(loc.get("env", "")),
            str(loc.get("cloud", "")), str(loc.get("region", "")), str(item.get("clusterType", "")),
            f"[{style}]{state}[/]" if style else state,
            str(item.get("configHash") or "") + (" (outdated)" if item.get("outdated") else ""),
            str(item.get("endpoint") or ""),
        )  # fmt: skip
    return table


def _print_one(item: dict[str, Any] | None, output: Output, what: str,
               detail: Callable[[dict[str, Any]], None]) -> None:  # fmt: skip
    """One item as JSON or in detail; exit 1 naming it when it does not exist."""
    if item is None:
        err.print(f"[red]error:[/] {escape(what)} not found")
        raise typer.Exit(1)
    if output is Output.json:
        _print_json(item)
    else:
        detail(item)


def _print_listing(items: list[dict[str, Any]], output: Output, empty: str,
                   table: Callable[[list[dict[str, Any]]], Any]) -> None:  # fmt: skip
    """A listing as JSON, or as a table (a note on stderr when there is nothing to list)."""
    if output is Output.json:
        _print_json(items)
    elif not items:
        err.print(empty)
    else:
        out.print(table(items))


@get_app.command("clustersets")
def get_clustersets(
    ctx: typer.Context,
    output: Output = typer.Option(Output.table, "-o", "--output", case_sensitive=False),
) -> None:
    """List ClusterSets with their READY counts."""
    items = _run(lambda c: c.clustersets(), _endpoints(ctx))
    _print_listing(items, output, "no clustersets", clustersets_table)


@get_app.command("clusters")
def get_clusters(
    ctx: typer.Context,
    clusterset: str | None = typer.Option(None, "--clusterset", help="only this ClusterSet"),
    state: str | None = typer.Option(None, "--state", callback=_state, help="REQUESTED, READY, FAILED, ..."),
    env: str | None = typer.Option(None, "--env"),
    cloud: str | None = typer.Option(None, "--cloud", callback=_cloud, help="aws, azure or gcp"),
    region: str | None = typer.Option(None, "--region"),
    cluster_type: str | None = typer.Option(None, "--type", help="clusterType, e.g. ModelServing"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="at most this many"),
    output: Output = typer.Option(Output.table, "-o", "--output", case_sensitive=False),
) -> None:
    """List clusters (all pages), filtered."""
    filters = dict(clusterset=clusterset, state=state, env=env, cloud=cloud, region=region, cluster_type=cluster_type)
    items = _run(lambda c: c.clusters(limit=limit, **filters), _endpoints(ctx))
    _print_listing(items, output, "no clusters match", clusters_table)


# ----------------------------------------------------------------------------- watch
@app.command()
def watch(
    ctx: typer.Context,
    cloud: str | None = typer.Option(None, "--cloud", callback=_cloud),
    region: str | None = typer.Option(None, "--region"),
    cluster_type: str | None = typer.Option(None, "--type", help="clusterType"),
    since_start: bool = typer.Option(False, "--since-start", help="replay from the first ClusterReady"),
    count: int | None = typer.Option(None, "--count", min=1, help="exit after this many events"),
    output: Output = typer.Option(Output.table, "-o", "--output", case_sensitive=False),
) -> None:
    """Stream clusters as they become READY (Ctrl-C to stop)."""

    def show(env: Envelope, ready: ClusterReady) -> None:
        if output is Output.json:
            typer.echo(json.dumps({"time": env.time.isoformat(), "id": env.id, **ready.model_dump(mode="json")}))
            return
        loc = ready.location
        out.print(
            f"{env.time:%Y-%m-%dT%H:%M:%S}Z [green]READY[/] {escape(ready.cluster_id)} {escape(ready.clusterset)} "
            f"{loc.env}/{loc.cloud}/{loc.region} {escape(ready.cluster_type)} {escape(ready.endpoint)}",
            soft_wrap=True,
        )

    async def go(client: FlotillaClient) -> None:
        seen = 0
        events = client.watch_ready_events(cloud, region, cluster_type, since_start)
        async with contextlib.aclosing(events):  # unsubscribe before the client closes its connection
            async for env, ready in events:
                show(env, ready)
                seen += 1
                if count is not None and seen >= count:
                    return

    try:
        _run(go, _endpoints(ctx))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


# ----------------------------------------------------------------------------- rollouts
class RolloutKind(StrEnum):
    clusterset = "clusterset"
    fleet = "fleet"


WAIT_HELP = "seconds to wait for the service's answer (0: return once the request is stored)"


def _report(result: RequestResult, label: str, wait: float) -> None:
    """What happened to an intent: stored, answered (with the answering event) or unanswered in time."""
    if not result.waited:
        out.print(f"{escape(label)} requested (event {result.event_id})")
        return
    if result.answer is None:
        err.print(f"[yellow]{escape(label)}: no answer within {wait:g}s (event {result.event_id} is stored; "
                  "is the service running, and is there something to act on?)[/]")  # fmt: skip
        raise typer.Exit(1)
    answer = result.answer
    if answer.type in ("FleetRolloutRejected", "ClusterSetRejected"):
        err.print(f"[red]{escape(label)} rejected:[/]")
        _print_errors([FieldError.model_validate(e) for e in answer.data.get("errors", [])])
        raise typer.Exit(1)
    out.print(f"{escape(label)}: {answer.type}" + (f" ({escape(answer.data['reason'])})"
                                                   if answer.data.get("reason") else ""))  # fmt: skip


def _rollout_control_command(action: str, summary: str) -> None:
    @rollout_app.command(action, help=summary)
    def command(
        ctx: typer.Context,
        clusterset: str = typer.Argument(..., help="the ClusterSet whose rollout to act on"),
        rollout_id: str | None = typer.Option(None, "--rollout-id", help="only if this is the running rollout"),
        reason: str = typer.Option("", "--reason", help="recorded with the request"),
        wait: float = typer.Option(0, "--wait", min=0, help=WAIT_HELP),
    ) -> None:
        result = _run(lambda c: c.rollout_control(clusterset, action, rollout_id=rollout_id, reason=reason,
                                                  wait_s=wait), _endpoints(ctx))  # fmt: skip
        _report(result, f"{action} of the rollout of clusterset/{clusterset}", wait)


for _action, _summary in (
    ("pause", "Pause a ClusterSet's running rollout (nothing new is drained or created until resumed)."),
    ("resume", "Resume a paused rollout."),
    ("abort", "Stop a rollout where it is, keeping every cluster (old and new)."),
    ("rollback", "Roll a rollout back: retire the clusters it created, keep the old ones."),
):
    _rollout_control_command(_action, _summary)


def _rollout_progress(item: dict[str, Any]) -> tuple[str, str]:
    """(PROGRESS, DETAIL) columns of one rollout, either kind."""
    if item.get("kind") == "FleetRollout":
        counts = item.get("setCounts") or {}
        total = sum(counts.values())
        current = next((s["name"] for s in item.get("stages") or [] if s.get("state") != "COMPLETED"), "")
        progress = f"{counts.get('SUCCEEDED', 0)}/{total} sets" + (f", {counts['FAILED']} failed"
                                                                    if counts.get("FAILED") else "")  # fmt: skip
        detail = " ".join(x for x in (f"stage {current}" if current else "", item.get("reason") or "") if x)
        return progress, detail
    count = item.get("count")
    progress = f"{item.get('replaced', 0)}/{'?' if count is None else count} replaced"
    hashes = ",".join(item.get("fromConfigHashes") or [])
    detail = f"{hashes or '?'} -> {item.get('toConfigHash') or '?'}"
    waiting = item.get("waiting") or {}
    extra = item.get("reason") or waiting.get("reason")
    return progress, detail + (f" ({extra})" if extra else "")


_STATE_STYLE = {"COMPLETED": "green", "FAILED": "red", "SUCCEEDED": "green", "PAUSED": "yellow", "HALTED": "red",
                "ABORTED": "red", "ROLLED_BACK": "yellow", "ROLLING_BACK": "yellow", "REJECTED": "red",
                "AWAITING_APPROVAL": "cyan", "WAITING": "cyan"}  # fmt: skip


def _styled(state: str) -> str:
    style = _STATE_STYLE.get(state)
    return f"[{style}]{state}[/]" if style else state


def rollouts_table(items: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("ID", "KIND", "SCOPE", "STATE", "PROGRESS", "DETAIL", "UPDATED"):
        table.add_column(col, no_wrap=col not in ("DETAIL",), overflow="fold")
    for item in items:
        fleet = item.get("kind") == "FleetRollout"
        progress, detail = _rollout_progress(item)
        table.add_row(
            str(item.get("id", "")), "fleet" if fleet else "clusterset",
            str(item.get("clusterType") or "") if fleet else str(item.get("clusterset") or ""),
            _styled(str(item.get("state", ""))), progress, escape(detail), str(item.get("updatedAt") or ""),
        )  # fmt: skip
    return table


def _rollout_detail(item: dict[str, Any]) -> None:
    """One rollout for people: the listing row, then its stages and sets (fleet) or clusters (set rollout)."""
    out.print(rollouts_table([item]))
    if item.get("kind") == "FleetRollout":
        stages = Table(title="stages", box=None, header_style="bold", pad_edge=False, title_justify="left")
        for col in ("STAGE", "STATE", "APPROVAL", "SOAK UNTIL", "CLUSTERSETS"):
            stages.add_column(col)
        for st in item.get("stages") or []:
            stages.add_row(str(st.get("name")), _styled(str(st.get("state"))), "yes" if st.get("approval") else "",
                           str(st.get("soakUntil") or ""), str(len(st.get("clustersets") or [])))  # fmt: skip
        out.print(stages)
        sets = Table(title="clustersets", box=None, header_style="bold", pad_edge=False, title_justify="left")
        for col in ("CLUSTERSET", "STAGE", "STATE", "PATH", "ROLLOUT", "REASON"):
            sets.add_column(col, overflow="fold")
        for entry in item.get("sets") or []:
            rollout = entry.get("rollout") or {}
            progress = (f"{rollout.get('state')} {rollout.get('replaced', 0)}/{rollout.get('count') or '?'}"
                        if rollout else "")  # fmt: skip
            sets.add_row(str(entry.get("clusterset")), str(entry.get("stage") or ""), _styled(str(entry.get("state"))),
                         str(entry.get("updatePath") or ""), progress, escape(str(entry.get("reason") or "")))
        out.print(sets)
    else:
        for key in ("outdatedClusters", "createdClusters", "retiredClusters", "failedClusterIds"):
            if item.get(key):
                out.print(f"[bold]{key}:[/] {escape(' '.join(item[key]))}")
    timeline = item.get("timeline") or []
    if timeline:
        out.print("[bold]timeline:[/]")
        for t in timeline:
            out.print(f"  {t.get('time')} {_styled(str(t.get('state')))}"
                      + (f" ({escape(str(t['reason']))})" if t.get("reason") else ""))  # fmt: skip


@rollout_app.command("list")
def rollout_list(
    ctx: typer.Context,
    kind: RolloutKind | None = typer.Option(None, "--kind", case_sensitive=False, help="clusterset or fleet"),
    clusterset: str | None = typer.Option(None, "--clusterset", help="this set's rollouts and fleet rollouts over it"),
    state: str | None = typer.Option(None, "--state", help="e.g. IN_PROGRESS, PAUSED, HALTED, COMPLETED"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="at most this many"),
    output: Output = typer.Option(Output.table, "-o", "--output", case_sensitive=False),
) -> None:
    """List ClusterSet rollouts and fleet rollouts (all pages)."""
    filters = dict(kind=kind.value if kind else None, clusterset=clusterset, state=state.upper() if state else None)
    items = _run(lambda c: c.rollouts(limit=limit, **filters), _endpoints(ctx))
    _print_listing(items, output, "no rollouts match", rollouts_table)


@rollout_app.command("get")
def rollout_get(
    ctx: typer.Context,
    rollout_id: str = typer.Argument(..., help="a rollout id or a fleet rollout id"),
    kind: RolloutKind | None = typer.Option(None, "--kind", case_sensitive=False, help="if the id names both kinds"),
    output: Output = typer.Option(Output.table, "-o", "--output", case_sensitive=False),
) -> None:
    """Show one rollout: state, progress, stages and sets (fleet) or clusters (ClusterSet), timeline."""
    item = _run(lambda c: c.rollout(rollout_id, kind=kind.value if kind else None), _endpoints(ctx))
    _print_one(item, output, f"rollout {rollout_id!r}", _rollout_detail)


@fleet_app.command("start")
def fleet_start(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="YAML or JSON with the fleet rollout (rolloutId, clusterType, patch, "
                                          "stages, maxInFlight, failureBudget, selector); - for stdin"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the file, publish nothing"),
    wait: float = typer.Option(0, "--wait", min=0, help=WAIT_HELP),
) -> None:  # fmt: skip
    """Start a fleet rollout from a file; every bad field is printed and nothing is published."""
    try:
        request = load_fleet_rollout(file)
    except InvalidRequest as exc:
        _invalid(exc)
    except DocumentError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    label = f"fleet-rollout/{request.rollout_id}"
    if dry_run:
        stages = ", ".join(s.name for s in request.stages)
        out.print(f"{escape(label)} is valid ({len(request.stages)} stage(s): {escape(stages)}); nothing published")
        return
    result = _run(lambda c: c.start_fleet_rollout(request, wait_s=wait), _endpoints(ctx))
    _report(result, label, wait)


@fleet_app.command("approve")
def fleet_approve(
    ctx: typer.Context,
    rollout_id: str = typer.Argument(..., help="the fleet rollout id"),
    stage: str = typer.Argument(..., help="the stage waiting for approval"),
    approver: str | None = typer.Option(None, "--approver", help="who approves (default: the local user name)"),
    wait: float = typer.Option(0, "--wait", min=0, help=WAIT_HELP),
) -> None:
    """Approve a stage that waits for approval."""
    who = approver if approver is not None else _user()
    result = _run(lambda c: c.approve_fleet_rollout(rollout_id, stage, approver=who, wait_s=wait), _endpoints(ctx))
    _report(result, f"approval of stage {stage} of fleet-rollout/{rollout_id}", wait)


def _user() -> str:
    with contextlib.suppress(Exception):  # no passwd entry (containers): approve anonymously
        return getpass.getuser()
    return ""


def _fleet_control_command(action: str, summary: str) -> None:
    @fleet_app.command(action, help=summary)
    def command(
        ctx: typer.Context,
        rollout_id: str = typer.Argument(..., help="the fleet rollout id"),
        reason: str = typer.Option("", "--reason", help="recorded with the request"),
        wait: float = typer.Option(0, "--wait", min=0, help=WAIT_HELP),
    ) -> None:
        result = _run(lambda c: c.fleet_rollout_control(rollout_id, action, reason=reason, wait_s=wait),
                      _endpoints(ctx))  # fmt: skip
        _report(result, f"{action} of fleet-rollout/{rollout_id}", wait)


for _action, _summary in (
    ("pause", "Pause a fleet rollout: no further ClusterSet is started (those in flight finish)."),
    ("resume", "Resume a paused or halted fleet rollout."),
    ("abort", "Abort a fleet rollout: no further ClusterSet is started."),
):
    _fleet_control_command(_action, _summary)


# ----------------------------------------------------------------------------- control planes
class MigrationKind(StrEnum):
    migration = "migration"
    upgrade = "upgrade"
    pipeline = "pipeline"


CLUSTER_HELP = "only this cluster; repeatable (default: every live cluster of the set)"
CONCURRENCY_HELP = "how many clusters at a time"
BUDGET_HELP = "halt once more than this many clusters failed"


def _control_plane_request(ctx: typer.Context, clusterset: str, operation: str, clusters: list[str],
                           to_version: str | None, concurrency: int, failure_budget: int,
                           wait: float) -> None:  # fmt: skip
    try:  # checked here too, so that bad input needs no connection and names every field
        control_plane_change(clusterset, operation, cluster_ids=clusters, to_version=to_version,
                             concurrency=concurrency, failure_budget=failure_budget)  # fmt: skip
    except InvalidRequest as exc:
        _invalid(exc)
    label = f"control-plane {operation} of clusterset/{clusterset}"
    result = _run(lambda c: c.request_control_plane_change(
        clusterset, operation, cluster_ids=clusters, to_version=to_version, concurrency=concurrency,
        failure_budget=failure_budget, wait_s=wait), _endpoints(ctx))  # fmt: skip
    answer = result.answer
    if answer is not None and answer.type == "ControlPlanePipelineRequested":
        data = answer.data
        out.print(f"{escape(label)}: pipeline {escape(str(data.get('pipeline_id')))} started over "
                  f"{len(data.get('clusters') or [])} cluster(s), {data.get('concurrency')} at a time")  # fmt: skip
        return
    _report(result, label, wait)


@controlplane_app.command("migrate")
def controlplane_migrate(
    ctx: typer.Context,
    clusterset: str = typer.Argument(..., help="the ClusterSet (self-managed control planes)"),
    clusters: list[str] = typer.Option([], "--cluster", help=CLUSTER_HELP),
    concurrency: int = typer.Option(1, "--concurrency", help=CONCURRENCY_HELP),
    failure_budget: int = typer.Option(0, "--failure-budget", help=BUDGET_HELP),
    wait: float = typer.Option(0, "--wait", min=0, help=WAIT_HELP),
) -> None:
    """Migrate control planes from one node to three (HA): workloads keep running, clients keep their endpoint."""
    _control_plane_request(ctx, clusterset, "migrate", clusters, None, concurrency, failure_budget, wait)


@controlplane_app.command("upgrade")
def controlplane_upgrade(
    ctx: typer.Context,
    clusterset: str = typer.Argument(..., help="the ClusterSet (self-managed control planes)"),
    to_version: str | None = typer.Option(None, "--to-version", help="the Kubernetes version, e.g. 1.31"),
    clusters: list[str] = typer.Option([], "--cluster", help=CLUSTER_HELP),
    concurrency: int = typer.Option(1, "--concurrency", help=CONCURRENCY_HELP),
    failure_budget: int = typer.Option(0, "--failure-budget", help=BUDGET_HELP),
    wait: float = typer.Option(0, "--wait", min=0, help=WAIT_HELP),
) -> None:
    """Upgrade control planes one node at a time; a node failing its checks is rolled back and the upgrade halts."""
    _control_plane_request(ctx, clusterset, "upgrade", clusters, to_version, concurrency, failure_budget, wait)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return ""
    if seconds < 120:
        return f"{seconds:.3g}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def _pct(value: Any) -> str:
    return f"{value:g}%" if isinstance(value, int | float) else ""


def _migration_progress(item: dict[str, Any]) -> tuple[str, str]:
    """(SCOPE, PROGRESS) columns of a migration, an upgrade or a pipeline."""
    if item.get("kind") == "pipeline":
        counts = item.get("counts") or {}
        total = sum(counts.values())
        parts = [f"{item.get('succeeded', 0)}/{total} succeeded"]
        parts += [f"{item[k]} {word}" for k, word in (("failed", "failed"), ("inFlight", "in flight"),
                                                      ("pending", "pending")) if item.get(k)]  # fmt: skip
        return str(item.get("clusterset") or ""), ", ".join(parts)
    where = f"phase {item['phase']}" if item.get("phase") is not None else str(item.get("node") or "")
    step = " ".join(x for x in (where, str(item.get("step") or "")) if x)
    return str(item.get("clusterId") or ""), step


def migrations_table(items: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("ID", "KIND", "SCOPE", "STATE", "PROGRESS", "VERSION", "AVAILABILITY", "DURATION", "UPDATED"):
        table.add_column(col, no_wrap=col != "PROGRESS", overflow="fold")
    for item in items:
        scope, progress = _migration_progress(item)
        table.add_row(
            str(item.get("id", "")), str(item.get("kind", "")), scope, _styled(str(item.get("state", ""))),
            escape(progress), str(item.get("toVersion") or ""), _pct(item.get("availabilityPct")),
            _duration(item.get("durationS")), str(item.get("updatedAt") or ""),
        )  # fmt: skip
    return table


def availability_line(availability: dict[str, Any]) -> str:
    """What the prober saw, in one line."""
    line = (f"availability: {_pct(availability.get('availabilityPct'))} of {availability.get('requests')} requests "
            f"succeeded ({availability.get('succeeded')}), longest downtime "
            f"{_duration(availability.get('downtimeS')) or '?'}")  # fmt: skip
    if availability.get("requestsWithoutQuorum"):
        line += (f"; without quorum {availability.get('succeededWithoutQuorum', 0)}/"
                 f"{availability['requestsWithoutQuorum']} succeeded")  # fmt: skip
    return line


def _migration_detail(item: dict[str, Any]) -> None:
    """One operation for people: the listing row, what happened to it, its step timeline and availability; or one
    pipeline with its clusters."""
    out.print(migrations_table([item]))
    if item.get("kind") == "pipeline":
        if item.get("halted"):
            out.print(f"[red]halted:[/] {escape(str(item['halted'].get('reason')))}")
        clusters = Table(title="clusters", box=None, header_style="bold", pad_edge=False, title_justify="left")
        for col in ("CLUSTER", "STATE", "OPERATION", "OPERATION STATE", "STARTED", "FINISHED"):
            clusters.add_column(col, overflow="fold")
        for entry in item.get("clusters") or []:
            clusters.add_row(str(entry.get("clusterId")), _styled(str(entry.get("state"))),
                             str(entry.get("operationId") or ""), _styled(str(entry.get("operationState") or "")),
                             str(entry.get("startedAt") or ""), str(entry.get("finishedAt") or ""))  # fmt: skip
        out.print(clusters)
        return
    facts = [("cluster", item.get("clusterId")), ("clusterset", item.get("clusterset")),
             ("pipeline", item.get("pipelineId")), ("members", " ".join(item.get("members") or [])),
             ("nodes", " ".join(item.get("nodes") or [])), ("requested", item.get("requestedAt")),
             ("ended", item.get("completedAt"))]  # fmt: skip
    out.print("  ".join(f"[bold]{k}:[/] {escape(str(v))}" for k, v in facts if v))
    failure = item.get("failure")
    if failure:
        where = " ".join(x for x in (f"step {failure.get('step')}" if failure.get("step") else "",
                                     f"node {failure.get('node')}" if failure.get("node") else "") if x)  # fmt: skip
        outcome = "rolled back" if failure.get("rolledBack") else "rolling back" if failure.get("rollingBack") \
            else "stopped: needs an operator"
        out.print(f"[red]failed[/] at {escape(where or '?')}: {escape(str(failure.get('reason')))} ({outcome})")
    timeline = Table(title="timeline", box=None, header_style="bold", pad_edge=False, title_justify="left")
    for col in ("#", "PHASE/NODE", "STEP", "", "STARTED", "COMPLETED", "TOOK", "DETAIL"):
        timeline.add_column(col, overflow="fold", no_wrap=col != "DETAIL")
    for i, t in enumerate(item.get("timeline") or [], 1):
        where = str(t["phase"]) if t.get("phase") is not None else str(t.get("node") or "")
        detail = json.dumps(t.get("detail"), sort_keys=True, separators=(",", ":")) if t.get("detail") else ""
        timeline.add_row(str(i), where, str(t.get("step")), "[yellow]rollback[/]" if t.get("rollback") else "",
                         str(t.get("startedAt") or ""), str(t.get("completedAt") or ""), _duration(t.get("durationS")),
                         escape(detail))  # fmt: skip
    out.print(timeline)
    if item.get("availability"):
        out.print(escape(availability_line(item["availability"])))
    elif item.get("availabilityPct") is not None:
        out.print(f"availability: {_pct(item['availabilityPct'])}")
    if item.get("durationS") is not None:
        out.print(f"duration: {_duration(item['durationS'])}")


@controlplane_app.command("list")
def controlplane_list(
    ctx: typer.Context,
    kind: MigrationKind | None = typer.Option(None, "--kind", case_sensitive=False,
                                              help="migration, upgrade or pipeline"),
    clusterset: str | None = typer.Option(None, "--clusterset", help="only this ClusterSet"),
    cluster: str | None = typer.Option(None, "--cluster", help="this cluster's operations and the pipelines over it"),
    state: str | None = typer.Option(None, "--state", help="e.g. IN_PROGRESS, ROLLED_BACK, FAILED, HALTED"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="at most this many"),
    output: Output = typer.Option(Output.table, "-o", "--output", case_sensitive=False),
) -> None:  # fmt: skip
    """List control-plane migrations, upgrades and their pipelines (all pages)."""
    filters = dict(kind=kind.value if kind else None, clusterset=clusterset, cluster=cluster,
                   state=state.upper() if state else None)  # fmt: skip
    items = _run(lambda c: c.migrations(limit=limit, **filters), _endpoints(ctx))
    _print_listing(items, output, "no control-plane operations match", migrations_table)


@controlplane_app.command("get")
def controlplane_get(
    ctx: typer.Context,
    migration_id: str = typer.Argument(..., help="an operation id or a pipeline id"),
    kind: MigrationKind | None = typer.Option(None, "--kind", case_sensitive=False, help="if the id names both"),
    output: Output = typer.Option(Output.table, "-o", "--output", case_sensitive=False),
) -> None:
    """Show one migration or upgrade (step timeline, failure, availability, duration) or one pipeline (clusters)."""
    item = _run(lambda c: c.migration(migration_id, kind=kind.value if kind else None), _endpoints(ctx))
    _print_one(item, output, f"control-plane operation {migration_id!r}", _migration_detail)


# ----------------------------------------------------------------------------- up
@app.command()
def up(
    once: bool = typer.Option(False, "--once", help="exit 0 once everything is READY (last line: READY n/n)"),
    examples: Path | None = typer.Option(
        None, "--examples", help="ClusterSet files to apply (default: ../shared/examples)"
    ),
    api_port: int | None = typer.Option(None, "--api-port", min=1, max=65535, help="status API port"),
    timeout: float = typer.Option(300.0, "--timeout", min=1, help="with --once: fail if not READY by then (s)"),
    keep_state: bool = typer.Option(False, "--keep-state", help="resume the previous run's state in .run/"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="state and logs (default: .run/ in the repo)"),
) -> None:  # fmt: skip
    """Run everything locally: NATS, Redis, the six services; apply the examples; show progress."""
    from shared.stack import StackOptions, run  # the stack imports a lot; keep `flotilla get` fast

    if examples is not None and not examples.exists():
        raise typer.BadParameter(f"{examples} does not exist", param_hint="--examples")
    code = run(StackOptions(once=once, examples=examples, api_port=api_port, timeout_s=timeout,
                            keep_state=keep_state, run_dir=run_dir), out=out, err=err)  # fmt: skip
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
