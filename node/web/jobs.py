"""/api/jobs: the job queue, and admin retries (of a failed job, or of its failed deliveries)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from node.web.auth import Principal, require_admin, require_viewer, who
from node.web.views import job_view

router = APIRouter(prefix="/api/jobs", tags=["jobs"])
STATUSES = ("pending", "running", "done", "failed", "retrying")


@router.get("")
def list_jobs(request: Request, status: str | None = Query(None), limit: int = Query(200, ge=1, le=1000),
              _: Principal = Depends(require_viewer)) -> dict:
    if status is not None and status not in STATUSES:
        raise HTTPException(422, f"status must be one of {', '.join(STATUSES)}")
    index = request.app.state.node.index
    return {"jobs": [job_view(index, j) for j in index.jobs(status=status, limit=limit)]}


@router.post("/{job_id}/retry")
def retry(job_id: int, request: Request, p: Principal = Depends(require_admin)) -> dict:
    node = request.app.state.node
    try:
        return node.retry_job(job_id, who=who(p))
    except KeyError as exc:
        raise HTTPException(404, str(exc.args[0])) from None
