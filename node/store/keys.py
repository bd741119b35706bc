"""Where the spool's keyring comes from: a key file, an environment variable, or a command.

Errors name the configuration field. A key file must be 0600 and a regular file; it is written
atomically (temporary file, fsync, rename) so a crash during rotation never leaves it half
written, and old keys stay in it so that everything sealed under them remains readable.
"""
from __future__ import annotations

import os
import secrets
import stat
import subprocess
from pathlib import Path

from node.config import ConfigError
from node.config_security import SpoolEncryption
from node.store.envelope import Keyring


class KeyringError(ConfigError):
    pass


def load_keyring(enc: SpoolEncryption | None, data_dir: Path | None = None) -> Keyring | None:
    """The keyring for ``spool_encryption`` (None: the spool is not encrypted). A missing key file
    is created only while the spool under ``data_dir`` holds nothing sealed under an older key."""
    if enc is None:
        return None
    if enc.key_file is not None:
        holds_data = data_dir is not None and any((data_dir / "spool" / "log").glob("*.seg"))
        if holds_data and not enc.key_file.exists():
            raise KeyringError(f"spool_encryption.key_file: {enc.key_file} does not exist, but the spool in "
                               f"{data_dir} holds data: restore the key file (a new key cannot read it)")
        return _from_file(enc.key_file, create=enc.create_key_file)
    if enc.key_env is not None:
        text = os.environ.get(enc.key_env)
        if not text:
            raise KeyringError(f"spool_encryption.key_env: environment variable {enc.key_env} is not set")
        return _parse(text, f"spool_encryption.key_env ({enc.key_env})")
    try:
        out = subprocess.run(enc.key_command, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KeyringError(f"spool_encryption.key_command: cannot run {enc.key_command[0]!r}: {exc}") from None
    if out.returncode != 0:
        raise KeyringError(f"spool_encryption.key_command: exit status {out.returncode}: "
                           f"{out.stderr.decode(errors='replace').strip()[:200]}")
    return _parse(out.stdout.decode(errors="replace"), "spool_encryption.key_command")


def _parse(text: str, field: str) -> Keyring:
    try:
        return Keyring.parse(text)
    except ValueError as exc:
        raise KeyringError(f"{field}: {exc}") from None


def _from_file(path: Path, create: bool) -> Keyring:
    field = "spool_encryption.key_file"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not create:
            raise KeyringError(f"{field}: {path} does not exist") from None
        ring = Keyring.new()
        write_keyring(path, ring, exclusive=True)
        return ring
    if not stat.S_ISREG(st.st_mode):
        raise KeyringError(f"{field}: {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyringError(f"{field}: {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                           "chmod 600 it")
    return _parse(path.read_text(), field)


def write_keyring(path: Path, ring: Keyring, exclusive: bool = False) -> None:
    """Atomically replace (or, ``exclusive``, create) the key file, mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if exclusive and path.exists():
        raise KeyringError(f"spool_encryption.key_file: {path} already exists (not overwritten)")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(ring.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def rotate_key_file(enc: SpoolEncryption | None) -> Keyring:
    """Add a new active key to the key file (old keys kept). Only a key file can be rotated here."""
    if enc is None:
        raise KeyringError("spool_encryption: not configured, nothing to rotate")
    if enc.key_file is None:
        raise KeyringError("spool_encryption: keys from key_env/key_command are rotated by their provider; "
                           "then run `hilum keys rewrap`")
    ring = _from_file(enc.key_file, create=False).with_new_active()
    write_keyring(enc.key_file, ring)
    return ring


def remove_key(enc: SpoolEncryption, kid: str) -> Keyring:
    """Drop a retired key from the key file (callers first check nothing is wrapped under it)."""
    if enc.key_file is None:
        raise KeyringError("spool_encryption: only a key_file keyring can be edited here")
    ring = _from_file(enc.key_file, create=False)
    if kid == ring.active:
        raise KeyringError(f"key {kid!r} is the active key")
    if kid not in ring.keys:
        raise KeyringError(f"key {kid!r} is not in the keyring")
    new = Keyring(active=ring.active, keys={k: v for k, v in ring.keys.items() if k != kid})
    write_keyring(enc.key_file, new)
    return new
