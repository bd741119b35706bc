"""/api/worker: what a remote job worker (``hilum worker``, node/jobs/remote.py) may do, and nothing more.

A worker authenticates with a worker-role token; every request about a job also carries that
attempt's ticket (``X-Hilum-Ticket``, from the Celery task). Ticket and token together open only
the current attempt of that one job: its inputs and its priors (streamed from the vault, verified
and decrypted here, never a path or a key), its progress, its results. A stale attempt (the node gave
it up: worker lost, timed out) gets 409 and its results are not taken: one result set per attempt.
Every grant and every refusal is audited.

Inputs are one stream of frames: ``>IQ`` (series position, length) then the instance's bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from node.encoders.context import NODE_DEVICE_SERIAL
from node.jobs.broker import ticket_hash
from node.jobs.executor import superseded
from node.jobs.remote_models import ModelIntegrityError, claim_model, served_file
from node.jobs.worker import job_created
from node.jobs.wire import FRAME, TICKET, WORKER
from node.models.card import CardError
from node.models.versions import ModelRegistry
from node.receive.ingest import InflatedTooLarge, instance_facts
from node.receive.spool import fsync_dirs, valid_uid
from node.store.retrieves import priors_of_job, retrieved_by
from node.store.vault import IntegrityError
from node.web.auth import WORKER_ROLE, Principal, hash_token, require_viewer
from node.web.views import cluster_summary

router = APIRouter(prefix="/api/worker", tags=["worker"])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Heartbeat(_Body):
    name: str = Field(min_length=1, max_length=128)
    host: str = Field(max_length=256)
    queues: list[str]
    job_id: int | None = None
    pid: int | None = None


class Progress(_Body):
    fraction: float = Field(ge=0, le=1)
    message: str = Field(max_length=500)


class ResultMeta(_Body):
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    modality: str

    @field_validator("sop_instance_uid", "sop_class_uid", "series_instance_uid")
    @classmethod
    def _uid(cls, v: str) -> str:
        # The SOP Instance UID names the result's file (results/<job>/<uid>.dcm): anything but a UID
        # ('../1/<uid>', '../../tmp/x') would hand another job's file, or any file, to delivery.
        if not valid_uid(v):
            raise ValueError("not a DICOM UID")
        return v


class Done(_Body):
    results: list[ResultMeta]
    provenance: dict = {}
    figures: dict = {}  # the worker's seconds per phase and peak memory (node.jobs.worker.run_job)


class Failed(_Body):
    error: str = Field(max_length=8000)


def _worker_name(request: Request) -> str:
    return f"worker {request.headers.get(WORKER, '?')[:128]}"


def _refuse(request: Request, code: int, reason: str, job_id: int | None = None) -> None:
    node = request.app.state.node
    node.audit.worker_access(_worker_name(request), request.client.host if request.client else None,
                             job_id=job_id, study_uid=None, what=request.url.path, ok=False, reason=reason)
    raise HTTPException(code, reason, headers={"WWW-Authenticate": "Bearer"} if code == 401 else None)


def require_worker(request: Request) -> str:
    """The worker's name (self-reported, for histories), once its token is a worker-role token."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    role = request.app.state.node.index.token_role(hash_token(token.strip())) \
        if scheme.lower() == "bearer" and token.strip() else None
    if role is None:
        _refuse(request, 401, "invalid or missing worker token")
    if role != WORKER_ROLE:
        _refuse(request, 403, f"the worker API needs a worker-role token, not {role}")
    return request.headers.get(WORKER, "unnamed")[:128]


def _attempt(request: Request, job_id: int):
    index = request.app.state.node.index
    ticket = request.headers.get(TICKET, "")
    a = index.live_attempt(job_id, ticket_hash(ticket)) if ticket else None
    if a is None:
        # A ticket of one of this job's attempts that the node has given up (lost, timed out, ended)
        # gets 409 as documented: the worker (node/jobs/remote.py) takes 409 for AttemptEnded and drops
        # the attempt; any other ticket is no grant at all (403).
        stale = bool(ticket) and any(r["ticket_hash"] == ticket_hash(ticket) for r in index.attempts_of_job(job_id))
        _refuse(request, 409 if stale else 403,
                f"attempt of job {job_id} ended: the node no longer wants it" if stale
                else f"no running attempt of job {job_id} for this ticket", job_id)
    return a


def _executor(request: Request):
    ex = request.app.state.node.executor
    if not hasattr(ex, "job_ended"):
        raise HTTPException(404, "this node runs its jobs locally (executor.kind: local)")
    return ex


