"""The audit log file: append-only JSON lines, each entry chained to the previous one by HMAC.

Every entry holds ``seq`` (1, 2, 3...), ``prev`` (the previous entry's ``mac``) and ``mac`` =
HMAC-SHA256(key, canonical JSON of the entry without ``mac``). Editing an entry breaks its MAC;
removing or reordering entries breaks ``seq`` and ``prev``; without the key nobody can re-chain.
Removing the *last* entries leaves a valid prefix, so a small head file records the last
``seq``/``mac`` (itself MAC'ed): a log shorter than its head was truncated.

Appends are serialised by ``flock`` on the log file, so the running node and a CLI command
(``hilum token create``) can write to the same log; the last entry is re-read under the lock.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
from pathlib import Path
from typing import Iterator

GENESIS = "0" * 64  # ``prev`` of the first entry
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def canonical(entry: dict) -> bytes:
    # A lone surrogate (valid JSON "\ud800" in a request) cannot be encoded as UTF-8: it is written as
    # its JSON escape, as ensure_ascii would, so the entry is still recorded and reads back to the same
    # bytes; every other character stays as before, so existing entries keep their MACs.
    text = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode()


def entry_mac(key: bytes, entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "mac"}
    return hmac.new(key, canonical(body), hashlib.sha256).hexdigest()


def head_mac(key: bytes, seq: int, mac: str) -> str:
    return hmac.new(key, f"head|{seq}|{mac}".encode(), hashlib.sha256).hexdigest()


class ChainedLog:
    def __init__(self, path: Path, key: bytes) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.key = key
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, mode=0o700)

    def append(self, fields: dict) -> dict:
        """Add one entry (``fields`` plus seq/prev/mac) durably; returns the entry as written."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last, torn = _last_entry(fd)
            seq, prev = (last["seq"] + 1, last["mac"]) if last else (1, GENESIS)
            entry = {**fields, "seq": seq, "prev": prev}
            entry["mac"] = entry_mac(self.key, entry)
            # A torn last line (crash mid-write) stays as evidence on its own line.
            os.write(fd, (b"\n" if torn else b"") + canonical(entry) + b"\n")
            os.fsync(fd)
            self._write_head(seq, entry["mac"])
            return entry
        finally:
            os.close(fd)  # releases the lock

    def _write_head(self, seq: int, mac: str) -> None:
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        tmp.write_text(json.dumps({"seq": seq, "mac": mac, "head_mac": head_mac(self.key, seq, mac)}))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.head_path)

    def lines(self) -> Iterator[tuple[int, str]]:
        """(line number from 1, text) of every line, as stored."""
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                yield n, line.rstrip("\n")

    def entries(self) -> Iterator[dict]:
        """Parsed entries, oldest first; lines that are not JSON objects are skipped (verify reports them)."""
        for _, text in self.lines():
            try:
                entry = json.loads(text)
            except ValueError:
                continue
            if isinstance(entry, dict):
                yield entry

    def head(self) -> dict | None:
        try:
            return json.loads(self.head_path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}


def _last_entry(fd: int) -> tuple[dict | None, bool]:
    """The last complete entry of the file, and whether the file ends in a torn (partial) line."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return None, False
    torn = os.pread(fd, 1, size - 1) != b"\n"
    chunk, pos, data = 65536, size, b""
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        data = os.pread(fd, step, pos) + data
        lines = data.split(b"\n")
        # lines[0] may be cut at the chunk start: only trust it when the whole file is read.
        candidates = lines if pos == 0 else lines[1:]
        for raw in reversed(candidates):
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("seq"), int) and "mac" in entry:
                return entry, torn
    return None, torn
