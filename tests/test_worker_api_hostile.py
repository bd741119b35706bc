"""The worker API (node/web/worker_api.py) and the remote worker (node/jobs/remote.py) under the
uploads, bodies and races a real cluster meets: fast, against the real app, Index and Vault (the
Celery executor stubbed), no broker.

1. A worker's result or artefact over the /api JSON body limit (1 MB: any real SEG) is taken; every
   other /api body keeps that limit.
2. A result upload or ``done`` the node refuses reaches it as the attempt's failure, with the reason.
3. A result or artefact body over stow_max_mb is refused as soon as it passes it, not read whole.
4. ``done`` takes only UIDs, and only files this job's uploads stored.
5. /inputs streams exactly what the claim announced; a worker names a stream that does not match.
6. The artefact heartbeat runs off the event loop; a damaged input ends the job through the
   executor; a stale ticket gets 409 (the worker drops the attempt), an unknown one 403.
"""
from __future__ import annotations

import asyncio
import time
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.audit import NULL_AUDIT
from node.config import load_settings
from node.jobs import remote
from node.jobs.artefacts import pack, set_key
from node.jobs.broker import ticket_hash
from node.jobs.remote import AttemptEnded, NodeClient, RemoteWorker
from node.jobs.wire import FRAME
from node.store.envelope import IntegrityError
from node.store.index import Index, InstanceRow
from node.store.vault import Vault
from node.web.app import create_app
from node.web.auth import hash_token

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
STUDY = "1.2.826.1"


class _Executor:
    """What the worker API needs of the Celery executor: the jobs it was told ended."""

    def __init__(self) -> None:
        self.ended: list[int] = []

    def job_ended(self, job_id: int) -> None:
        self.ended.append(job_id)

    def wake(self) -> None:
        pass


def _node(tmp_path: Path, **settings):
    s = load_settings(data_dir=tmp_path, executor={"kind": "celery", "broker_url": "redis://127.0.0.1:1/0"},
                      **settings)
    index = Index(tmp_path / "index.db")
    index.add_token(hash_token("hlm_worker"), "worker", "w")
    node = SimpleNamespace(settings=s, index=index, vault=Vault(tmp_path, None, writer=True), audit=NULL_AUDIT,
                           executor=_Executor())
    return node, TestClient(create_app(node))


def _hdr(ticket: str) -> dict:
    return {"Authorization": "Bearer hlm_worker", "X-Hilum-Ticket": ticket, "X-Hilum-Worker": "w"}


def _job(node, study=STUDY, study_level=False, key="k1", ticket="T1") -> int:
    """A running job (on the study's series <study>.1, or on the whole study) with a queued attempt for ``ticket``."""
    node.index.add_job(job_key=key, study_uid=study, series_uid=None if study_level else study + ".1",
                       level="study" if study_level else "series", rule="r", handler="overview", params={},
                       destinations=["orthanc"], priority="normal", timeout_s=None, generation=0, note="t")
    job = node.index.claim_job()
    node.index.add_attempt(job["id"], job["attempts"], ticket_hash(ticket), "task", "cpu")
    return job["id"]


def _claimed(node, client, **kw) -> int:
    job = _job(node, **kw)
    r = client.post(f"/api/worker/jobs/{job}/claim", headers=_hdr(kw.get("ticket", "T1")))
    assert r.status_code == 200, r.text
    return job


def _dicom(study: str, sop: str | None = None, series: str | None = None, nbytes: int = 100) -> tuple[str, bytes]:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SEG
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop or generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series or generate_uid(), "SEG"
    ds.add_new(0x00091010, "OB", b"\0" * nbytes)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return str(ds.SOPInstanceUID), buf.getvalue()


