"""The delivery stage: durable delivery records → destinations, with retries and backoff.

The loop sleeps until the earliest due delivery or until woken (a job finished, an admin
retried, a batch was sent), so nothing polls the file system and nothing is held only in memory:
a restart finds every pending delivery in the index and resumes it.

Each batch is sent in a thread of its own, in a lane of its destination: one lane for the
study's originals, and ``Destination.result_lanes`` for results. A job hands over each result
as soon as it is durable, so a small RTSTRUCT or SR that becomes due while a 10 MB SEG is still
being stored goes out beside it, instead of waiting for that STOW-RS and for a batch of
originals (measured: the last result of a 512x512x300 CT reached Orthanc 3.3 s after its job
ended, behind the SEG's and the originals' requests).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

from node.audit import NULL_AUDIT, AuditTrail
from node.config import Settings
from node.deliver.destinations import Accepted, Destination, Item
from node.store.index import Index
from node.store.vault import IntegrityError, Vault

log = logging.getLogger("hilum.deliver")

# Originals per batch (and per pass of the loop). A destination's originals go one batch at a time
# in a lane of their own: a batch of a whole study (300 instances, 158 MB to Orthanc: seconds, more
# on a busy machine) would hold it until the end; a result that becomes due meanwhile goes in a result
# lane. A batch of 32 lasts a fraction of a second.
ORIGINALS_PER_PASS = 32


class DeliveryLoop:
    def __init__(self, settings: Settings, index: Index, destinations: dict[str, Destination],
                 vault: Vault, audit: AuditTrail = NULL_AUDIT) -> None:
        self.read = vault.read  # verified: a tampered spool object fails its delivery, never reaches a peer
        self.vault_quarantine = vault.quarantine_damaged
        self.settings = settings
        self.audit = audit
        self.index = index
        self.destinations = destinations
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delivery", daemon=True)
        self._lock = threading.Lock()
        self._in_flight: set[int] = set()  # delivery ids of the batches being sent
        self._busy: dict[tuple[str, str], int] = defaultdict(int)  # (destination, lane) -> batches being sent
        self._batches: set[_Batch] = set()

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + 60
        if self._thread.is_alive():  # a start that failed early never started it
            self._thread.join(timeout=60)
        with self._lock:
            batches = list(self._batches)
        for batch in batches:  # the batches under way finish (and are recorded) before the index closes
            batch.join(timeout=max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.dispatch()
            except Exception:  # noqa: BLE001 - the loop must survive anything; the index keeps the state
                log.exception("delivery loop error")
            now = time.time()
            with self._lock:
                sending = bool(self._in_flight)
            # While batches are under way, what is due waits for a lane (a finished batch wakes the
            # loop): sleep until the next delivery that is not due yet.
            nxt = self.index.next_delivery_at(after=now if sending else None)
            delay = 5.0 if nxt is None else max(0.0, min(5.0, nxt - now))
            self._wake.wait(delay)
            self._wake.clear()

    def run_once(self) -> int:
        """One pass: every batch that is due and has a free lane sent, and waited for; how many
        instances were delivered."""
        return sum(batch.join() for batch in self.dispatch())

    def dispatch(self) -> list[_Batch]:
        """Start sending what is due, one thread per batch, as the destinations' lanes allow; the
        rest waits for a lane (a finished batch wakes the loop). Returns the batches started."""
        due = self.index.due_deliveries(time.time())
        originals = 0
        groups: dict[tuple[str, str], list] = defaultdict(list)
        with self._lock:
            due = [row for row in due if row["id"] not in self._in_flight]
        for row in due:  # one batch per destination and kind, results' batches first (the query's order)
            if row["kind"] == "original":
                originals += 1
                if originals > ORIGINALS_PER_PASS:
                    break  # the rest in the next pass, after any result that is due by then
            groups[(row["destination"], row["kind"])].append(row)
        started = []
        for (dest_name, kind), rows in groups.items():
            if self._stop.is_set():
                break
            dest = self.destinations.get(dest_name)
            lane = (dest_name, "original" if kind == "original" else "result")
            lanes = 1 if dest is None or kind == "original" else max(1, dest.result_lanes)
            with self._lock:
                if self._busy[lane] >= lanes:
                    continue  # sent when one of the lane's batches is done
                self._busy[lane] += 1
                self._in_flight.update(r["id"] for r in rows)
                batch = _Batch(self, lane, dest_name, dest, rows)
                self._batches.add(batch)
            started.append(batch)
            batch.start()
        return started

    def _done(self, batch: _Batch) -> None:
        with self._lock:
            self._busy[batch.lane] -= 1
            self._in_flight.difference_update(r["id"] for r in batch.rows)
            self._batches.discard(batch)
        self._wake.set()  # what waited for this lane

    def _send(self, dest_name: str, dest: Destination | None, rows: list) -> int:
        """One batch to its destination; the index records the outcome. Delivered instances' count."""
        ids = [r["id"] for r in rows]
        if dest is None:
            self._failed(ids, f"destination {dest_name!r} is not configured")
            return 0
        items = [Item(r["sop_uid"], r["path"], r["kind"], self.read) for r in rows]
        try:
            ok = dest.send(items)
        except IntegrityError as exc:  # the spool copy is damaged: retrying cannot help
            bad = [r["id"] for r in rows if r["path"] == exc.locator]
            where = self.vault_quarantine(exc.locator, str(exc))
            log.error("delivery to %s: spool integrity check failed for %s: %s", dest_name, exc.locator, exc)
            self.index.delivery_failed(bad, f"spool integrity check failed: {exc} (copy in {where})", 1,
                                       self.settings.delivery_backoff_s, self.settings.delivery_backoff_max_s)
            return 0
        except Exception as exc:  # noqa: BLE001 - any peer failure becomes a retry
            log.warning("delivery to %s failed (%d items): %s", dest_name, len(items), exc)
            self.audit.delivery(dest_name, rows, error=str(exc) or type(exc).__name__, deidentified=dest.deidentifies)
            self._failed(ids, str(exc) or type(exc).__name__)
            return 0
        refused = ok.refused if isinstance(ok, Accepted) else {}
        self._refused(dest_name, dest, [r for r in rows if r["sop_uid"] in refused], refused)
        done = [r["id"] for r in rows if r["sop_uid"] in ok]
        missing = [r for r in rows if r["sop_uid"] not in ok and r["sop_uid"] not in refused]
        if done:
            self.index.delivered(done)
            self.audit.delivery(dest_name, [r for r in rows if r["sop_uid"] in ok], deidentified=dest.deidentifies)
            log.info("delivered %d instance(s) to %s", len(done), dest_name, extra={"study_uid": rows[0]["study_uid"]})
        # Retried, each with its own reason where the peer gave one (e.g. its C-STORE status), else the
        # batch's (e.g. the association was lost): what the job and the console show.
        failed = ok.failed if isinstance(ok, Accepted) else {}
        rest = ok.missing_reason if isinstance(ok, Accepted) else None
        by_reason: dict[str, list] = defaultdict(list)
        for r in missing:
            by_reason[failed.get(r["sop_uid"]) or rest or f"{dest_name} did not accept the instance"].append(r)
        if rest in by_reason:
            log.warning("delivery to %s: %d of %d item(s) not accepted: %s", dest_name, len(by_reason[rest]), len(rows),
                        rest)
        for why, group in by_reason.items():
            # a failed attempt is audited like a whole batch's: the trail shows what did not leave, and why
            self.audit.delivery(dest_name, group, error=why, deidentified=dest.deidentifies)
            self._failed([r["id"] for r in group], why)
        return len(done)

    def _refused(self, dest_name: str, dest: Destination, rows: list, why: dict[str, str]) -> None:
        """Deliveries the peer refuses for good (its presentation contexts): failed at once, not
        retried - the same batch would be refused the same way until the peer's configuration
        changes, after which an admin retries them (console, API). The job and the console show
        them failed, with the reason."""
        by_reason: dict[str, list] = defaultdict(list)
        for r in rows:
            by_reason[why[r["sop_uid"]]].append(r)
        for reason, group in by_reason.items():
            self.audit.delivery(dest_name, group, error=reason, deidentified=dest.deidentifies)
            self.index.delivery_failed([r["id"] for r in group], reason, 1, self.settings.delivery_backoff_s,
                                       self.settings.delivery_backoff_max_s)

    def _failed(self, ids: list[int], error: str) -> None:
        s = self.settings
        self.index.delivery_failed(ids, error, s.delivery_max_attempts, s.delivery_backoff_s, s.delivery_backoff_max_s)


class _Batch:
    """One batch being sent, in a daemon thread of its own (a peer that hangs holds its lane,
    not the loop); ``join`` waits for it and gives the count delivered."""

    def __init__(self, loop: DeliveryLoop, lane: tuple[str, str], dest_name: str, dest: Destination | None,
                 rows: list) -> None:
        self.loop, self.lane, self.rows = loop, lane, rows
        self.sent = 0
        self._thread = threading.Thread(target=self._run, args=(dest_name, dest), name=f"deliver-{dest_name}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self, dest_name: str, dest: Destination | None) -> None:
        try:
            self.sent = self.loop._send(dest_name, dest, self.rows)
        except Exception:  # noqa: BLE001 - the rows stay pending and are retried by a later pass
            log.exception("delivery to %s: batch error", dest_name)
        finally:
            self.loop._done(self)

    def join(self, timeout: float | None = None) -> int:
        self._thread.join(timeout)
        return self.sent
