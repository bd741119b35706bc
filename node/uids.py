"""Deterministic UIDs.

Result UIDs are derived from the job's identity (job key + purpose), so a re-run or a
re-delivery after a crash produces the same SOP/Series Instance UIDs and overwrites rather than
duplicates. The 2.25 root (UUID-derived, PS3.5 B.2) needs no registered organisation root.
"""
from __future__ import annotations

import hashlib


def derived_uid(*parts: object) -> str:
    """A 2.25.<int> UID from the SHA-256 of ``parts`` (always the same for the same parts)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    # 128 bits like a UUID; keeps the UID under 64 characters (2.25. + at most 39 digits).
    return "2.25." + str(int.from_bytes(h[:16], "big"))
