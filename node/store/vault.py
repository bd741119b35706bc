"""Everything the node keeps of patient data on its own disk, sealed: the received-instance log
and sealed files (job results, quarantine).

Callers hold locators, never open spool files themselves: ``log:…`` for a record of the log, a
path for a sealed file. ``read`` verifies (and decrypts) every byte before handing it out, so a
tampered or truncated object raises IntegrityError instead of reaching a handler or a peer.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from node.receive.spool import write_durable
from node.store.envelope import MAGIC, IntegrityError, Keyring, Sealer, new_salt
from node.store.segments import (SegmentNumbers, SegmentReader, SegmentWriter, locator_context, parse_locator,
                                  payload_parts)

__all__ = ["IntegrityError", "Vault", "VaultSpec"]

# Folders of the data directory holding only files sealed by ``Vault.write_file`` (artefacts: the
# per-series cache of node/jobs/artefacts.py, sealed the same way).
SEALED_DIRS = ("spool", "results", "quarantine", "artefacts")


@dataclass(frozen=True)
class VaultSpec:
    """What a job worker needs to open the vault (picklable; the keyring travels over a local pipe)."""

    data_dir: str
    keyring_json: str | None

    def open(self) -> "Vault":
        return Vault(Path(self.data_dir), Keyring.parse(self.keyring_json) if self.keyring_json else None)


class Vault:
    def __init__(self, data_dir: Path, keyring: Keyring | None, *, writer: bool = False,
                 segment_mb: int = 512) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "spool"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.sealer = Sealer(_spool_salt(self.root / "identity"), keyring)
        self.log = SegmentReader(self.root / "log", self.sealer)
        self.writer = self.deferred = None
        if writer:
            # Two writers, one numbering: pushes go to segments with space zero-filled ahead (one
            # O_DSYNC write each); a retrieve's deferred appends to segments of their own that just
            # grow (synced per batch), never through the zero-filled space (node/store/segments.py).
            numbers = SegmentNumbers(self.log)
            self.writer = SegmentWriter(self.log, max_segment=segment_mb << 20, numbers=numbers)
            self.deferred = SegmentWriter(self.log, max_segment=segment_mb << 20, numbers=numbers, prepare=False)

    def writers(self) -> list[SegmentWriter]:
        return [w for w in (self.writer, self.deferred) if w is not None]

    @property
    def keyring(self) -> Keyring | None:
        return self.sealer.keyring

    def use_keyring(self, keyring: Keyring | None) -> None:
        """Seal new objects under ``keyring`` from now on (rotation); objects already written stay readable
        as long as their key is in it."""
        self.sealer.keyring = keyring

    def spec(self) -> VaultSpec:
        ring = self.sealer.keyring
        return VaultSpec(str(self.data_dir), ring.to_json() if ring else None)

    def close(self) -> None:
        for w in self.writers():
            w.close()

    def close_segment(self, number: int) -> None:
        """No more appends into segment ``number``; returns once those already reserved are written."""
        for w in self.writers():
            w.close_segment(number)

    def active_segments(self) -> set[int]:
        """Log segments a writer of this vault is still writing or syncing (retention never deletes them)."""
        return set().union(*(w.active() for w in self.writers()))

    def quiesce(self) -> None:
        """Returns once no append is under way (or after a minute)."""
        for w in self.writers():
            w.quiesce()

    # -- received instances ---------------------------------------------------------------
    def append(self, data: bytes | memoryview, meta: dict, durable: bool = True) -> str:
        """Seal and durably append one received instance; ``meta`` (who sent it) rides along.
        ``durable=False``: on disk only after the next ``sync()`` (node/store/segments.py)."""
        if self.writer is None:
            raise RuntimeError("this vault is read-only")
        parts = payload_parts(meta, data)
        return (self.writer if durable else self.deferred).append(
            self.sealer.sealed_length(sum(len(p) for p in parts)),
            lambda seg, off: self.sealer.seal_parts(parts, locator_context(seg, off)), durable)

    def sync(self) -> None:
        """Make every ``durable=False`` append so far durable."""
        if self.deferred is not None:
            self.deferred.sync()

    # -- files ----------------------------------------------------------------------------
    def write_file(self, path: Path, data: bytes | memoryview) -> None:
        """Seal ``data`` into ``path`` durably (file fsync'ed; the caller fsyncs the directory)."""
        write_durable(path, self.sealer.seal(data, self._file_context(path)))

    def _file_context(self, path: Path) -> bytes:
        """A sealed file is bound to its path under the data directory (moved elsewhere, it fails)."""
        p = Path(path).absolute()
        try:
            return str(p.relative_to(self.data_dir.absolute())).encode()
        except ValueError:
            return str(p).encode()

    # -- reading --------------------------------------------------------------------------
    def read(self, locator: str) -> bytes:
        """The DICOM bytes behind a locator, verified. IntegrityError (with ``.locator``) if not."""
        try:
            if locator.startswith("log:"):
                return self.log.read(locator)[1]
            return self.read_file(Path(locator))
        except IntegrityError as exc:
            exc.locator = locator
            raise

    def quarantine_damaged(self, locator: str, reason: str) -> Path | None:
        """Keep a copy of a damaged object as it is on disk, with the reason, for an admin to look at."""
        qdir = self.data_dir / "quarantine"
        stem = f"{time.strftime('%Y%m%dT%H%M%S')}-damaged-{secrets.token_hex(4)}"
        try:
            where = parse_locator(locator)
            if where is not None:
                seg, off, length = where
                with open(self.log.path(seg), "rb") as f:
                    f.seek(off)
                    blob = f.read(length)
            else:
                blob = Path(locator).read_bytes()
            write_durable(qdir / f"{stem}.bin", blob)
            write_durable(qdir / f"{stem}.json", json.dumps({"reason": reason, "locator": locator,
                                                              "at": time.time()}, indent=1).encode())
        except OSError:
            return None
        return qdir / f"{stem}.bin"

    def read_file(self, path: Path) -> bytes:
        """A sealed file's bytes, verified. Everything the node writes under ``SEALED_DIRS`` of its
        data directory is an envelope (``write_file``; envelopes date from before encryption, see
        node/store/envelope.py, so no legitimate raw file exists there): anything else there - a
        damaged magic, a file truncated to under 8 bytes or to nothing - is IntegrityError, never
        data. Elsewhere a file without the magic is returned as it is: a remote worker's inputs,
        fetched as plain DICOM into its own temporary directory (node/jobs/remote.py), are read so."""
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{path} is gone (purged by retention?)") from None
        if blob[: len(MAGIC)] == MAGIC:
            return self.sealer.open(blob, self._file_context(path))
        if self.sealer.encrypting:
            # An unsealed file where only sealed ones are written: planted or left from before
            # encryption was turned on. Never hand it out as if it were ours.
            raise IntegrityError(f"{path} is not sealed, but the spool is encrypted")
        if self._in_sealed_dir(path):
            raise IntegrityError(f"{path} is not a sealed envelope ({len(blob)} bytes, magic "
                                 f"{bytes(blob[: len(MAGIC)])!r}): damaged or truncated")
        return blob

    def _in_sealed_dir(self, path: Path) -> bool:
        try:
            rel = Path(path).absolute().relative_to(self.data_dir.absolute())
        except ValueError:
            return False
        return bool(rel.parts) and rel.parts[0] in SEALED_DIRS


def _spool_salt(path: Path) -> bytes:
    """The spool's random identity, bound into every envelope (created once, durably)."""
    try:
        salt = path.read_bytes()
    except FileNotFoundError:
        salt = new_salt()
        write_durable(path, salt)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return salt
    if len(salt) != 16:
        raise IntegrityError(f"{path}: spool identity is damaged ({len(salt)} bytes, expected 16)")
    return salt
