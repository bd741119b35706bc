"""Jobs on a cluster: a real `hilum up` with ``executor.kind: celery``, a real redis-server broker and
`hilum worker` processes in their own empty directories (no path to the node's data)."""
from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import textwrap
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from node.jobs.broker import redis_keys
from node.phantom import generate_ct
from node.store.index import Index
from tests.nodeproc import REPO, NodeProcess, storescu, wait_for
from tests.redisproc import RedisServer, redis_server
from tests.slow_handler import PRELOAD

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-studies")
    return [generate_ct(root / f"s{i}", seed=10 + i, rows=64, cols=64, slices=12, pixel_spacing=6.0,
                        slice_thickness=8.0) for i in range(3)]


def write_rules(d: Path, sleep_s: float, queue: str = "cpu") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ct.yaml").write_text(textwrap.dedent(f"""\
        - name: ct-overview
          level: series
          match: {{Modality: CT}}
          handler: {{name: test-slow-overview, params: {{sleep_s: {sleep_s}, tiles: 4, tile_size: 64}}}}
          destinations: [orthanc]
          queue: {queue}
        """))
    return d


class ClusterNode(NodeProcess):
    def __init__(self, tmp: Path, broker: str, sleep_s: float, worker_lost_s: float = 15.0, **settings) -> None:
        executor = {"kind": "celery", "broker_url": broker, "worker_lost_s": worker_lost_s, "lost_task_s": 3.0}
        super().__init__(tmp / "data", write_rules(tmp / "rules", sleep_s), executor=executor, **settings)
        self.launcher = [sys.executable, "-c", PRELOAD]
        self.tmp = tmp

    def worker_token(self) -> Path:
        out = self.hilum("token", "create", "--role", "worker", "--config", str(self.config_path))
        assert out.returncode == 0, out.stderr
        f = self.tmp / "worker.token"
        f.write_text(out.stdout.strip())
        return f

    def index(self) -> Index:
        return Index(self.data_dir / "index.db")


class Worker:
    def __init__(self, node: ClusterNode, name: str, token_file: Path, queues: str = "cpu",
                 extra: tuple[str, ...] = (), env: dict | None = None) -> None:
        self.name = name
        self.work_dir = node.tmp / f"work-{name}"  # its own, empty: nothing of the node's data dir
        self.log = node.tmp / f"worker-{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PRELOAD, "worker", "--node", node.web, "--token-file", str(token_file),
             "--queues", queues, "--name", name, "--work-dir", str(self.work_dir), *extra],
            cwd=REPO, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def cluster(tmp_path):
    started: list = []

    def make(sleep_s: float, redis: RedisServer, **settings) -> ClusterNode:
        node = ClusterNode(tmp_path, redis.url, sleep_s, **settings).start()
        started.append(node)
        return node

    def worker(node: ClusterNode, name: str, token: Path, **kw) -> Worker:
        w = Worker(node, name, token, **kw)
        started.append(w)
        return w

    yield make, worker
    for thing in reversed(started):
        thing.stop()
        if isinstance(thing, NodeProcess):
            thing._kill_orthanc()


def _jobs_done(node: ClusterNode, n: int):
    jobs = node.api("GET", "/api/jobs").json()["jobs"]
    if len(jobs) < n or any(j["status"] != "done" for j in jobs):
        failed = [j for j in jobs if j["status"] == "failed"]
        assert not failed, failed[0]["error"]
        return None
    if all(d == "delivered" for j in jobs for r in j["results"] for d in r["deliveries"].values()):
        return jobs
    return None


def _orthanc_files(node: ClusterNode, study_uid: str) -> dict[str, bytes]:
    with node.orthanc() as c:
        found = c.post("/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}).json()
        return {pydicom.dcmread(BytesIO(b := c.get(f"/instances/{i}/file").content)).SOPInstanceUID: b for i in found}


def _local_run(node: NodeProcess, job_id: int, study, out: Path, extra: dict | None = None) -> dict[str, bytes]:
    """The same job through the local executor's code path (run_job on the node's machine): each
    result object's file, by SOP Instance UID."""
    from node.jobs.worker import JobSpec, job_created, run_job
    from node.store.vault import Vault, VaultSpec

    row = Index(node.data_dir / "index.db").job(job_id)
    spec = JobSpec(job_id=job_id, job_key=row["job_key"], study_uid=row["study_uid"], rule=row["rule"],
                   handler=row["handler"], params=json.loads(row["params_json"]),
                   series={row["series_uid"]: [str(p) for p in study.series_files()]},
                   results_dir=str(out / "results"), vault=VaultSpec(str(out), None),
                   created=job_created(row["created_at"]), extra=extra or {})
    meta, _, _ = run_job(spec, lambda f, m: None)
    vault = Vault(out, None)
    return {m["sop_instance_uid"]: vault.read_file(Path(m["path"])) for m in meta}


