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
  one (``begin``/``end`` around the store, in a ``StoreThread``: the SCP's for C-MOVE, a
  ``Pipeline``'s for C-GET). A store that fails after its
  Success went out is kept in ``failures``, and the retrieve counts it as a failed sub-operation
  with the reason (partial or failed), never as done.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from node.receive.header import read_header
from node.store.index import InstanceRow

Header = tuple[str, dict[str, str]]  # what read_header returns: (transfer syntax, attributes)

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

    def end(self, raw: bytes, status: int, reason: str) -> None:
        with self._cond:
            self._busy -= 1
            if status != 0x0000:
                self.failures.append((_sop_of(raw), reason))
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every store answered early has finished (before the retrieve says how it went)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._busy == 0, timeout)


class StoreThread:
    """Stores instances that were already answered Success (each begun in its batch) in a thread of
    its own, so that the receiving thread reads the next one meanwhile; each ends in its batch with
    the real status. At most ``depth`` wait (memory stays bounded: the receiving thread blocks)."""

    def __init__(self, depth: int = 4) -> None:
        self._q: queue.Queue[tuple[bytes, RetrieveBatch, Callable[[], tuple[int, str]]] | None] = queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, name="retrieve-store", daemon=True)
        self._thread.start()

    def put(self, raw: bytes, batch: RetrieveBatch, store: Callable[[], tuple[int, str]]) -> None:
        self._q.put((raw, batch, store))

    def close(self) -> None:
        """Store what is queued, then stop."""
        self._q.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            raw, batch, store = item
            status, reason = 0xA700, "not stored"
            try:
                status, reason = store()
            except Exception as exc:  # noqa: BLE001 - recorded as a failed sub-operation, never lost
                log.exception("storing a retrieved instance failed")
                status, reason = 0xA700, f"internal error: {exc}"
            finally:
                batch.end(raw, status, reason)


class Pipeline:
    """A C-GET's (or WADO-RS's) instances, answered once queued and stored in a ``StoreThread``."""

    def __init__(self, batch: RetrieveBatch, store: Callable[[bytes, Header | None], tuple[int, str]],
                 depth: int = 4) -> None:
        self.batch, self.store = batch, store
        self._thread = StoreThread(depth)

    def submit(self, raw: bytes, header: Header | None = None) -> tuple[int, str]:
        """The status to answer now: Success once queued; the real one if the batch is closed.
        ``header``: ``read_header(raw)`` if the caller has read it (passed on, not read again)."""
        if not self.batch.begin():
            return self.store(raw, header)
        self._thread.put(raw, self.batch, lambda: self.store(raw, header))
        return 0x0000, "queued"

    def close(self) -> None:
        self._thread.close()


def _sop_of(raw: bytes) -> str:
    fast = read_header(raw)
    return (fast[1].get("SOPInstanceUID") if fast else None) or "?"
