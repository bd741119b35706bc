"""Audit entries for PACS queries and retrieves: who or which rule asked, the keys, the counts."""
from __future__ import annotations

from node.audit import AuditTrail
from node.audit import vocabulary as v

QUERY = ("110112", "DCM", "Query")  # PS3.15 A.5.3.x, CID 400


def query_audit(audit: AuditTrail, *, who: str, source: str, keys: dict, matches: int,
                error: str | None = None, warnings: list[str] | None = None) -> dict:
    detail = {"keys": keys, "matches": matches} | ({"warnings": warnings[-5:]} if warnings else {})
    return audit.record("pacs-query", QUERY, action=v.EXECUTE, outcome=v.SUCCESS if error is None else
                        v.SERIOUS_FAILURE, outcome_description=error[:500] if error else None, user=who,
                        user_is_requestor=True, destination=source, detail=detail)


def retrieve_audit(audit: AuditTrail, row, *, outcome: str, error: str | None = None, counts=None,
                   held: int | None = None) -> dict:
    ok = outcome == "done"
    detail = {"retrieve": row["id"], "source": row["source"], "outcome": outcome, "series": row["series_json"]}
    if counts is not None:
        detail.update(completed=counts.completed, failed=counts.failed, warning=counts.warning)
    return audit.record("pacs-retrieve", v.INSTANCES_TRANSFERRED, action=v.CREATE,
                        outcome=v.SUCCESS if ok else v.MINOR_FAILURE if outcome in ("partial", "cancelled")
                        else v.SERIOUS_FAILURE, outcome_description=error[:500] if error else None,
                        user=row["requested_by"], user_is_requestor=True, destination=row["source"],
                        study_uid=row["study_uid"], objects=held, detail=detail)
