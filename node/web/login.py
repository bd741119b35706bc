"""/api/session: sign in with a name and password, see who you are, sign out.

The session cookie is HttpOnly (page scripts cannot read it), SameSite=Strict (other sites'
pages cannot make the browser send it) and Secure whenever the request came over TLS. The
CSRF token is handed to the node's own pages in this endpoint's JSON, never in a cookie.
Repeated failures for one name from one address are slowed down: after ``MAX_FAILURES`` in
``FAILURE_WINDOW_S`` that pair is refused with 429 until the window has passed. Every attempt,
accepted or refused, goes into the audit trail.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, Field

from node.web.auth import Principal, current_principal, request_origin
from node.web.sessions import COOKIE
from node.web.users import MAX_PASSWORD_LENGTH, authenticate

router = APIRouter(prefix="/api/session", tags=["session"])
MAX_FAILURES = 5
FAILURE_WINDOW_S = 300.0


class Credentials(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)


class LoginThrottle:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[tuple[str, str], deque[float]] = defaultdict(deque)

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        q = self._failures[key]
        while q and now - q[0] > FAILURE_WINDOW_S:
            q.popleft()
        return q

    def retry_after(self, key: tuple[str, str]) -> float:
        now = time.monotonic()
        with self._lock:
            q = self._recent(key, now)
            return FAILURE_WINDOW_S - (now - q[0]) if len(q) >= MAX_FAILURES else 0.0

    def failed(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._recent(key, time.monotonic()).append(time.monotonic())

    def succeeded(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._failures.pop(key, None)


def _session_json(p: Principal, idle_s: float) -> dict:
    return {"user": p.name, "role": p.role, "via": p.via, "csrf_token": p.csrf, "idle_timeout_s": idle_s}


@router.post("")
def login(creds: Credentials, request: Request, response: Response) -> dict:
    origin = request.headers.get("origin")
    if origin is not None and origin != request_origin(request):
        raise HTTPException(403, "cross-origin sign-in refused")
    web, node = request.app.state.web, request.app.state.node
    address = request.client.host if request.client else None
    key = (address or "", creds.username.lower())
    wait = web.throttle.retry_after(key)
    if wait > 0:
        node.audit.login(creds.username, address, False, "throttled after repeated failures")
        raise HTTPException(429, "too many failed sign-ins; try again later",
                            headers={"Retry-After": str(int(wait) + 1)})
    role = authenticate(node.index, creds.username, creds.password)
    if role is None:
        web.throttle.failed(key)
        node.audit.login(creds.username, address, False, "wrong user name or password")
        raise HTTPException(401, "wrong user name or password")
    web.throttle.succeeded(key)
    node.audit.login(creds.username, address, True)
    web.sessions.drop(request.cookies.get(COOKIE))  # a fresh session id at sign-in (no fixation)
    sid, session = web.sessions.create(creds.username)
    response.set_cookie(COOKIE, sid, httponly=True, samesite="strict", secure=request.url.scheme == "https",
                        path="/")
    return _session_json(Principal(creds.username, role, "session", session.csrf), web.sessions.idle_s)


@router.get("")
def whoami(request: Request, p: Principal = Depends(current_principal)) -> dict:
    return _session_json(p, request.app.state.web.sessions.idle_s)


@router.delete("")
def logout(request: Request, response: Response, p: Principal = Depends(current_principal)) -> dict:
    if p.via == "session":
        request.app.state.web.sessions.drop(request.cookies.get(COOKIE))
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
    return {"signed_out": p.via == "session"}