def _node_results(node: NodeProcess, job_id: int) -> dict[str, bytes]:
    """The result files the node recorded for a job (what a worker uploaded), by SOP Instance UID."""
    from node.store.vault import Vault

    vault = Vault(node.data_dir, None)  # the test node's spool is not encrypted
    return {r["sop_uid"]: vault.read_file(Path(r["path"]))
            for r in Index(node.data_dir / "index.db").results_of_job(job_id)}


def _data_set(part10: bytes) -> bytes:
    """A Part 10 file's data set, without preamble and file meta (which Orthanc writes its own of)."""
    assert part10[128:132] == b"DICM"
    meta = pydicom.dcmread(BytesIO(part10), stop_before_pixels=True).file_meta
    return part10[132 + 12 + int(meta.FileMetaInformationGroupLength):]


def test_two_workers_process_a_batch_like_the_local_executor(cluster, studies, tmp_path):
    make, worker = cluster
    with redis_server(tmp_path / "redis") as redis:
        node = make(1.5, redis)
        token = node.worker_token()
        workers = [worker(node, "w1", token), worker(node, "w2", token)]
        index = node.index()
        wait_for(lambda: len(index.workers()) == 2, 60, "both workers up")
        for s in studies:
            assert storescu(node.dicom_port, s.dicom_dir).returncode == 0
        jobs = wait_for(lambda: _jobs_done(node, len(studies)), 180, "every job done and delivered", interval=0.5)
        index = node.index()
        ran_on = set()
        for job in jobs:
            (attempt,) = index.attempts_of_job(job["id"])
            assert attempt["state"] == "done" and attempt["worker"] in {"w1", "w2"}
            ran_on.add(attempt["worker"])
            started = [h for h in job["history"] if h["event"] == "started"]
            assert [(h["attempt"], h["worker"]) for h in started] == [(1, attempt["worker"])]
            # Delivered once each: one delivery per result, sent in one attempt.
            for d in index.deliveries_of_job(job["id"]):
                assert d["status"] == "delivered" and d["attempts"] == 1
            study = next(s for s in studies if s.study_uid == job["study_uid"])
            local = _local_run(node, job["id"], study, tmp_path / f"local-{job['id']}")
            # The originals are a delivery batch of their own, beside the results'.
            in_orthanc = wait_for(lambda: len(f := _orthanc_files(node, study.study_uid)) >= 12 + len(local) and f,
                                  60, "the originals and the results in Orthanc", interval=0.5)
            remote = {u: b for u, b in in_orthanc.items() if u in local}
            assert set(remote) == set(local) == {r["sop_instance_uid"] for r in job["results"]}
            assert len(in_orthanc) == 12 + len(local)  # the originals and each result once
            # Byte for byte: the worker's files as the node recorded them, and the objects in Orthanc.
            assert _node_results(node, job["id"]) == local
            for uid, part10 in local.items():
                assert _data_set(remote[uid]) == _data_set(part10), f"{uid} in Orthanc differs from the local run"
        assert ran_on == {"w1", "w2"}, "both workers took jobs"
        # The workers kept nothing: their working directories hold no job files once done.
        for w in workers:
            assert not [p for p in w.work_dir.rglob("*") if p.is_file()]
        cl = node.api("GET", "/api/dashboard").json()["cluster"]
        assert {w["name"] for w in cl["workers"]} == {"w1", "w2"} and cl["queues"] == {"cpu": 0}
        assert all(w["queues"] == ["cpu"] and w["current_job"] is None for w in cl["workers"])
        metrics = node.api("GET", "/metrics").text
        assert 'hilum_queue_length{queue="cpu"} 0' in metrics and 'hilum_jobs{status="done"} 3' in metrics
        assert "hilum_workers_alive 2" in metrics and 'hilum_worker_busy{worker="w1"' in metrics
        status = node.hilum("status", "--config", str(node.config_path)).stdout
        assert "queues: cpu 0" in status and "worker w1 on" in status and "worker w2 on" in status