@router.get("/config")
def config(request: Request, _: str = Depends(require_worker)) -> dict:
    s = request.app.state.node.settings
    _executor(request)
    return {"broker_url": s.executor.broker_url,
            "visibility_timeout_s": s.executor.visibility_timeout(s.handler_timeout_s),
            "heartbeat_s": max(0.5, min(5.0, s.executor.worker_lost_s / 4))}


@router.post("/heartbeat")
def heartbeat(body: Heartbeat, request: Request, name: str = Depends(require_worker)) -> dict:
    index = request.app.state.node.index
    index.worker_seen(body.name, body.host, body.queues, body.job_id, body.pid)
    ticket = request.headers.get(TICKET, "")
    a = index.live_attempt(body.job_id, ticket_hash(ticket)) if body.job_id is not None and ticket else None
    if a is not None:  # a worker still computing an attempt the node gave up is told so by its next upload
        index.attempt_heartbeat(body.job_id, a["attempt"])
    return {"ok": True, "attempt_live": a is not None}


@router.post("/jobs/{job_id}/claim")
def claim(job_id: int, request: Request, name: str = Depends(require_worker)) -> dict:
    node = request.app.state.node
    _executor(request)
    ticket = request.headers.get(TICKET, "")
    outcome = node.index.claim_attempt(job_id, ticket_hash(ticket), name) if ticket else "unknown"
    if outcome == "unknown":
        _refuse(request, 403, f"no attempt of job {job_id} for this ticket", job_id)
    if outcome != "ok":
        raise HTTPException(409, f"attempt {outcome}: the node no longer wants it run")
    job = node.index.job(job_id)
    uids = [job["series_uid"]] if job["series_uid"] else [s["series_uid"] for s in node.index.series_of_study(job["study_uid"])]
    purged = {u: n for u in uids if (n := node.index.purged_in_series(u))}
    if purged:
        a = _attempt(request, job_id)
        node.index.end_attempt(job_id, a["attempt"], "failed")
        node.index.fail_job(job_id, "refused: " + ", ".join(f"{n} instance(s) of series {u}" for u, n in purged.items())
                            + " were deleted from the spool by retention; send the study again to reprocess it")
        node.executor.job_ended(job_id)
        raise HTTPException(409, "inputs purged by retention: job failed")
    paths = [node.index.instance_paths(u) for u in uids]
    # After the paths: an arrival since routing bumped the generation, so this sees it (as the local executor).
    if (why := superseded(node.index, job)) is not None:
        a = _attempt(request, job_id)
        if node.index.end_attempt(job_id, a["attempt"], "failed"):
            node.index.fail_job(job_id, why)
            node.executor.job_ended(job_id)
        raise HTTPException(409, f"{why}: job failed")
    series = [{"uid": u, "instances": len(p)} for u, p in zip(uids, paths)]
    model = _claim_model(request, job)
    priors, prior_locators = _priors_claim(node.index, job_id, uids)
    node.index.announce(job_id, job["attempts"], {"inputs": _locators(paths), "priors": prior_locators})
    node.audit.worker_access(f"worker {name}", request.client.host if request.client else None, job_id=job_id,
                             study_uid=job["study_uid"], what="inputs", ok=True,
                             objects=sum(s["instances"] for s in series))
    return {"job_id": job_id, "job_key": job["job_key"], "study_uid": job["study_uid"], "rule": job["rule"],
            "handler": job["handler"], "params": json.loads(job["params_json"]), "series": series,
            "options": json.loads(job["options_json"]), **priors,
            "timeout_s": job["timeout_s"] or node.settings.handler_timeout_s,
            "created": job_created(job["created_at"]),  # the time the results carry: the same bytes as a local run
            "model": model, "device_serial": NODE_DEVICE_SERIAL}  # the objects name the node, not the worker's host


def _claim_model(request: Request, job) -> dict | None:
    """The manifest of the registry version a ``model:`` job runs, resolved now, as a local run would;
    a model without a usable version fails the job, with the reason."""
    node = request.app.state.node
    try:
        return claim_model(ModelRegistry.for_data_dir(node.settings.data_dir), node.index, job)
    except (KeyError, CardError, ModelIntegrityError) as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) else str(exc)
        a = _attempt(request, job["id"])
        node.index.end_attempt(job["id"], a["attempt"], "failed")
        node.index.fail_job(job["id"], f"model: {reason}")
        node.executor.job_ended(job["id"])
        raise HTTPException(409, f"model: {reason}: job failed") from None


