"""The admin console's pages: static HTML and JavaScript over the JSON API, no build step.

Pages hold no data: their scripts fetch it from /api with the session cookie and put every
value into the page as text (``textContent``), never as HTML. A page needs a live session
(else a redirect to /login); what a user may see or change is decided by the API, per role.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from node.web.auth import session_principal

CONSOLE_DIR = Path(__file__).resolve().parent / "console"
PAGES = {"": "dashboard.html", "rules": "rules.html", "destinations": "destinations.html", "pacs": "pacs.html",
         "models": "models.html", "projects": "projects.html"}
ASSETS = {"console.css": "text/css", "common.js": "text/javascript", "dashboard.js": "text/javascript",
          "rules.js": "text/javascript", "destinations.js": "text/javascript", "login.js": "text/javascript",
          "pacs.js": "text/javascript", "models.js": "text/javascript", "projects.js": "text/javascript"}
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/login")
def login_page() -> Response:
    return FileResponse(CONSOLE_DIR / "login.html", media_type="text/html", headers=NO_CACHE)


@router.get("/console")
def console_root() -> Response:
    return RedirectResponse("/console/", status_code=308)


@router.get("/console/static/{name}")
def asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, "not found")
    return FileResponse(CONSOLE_DIR / name, media_type=ASSETS[name], headers=NO_CACHE)


@router.get("/console/{page}")
@router.get("/console/", name="dashboard")
def page(request: Request, page: str = "") -> Response:
    if page not in PAGES:
        raise HTTPException(404, "not found")
    if session_principal(request) is None:
        return RedirectResponse("/login?next=" + quote(request.url.path, safe=""), status_code=303)
    return FileResponse(CONSOLE_DIR / PAGES[page], media_type="text/html", headers=NO_CACHE)
