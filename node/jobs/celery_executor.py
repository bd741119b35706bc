"""Jobs on a cluster of workers through Celery: the node dispatches and reconciles, workers run.

The index stays the source of truth. Dispatching a job opens an *attempt* with a fresh secret
ticket; the task carries only the job id and that ticket. A worker claims the attempt from the
node (``node/web/worker_api.py``), which hands it that job's inputs and takes only that
attempt's results. One thread here does both:

- dispatch: pending jobs become attempts published to their queue (rule's ``queue``, else
  ``executor.queues[handler]``, else ``executor.default_queue``);
- reconcile: a claimed attempt silent for ``worker_lost_s`` lost its worker and the job runs
  again (or fails once ``max_attempts`` were lost); one past its timeout fails; a queued task
  the broker no longer holds (Redis restarted without persistence) is published again with a
  new ticket, so a copy that turns up later cannot be claimed twice.
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
from node.jobs.broker import TASK, BrokerView, broker_priority, make_celery, ticket_hash
from node.jobs.executor import Executor, superseded
from node.store.index import Index

log = logging.getLogger("hilum.jobs.celery")

RECONCILE_EVERY_S = 1.0
MISSING_PASSES = 2  # a task must be absent from the broker this many passes in a row to count as lost


class CeleryExecutor(Executor):
    def __init__(self, settings: Settings, index: Index, on_done: Callable[[], None], audit: AuditTrail = NULL_AUDIT,
                 rule_queue: Callable[[str], str | None] = lambda rule: None) -> None:
        self.settings = settings
        self.cfg = settings.executor
        self.index = index
        self.on_done = on_done
        self.audit = audit
        self.rule_queue = rule_queue
        self.app = make_celery(self.cfg.broker_url, self.cfg.visibility_timeout(settings.handler_timeout_s))
        self.broker = BrokerView(self.cfg.broker_url)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- Executor -------------------------------------------------------------------------
    def start(self) -> None:
        n = self.index.refresh_claimed()
        if n:
            log.info("%d job attempt(s) were running on workers when the node stopped: waiting for them", n)
        self._thread = threading.Thread(target=self._loop, name="celery-dispatch", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.broker.close()

    # -- what the worker API calls --------------------------------------------------------
    def job_ended(self, job_id: int) -> None:
        self.audit.job_finished(self.index.job(job_id))
        self.on_done()

    def queues(self) -> list[str]:
        return sorted({self.cfg.default_queue, *self.cfg.queues.values(),
                       *(a["queue"] for a in self.index.open_attempts()),
                       *(q for w in self.index.workers() for q in json.loads(w["queues"]))})

    def queue_lengths(self) -> dict[str, int] | None:
        return self.broker.queue_lengths(self.queues())

    # -- the loop -------------------------------------------------------------------------
    def _loop(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            try:
                self._dispatch_pending()
                if time.monotonic() - last >= RECONCILE_EVERY_S:
                    last = time.monotonic()
                    self._reconcile()
            except Exception:  # noqa: BLE001 - the loop must outlive a bad pass (index busy, broker hiccup)
                log.exception("dispatch/reconcile pass failed")
            self._wake.wait(RECONCILE_EVERY_S)
            self._wake.clear()

    def _dispatch_pending(self) -> None:
        while not self._stop.is_set():
            job = self.index.claim_job()  # running, attempts + 1
            if job is None:
                return
            if (why := superseded(self.index, job)) is not None:
                self.index.fail_job(job["id"], why)
                self.job_ended(job["id"])
                continue
            queue = self.cfg.queue_for(job["handler"], self.rule_queue(job["rule"]))
            self._publish(job["id"], job["attempts"], queue, job["priority"])

    def _publish(self, job_id: int, attempt: int, queue: str, priority: str) -> None:
        ticket = secrets.token_urlsafe(32)
        task_id = f"hilum-job-{job_id}-{attempt}-{secrets.token_hex(4)}"
        self.index.add_attempt(job_id, attempt, ticket_hash(ticket), task_id, queue)
        self.index.job_progress(job_id, 0.0, f"queued on {queue}")
        try:
            self.app.send_task(TASK, args=[job_id, ticket], queue=queue, task_id=task_id,
                               priority=broker_priority(self.cfg.broker_url, priority),
                               retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2})
            log.info("job %d attempt %d → queue %s", job_id, attempt, queue, extra={"job": job_id})
        except Exception as exc:  # noqa: BLE001 - broker down: the reconciler publishes it again later
            log.warning("job %d: broker unreachable (%s); it is published again once the broker is back", job_id, exc)

    def _served_queues(self, now: float) -> set[str]:
        """Queues some worker seen within worker_lost_s takes."""
        return {q for w in self.index.workers() if now - w["last_seen"] <= self.cfg.worker_lost_s
                for q in json.loads(w["queues"])}

    def _unserved(self, a, now: float, served: set[str]) -> bool:
        """A queued attempt whose queue no live worker takes: said in the job's message at once, and
        failed once it has waited the job's timeout (a rule's queue with no worker for it left the
        job 'running' for ever). A queue that has workers is only busy: its jobs wait."""
        if a["queue"] in served:
            return False
        timeout = a["timeout_s"] or self.settings.handler_timeout_s
        waited = now - a["dispatched_at"]
        job_id = a["job_id"]
        if waited <= timeout:
            self.index.job_progress(job_id, 0.0, f"queued on {a['queue']}: no live worker takes this queue")
            return False
        if self.index.expire_queued_attempt(job_id, a["attempt"]):
            self.index.fail_job(job_id, f"no worker took it from queue {a['queue']!r} within its timeout "
                                        f"({timeout:.0f} s): no live worker takes that queue; start one for it, "
                                        f"or change the rule's queue, then retry the job")
            self.job_ended(job_id)
        return True

    def _reconcile(self) -> None:
        now = time.time()
        known: set[str] | None = None
        asked = False
        served: set[str] | None = None
        for a in self.index.open_attempts():
            job_id, attempt = a["job_id"], a["attempt"]
            if a["state"] == "queued":
                served = self._served_queues(now) if served is None else served
                if self._unserved(a, now, served):
                    continue
            if a["state"] == "claimed":
                timeout = a["timeout_s"] or self.settings.handler_timeout_s
                if now - a["claimed_at"] > timeout:
                    if self.index.end_attempt(job_id, attempt, "timeout"):
                        self.index.fail_job(job_id, f"timed out after {timeout:.0f} s on worker {a['worker']}")
                        self.job_ended(job_id)
                elif now - a["heartbeat_at"] > self.cfg.worker_lost_s:
                    why = f"no heartbeat from worker {a['worker']} for {now - a['heartbeat_at']:.0f} s"
                    outcome = self.index.lose_attempt(job_id, attempt, why, self.cfg.max_attempts)
                    log.warning("job %d attempt %d: %s; %s", job_id, attempt, why, outcome, extra={"job": job_id})
                    if outcome == "failed":
                        self.job_ended(job_id)
                    self._wake.set()
                continue
            if now - a["dispatched_at"] < self.cfg.lost_task_s:
                continue
            if not asked:
                known, asked = self.broker.task_ids(self.queues()), True
            if known is None:
                continue  # broker unreachable or not inspectable: nothing to conclude
            if a["task_id"] in known:
                if a["missing"]:
                    self.index.attempt_missing(job_id, attempt, 0)
                continue
            if a["missing"] + 1 < MISSING_PASSES:
                self.index.attempt_missing(job_id, attempt, a["missing"] + 1)
                continue
            log.warning("job %d attempt %d: task no longer in the broker; publishing it again", job_id, attempt)
            self.index.job_note(job_id, {"event": "task lost by the broker: published again", "attempt": attempt})
            self._publish(job_id, attempt, a["queue"], self.index.job(job_id)["priority"])
        for job_id in self.index.jobs_running_without_attempt():
            self.index.requeue_job(job_id, {"event": "requeued", "note": "running, but no attempt was dispatched"})
            self._wake.set()
