"""/api/health: unauthenticated liveness for load balancers and monitoring; no patient data."""
from __future__ import annotations

from fastapi import APIRouter, Request

router = APIRouter(tags=["health"])


@router.get("/api/health")
def health(request: Request) -> dict:
    node = request.app.state.node
    orthanc_ok = node.archive_alive()
    idx = node.index
    return {
        "node": "ok",
        "orthanc": "ok" if orthanc_ok else "down",
        "queue": {"jobs_pending": idx.count_jobs(("pending", "retrying")),
                  "jobs_running": idx.count_jobs(("running",)),
                  "deliveries_pending": idx.count_deliveries("pending"),
                  "deliveries_failed": idx.count_deliveries("failed")},
    }
