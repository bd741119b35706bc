"""JSON views of index rows, shared by the API routers and `hilum status`."""
from __future__ import annotations

import json

from node.store.index import Index
from node.store.retrieves import series_origins


def study_summary(row) -> dict:
    return {
        "study_uid": row["study_uid"], "patient_id": row["patient_id"], "patient_name": row["patient_name"],
        "study_date": row["study_date"], "accession": row["accession"], "description": row["description"],
        "instances_received": row["instances"], "stable": row["state"] == "stable", "stable_at": row["stable_at"],
        "first_received": row["first_at"], "last_received": row["last_at"], "generation": row["generation"],
        "pending_rules": pending_rules(row),
        "route_note": row["route_note"],  # why no rule ran (a prior fetched for another study's job)
    }


def series_views(index: Index, study_uid: str) -> list[dict]:
    """The study's series, each with its origin: pushed by which AE, or retrieved by which pull rule,
    user or job's priors from which source (node.store.retrieves.series_origins)."""
    origins = series_origins(index, study_uid)
    return [{"series_uid": s["series_uid"], "modality": s["modality"], "description": s["description"],
             "instances": s["instances"], "stable": s["state"] == "stable", "origin": origins[s["series_uid"]]}
            for s in index.series_of_study(study_uid)]


def quality_warnings(history: list[dict]) -> list[str]:
    """The warnings of the job's latest run (a job delivered despite a failed quality check)."""
    for event in reversed(history):
        if event.get("event") == "done":
            return list((event.get("provenance") or {}).get("quality_warnings", []))
    return []
def pending_rules(row) -> list[dict]:
    """Rules that matched the study but have not fired yet, each with when it will: the study's
    last arrival plus the rule's quiet period (a later instance moves it). Without them a study
    whose slow rule is still waiting would look finished."""
    pending = json.loads(row["pending_json"] or "[]")
    return [{"rule": p["rule"], "handler": p["handler"], "series_uid": p["series_uid"],
             "fires_at": row["last_at"] + p["stable_after"]} for p in pending]


def model_run(history: list[dict]) -> dict | None:
    """The model version the job's latest run resolved (``node.models.versions``), if it runs a model."""
    return next((e for e in reversed(history) if e.get("event") == "model"), None)


def job_view(index: Index, job) -> dict:
    history = json.loads(job["history_json"])
    model = model_run(history)
    deliveries: dict[str, dict[str, str]] = {}
    for d in index.deliveries_of_job(job["id"]):
        deliveries.setdefault(d["sop_uid"], {})[d["destination"]] = d["status"]
    return {
        "id": job["id"], "rule": job["rule"], "handler": job["handler"], "status": job["status"],
        "error": job["error"], "study_uid": job["study_uid"], "series_uid": job["series_uid"],
        "progress": job["progress"], "message": job["message"], "attempts": job["attempts"],
        "created_at": job["created_at"], "started_at": job["started_at"], "finished_at": job["finished_at"],
        "history": history, "quality_warnings": quality_warnings(history),
        "model_version": model["version"] if model else None,
        # a shadow run: results kept on the node, never delivered (node.models.shadow)
        "shadow": bool(json.loads(job["options_json"] or "{}").get("shadow_of")),
        "results": [
            {"sop_class_uid": r["sop_class_uid"], "sop_instance_uid": r["sop_uid"],
             "series_instance_uid": r["series_uid"], "modality": r["modality"],
             "deliveries": deliveries.get(r["sop_uid"], {})}
            for r in index.results_of_job(job["id"])
        ],
    }


def delivery_view(row) -> dict:
    return {
        "id": row["id"], "kind": row["kind"], "job_id": row["job_id"], "study_uid": row["study_uid"],
        "sop_instance_uid": row["sop_uid"], "destination": row["destination"], "status": row["status"],
        "attempts": row["attempts"], "next_at": row["next_at"], "last_error": row["last_error"],
        "delivered_at": row["delivered_at"],
    }


def cluster_summary(index: Index, executor: str, queue_lengths: dict[str, int] | None) -> dict:
    """Remote workers (host, queues, current job, last heartbeat) and broker queue lengths (None: unknown)."""
    workers = [{"name": w["name"], "host": w["host"], "queues": json.loads(w["queues"]), "current_job": w["current_job"],
                "pid": w["pid"], "last_seen": w["last_seen"]} for w in index.workers()]
    return {"executor": executor, "workers": workers, "queues": queue_lengths}


def _when(t: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "not finished"


def _asker(r: dict) -> str:
    if r["by"] == "rule":
        return f"pull rule {r['rule']}"
    if r["by"] == "priors":
        return f"priors of job {r['job']}"
    return f"{r['user'] or '?'} via {r['via']}"


def origin_lines(origin: dict) -> list[str]:
    """A series' origin (node.store.retrieves.series_origins) as lines of text: `hilum status --study`."""
    methods = {"move": "C-MOVE", "get": "C-GET", "wado": "WADO-RS"}
    out = [f"retrieved from {r['source']} by {_asker(r)} (retrieve {r['retrieve']}, "
           f"{methods.get(r['method'], r['method'])}, {_when(r['at'])}): {r['instances']} instance(s)"
           for r in origin["retrieved"]]
    p = origin["pushed"]
    if p:
        sender = f"pushed by {p['calling_ae']} from {p['source_ip']}" if p["calling_ae"] else \
            "pushed (calling AE not recorded per instance)"
        out.append(f"{sender} to {p['called_ae']} ({_when(p['first_at'])}): {p['instances']} instance(s)")
    for r in origin["arriving"]:
        out.append(f"retrieve {r['retrieve']} from {r['source']} by {_asker(r)} still {r['status']}"
                   + (f": {origin['unattributed']} instance(s) not yet attributed" if origin["unattributed"] else ""))
    return out
