"""The audit log file: append-only JSON lines, each entry chained to the previous one by HMAC.

Every entry holds ``seq`` (1, 2, 3...), ``prev`` (the previous entry's ``mac``) and ``mac`` =
HMAC-SHA256(key, canonical JSON of the entry without ``mac``). Editing an entry breaks its MAC;
removing or reordering entries breaks ``seq`` and ``prev``; without the key nobody can re-chain.
Removing the *last* entries leaves a valid prefix, so a small head file records the last
``seq``/``mac`` (itself MAC'ed): a log shorter than its head was truncated.

Appends are serialised by ``flock`` on the log file, so the running node and a CLI command
(``hilum token create``) can write to the same log; the last entry is re-read under the lock.
Each append also checks the head against the log first: if entries were removed from the end (or
the head was modified or removed), it writes an "audit-log-tampered" entry saying so and chains on
from the head, so the gap stays visible to ``verify`` for ever instead of being re-chained over.
A marker file beside the key records that the key has written a log: a log deleted together with
its head is then reported too.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

GENESIS = "0" * 64  # ``prev`` of the first entry
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def canonical(entry: dict) -> bytes:
    # A lone surrogate (valid JSON "\ud800" in a request) cannot be encoded as UTF-8: it is written as
    # its JSON escape, as ensure_ascii would, so the entry is still recorded and reads back to the same
    # bytes; every other character stays as before, so existing entries keep their MACs.
    return escape_surrogates(json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)).encode()


def escape_surrogates(json_text: str) -> str:
    """JSON text (ensure_ascii=False) with lone surrogates as their JSON escapes: encodable as UTF-8."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", json_text)


def entry_mac(key: bytes, entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "mac"}
    return hmac.new(key, canonical(body), hashlib.sha256).hexdigest()


def head_mac(key: bytes, seq: int, mac: str) -> str:
    return hmac.new(key, f"head|{seq}|{mac}".encode(), hashlib.sha256).hexdigest()


class ChainedLog:
    def __init__(self, path: Path, key: bytes, marker: Path | None = None) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.key = key
        # Beside the key (outside the log's folder where configured so): "this key has written a log".
        self.marker = Path(marker) if marker is not None else None
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, mode=0o700)

    def append(self, fields: dict) -> dict:
        """Add one entry (``fields`` plus seq/prev/mac) durably; returns the entry as written."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last, torn = _last_entry(fd)
            seq, prev = (last["seq"] + 1, last["mac"]) if last else (1, GENESIS)
            alert, after = self._tampered(last)
            if after is not None:  # chain on from what the head recorded: the removed span stays a gap
                seq, prev = after[0] + 1, after[1]
            out = b"\n" if torn else b""  # a torn last line (crash mid-write) stays as evidence on its own line
            if alert is not None:
                warning = {"time": utc_stamp(), "source": fields.get("source", ""), "event": "audit-log-tampered",
                           "event_id": {"code": "110113", "scheme": "DCM", "meaning": "Security Alert"},
                           "action": "E", "outcome": 12, "outcome_description": alert, "seq": seq, "prev": prev}
                warning["mac"] = entry_mac(self.key, warning)
                out += canonical(warning) + b"\n"
                seq, prev = seq + 1, warning["mac"]
            entry = {**fields, "seq": seq, "prev": prev}
            entry["mac"] = entry_mac(self.key, entry)
            os.write(fd, out + canonical(entry) + b"\n")
            os.fsync(fd)
            self._write_head(seq, entry["mac"])
            if self.marker is not None and not self.marker.exists():
                self.marker.touch(mode=0o600)
            return entry
        finally:
            os.close(fd)  # releases the lock

    def _tampered(self, last: dict | None) -> tuple[str | None, tuple[int, str] | None]:
        """(what happened to the log since the last append, if anything; the (seq, mac) to chain on
        from when the head is ahead of the log). A head one append behind is a crash between the
        log's fsync and the head's write, not tampering."""
        last_seq = last["seq"] if last else 0
        head = self.head()
        if head is None:
            if last is not None:
                return "the head file is missing: removal of the last entries cannot be ruled out", None
            if self.marker is not None and self.marker.exists():
                return "the audit log and its head file are gone, although this key wrote to them before", None
            return None, None
        seq, mac = head.get("seq"), head.get("mac")
        if not isinstance(seq, int) or not isinstance(mac, str) or not hmac.compare_digest(
                str(head.get("head_mac", "")), head_mac(self.key, seq, mac)):
            return "the head file was modified: its MAC does not match", None
        if seq > last_seq:
            span = str(seq) if seq == last_seq + 1 else f"{last_seq + 1}-{seq}"
            return f"entry {span} removed from the end of the log (the head records entry {seq})", (seq, mac)
        if seq == last_seq and last is not None and last.get("mac") != mac:
            return f"entry {seq} differs from the one recorded when it was written (replaced)", (seq, mac)
        return None, None

    def _write_head(self, seq: int, mac: str) -> None:
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps({"seq": seq, "mac": mac, "head_mac": head_mac(self.key, seq, mac)}).encode())
            os.fsync(fd)  # an empty head after a power cut would read as "modified"; one behind is harmless
        finally:
            os.close(fd)
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


def utc_stamp(t: float | None = None) -> str:
    """ISO 8601 UTC with milliseconds: sorts as text in time order."""
    dt = datetime.fromtimestamp(time.time() if t is None else t, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


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
