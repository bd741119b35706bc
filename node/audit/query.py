"""Searching the audit log (for the admin API and ``hilum audit export``): by user, study, event, time."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterable

from node.audit.trail import utc_stamp


def _stamp(t: float | datetime | str | None) -> str | None:
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, datetime):
        return utc_stamp((t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp())
    return utc_stamp(t)


def matches(entry: dict, *, user: str | None = None, study_uid: str | None = None, event: str | None = None,
            since: float | datetime | str | None = None, until: float | datetime | str | None = None) -> bool:
    """``user`` matches the active participant or any one of a comma-joined list of senders;
    ``since``/``until`` are epoch seconds, datetimes or ISO stamps (``until`` exclusive)."""
    if user is not None and user not in str(entry.get("user", "")).split(","):
        return False
    if study_uid is not None and entry.get("study_uid") != study_uid:
        return False
    if event is not None and entry.get("event") != event:
        return False
    t = str(entry.get("time", ""))
    lo, hi = _stamp(since), _stamp(until)
    return (lo is None or t >= lo) and (hi is None or t < hi)


def search(entries: Iterable[dict], *, limit: int = 200, **criteria) -> list[dict]:
    """Matching entries, newest first, at most ``limit``."""
    found = [e for e in entries if matches(e, **criteria)]
    found.reverse()
    return found[:limit]
