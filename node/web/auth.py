"""API tokens: created by the CLI, printed once, stored as SHA-256 hashes with a role.

Tokens are 256-bit random strings, so a fast hash is the right one (a slow KDF protects
low-entropy passwords; it adds nothing here and would slow every request).
"""
from __future__ import annotations

import hashlib
import secrets
from typing import Literal

from fastapi import Depends, HTTPException, Request, status

from node.store.index import Index

Role = Literal["admin", "viewer"]
ROLES: tuple[str, ...] = ("admin", "viewer")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(index: Index, role: str, label: str | None = None) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    token = "hlm_" + secrets.token_urlsafe(32)
    index.add_token(hash_token(token), role, label)
    return token


def current_role(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    role = request.app.state.node.index.token_role(hash_token(token.strip()))
    if role is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid token", headers={"WWW-Authenticate": "Bearer"})
    return role


def require_viewer(role: str = Depends(current_role)) -> str:
    return role


def require_admin(role: str = Depends(current_role)) -> str:
    if role != "admin":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin role required")
    return role
