"""One journal step through the `ControlPlaneDriver`: precondition, action, postcondition, and what it reports.

Each function is safe to run again (the driver's methods are ensures), which is what lets a
restarted service redo the step that was running when it died. A postcondition that does not
hold raises a terminal `DriverError`: a migration then rolls back (before phase 3), an upgrade
rolls the node back.
"""

from __future__ import annotations

from typing import Any

from services.etcd_migration.core import CPState, Step
from services.etcd_migration.drivers.base import (
    ControlPlaneDriver,
    ControlPlaneInfo,
    ControlPlaneRef,
    DiskSnapshot,
    DriverError,
    SnapshotInfo,
)

# New members are named after the operation, so a redo after a crash finds the ones it created.
MEMBERS = 3
# How far the restored revision is raised above the snapshot's. Mutations were stopped before the snapshot, so
# any bump puts it above every revision a client saw; the compaction after it is what makes watches re-list.
# Each unit is one write while the API is down (on etcd 3.4, which has no --bump-revision): keep it small.
REVISION_BUMP = 10
DEFAULT_VERSION = "1.29"


def new_member_names(ref: ControlPlaneRef) -> list[str]:
    return [f"{ref.operation_id}-m{i}" for i in range(MEMBERS)]


def _healthy(info: ControlPlaneInfo) -> list[str]:
    return [m.name for m in info.members if m.healthy]


def _serving_ha(info: ControlPlaneInfo) -> bool:
    """Migrated already: members behind open load balancers, every one healthy, taking writes."""
    return (info.load_balanced and info.load_balancers_open and not info.mutations_stopped
            and len(info.members) >= MEMBERS and len(_healthy(info)) == len(info.members))  # fmt: skip


async def perform(driver: ControlPlaneDriver, state: CPState, action: Step) -> dict[str, Any]:
    """Run one step; return what it reports (recorded in the journal)."""
    assert state.op is not None
    ref = ControlPlaneRef(cluster_id=state.cluster_id, operation_id=state.op.driver_operation_id)
    detail = state.op.detail
    if action.kind == "migrate":
        return await _migration_step(driver, ref, action.step, detail, state.op.to_version or DEFAULT_VERSION)
    return await _upgrade_step(driver, ref, action, detail, state)


async def _migration_step(driver: ControlPlaneDriver, ref: ControlPlaneRef, step: str, detail: dict[str, Any],
                          version: str) -> dict[str, Any]:  # fmt: skip
    precheck = detail.get("precheck", {})
    node = str(precheck.get("node", ""))
    match step:
        case "precheck":
            info = await driver.ensure_control_plane(ref, version)
            if _serving_ha(info):
                return {"already_ha": True, "endpoint": info.public_endpoint, "members": _healthy(info)}
            if info.load_balanced or len(info.members) != 1:
                raise DriverError(f"expected one control-plane node, found {len(info.members)}", retryable=False)
            member = info.members[0]
            if not member.healthy:
                raise DriverError(f"control-plane node {member.name} is not healthy")
            return {"node": member.name, "revision": member.revision, "endpoint": info.public_endpoint,
                    "internal_endpoint": info.internal_endpoint, "version": member.version}  # fmt: skip
        case "stop-mutations":
            await driver.stop_mutations(ref)
        case "snapshot-save":
            snap = await driver.snapshot_save(ref)
            # etcd reports revision 0 for a snapshot of a store that was never written to.
            if snap.revision and snap.revision < int(precheck.get("revision", 0)):
                raise DriverError(f"snapshot revision {snap.revision} is below the node's", retryable=False)
            return {"location": snap.location, "hash": snap.hash, "revision": snap.revision,
                    "total_keys": snap.total_keys}  # fmt: skip
        case "stop-node":
            await driver.stop_node(ref, node)
        case "snapshot-disk":
            disk = await driver.snapshot_disk(ref, node)
            return {"id": disk.id, "node": disk.node}
        case "create-nodes":
            disk_d = detail["snapshot-disk"]
            await driver.create_nodes(ref, DiskSnapshot(id=disk_d["id"], node=disk_d["node"]), new_member_names(ref))
            return {"names": new_member_names(ref)}
        case "create-load-balancers":
            await driver.create_load_balancers(ref, new_member_names(ref))
        case "restore-members":
            snap_d = detail["snapshot-save"]
            snapshot = SnapshotInfo(location=snap_d["location"], hash=int(snap_d["hash"]),
                                    revision=int(snap_d["revision"]), total_keys=int(snap_d["total_keys"]))  # fmt: skip
            await driver.restore_members(ref, snapshot, new_member_names(ref), cluster_token=ref.operation_id,
                                         revision_bump=REVISION_BUMP)  # fmt: skip
        case "verify-members":
            return await _verify_members(driver, ref, int(detail["snapshot-save"]["revision"]))
        case "wait-kubelets":
            since = int(detail.get("verify-members", {}).get("revision", 0))
            await driver.open_internal_load_balancer(ref)  # kubelets can only heartbeat through it
            if not await driver.kubelets_heartbeating(ref, since):
                raise DriverError("kubelets have not heartbeated to the new control plane yet")
        case "start-controller-manager":
            await driver.start_controller_manager(ref)
        case "open-load-balancers":
            await driver.open_load_balancers(ref)
            info = await driver.describe(ref)
            return {"endpoint": info.public_endpoint, "members": [m.name for m in info.members]}
        case "remove-new-nodes":
            await driver.remove_new_nodes(ref)
        case "remove-load-balancers":
            await driver.remove_load_balancers(ref)
        case "start-node":
            await driver.start_node(ref, node)
        case "resume-mutations":
            await driver.resume_mutations(ref)
            info = await driver.describe(ref)
            if len(info.members) != 1 or not _healthy(info):
                raise DriverError("the restored single node is not serving yet")
            return {"revision": info.members[0].revision, "endpoint": info.public_endpoint}
        case _:
            raise DriverError(f"unknown migration step {step!r}", retryable=False)
    return {}


