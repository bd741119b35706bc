"""`hilum worker`: a job worker on any host, fed by Celery, talking to the node over HTTP(S).

It needs no access to the node's disk or keys. For each task ("run attempt T of job J") it claims
the attempt from the node, streams that job's instances (and its priors, when its rule asked for
them) into a private temporary directory, runs
the same ``run_job`` as the node's local executor (handler → encoders, into that directory, sealed
with a keyless local vault), uploads the result objects and reports done, or the failure with its
reason. A heartbeat thread tells the node it is alive and what it runs; a worker that stops
beating loses its attempt to another worker (node/jobs/celery_executor.py).

``--concurrency N`` runs N single-job worker processes (each with its own heartbeat), which is
also the GPU pattern: one process per GPU, ``CUDA_VISIBLE_DEVICES`` set per process.
"""
from __future__ import annotations

import logging
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import httpx

from node.jobs.broker import TASK, make_celery
from node.jobs.remote_models import model_folder
from node.jobs.worker import JobSpec, SpoolIntegrityError, run_job, warm_up
from node.store.vault import Vault, VaultSpec
from node.jobs.wire import FRAME, TICKET, WORKER

log = logging.getLogger("hilum.worker")
RESULT_PATIENCE_S = 600.0  # a finished job waits this long for a restarting node to take its results


class AttemptEnded(Exception):
    """The node no longer wants this attempt (given to another worker, timed out): drop it."""


class NodeClient:
    def __init__(self, url: str, token: str, name: str, verify: str | bool = True) -> None:
        if isinstance(verify, str):  # a CA bundle: the node's certificate is checked against it only
            verify = ssl.create_default_context(cafile=verify)
        self.http = httpx.Client(base_url=url.rstrip("/"), verify=verify,
                                 headers={"Authorization": f"Bearer {token}", WORKER: name},
                                 timeout=httpx.Timeout(120, connect=10))

    def _call(self, method: str, path: str, ticket: str | None = None, patience: float = 0.0,
              **kw) -> httpx.Response:
        """One request; ``patience``: seconds to keep retrying while the node is unreachable (restarting)."""
        deadline = time.monotonic() + patience
        delay = 0.5
        headers = {**({TICKET: ticket} if ticket else {}), **kw.pop("headers", {})}
        while True:
            try:
                r = self.http.request(method, path, headers=headers, **kw)
                break
            except httpx.TransportError:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        if r.status_code == 409:
            raise AttemptEnded(r.json().get("detail", "attempt ended"))
        r.raise_for_status()
        return r

    def config(self) -> dict:
        return self._call("GET", "/api/worker/config").json()

    def heartbeat(self, body: dict, ticket: str | None) -> None:
        self._call("POST", "/api/worker/heartbeat", ticket, json=body)

    def claim(self, job_id: int, ticket: str) -> dict:
        return self._call("POST", f"/api/worker/jobs/{job_id}/claim", ticket).json()

    def fetch_inputs(self, job: dict, ticket: str, into: Path) -> dict[str, list[str]]:
        """The job's instances, written as files under ``into``: {series UID: [paths]} in the node's order."""
        got = self._fetch_series(f"/api/worker/jobs/{job['job_id']}/inputs", ticket, job["series"], into)
        return dict(zip([s["uid"] for s in job["series"]], got))

    def fetch_priors(self, job: dict, ticket: str, into: Path) -> list[dict]:
        """The job's priors (JobSpec.extra["priors"], as the local executor gives them), their
        instances written as files under ``into``."""
        series = [s for p in job["priors"] for s in p["series"]]
        got = iter(self._fetch_series(f"/api/worker/jobs/{job['job_id']}/priors", ticket, series, into))
        return [{**{k: p[k] for k in ("study_uid", "source", "study_date", "study_time")},
                 "series": {s["uid"]: next(got) for s in p["series"]}} for p in job["priors"]]

    def _fetch_series(self, path: str, ticket: str, series: list[dict], into: Path) -> list[list[str]]:
        """One stream of frames (series position, length, bytes) into files, checked against the
        counts the claim announced ({"uid", "instances"} per series): the paths per series."""
        uids = [s["uid"] for s in series]
        paths: dict[int, list[str]] = {i: [] for i in range(len(uids))}
        for i in range(len(uids)):
            (into / str(i)).mkdir(parents=True)
        with self.http.stream("GET", path, headers={TICKET: ticket}) as r:
            if r.status_code == 409:
                raise AttemptEnded("attempt ended")
            r.raise_for_status()
            buf = bytearray()
            want = None
            for chunk in r.iter_bytes(1 << 20):
                buf += chunk
                while True:
                    if want is None:
                        if len(buf) < FRAME.size:
                            break
                        want = FRAME.unpack_from(buf)
                        del buf[:FRAME.size]
                    pos, length = want
                    # A stream that is not what the claim announced is a failure that says so (never
                    # a KeyError), found before more of it is written to disk.
                    if pos not in paths or len(paths[pos]) >= series[pos]["instances"]:
                        raise RuntimeError(f"{path.rsplit('/', 1)[-1]} stream does not match the claim: "
                                           f"more instances at series position {pos} than the "
                                           f"{len(uids)} series announced ({[s['instances'] for s in series]})")
                    if len(buf) < length:
                        break
                    p = into / str(pos) / f"{len(paths[pos]):06d}.dcm"
                    p.write_bytes(buf[:length])
                    paths[pos].append(str(p))
                    del buf[:length]
                    want = None
        got = {uids[i]: len(v) for i, v in paths.items()}
        expected = {s["uid"]: s["instances"] for s in series}
        if got != expected or buf:
            raise RuntimeError(f"{path.rsplit('/', 1)[-1]} stream incomplete: got {got}, expected {expected}")
        return [paths[i] for i in range(len(uids))]

    def model_file(self, job_id: int, ticket: str, name: str) -> Iterator[bytes]:
        """One file of the model version the node resolved for this attempt, in chunks."""
        with self.http.stream("GET", f"/api/worker/jobs/{job_id}/model/{name}", headers={TICKET: ticket}) as r:
            if r.status_code == 409:
                raise AttemptEnded("attempt ended")
            r.raise_for_status()
            yield from r.iter_bytes(1 << 20)

    def artefact(self, job_id: int, ticket: str, series_key: str, key, data: bytes | None = None) -> bytes | None:
        """GET (``data`` None: the entry's bytes, None when the node keeps none) or PUT one artefact
        of the job's series (node/jobs/artefacts.py)."""
        params = {"producer": key.producer, "version": key.version, "name": key.name, "variant": key.variant}
        path = f"/api/worker/jobs/{job_id}/artefacts/{series_key}"
        if data is not None:
            self._call("PUT", path, ticket, params=params, content=data,
                       headers={"Content-Type": "application/octet-stream"})
            return None
        r = self.http.get(path, params=params, headers={TICKET: ticket})
        if r.status_code == 404:
            return None
        if r.status_code == 409:
            raise AttemptEnded(r.json().get("detail", "attempt ended"))
        r.raise_for_status()
        return r.content

    def progress(self, job_id: int, ticket: str, fraction: float, message: str) -> None:
        try:
            self._call("POST", f"/api/worker/jobs/{job_id}/progress", ticket,
                       json={"fraction": fraction, "message": message[:500]})
        except httpx.TransportError as exc:  # the node restarting must not fail the job: progress is advisory
            log.warning("job %d: progress not reported (%s)", job_id, exc)

    def put_result(self, job_id: int, ticket: str, sop_uid: str, data: bytes) -> None:
        self._call("PUT", f"/api/worker/jobs/{job_id}/results/{sop_uid}", ticket, RESULT_PATIENCE_S, content=data,
                   headers={"Content-Type": "application/dicom"})

    def done(self, job_id: int, ticket: str, results: list[dict], provenance: dict, figures: dict) -> None:
        keep = ("sop_instance_uid", "sop_class_uid", "series_instance_uid", "modality")
        self._call("POST", f"/api/worker/jobs/{job_id}/done", ticket, RESULT_PATIENCE_S,
                   json={"results": [{k: r[k] for k in keep} for r in results], "provenance": provenance,
                         "figures": figures})

    def fail(self, job_id: int, ticket: str, error: str) -> None:
        self._call("POST", f"/api/worker/jobs/{job_id}/fail", ticket, RESULT_PATIENCE_S, json={"error": error[:8000]})