def _arrive(node, study: str, series: str, sops: list[str]) -> None:
    rows = []
    for sop in sops:
        _, data = _dicom(study, sop, series)
        loc = node.vault.append(data, {})
        rows.append(InstanceRow(sop, series, study, SEG, "1.2.840.10008.1.2.1", loc, len(data), time.time(), "{}",
                                "CT", "", "1", "P", "N", "", "", "", "A", "B", "ip"))
    node.index.add_instances(rows)


def _meta(uid: str) -> dict:
    return {"sop_instance_uid": uid, "sop_class_uid": SEG, "series_instance_uid": "1.2.3", "modality": "SEG"}


# -- 1. the /api body limit and the worker's uploads -------------------------------------------

def test_a_worker_result_or_artefact_over_the_api_body_limit_is_taken_other_bodies_are_not(tmp_path):
    node, client = _node(tmp_path)
    job = _claimed(node, client)
    sop, data = _dicom(STUDY, nbytes=3 << 20)  # a SEG of a few MB
    r = client.put(f"/api/worker/jobs/{job}/results/{sop}", content=data, headers=_hdr("T1"))
    assert r.status_code == 200, r.text
    array = np.random.default_rng(0).integers(0, 255, (64, 128, 256), dtype=np.uint8)  # incompressible: 2 MB
    entry = pack(array)
    assert len(entry) > 1 << 20
    key = set_key(STUDY + ".1", [])
    r = client.put(f"/api/worker/jobs/{job}/artefacts/{key}", content=entry, headers=_hdr("T1"),
                   params={"producer": "overview", "version": "1", "name": "tiles"})
    assert r.status_code == 200, r.text
    # Everything else under /api keeps the 1 MB limit, worker routes included.
    big = b"{" + b" " * (2 << 20) + b"}"
    for method, path in [("POST", f"/api/worker/jobs/{job}/done"), ("POST", f"/api/worker/jobs/{job}/results/{sop}"),
                         ("PUT", f"/api/worker/jobs/{job}/results/{sop}/x"), ("POST", "/api/worker/heartbeat")]:
        r = client.request(method, path, content=big, headers={**_hdr("T1"), "Content-Type": "application/json"})
        assert r.status_code == 413 and r.text == "request body too large", (method, path, r.status_code)
    # The exemption opens no door: without a worker token the upload is refused before it is read.
    assert client.put(f"/api/worker/jobs/{job}/results/{sop}", content=data).status_code == 401


# -- 2. the worker reports a refused upload or done as the attempt's failure ----------------------

class _Client:
    """A NodeClient for RemoteWorker._run: inputs none, uploads and done as the test says."""

    def __init__(self, put=None, done=None) -> None:
        self._put, self._done = put, done
        self.failed: list[str] = []
        self.put: list[str] = []

    def fetch_inputs(self, job, ticket, into):
        return {}

    def progress(self, *a):
        pass

    def put_result(self, job_id, ticket, sop_uid, data):
        if self._put:
            raise self._put
        self.put.append(sop_uid)

    def done(self, job_id, ticket, meta, provenance, figures):
        if self._done:
            raise self._done

    def fail(self, job_id, ticket, error):
        self.failed.append(error)


