"""Response security headers and request size limits, for every route (pure ASGI middleware).

Two Content-Security-Policies: a strict one for the console, the login page, the server-side
3D view and the API (scripts and styles only from the node's own files; 'self' covers the 3D
view's same-origin WebSocket), and OHIF's, which in addition allows the
hashes of the two inline scripts of OHIF's index.html, WebAssembly compilation (its image
codecs), blob: workers, inline styles (React sets style attributes) and 'unsafe-eval': OHIF's
SEG loader builds functions from strings at run time (the ndarray library behind
@cornerstonejs/adapters), and without it no segmentation opens. Both forbid framing.
No CORS headers are ever sent: the browser keeps other origins out.
"""
from __future__ import annotations

import re

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STRICT_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
              "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
NODE_PREFIXES = ("/api", "/dicom-web/", "/console", "/login", "/view3d")
MAX_API_BODY = 1024 * 1024  # JSON requests; STOW-RS has its own limit in the gateway
# A remote worker's result objects and artefacts (a SEG is many MB): node/web/worker_api.py reads them
# in chunks against stow_max_mb, behind the worker token and the attempt's ticket. Exactly these two.
WORKER_UPLOAD = re.compile(r"/api/worker/jobs/[0-9]+/(results|artefacts)/[^/]+")


def ohif_csp(script_hashes: list[str]) -> str:
    hashes = " ".join(f"'sha256-{h}'" for h in script_hashes)
    return ("default-src 'self'; "
            f"script-src 'self' {hashes} 'unsafe-eval' 'wasm-unsafe-eval'; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
            "connect-src 'self' data: blob:; worker-src 'self' blob:; media-src 'self' blob:; "
            "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'")


class SecurityHeaders:
    def __init__(self, app: ASGIApp, ohif_policy: str) -> None:
        self.app = app
        self.ohif_policy = ohif_policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        node_route = path.startswith(NODE_PREFIXES)
        https = scope.get("scheme") == "https"

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                h = MutableHeaders(scope=message)
                h["Content-Security-Policy"] = STRICT_CSP if node_route else self.ohif_policy
                h["X-Content-Type-Options"] = "nosniff"
                h["X-Frame-Options"] = "DENY"
                h["Referrer-Policy"] = "same-origin"
                h["Cross-Origin-Opener-Policy"] = "same-origin"
                h["Cross-Origin-Resource-Policy"] = "same-origin"
                if path.startswith("/api"):
                    h["Cache-Control"] = "no-store"
                if https:
                    h["Strict-Transport-Security"] = "max-age=31536000"
            await send(message)

        if path.startswith("/api") and scope["method"] not in ("GET", "HEAD") \
                and not (scope["method"] == "PUT" and WORKER_UPLOAD.fullmatch(path)):
            size = Headers(scope=scope).get("content-length")
            if size is not None and size.isdigit() and int(size) > MAX_API_BODY:
                await _plain(with_headers, 413, b"request body too large")
                return
            # A chunked body has no Content-Length: read it here, up to the limit, and hand the app
            # what was read (the endpoints would otherwise hold a body of any size, sign-in included).
            head = await _body_within(receive, MAX_API_BODY)
            if head is None:
                await _plain(with_headers, 413, b"request body too large")
                return

            async def replay() -> Message:
                return head.pop(0) if head else await receive()

            await self.app(scope, replay, with_headers)
            return
        await self.app(scope, receive, with_headers)


async def _body_within(receive: Receive, limit: int) -> list[Message] | None:
    """The request's body messages, or None once they pass ``limit`` bytes."""
    messages, total = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages  # the client went away: the app sees that as it would have
        total += len(message.get("body", b""))
        if total > limit:
            return None
        if not message.get("more_body", False):
            return messages


async def _plain(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
