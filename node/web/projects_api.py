"""/api/projects: learning-loop projects (cases, states, label versions, the annotation queue), and the
gateway's side of annotation: a SEG stored through /dicom-web for a project case is checked first
(refused with the reason, nothing stored) and, once the archive has it, recorded as the case's label."""
from __future__ import annotations

import asyncio
from typing import NoReturn

import httpx
from fastapi import APIRouter, Depends, HTTPException, Query, Request

from node.models.uncertainty import STRATEGIES, CaseScore, rank_cases
from node.projects.intake import CaseLabel, multipart_parts, seg_parts, vet
from node.projects.labels import LabelRefused
from node.receive.ingest import InflatedTooLarge
from node.projects.store import Project, ProjectError, ProjectStore
from node.projects.trainrun import RunNotStarted, run_status, start_run
from node.web.auth import Principal, require_admin, require_viewer, who

router = APIRouter(prefix="/api/projects", tags=["projects"])
SERIES_UID = "0020000E"


def _store(request: Request) -> ProjectStore:
    return ProjectStore.for_data_dir(request.app.state.node.settings.data_dir)


def _project(store: ProjectStore, name: str) -> Project:
    try:
        return store.get(name)
    except KeyError:
        # Not the store's message: it lists every project, and a user is not told the names of those
        # they may not see (the list endpoint leaves them out too).
        raise HTTPException(404, f"no project {name!r}") from None


def _refused(request: Request, p: Principal, project: str | None, what: str, reason: str) -> NoReturn:
    """403 with the reason, and the refusal in the audit trail."""
    request.app.state.node.audit.project_access(who(p), request.client.host if request.client else None,
                                                project=project, what=what, ok=False, reason=reason)
    raise HTTPException(403, reason)


def _visible(request: Request, store: ProjectStore, name: str, p: Principal) -> Project:
    """The project, if ``p`` may see it (admins, its annotators, its viewers; anyone when it names none)."""
    project = _project(store, name)
    if not project.may_view(p.name, p.role):
        _refused(request, p, name, "view", project.why_not(p.name, p.role, "view"))
    return project


@router.get("")
def list_projects(request: Request, p: Principal = Depends(require_viewer)) -> dict:
    """The projects this user may see (the others are not named)."""
    store = _store(request)
    return {"projects": [{"name": n, "model": store.get(n).model, "counts": store.summary(n)["counts"]}
                         for n in store.names() if store.get(n).may_view(p.name, p.role)]}


@router.get("/{name}")
def get_project(name: str, request: Request, p: Principal = Depends(require_viewer)) -> dict:
    store = _store(request)
    _visible(request, store, name, p)
    return store.summary(name)


@router.get("/{name}/queue")
def queue(name: str, request: Request, strategy: str = Query("uncertainty"), n: int = Query(10, ge=1, le=1000),
          seed: int = Query(0), p: Principal = Depends(require_viewer)) -> dict:
    """The next predicted cases to annotate, by ``strategy``, each with the reason it is there."""
    store = _store(request)
    _visible(request, store, name, p)
    if strategy not in STRATEGIES:
        raise HTTPException(422, f"strategy: must be one of {', '.join(STRATEGIES)}")
    scored = [CaseScore(uid, c["prediction"]["uncertainty"]["score"],
                        tuple(c["prediction"]["uncertainty"].get("features", ())))
              for uid, c in store.cases(name).items()
              if c["state"] == "predicted" and (c.get("prediction") or {}).get("uncertainty")]
    picks = rank_cases(scored, strategy, n, seed) if scored else []
    return {"project": name, "strategy": strategy,
            "queue": [{"study_uid": pk.case, "rank": pk.rank, "reason": pk.reason} for pk in picks]}


@router.post("/{name}/cases/{study_uid}/accept")
def accept(name: str, study_uid: str, request: Request, p: Principal = Depends(require_viewer)) -> dict:
    store = _store(request)
    project = _project(store, name)
    if not project.may_annotate(p.name, p.role):
        _refused(request, p, name, "accept a label", project.why_not(p.name, p.role, "annotate"))
    try:
        return store.accept(name, study_uid, who(p))
    except ProjectError as exc:
        raise HTTPException(409, str(exc)) from None