def failure_text(exc: BaseException) -> str:
    """The reason a job failed, worded as the local executor words it (node/jobs/worker.py)."""
    from node.handler_api import HandlerRefusal

    if isinstance(exc, HandlerRefusal):
        return f"refused: {exc}"
    if isinstance(exc, SpoolIntegrityError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory"
    return f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"


class RemoteArtefacts:
    """The node's artefact cache as ``run_job`` uses it (``load``/``save``), over the worker API: a
    job on this worker reuses what a job on any worker (or the node) kept, and keeps what it offers
    for the next. The node is a cache here too: failing to reach it costs the job time, never its
    results, so a transport or HTTP error is a miss (load) or an entry not kept (save)."""

    def __init__(self, client: NodeClient, job_id: int, ticket: str) -> None:
        self.client, self.job_id, self.ticket = client, job_id, ticket

    def load(self, series_key: str, key):
        from node.jobs.artefacts import UNUSABLE, unpack

        try:
            data = self.client.artefact(self.job_id, self.ticket, series_key, key)
            return None if data is None else unpack(data)
        except (httpx.HTTPError, *UNUSABLE) as exc:
            log.warning("job %d: artefact %s of %s not had from the node (%s): computed here", self.job_id,
                        key.name, key.producer, exc)
            return None

    def save(self, series_key: str, key, array) -> None:
        from node.jobs.artefacts import pack

        try:
            self.client.artefact(self.job_id, self.ticket, series_key, key, pack(array))
        except httpx.HTTPError as exc:
            log.warning("job %d: artefact %s of %s not kept by the node: %s", self.job_id, key.name, key.producer, exc)


class RemoteWorker:
    def __init__(self, client: NodeClient, name: str, queues: list[str], work_dir: Path, heartbeat_s: float) -> None:
        self.client, self.name, self.queues, self.work_dir = client, name, queues, work_dir
        self.heartbeat_s = heartbeat_s
        self._current: tuple[int, str] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start_heartbeat(self) -> None:
        threading.Thread(target=self._beat, name="worker-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                cur = self._current
            body = {"name": self.name, "host": socket.gethostname(), "queues": self.queues,
                    "job_id": cur[0] if cur else None, "pid": os.getpid()}
            try:
                self.client.heartbeat(body, cur[1] if cur else None)
            except Exception as exc:  # noqa: BLE001 - node restarting: keep working, beat again later
                log.warning("heartbeat not taken: %s", exc)
            self._stop.wait(self.heartbeat_s)

    def run(self, job_id: int, ticket: str) -> str:
        """One task. Returns what became of it (for the log)."""
        try:
            job = self.client.claim(job_id, ticket)
        except AttemptEnded as exc:
            return f"job {job_id}: not run ({exc})"
        with self._lock:
            self._current = (job_id, ticket)
        try:
            return self._run(job, ticket)
        except AttemptEnded as exc:
            return f"job {job_id}: abandoned ({exc})"
        finally:
            with self._lock:
                self._current = None

    def _run(self, job: dict, ticket: str) -> str:
        job_id = job["job_id"]
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"job-{job_id}-", dir=self.work_dir) as tmp:
            d = Path(tmp)
            try:
                series = self.client.fetch_inputs(job, ticket, d / "inputs")
                extra = {"priors": self.client.fetch_priors(job, ticket, d / "priors")} if job.get("priors") else {}
                extra |= {k: job[k] for k in ("priors_note", "retrieved_by") if job.get(k)}
                spec = JobSpec(job_id=job_id, job_key=job["job_key"], study_uid=job["study_uid"], rule=job["rule"],
                               handler=job["handler"], params=job["params"], series=series,
                               results_dir=str(d / "results"), vault=VaultSpec(str(d), None),
                               options=job.get("options") or {}, created=job["created"],
                               device_serial=job.get("device_serial", ""),
                               extra=extra | self._model(job, ticket))
                meta, provenance, figures = run_job(spec, lambda f, m: self.client.progress(job_id, ticket, float(f),
                                                                                              str(m)),
                                                    artefacts=RemoteArtefacts(self.client, job_id, ticket))
                # Uploading and reporting belong in here too: a result the node refuses (413, 422, a
                # 5xx) must reach it as this attempt's failure with that reason, not leave the
                # attempt open until the node takes it for lost with its worker.
                vault = Vault(d, None)  # the keyless local vault run_job sealed the results with (CRC only)
                for m in meta:
                    self.client.put_result(job_id, ticket, m["sop_instance_uid"], vault.read_file(Path(m["path"])))
                self.client.done(job_id, ticket, meta, provenance, figures)
            except AttemptEnded:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure goes to the node with its reason
                self.client.fail(job_id, ticket, failure_text(exc))
                return f"job {job_id}: failed"
        return f"job {job_id}: {len(meta)} result(s)"

    def _model(self, job: dict, ticket: str) -> dict:
        """A model job runs the version the node resolved (its files from the node, cached by hash),
        never one from this host's own models/ folder."""
        manifest = job.get("model")
        if not manifest:
            return {}
        folder = model_folder(manifest, self.work_dir / "models",
                              lambda name: self.client.model_file(job["job_id"], ticket, name))
        return {"model_dir": str(folder), "model_version": manifest["version"]}


def serve(node_url: str, token: str, queues: list[str], name: str, work_dir: Path, verify: str | bool = True) -> None:
    """One worker process: one job at a time, until killed."""
    client = NodeClient(node_url, token, name, verify)
    cfg = client.config()
    worker = RemoteWorker(client, name, queues, work_dir, cfg["heartbeat_s"])
    app = make_celery(cfg["broker_url"], cfg["visibility_timeout_s"])

    @app.task(name=TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
    def run_attempt(task, job_id: int, ticket: str) -> str:
        try:
            outcome = worker.run(job_id, ticket)
        except httpx.TransportError as exc:  # the node is unreachable: the task waits in the broker
            raise task.retry(countdown=5, exc=exc)
        log.info("%s", outcome)
        return outcome

    # Heavy imports now, not inside the first job: they hold the interpreter for seconds, which would
    # starve the heartbeat thread and could make the node take this worker for lost.
    import node.encoders  # noqa: F401
    warm_up()  # the handlers' modules and highdicom's tables of the standard
    worker.start_heartbeat()
    app.worker_main(["worker", "-Q", ",".join(queues), "-c", "1", "-P", "solo", "-n", f"{name}@%h",
                     "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"])


def serve_many(argv_base: list[str], name: str, concurrency: int) -> int:
    """``concurrency`` single-job worker processes that die with this one."""
    from node.lifeline import die_with_parent

    procs = [subprocess.Popen([sys.executable, "-m", "node.cli", "worker", *argv_base, "--concurrency", "1",
                               "--name", f"{name}-{i + 1}"], preexec_fn=die_with_parent())
             for i in range(concurrency)]
    codes = [p.wait() for p in procs]
    return max(codes, default=0)
