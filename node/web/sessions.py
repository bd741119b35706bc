"""Browser sessions: a random cookie value mapped to a user name and a CSRF token.

Sessions live in the web process's memory: a restart logs everyone out, which is the safe
direction, and nothing secret is ever written to disk. Only a SHA-256 of the cookie value is
kept as the key. The role is not kept here: it is read from the users table on every request,
so a role changed or a user removed with ``hilum user`` takes effect at once. A session ends
after ``idle_s`` without a request, and after ``max_age_s`` whatever happens.
"""
from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

COOKIE = "hilum_session"
MAX_AGE_S = 12 * 3600


@dataclass
class Session:
    user: str
    csrf: str
    created: float
    last_seen: float = field(default=0.0)


def _key(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


class SessionStore:
    def __init__(self, idle_s: float, max_age_s: float = MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def create(self, user: str) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        now = self._clock()
        s = Session(user=user, csrf=secrets.token_urlsafe(32), created=now, last_seen=now)
        with self._lock:
            self._expire(now)
            self._sessions[_key(sid)] = s
        return sid, s

    def get(self, sid: str | None, touch: bool = True) -> Session | None:
        """The live session for a cookie value, or None. ``touch``: this request counts as activity."""
        if not sid:
            return None
        now = self._clock()
        with self._lock:
            s = self._sessions.get(_key(sid))
            if s is None:
                return None
            if now - s.last_seen > self.idle_s or now - s.created > self.max_age_s:
                del self._sessions[_key(sid)]
                return None
            if touch:
                s.last_seen = now
            return s

    def drop(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._sessions.pop(_key(sid), None)

    def _expire(self, now: float) -> None:
        dead = [k for k, s in self._sessions.items()
                if now - s.last_seen > self.idle_s or now - s.created > self.max_age_s]
        for k in dead:
            del self._sessions[k]
