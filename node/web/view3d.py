"""The interactive 3D view: /view3d/{study}/{series}, rendered on the server, streamed as JPEG frames.

The page (static HTML/JS/CSS in ``view3d/``, no CDN, no build step, no inline script) opens a
WebSocket to ``/view3d/{study}/{series}/ws``, sends the view it wants on every change and
draws the frames that come back; the volume never leaves the server. The series is read once
from the node's spool (via the index) on a loader thread into ``VolumeCache`` (memory cap, LRU
eviction, shared by every session on the series); each connection gets a ``LiveSession``
(latest-wins rendering, bounded frames in flight) that ends, and gives its reference back, when
the socket closes. See ``node.render.live_session`` for the protocol and the quality policy.

Authentication is the node's own: the page takes a session cookie or a bearer token (the
``current_principal`` dependency of every API router; a browser without a session is sent to
/login). The WebSocket handshake carries the same cookie (SameSite=Strict: a page of another
site cannot make the browser send it) or an ``Authorization`` header (scripts), and its Origin,
when present, must be the node's own, against cross-site WebSocket hijacking. A session that
ends (sign-out, idle expiry, user removed) ends the stream at the next message.

Why not trame / trame-vtk (Kitware's server-side rendering framework, ``VtkRemoteView``)? It was
tried (trame 4.0, trame-vtk 2.11, trame-vuetify 3.3) and a small streamer of our own fits the
node better on each point that matters here:
- one server, one door: trame serves through its own wslink/aiohttp server on another port with
  wslink's single shared secret, so the node's users, roles, session expiry and security headers
  would not reach it without a proxy in front; this router is one more FastAPI router;
- one process for many users: a trame server holds one application state, so several users means
  trame's launcher starting a process per user, each reading and holding its own copy of the
  volume; here sessions share the cached volume and its scene;
- the page stays CSP-strict: trame's Vue client compiles its templates in the browser
  (``Function(...)``, so 'unsafe-eval') and its index.html has an inline script; ours is one
  plain script file;
- the camera model: ``VtkRemoteView`` forwards mouse events to VTK interactor styles (trackball
  about the camera); the viewer needs the renders' patient-frame camera (azimuth about the long
  axis, parallel projection, radiological orientation labels) and linked MPR panes with a
  crosshair, which trame would need as custom protocol code anyway;
- weight: trame, trame-server, trame-client, trame-vtk, trame-vuetify, wslink and aiohttp are
  about 40 MB of packages for what is here ~200 lines of Python and ~400 of JavaScript.
What trame does well (reduced quality while interacting, dropping stale images, JPEG delivery)
is what ``LiveSession`` does, in the open.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, Response

from node.render.live_session import LiveSession, parse_request
from node.render.volume_cache import ViewerBusy, VolumeCache
from node.store.vault import IntegrityError
from node.volume import load_series
from node.web.auth import (Principal, _known_role, current_principal, hash_token, require_admin, require_viewer,
                           session_principal)

STATIC_DIR = Path(__file__).resolve().parent / "view3d"
ASSETS = {"view3d.js": "text/javascript", "view3d.css": "text/css"}
NO_CACHE = {"Cache-Control": "no-cache"}
MEMORY_CAP_MB = 2048  # volumes + ray caster tables of all cached series (512x512x300 CT: ~400 MB)
MAX_SESSIONS = 16  # open 3D views on the node at once
RECHECK_S = 30.0  # how often an open stream re-checks its session or token
# WebSocket close codes (4000-4999 are the application's own).
CLOSE_POLICY, CLOSE_BUSY, CLOSE_SIGNED_OUT, CLOSE_NOT_FOUND, CLOSE_UNUSABLE = 1008, 1013, 4401, 4404, 4422

router = APIRouter(include_in_schema=False)
_service_lock = threading.Lock()


@dataclass
class View3dService:
    cache: VolumeCache
    sessions: int = 0
    frames_sent: int = 0


def service(app) -> View3dService:
    """The app's viewer state, made on first use (one per app: the cache belongs to its node)."""
    with _service_lock:
        svc = getattr(app.state, "view3d", None)
        if svc is None:
            svc = View3dService(VolumeCache(_spool_loader(app.state.node), MEMORY_CAP_MB * 2**20))
            app.state.view3d = svc
        return svc


def _spool_loader(node):
    def load(series_uid: str):
        paths = node.index.instance_paths(series_uid)
        if not paths:
            raise LookupError(f"series {series_uid} has no instances in this node's spool")
        try:
            data = load_series(paths, read=node.vault.read)
        except IntegrityError as exc:
            raise LookupError(f"series {series_uid}: an instance cannot be read from the spool ({exc})") from None
        if data.volume is None:
            raise ValueError(f"series {series_uid} is not a volume: {data.volume_error}")
        return data.modality, data.volume

    return load


def _series_of_study(node, study_uid: str, series_uid: str) -> bool:
    return any(r["series_uid"] == series_uid for r in node.index.series_of_study(study_uid))


def viewer_or_sign_in(request: Request) -> Principal:
    """``require_viewer``, except that a browser without a session is sent to the sign-in page."""
    try:
        return require_viewer(current_principal(request))
    except HTTPException as exc:
        browser = "text/html" in request.headers.get("accept", "") and not request.headers.get("authorization")
        if exc.status_code == 401 and browser:
            raise HTTPException(303, "sign in first",
                                headers={"Location": "/login?next=" + quote(request.url.path, safe="")}) from None
        raise


