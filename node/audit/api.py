"""``GET /api/audit``: admins search the audit trail (by user, study, event, time). Reading the
trail is itself recorded (Audit Log Used). Include with ``app.include_router(audit.api.router)``."""
from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Query, Request

from node.audit.query import search
from node.web.auth import Principal, require_admin, who

router = APIRouter()


@router.get("/api/audit")
def audit_search(request: Request, p: Principal = Depends(require_admin), user: str | None = None,
                 study: str | None = None, event: str | None = None, since: datetime | None = None,
                 until: datetime | None = None, limit: int = Query(200, ge=1, le=5000)) -> dict:
    trail = request.app.state.node.audit
    found = search(trail.log.entries(), user=user, study_uid=study, event=event, since=since, until=until,
                   limit=limit)
    query = {k: (v.isoformat() if isinstance(v, datetime) else v)
             for k, v in (("user", user), ("study", study), ("event", event), ("since", since), ("until", until))
             if v is not None}
    trail.audit_log_used(who(p), {"api": query, "results": len(found)})
    return {"entries": found, "count": len(found)}
