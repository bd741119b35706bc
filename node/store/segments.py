"""The received-instance log: append-only segment files written with O_DSYNC (pushes) or synced
per batch (a retrieve's instances, in segments of their own: ``SegmentWriter(prepare=False)``).

Why a log and not a file per instance: a durable new file costs an fsync of the file and of its
directory (journal commits for the inode, the size, the directory entry). Overwriting space
that is already allocated, zero-filled and synced needs none of that: a ``pwrite`` with
O_DSYNC returns when the bytes are on disk. A background thread keeps zero-filled space ahead
of the writers, so a C-STORE normally pays one data write and nothing else.

Layout: ``log/NNNNNNNN.seg``; the first 4 KiB hold the segment's identity; records start on
4 KiB boundaries, each an envelope (node/store/envelope.py) whose payload is
``u32 meta length | meta JSON | DICOM bytes``. The meta (who sent it) lets the index be rebuilt
from the log alone. A record is addressed by its locator ``log:<segment>:<offset>:<length>``.

Concurrent appends reserve their range under a lock and write outside it. After a crash a
reserved range may hold nothing; ``scan`` steps over such holes by probing 4 KiB boundaries.
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from node.receive.spool import has_room, write_durable
from node.store.envelope import HEADER_SIZE, MAGIC, Header, IntegrityError, Sealer

log = logging.getLogger("hilum.spool")

BLOCK = 4096
SEGMENT_MAGIC = b"HLMSEG01"
_LOCATOR = re.compile(r"^log:(\d{1,8}):(\d{1,12}):(\d{1,12})$")
_META_LEN = struct.Struct("<I")
_ZEROS = bytes(1 << 20)


def _align(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def parse_locator(locator: str) -> tuple[int, int, int] | None:
    m = _LOCATOR.match(locator)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def locator_of(segment: int, offset: int, length: int) -> str:
    return f"log:{segment}:{offset}:{length}"


@dataclass(frozen=True)
class Record:
    locator: str
    segment: int
    offset: int
    length: int
    header: Header


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentReader:
    """Reads records by locator (any process: the node, job workers). Each read opens the
    segment afresh: a cached descriptor closed by retention could be reused by another file."""

    def __init__(self, root: Path, sealer: Sealer) -> None:
        self.root = root
        self.sealer = sealer

    def path(self, segment: int) -> Path:
        return self.root / f"{segment:08d}.seg"

    def read(self, locator: str) -> tuple[dict, bytes]:
        """(meta, DICOM bytes) of one record, verified."""
        where = parse_locator(locator)
        if where is None:
            raise ValueError(f"not a log locator: {locator!r}")
        segment, offset, length = where
        try:
            fd = os.open(self.path(segment), os.O_RDONLY)
        except FileNotFoundError:
            raise IntegrityError(f"segment {segment} is gone (purged by retention?)") from None
        try:
            blob = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(blob) != length:
            raise IntegrityError(f"{locator}: truncated ({len(blob)} of {length} bytes)")
        return split_payload(self.sealer.open_view(blob, locator_context(segment, offset)))

    def segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.root.glob("*.seg") if p.stem.isdigit())

    def scan(self, segment: int) -> Iterator[Record]:
        """Every record of a segment, stepping over holes left by a crash."""
        try:
            fd = os.open(self.path(segment), os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            end = os.fstat(fd).st_size
            off = BLOCK
            while off + HEADER_SIZE <= end:
                head = os.pread(fd, HEADER_SIZE, off)
                try:
                    h = self.sealer.header(head)
                except IntegrityError:
                    off = self._probe(fd, off + BLOCK, end)
                    continue
                length = HEADER_SIZE + h.length
                if off + length > end:
                    break
                yield Record(locator_of(segment, off, length), segment, off, length, h)
                off += _align(length)
        finally:
            os.close(fd)

    def _probe(self, fd: int, off: int, end: int) -> int:
        """The next 4 KiB boundary at or after ``off`` that starts with this spool's magic + salt."""
        prefix = MAGIC + self.sealer.salt
        chunk = 4 << 20
        while off < end:
            buf = os.pread(fd, min(chunk, end - off), off)
            for pos in range(0, len(buf), BLOCK):
                if buf[pos: pos + len(prefix)] == prefix:
                    return off + pos
            off += len(buf)
        return end


def locator_context(segment: int, offset: int) -> bytes:
    """What a log record's envelope is bound to: its place (a record copied elsewhere fails)."""
    return f"log:{segment}:{offset}".encode()