@router.post("/{name}/runs")
def start_training(name: str, request: Request, p: Principal = Depends(require_admin)) -> dict:
    """Train the project's configuration in a separate, memory-capped process, on the accepted labels of
    its labeled cases (or, before any, the configuration's own data); the result becomes a candidate
    version of the project's model, with the label versions it learnt from."""
    node = request.app.state.node
    store = _store(request)
    _project(store, name)
    labels = {uid: {"version": c["labels"][-1]["version"], "sop_uid": c["labels"][-1]["sop_uid"]}
              for uid, c in store.cases(name).items() if c["state"] == "labeled"}
    try:
        run_id = start_run(store.root / name, node.settings.data_dir, node.settings.handler_memory_mb, who(p),
                           archive=node.archive, labels=labels)
    except RunNotStarted as exc:  # the run is listed as failed with the same reason
        raise HTTPException(503, str(exc)) from None
    return {"project": name, "run": run_id, "labeled_cases": len(labels)}


@router.get("/{name}/runs")
def runs(name: str, request: Request, p: Principal = Depends(require_viewer)) -> dict:
    """Every training run: running (epochs so far: loss, validation Dice), done (the version) or failed (why)."""
    store = _store(request)
    _visible(request, store, name, p)
    folder = store.root / name / "runs"
    found = sorted(folder.iterdir()) if folder.is_dir() else []
    return {"project": name, "runs": [run_status(r) for r in found if (r / "run.json").is_file()]}


# ---------------------------------------------------------------- the gateway's STOW-RS

async def _input_series(node, project: Project, study_uid: str, modality: str) -> list[str]:
    url = f"{node.archive.dicomweb_url}/studies/{study_uid}/series"
    try:
        r = await node.http_client.get(url, params={"Modality": modality}, headers={"Accept": "application/dicom+json"})
    except httpx.HTTPError as exc:
        raise HTTPException(502, f"archive unreachable: {type(exc).__name__}") from None
    if r.status_code == 404 or (r.status_code in (200, 204) and not r.content):
        return []
    if r.status_code != 200:
        raise HTTPException(502, f"archive answered HTTP {r.status_code} to a series search of study {study_uid}")
    return [s[SERIES_UID]["Value"][0] for s in r.json() if SERIES_UID in s]


async def stow_labels(request: Request, body: bytes, p: Principal) -> list[CaseLabel]:
    """The project-case labels among the SEGs of a STOW-RS body, checked; 409 (reason) or 403 if refused."""
    node = request.app.state.node
    store = _store(request)
    limit = node.settings.stow_max_mb << 20
    try:
        segs = await asyncio.to_thread(
            lambda: seg_parts(multipart_parts(body, request.headers.get("content-type", "")), limit))
    except InflatedTooLarge as exc:  # a deflated part (a few KiB can inflate to gigabytes)
        raise HTTPException(413, f"a deflated part of the STOW-RS request: {exc} (stow_max_mb)") from None
    if not segs:
        return []
    series: dict[tuple[str, str], list[str]] = {}
    for name in await asyncio.to_thread(store.names):
        project = await asyncio.to_thread(store.get, name)
        modality = (await asyncio.to_thread(store.train_config, name)).input.modality
        for ds in segs:
            study = str(ds.get("StudyInstanceUID", ""))
            if (name, study) not in series and await asyncio.to_thread(store.has_case, name, study):
                series[(name, study)] = await _input_series(node, project, study, modality)
    try:
        return await asyncio.to_thread(vet, store, segs, p.name, p.role,
                                       lambda project, study: series.get((project.name, study), []))
    except PermissionError as exc:
        _refused(request, p, None, "store a label", str(exc))
    except LabelRefused as exc:
        raise HTTPException(409, f"SEG refused as a label: {exc}") from None


async def record_labels(request: Request, labels: list[CaseLabel], p: Principal) -> None:
    store = _store(request)
    for lab in labels:
        await asyncio.to_thread(store.add_label, lab.project.name, lab.study_uid, sop_uid=lab.sop_uid,
                                series_uid=lab.series_uid, segments=lab.segments, by=who(p))