async def _verify_members(driver: ControlPlaneDriver, ref: ControlPlaneRef, old_revision: int) -> dict[str, Any]:
    info = await driver.describe(ref)
    healthy = _healthy(info)
    if sorted(healthy) != sorted(new_member_names(ref)):
        raise DriverError(f"expected members {new_member_names(ref)} healthy, found {healthy}")
    hashes = {m.name: m.hashkv for m in info.members}
    revisions = {m.revision for m in info.members}
    if len(set(hashes.values())) != 1:
        raise DriverError(f"members disagree on hashkv: {hashes}", retryable=False)
    if min(revisions) <= old_revision:
        raise DriverError(f"revision {min(revisions)} is not above the old {old_revision}", retryable=False)
    return {"members": sorted(healthy), "hashkv": next(iter(hashes.values())), "revision": max(revisions)}


async def _upgrade_step(driver: ControlPlaneDriver, ref: ControlPlaneRef, action: Step, detail: dict[str, Any],
                        state: CPState) -> dict[str, Any]:  # fmt: skip
    assert state.op is not None
    to_version = state.op.to_version or ""
    node = action.node or ""
    match action.step:
        case "precheck" if node == "cluster":
            info = await driver.describe(ref)
            _require_quorum(info)
            versions = {m.name: m.version for m in info.members}
            # One version, or a halted earlier upgrade to this one (some members there already): the rest follow.
            if len({v for v in versions.values() if v != to_version}) > 1:
                raise DriverError(f"members run different versions: {versions}", retryable=False)
            # Followers first, the leader last: one leader election instead of one per node.
            order = [m.name for m in sorted(info.members, key=lambda m: (m.is_leader, m.name))
                     if m.version != to_version]  # fmt: skip
            return {"order": order, "versions": versions, "endpoint": info.public_endpoint}
        case "precheck":
            _require_quorum(await driver.describe(ref))
        case "snapshot":
            snap = await driver.snapshot_save(ref)
            return {"location": snap.location, "hash": snap.hash, "revision": snap.revision}
        case "replace":
            await driver.replace_node(ref, node, to_version)
        case "validate":
            report = await driver.validate(ref)
            info = await driver.describe(ref)
            member = next((m for m in info.members if m.name == node), None)
            problems = list(report.problems)
            if member is None or not member.healthy or member.version != to_version:
                problems.append(f"{node} is not serving {to_version}")
            if problems:
                raise DriverError("; ".join(problems), retryable=False)
            return {"version": to_version}
        case "rollback-node":
            await driver.replace_node(ref, node, state.op.old_versions.get(node, to_version))
        case _:
            raise DriverError(f"unknown upgrade step {action.step!r}", retryable=False)
    return {}


def _require_quorum(info: ControlPlaneInfo) -> None:
    healthy = _healthy(info)
    if len(healthy) != len(info.members) or len(info.members) < 3:
        raise DriverError(f"not every member is healthy ({len(healthy)}/{len(info.members)})")
