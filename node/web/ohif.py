"""OHIF at ``/``: the prebuilt viewer installed by ``make ohif``, configured by ``ohif-config/app-config.js``.

OHIF's index.html loads everything by absolute path (/app-config.js, /app.bundle.*.js,
/assets/...), so it is served at the root; the node's own routes (/api, /dicom-web, /console,
/login, /view3d) are registered first and win. Any other path without a file extension is one of
OHIF's client-side routes (/viewer, /segmentation, ...) and gets index.html, for signed-in users
only. The bundles, styles and codecs hold no patient data and are served to anyone.
"""
from __future__ import annotations

import base64
import hashlib
import mimetypes
import re
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from node.web.auth import session_principal

REPO = Path(__file__).resolve().parents[2]
OHIF_DIST = REPO / "build" / "ohif" / "dist"
APP_CONFIG = REPO / "ohif-config" / "app-config.js"
RESERVED = ("api", "dicom-web", "console", "login", "view3d")
NOT_INSTALLED = b"""<!doctype html><meta charset="utf-8"><title>Hilum</title>
<p>The OHIF viewer is not installed on this node: run <code>make ohif</code> (or <code>make run</code>).
The <a href="/console/">console</a> works without it.</p>"""

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".mjs")

router = APIRouter(include_in_schema=False)


class OhifFiles:
    def __init__(self, dist: Path = OHIF_DIST, config: Path = APP_CONFIG) -> None:
        self.dist = dist.resolve()
        self.config = config
        index = self.dist / "index.html"
        self.index_html = index.read_bytes() if index.is_file() else None

    @property
    def installed(self) -> bool:
        return self.index_html is not None

    def inline_script_hashes(self) -> list[str]:
        """SHA-256 (base64) of each inline <script> of index.html, for the CSP."""
        if self.index_html is None:
            return []
        bodies = re.findall(rb"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", self.index_html, re.S)
        return [base64.b64encode(hashlib.sha256(b).digest()).decode() for b in bodies]

    def file(self, path: str) -> Path | None:
        candidate = (self.dist / path).resolve()
        if candidate.is_file() and candidate.is_relative_to(self.dist):
            return candidate
        return None


@router.get("/app-config.js")
def app_config() -> Response:
    return FileResponse(APP_CONFIG, media_type="text/javascript", headers={"Cache-Control": "no-cache"})


@router.get("/{path:path}")
def ohif(path: str, request: Request) -> Response:
    first = path.split("/", 1)[0]
    if first in RESERVED:
        raise HTTPException(404, "not found")
    files: OhifFiles = request.app.state.web.ohif
    if path == "favicon.ico":  # browsers ask for it at the root; OHIF keeps it under assets/
        path = "assets/favicon.ico"
    name = path.rsplit("/", 1)[-1]
    if path not in ("", "index.html") and "." in name:
        found = files.file(path) if files.installed else None
        if found is None:
            raise HTTPException(404, "not found")
        # Bundles carry a content hash in their names; the rest may change with an upgrade.
        cache = "public, max-age=31536000, immutable" if re.search(r"\.[0-9a-f]{16,}\.", name) else "no-cache"
        return FileResponse(found, headers={"Cache-Control": cache})
    if session_principal(request) is None:
        target = "/" + path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?next=" + quote(target, safe=""), status_code=303)
    if not files.installed:
        return HTMLResponse(NOT_INSTALLED, status_code=503)
    return HTMLResponse(files.index_html, headers={"Cache-Control": "no-cache"})
