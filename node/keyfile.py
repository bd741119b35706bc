"""Secret keys kept in files of their own (audit HMAC key, de-identification project key).

A key file holds 32 random bytes as hex. It is created with mode 0600 when missing (``create``),
and refused when group or others may read it: a key anyone on the host can read protects nothing.
Errors name the configuration field the path came from.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from node.config import ConfigError

KEY_BYTES = 32


class KeyFileError(ConfigError):
    pass


def write_new_key(path: Path, field: str) -> bytes:
    """Create ``path`` with a fresh random key (0600); refuses to overwrite an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{field}: {path} already exists (not overwritten)") from None
    except OSError as exc:
        raise KeyFileError(f"{field}: cannot create {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return key


def read_key(path: Path, field: str, create: bool = False) -> bytes:
    """The key in ``path``; a missing file is created when ``create``, else an error naming ``field``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if create:
            return write_new_key(path, field)
        raise KeyFileError(f"{field}: key file {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{field}: {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(f"{field}: key file {path} is readable by group or others "
                           f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"{field}: {path} does not hold a hex key") from None
    if len(key) < 16:
        raise KeyFileError(f"{field}: key in {path} is shorter than 16 bytes")
    return key