@router.get("/view3d/static/{name}")
def asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, "not found")
    return FileResponse(STATIC_DIR / name, media_type=ASSETS[name], headers=NO_CACHE)


@router.get("/view3d/{study_uid}/{series_uid}")
def page(study_uid: str, series_uid: str, request: Request, _: Principal = Depends(viewer_or_sign_in)) -> Response:
    if not _series_of_study(request.app.state.node, study_uid, series_uid):
        raise HTTPException(404, f"series {series_uid} of study {study_uid} not found")
    return FileResponse(STATIC_DIR / "view3d.html", media_type="text/html", headers=NO_CACHE)


@router.get("/api/view3d")
def status(request: Request, _: Principal = Depends(require_admin)) -> dict:
    """Open views and cached series (admins: what the viewer holds in memory)."""
    svc = service(request.app)
    return {"sessions": svc.sessions, "frames_sent": svc.frames_sent, "cache": svc.cache.stats()}


@router.delete("/api/view3d/cache")
def drop_cache(request: Request, _: Principal = Depends(require_admin)) -> dict:
    """Free the series no open view is using (they load again on the next view)."""
    return {"dropped": service(request.app).cache.drop_unused()}


def ws_principal(ws: WebSocket) -> Principal | None:
    """The user or token behind a WebSocket handshake, or None (also for a foreign Origin)."""
    origin = ws.headers.get("origin")
    scheme = "https" if ws.url.scheme == "wss" else "http"
    if origin is not None and origin != f"{scheme}://{ws.headers.get('host', '')}":
        return None
    header = ws.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        role = ws.app.state.node.index.token_role(hash_token(token.strip())) if scheme.lower() == "bearer" else None
        p = Principal("token", role, "token") if role else None
    else:
        p = session_principal(ws)
    if p is None:
        return None
    # The HTTP routes' role check: a worker token (it opens only /api/worker) or a role this code does
    # not know gets no view, as it gets no page or API read.
    try:
        return _known_role(p)
    except HTTPException:
        return None


@router.websocket("/view3d/{study_uid}/{series_uid}/ws")
async def stream(ws: WebSocket, study_uid: str, series_uid: str) -> None:
    if ws_principal(ws) is None:
        await ws.close(CLOSE_POLICY, "sign in first")  # before accept: the handshake gets 403
        return
    node = ws.app.state.node
    await ws.accept()
    if not await asyncio.to_thread(_series_of_study, node, study_uid, series_uid):
        await ws.send_json({"type": "error", "message": f"series {series_uid} of study {study_uid} not found"})
        await ws.close(CLOSE_NOT_FOUND)
        return
    svc = service(ws.app)
    if svc.sessions >= MAX_SESSIONS:
        await ws.send_json({"type": "error", "message": f"{MAX_SESSIONS} 3D views are open on this node; "
                                                        "try again when one closes"})
        await ws.close(CLOSE_BUSY)
        return
    svc.sessions += 1
    send_lock = asyncio.Lock()

    async def send_bytes(data: bytes) -> None:
        async with send_lock:
            await ws.send_bytes(data)

    async def send_json(obj: dict) -> None:
        async with send_lock:
            await ws.send_json(obj)

    async def send_error(message: str) -> None:
        await send_json({"type": "error", "message": message})

    runner = None
    session = None
    loading = svc.cache.acquire(series_uid)
    try:
        await send_json({"type": "loading", "series_uid": series_uid})
        try:
            series = await asyncio.shield(asyncio.wrap_future(loading))  # shared with other viewers
        except ViewerBusy as exc:
            await send_error(str(exc))
            await ws.close(CLOSE_BUSY)
            return
        except (LookupError, ValueError, OSError) as exc:
            await send_error(str(exc))
            await ws.close(CLOSE_UNUSABLE)
            return
        session = LiveSession(series, send_bytes, send_json)
        await send_json({"type": "ready", **series.info(), "presets": session.presets, "windows": session.windows})
        runner = asyncio.create_task(session.run())
        checked = time.monotonic()
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await send_error("message: send JSON text, not binary")
                continue
            if time.monotonic() - checked > RECHECK_S:
                if ws_principal(ws) is None:
                    await send_error("signed out")
                    await ws.close(CLOSE_SIGNED_OUT)
                    return
                checked = time.monotonic()
            if (problem := _handle(session, text)) is not None:
                await send_error(problem)
    except WebSocketDisconnect:
        pass
    finally:
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        if session is not None:
            svc.frames_sent += session.frames_sent
        svc.cache.release(series_uid)
        svc.sessions -= 1


def _handle(session: LiveSession, text: str) -> str | None:
    """Apply one client message; the problem, naming the field, when it is not a valid one."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"message: not JSON ({exc.msg})"
    if not isinstance(message, dict):
        return "message: must be a JSON object"
    kind = message.get("type")
    if kind == "ack":
        session.ack()
        return None
    if kind == "view":
        try:
            session.update(parse_request(message))
        except ValueError as exc:
            return str(exc)
        return None
    return f"type: unknown message type {kind!r}; types: view, ack"
