"""/api/dashboard: everything the console's front page shows, in one request it can poll."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Query, Request

from node.projects.store import ProjectStore
from node.projects.trainrun import recent_runs
from node.web.auth import Principal, require_viewer
from node.web.views import delivery_view, job_view, series_views, study_summary
from node.web.worker_api import cluster_view

router = APIRouter(prefix="/api/dashboard", tags=["dashboard"])


@router.get("")
def dashboard(request: Request, studies: int = Query(25, ge=1, le=200), p: Principal = Depends(require_viewer)) -> dict:
    index = request.app.state.node.index
    now = time.time()
    out_studies = []
    for row in index.studies(studies, 0):
        s = study_summary(row)
        s["series"] = series_views(index, row["study_uid"])
        s["jobs"] = [job_view(index, j) for j in reversed(index.jobs(study_uid=row["study_uid"], limit=100))]
        out_studies.append(s)
    return {
        "now": now,
        "queue": {"jobs_pending": index.count_jobs(("pending", "retrying")),
                  "jobs_running": index.count_jobs(("running",)),
                  "deliveries_pending": index.count_deliveries("pending"),
                  "deliveries_failed": index.count_deliveries("failed")},
        "last_hour": index.throughput(now - 3600),
        "studies_total": index.count_studies(),
        "cluster": cluster_view(request.app.state.node),  # workers and queue lengths (executor.kind: celery)
        "studies": out_studies,
        "failed_deliveries": [delivery_view(d) for d in index.deliveries(status="failed", limit=100)],
        "training": _training(request, p, now - TRAINING_SHOWN_S),
    }


TRAINING_SHOWN_S = 3600  # a finished training run stays on the dashboard this long


def _training(request: Request, p: Principal, since: float) -> list[dict]:
    """Training runs going or recently ended, of the projects this user may see (the project page has the curves)."""
    store = ProjectStore.for_data_dir(request.app.state.node.settings.data_dir)
    return [{"project": name, **run} for name in store.names() if store.get(name).may_view(p.name, p.role)
            for run in recent_runs(store.root / name, since)]
