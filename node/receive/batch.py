"""A retrieve's instances: made durable together, and stored while the next one is being received.

A push must not be answered Success before its instance is on disk: the modality may delete its
copy. A retrieved instance stays on the PACS, and the retrieve is done only once its batch is
committed, so for a retrieve two things are safe that are not for a push:

- each instance is written without a sync of its own, and one sync of the log covers many of them
  (``Ingest.commit``: at every progress report and at the end). Their index rows wait until then, so
  the index never names bytes that a power cut could take; a crash before the commit leaves the
  retrieve running in the index, and the next start retrieves again what did not become durable
  (the rest is deduplicated);
- its C-STORE is answered as soon as it has arrived, and it is stored while the PACS sends the next
  ones (``begin``/``end`` around the store, in a ``StoreThread``: the SCP's for C-MOVE, a
  ``Pipeline``'s for C-GET). A store that fails after its
  Success went out is kept in ``failures``, and the retrieve counts it as a failed sub-operation
  with the reason (partial or failed), never as done.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

from node.receive.header import read_header
from node.store.index import InstanceRow

Header = tuple[str, dict[str, str]]  # what read_header returns: (transfer syntax, attributes)
SopUid = str | Callable[[], str]  # an instance's SOP Instance UID, or how to read it (only if its store fails)

log = logging.getLogger("hilum.ingest")


class RetrieveBatch:
    def __init__(self, study_uid: str | None = None) -> None:
        # The study the retrieve asked for: an instance of another one is not stored (a C-MOVE's
        # sub-operations are answered before they are read, so this is where they are checked).
        self.study_uid = study_uid
        self._cond = threading.Condition()
        self._rows: list[InstanceRow] = []
        self._busy = 0  # stores answered but not finished
        self.failures: list[tuple[str, str]] = []  # (SOP Instance UID, reason) of stores that failed after Success
        self.closed = False

    def add(self, row: InstanceRow) -> bool:
        """False once the batch is closed: the caller makes this one durable itself."""
        with self._cond:
            if self.closed:
                return False
            self._rows.append(row)
            return True

    def take(self, close: bool = False) -> list[InstanceRow]:
        with self._cond:
            rows, self._rows = self._rows, []
            self.closed = self.closed or close
            return rows

    def begin(self) -> bool:
        """A store is about to be answered before it is done; False if the batch is closed (then
        the caller stores first and answers with the real status)."""
        with self._cond:
            if self.closed:
                return False
            self._busy += 1
            return True

    def end(self, sop_uid: str, status: int, reason: str) -> None:
        with self._cond:
            self._busy -= 1
            if status != 0x0000:
                self.failures.append((sop_uid or "?", reason))
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every store answered early has finished (before the retrieve says how it went)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._busy == 0, timeout)


class StoreThread:
    """Stores instances that were already answered Success (each begun in its batch) in a thread of
    its own, so that the receiving thread reads the next one meanwhile; each ends in its batch with
    the real status. What waits is bounded in bytes (``max_bytes``, and always at least one
    instance): the receiving thread blocks beyond it. A count of 4 instances let a short stall of the
    store (the spool's preparer catching up at the start of a segment, 5-15 ms) block the receiving
    thread, and with it the PACS, several times per retrieve."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: deque[tuple[int, SopUid, RetrieveBatch, Callable[[], tuple[int, str]]] | None] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="retrieve-store", daemon=True)
        self._thread.start()

    def put(self, size: int, sop_uid: SopUid, batch: RetrieveBatch, store: Callable[[], tuple[int, str]]) -> None:
        """Queue ``store`` (an instance of ``size`` bytes begun in ``batch``); ``sop_uid`` names it if
        its store fails (a callable: read only then)."""
        with self._cond:
            self._cond.wait_for(lambda: self._bytes == 0 or self._bytes + size <= self.max_bytes)
            self._bytes += size
            self._items.append((size, sop_uid, batch, store))
            self._cond.notify_all()

    def close(self) -> None:
        """Store what is queued, then stop."""
        with self._cond:
            self._items.append(None)
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._items))
                item = self._items.popleft()
            if item is None:
                return
            size, sop, batch, store = item
            status, reason = 0xA700, "not stored"
            try:
                status, reason = store()
            except Exception as exc:  # noqa: BLE001 - recorded as a failed sub-operation, never lost
                log.exception("storing a retrieved instance failed")
                status, reason = 0xA700, f"internal error: {exc}"
            finally:
                if status != 0x0000 and callable(sop):
                    sop = sop()
                batch.end(sop if isinstance(sop, str) else "", status, reason)
                with self._cond:
                    self._bytes -= size
                    self._cond.notify_all()


class Pipeline:
    """A C-GET's (or WADO-RS's) instances, answered once queued and stored in a ``StoreThread``."""

    def __init__(self, batch: RetrieveBatch, store: Callable[[bytes, Header | None], tuple[int, str]]) -> None:
        self.batch, self.store = batch, store
        self._thread = StoreThread()

    def submit(self, raw: bytes, header: Header | None = None) -> tuple[int, str]:
        """The status to answer now: Success once queued; the real one if the batch is closed.
        ``header``: ``read_header(raw)`` if the caller has read it (passed on, not read again)."""
        if not self.batch.begin():
            return self.store(raw, header)
        sop = (header[1].get("SOPInstanceUID") if header is not None else None) or (lambda: _sop_of(raw))
        self._thread.put(len(raw), sop, self.batch, lambda: self.store(raw, header))
        return 0x0000, "queued"

    def close(self) -> None:
        self._thread.close()


def _sop_of(raw: bytes) -> str:
    fast = read_header(raw)
    return (fast[1].get("SOPInstanceUID") if fast else None) or "?"
