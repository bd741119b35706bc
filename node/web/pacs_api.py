"""/api/pacs: sources with echo, study queries, the retrieve queue (queue, cancel, retry).

Viewers read (sources, retrieves); admins act (echo, query, retrieve, cancel, retry): a query
reaches into the hospital's PACS and is audited like a retrieve. Endpoints are plain ``def``, so
FastAPI runs their DIMSE/HTTP round trips in its thread pool, never on the event loop.
"""
from __future__ import annotations

import datetime as dt
import json

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict

from node.config_pacs import DimseSource
from node.pacs.audit import query_audit
from node.pacs.explain import explain_pull
from node.pacs.model import PacsError, StudyQuery, date_range, parse_span
from node.pacs.sources import source_client
from node.web.auth import Principal, require_admin, require_viewer, who

router = APIRouter(prefix="/api/pacs", tags=["pacs"])


def _source(request: Request, name: str):
    try:
        return source_client(request.app.state.node.settings, name)
    except KeyError as exc:
        raise HTTPException(404, exc.args[0]) from None


@router.get("/sources")
def sources(request: Request, _: Principal = Depends(require_viewer)) -> dict:
    out = []
    for name, cfg in sorted(request.app.state.node.settings.sources.items()):
        if isinstance(cfg, DimseSource):
            out.append({"name": name, "type": "dimse", "ae_title": cfg.ae_title, "host": cfg.host, "port": cfg.port,
                        "retrieve": cfg.retrieve, "max_concurrent": cfg.max_concurrent,
                        "move_destination": cfg.move_destination or request.app.state.node.settings.ae_title})
        else:
            out.append({"name": name, "type": "dicomweb", "qido_url": cfg.qido_url, "wado_url": cfg.wado,
                        "retrieve": "wado", "max_concurrent": cfg.max_concurrent})
    return {"sources": out}


@router.post("/sources/{name}/echo")
def echo(name: str, request: Request, _: Principal = Depends(require_admin)) -> dict:
    client = _source(request, name)
    try:
        return {"ok": True, "ms": round(client.echo() * 1000, 1)}
    except PacsError as exc:
        return {"ok": False, "detail": str(exc)}


class QueryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    patient_id: str = ""
    accession: str = ""
    modality: str = ""
    study_date: str = ""
    description: str = ""
    since: str | None = None
    limit: int = 200


@router.post("/sources/{name}/query")
def query(name: str, body: QueryBody, request: Request, p: Principal = Depends(require_admin)) -> dict:
    node = request.app.state.node
    client = _source(request, name)
    try:
        date = body.study_date or (date_range(parse_span(body.since)) if body.since else "")
    except ValueError as exc:
        raise HTTPException(422, f"since: {exc}") from None
    q = StudyQuery(patient_id=body.patient_id, accession=body.accession, modality=body.modality, study_date=date,
                   study_description=body.description)
    try:
        matches, bad = client.find_studies(q, body.limit)
    except PacsError as exc:
        query_audit(node.audit, who=who(p), source=name, keys=q.keys(), matches=0, error=str(exc))
        raise HTTPException(502, str(exc)) from None
    query_audit(node.audit, who=who(p), source=name, keys=q.keys(), matches=len(matches), warnings=client.warnings)
    held = node.retrieves.held_studies([m.study_uid for m in matches])
    return {"matches": [m.as_dict() | {"in_hilum": m.study_uid in held} for m in matches], "malformed": bad,
            "warnings": client.warnings}


class RetrieveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    study_uids: list[str]
    series_uids: list[str] | None = None


@router.get("/retrieves")
def retrieves(request: Request, status: str | None = Query(None), limit: int = Query(200, ge=1, le=1000),
              _: Principal = Depends(require_viewer)) -> dict:
    return {"retrieves": [_view(r) for r in request.app.state.node.retrieves.list(status, limit=limit)]}


@router.post("/retrieves")
def queue(body: RetrieveBody, request: Request, p: Principal = Depends(require_admin)) -> dict:
    node = request.app.state.node
    if body.source not in node.settings.sources:
        raise HTTPException(404, f"no source named {body.source!r}")
    ids = [node.retrieves.add(body.source, uid, body.series_uids, f"api {who(p)}")[0] for uid in body.study_uids]
    node.retriever.wake()
    return {"ids": ids}


@router.get("/provenance/{study_uid}")
def provenance(study_uid: str, request: Request, _: Principal = Depends(require_viewer)) -> dict:
    """Which retrieves (and so which pull rule, priors job or user) brought this study's instances in."""
    return {"study_uid": study_uid, "retrieves": request.app.state.node.retrieves.provenance(study_uid)}


@router.post("/retrieves/{rid}/{action}")
def act(rid: int, action: str, request: Request, p: Principal = Depends(require_admin)) -> dict:
    node = request.app.state.node
    if action not in ("cancel", "retry"):
        raise HTTPException(404, "unknown action")
    fn = node.retrieves.cancel if action == "cancel" else node.retrieves.retry
    if not fn(rid, f"api {who(p)}"):
        raise HTTPException(409, f"retrieve {rid} cannot be {'cancelled' if action == 'cancel' else 'retried'} now")
    node.retriever.wake()
    return {"id": rid, "action": action}


def _view(r) -> dict:
    d = dict(r)
    d["series"] = json.loads(d.pop("series_json")) if d.get("series_json") else None
    d["detail"] = json.loads(d.pop("detail_json"))
    d["history"] = json.loads(d.pop("history_json"))
    exp = d["expected"]
    d["progress"] = round(min(1.0, d["received"] / exp), 3) if exp else None
    return d


@router.get("/pull-rules")
def pull_rules(request: Request, _: Principal = Depends(require_viewer)) -> dict:
    """Each pull rule with its schedule, last run, outcome, next run and high-water mark."""
    node = request.app.state.node
    out = []
    for r in node.rules.current().pull_rules:
        st = node.retrieves.pull_state(r.name)
        s = r.spec
        out.append({"name": r.name, "file": r.where(), "source": s.source, "watch": s.watch,
                    "every_s": s.schedule.every, "window": s.schedule.window,
                    "query": s.query.model_dump(mode="json", exclude_defaults=True),
                    "series_filter": s.series, "limits": s.limits.model_dump(),
                    "next_at": st["next_at"] if st else None, "last_run_at": st["last_run_at"] if st else None,
                    "last_result": json.loads(st["last_result_json"]) if st and st["last_result_json"] else None,
                    "last_error": st["last_error"] if st else None, "high_water": st["high_water"] if st else None})
    return {"pull_rules": out}


@router.get("/pull-rules/{name}/explain")
def explain_pull_rule(name: str, request: Request, _: Principal = Depends(require_viewer)) -> dict:
    """What the rule would ask the source now and when it runs next (as `hilum rules test NAME`)."""
    node = request.app.state.node
    rule = next((r for r in node.rules.current().rules if r.level == "pull" and r.name == name), None)
    if rule is None:
        raise HTTPException(404, f"no pull rule named {name!r}")
    return explain_pull(rule, node.settings.rules_dir, node.retrieves.pull_state(name), dt.datetime.now())


@router.post("/pull-rules/{name}/run")
def run_pull_now(name: str, request: Request, p: Principal = Depends(require_admin)) -> dict:
    node = request.app.state.node
    if name not in {r.name for r in node.rules.current().pull_rules}:
        raise HTTPException(404, f"no enabled pull rule named {name!r}")
    node.retrieves.ensure_pull_state(name, 0.0)
    node.retrieves.run_pull_now(name)
    node.pulls.wake()
    return {"rule": name, "action": "run", "by": who(p)}
