"""Cluster ids: one scheme for every cluster of a set, whoever requests it (planner or rotation)."""

from __future__ import annotations


def cluster_id_for(name: str, serial: int) -> str:
    """Stable id: the set name plus a short suffix that is a bijection of the serial (no collisions)."""
    if serial < 0x10000:
        suffix = format((serial * 0x9E37 + 0x7F3A) % 0x10000, "04x")
    else:
        suffix = format(serial, "x")
    return f"{name}-{suffix}"
