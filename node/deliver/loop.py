"""The delivery stage: durable delivery records → destinations, with retries and backoff.

The loop sleeps until the earliest due delivery or until woken (a job finished, an admin
retried), so nothing polls the file system and nothing is held only in memory: a restart finds
every pending delivery in the index and resumes it.
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

# Originals sent per pass of the loop. A pass sends its batches one after the other, and a result
# that becomes due meanwhile waits for the next pass: with a whole study's originals in one batch
# (300 instances, 158 MB to Orthanc: seconds, more on a busy machine) the job's SR, made a few
# seconds after the study completed, queued behind them. A pass of 32 lasts a fraction of a second.
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

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():  # a start that failed early never started it
            self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the loop must survive anything; the index keeps the state
                log.exception("delivery loop error")
            nxt = self.index.next_delivery_at()
            delay = 5.0 if nxt is None else max(0.0, min(5.0, nxt - time.time()))
            self._wake.wait(delay)
            self._wake.clear()

    def run_once(self) -> int:
        due = self.index.due_deliveries(time.time())
        originals = 0
        groups: dict[tuple[str, str], list] = defaultdict(list)
        for row in due:  # one batch per destination and kind, results' batches first (the query's order)
            if row["kind"] == "original":
                originals += 1
                if originals > ORIGINALS_PER_PASS:
                    break  # the rest in the next pass, after any result that is due by then
            groups[(row["destination"], row["kind"])].append(row)
        sent = 0
        for (dest_name, _), rows in groups.items():
            if self._stop.is_set():
                break
            dest = self.destinations.get(dest_name)
            ids = [r["id"] for r in rows]
            if dest is None:
                self._failed(ids, f"destination {dest_name!r} is not configured")
                continue
            items = [Item(r["sop_uid"], r["path"], r["kind"], self.read) for r in rows]
            try:
                ok = dest.send(items)
            except IntegrityError as exc:  # the spool copy is damaged: retrying cannot help
                bad = [r["id"] for r in rows if r["path"] == exc.locator]
                where = self.vault_quarantine(exc.locator, str(exc))
                log.error("delivery to %s: spool integrity check failed for %s: %s", dest_name, exc.locator, exc)
                self.index.delivery_failed(bad, f"spool integrity check failed: {exc} (copy in {where})", 1,
                                           self.settings.delivery_backoff_s, self.settings.delivery_backoff_max_s)
                continue
            except Exception as exc:  # noqa: BLE001 - any peer failure becomes a retry
                log.warning("delivery to %s failed (%d items): %s", dest_name, len(items), exc)
                self.audit.delivery(dest_name, rows, error=str(exc) or type(exc).__name__, deidentified=dest.deidentifies)
                self._failed(ids, str(exc) or type(exc).__name__)
                continue
            refused = ok.refused if isinstance(ok, Accepted) else {}
            self._refused(dest_name, dest, [r for r in rows if r["sop_uid"] in refused], refused)
            done = [r["id"] for r in rows if r["sop_uid"] in ok]
            missing = [r["id"] for r in rows if r["sop_uid"] not in ok and r["sop_uid"] not in refused]
            if done:
                self.index.delivered(done)
                self.audit.delivery(dest_name, [r for r in rows if r["sop_uid"] in ok], deidentified=dest.deidentifies)
                sent += len(done)
                log.info("delivered %d instance(s) to %s", len(done), dest_name,
                         extra={"study_uid": rows[0]["study_uid"]})
            if missing:
                self._failed(missing, f"{dest_name} did not accept the instance")
        return sent

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