def split_payload(payload: bytes | memoryview) -> tuple[dict, bytes]:
    (n,) = _META_LEN.unpack_from(payload)
    meta = json.loads(bytes(payload[4: 4 + n])) if n else {}
    return meta, bytes(payload[4 + n:])  # one copy: a view's slice is not one, a bytes' slice is


def payload_parts(meta: dict, data: bytes | bytearray | memoryview) -> list:
    """A record's payload (what ``split_payload`` reads) as two buffers, meta and ``data``, so that
    ``data`` is written without being copied."""
    m = json.dumps(meta, separators=(",", ":")).encode() if meta else b""
    return [_META_LEN.pack(len(m)) + m, data]


def _pwrite_all(fd: int, views: list[memoryview], pos: int) -> None:
    """Write the buffers at ``pos`` in one ``pwritev`` call where the kernel takes them all (one
    syscall, no joined copy), continuing after a short write."""
    views = [v for v in views if len(v)]
    while views:
        n = os.pwritev(fd, views[:_IOV_MAX], pos)
        pos += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


_IOV_MAX = 512  # well under Linux's 1024 buffers per call


def _writeback_call():
    """Linux's sync_file_range(2), or None where the C library lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint], ctypes.c_int
    return fn


_sync_file_range = _writeback_call()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing a deferred append to disk now, without waiting for it: the
    ``sync()`` that makes it durable then finds it written or under way, instead of writing a whole
    retrieve at its end (about 0.1 s for 160 MB here) while the retrieve waits. Only a hint: the
    sync is what guarantees durability, so a failure here changes nothing."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class _Segment:
    def __init__(self, number: int, fd: int, fill_fd: int, prepared: int) -> None:
        self.number = number
        self.fd = fd  # O_DSYNC: records (-1 in a deferred writer's segments)
        self.fill_fd = fill_fd  # buffered: zero-fill, then one fsync per chunk; deferred appends
        self.alloc = BLOCK  # next free offset
        self.prepared = prepared  # bytes [0, prepared) are allocated, zero-filled and synced
        self.filling = False  # the preparer is writing through fill_fd: do not close it


class SegmentNumbers:
    """The log's segment numbers, shared by its writers. Never reused (a purged segment's locators
    stay in the index as history): the high-water mark is kept durably beside the segments."""

    def __init__(self, reader: SegmentReader) -> None:
        self._mark = reader.root / "next-segment"
        try:
            marked = int(self._mark.read_text())
        except (FileNotFoundError, ValueError):
            marked = 1
        self._next = max(max(reader.segments(), default=0) + 1, marked)
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            number = self._next
            self._next += 1
            write_durable(self._mark, str(self._next).encode())
            return number


class SegmentWriter:
    """Appends records (the node process only). Starts a new segment at every start-up: the tail
    of an old one is never trusted for new writes.

    ``prepare=False`` makes a writer for deferred appends only (``durable=False``: a retrieve's
    instances, node/receive/batch.py): its segments are plain files that grow as they are written,
    with no space zero-filled ahead and no O_DSYNC descriptor. Zero-filled space is what lets an
    O_DSYNC write be one data write; a deferred append is made durable by the ``sync()`` of its
    batch (an fdatasync, which also persists the file's new size), so preparing space for it only
    wrote every byte twice (zeros, synced, then the data) and kept the retrieve waiting for the
    preparer at the start of a segment."""

    def __init__(self, reader: SegmentReader, max_segment: int = 512 << 20, first_chunk: int = 1 << 20,
                 max_chunk: int = 64 << 20, headroom: int = 16 << 20, numbers: SegmentNumbers | None = None,
                 prepare: bool = True) -> None:
        self.reader = reader
        self.headroom = headroom
        self.root = reader.root
        self.max_segment = max_segment
        self.first_chunk = first_chunk
        self.max_chunk = max_chunk
        self.root.mkdir(parents=True, exist_ok=True)
        self._cond = threading.Condition()
        self._cur: _Segment | None = None
        self._numbers = numbers or SegmentNumbers(reader)
        self.prepare = prepare
        self._closed = False
        self._fill_error: OSError | None = None  # the last zero-fill failed (disk full): fail fast
        self._want = 0  # the largest record a writer is waiting to place
        self._inflight: dict[int, int] = {}  # segment → appends reserved but not yet written
        self._unsynced: dict[int, _Segment] = {}  # segments with durable=False appends not yet synced
        self._sync_lock = threading.Lock()
        self._broken: OSError | None = None  # a sync failed: see sync()
        self._preparer = threading.Thread(target=self._prepare_loop, name="spool-preparer", daemon=True)
        if prepare:
            self._preparer.start()

    # -- appending -------------------------------------------------------------------------
    def append(self, length: int, build: Callable[[int, int], bytes | list], durable: bool = True) -> str:
        """Reserve ``length`` bytes, have ``build(segment, offset)`` make the envelope for that place
        (one buffer, or a list of buffers written in order), write it durably; returns its locator.
        With ``durable=False`` the write returns before the bytes are on disk: durable only after the
        next ``sync()`` (a retrieve's instances, one sync for many)."""
        if durable and not self.prepare:
            raise ValueError("this writer takes deferred appends only")
        if not durable:
            self._raise_if_broken()  # it could never be made durable (see sync())
        seg, off = self._reserve(length)
        try:
            sealed = build(seg.number, off)
            views = [memoryview(b).cast("B") for b in (sealed if isinstance(sealed, list) else [sealed])]
            if sum(len(v) for v in views) != length:
                raise ValueError(f"envelope is {sum(len(v) for v in views)} bytes, {length} reserved")
            _pwrite_all(seg.fd if durable else seg.fill_fd, views, off)
            if not durable:
                _start_writeback(seg.fill_fd, off, length)
        finally:
            with self._cond:
                self._inflight[seg.number] -= 1
                if not durable:
                    self._unsynced[seg.number] = seg
                self._cond.notify_all()
        return locator_of(seg.number, off, length)

    def sync(self) -> None:
        """Every ``durable=False`` append that returned before this call is on disk when it returns.
        The space was allocated and synced beforehand, so one fdatasync per segment is enough (no
        metadata changes). Serialised: a caller that finds another sync under way waits for it, as
        that sync may be the one covering its writes.

        A failed fdatasync breaks this writer until the process restarts: this and every later
        ``sync()`` and deferred append raise OSError naming that failure. Why not retry: after a
        failed writeback Linux may mark the pages clean, so a second fdatasync can succeed with the
        data lost, and a caller whose appends went into the same segment (another retrieve, which
        has not synced yet) would be told they are durable. Nothing tells us which callers those
        are, so every later one fails: their rows are never indexed and their retrieves retried
        after a restart. Pushes (O_DSYNC appends of the other writer) are not affected."""
        with self._sync_lock:
            self._raise_if_broken()
            with self._cond:
                segs, self._unsynced = list(self._unsynced.values()), {}
            try:
                for seg in segs:
                    os.fdatasync(seg.fill_fd)
            except OSError as exc:
                with self._cond:
                    # Kept unsynced: none of them is known durable (the rest of the list was not synced).
                    for seg in segs:
                        self._unsynced.setdefault(seg.number, seg)
                    self._broken = exc
                log.error("spool sync failed (%s): deferred appends refused until the node restarts", exc)
                raise

    def _raise_if_broken(self) -> None:
        exc = self._broken
        if exc is not None:
            raise OSError(exc.errno or errno.EIO, f"an earlier spool sync failed ({exc.strerror or exc}); "
                                                  "deferred appends cannot be made durable until the node restarts")

    def active(self) -> set[int]:
        """Segments this writer may still write or sync: never to be deleted (retention)."""
        with self._cond:
            nums = {n for n, k in self._inflight.items() if k} | set(self._unsynced)
            if self._cur is not None:
                nums.add(self._cur.number)
            return nums

    def _reserve(self, n: int, wait_s: float = 30.0) -> tuple[_Segment, int]:
        need = _align(n)
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                if self._closed:
                    raise OSError("spool is closed")
                cur = self._cur
                if cur is None or cur.alloc + need > max(self.max_segment, BLOCK + need):
                    cur = self._roll(need)
                if not self.prepare:  # the file grows as it is written: nothing to wait for
                    if not self._room_for(need):
                        raise OSError(errno.ENOSPC, "no room in the spool for this instance")
                    off = cur.alloc
                    cur.alloc += need
                    self._inflight[cur.number] = self._inflight.get(cur.number, 0) + 1
                    return cur, off
                if cur.alloc + need <= cur.prepared:
                    off = cur.alloc
                    cur.alloc += need
                    self._inflight[cur.number] = self._inflight.get(cur.number, 0) + 1
                    self._cond.notify_all()  # the preparer keeps space ahead
                    return cur, off
                self._want = max(self._want, need)  # the preparer sizes its next chunk for this
                self._cond.notify_all()
                if self._fill_error is not None:
                    raise OSError(errno.ENOSPC, f"spool space cannot be prepared: {self._fill_error.strerror}")
                if time.monotonic() > deadline:
                    raise OSError(errno.ENOSPC, "no spool space could be prepared in time")
                self._cond.wait(1.0)

    def _roll(self, need: int) -> _Segment:
        """A new segment (called under the lock; rare: at start-up and every max_segment bytes)."""
        number = self._numbers.take()
        path = self.reader.path(number)
        size = BLOCK + max(self.first_chunk, _align(need)) if self.prepare else BLOCK
        fill_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if not self._room_for(size):
                raise OSError(errno.ENOSPC, "no room for a new spool segment")
            head = bytearray(BLOCK)
            ident = SEGMENT_MAGIC + self.reader.sealer.salt + struct.pack("<Q", number)
            head[: len(ident)] = ident
            os.pwrite(fill_fd, bytes(head), 0)
            _zero_fill(fill_fd, BLOCK, size)
            os.fsync(fill_fd)
            _fsync_dir(self.root)
            fd = os.open(path, os.O_RDWR | os.O_DSYNC) if self.prepare else -1
        except OSError as exc:
            os.close(fill_fd)
            path.unlink(missing_ok=True)
            self._fill_error = exc
            raise
        old, self._cur = self._cur, _Segment(number, fd, fill_fd, size)
        if old is not None:
            threading.Thread(target=self._retire, args=(old,), daemon=True).start()
        log.debug("spool segment %d started", number)
        return self._cur

    def _retire(self, seg: _Segment) -> None:
        with self._cond:
            while self._inflight.get(seg.number, 0) or seg.filling:
                self._cond.wait(1.0)
            self._inflight.pop(seg.number, None)
        try:
            self.sync()  # its deferred appends are made durable before its descriptors close
        except OSError as exc:
            # On this daemon thread nobody else would see it; the writer is broken now (sync()), so the
            # next commit of a retrieve fails with it. The descriptors are closed either way.
            log.error("spool segment %d retired without a successful sync: %s", seg.number, exc)
        finally:
            _close(seg)

    def close_segment(self, number: int) -> None:
        """No more appends into segment ``number`` (the next append starts a new one); returns once
        appends already reserved in it are written."""
        with self._cond:
            if self._cur is not None and self._cur.number == number:
                old, self._cur = self._cur, None
                threading.Thread(target=self._retire, args=(old,), daemon=True).start()
            while self._inflight.get(number, 0):
                self._cond.wait(1.0)

    def quiesce(self, timeout: float = 60.0) -> bool:
        """Wait (at most ``timeout``) until no append is under way; False if it never happened."""
        with self._cond:
            return self._cond.wait_for(lambda: not any(self._inflight.values()), timeout)

    # -- keeping zero-filled space ahead ---------------------------------------------------
    def _prepare_loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._cur is None or self._ahead_ok(self._cur)):
                    self._cond.wait()
                if self._closed:
                    return
                seg = self._cur
                start = seg.prepared
                chunk = min(self.max_chunk, max(self.first_chunk, start // 2), self.max_segment - start)
                chunk = max(chunk, _align(self._want - (seg.prepared - seg.alloc)))
                seg.filling = True
            failed = None
            try:
                if not self._room_for(chunk):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                _zero_fill(seg.fill_fd, start, start + chunk)
                os.fsync(seg.fill_fd)
            except OSError as exc:  # disk full: writers fail their C-STORE with a status
                failed = exc
            with self._cond:
                seg.filling = False
                self._fill_error = failed
                if failed is None and seg is self._cur:
                    seg.prepared = start + chunk
                    if seg.prepared - seg.alloc >= self._want:
                        self._want = 0
                self._cond.notify_all()
                if failed is not None:
                    log.error("cannot extend spool segment %d: %s", seg.number, failed)
                    self._cond.wait(5.0)

    def _room_for(self, n: int) -> bool:
        """Never take the last free space: the index and the logs need it more than the spool."""
        return has_room(self.root, n, self.headroom)

    def _ahead_ok(self, seg: _Segment) -> bool:
        if seg.prepared - seg.alloc < self._want:
            return False
        if seg.prepared >= self.max_segment:
            return True
        return seg.prepared - seg.alloc >= min(self.max_chunk, max(2 * self.first_chunk, seg.prepared // 4))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self.prepare:
            self._preparer.join(timeout=10)
        self.quiesce()
        with self._cond:
            while self._cur is not None and self._cur.filling:
                self._cond.wait(1.0)
        try:
            self.sync()
        except OSError as exc:  # every commit since the failure was told so; shutting down goes on
            log.error("spool closed with deferred appends not durable: %s", exc)
        if self._cur is not None:
            _close(self._cur)
            self._cur = None


def _close(seg: _Segment) -> None:
    if seg.fd >= 0:
        os.close(seg.fd)
    os.close(seg.fill_fd)


def _zero_fill(fd: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        n = os.pwrite(fd, memoryview(_ZEROS)[: min(len(_ZEROS), end - pos)], pos)
        pos += n