def test_a_worker_killed_mid_job_loses_it_to_the_other(cluster, studies, tmp_path):
    make, worker = cluster
    with redis_server(tmp_path / "redis") as redis:
        node = make(8.0, redis, worker_lost_s=5.0)  # short, so the test need not wait long for the loss
        token = node.worker_token()
        workers = {n: worker(node, n, token) for n in ("w1", "w2")}
        study = studies[0]
        assert storescu(node.dicom_port, study.dicom_dir).returncode == 0
        index = node.index()

        def claimed():
            jobs = index.jobs()
            rows = index.attempts_of_job(jobs[0]["id"]) if jobs else []
            return rows[0] if rows and rows[0]["state"] == "claimed" else None

        first = wait_for(claimed, 60, "a worker to take the job", interval=0.1)
        victim, other = first["worker"], ({"w1", "w2"} - {first["worker"]}).pop()
        workers[victim].kill()
        (job,) = wait_for(lambda: _jobs_done(node, 1), 120, "the job done by the other worker", interval=0.5)
        a1, a2 = index.attempts_of_job(job["id"])
        assert (a1["worker"], a1["state"]) == (victim, "lost")
        assert (a2["worker"], a2["state"]) == (other, "done")
        events = [(h["event"], h.get("worker")) for h in job["history"]]
        assert events[1:] == [("started", victim), ("attempt lost", victim), ("started", other), ("done", None)]
        assert job["attempts"] == 2
        in_orthanc = wait_for(lambda: len(f := _orthanc_files(node, study.study_uid)) >= 12 + 1 and f, 60,
                              "the originals and the result in Orthanc", interval=0.5)
        assert len(in_orthanc) == 12 + 1  # the originals and the one result: no duplicate


def test_a_node_restarted_mid_job_takes_the_running_attempt_back(cluster, studies, tmp_path):
    make, worker = cluster
    with redis_server(tmp_path / "redis") as redis:
        node = make(8.0, redis)
        worker(node, "w1", node.worker_token())
        assert storescu(node.dicom_port, studies[0].dicom_dir).returncode == 0
        index = node.index()
        wait_for(lambda: index.jobs() and [a["state"] for a in index.attempts_of_job(index.jobs()[0]["id"])]
                 == ["claimed"], 60, "the worker to take the job", interval=0.1)
        node.stop()  # SIGTERM: a clean stop while the worker computes
        node.start()
        (job,) = wait_for(lambda: _jobs_done(node, 1), 120, "the job done", interval=0.5)
        # It finished where it ran; it was not also queued again.
        assert job["attempts"] == 1 and [a["state"] for a in index.attempts_of_job(job["id"])] == ["done"]
        assert [h["event"] for h in job["history"]] == ["created", "started", "done"]
        wait_for(lambda: len(_orthanc_files(node, studies[0].study_uid)) >= 12 + 1, 60,
                 "the originals and the result in Orthanc", interval=0.5)
        assert len(_orthanc_files(node, studies[0].study_uid)) == 12 + 1


