"""Durable files, and the quarantine of rejected instances.

A file is written under a unique temporary name in its final directory, fsync'ed, then renamed
into place, so a crash or a full disk never leaves a half-written file under a real name. The
directory entry itself is made durable by ``fsync_dirs``. Received instances themselves go to
the vault's log (node/store/vault.py), not to files.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path

log = logging.getLogger("hilum.receive")

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


RESERVE = 16 << 20  # free space kept for the index and the logs (node/store/segments.py)


def has_room(path: Path, n: int, reserve: int = RESERVE) -> bool:
    """Whether ``n`` more bytes fit on ``path``'s disk without taking the last free space: the
    reserve is ``reserve`` bytes, or a tenth of a small disk. The spool's log writers and the
    quarantine both check it, so neither takes what the index and the logs need."""
    usage = shutil.disk_usage(path)
    return usage.free - n >= min(reserve, usage.total // 10)


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
    """Rejected instances, sealed like everything spooled, each with a JSON file saying why.

    Bounded: whoever can open an association can send junk, and every rejected payload would
    otherwise be kept, until the disk is full. Payloads are kept while the quarantine holds under
    ``MAX_FILES`` files and ``MAX_BYTES`` bytes and the disk keeps its reserve (``has_room``); past
    that only the reason is kept, and it says the payload was not (``payload_kept: false``). Past
    ``MAX_REASONS`` files nothing more is written (the log line and the ``quarantined`` count remain).
    An admin empties the folder to make room again."""

    MAX_FILES = 10_000
    MAX_BYTES = 5 << 30
    MAX_REASONS = 100_000
    RECOUNT_S = 60.0  # the folder is counted again at most this often (an admin may empty it)

    def __init__(self, data_dir: Path, seal) -> None:
        self.root = data_dir
        self.quarantine_dir = data_dir / "quarantine"
        self.quarantine_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._seal = seal  # Vault.write_file: durable and sealed
        self._lock = threading.Lock()
        self._files = self._bytes = 0
        self._counted_at = -1e18

    def usage(self) -> dict:
        """{"files": n, "bytes": n} in the quarantine folder (counted at most every RECOUNT_S)."""
        with self._lock:
            if time.monotonic() - self._counted_at >= self.RECOUNT_S:
                files = nbytes = 0
                for p in self.quarantine_dir.iterdir():
                    try:
                        nbytes += p.stat().st_size
                        files += 1
                    except OSError:
                        pass
                self._files, self._bytes, self._counted_at = files, nbytes, time.monotonic()
            return {"files": self._files, "bytes": self._bytes}

    def _wrote(self, files: int, nbytes: int) -> None:
        with self._lock:
            self._files += files
            self._bytes += nbytes

    def quarantine(self, data: bytes, reason: str, context: dict) -> Path | None:
        """Keep a rejected instance with its reason. Returns where (the payload's file, or the reason's
        when only that was kept), None if nothing could be written."""
        stem = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(6)}"
        target = self.quarantine_dir / f"{stem}.dcm"
        used = self.usage()
        doc = {"reason": reason, **context}
        if used["files"] >= self.MAX_REASONS:
            log.error("quarantine holds %d files: rejected instance not kept (%s)", used["files"], reason)
            return None
        why_not = None
        if used["files"] + 2 > self.MAX_FILES or used["bytes"] + len(data) > self.MAX_BYTES:
            why_not = (f"quarantine full ({used['files']} files, {used['bytes']} bytes; at most "
                       f"{self.MAX_FILES} files, {self.MAX_BYTES} bytes)")
        elif not has_room(self.quarantine_dir, len(data) + (64 << 10)):
            why_not = "disk at its reserve"
        if why_not is not None:
            doc |= {"payload_kept": False, "payload_bytes": len(data), "why_not_kept": why_not}
        reason_blob = json.dumps(doc, indent=1).encode()
        if not has_room(self.quarantine_dir, len(reason_blob) + (4 << 10)):
            log.error("disk at its reserve: rejected instance not quarantined (%s)", reason)
            return None
        try:
            if why_not is None:
                self._seal(target, data)
                self._wrote(1, len(data))
            write_durable(target.with_suffix(".json"), reason_blob)
            self._wrote(1, len(reason_blob))
            fsync_dirs({self.quarantine_dir})
        except OSError:
            return None
        return target if why_not is None else target.with_suffix(".json")

    def remove_empty_tmp(self) -> int:
        """Delete leftovers of file writes interrupted by a crash (never referenced by the index)."""
        n = 0
        for p in [*self.quarantine_dir.glob(".*.tmp"), *(self.root / "results").rglob(".*.tmp")]:
            _unlink_quietly(p)
            n += 1
        return n
