"""Job attempts of the Celery executor, in the index and the reconciler (no broker needed: the
reconciler only asks the broker about queued tasks, and these attempts are claimed)."""
from __future__ import annotations

import json

from node.config import load_settings
from node.jobs.broker import ticket_hash
from node.jobs.celery_executor import CeleryExecutor
from node.store.index import Index


def _job(index: Index, key: str = "k1", timeout_s: float | None = None) -> dict:
    index.add_job(job_key=key, study_uid="1.2", series_uid="1.2.3", level="series", rule="r", handler="overview",
                  params={}, destinations=["orthanc"], priority="normal", timeout_s=timeout_s, generation=0,
                  note="test")
    return index.claim_job()


def _dispatch(index: Index, job, ticket: str) -> None:
    index.add_attempt(job["id"], job["attempts"], ticket_hash(ticket), f"task-{ticket}", "cpu")


def test_one_claim_per_attempt_and_only_the_current_one(tmp_path):
    index = Index(tmp_path / "i.db")
    job = _job(index)
    _dispatch(index, job, "t1")
    assert index.claim_attempt(job["id"], ticket_hash("nope"), "w1") == "unknown"
    assert index.claim_attempt(job["id"], ticket_hash("t1"), "w1") == "ok"
    assert index.claim_attempt(job["id"], ticket_hash("t1"), "w2") == "taken"
    assert index.live_attempt(job["id"], ticket_hash("t1"))["worker"] == "w1"
    # The worker is lost: a new attempt; the old ticket opens nothing any more.
    assert index.lose_attempt(job["id"], 1, "silent", max_attempts=3) == "requeued"
    assert index.live_attempt(job["id"], ticket_hash("t1")) is None
    job = index.claim_job()
    assert job["attempts"] == 2
    _dispatch(index, job, "t2")
    assert index.claim_attempt(job["id"], ticket_hash("t1"), "w1") == "stale"
    assert index.claim_attempt(job["id"], ticket_hash("t2"), "w2") == "ok"
    assert index.end_attempt(job["id"], 2, "done") is True
    assert index.end_attempt(job["id"], 2, "done") is False  # one result set per attempt
    hist = [(h["event"], h.get("worker")) for h in json.loads(index.job(job["id"])["history_json"])]
    assert hist == [("created", None), ("started", "w1"), ("attempt lost", "w1"), ("started", "w2")]


def test_attempts_exhausted_fail_the_job_with_the_reason(tmp_path):
    index = Index(tmp_path / "i.db")
    for n in (1, 2):
        job = _job(index) if n == 1 else index.claim_job()
        _dispatch(index, job, f"t{n}")
        assert index.claim_attempt(job["id"], ticket_hash(f"t{n}"), f"w{n}") == "ok"
        outcome = index.lose_attempt(job["id"], n, f"no heartbeat from w{n}", max_attempts=2)
    assert outcome == "failed"
    row = index.job(job["id"])
    assert row["status"] == "failed" and "attempts exhausted: 2 attempt(s) lost" in row["error"]
    assert "no heartbeat from w2" in row["error"]


def _executor(tmp_path, index: Index, **executor) -> CeleryExecutor:
    settings = load_settings(data_dir=tmp_path, executor={"kind": "celery", "broker_url": "redis://127.0.0.1:1/0",
                                                          **executor})
    return CeleryExecutor(settings, index, on_done=lambda: None)


def test_reconciler_takes_a_silent_attempt_back_and_fails_one_past_its_timeout(tmp_path):
    index = Index(tmp_path / "i.db")
    silent = _job(index, "k1")
    _dispatch(index, silent, "a")
    index.claim_attempt(silent["id"], ticket_hash("a"), "w1")
    slow = _job(index, "k2", timeout_s=60)
    _dispatch(index, slow, "b")
    index.claim_attempt(slow["id"], ticket_hash("b"), "w2")
    index.conn().execute("UPDATE job_attempts SET heartbeat_at = heartbeat_at - 100 WHERE job_id=?", (silent["id"],))
    index.conn().execute("UPDATE job_attempts SET claimed_at = claimed_at - 100 WHERE job_id=?", (slow["id"],))
    ex = _executor(tmp_path, index, worker_lost_s=30)
    ex._reconcile()
    assert index.job(silent["id"])["status"] == "retrying"
    assert [a["state"] for a in index.attempts_of_job(silent["id"])] == ["lost"]
    row = index.job(slow["id"])
    assert row["status"] == "failed" and row["error"] == "timed out after 60 s on worker w2"
    assert index.live_attempt(slow["id"], ticket_hash("b")) is None  # its late results will be refused


def test_a_running_job_never_dispatched_goes_back_to_the_queue(tmp_path):
    index = Index(tmp_path / "i.db")
    job = _job(index)  # claimed (running), but the node stopped before publishing it
    _executor(tmp_path, index)._reconcile()
    assert index.job(job["id"])["status"] == "retrying"
