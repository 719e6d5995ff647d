"""Maintenance windows: when disruptive rollout work may start. Pure functions of a UTC time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.events.clusterset import WEEKDAYS, MaintenanceWindow


def _openings(window: MaintenanceWindow, around: datetime) -> list[tuple[datetime, datetime]]:
    """The window's occurrences that start within a week before or after `around`."""
    hour, minute = (int(x) for x in window.start.split(":"))
    day0 = around.astimezone(UTC).replace(hour=hour, minute=minute, second=0, microsecond=0)
    spans = []
    for offset in range(-8, 9):
        start = day0 + timedelta(days=offset)
        if WEEKDAYS[start.weekday()] in window.days:
            spans.append((start, start + timedelta(minutes=window.duration_minutes)))
    return spans


def is_open(windows: list[MaintenanceWindow], at: datetime) -> bool:
    """True inside any window; no windows at all means any time."""
    if not windows:
        return True
    return any(start <= at < end for w in windows for start, end in _openings(w, at))


def next_opening(windows: list[MaintenanceWindow], at: datetime) -> datetime | None:
    """When the next window opens after `at` (None: open now, or no windows)."""
    if is_open(windows, at):
        return None
    starts = [start for w in windows for start, _ in _openings(w, at) if start > at]
    return min(starts) if starts else None
