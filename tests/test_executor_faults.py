"""The local executor under index faults and a study that changes under a queued job: real worker
processes running the overview handler on real instances; only the index's failures are injected
(a disk that fills for a moment, a database locked), as a full disk would raise them.

Before: an index error while a job ran failed it but left its worker running it, and the next job
read that worker's results and "done" as its own (another patient's results, delivered); one error
taking a job ended the slot's thread for good (every later job pending, nothing said why); a job
taken after more instances of its study arrived ran on a mix of the routed set and the arrivals.
"""
from __future__ import annotations

import sqlite3
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest

from node.config import load_settings
from node.jobs.executor import LocalProcessExecutor
from node.receive.ingest import Ingest, Origin
from node.store.index import Index
from node.store.vault import Vault
from tests.pacs_peers import tiny_study

CT1 = Origin("CT1", "HILUM", "10.0.0.9")


@pytest.fixture
def node(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    settings = load_settings(data_dir=data, workers=1)
    index = Index(data / "index.db")
    vault = Vault(data, None, writer=True)
    ingest = Ingest(index, vault)
    yield settings, index, vault, ingest
    ingest.close()
    vault.close()


def _receive(ingest: Ingest, study) -> None:
    for f in study.files:
        assert ingest.store(f.read_bytes(), CT1)[0] == 0
    assert ingest.writer.flush(10)


def _job(index: Index, study, key: str, generation: int = 0) -> int:
    [series] = study.series
    return index.add_job(job_key=key, study_uid=study.study_uid, series_uid=series, level="series", rule="r",
                         handler="overview", params={}, destinations=[], priority="normal", timeout_s=None,
                         generation=generation, note="test")


def _run_until_ended(settings, index: Index, vault: Vault, ids: list[int]) -> None:
    """A local executor with real worker processes, run until the jobs ``ids`` are done or failed."""
    executor = LocalProcessExecutor(settings, index, vault, on_done=lambda: None)
    executor.start()
    try:
        _wait_ended(index, ids)
    finally:
        executor.stop()


def _wait_ended(index: Index, ids: list[int], timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(index.job(i)["status"] in ("done", "failed") for i in ids):
            return
        time.sleep(0.2)
    raise AssertionError({i: index.job(i)["status"] for i in ids})


def test_an_index_error_mid_job_fails_that_job_and_never_hands_its_results_to_the_next(node, tmp_path):
    settings, index, vault, ingest = node
    a, b = tiny_study(tmp_path / "a", patient_id="PA"), tiny_study(tmp_path / "b", patient_id="PB")
    _receive(ingest, a)
    _receive(ingest, b)
    ja, jb = _job(index, a, "ka"), _job(index, b, "kb")
    real, calls = index.job_progress, []

    def full_once(*args):
        calls.append(args)
        if len(calls) == 1:  # job a's first progress report: its worker is busy with it
            raise sqlite3.OperationalError("database or disk is full")
        return real(*args)

    index.job_progress = full_once
    _run_until_ended(settings, index, vault, [ja, jb])
    assert index.job(ja)["status"] == "failed" and "database or disk is full" in index.job(ja)["error"]
    assert index.job(jb)["status"] == "done", index.job(jb)["error"]
    results = index.results_of_job(jb)
    assert results
    for r in results:  # b's results are b's: none of a's
        ds = pydicom.dcmread(BytesIO(vault.read_file(Path(r["path"]))), stop_before_pixels=True)
        assert ds.StudyInstanceUID == b.study_uid and ds.PatientID == "PB"
    assert not index.results_of_job(ja)


def test_an_index_error_taking_a_job_does_not_end_the_slot(node, tmp_path):
    settings, index, vault, ingest = node
    a = tiny_study(tmp_path / "a")
    _receive(ingest, a)
    ja = _job(index, a, "ka")
    real, calls = index.claim_job, []

    def locked_once():
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        return real()

    index.claim_job = locked_once
    _run_until_ended(settings, index, vault, [ja])
    assert len(calls) >= 2 and index.job(ja)["status"] == "done", index.job(ja)["error"]


def test_a_job_taken_after_more_of_its_study_arrived_is_superseded_not_run_on_a_mix(node, tmp_path):
    settings, index, vault, ingest = node
    a = tiny_study(tmp_path / "a", series=(("AX", 1.0, 4),))
    [series] = a.series
    first, late = a.files[:3], a.files[3:]
    for f in first:
        assert ingest.store(f.read_bytes(), CT1)[0] == 0
    assert ingest.writer.flush(10)
    study = index.study(a.study_uid)
    assert index.mark_stable(a.study_uid, study["generation"], time.time())
    ja = index.add_job(job_key="g0", study_uid=a.study_uid, series_uid=series, level="series", rule="r",
                       handler="overview", params={}, destinations=[], priority="normal", timeout_s=None,
                       generation=study["generation"], note="study complete")
    index.mark_routed(a.study_uid, study["generation"])
    for f in late:  # the modality sends one more slice before a slot takes the job
        assert ingest.store(f.read_bytes(), CT1)[0] == 0
    assert ingest.writer.flush(10)
    assert index.study(a.study_uid)["generation"] == study["generation"] + 1
    _run_until_ended(settings, index, vault, [ja])
    job = index.job(ja)
    assert job["status"] == "failed" and job["error"].startswith("superseded: instances of the study arrived")
    assert not index.results_of_job(ja)


# -- the cluster executor's bookkeeping (no broker needed: it is never reached here) -------------------
def _celery(settings_dir, index: Index, **executor):
    from node.jobs.celery_executor import CeleryExecutor
    s = load_settings(data_dir=settings_dir, executor={"kind": "celery", "broker_url": "redis://127.0.0.1:1/0",
                                                        **executor})
    return CeleryExecutor(s, index, on_done=lambda: None)


def _queued_on(index: Index, queue: str, timeout_s: float, waited_s: float) -> int:
    from node.jobs.broker import ticket_hash
    jid = index.add_job(job_key=f"k{queue}{waited_s}", study_uid="1.2", series_uid="1.2.3", level="series", rule="r",
                        handler="overview", params={}, destinations=[], priority="normal", timeout_s=timeout_s,
                        generation=0, note="t")
    job = index.claim_job()
    index.add_attempt(jid, job["attempts"], ticket_hash(f"t{jid}"), f"task-{jid}", queue)
    index.conn().execute("UPDATE job_attempts SET dispatched_at = dispatched_at - ? WHERE job_id=?", (waited_s, jid))
    return jid


def test_a_job_queued_where_no_worker_takes_it_is_said_at_once_and_failed_after_its_timeout(tmp_path):
    index = Index(tmp_path / "i.db")
    ex = _celery(tmp_path, index)
    index.worker_seen("w1", "host1", ["cpu"], None, 1)  # a live worker, on another queue
    stale = _queued_on(index, "gpu", timeout_s=60, waited_s=86400)
    fresh = _queued_on(index, "gpu", timeout_s=60, waited_s=5)
    busy = _queued_on(index, "cpu", timeout_s=60, waited_s=86400)
    ex._reconcile()
    job = index.job(stale)
    assert job["status"] == "failed" and "no worker took it from queue 'gpu' within its timeout (60 s)" in job["error"]
    assert [a["state"] for a in index.attempts_of_job(stale)] == ["timeout"]
    assert index.job(fresh)["status"] == "running"
    assert index.job(fresh)["message"] == "queued on gpu: no live worker takes this queue"
    # A queue with a live worker is only busy: its job waits, whatever the time.
    assert index.job(busy)["status"] == "running"


def test_the_cluster_executor_supersedes_a_job_whose_study_grew_before_dispatch(node, tmp_path):
    settings, index, vault, ingest = node
    a = tiny_study(tmp_path / "a", series=(("AX", 1.0, 2),))
    [series] = a.series
    assert ingest.store(a.files[0].read_bytes(), CT1)[0] == 0
    assert ingest.writer.flush(10)
    gen = index.study(a.study_uid)["generation"]
    assert index.mark_stable(a.study_uid, gen, time.time())
    ja = index.add_job(job_key="g0", study_uid=a.study_uid, series_uid=series, level="series", rule="r",
                       handler="overview", params={}, destinations=[], priority="normal", timeout_s=None,
                       generation=gen, note="study complete")
    index.mark_routed(a.study_uid, gen)
    assert ingest.store(a.files[1].read_bytes(), CT1)[0] == 0
    assert ingest.writer.flush(10)
    ex = _celery(tmp_path / "c", index)
    ex._dispatch_pending()
    job = index.job(ja)
    assert job["status"] == "failed" and job["error"].startswith("superseded:")
    assert index.attempts_of_job(ja) == []  # never published