def _status(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("PUT", "http://node/api/worker/jobs/7/results/1.2.3")
    response = httpx.Response(code, request=request)
    return httpx.HTTPStatusError(f"Client error '{code}'", request=request, response=response)


def _fake_run_job(spec, progress, artefacts):
    path = Path(spec.results_dir) / "7" / "1.2.3.dcm"
    path.parent.mkdir(parents=True)
    Vault(Path(spec.vault.data_dir), None).write_file(path, b"a result")
    return [{**_meta("1.2.3"), "path": str(path)}], {}, {}


@pytest.mark.parametrize("put, done", [(_status(413), None), (None, _status(503)), (None, httpx.ReadTimeout("t"))])
def test_a_refused_upload_or_done_is_reported_to_the_node_as_the_attempts_failure(tmp_path, monkeypatch, put, done):
    monkeypatch.setattr(remote, "run_job", _fake_run_job)
    client = _Client(put, done)
    worker = RemoteWorker(client, "w", ["cpu"], tmp_path, 1.0)
    job = {"job_id": 7, "job_key": "k", "study_uid": STUDY, "rule": "r", "handler": "overview", "params": {},
           "series": [], "created": ""}
    assert worker._run(job, "T") == "job 7: failed"
    [reason] = client.failed
    assert type(put or done).__name__ in reason and (str((put or done).args[0]) in reason)


def test_an_attempt_the_node_gave_up_at_done_is_dropped_not_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "run_job", _fake_run_job)
    client = _Client(done=AttemptEnded("attempt ended"))
    job = {"job_id": 7, "job_key": "k", "study_uid": STUDY, "rule": "r", "handler": "overview", "params": {},
           "series": [], "created": ""}
    with pytest.raises(AttemptEnded):
        RemoteWorker(client, "w", ["cpu"], tmp_path, 1.0)._run(job, "T")
    assert client.put == ["1.2.3"] and client.failed == []


# -- 3. bodies over stow_max_mb are refused as they arrive ---------------------------------------

def _asgi_put(app, path: str, headers: dict, chunks: int, chunk: bytes) -> tuple[int, int]:
    """PUT ``chunks`` chunks straight through the ASGI app: (status, chunks the app asked for)."""
    sent = {"n": 0}
    out: dict = {}

    async def receive():
        if sent["n"] >= chunks:
            return {"type": "http.disconnect"}
        sent["n"] += 1
        return {"type": "http.request", "body": chunk, "more_body": sent["n"] < chunks}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "PUT", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"producer=overview&version=1"
             b"&name=tiles", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    return out["status"], sent["n"]


@pytest.mark.parametrize("what", ["results", "artefacts"])
def test_an_upload_over_stow_max_mb_is_refused_as_soon_as_it_passes_the_limit(tmp_path, what):
    node, client = _node(tmp_path, stow_max_mb=1)
    job = _claimed(node, client)
    name = generate_uid() if what == "results" else set_key(STUDY + ".1", [])
    path = f"/api/worker/jobs/{job}/{what}/{name}"
    chunk = b"\0" * (256 << 10)
    # Chunked, no Content-Length (64 MB offered): refused once past 1 MB, the rest never read.
    status, read = _asgi_put(client.app, path, {**_hdr("T1"), "Transfer-Encoding": "chunked"}, 256, chunk)
    assert status == 413 and read <= 5, (status, read)
    # A Content-Length over the limit: refused before a byte is read.
    status, read = _asgi_put(client.app, path, {**_hdr("T1"), "Content-Length": str(64 << 20)}, 256, chunk)
    assert status == 413 and read == 0, (status, read)
    assert not (tmp_path / "results" / str(job)).exists()


# -- 4. done: UIDs only, and files of this job's uploads only -------------------------------------