def _priors_claim(index, job_id: int, uids: list[str]) -> tuple[dict, list[tuple[int, str]]]:
    """What the worker needs to fetch the job's priors (GET .../priors) and hand them to the handler
    as the local executor would: each prior study's date, time, source and series with their
    instance counts, in the order of the stream; the note on what is missing; and which retrieves
    brought the job's own series (its provenance's ``retrieved_by``). With it, the stream's frames."""
    extra = priors_of_job(index, job_id)
    priors = [{"study_uid": p["study_uid"], "source": p["source"], "study_date": p["study_date"],
               "study_time": p["study_time"],
               "series": [{"uid": u, "instances": len(v)} for u, v in p["series"].items()]}
              for p in extra.get("priors", [])]
    locators = _locators([paths for p in extra.get("priors", []) for paths in p["series"].values()])
    return {"priors": priors, "priors_note": extra.get("priors_note"), **retrieved_by(index, uids)}, locators


def _locators(series_paths: list[list[str]]) -> list[tuple[int, str]]:
    return [(i, loc) for i, paths in enumerate(series_paths) for loc in paths]


def _announced_frames(request: Request, job_id: int, attempt: int, which: str) -> list[tuple[int, str]] | None:
    """The frames (series position, locator) this attempt's claim announced: the claim tells the
    worker how many instances each series has, and /inputs and /priors come later, when more may
    have arrived (a late series, a resent study); so they stream exactly what was counted then,
    kept in the index with the attempt. None for an attempt claimed before the node kept them."""
    entry = request.app.state.node.index.announced(job_id, attempt)
    return None if entry is None else [(int(i), str(loc)) for i, loc in entry[which]]


@router.get("/jobs/{job_id}/inputs")
def inputs(job_id: int, request: Request, _: str = Depends(require_worker)) -> StreamingResponse:
    node = request.app.state.node
    attempt = _attempt(request, job_id)["attempt"]
    locators = _announced_frames(request, job_id, attempt, "inputs")
    if locators is None:
        job = node.index.job(job_id)
        uids = [job["series_uid"]] if job["series_uid"] else \
            [s["series_uid"] for s in node.index.series_of_study(job["study_uid"])]
        locators = _locators([node.index.instance_paths(u) for u in uids])
    return StreamingResponse(_stream(node, job_id, attempt, locators), media_type="application/octet-stream")


def _stream(node, job_id: int, attempt: int, locators: list[tuple[int, str]]):
    """Frames of (series position, length) + bytes, read from the vault and verified on the way."""
    for i, loc in locators:
        try:
            data = node.vault.read(loc)
        except IntegrityError as exc:  # never hand a tampered instance out; the short stream fails the job
            node.vault.quarantine_damaged(exc.locator, str(exc))
            if node.index.end_attempt(job_id, attempt, "failed"):
                node.index.fail_job(job_id, f"spool integrity check failed for {loc}: {exc}")
                node.executor.job_ended(job_id)  # as every other end of a job: audited, deliveries woken
            return
        yield FRAME.pack(i, len(data))
        yield data


@router.get("/jobs/{job_id}/priors")
def priors(job_id: int, request: Request, name: str = Depends(require_worker)) -> StreamingResponse:
    """The job's priors (the same patient's earlier studies its rule asked for), streamed like its
    inputs; the series position counts through the priors' series in the order of the claim."""
    node = request.app.state.node
    attempt = _attempt(request, job_id)["attempt"]
    job = node.index.job(job_id)
    locators = _announced_frames(request, job_id, attempt, "priors")
    if locators is None:
        locators = _locators([paths for p in priors_of_job(node.index, job_id).get("priors", [])
                              for paths in p["series"].values()])
    node.audit.worker_access(f"worker {name}", request.client.host if request.client else None, job_id=job_id,
                             study_uid=job["study_uid"], what="priors", ok=True, objects=len(locators))
    return StreamingResponse(_stream(node, job_id, attempt, locators), media_type="application/octet-stream")


