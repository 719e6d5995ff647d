"""Streams and subjects: the one place where a subject is spelled.

FLEET subjects carry routing keys so consumers filter with wildcards:
`fleet.<event>.<cloud>.<region>.<aggregate>`, e.g. `fleet.cluster_ready.aws.>`.
"""

from __future__ import annotations

import re

STREAM_CLUSTERSETS = "CLUSTERSETS"
STREAM_FLEET = "FLEET"
STREAM_DEADLETTER = "DEADLETTER"

CLUSTERSETS_ALL = "clusterset.>"
CLUSTERSET_ROLLOUT_CONTROLS = "clusterset.rollout.*"
FLEET_ROLLOUT_INTENTS = "clusterset.fleetrollout.*"
CONTROLPLANE_INTENTS = "clusterset.controlplane.*"
FLEET_ALL = "fleet.>"
DEADLETTER_ALL = "deadletter.>"

STREAM_SUBJECTS: dict[str, list[str]] = {
    STREAM_CLUSTERSETS: [CLUSTERSETS_ALL],
    STREAM_FLEET: [FLEET_ALL],
    STREAM_DEADLETTER: [DEADLETTER_ALL],
}

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def token(value: str | None) -> str:
    """A value made safe as one subject token ('.', '*', '>' and spaces would change routing)."""
    if not value:
        return "_"
    return _UNSAFE.sub("_", value)[:128]


def snake(event_type: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", event_type).lower()


def clusterset_applied(name: str | None) -> str:
    return f"clusterset.applied.{token(name)}"


def clusterset_deleted(name: str | None) -> str:
    return f"clusterset.deleted.{token(name)}"


def clusterset_protection(name: str | None) -> str:
    return f"clusterset.protection.{token(name)}"


def clusterset_rollout(name: str | None) -> str:
    return f"clusterset.rollout.{token(name)}"


def clusterset_controlplane(name: str | None) -> str:
    return f"clusterset.controlplane.{token(name)}"


def fleet_rollout_intent(rollout_id: str | None) -> str:
    return f"clusterset.fleetrollout.{token(rollout_id)}"


def fleet(event_type: str, cloud: str | None, region: str | None, aggregate: str | None) -> str:
    return f"fleet.{snake(event_type)}.{token(cloud)}.{token(region)}.{token(aggregate)}"


def fleet_filter(event_type: str, cloud: str | None = None, region: str | None = None) -> str:
    """Wildcard filter for one event type, optionally narrowed by cloud and region."""
    parts = [f"fleet.{snake(event_type)}", token(cloud) if cloud else "*", token(region) if region else "*"]
    return ".".join(parts) + ".*"


def deadletter(service: str, original_subject: str) -> str:
    return f"deadletter.{token(service)}.{original_subject}"