def test_done_takes_only_uids_naming_files_this_jobs_uploads_stored(tmp_path):
    node, client = _node(tmp_path)
    a = _claimed(node, client, study="1.2.826.1", key="a", ticket="TA")
    sop_a, data_a = _dicom("1.2.826.1")
    assert client.put(f"/api/worker/jobs/{a}/results/{sop_a}", content=data_a, headers=_hdr("TA")).status_code == 200
    b = _claimed(node, client, study="1.2.826.2", key="b", ticket="TB")
    sop_b, data_b = _dicom("1.2.826.2")
    assert client.put(f"/api/worker/jobs/{b}/results/{sop_b}", content=data_b, headers=_hdr("TB")).status_code == 200
    planted = tmp_path / "planted.dcm"
    planted.write_bytes(_dicom("9.9.9")[1])
    for uid in (f"../{a}/{sop_a}", "../../" + str(planted.with_suffix("")), f"{sop_b}\n", ""):
        r = client.post(f"/api/worker/jobs/{b}/done", headers=_hdr("TB"), json={"results": [_meta(uid)]})
        assert r.status_code == 422, (uid, r.text)
        assert r.json()["detail"][0]["loc"][-1] == "sop_instance_uid"
    # A UID whose file in the job's folder is a link (to job a's result) is no upload of this job.
    link = tmp_path / "results" / str(b) / "1.2.3.4.dcm"
    link.symlink_to(tmp_path / "results" / str(a) / f"{sop_a}.dcm")
    r = client.post(f"/api/worker/jobs/{b}/done", headers=_hdr("TB"), json={"results": [_meta("1.2.3.4")]})
    assert r.status_code == 422 and "not uploaded: 1.2.3.4" in r.text
    assert node.index.job(b)["status"] == "running" and not node.index.deliveries_of_job(b)
    # Its own upload is taken.
    r = client.post(f"/api/worker/jobs/{b}/done", headers=_hdr("TB"), json={"results": [_meta(sop_b)]})
    assert r.status_code == 200, r.text
    [row] = node.index.deliveries_of_job(b)
    assert Path(row["path"]) == tmp_path / "results" / str(b) / f"{sop_b}.dcm" and node.executor.ended == [b]


# -- 5. the inputs stream is the claim's -----------------------------------------------------------

def test_inputs_stream_exactly_what_the_claim_announced_while_more_arrives(tmp_path):
    node, client = _node(tmp_path)
    study, first, late = "1.2.826.7", "1.2.826.7.1", "1.2.826.7.2"
    claimed = ["1.2.826.7.1.5", "1.2.826.7.1.6", "1.2.826.7.1.7"]
    _arrive(node, study, first, claimed)
    job = _job(node, study=study, study_level=True, key="k", ticket="T")
    nc = NodeClient("http://testserver", "hlm_worker", "w")
    nc.http = client
    client.headers.update({"Authorization": "Bearer hlm_worker", "X-Hilum-Worker": "w"})
    claim = nc.claim(job, "T")
    assert claim["series"] == [{"uid": first, "instances": 3}]
    # Meanwhile: a late series, and an instance of the first that sorts before the claimed ones.
    _arrive(node, study, late, ["1.2.826.7.2.1", "1.2.826.7.2.2"])
    _arrive(node, study, first, ["1.2.826.7.1.1"])
    got = nc.fetch_inputs(claim, "T", tmp_path / "in")
    assert list(got) == [first]
    assert [str(pydicom.dcmread(p).SOPInstanceUID) for p in got[first]] == claimed
    # The announcement is kept with the attempt in the index: a restarted node streams the same.
    restarted = TestClient(create_app(node))
    restarted.headers.update({"Authorization": "Bearer hlm_worker", "X-Hilum-Worker": "w"})
    nc.http = restarted
    again = nc.fetch_inputs(claim, "T", tmp_path / "in2")
    assert [str(pydicom.dcmread(p).SOPInstanceUID) for p in again[first]] == claimed


def _stream_client(frames: list[tuple[int, bytes]]) -> NodeClient:
    body = b"".join(FRAME.pack(pos, len(data)) + data for pos, data in frames)
    nc = NodeClient("http://node", "hlm_worker", "w")
    answer = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    nc.http = httpx.Client(base_url="http://node", transport=answer)
    return nc


@pytest.mark.parametrize("frames", [[(0, b"a"), (1, b"b")], [(0, b"a"), (0, b"b")], [(7, b"x")]])
def test_a_worker_names_an_inputs_stream_that_does_not_match_its_claim(tmp_path, frames):
    claim = {"job_id": 1, "series": [{"uid": "1.2.3", "instances": 1}]}
    with pytest.raises(RuntimeError, match="inputs stream does not match the claim"):
        _stream_client(frames).fetch_inputs(claim, "T", tmp_path / "in")
    with pytest.raises(RuntimeError, match="inputs stream incomplete"):
        _stream_client([]).fetch_inputs(claim, "T", tmp_path / "in2")