@router.get("/jobs/{job_id}/model/{name:path}")
def model_file(job_id: int, name: str, request: Request, worker: str = Depends(require_worker)) -> FileResponse:
    """One file (card or ONNX) of the model version this job's attempt was given at its claim."""
    node = request.app.state.node
    _attempt(request, job_id)
    job = node.index.job(job_id)
    try:
        path = served_file(ModelRegistry.for_data_dir(node.settings.data_dir), json.loads(job["history_json"]), name)
    except KeyError as exc:
        _refuse(request, 404, f"job {job_id}: {exc.args[0]}", job_id)
    node.audit.worker_access(f"worker {worker}", request.client.host if request.client else None, job_id=job_id,
                             study_uid=job["study_uid"], what=f"model file {name}", ok=True, objects=1)
    return FileResponse(path, media_type="application/octet-stream")


def _artefact_entry(request: Request, job_id: int, series_key: str, producer: str, version: str, name: str,
                    variant: str):
    """The node's artefact cache and the entry's key, once ``series_key`` is the job's own primary
    series and instance set: a worker reads and leaves arrays of the input it was given, no other."""
    from node.handler_api import ArtefactKey
    from node.jobs.artefacts import ArtefactCache, set_key

    node = request.app.state.node
    attempt = _attempt(request, job_id)
    job = node.index.job(job_id)
    uid = job["series_uid"] or next((s["series_uid"] for s in node.index.series_of_study(job["study_uid"])), None)
    if uid is None or series_key != set_key(uid, node.index.instance_uids(uid)):
        _refuse(request, 403, f"artefact of another series than job {job_id}'s", job_id)
    cache = ArtefactCache(node.settings.data_dir / "artefacts", node.vault)
    return node, job, attempt, cache, ArtefactKey(producer, version, name, variant)


@router.get("/jobs/{job_id}/artefacts/{series_key}")
def get_artefact(job_id: int, series_key: str, request: Request, producer: str, version: str, name: str,
                 variant: str = "", worker: str = Depends(require_worker)) -> Response:
    """An array kept from an earlier job on this job's series (node/jobs/artefacts.py), as the
    entry's bytes; 404 when the node has none (the handler computes it)."""
    node, job, _, cache, key = _artefact_entry(request, job_id, series_key, producer, version, name, variant)
    data = cache.load_packed(series_key, key)
    if data is None:
        raise HTTPException(404, f"no {producer} {version} {name} kept for this series")
    node.audit.worker_access(f"worker {worker}", request.client.host if request.client else None, job_id=job_id,
                             study_uid=job["study_uid"], what=f"artefact {producer} {name}", ok=True, objects=1)
    return Response(data, media_type="application/octet-stream")


@router.put("/jobs/{job_id}/artefacts/{series_key}")
async def put_artefact(job_id: int, series_key: str, request: Request, producer: str, version: str, name: str,
                       variant: str = "", worker: str = Depends(require_worker)) -> dict:
    """What the job's handler offers later jobs on its series (``Handler.artefacts``): kept as a
    local worker's would be. Only the job's own handler's, and only bytes that are an array."""
    from node.jobs.artefacts import UNUSABLE, check_packed

    node, job, attempt, cache, key = await run_in_threadpool(
        _artefact_entry, request, job_id, series_key, producer, version, name, variant)
    if producer != job["handler"]:
        raise HTTPException(422, f"producer: job {job_id} runs {job['handler']}, not {producer}")
    data = await _bounded_body(request, node.settings.stow_max_mb, "artefact")
    try:
        await run_in_threadpool(check_packed, data)
    except UNUSABLE as exc:
        raise HTTPException(422, f"artefact: not an array entry ({exc})") from None
    await run_in_threadpool(cache.save_packed, series_key, key, data)
    await run_in_threadpool(node.index.attempt_heartbeat, job_id, attempt["attempt"])  # sqlite: not on the loop
    return {"kept": name}


@router.post("/jobs/{job_id}/progress")
def progress(job_id: int, body: Progress, request: Request, _: str = Depends(require_worker)) -> dict:
    index = request.app.state.node.index
    a = _attempt(request, job_id)
    index.job_progress(job_id, body.fraction, body.message)
    index.attempt_heartbeat(job_id, a["attempt"])
    return {"ok": True}


def _result_path(node, job_id: int, sop_uid: str) -> Path:
    return node.settings.data_dir / "results" / str(job_id) / f"{sop_uid}.dcm"


async def _bounded_body(request: Request, limit_mb: int, what: str) -> bytes:
    """The request's body, read chunk by chunk and refused (413) as soon as it passes ``limit_mb``:
    ``request.body()`` would hold a chunked (length-less) body of any size before a size check.
    At most twice the limit is held (the buffer and its bytes, which the parsers and the vault need)."""
    limit = limit_mb << 20
    too_large = HTTPException(413, f"{what} larger than stow_max_mb ({limit_mb} MB)")
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise too_large
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_large
    return bytes(data)


