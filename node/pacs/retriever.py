"""The retrieve loop: durable retrieve records (node/store/retrieves.py) carried out against their
sources, feeding the node's normal receive path.

Threads sleep until the earliest due retrieve or until woken (a CLI/API/rule queued one); every
state change is in the index, so a restart resumes where it stopped. C-GET and WADO-RS instances
go through ``Ingest.store`` (same sealing, O_DSYNC, dedupe, routing as a push); C-MOVE sends them
to the node's own SCP, which does the same.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from typing import Callable

from node.audit import NULL_AUDIT, AuditTrail
from node.config import Settings
from node.pacs.audit import retrieve_audit
from node.pacs.dimse import DimseClient
from node.pacs.model import NotRetryable, PacsError, RetrieveOutcome, StudyQuery
from node.pacs.sources import source_client
from node.receive.batch import Pipeline, RetrieveBatch
from node.receive.ingest import Ingest, Origin
from node.store.retrieves import RetrieveStore

log = logging.getLogger("hilum.pacs")
REPORT_S = 0.25  # a running retrieve's progress reports (a sync of its batch, its counts into the index)


class Retriever:
    def __init__(self, settings: Settings, store: RetrieveStore, ingest: Ingest,
                 audit: AuditTrail = NULL_AUDIT) -> None:
        self.settings, self.store, self.ingest, self.audit = settings, store, ingest, audit
        self.capacity = {name: cfg.max_concurrent for name, cfg in settings.sources.items()}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if not self.settings.sources:
            return
        n = self.store.requeue_running()
        if n:
            log.warning("%d retrieve(s) interrupted by the last stop queued again", n)
        for i in range(min(8, sum(self.capacity.values()))):
            t = threading.Thread(target=self._loop, name=f"retriever-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=30)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            row = self.store.claim(time.time(), self.capacity)
            if row is None:
                due = self.store.next_due()
                # Also woken by wake(); the 2 s cap picks up retrieves queued by another process (the CLI).
                delay = 2.0 if due is None else max(0.05, min(2.0, due - time.time()))
                self._wake.wait(delay)
                self._wake.clear()
                continue
            self._wake.set()  # another slot may be free for another thread
            try:
                self.run_one(row)
            except Exception as exc:  # noqa: BLE001 - one retrieve's bug must not stop the loop
                log.exception("retrieve %s crashed", row["id"])
                self.store.finish(row["id"], "failed", f"internal error: {exc}")

    # -- one retrieve --------------------------------------------------------------------------
    def run_one(self, row) -> str:
        rid, name, study = row["id"], row["source"], row["study_uid"]
        series = json.loads(row["series_json"]) if row["series_json"] else None
        try:
            client = source_client(self.settings, name)
        except KeyError as exc:
            self.store.finish(rid, "failed", str(exc.args[0]))
            return "failed"
        try:
            expected, classes = self._expect(client, study, series)
            if expected == 0:
                raise NotRetryable(f"source {name}: study {study} not found (0 matches)"
                                   + (f" in series {', '.join(series)}" if series else ""))
            method = client.cfg.retrieve if isinstance(client, DimseClient) else "wado"
            self.store.progress(rid, status="retrieving", method=method, expected=expected)
            out = self._retrieve(rid, client, method, study, series, classes)
        except NotRetryable as exc:
            self.store.finish(rid, "failed", str(exc))
            retrieve_audit(self.audit, row, outcome="failed", error=str(exc))
            log.error("retrieve %d failed: %s", rid, exc)
            return "failed"
        except PacsError as exc:
            if self._stop.is_set():
                log.info("retrieve %d interrupted by shutdown: resumed at the next start", rid)
                return "interrupted"  # left running: requeue_running() queues it again at start
            if self.store.get(rid)["cancel_requested"]:
                self.store.finish(rid, "cancelled", "cancelled")
                retrieve_audit(self.audit, row, outcome="cancelled")
                return "cancelled"
            status = self.store.backoff(rid, str(exc), self.settings.retrieve_max_attempts,
                                        self.settings.retrieve_backoff_s, self.settings.retrieve_backoff_max_s)
            log.warning("retrieve %d: %s (%s)", rid, exc, "giving up" if status == "failed" else "will retry")
            if status == "failed":
                retrieve_audit(self.audit, row, outcome="failed", error=str(exc))
            return status
        self.ingest.writer.flush(30)
        detail = {"failed_uids": out.failed_uids[:200], "note": out.note} if out.failed_uids or out.note else {}
        if client.warnings:  # the source's queries were cut short (e.g. a QIDO-RS archive ignoring offset)
            detail["warnings"] = client.warnings[:20]
        if out.failed == 0:
            status, error = "done", None
        elif out.completed > 0:
            status, error = "partial", f"{out.failed} of {out.completed + out.failed} sub-operations failed" \
                + (f": {out.note}" if out.note else "")
        else:
            status, error = "failed", f"all {out.failed} sub-operations failed" + (f": {out.note}" if out.note else "")
        # Attributed, counted, judged and ended in one transaction (node/store/retrieves.py).
        held, status, error = self.store.finish(
            rid, status, error, detail, counts=(out.completed, out.failed, out.warning),
            judge=lambda held: _judge_arrivals(status, error, held, expected, out, client, method))
        retrieve_audit(self.audit, row, outcome=status, error=error, counts=out, held=held)
        return status

    def _expect(self, client, study: str, series: list[str] | None) -> tuple[int | None, list[str]]:
        """Instances expected (None: the source does not say) and the study's SOP classes."""
        matches, _bad = client.find_studies(StudyQuery(study_uid=study))
        matches = [m for m in matches if m.study_uid == study]
        if not matches:
            return 0, []
        m = matches[0]
        if not series:
            return m.instances, m.sop_classes
        answers, _ = client.find_series(study)
        wanted = [s for s in answers if s.series_uid in set(series)]
        if not wanted:
            return 0, m.sop_classes
        counts = [s.instances for s in wanted]
        return (sum(counts) if None not in counts else None), m.sop_classes

    def _retrieve(self, rid: int, client, method: str, study: str, series: list[str] | None,
                  classes: list[str]) -> RetrieveOutcome:
        # C-MOVE's sub-operations reach the node's SCP naming this C-MOVE (calling AE, message ID): a
        # random ID keeps concurrent retrieves, and anyone guessing, apart.
        move = (client.calling, secrets.randbelow(0xFFFE) + 1) if method == "move" else None
        try:
            with self.ingest.retrieve_batch(move, study) as batch:
                out = self._run_retrieve(rid, client, method, study, series, classes, batch, move)
                batch.wait_idle(60)
                _count_failed_stores(out, batch.failures)
                return out
        except OSError as exc:  # the batch's sync failed: nothing of it is indexed, so retry
            raise PacsError(f"the retrieved instances could not be made durable: {exc}") from exc

    def _run_retrieve(self, rid: int, client, method: str, study: str, series: list[str] | None,
                      classes: list[str], batch: RetrieveBatch, move: tuple[str, int] | None) -> RetrieveOutcome:
        def report(out: RetrieveOutcome) -> bool:
            self.ingest.commit(batch)  # what arrived so far becomes durable and counted
            return self.store.progress(rid, received=self.store.held_instances(study, series),
                                       completed=out.completed, failed=out.failed, warning=out.warning)

        reporter = Reporter(report)
        last = [0.0]

        def progress(out: RetrieveOutcome, remaining: int) -> bool:
            # Every REPORT_S what arrived is synced and indexed, off this thread: what is left for the
            # end of the retrieve (a sync, index rows) stays short.
            now = time.monotonic()
            if now - last[0] >= REPORT_S:
                last[0] = now
                reporter.report(out)
            return reporter.ok and not self._stop.is_set()

        try:
            if move is not None:
                return client.move(study, series, progress, message_id=move[1])
            origin = Origin(calling_ae=getattr(client.cfg, "ae_title", client.name), called_ae=self.settings.ae_title,
                            source_ip=getattr(client.cfg, "host", ""), assoc_id=f"retrieve:{rid}")
            # Each instance is answered once queued and stored in the pipeline's thread meanwhile.
            pipeline = Pipeline(batch, lambda raw, header: self.ingest.store(raw, origin, batch, header))
            try:
                if method == "get":
                    return client.get(study, series, classes, pipeline.submit, progress)
                return client.get(study, series, pipeline.submit, progress)
            finally:
                pipeline.close()
        finally:
            reporter.close()
            if reporter.error is not None:  # a sync failed: nothing of the batch so far is indexed
                raise reporter.error


