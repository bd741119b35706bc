"""The node's web server: one FastAPI app, one router per resource (MONAI Label's layout).

One door for people and scripts: the JSON API (/api), the DICOMweb gateway to the archive
(/dicom-web), the admin console (/console, /login) and OHIF at the root. OHIF's router comes
last: its catch-all serves the viewer's files and client-side routes.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from node import __version__
from node.audit import api as audit_api
from node.web import (
    console,
    dashboard,
    deliveries,
    destinations,
    dicomweb,
    health,
    jobs,
    login,
    metrics,
    models_api,
    ohif,
    pacs_api,
    project_next,
    projects_api,
    rules_api,
    studies,
    view3d,
    worker_api,
)
from node.web.login import LoginThrottle
from node.web.security import SecurityHeaders, ohif_csp
from node.web.sessions import SessionStore

log = logging.getLogger("hilum.web")


@dataclass
class WebState:
    sessions: SessionStore
    ohif: ohif.OhifFiles
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    dicomweb_version: tuple[int, ...] | None = None  # the archive's DICOMweb plugin, once asked


async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
    """422 naming each field and its problem, without FastAPI's echo of the input: the input may be a
    password, and a lone surrogate ("\\ud800", valid JSON) in it made the default answer fail to encode
    (a 500). json.dumps escapes what is not ASCII, so any loc or msg encodes."""
    detail = [{"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
    return Response(json.dumps({"detail": detail}, default=str), status_code=422, media_type="application/json")


def create_app(node, ohif_files: ohif.OhifFiles | None = None) -> FastAPI:
    # No interactive docs page: it would load its scripts from a CDN. The schema stays.
    app = FastAPI(title="Hilum", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    files = ohif_files or ohif.OhifFiles()
    app.state.node = node
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.state.web = WebState(sessions=SessionStore(node.settings.session_idle_s), ohif=files)
    for module in (health, login, studies, jobs, deliveries, dashboard, rules_api, destinations, pacs_api, audit_api,
                   models_api, projects_api, project_next, dicomweb, console, view3d, worker_api, metrics):
        app.include_router(module.router)
    app.include_router(worker_api.cluster)
    app.include_router(ohif.router)  # last: its catch-all
    app.add_middleware(SecurityHeaders, ohif_policy=ohif_csp(files.inline_script_hashes()))
    if not files.installed:
        log.warning("OHIF is not installed (%s missing): run `make ohif`; the console works without it", files.dist)
    if not node.index.users():
        log.warning("no console users yet: create one with `hilum user add NAME --role admin`")
    return app