# -- 6. the heartbeat off the loop, a damaged input, a stale ticket ---------------------------------

def test_the_artefact_upload_beats_the_attempts_heartbeat_off_the_event_loop(tmp_path):
    node, client = _node(tmp_path)
    job = _claimed(node, client)
    beats, beat = [], node.index.attempt_heartbeat

    def recording(*args):
        try:
            asyncio.get_running_loop()
            beats.append("on the event loop")
        except RuntimeError:
            beats.append("in a thread")
        return beat(*args)

    node.index.attempt_heartbeat = recording
    r = client.put(f"/api/worker/jobs/{job}/artefacts/{set_key(STUDY + '.1', [])}", content=pack(np.zeros((4, 4))),
                   headers=_hdr("T1"), params={"producer": "overview", "version": "1", "name": "tiles"})
    assert r.status_code == 200, r.text
    assert beats == ["in a thread"]


def test_a_damaged_input_fails_the_job_through_the_executor(tmp_path, monkeypatch):
    node, client = _node(tmp_path)
    _arrive(node, STUDY, STUDY + ".1", ["1.2.826.1.1.1"])
    job = _claimed(node, client)

    def damaged(locator):
        exc = IntegrityError("payload checksum mismatch")
        exc.locator = locator
        raise exc

    monkeypatch.setattr(node.vault, "read", damaged)
    monkeypatch.setattr(node.vault, "quarantine_damaged", lambda locator, reason: None)
    r = client.get(f"/api/worker/jobs/{job}/inputs", headers=_hdr("T1"))
    assert r.status_code == 200 and r.content == b""
    row = node.index.job(job)
    assert row["status"] == "failed" and "spool integrity check failed" in row["error"]
    assert node.executor.ended == [job]  # audited and deliveries woken, as every other end of a job


def test_a_stale_ticket_gets_409_and_the_worker_drops_the_attempt_an_unknown_one_403(tmp_path):
    node, client = _node(tmp_path)
    job = _claimed(node, client)
    assert node.index.lose_attempt(job, 1, "no heartbeat", 3) == "requeued"
    r = client.post(f"/api/worker/jobs/{job}/progress", headers=_hdr("T1"), json={"fraction": 0.5, "message": "m"})
    assert r.status_code == 409, r.text
    assert client.get(f"/api/worker/jobs/{job}/inputs", headers=_hdr("T1")).status_code == 409
    assert client.get(f"/api/worker/jobs/{job}/inputs", headers=_hdr("guessed")).status_code == 403
    assert client.get(f"/api/worker/jobs/{job}/inputs", headers=_hdr("")).status_code == 403
    nc = NodeClient("http://testserver", "hlm_worker", "w")
    nc.http = client
    client.headers.update({"Authorization": "Bearer hlm_worker", "X-Hilum-Worker": "w"})
    sop, data = _dicom(STUDY)
    with pytest.raises(AttemptEnded):
        nc.put_result(job, "T1", sop, data)


def test_a_claim_for_a_job_whose_study_grew_after_routing_supersedes_it(tmp_path):
    """Before: the worker was handed the routed set mixed with what had arrived since."""
    node, client = _node(tmp_path)
    study, series = "1.2.826.8", "1.2.826.8.1"
    _arrive(node, study, series, ["1.2.826.8.1.1"])
    assert node.index.mark_stable(study, 0, time.time())
    job = _job(node, study=study, key="g0", ticket="T")  # routed at generation 0
    _arrive(node, study, series, ["1.2.826.8.1.2"])  # a late instance: generation 1
    r = client.post(f"/api/worker/jobs/{job}/claim", headers=_hdr("T"))
    assert r.status_code == 409 and "superseded" in r.json()["detail"]
    row = node.index.job(job)
    assert row["status"] == "failed" and row["error"].startswith("superseded:") and node.executor.ended == [job]
    assert [a["state"] for a in node.index.attempts_of_job(job)] == ["failed"]
