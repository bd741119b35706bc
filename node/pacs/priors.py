"""Priors for a job: the same patient's earlier studies, from the node first, then from a PACS.

A routing rule with ``priors:`` (node/rules/priors.py) creates its job in status
``waiting-for-priors`` (``hold``, inside the transaction that created it, so no worker can take
it first). This thread then looks for the patient's earlier studies — in the node's index, then
on the source (PatientID, plus IssuerOfPatientID when the current study has one) — picks the
``max`` most recent that match, queues retrieves for those the node lacks, and follows them
(the job's message shows the progress). When they end, or at the deadline, the job is released
to the executor with what arrived and a note saying what is missing (HandlerInput.priors_note).
The same PatientID from two issuers is two patients: a study whose issuer differs from the current
study's (both known) is not a prior, whether the node holds it or a PACS that ignored the issuer key
answered it, and the note names it.
Everything is in the index (``prior_waits``): a restart resumes the wait.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from typing import Callable

from pydicom import Dataset

from node.audit import NULL_AUDIT, AuditTrail
from node.config import Settings
from node.pacs.audit import query_audit
from node.pacs.model import PacsError, StudyQuery, answered_date
from node.pacs.sources import source_client
from node.rules.priors import PriorsSpec
from node.store.index import Index
from node.store.retrieves import TERMINAL, RetrieveStore

log = logging.getLogger("hilum.pacs")


class PriorsCoordinator:
    def __init__(self, settings: Settings, index: Index, store: RetrieveStore, *, on_retrieves: Callable[[], None],
                 on_released: Callable[[], None], audit: AuditTrail = NULL_AUDIT) -> None:
        self.settings, self.index, self.store, self.audit = settings, index, store, audit
        self.on_retrieves, self.on_released = on_retrieves, on_released
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, job_id: int, priors: dict) -> None:
        """Called by the router right after it created the job, in the same transaction."""
        wait = priors.get("wait") or self.settings.priors_wait_s
        self.store.hold_for_priors(job_id, priors, time.time() + wait)
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="priors", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for w in self.store.prior_waits():
                try:
                    self.step(w)
                except Exception as exc:  # noqa: BLE001 - never keep a job waiting because of a bug here
                    log.exception("priors for job %s", w["job_id"])
                    self.store.release_priors(w["job_id"], f"priors not available: internal error: {exc}")
                    self.on_released()
            self._wake.wait(1.0)  # retrieve progress is read from the index once a second
            self._wake.clear()

    def step(self, w) -> None:
        spec = PriorsSpec.model_validate(w["spec_json"] if isinstance(w["spec_json"], dict)
                                         else json.loads(w["spec_json"]))
        if w["state"] == "searching":
            self._search(w, spec)
            return
        chosen = json.loads(w["chosen_json"])
        rows = [self.store.get(p["retrieve"]) for p in chosen if p.get("retrieve")]
        expected = sum(r["expected"] or 0 for r in rows)
        received = sum(r["received"] or 0 for r in rows)
        if all(r["status"] in TERMINAL for r in rows):
            bad = [f"{r['study_uid']}: {r['status']} ({r['error']})" for r in rows if r["status"] != "done"]
            note = w["note"]
            if bad:
                note = "; ".join(filter(None, [note, "priors not retrieved: " + "; ".join(bad)]))
            self._release(w["job_id"], note)
        elif time.time() >= w["deadline"]:
            waited = w["deadline"] - w["created_at"]
            self._release(w["job_id"], "; ".join(filter(None, [
                w["note"], f"ran without some priors: they did not arrive within {waited:.0f} s "
                           f"({received}/{expected or '?'} instances)"])))
        else:
            self.index.job_progress(w["job_id"], 0.0, f"waiting for priors: {received}/{expected or '?'} instances")

    def _release(self, job_id: int, note: str | None) -> None:
        self.store.release_priors(job_id, note)
        log.info("job %d released with its priors%s", job_id, f" ({note})" if note else "")
        self.on_released()

    def _search(self, w, spec: PriorsSpec) -> None:
        st = self.index.study(w["study_uid"])
        if st is None or not st["patient_id"] or not st["study_date"]:
            self._release(w["job_id"], "no priors: the study has no PatientID or StudyDate to search by")
            return
        # A modality that wrote a date-time into StudyDate ("20230105120000") still dates its study.
        if (today := answered_date(st["study_date"]) or answered_date(st["study_date"][:8])) is None:
            self._release(w["job_id"], f"no priors: the study's StudyDate {st['study_date']!r} is not a date "
                                       "(YYYYMMDD) to search back from")
            return
        current = dt.datetime.strptime(today, "%Y%m%d")
        since = (current - dt.timedelta(seconds=spec.within)).strftime("%Y%m%d")
        issuer = study_issuer(self.index, w["study_uid"])
        candidates: dict[str, dict] = {}
        other_issuer: dict[str, str] = {}  # study -> why, though its PatientID is the same (the job's note)
        for row in self.store.prior_studies(st["patient_id"], today, since, w["study_uid"]):
            theirs = study_issuer(self.index, row["study_uid"])
            if issuer and theirs and theirs != issuer:
                other_issuer[row["study_uid"]] = _other_patient(row["study_uid"], "node", theirs, issuer)
            elif answered_date(row["study_date"] or "") is None:
                continue  # matched [since, today) as a string only ("2023.1.5"): its date is unknown
            elif self._node_study_matches(row["study_uid"], spec):
                candidates[row["study_uid"]] = {"study_uid": row["study_uid"],
                                                "date": answered_date(row["study_date"]), "time": "",
                                                "source": "node"}
        note = None
        if spec.source is not None:
            try:
                warnings = self._from_source(spec, st, issuer, since, current, candidates, other_issuer)
                note = "; ".join(warnings) or None  # e.g. an archive that ignores QIDO-RS paging
            except PacsError as exc:
                note = f"source {spec.source} not searched: {exc}"
        if other_issuer:
            note = "; ".join(filter(None, [note, "not taken as priors (same PatientID, another patient): "
                                           + "; ".join(other_issuer.values())]))
        best = sorted(candidates.values(), key=lambda c: (c["date"], c["time"]), reverse=True)[:spec.max]
        chosen = []
        for c in best:
            entry = {"study_uid": c["study_uid"], "source": c["source"], "series": c.get("series"),
                     "study_time": c["time"]}
            # The node may hold part of a PACS's prior (its SR, pushed earlier; a retrieve cut short): what
            # the PACS counts and the node lacks is retrieved (the ingest stores only the new instances).
            # With no count to compare, a held part is not enough either: had it matched the priors'
            # criteria, the study would have been the node's own candidate.
            held, listed = self.store.held_instances(c["study_uid"], c.get("series")), c.get("instances")
            if c["source"] != "node" and (not held or listed is None or held < listed):
                rid, _ = self.store.add(c["source"], c["study_uid"], c.get("series"), f"priors:job {w['job_id']}",
                                        c.get("instances"))
                entry["retrieve"] = rid
            chosen.append(entry)
        if not chosen:
            note = "; ".join(filter(None, [note, "no prior studies found"]))
        self.store.priors_chosen(w["job_id"], chosen, note)
        if any("retrieve" in c for c in chosen):
            self.on_retrieves()

    def _from_source(self, spec: PriorsSpec, st, issuer: str, since: str, current: dt.datetime, candidates: dict,
                     other_issuer: dict[str, str]) -> list[str]:
        """Adds the source's matching studies to ``candidates``; returns the queries' warnings."""
        client = source_client(self.settings, spec.source)
        before = (current - dt.timedelta(days=1)).strftime("%Y%m%d")
        sm = spec.study_match()
        q = StudyQuery(patient_id=st["patient_id"], issuer=issuer, study_date=f"{since}-{before}",
                       modality=sm.get("ModalitiesInStudy", ""), study_description=sm.get("StudyDescription", ""))
        matches, _bad = client.find_studies(q)
        query_audit(self.audit, who="priors", source=spec.source, keys=q.keys(), matches=len(matches))
        series_match = spec.series_match()
        modality = sm.get("ModalitiesInStudy", "").upper()
        outside: list[str] = []
        undated: list[str] = []
        for m in matches:
            if m.study_uid in candidates or m.study_uid in other_issuer or m.study_uid == st["study_uid"] \
                    or m.patient_id != st["patient_id"]:
                continue  # already in the node (taken or left out), the study itself, or someone else's
            if issuer and m.issuer and m.issuer != issuer:  # a PACS that ignored the issuer key
                other_issuer[m.study_uid] = _other_patient(m.study_uid, spec.source, m.issuer, issuer)
                continue
            # A PACS that ignored the date or modality keys answers the patient's every study: a later
            # study (or one of another modality) handed over as the most recent prior would be a wrong
            # comparison, and it would push the real priors out of ``max``.
            date = answered_date(m.study_date)
            if m.study_date and date is None:  # compared as a string, "2023.1.5" could pass the window
                undated.append(f"{m.study_uid} ({m.study_date!r})")
                continue
            if not since <= (date or "") <= before:
                outside.append(f"{m.study_uid} (dated {m.study_date or 'nothing'})")
                continue
            if modality and m.modalities and modality not in {x.upper() for x in m.modalities}:
                outside.append(f"{m.study_uid} ({'/'.join(m.modalities)}, not {modality})")
                continue
            entry = {"study_uid": m.study_uid, "date": date, "time": m.study_time, "source": spec.source,
                     "instances": m.instances}
            if series_match:
                series, _ = client.find_series(m.study_uid)
                keep = [s for s in series if all(str(s.answer.get(k, "")).upper() == v.upper()
                                                 for k, v in series_match.items())]
                if not keep:
                    continue
                entry["series"] = [s.series_uid for s in keep]
                entry["instances"] = sum(s.instances or 0 for s in keep) or None
            candidates[m.study_uid] = entry
        if outside:
            client.warnings.append(f"source {spec.source} answered {len(outside)} stud{'y' if len(outside) == 1 else 'ies'} "
                                   f"outside what was asked ({since}-{before}{', ' + modality if modality else ''}), "
                                   f"left out: {', '.join(outside[:5])}{' ...' if len(outside) > 5 else ''}")
        if undated:
            client.warnings.append(f"source {spec.source} answered {len(undated)} stud"
                                   f"{'y' if len(undated) == 1 else 'ies'} whose StudyDate is not a date (YYYYMMDD), "
                                   f"not taken as priors: {', '.join(undated[:5])}{' ...' if len(undated) > 5 else ''}")
        return client.warnings

    def _node_study_matches(self, study_uid: str, spec: PriorsSpec) -> bool:
        sm, series_match = spec.study_match(), spec.series_match()
        rows = self.index.series_of_study(study_uid)
        if "ModalitiesInStudy" in sm and not any((r["modality"] or "").upper() == sm["ModalitiesInStudy"].upper()
                                                 for r in rows):
            return False
        if not series_match:
            return True
        for r in rows:
            header = json.loads(r["header_json"] or "{}")
            ds = Dataset.from_json(header) if header else Dataset()
            if all(str(ds.get(k, "")).upper() == v.upper() for k, v in series_match.items()):
                return True
        return False


def study_issuer(index: Index, study_uid: str) -> str:
    """The study's IssuerOfPatientID (from its series' first-instance headers), or "" when none says.
    The same PatientID from two issuers is two patients: priors are matched on both when both are known."""
    for r in index.series_of_study(study_uid):
        el = json.loads(r["header_json"] or "{}").get("00100021", {})
        if el.get("Value") and str(el["Value"][0]).strip():
            return str(el["Value"][0]).strip()
    return ""


def _other_patient(study_uid: str, where: str, theirs: str, ours: str) -> str:
    return f"study {study_uid} ({where}) has IssuerOfPatientID {theirs!r}, the current study {ours!r}"