class Reporter:
    """A retrieve's progress reports (a sync of what arrived so far, the counts into the index) in a
    thread of their own. On the thread that receives the instances, each report's fdatasync and
    index writes (the index syncs its own WAL) held back the C-STORE response the PACS waits for
    before it sends the next instance. ``ok`` turns False when the report asks to stop (a cancel)
    or fails; ``error`` is then the failure (an OSError from the sync), raised by the retrieve."""

    def __init__(self, fn: Callable[[RetrieveOutcome], bool]) -> None:
        self.fn = fn
        self.ok = True
        self.error: OSError | None = None
        self._latest: RetrieveOutcome | None = None
        self._wake = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="retrieve-progress", daemon=True)
        self._thread.start()

    def report(self, out: RetrieveOutcome) -> None:
        """Report these counts soon (a report still running is not waited for; the latest counts win)."""
        self._latest = RetrieveOutcome(out.completed, out.failed, out.warning)
        self._wake.set()

    def close(self) -> None:
        self._done = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            out, self._latest = self._latest, None
            if out is not None and self.ok:
                try:
                    self.ok = self.fn(out)
                except OSError as exc:
                    self.ok, self.error = False, exc
                except Exception:  # noqa: BLE001 - a report that failed must not end the retrieve
                    log.exception("a retrieve's progress report failed")
            if self._done:
                return


