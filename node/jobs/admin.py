"""Admin actions on jobs, shared by the API and the CLI (which may run beside a live node:
the index is the only state, and the node's loops pick the change up on their next pass)."""
from __future__ import annotations

from node.store.index import Index


def retry(index: Index, job_id: int, who: str) -> str:
    """Re-run a failed job, or re-send the failed deliveries of a finished one. KeyError if unknown."""
    job = index.job(job_id)
    if job is None:
        raise KeyError(f"job {job_id} not found")
    if job["status"] == "failed":
        index.retry_job(job_id, who)
        return "job re-queued"
    n = index.retry_deliveries(job_id=job_id)
    return f"{n} failed deliveries re-queued"
