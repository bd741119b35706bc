"""Stability and routing: complete studies → rule evaluation → durable jobs.

A study is complete when no instance has arrived for ``stable_after`` seconds (persisted
``last_at``), or when an admin forces it. Completion and routing are two idempotent steps keyed
on the study's *generation*: a crash between them just routes at the next pass, and a job's key
(rule, study, series, handler, generation) makes a second pass create nothing twice. Instances
that arrive after routing bump the generation: the study is routed again once stable, and the
job history says why.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Callable

from pydicom import Dataset

from node.audit import NULL_AUDIT, AuditTrail
from node.config import Settings
from node.models.shadow import shadow_job_options
from node.models.versions import ModelRegistry
from node.projects.store import ProjectStore
from node.rules.facts import SeriesFacts, StudyFacts
from node.store.index import Index
from node.store.retrieves import PRIORS_ARRIVING, prior_context

log = logging.getLogger("hilum.route")


def job_key(rule: str, study_uid: str, series_uid: str | None, handler: str, generation: int) -> str:
    raw = json.dumps([rule, study_uid, series_uid or "", handler, generation])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def series_facts(row) -> SeriesFacts:
    """Rule facts of a series from its index row (its first instance's header, arrival data)."""
    header = json.loads(row["header_json"] or "{}")
    try:
        ds = Dataset.from_json(header)
    except Exception:  # noqa: BLE001 - an unrepresentable header still routes on the indexed columns
        ds = Dataset()
    for kw, col in (("Modality", "modality"), ("SeriesDescription", "description")):
        if kw not in ds and row[col]:
            setattr(ds, kw, row[col])
    return SeriesFacts.from_dataset(
        ds, instance_count=row["instances"], calling_ae=row["calling_ae"] or "", called_ae=row["called_ae"] or "",
        source_ip=row["source_ip"] or "", arrived_at=datetime.fromtimestamp(row["first_at"], timezone.utc),
        study_uid=row["study_uid"], series_uid=row["series_uid"],
    )


class Router:
    def __init__(self, settings: Settings, index: Index, rules: Callable[[], object],
                 on_jobs: Callable[[], None], on_deliveries: Callable[[], None],
                 audit: AuditTrail = NULL_AUDIT, on_priors: Callable[[int, dict], None] | None = None) -> None:
        self.settings = settings
        self.audit = audit
        self.index = index
        self.rules = rules  # returns the active RuleSet (hot-reloaded by the rules service)
        self.on_jobs = on_jobs
        self.on_deliveries = on_deliveries
        self.on_priors = on_priors  # parks a job whose rule asks for priors (node/pacs/priors.py)
        self.models = ModelRegistry.for_data_dir(settings.data_dir)
        self.projects = ProjectStore.for_data_dir(settings.data_dir)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stability-router", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():  # a start that failed early never started it
            self._thread.join(timeout=10)

    def _run(self) -> None:
        # The check is a query on an indexed column, at least once a second: cheap, and it needs no
        # in-memory timers that a restart would forget. Between checks the router sleeps until the
        # next study's quiet period ends (or a slower rule's re-check is due) when that comes
        # sooner: a study's jobs are created when it becomes complete, not up to a pass later
        # (half a pass on average, 0.25 s of the 5 s a study's first result may take).
        while not self._stop.wait(self._until_next()):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - keep routing; the index keeps the state
                log.exception("stability/routing pass failed")

    def _until_next(self) -> float:
        most = min(1.0, self.settings.stable_after / 4)
        try:
            at = self.index.next_routing_at(self.quiet_period())
        except Exception:  # noqa: BLE001 - a failed look-ahead only means the usual pass
            log.exception("next routing time not known")
            return most
        # A due time already past (a pass that failed) is retried at a modest pace, not in a spin.
        return most if at is None else min(most, max(0.05, at - time.time() + 0.005))

    def quiet_period(self) -> float:
        """The shortest quiet period any rule asks for: a study is complete for routing after it."""
        overrides = [r.action.stable_after for r in self.rules().rules if r.enabled and r.action.stable_after]
        return min([self.settings.stable_after, *overrides])

    def run_once(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        for st in self.index.due_studies(now, self.quiet_period()):
            if self.index.mark_stable(st["study_uid"], st["generation"], now):
                log.info("study complete (%d instances)", st["instances"], extra={"study_uid": st["study_uid"]})
                self.audit.study_received(st["study_uid"], st["instances"], self.index.series_of_study(st["study_uid"]))
        created = 0
        for st in self.index.unrouted_studies(now):
            created += self.route_study(st, now)
        return created

    def _select_for_projects(self, facts: StudyFacts) -> None:
        """A complete study becomes a case of every project whose select condition it matches (before
        its jobs run, so the project's model job finds it a case). A broken project never stops routing."""
        try:
            for name in self.projects.select_study(facts):
                log.info("study selected as a case of project %s", name, extra={"study_uid": facts.study_uid})
        except Exception:  # noqa: BLE001 - a project is the loop's business; routing goes on
            log.exception("project selection failed", extra={"study_uid": facts.study_uid})

    def route_study(self, st, now: float | None = None) -> int:
        """Create the jobs of every rule whose quiet period has passed (all of them when forced);
        rules that wait longer are looked at again when theirs has passed."""
        now = time.time() if now is None else now
        quiet = now - st["last_at"]
        study_uid, gen = st["study_uid"], st["generation"]
        context = prior_context(self.index, study_uid)
        if context == PRIORS_ARRIVING:  # attributed when the retrieve ends: look again shortly
            self.index.recheck_later(study_uid, now + min(1.0, self.settings.stable_after))
            return 0
        ruleset = self.rules()
        series_rows = self.index.series_of_study(study_uid)
        note = "study complete" if gen == 0 else f"re-run: instances arrived after processing (generation {gen})"
        created = 0
        facts = {}
        for row in series_rows:
            facts[row["series_uid"]] = series_facts(row)
            if self.settings.store_originals_in_orthanc:
                self.index.add_original_deliveries(study_uid, row["series_uid"], ["orthanc"])
        if context is not None:  # a prior: stored for the reader like any study, but no rule runs on it
            log.info("study %s", context, extra={"study_uid": study_uid})
            self.index.mark_routed(study_uid, gen, context)
            self.on_deliveries()
            return 0
        actions = []
        for row in series_rows:
            for a in ruleset.match_series(facts[row["series_uid"]]):
                actions.append((a, row["series_uid"]))
        study_facts = StudyFacts(series=list(facts.values()), study_uid=study_uid)
        for a in ruleset.match_study(study_facts):
            actions.append((a, None))
        self._select_for_projects(study_facts)
        waiting: list[float] = []
        pending: list[dict] = []  # what the study view lists as "will run at"
        for a, series_uid in actions:
            wait = (a.stable_after or self.settings.stable_after) - quiet
            if wait > 0 and not st["force_complete"]:
                waiting.append(wait)
                pending.append({"rule": a.rule, "handler": a.handler, "series_uid": series_uid,
                                "stable_after": a.stable_after or self.settings.stable_after})
                continue
            if a.forward_originals:
                for dest in a.destinations:
                    if dest == "orthanc" and self.settings.store_originals_in_orthanc:
                        continue
                    for row in series_rows:
                        if (series_uid is None or row["series_uid"] == series_uid) and \
                                self.settings.takes(dest, row["modality"]):
                            self.index.add_original_deliveries(study_uid, row["series_uid"], [dest])
            if a.handler is None:
                continue
            key = job_key(a.rule, study_uid, series_uid, a.handler, gen)
            options = {"on_quality_failure": a.on_quality_failure}
            # Shadow versions of a model run on the same input, pinned, with nowhere to deliver to.
            shadows = shadow_job_options(self.models, a.handler, options, key)
            if shadows:
                options["keep_labels"] = True
            # Shadow runs are evidence, not care: they queue behind clinical work (offpeak).
            jobs = [(key, options, list(a.destinations), note, a.priority)] + [
                (job_key(f"{a.rule}#shadow:{v}", study_uid, series_uid, a.handler, gen), opts, [],
                 f"{note}; shadow run of {a.handler} version {v} (results kept on the node, never delivered)",
                 "offpeak")
                for v, opts in shadows]
            for k, opts, dests, why, priority in jobs:
                # One transaction with the hold: a job waiting for priors is never claimed before it waits.
                with self.index.tx(immediate=True):
                    jid = self.index.add_job(
                        job_key=k, study_uid=study_uid, series_uid=series_uid, level=a.level, rule=a.rule,
                        handler=a.handler, params=dict(a.params), destinations=dests, priority=priority,
                        timeout_s=a.timeout, generation=gen, note=why, options=opts,
                    )
                    if jid is not None and a.priors and self.on_priors is not None:
                        self.on_priors(jid, a.priors)
                if jid is not None:
                    created += 1
                    log.info("job %d: rule %s → %s", jid, a.rule, a.handler, extra={"study_uid": study_uid})
        if waiting:
            self.index.recheck_later(study_uid, now + min(waiting), pending)
        else:
            self.index.mark_routed(study_uid, gen)
        if created:
            self.on_jobs()
        self.on_deliveries()
        return created