def _count_failed_stores(out: RetrieveOutcome, failures: list[tuple[str, str]]) -> None:
    """Instances answered Success before they were stored, whose store then failed (node/receive/batch.py):
    failed sub-operations with their reasons, as if the PACS had reported them."""
    if not failures:
        return
    out.failed += len(failures)
    out.completed = max(0, out.completed - len(failures))
    out.failed_uids = [*out.failed_uids, *(sop for sop, _ in failures)]
    reasons = "; ".join(sorted({reason for _, reason in failures}))
    out.note = (out.note + "; " if out.note else "") + f"{len(failures)} received but not stored: {reasons}"[:300]


def _judge_arrivals(status: str, error: str | None, held: int, expected: int | None, out: RetrieveOutcome,
                    client, method: str) -> tuple[str, str | None]:
    """The status by what arrived, not only by what the PACS reported: a PACS may answer a C-MOVE
    with success while its sub-operations went elsewhere (its entry for our AE title names another
    host), or a DICOMweb archive may answer an empty multipart. Done with nothing held would hand a
    job no prior and say nothing."""
    if status == "failed":
        return status, error
    reported = out.completed + out.warning
    # What the PACS listed, or what it says it sent when more (or when it listed no count): a PACS that
    # gave no study count and reports 300 sent, of which 150 arrived, did not bring the study.
    want = max(expected or 0, reported)
    if held == 0 and want:
        why = (f"the PACS reported {reported} instance(s) sent, but none arrived" if reported
               else f"none of the {want} instance(s) the PACS listed arrived")
        if method == "move":
            why += (f" (C-MOVE: the PACS sends to the host and port it has for AE title "
                    f"{client.move_destination!r}: check that they are this node's)")
        return "failed", why
    if held < want:
        short = f"{held} of {want} instance(s) arrived" + \
            ("" if want == expected else f" (the PACS reported {reported} sent)")
        return "partial", f"{short}; {error}" if error else short
    return status, error
