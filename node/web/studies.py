"""/api/studies: what arrived, whether it is complete, its jobs and where their results went.

The study JSON shape (study_uid, instances_received, stable, jobs[...results[...deliveries]])
is a contract other tools rely on: extend it, never change it.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from node.web.auth import Principal, require_admin, require_viewer
from node.web.views import job_view, series_views, study_summary

router = APIRouter(prefix="/api/studies", tags=["studies"])


@router.get("")
def list_studies(request: Request, limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0),
                 _: Principal = Depends(require_viewer)) -> dict:
    index = request.app.state.node.index
    return {"total": index.count_studies(), "limit": limit, "offset": offset,
            "studies": [study_summary(r) for r in index.studies(limit, offset)]}


@router.get("/{study_uid}")
def get_study(study_uid: str, request: Request, _: Principal = Depends(require_viewer)) -> dict:
    node = request.app.state.node
    # An instance's row follows its C-STORE response by milliseconds (node/receive/ingest.py): a
    # script that asks as soon as its sender returns sees every instance the node acknowledged.
    node.ingest.writer.caught_up(timeout=2.0)
    index = node.index
    row = index.study(study_uid)
    if row is None:
        raise HTTPException(404, f"study {study_uid} not found")
    out = study_summary(row)
    out["series"] = series_views(index, study_uid)
    out["jobs"] = [job_view(index, j) for j in reversed(index.jobs(study_uid=study_uid, limit=1000))]
    return out


@router.post("/{study_uid}/complete")
def force_complete(study_uid: str, request: Request, _: Principal = Depends(require_admin)) -> dict:
    node = request.app.state.node
    # The instances acknowledged before the admin's word belong to what is completed: a row committed
    # after it would reopen the study (a late instance) and undo the completion.
    node.ingest.writer.caught_up(timeout=10.0)
    if not node.index.force_complete(study_uid):
        raise HTTPException(404, f"study {study_uid} not found")
    return {"study_uid": study_uid, "force_complete": True}
