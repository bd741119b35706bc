"""Who is asking: an API token (scripts) or a browser session (people), and with which role.

Tokens are created by the CLI, printed once, stored as SHA-256 hashes with a role. They are
256-bit random strings, so a fast hash is the right one (a slow KDF protects low-entropy
passwords; it adds nothing here and would slow every request).

A browser session comes from the ``hilum_session`` cookie (see ``login.py``). The browser sends
a cookie by itself, so every state-changing request authenticated by the cookie must also prove
it comes from the node's own pages: its Origin, when present, must be the node's, and it must
carry the session's CSRF token in ``X-CSRF-Token``. The one exception is STOW-RS from OHIF,
which cannot add that header: there a same-origin Origin and a content type that no cross-site
page can send without a CORS preflight (which this server never grants) do the same job.
A bearer token is never sent by a browser on its own, so it needs neither.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

from fastapi import Depends, HTTPException, Request, status

from node.store.index import Index
from node.web.sessions import COOKIE

# viewer: reads everything (console, API, QIDO/WADO). annotator: a viewer who may also store
# objects into the archive through the gateway (STOW-RS: a SEG or SR made in OHIF). admin: also
# changes the node (rules, retries, destinations, users' audit search...). Checked per request.
Role = Literal["admin", "annotator", "viewer"]
ROLES: tuple[str, ...] = ("admin", "annotator", "viewer")
# worker: a remote job worker's token (node/web/worker_api.py); it opens nothing else, not even reads.
WORKER_ROLE = "worker"
TOKEN_ROLES: tuple[str, ...] = (*ROLES, WORKER_ROLE)
STORE_ROLES = frozenset({"admin", "annotator"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PREFLIGHTED_TYPES = ("multipart/related", "application/dicom", "application/json")


@dataclass(frozen=True)
class Principal:
    name: str  # user name, or "token" for an API token
    role: str
    via: Literal["token", "session"]
    csrf: str | None = None  # the session's CSRF token


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(index: Index, role: str, label: str | None = None) -> str:
    if role not in TOKEN_ROLES:
        raise ValueError(f"role must be one of {', '.join(TOKEN_ROLES)}, got {role!r}")
    token = "hlm_" + secrets.token_urlsafe(32)
    index.add_token(hash_token(token), role, label)
    return token


def request_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', '')}"


def session_principal(request: Request) -> Principal | None:
    """The signed-in user of this request's session cookie, if the session is alive."""
    web = request.app.state.web
    # The console's own polling says so: it must not keep an unattended session alive.
    background = request.headers.get("x-hilum-background") == "1"
    session = web.sessions.get(request.cookies.get(COOKIE), touch=not background)
    if session is None:
        return None
    row = request.app.state.node.index.user(session.user)
    if row is None:  # removed since login
        web.sessions.drop(request.cookies.get(COOKIE))
        return None
    return Principal(session.user, row["role"], "session", session.csrf)


def _check_csrf(request: Request, p: Principal) -> None:
    origin = request.headers.get("origin")
    if origin is not None and origin != request_origin(request):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-origin request refused")
    token = request.headers.get("x-csrf-token")
    if token is not None:
        if not hmac.compare_digest(token.encode(), (p.csrf or "").encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid CSRF token")
        return
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.url.path.startswith("/dicom-web/") and origin is not None and ctype in PREFLIGHTED_TYPES:
        return
    raise HTTPException(status.HTTP_403_FORBIDDEN, "missing CSRF token (X-CSRF-Token header)")


def _known_role(p: Principal) -> Principal:
    # A role this code does not know (a row written by another version) gets nothing, not viewer's rights.
    if p.role == WORKER_ROLE:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "a worker token opens only the job worker API (/api/worker)")
    if p.role not in ROLES:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"unknown role {p.role!r}")
    return p


def current_principal(request: Request) -> Principal:
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        role = None
        if scheme.lower() == "bearer" and token.strip():
            role = request.app.state.node.index.token_role(hash_token(token.strip()))
        if role is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        p = Principal("token", role, "token")
    else:
        p = session_principal(request)
        if p is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "sign in or send a bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        if request.method not in SAFE_METHODS:
            _check_csrf(request, p)
    request.state.principal = _known_role(p)
    return p


def current_role(request: Request) -> str:
    return current_principal(request).role


def require_viewer(p: Principal = Depends(current_principal)) -> Principal:
    return p


def require_admin(p: Principal = Depends(current_principal)) -> Principal:
    if p.role != "admin":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin role required")
    return p


def require_store(p: Principal = Depends(current_principal)) -> Principal:
    """Storing into the archive (STOW-RS through the gateway): annotators and admins."""
    if p.role not in STORE_ROLES:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "storing objects (STOW-RS) needs the annotator or admin role")
    return p


def who(p: Principal) -> str:
    """How an action is attributed in histories: 'admin alice' or 'api token'."""
    return f"api {p.name}" if p.via == "token" else f"{p.role} {p.name}"
