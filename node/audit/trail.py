"""What the node records, in the audit vocabulary: one method per kind of event.

The spine's stages get an ``AuditTrail`` through their constructors (``Node`` wires one in) and
record with one call each. ``NullAudit`` is the default of those constructors, so a stage built
alone (tests, tools) records nothing instead of needing a log.

Field names follow the DICOM audit message (PS3.15 A.5) flattened: ``event_id``/``event_type``
codes, ``action`` (C/R/U/D/E), ``outcome`` (0/4/8/12), the active participant (``user``,
``user_is_requestor``, ``source_ip`` = network access point, ``peer_ae``, ``tls_identity``),
the participant objects (``study_uid``, ``objects`` = instance count), ``destination`` for
transfers, and ``detail`` for the rest.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

from node.audit import vocabulary as v
from node.audit.chain import ChainedLog, utc_stamp

log = logging.getLogger("hilum.audit")


class AuditTrail:
    def __init__(self, log_: ChainedLog, source: str) -> None:
        self.log = log_
        self.source = source  # Audit Source ID: the node's AE title
        self.write_failures = 0

    def record(self, event: str, event_id: tuple[str, str, str], *, action: str, outcome: int = v.SUCCESS,
               event_type: tuple[str, str, str] | None = None, **fields: Any) -> dict:
        """Append one entry; ``fields`` with value None are left out. Returns the entry written."""
        entry = {"time": utc_stamp(), "source": self.source, "event": event, "event_id": v.code(event_id),
                 "action": action, "outcome": outcome}
        if event_type is not None:
            entry["event_type"] = v.code(event_type)
        entry.update({k: val for k, val in fields.items() if val is not None})
        try:
            return self.log.append(entry)
        except OSError as exc:
            # Failing open: an unwritable audit log must not stop reception, but it must be loud.
            self.write_failures += 1
            log.error("AUDIT WRITE FAILED (%s): %s event lost", exc, event)
            return {}

    # -- the node ------------------------------------------------------------------------------
    def node_started(self, version: str) -> dict:
        return self.record("node-start", v.APPLICATION_ACTIVITY, action=v.EXECUTE, event_type=v.APPLICATION_START,
                           user=self.source, detail={"version": version})

    def node_stopped(self) -> dict:
        return self.record("node-stop", v.APPLICATION_ACTIVITY, action=v.EXECUTE, event_type=v.APPLICATION_STOP,
                           user=self.source)

    # -- DICOM ---------------------------------------------------------------------------------
    def association(self, *, calling_ae: str, called_ae: str, source_ip: str, accepted: bool,
                    reason: str | None = None, tls_identity: str | None = None, tls: bool = False) -> dict:
        return self.record("association", v.SECURITY_ALERT, action=v.EXECUTE, event_type=v.NODE_AUTHENTICATION,
                           outcome=v.SUCCESS if accepted else v.MINOR_FAILURE, outcome_description=reason,
                           user=calling_ae.strip(), user_is_requestor=True, source_ip=source_ip,
                           peer_ae=calling_ae.strip(), detail={"called_ae": called_ae.strip(), "tls": tls,
                                                              "accepted": accepted},
                           tls_identity=tls_identity)

    def study_received(self, study_uid: str, instances: int, series_rows: Iterable) -> dict:
        """One entry per complete study: who sent it (calling AEs, addresses) and how many instances."""
        rows = list(series_rows)
        senders = sorted({(r["calling_ae"] or "", r["source_ip"] or "") for r in rows})
        return self.record("study-received", v.INSTANCES_TRANSFERRED, action=v.CREATE,
                           user=",".join(sorted({ae for ae, _ in senders})) or None, user_is_requestor=True,
                           source_ip=",".join(sorted({ip for _, ip in senders})) or None,
                           study_uid=study_uid, objects=instances, detail={"series": len(rows)})

    def job_finished(self, job) -> dict:
        """A handler run over a study (it reads the instances): done or failed, with the reason."""
        if job is None or job["status"] not in ("done", "failed"):
            return {}
        failed = job["status"] == "failed"
        return self.record("job", v.INSTANCES_ACCESSED, action=v.READ,
                           outcome=v.SERIOUS_FAILURE if failed else v.SUCCESS,
                           outcome_description=(job["error"] or "").splitlines()[0][:500] if failed else None,
                           user=f"handler:{job['handler']}", user_is_requestor=False, study_uid=job["study_uid"],
                           detail={"job": job["id"], "rule": job["rule"], "handler": job["handler"],
                                   "series_uid": job["series_uid"]})

    def delivery(self, destination: str, rows: Iterable, *, error: str | None = None,
                 deidentified: bool = False) -> list[dict]:
        """Instances sent (or not) to a destination: one entry per study, what and to whom."""
        by_study: dict[str, dict[str, int]] = {}
        for r in rows:
            kinds = by_study.setdefault(r["study_uid"], {})
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        return [self.record("delivery", v.EXPORT if deidentified else v.INSTANCES_TRANSFERRED, action=v.READ,
                            outcome=v.SUCCESS if error is None else v.SERIOUS_FAILURE,
                            outcome_description=error[:500] if error else None, user=self.source,
                            user_is_requestor=True, destination=destination, study_uid=study,
                            objects=sum(kinds.values()), detail={"kinds": kinds, "deidentified": deidentified})
                for study, kinds in by_study.items()]

    def spool_purged(self, kind: str, by_study: dict[str, int], detail: dict) -> list[dict]:
        """Spooled copies deleted by retention (the archive keeps its own): one entry per study."""
        return [self.record("retention-purge", v.INSTANCES_ACCESSED, action=v.DELETE, user=self.source,
                            user_is_requestor=False, study_uid=study, objects=n, detail={"kind": kind, **detail})
                for study, n in sorted(by_study.items())]

    def spool_keys(self, by: str, what: str, detail: dict) -> dict:
        """Spool encryption keys: rotation requested, rewrap done, key retired (never key material)."""
        return self.record("spool-keys", v.SECURITY_ALERT, action=v.UPDATE, event_type=v.SOFTWARE_CONFIGURATION,
                           user=by, detail={"what": what, **detail})

    # -- people and configuration --------------------------------------------------------------
    def rules_changed(self, author: str, message: str, *, before: dict | None, after: dict) -> dict:
        """A new rules version: before/after as {version, digest}, the change's message."""
        return self.record("rules-change", v.SECURITY_ALERT, action=v.UPDATE, event_type=v.SOFTWARE_CONFIGURATION,
                           user=author, detail={"message": message, "before": before, "after": after})

    def model_changed(self, by: str, model: str, version: str, *, before: str | None, after: str,
                      detail: dict | None = None) -> dict:
        """A model version registered (before None), promoted, put in shadow mode or retired."""
        return self.record("model-change", v.SECURITY_ALERT, action=v.CREATE if before is None else v.UPDATE,
                           event_type=v.SOFTWARE_CONFIGURATION, user=by,
                           detail={"model": model, "version": version, "before": before, "after": after,
                                   **(detail or {})})

    def token_created(self, role: str, label: str | None, by: str) -> dict:
        return self.record("token-created", v.SECURITY_ALERT, action=v.CREATE,
                           event_type=v.USER_SECURITY_ATTRIBUTES_CHANGED, user=by,
                           detail={"role": role, "label": label})

    def login(self, user: str, source_ip: str | None, ok: bool, reason: str | None = None) -> dict:
        return self.record("login", v.USER_AUTHENTICATION, action=v.EXECUTE, event_type=v.LOGIN,
                           outcome=v.SUCCESS if ok else v.MINOR_FAILURE, outcome_description=reason,
                           user=user, user_is_requestor=True, source_ip=source_ip)

    def user_changed(self, by: str, user: str, *, before: dict | None, after: dict | None) -> dict:
        """A console user created (before None), changed, or removed (after None); never a password."""
        action = v.CREATE if before is None else v.DELETE if after is None else v.UPDATE
        return self.record("user-change", v.SECURITY_ALERT, action=action,
                           event_type=v.USER_SECURITY_ATTRIBUTES_CHANGED, user=by,
                           detail={"account": user, "before": before, "after": after})

    def archive_access(self, user: str, source_ip: str | None, study_uid: str | None, what: str,
                       objects: int | None = None) -> dict:
        """A read through the node's gateway (DICOMweb, viewer): who, which study, what was asked."""
        return self.record("archive-access", v.INSTANCES_ACCESSED, action=v.READ, user=user, user_is_requestor=True,
                           source_ip=source_ip, study_uid=study_uid, objects=objects, detail={"request": what})

    def worker_access(self, user: str, source_ip: str | None, *, job_id: int | None, study_uid: str | None,
                      what: str, ok: bool, reason: str | None = None, objects: int | None = None) -> dict:
        """A remote job worker reading a job's inputs or priors or storing its results, or refused (401/403)."""
        return self.record("worker-access", v.INSTANCES_ACCESSED if ok else v.SECURITY_ALERT,
                           action=v.READ if what in ("inputs", "priors") else
                           v.CREATE if what == "results" else v.EXECUTE,
                           outcome=v.SUCCESS if ok else v.MINOR_FAILURE, outcome_description=reason, user=user,
                           user_is_requestor=True, source_ip=source_ip, study_uid=study_uid, objects=objects,
                           event_type=None if ok else v.NODE_AUTHENTICATION, detail={"job": job_id, "request": what})

    def project_access(self, user: str, source_ip: str | None, *, project: str | None, what: str, ok: bool,
                       reason: str | None = None) -> dict:
        """A learning-loop project seen, annotated or trained, or refused (403) to a user without that role in it."""
        return self.record("project-access", v.INSTANCES_ACCESSED if ok else v.SECURITY_ALERT,
                           action=v.READ if what == "view" else v.UPDATE, user=user, user_is_requestor=True,
                           outcome=v.SUCCESS if ok else v.MINOR_FAILURE, outcome_description=reason,
                           source_ip=source_ip, detail={"project": project, "request": what})

    def audit_log_used(self, user: str, query: dict) -> dict:
        return self.record("audit-read", v.AUDIT_LOG_USED, action=v.READ, user=user, user_is_requestor=True,
                           detail={"query": query})


class NullAudit(AuditTrail):
    """Records nothing: the default for a stage constructed without the node's audit trail."""

    def __init__(self) -> None:
        self.source = ""
        self.write_failures = 0

    def record(self, event, event_id, *, action, outcome=v.SUCCESS, event_type=None, **fields) -> dict:
        return {}


NULL_AUDIT = NullAudit()
