"""The job stage: durable job records → handler runs in separate worker processes.

``LocalProcessExecutor`` is the embedded default: ``workers`` long-lived processes (spawned,
never forked from a threaded parent, started with the node), each with a memory cap. Workers are reused so a model
session loads once per worker, not once per study. A job that raises fails with the reason;
one that exceeds its timeout or kills its worker fails too, the worker is replaced, and the
SCP keeps serving. A distributed backend implements the same ``Executor`` interface.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import threading
import time
from typing import Callable

from node.audit import NULL_AUDIT, AuditTrail
from node.config import Settings
from node.jobs.worker import JobSpec, job_created, worker_main
from node.models.shadow import record_agreement
from node.models.versions import ModelRegistry, job_model, param_models
from node.projects.intake import note_prediction
from node.projects.store import ProjectStore
from node.store.index import Index
from node.store.retrieves import priors_of_job, retrieved_by
from node.store.vault import Vault

log = logging.getLogger("hilum.jobs")


class Executor:
    def start(self) -> None: ...

    def wake(self) -> None: ...

    def stop(self) -> None: ...


class _Worker:
    def __init__(self, ctx, memory_mb: int) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, memory_mb), daemon=True, name="hilum-worker")
        self.proc.start()
        child.close()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def superseded(index: Index, job) -> str | None:
    """Why a job must not run, if instances of its study arrived after it was routed: its input
    would be a mix of the routed set and part of what is arriving, delivered beside the results of
    the job the next generation routes (on the whole study). None if it may run."""
    study = index.study(job["study_uid"])
    if study is None or study["generation"] <= job["generation"]:
        return None
    return (f"superseded: instances of the study arrived after this job was routed (generation "
            f"{job['generation']}, now {study['generation']}); the rules run again on the whole study once it is "
            f"complete")


class PurgedInput(Exception):
    """The job's input is no longer in the spool (retention)."""