@pytest.mark.parametrize("persistent", [True, False], ids=["append-only", "no-persistence"])
def test_jobs_queued_across_a_redis_restart_are_not_lost(cluster, studies, tmp_path, persistent):
    make, worker = cluster
    redis = RedisServer(tmp_path / "redis", appendonly=persistent).start()
    try:
        node = make(0.0, redis)
        token = node.worker_token()
        for s in studies[:2]:
            assert storescu(node.dicom_port, s.dicom_dir).returncode == 0
        index = node.index()
        def queued_in_the_broker():  # the attempts' rows are committed just before their tasks are sent
            with redis.client() as c:
                return _waiting(c) == 2
        wait_for(lambda: len(index.jobs()) == 2 and all(
            [a["state"] for a in index.attempts_of_job(j["id"])] == ["queued"] for j in index.jobs())
            and queued_in_the_broker(), 60, "two jobs queued in the broker")
        with redis.client() as c:
            assert _waiting(c) == 2
        redis.stop()
        redis.start()  # same directory and port
        with redis.client() as c:
            # With its append-only file the queue comes back; without, the node must notice the loss.
            assert _waiting(c) == (2 if persistent else 0)
        worker(node, "w1", token)
        jobs = wait_for(lambda: _jobs_done(node, 2), 120, "both jobs done", interval=0.5)
        for job in jobs:
            assert job["attempts"] == 1 and len(index.attempts_of_job(job["id"])) == 1
            republished = [h for h in job["history"] if h["event"] == "task lost by the broker: published again"]
            assert len(republished) == (0 if persistent else 1)
            assert [h["event"] for h in job["history"]].count("started") == 1
    finally:
        redis.stop()


def _waiting(c) -> int:
    """Tasks waiting in queue cpu, in all of its priority lists."""
    return sum(c.llen(k) for k in redis_keys("cpu"))


def _queued_tickets(redis: RedisServer) -> dict[int, str]:
    with redis.client() as c:
        msgs = [json.loads(m) for k in redis_keys("cpu") for m in c.lrange(k, 0, -1)]
    args = [json.loads(base64.b64decode(m["body"]))[0] for m in msgs]
    return {job_id: ticket for job_id, ticket in args}


def _audit(node: ClusterNode) -> list[dict]:
    lines = (node.data_dir / "audit" / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == "worker-access"]


def test_a_worker_reads_only_the_job_it_was_given(cluster, studies, tmp_path):
    make, _ = cluster
    with redis_server(tmp_path / "redis") as redis:
        node = make(0.0, redis, worker_lost_s=60.0)  # the probe below sends no heartbeats
        token = node.worker_token().read_text()
        for s in studies[:2]:
            assert storescu(node.dicom_port, s.dicom_dir).returncode == 0
        tickets = wait_for(lambda: len(t := _queued_tickets(redis)) == 2 and t, 60, "two tasks in the queue")
        # What an autoscaler reads: two tasks waiting, no worker.
        assert 'hilum_queue_length{queue="cpu"} 2' in node.api("GET", "/metrics").text
        assert "queues: cpu 2" in node.hilum("status", "--config", str(node.config_path)).stdout
        (a, ta), (b, tb) = sorted(tickets.items())

        def call(method, path, tok=token, ticket=None):
            headers = {"X-Hilum-Worker": "probe", **({"Authorization": f"Bearer {tok}"} if tok else {}),
                       **({"X-Hilum-Ticket": ticket} if ticket else {})}
            return httpx.request(method, node.web + path, headers=headers, timeout=30)

        assert call("POST", f"/api/worker/jobs/{a}/claim", tok="hlm_wrong", ticket=ta).status_code == 401
        assert call("POST", f"/api/worker/jobs/{a}/claim", tok=None, ticket=ta).status_code == 401
        assert call("POST", f"/api/worker/jobs/{a}/claim", tok=node.token, ticket=ta).status_code == 403  # admin
        assert call("POST", f"/api/worker/jobs/{b}/claim", ticket=ta).status_code == 403  # another job's ticket
        assert call("GET", "/api/studies").status_code == 403  # a worker token opens nothing else
        assert call("GET", f"/dicom-web/studies/{studies[0].study_uid}/series").status_code == 403
        claim = call("POST", f"/api/worker/jobs/{a}/claim", ticket=ta)
        assert claim.status_code == 200 and claim.json()["series"][0]["instances"] == 12
        assert call("GET", f"/api/worker/jobs/{b}/inputs", ticket=ta).status_code == 403
        assert call("GET", f"/api/worker/jobs/{b}/inputs").status_code == 403
        got = call("GET", f"/api/worker/jobs/{a}/inputs", ticket=ta)
        assert got.status_code == 200 and len(got.content) > 12 * 64 * 64 * 2
        sop = "1.2.3.4"
        assert call("PUT", f"/api/worker/jobs/{b}/results/{sop}", ticket=ta).status_code == 403
        assert call("POST", f"/api/worker/jobs/{a}/claim", ticket=ta).status_code == 409  # one claim per attempt
        # Artefacts (node/jobs/artefacts.py): of the job's own series and instance set only, and only
        # the job's own handler's, and only an array.
        from node.jobs.artefacts import pack, set_key

        index = node.index()
        series_a, series_b = index.job(a)["series_uid"], index.job(b)["series_uid"]
        own, other = (set_key(u, index.instance_uids(u)) for u in (series_a, series_b))
        query = "?producer=test-slow-overview&version=1&name=tiles"
        assert call("GET", f"/api/worker/jobs/{a}/artefacts/{other}{query}", ticket=ta).status_code == 403
        assert call("GET", f"/api/worker/jobs/{a}/artefacts/{own}{query}", ticket=ta).status_code == 404  # none kept

        def put(data: bytes, q: str = query) -> int:
            return httpx.put(node.web + f"/api/worker/jobs/{a}/artefacts/{own}{q}", content=data, timeout=30,
                             headers={"Authorization": f"Bearer {token}", "X-Hilum-Ticket": ta}).status_code

        assert put(pack(np.ones((2, 3, 3), np.uint8)), query.replace("test-slow-overview", "ct-anatomy")) == 422
        assert put(b"not an array") == 422 and put(pack(np.ones((2, 3, 3), np.uint8))[:-4]) == 422
        assert put(pack(np.ones((2, 3, 3), np.uint8))) == 200
        got = call("GET", f"/api/worker/jobs/{a}/artefacts/{own}{query}", ticket=ta)
        assert got.status_code == 200 and got.content == pack(np.ones((2, 3, 3), np.uint8))
        refused = [e for e in _audit(node) if e["outcome"] != 0]
        assert len(refused) == 8 and all(e["user"] == "worker probe" for e in refused)
        assert {e["outcome_description"] for e in refused} >= {
            "invalid or missing worker token", "the worker API needs a worker-role token, not admin",
            f"no attempt of job {b} for this ticket", f"no running attempt of job {b} for this ticket"}
        granted = [e for e in _audit(node) if e["outcome"] == 0]
        assert [(e["detail"]["job"], e["detail"]["request"], e["objects"]) for e in granted] == [
            (a, "inputs", 12), (a, "artefact test-slow-overview tiles", 1)]