@router.put("/jobs/{job_id}/results/{sop_uid}")
async def put_result(job_id: int, sop_uid: str, request: Request, name: str = Depends(require_worker)) -> dict:
    node = request.app.state.node
    a = await run_in_threadpool(_attempt, request, job_id)
    if not valid_uid(sop_uid):
        raise HTTPException(422, "sop_uid: not a DICOM UID")
    data = await _bounded_body(request, node.settings.stow_max_mb, "result")
    await run_in_threadpool(_store_result, node, job_id, a, sop_uid, data)
    return {"stored": sop_uid}


def _store_result(node, job_id: int, attempt, sop_uid: str, data: bytes) -> None:
    try:
        facts = instance_facts(data)  # a deflated result inflated within bounds, never whole by pydicom
        uid, study = facts["SOPInstanceUID"], facts["StudyInstanceUID"]
    except InflatedTooLarge as exc:
        raise HTTPException(413, f"result: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure is the worker's error, named
        raise HTTPException(422, f"result is not a DICOM file: {exc}") from None
    job = node.index.job(job_id)
    if uid != sop_uid or study != job["study_uid"]:
        raise HTTPException(422, f"result {uid} of study {study} is not {sop_uid} of the job's study")
    path = _result_path(node, job_id, sop_uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    node.vault.write_file(path, data)
    fsync_dirs({path.parent})
    node.index.attempt_heartbeat(job_id, attempt["attempt"])


@router.post("/jobs/{job_id}/done")
def done(job_id: int, body: Done, request: Request, name: str = Depends(require_worker)) -> dict:
    node = request.app.state.node
    ex = _executor(request)
    a = _attempt(request, job_id)
    uids = [r.sop_instance_uid for r in body.results]
    if len(set(uids)) != len(uids):
        raise HTTPException(422, "results: a sop_instance_uid is listed twice")
    results = [{**r.model_dump(), "path": str(_result_path(node, job_id, r.sop_instance_uid))} for r in body.results]
    missing = [r["sop_instance_uid"] for r in results if not _uploaded(node, job_id, Path(r["path"]))]
    if missing:
        raise HTTPException(422, f"results not uploaded: {', '.join(missing)}")
    if not node.index.end_attempt(job_id, a["attempt"], "done"):
        raise HTTPException(409, "the attempt ended meanwhile: results not taken")
    job = node.index.job(job_id)
    dests = json.loads(job["destinations_json"])
    node.index.finish_job(job_id, results, node.settings.result_deliveries(results, dests),
                          {**body.provenance, "worker": name, "attempt": a["attempt"]}, body.figures)
    node.audit.worker_access(f"worker {name}", request.client.host if request.client else None, job_id=job_id,
                             study_uid=job["study_uid"], what="results", ok=True, objects=len(results))
    ex.job_ended(job_id)
    return {"job": job_id, "results": len(results)}


def _uploaded(node, job_id: int, path: Path) -> bool:
    """Whether ``path`` is a file put_result stored for this job: a regular file (no link planted
    there) whose resolved path lies in this job's results folder (the UID check already keeps
    '..' out; this keeps it so should the names change)."""
    folder = (node.settings.data_dir / "results" / str(job_id)).resolve()
    return not path.is_symlink() and path.is_file() and path.resolve().parent == folder


@router.post("/jobs/{job_id}/fail")
def fail(job_id: int, body: Failed, request: Request, name: str = Depends(require_worker)) -> dict:
    node = request.app.state.node
    ex = _executor(request)
    a = _attempt(request, job_id)
    if not node.index.end_attempt(job_id, a["attempt"], "failed"):
        raise HTTPException(409, "the attempt ended meanwhile")
    node.index.fail_job(job_id, f"{body.error} (on worker {name})")
    ex.job_ended(job_id)
    return {"job": job_id, "status": "failed"}


cluster = APIRouter(prefix="/api/cluster", tags=["worker"])


def cluster_view(node) -> dict:
    """Workers (host, queues, current job, last heartbeat) and queue lengths; shared with `hilum status`
    and the metrics endpoint."""
    ex = node.executor
    lengths = ex.queue_lengths() if hasattr(ex, "queue_lengths") else None
    return cluster_summary(node.index, node.settings.executor.kind, lengths)


@cluster.get("")
def cluster_status(request: Request, _: Principal = Depends(require_viewer)) -> dict:
    return cluster_view(request.app.state.node)
