"""Runs ``kind: pull`` rules (node/rules/pull.py) on their schedules.

One thread, driven by the next-run times persisted in the index (``pull_state``): nothing is
held only in memory, so a restart neither skips nor doubles a run. A run queries the source at
study level, filters series with the rule's condition, and queues durable retrieves (the
Retriever does the transfer). ``pull_seen`` remembers each study a rule has looked at and its
instance count: a study is retrieved once, retrieved again when its count changed on the PACS (a
study still being acquired; the ingest's dedupe stores only the new instances), and counts as
stable once two looks agree; unstable studies hold the high-water mark back. In watch mode the rule's
high-water mark (a StudyDate) narrows each poll to what is new.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from node.audit import NULL_AUDIT, AuditTrail
from node.config import Settings
from node.pacs.audit import query_audit
from node.pacs.model import PacsError, StudyMatch, StudyQuery, answered_date
from node.pacs.sources import source_client
from node.rules.facts import SeriesFacts
from node.rules.pull import PullRule, read_cohort
from node.store.retrieves import RetrieveStore

log = logging.getLogger("hilum.pacs")

RULE_CHECK_S = 5.0  # a new or edited pull rule is scheduled within this time
RULE_ERROR_RETRY_S = 300.0  # a rule whose scheduling failed is tried again after this


class PullScheduler:
    def __init__(self, settings: Settings, rules: Callable, store: RetrieveStore, *, on_queued: Callable[[], None],
                 audit: AuditTrail = NULL_AUDIT) -> None:
        self.settings, self.rules, self.store, self.audit = settings, rules, store, audit
        self.on_queued = on_queued
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="pull-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            nearest = now + RULE_CHECK_S
            try:
                rules = self.rules().pull_rules
            except Exception:  # noqa: BLE001 - the thread must outlive a bad reload; it retries shortly
                log.exception("pull scheduler: cannot read the pull rules")
                rules = []
            for rule in rules:
                # One rule that fails to schedule (a bad value, a store error) must not end this thread:
                # it runs every pull rule, and its death is silent. Log it, record it, go on.
                try:
                    state = self.store.ensure_pull_state(rule.name, first_run(rule, now))
                    if state["next_at"] <= now:
                        self.run(rule)
                        state = self.store.pull_state(rule.name)
                    nearest = min(nearest, state["next_at"])
                except Exception as exc:  # noqa: BLE001
                    log.exception("pull rule %s: scheduling failed; retried in %.0f s", rule.name, RULE_ERROR_RETRY_S)
                    self._record_failure(rule, exc, now)
                if self._stop.is_set():
                    return
            self._wake.wait(max(0.05, nearest - time.time()))
            self._wake.clear()

    def _record_failure(self, rule: PullRule, exc: Exception, now: float) -> None:
        """The error goes where a run's errors go (pull_state.last_error, shown with the rule's
        status), and the next try is pushed back so a rule that always fails does not spin."""
        try:
            self.store.ensure_pull_state(rule.name, now + RULE_ERROR_RETRY_S)
            self.store.pull_ran(rule.name, next_at=now + RULE_ERROR_RETRY_S, result={},
                                error=f"scheduling failed: {type(exc).__name__}: {exc}", high_water=None)
        except Exception:  # noqa: BLE001 - the store itself is failing: the log line above must do
            log.exception("pull rule %s: cannot record the failure", rule.name)

    # -- one run -----------------------------------------------------------------------------
    def run(self, rule: PullRule) -> dict:
        """Query, filter, queue; the outcome is persisted with the next run time."""
        spec, now = rule.spec, dt.datetime.now()
        who = f"rule:{rule.name}"
        state = self.store.pull_state(rule.name)
        result = {"matches": 0, "queued": 0, "rechecked": 0, "stable": 0, "skipped_series": 0, "left": 0,
                  "malformed": 0}
        error, high_water, client = None, None, None
        notes: list[str] = []  # the run's own warnings (the client's are its queries')
        try:
            client = source_client(self.settings, spec.source)
            matches: dict[str, StudyMatch] = {}
            key = cohort_key(rule)
            for q in rule_queries(rule, poll_date(rule, now, state), self.settings.rules_dir):
                n0 = len(client.warnings)
                try:
                    found, bad = client.find_studies(q)
                except PacsError as exc:
                    query_audit(self.audit, who=who, source=spec.source, keys=q.keys(), matches=0, error=str(exc))
                    raise
                query_audit(self.audit, who=who, source=spec.source, keys=q.keys(), matches=len(found),
                            warnings=client.warnings[n0:])
                result["malformed"] += bad
                if key is not None:
                    found = _exact(found, key, getattr(q, key), notes)
                matches.update({m.study_uid: m for m in found})
            result["matches"] = len(matches)
            ordered = sorted(matches.values(),
                             key=lambda m: (answered_date(m.study_date) or "", m.study_time, m.study_uid))
            left_from = self._queue(rule, client, ordered, result, notes)
            # A query cut short (an archive ignoring QIDO-RS paging, too many matches) may have left
            # out studies of any date: the high-water mark stays where it was, so none is skipped.
            # So does a run whose leftovers are all without a StudyDate (HOLD).
            if spec.watch and not client.warnings and left_from is not HOLD:
                high_water = self._high_water(rule, now, left_from, matches)
        except (PacsError, OSError, ValueError, KeyError) as exc:
            error = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
            log.warning("pull rule %s: %s", rule.name, error)
        warnings = (client.warnings if client is not None else []) + notes
        if warnings:  # results kept, but perhaps not all of them: say so
            result["warnings"] = warnings[:20]
            log.warning("pull rule %s: %s", rule.name, "; ".join(warnings[:3]))
        next_at = spec.schedule.next_run(now).timestamp()
        self.store.pull_ran(rule.name, next_at=next_at, result=result, error=error, high_water=high_water)
        if result["queued"] or result["rechecked"]:
            self.on_queued()
        return result | {"error": error}

    def _queue(self, rule: PullRule, client, ordered: list[StudyMatch], result: dict, notes: list[str]) -> str | None:
        """Queue what is new or still growing; returns the earliest StudyDate of the studies left for a
        later run (None: none left; ``HOLD``: only undated ones left, the high-water mark must stay)."""
        spec, who = rule.spec, f"rule:{rule.name}"
        hour_used = self.store.expected_since(who, time.time() - 3600)
        failed: list[StudyMatch] = []  # not queued by an error of their own: left for a later run
        for i, m in enumerate(ordered):
            seen = self.store.seen(rule.name, m.study_uid)
            if seen is not None and (m.instances is None or seen["instances"] == m.instances):
                if not seen["stable"]:  # two looks agree: stable (a later change is still noticed)
                    self.store.mark_seen(rule.name, m.study_uid, m.instances, stable=True, retrieved=False)
                    result["stable"] += 1
                continue
            per_hour = spec.limits.instances_per_hour
            # A study larger than the hourly limit itself goes alone, in an hour with nothing else
            # queued: held back, it would never be retrieved.
            if result["queued"] + result["rechecked"] >= spec.limits.studies_per_run or \
                    (per_hour is not None and hour_used > 0 and hour_used + (m.instances or 0) > per_hour):
                result["left"] = sum(1 for x in ordered[i:] if self._changed(rule.name, x))
                return _left_from(rule, ordered[i:] + failed, notes)
            try:
                queued, expected = self._queue_one(rule, client, m, result)
            except PacsError:
                raise  # the source failed: the run ends with its error, as it always did
            except Exception as exc:  # noqa: BLE001 - one study's bad value must not hold back the rule's others
                log.exception("pull rule %s: study %s not queued", rule.name, m.study_uid)
                notes.append(f"study {m.study_uid} not queued: {type(exc).__name__}: {exc}")
                failed.append(m)
                continue
            if not queued:
                continue
            hour_used += expected or 0
            result["rechecked" if seen is not None else "queued"] += 1
        return _left_from(rule, failed, notes)

    def _queue_one(self, rule: PullRule, client, m: StudyMatch, result: dict) -> tuple[bool, int | None]:
        """Queue one study (its series that pass the filter): (False, None) when no series passed,
        else (True, the instances it expects or None when not known)."""
        series = None
        if rule.series_filter is not None:
            answers, bad = client.find_series(m.study_uid)
            result["malformed"] += bad
            chosen = [s for s in answers if rule.series_filter.test(_facts(s))]
            result["skipped_series"] += len(answers) - len(chosen)
            if not chosen:
                self.store.mark_seen(rule.name, m.study_uid, m.instances, stable=True, retrieved=False)
                return False, None
            series = [s.series_uid for s in chosen]
            expected = sum(s.instances or 0 for s in chosen) or None
        else:
            expected = m.instances
        self.store.add(rule.spec.source, m.study_uid, series, f"rule:{rule.name}", expected)
        self.store.mark_seen(rule.name, m.study_uid, m.instances, stable=False, retrieved=True)
        return True, expected

    def _changed(self, rule: str, m: StudyMatch) -> bool:
        seen = self.store.seen(rule, m.study_uid)
        return seen is None or (m.instances is not None and seen["instances"] != m.instances)

    def _high_water(self, rule: PullRule, now: dt.datetime, left_from: str | None,
                    matches: dict[str, StudyMatch]) -> str:
        """Where the next poll starts: yesterday (studies arrive late on the PACS; ``pull_seen`` keeps
        the overlap from repeating anything), or earlier for studies left over or still growing."""
        marks = [(now - dt.timedelta(days=1)).strftime("%Y%m%d")]
        if left_from:
            marks.append(left_from)
        growing = set(self.store.unstable_dates(rule.name))
        # Only real dates: a malformed one ("2023/01/05") compared as a string would move the mark anywhere.
        marks += [d for uid, m in matches.items() if uid in growing and (d := answered_date(m.study_date))]
        return min(marks)


HOLD = "hold"  # _queue: the high-water mark stays where it was


def _left_from(rule: PullRule, left: list[StudyMatch], notes: list[str]) -> str | None:
    """The earliest StudyDate of the studies ``left`` for a later run. Studies without a StudyDate sort
    first: one of them must not move the mark to yesterday past the dated ones left behind it (which a
    narrowed poll would then never see again). With only undated ones left the mark stays (``HOLD``);
    either way a warning names them, as a date-narrowed poll may not find them again."""
    # A StudyDate that is no date counts as none: as a string it could sort before every real one.
    dated = [d for m in left if (d := answered_date(m.study_date))]
    undated = [m.study_uid + (f" (StudyDate {m.study_date!r} is not a date)" if m.study_date else "")
               for m in left if not answered_date(m.study_date)]
    if undated and rule.spec.watch:
        mark = f"held at {min(dated)}" if dated else "kept where it was"
        notes.append(f"{len(undated)} study(ies) left for a later run have no StudyDate "
                     f"({', '.join(undated[:5])}{', ...' if len(undated) > 5 else ''}): the high-water mark is "
                     f"{mark}; a poll narrowed by date may not find them again")
    if dated:
        return min(dated)
    return HOLD if undated else None


def poll_date(rule: PullRule, now: dt.datetime, state) -> str:
    """The StudyDate constraint of a poll at ``now``: the rule's, narrowed to the persisted high-water
    mark in watch mode (``state``: the rule's pull_state row, or None before its first run)."""
    date = rule.spec.query.study_date(now)
    if rule.spec.watch and state is not None and state["high_water"]:
        date = _narrow(date, state["high_water"])
    return date


def rule_queries(rule: PullRule, date: str, rules_dir: Path) -> list[StudyQuery]:
    """The study-level C-FIND / QIDO queries of one poll: one, or one per cohort value."""
    q = rule.spec.query
    base = StudyQuery(patient_id=q.PatientID, accession=q.AccessionNumber, modality=q.ModalitiesInStudy,
                      study_date=date, study_description=q.StudyDescription)
    if q.csv is None:
        return [base]
    try:
        values = read_cohort(q.csv, rules_dir)
    except ValueError as exc:  # changed on disk since the rule was loaded
        raise ValueError(f"pull rule {rule.name}: cohort {exc}") from exc
    return [StudyQuery(**{**base.__dict__, cohort_key(rule): v}) for v in values]


def cohort_key(rule: PullRule) -> str | None:
    """The StudyQuery field a cohort rule's values go in (None: no cohort)."""
    c = rule.spec.query.csv
    return None if c is None else "patient_id" if c.column == "PatientID" else "accession"


def _exact(found: list[StudyMatch], key: str, value: str, notes: list[str]) -> list[StudyMatch]:
    """The answers to one cohort value that carry exactly that value. A PACS matching loosely (case
    folded, ignoring the key, a prefix) would otherwise pull other patients' studies into a research
    cohort; the rest are left out with a warning naming their count."""
    keep = [m for m in found if getattr(m, key) == value]
    if other := [m.study_uid for m in found if getattr(m, key) != value]:
        field = "PatientID" if key == "patient_id" else "AccessionNumber"
        notes.append(f"cohort {field} {value!r}: the source answered {len(other)} stud"
                     f"{'y' if len(other) == 1 else 'ies'} with another {field}, left out: "
                     f"{', '.join(other[:5])}{' ...' if len(other) > 5 else ''}")
    return keep


def first_run(rule: PullRule, now: float) -> float:
    """When a rule never run before first runs: now, or its window's next opening."""
    sched = rule.spec.schedule
    t = dt.datetime.fromtimestamp(now)
    return now if sched.open_now(t) else sched.next_run(t - dt.timedelta(seconds=sched.every)).timestamp()


def _narrow(date: str, high_water: str) -> str:
    """The rule's StudyDate constraint with its lower end raised to the high-water mark."""
    lo, sep, hi = date.partition("-")
    if not sep and lo:  # a single date
        return date if lo >= high_water else f"{high_water}-{lo}"
    return f"{max(lo, high_water)}-{hi}"


def _facts(s) -> SeriesFacts:
    return SeriesFacts.from_dataset(s.answer, instance_count=s.instances or 0, calling_ae="", called_ae="",
                                    source_ip="", arrived_at=dt.datetime.now(), study_uid=s.study_uid,
                                    series_uid=s.series_uid)
