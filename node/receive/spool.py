"""Durable files, and the quarantine of rejected instances.

A file is written under a unique temporary name in its final directory, fsync'ed, then renamed
into place, so a crash or a full disk never leaves a half-written file under a real name. The
directory entry itself is made durable by ``fsync_dirs``. Received instances themselves go to
the vault's log (node/store/vault.py), not to files.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path

UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def valid_uid(uid: object) -> bool:
    # A UID also becomes a path component: the grammar (digits and dots) keeps it safe. fullmatch, not
    # match with "$", which also accepts a trailing newline.
    return isinstance(uid, str) and 0 < len(uid) <= 64 and UID_RE.fullmatch(uid) is not None


def write_durable(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically and fsync the file (not yet its directory entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def fsync_dirs(dirs: set[Path]) -> None:
    for d in dirs:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _unlink_quietly(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass


class Quarantine:
    """Rejected instances, sealed like everything spooled, each with a JSON file saying why."""

    def __init__(self, data_dir: Path, seal) -> None:
        self.root = data_dir
        self.quarantine_dir = data_dir / "quarantine"
        self.quarantine_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._seal = seal  # Vault.write_file: durable and sealed

    def quarantine(self, data: bytes, reason: str, context: dict) -> Path | None:
        """Keep a rejected instance with its reason. Returns None if even that cannot be written."""
        stem = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(6)}"
        target = self.quarantine_dir / f"{stem}.dcm"
        try:
            self._seal(target, data)
            write_durable(target.with_suffix(".json"),
                          json.dumps({"reason": reason, **context}, indent=1).encode())
            fsync_dirs({self.quarantine_dir})
        except OSError:
            return None
        return target

    def remove_empty_tmp(self) -> int:
        """Delete leftovers of file writes interrupted by a crash (never referenced by the index)."""
        n = 0
        for p in [*self.quarantine_dir.glob(".*.tmp"), *(self.root / "results").rglob(".*.tmp")]:
            _unlink_quietly(p)
            n += 1
        return n