class LocalProcessExecutor(Executor):
    """``on_done`` is called whenever results are ready for delivery: each result object as the
    worker reports it durable (the SR need not wait for a big SEG), and the job's end."""

    def __init__(self, settings: Settings, index: Index, vault: Vault, on_done: Callable[[], None],
                 audit: AuditTrail = NULL_AUDIT) -> None:
        self.settings = settings
        self.audit = audit
        self.index = index
        self.vault = vault
        self.on_done = on_done
        self._ctx = mp.get_context("spawn")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._workers: list[_Worker | None] = [None] * settings.workers
        self.models = ModelRegistry.for_data_dir(settings.data_dir)
        self.projects = ProjectStore.for_data_dir(settings.data_dir)

    def start(self) -> None:
        n = self.index.requeue_running()
        if n:
            log.warning("%d job(s) were running when the node stopped: queued again", n)
        for slot in range(self.settings.workers):
            t = threading.Thread(target=self._slot, args=(slot,), name=f"job-slot-{slot}", daemon=True)
            t.start()
            self._threads.append(t)

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for w in self._workers:
            if w is not None:
                w.kill()
        for t in self._threads:
            t.join(timeout=10)

    def _slot(self, slot: int) -> None:
        # The worker starts with the node and warms up while idle (worker.warm_up): a fresh node's
        # first study would otherwise wait ~2 s for the worker's start and imports.
        try:
            self._worker(slot)
        except Exception:  # noqa: BLE001 - started again when a job needs it
            log.exception("job slot %d: worker did not start", slot)
        while not self._stop.is_set():
            # Every pass is guarded: an index error (disk full, locked) must not end the slot's
            # thread, which would leave every later job pending with nothing saying why.
            try:
                job = self.index.claim_job()
            except Exception:  # noqa: BLE001
                log.exception("job slot %d: cannot take a job; trying again", slot)
                self._stop.wait(2.0)
                continue
            if job is None:
                self._wake.wait(2.0)
                self._wake.clear()
                continue
            try:
                self._run(slot, job)
            except Exception as exc:  # noqa: BLE001 - a bookkeeping error fails the job, not the slot
                log.exception("job %s: executor error", job["id"])
                # The worker may still be running this job: its results and "done" must never be
                # read as the next job's, so it is replaced.
                self._retire(slot)
                self._fail_when_possible(job["id"], f"executor error: {exc}")
            try:
                self.audit.job_finished(self.index.job(job["id"]))  # records done/failed; a job left running is not
            except Exception:  # noqa: BLE001 - the audit trail reports its own failures
                log.exception("job %s: audit record not written", job["id"])

    def _retire(self, slot: int) -> None:
        w, self._workers[slot] = self._workers[slot], None
        if w is not None:
            w.kill()

    def _fail_when_possible(self, job_id: int, error: str) -> None:
        """Fail the job, retrying while the index refuses (disk full): left 'running', it would wait
        for the next start. The slot takes no other job meanwhile; it could not claim one anyway."""
        while True:
            try:
                self.index.fail_job(job_id, error)
                return
            except Exception:  # noqa: BLE001
                log.exception("job %s: cannot record its failure; trying again", job_id)
                if self._stop.wait(2.0):
                    return  # left 'running': re-queued at the next start

    def _worker(self, slot: int) -> _Worker:
        w = self._workers[slot]
        if w is None or not w.proc.is_alive():
            w = _Worker(self._ctx, self.settings.handler_memory_mb)
            self._workers[slot] = w
        return w

    def _spec(self, job) -> JobSpec:
        uids = [job["series_uid"]] if job["series_uid"] else \
            [s["series_uid"] for s in self.index.series_of_study(job["study_uid"])]
        purged = {u: n for u in uids if (n := self.index.purged_in_series(u))}
        if purged:
            raise PurgedInput(", ".join(f"{n} instance(s) of series {u}" for u, n in purged.items()) +
                              " were deleted from the spool by retention; send the study again to reprocess it")
        options = json.loads(job["options_json"])
        return JobSpec(
            job_id=job["id"], job_key=job["job_key"], study_uid=job["study_uid"], rule=job["rule"],
            handler=job["handler"], params=json.loads(job["params_json"]),
            series={u: self.index.instance_paths(u) for u in uids},
            results_dir=str(self.settings.data_dir / "results"), vault=self.vault.spec(),
            options=options, created=job_created(job["created_at"]),
            # the rule's priors, when it asked (node/pacs/priors.py); which retrieves brought the input;
            # a model job's resolved version
            extra=(priors_of_job(self.index, job["id"]) | retrieved_by(self.index, uids)
                   | self._model_extra(job, options) | self._param_models(job)),
        )

    def _param_models(self, job) -> dict:
        """Models the job's params name (a detector), resolved like a model job's version, noted in its history."""
        refs = param_models(self.models, job["handler"], json.loads(job["params_json"]))
        for param, r in refs.items():
            self.index.note_job(job["id"], {"event": "model", "param": param, "name": r.name, "version": r.version,
                                            "state": r.state})
        return {"param_models": {p: {"name": r.name, "version": r.version, "folder": str(r.folder)}
                                 for p, r in refs.items()}} if refs else {}

    def _model_extra(self, job, options: dict) -> dict:
        """A model job runs the version active now (or its pinned shadow version): resolved here, when a
        worker takes the job, so a promotion reaches the next job without a restart; the version is
        recorded in the job's history and a running job keeps the folder it was given."""
        resolved = job_model(self.models, job["handler"], options)
        if resolved is None:
            return {}
        self.index.note_job(job["id"], {"event": "model", "name": resolved.name, "version": resolved.version,
                                        "state": resolved.state, "shadow": bool(options.get("shadow_of"))})
        return {"model_dir": str(resolved.folder), "model_version": resolved.version,
                "keep_labels": bool(options.get("keep_labels"))}

    def _shadow_agreement(self, job_id: int) -> None:
        try:
            record_agreement(self.index, self.settings.data_dir / "results", self.vault.read_file, self.models, job_id)
        except Exception:  # noqa: BLE001 - the comparison is evidence for people; it never fails the job
            log.exception("job %d: shadow agreement not recorded", job_id)

    def _project_prediction(self, job, results: list[dict], provenance: dict) -> None:
        try:
            note_prediction(self.projects, job, results, provenance)
        except Exception:  # noqa: BLE001 - bookkeeping of the learning loop never fails the job
            log.exception("job %d: project prediction not recorded", job["id"])

    def _run(self, slot: int, job) -> None:
        job_id = job["id"]
        timeout = job["timeout_s"] or self.settings.handler_timeout_s
        try:
            spec = self._spec(job)
        except PurgedInput as exc:
            self.index.fail_job(job_id, f"refused: {exc}")
            return
        except KeyError as exc:  # a model with no runnable version (all retired, or removed)
            self.index.fail_job(job_id, f"refused: {exc.args[0]}")
            return
        # Read after the spec: if no instance arrived since routing, the spec holds exactly the
        # routed set (an arrival after routing bumps the generation).
        if (why := superseded(self.index, job)) is not None:
            self.index.fail_job(job_id, why)
            return
        w = self._worker(slot)
        log.info("job %d: %s on %s (rule %s)", job_id, job["handler"], job["series_uid"] or "study",
                 job["rule"], extra={"study_uid": job["study_uid"], "job": job_id})
        w.conn.send(spec)
        handed: list[dict] = []  # results already recorded and handed to delivery by this run

        def fail(error: str) -> None:
            if handed:
                kinds = ", ".join(r["modality"] for r in handed)
                error += (f" [{len(handed)} result object(s) of this job were already handed to delivery "
                          f"before it failed ({kinds}): an incomplete set, see the job history]")
            self.index.fail_job(job_id, error, handed)

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                w.kill()
                self._workers[slot] = None
                fail(f"timed out after {timeout:.0f} s (worker killed)")
                return
            if self._stop.is_set():
                return  # left 'running': re-queued at the next start
            if not w.conn.poll(min(left, 1.0)):
                if not w.proc.is_alive():
                    code = w.proc.exitcode
                    self._workers[slot] = None
                    why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                    fail(f"worker process died ({why}); memory cap {self.settings.handler_memory_mb} MB")
                    return
                continue
            try:
                kind, *payload = w.conn.recv()
            except (EOFError, OSError):
                continue  # the liveness check above reports the death
            if kind == "progress":
                self.index.job_progress(job_id, payload[0], payload[1])
            elif kind == "results":
                self._hand_over(job, payload[0])
                handed.extend(payload[0])
            elif kind == "error":
                fail(payload[0])
                log.warning("job %d failed: %s", job_id, payload[0].splitlines()[0],
                            extra={"study_uid": job["study_uid"], "job": job_id})
                return
            elif kind == "done":
                results, provenance, figures = payload
                self._finish(job, results, {r["sop_instance_uid"] for r in handed}, provenance, figures)
                if spec.extra.get("keep_labels"):
                    self._shadow_agreement(job_id)
                if spec.extra.get("model_dir"):
                    self._project_prediction(job, results, provenance)
                return

    def _hand_over(self, job, results: list[dict]) -> None:
        """Durable result objects of a running job: recorded and due for delivery now, so they are
        on their way while the worker encodes the next ones."""
        dests = json.loads(job["destinations_json"])
        self.index.add_results(job["id"], results, self.settings.result_deliveries(results, dests))
        self.on_done()

    def _finish(self, job, results: list[dict], handed: set[str], provenance: dict, figures: dict) -> None:
        dests = json.loads(job["destinations_json"])
        fresh = [r for r in results if r["sop_instance_uid"] not in handed]
        self.index.finish_job(job["id"], results, self.settings.result_deliveries(fresh, dests), provenance, figures)
        log.info("job %d done: %d result(s) → %s", job["id"], len(results), ", ".join(dests) or "nowhere",
                 extra={"study_uid": job["study_uid"], "job": job["id"]})
        self.on_done()
