"""Console users: names, roles and passwords hashed with argon2id (a memory-hard KDF).

Passwords are low-entropy secrets chosen by people, so unlike API tokens they get a slow,
memory-hard hash (argon2-cffi's RFC 9106 low-memory profile: 64 MiB, 3 passes). A login for an
unknown name still spends one verification, so response time does not reveal which names exist.
"""
from __future__ import annotations

import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from node.store.index import Index
from node.web.auth import ROLES

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024  # argon2 takes any length; a cap keeps a login request cheap to refuse

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash("hilum: no such user")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"user name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-', starting with a "
                         "letter or digit")
    return name


def check_password(password: str) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise ValueError(f"password must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters long")
    return password


def set_user(index: Index, name: str, password: str, role: str) -> bool:
    """Create a user, or reset an existing user's password and role. True when created."""
    check_name(name)
    check_password(password)
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return index.set_user(name, _hasher.hash(password), role)


def authenticate(index: Index, name: str, password: str) -> str | None:
    """The user's role when ``password`` is right, else None."""
    if not isinstance(name, str) or not isinstance(password, str) or len(password) > MAX_PASSWORD_LENGTH:
        return None
    row = index.user(name) if NAME_RE.match(name) else None
    try:
        _hasher.verify(row["password_hash"] if row else _DUMMY_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if row is None:
        return None
    if _hasher.check_needs_rehash(row["password_hash"]):
        index.update_password_hash(name, _hasher.hash(password))
    return row["role"]
