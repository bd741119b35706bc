"""/metrics: the node's queue and worker numbers in the Prometheus text format.

The same numbers as the dashboard and `hilum status`: jobs by status, deliveries, broker queue
lengths (what an autoscaler such as KEDA scales workers on) and each worker's last heartbeat.
Prometheus scrapes it with a viewer token (``authorization: {credentials: …}``).
"""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from node.web.auth import Principal, require_viewer
from node.web.worker_api import cluster_view

router = APIRouter(tags=["metrics"])
JOB_STATUSES = ("pending", "running", "done", "failed", "retrying")


def _label(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(node) -> str:
    index = node.index
    now = time.time()
    out: list[str] = []

    def metric(name: str, kind: str, text: str, samples: list[tuple[dict, float]]) -> None:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{lab}}} {value:g}" if lab else f"{name} {value:g}")

    metric("hilum_jobs", "gauge", "Jobs in the index by status.",
           [({"status": s}, index.count_jobs((s,))) for s in JOB_STATUSES])
    metric("hilum_deliveries", "gauge", "Deliveries waiting or failed.",
           [({"status": s}, index.count_deliveries(s)) for s in ("pending", "failed")])
    quarantine = getattr(getattr(node, "ingest", None), "quarantine", None)
    if quarantine is not None:  # bounded (node/receive/spool.py): how close it is to its cap
        used = quarantine.usage()
        metric("hilum_quarantine_files", "gauge", "Files in the quarantine folder (rejected instances, reasons).",
               [({}, used["files"])])
        metric("hilum_quarantine_bytes", "gauge", "Bytes in the quarantine folder.", [({}, used["bytes"])])
    cl = cluster_view(node)
    if cl["queues"] is not None:
        metric("hilum_queue_length", "gauge", "Tasks waiting in the broker queue.",
               [({"queue": q}, n) for q, n in sorted(cl["queues"].items())])
    lost_after = node.settings.executor.worker_lost_s
    workers = cl["workers"]
    metric("hilum_worker_heartbeat_age_seconds", "gauge", "Seconds since the worker's last heartbeat.",
           [({"worker": w["name"], "host": w["host"]}, round(now - w["last_seen"], 3)) for w in workers])
    metric("hilum_worker_busy", "gauge", "1 while the worker runs a job.",
           [({"worker": w["name"], "host": w["host"]}, 1 if w["current_job"] is not None else 0) for w in workers])
    metric("hilum_workers_alive", "gauge", "Workers heard from within executor.worker_lost_s.",
           [({}, sum(1 for w in workers if now - w["last_seen"] <= lost_after))])
    return "\n".join(out) + "\n"


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request, _: Principal = Depends(require_viewer)) -> PlainTextResponse:
    return PlainTextResponse(render(request.app.state.node), media_type="text/plain; version=0.0.4")