def test_worker_concurrency_runs_processes_that_die_with_it(cluster, tmp_path):
    from tests.test_lifeline import descendants

    make, _ = cluster
    with redis_server(tmp_path / "redis") as redis:
        node = make(0.0, redis)
        token = node.worker_token()
        parent = subprocess.Popen(
            [sys.executable, "-c", PRELOAD, "worker", "--node", node.web, "--token-file", str(token),
             "--queues", "cpu,gpu", "--concurrency", "2", "--name", "multi", "--work-dir", str(tmp_path / "work")],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            index = node.index()
            wait_for(lambda: {w["name"] for w in index.workers()} == {"multi-1", "multi-2"}, 90, "two worker processes")
            assert all(json.loads(w["queues"]) == ["cpu", "gpu"] for w in index.workers())
            children = descendants(parent.pid)
            assert len(children) >= 2
            parent.kill()  # kill -9 of `hilum worker`
            parent.wait(10)
            wait_for(lambda: not [p for p in children if Path(f"/proc/{p}/cmdline").exists()
                                  and Path(f"/proc/{p}/cmdline").read_bytes()], 30, "its worker processes to exit")
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait()


def test_a_worker_over_https_trusts_only_the_given_ca(cluster, studies, tmp_path, monkeypatch):
    import os

    make, worker = cluster
    pki = tmp_path / "pki"
    r = subprocess.run([sys.executable, "-m", "node.cli", "cert", "self-signed", str(pki), "--cn", "localhost"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.pem"))  # this test's own calls trust the development CA

    class HttpsCluster(ClusterNode):
        @property
        def web(self) -> str:
            return f"https://localhost:{self.config['web_port']}"

    with redis_server(tmp_path / "redis") as redis:
        node = HttpsCluster(tmp_path, redis.url, 0.0,
                            web_tls={"cert": str(pki / "server.pem"), "key": str(pki / "server.key")}).start()
        try:
            token = node.worker_token()
            plain_env = {k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}
            untrusting = worker(node, "nocert", token, env=plain_env)  # the system CAs only: refuses the node
            assert untrusting.proc.wait(60) != 0
            assert "CERTIFICATE_VERIFY_FAILED" in untrusting.log.read_text()
            worker(node, "tls", token, extra=("--ca-file", str(pki / "ca.pem")), env=plain_env)
            assert storescu(node.dicom_port, studies[0].dicom_dir).returncode == 0
            (job,) = wait_for(lambda: _jobs_done(node, 1), 120, "the job done over HTTPS", interval=0.5)
            assert [h.get("worker") for h in job["history"] if h["event"] == "started"] == ["tls"]
        finally:
            node.stop()
            node._kill_orthanc()


def test_remote_workers_reuse_ct_anatomys_lungs_through_the_node(cluster, tmp_path):
    """The lung mask ct-anatomy keeps (node/jobs/artefacts.py) reaches a lung-nodules job on another
    worker: the first worker hands it to the node, the second has it from the node, and finds exactly
    what a run that segments the lungs itself finds. The lung-nodules rule's queue has no worker until
    ct-anatomy is done, so the order is certain."""
    from handlers.ct_anatomy import lung_artefact
    from node.jobs.artefacts import set_key

    ct = generate_ct(tmp_path / "ct", seed=3, rows=160, cols=160, slices=40, pixel_spacing=2.2, slice_thickness=1.0,
                     nodules=4, nodule_diameter_mm=(6.0, 12.0))
    _, worker = cluster
    with redis_server(tmp_path / "redis") as redis:
        node = ClusterNode(tmp_path, redis.url, 0.0)
        (node.tmp / "rules" / "ct.yaml").write_text(textwrap.dedent("""\
            - name: anatomy
              level: series
              match: {Modality: CT}
              handler: {name: ct-anatomy}
              destinations: [orthanc]
              queue: cpu
            - name: nodules
              level: series
              match: {Modality: CT}
              handler: {name: lung-nodules}
              destinations: [orthanc]
              queue: later
            """))
        node.start()
        try:
            token = node.worker_token()
            worker(node, "w1", token, queues="cpu")
            assert storescu(node.dicom_port, ct.dicom_dir).returncode == 0

            def job_of(handler: str):
                jobs = [j for j in node.api("GET", "/api/jobs").json()["jobs"] if j["handler"] == handler]
                assert not [j for j in jobs if j["status"] == "failed"], jobs[0]["error"]
                return jobs[0] if jobs and jobs[0]["status"] == "done" else None

            anatomy = wait_for(lambda: job_of("ct-anatomy"), 240, "ct-anatomy done on worker w1", interval=0.5)
            assert anatomy["history"][-1]["provenance"]["worker"] == "w1"
            # The node keeps it under its data directory, for this series and instance set.
            index = node.index()
            key = set_key(ct.series_uid, index.instance_uids(ct.series_uid))
            from node.jobs.artefacts import ArtefactCache
            from node.store.vault import Vault

            kept = ArtefactCache(node.data_dir / "artefacts", Vault(node.data_dir, None)).load(key, lung_artefact())
            assert kept is not None and kept.shape == (40, 160, 160) and set(np.unique(kept)) == {0, 2, 3}

            worker(node, "w2", token, queues="later")
            nodules = wait_for(lambda: job_of("lung-nodules"), 240, "lung-nodules done on worker w2", interval=0.5)
            provenance = nodules["history"][-1]["provenance"]
            assert provenance["worker"] == "w2" and provenance["lungs"] == "kept from a ct-anatomy job"
            granted = [e for e in _audit(node) if e["outcome"] == 0 and e["detail"]["job"] == nodules["id"]]
            assert "artefact ct-anatomy lung-labels" in [e["detail"]["request"] for e in granted]

            # The same findings as segmenting the lungs itself (a local run, in an empty directory).
            alone = _local_run(node, nodules["id"], ct, tmp_path / "alone")
            remote = _node_results(node, nodules["id"])
            assert set(remote) == set(alone) and len(alone) >= 2  # an SR and the nodules' SEG: found some
            assert remote == alone
        finally:
            node.stop()
            node._kill_orthanc()
