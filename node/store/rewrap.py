"""Key rotation for the spool: re-wrap every object's data key under the active master key.

Payloads are never moved or re-encrypted and locators never change, so reception, jobs and
deliveries go on while this runs. For each object the new wrap goes into the header slot not in
use and is synced; the old wrap stays, so a job that started before the rotation (its worker
holds the old keyring) still reads everything. ``drop_key`` clears the old wraps when the old
key is retired. Objects written meanwhile are sealed under the active key already; one caught
half-way is found by the next pass.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from node.store.envelope import HEADER_SIZE, MAGIC, IntegrityError
from node.store.index import TERMINAL_JOB, Index
from node.store.vault import Vault

log = logging.getLogger("hilum.keys")


@dataclass
class RewrapReport:
    examined: int = 0
    rewrapped: int = 0
    plain: int = 0  # written before encryption was turned on: no key to rotate
    errors: list[str] = field(default_factory=list)
    keys_in_use: Counter = field(default_factory=Counter)  # key id → objects wrapped under it afterwards

    def as_dict(self) -> dict:
        return {"examined": self.examined, "rewrapped": self.rewrapped, "plain": self.plain,
                "errors": self.errors[:20], "keys_in_use": dict(self.keys_in_use)}


# Sealed files besides the log: results, quarantined payloads, and the artefact cache (a handler's
# lungs of a series: derived from the images, so under the same keys; node.jobs.artefacts).
_SEALED_FILES = (("results", "*.dcm"), ("quarantine", "*.dcm"), ("artefacts", "*.z"))


def _objects(vault: Vault) -> Iterator[tuple[Path, list[int]]]:
    """(file, header offsets) for every sealed object: log segments, then the sealed files."""
    for seg in vault.log.segments():
        yield vault.log.path(seg), [r.offset for r in vault.log.scan(seg)]
    for folder, pattern in _SEALED_FILES:
        d = vault.data_dir / folder
        for p in sorted(d.rglob(pattern)) if d.exists() else []:
            try:
                with open(p, "rb") as f:
                    sealed = f.read(len(MAGIC)) == MAGIC
            except FileNotFoundError:
                continue  # purged or pruned meanwhile
            if sealed:
                yield p, [0]


def rewrap_all(vault: Vault, drop_old: bool = False) -> RewrapReport:
    """Bring every sealed object under the active key; with ``drop_old``, clear the old wraps."""
    rep = RewrapReport()
    vault.quiesce()  # appends sealed under the previous key are on disk (else: next pass)
    for path, offsets in _objects(vault):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue  # purged meanwhile
        try:
            _rewrap_file(vault, fd, path, offsets, drop_old, rep)
        finally:
            os.close(fd)
    return rep


def _rewrap_file(vault: Vault, fd: int, path: Path, offsets: list[int], drop_old: bool, rep: RewrapReport) -> None:
    sealer = vault.sealer
    pending_drop: list[tuple[int, str]] = []
    changed = False
    for off in offsets:
        rep.examined += 1
        try:
            head = os.pread(fd, HEADER_SIZE, off)
            h = sealer.header(head)
            if h.mode == 0:
                rep.plain += 1
                continue
            change = sealer.rewrap(head)
        except IntegrityError as exc:
            rep.errors.append(f"{path}@{off}: {exc}")
            continue
        if change is not None:
            pos, sector = change
            os.pwrite(fd, sector, off + pos)
            rep.rewrapped += 1
            changed = True
        if drop_old:
            pending_drop += [(off, kid) for kid in h.key_ids() if kid != sealer.keyring.active]
    if changed:
        os.fsync(fd)  # new wraps durable before any old one is cleared
    dropped = False
    for off, kid in pending_drop:
        clear = sealer.drop_slot(os.pread(fd, HEADER_SIZE, off), kid)
        if clear is not None:
            os.pwrite(fd, clear[1], off + clear[0])
            dropped = True
    if dropped:
        os.fsync(fd)
    for off in offsets:
        try:
            rep.keys_in_use[_needs(sealer.header(os.pread(fd, HEADER_SIZE, off)), sealer)] += 1
        except IntegrityError:
            pass


def _needs(h, sealer) -> str:
    """The key an object needs: the active one if it is wrapped under it, else its (only) other one."""
    ids = h.key_ids()
    active = sealer.keyring.active if sealer.keyring else None
    if not ids:
        return "none (unencrypted)"
    return active if active in ids else sorted(ids)[0]


def keys_in_use(vault: Vault) -> Counter:
    """Key id → number of objects that need it (the active key where they have its wrap): what
    `hilum keys retire` checks, and what a rotation should bring down to zero for the old key."""
    used: Counter = Counter()
    for path, offsets in _objects(vault):
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            continue  # purged or pruned meanwhile
        with f:
            for off in offsets:
                f.seek(off)
                try:
                    used[_needs(vault.sealer.header(f.read(HEADER_SIZE)), vault.sealer)] += 1
                except IntegrityError:
                    pass
    return used


def drop_key(vault: Vault, kid: str) -> int:
    """Clear every wrap under ``kid`` where the active key's wrap is there too; returns how many."""
    dropped = 0
    for path, offsets in _objects(vault):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            changed = False
            for off in offsets:
                try:
                    clear = vault.sealer.drop_slot(os.pread(fd, HEADER_SIZE, off), kid)
                except IntegrityError:
                    continue
                if clear is not None:
                    os.pwrite(fd, clear[1], off + clear[0])
                    dropped += 1
                    changed = True
            if changed:
                os.fsync(fd)
        finally:
            os.close(fd)
    return dropped


def jobs_holding_old_keys(index: Index, now: float | None = None) -> list[dict]:
    """Jobs that may still seal results under a key a rotation replaced: a worker gets the node's
    keyring when its job is dispatched (``Vault.spec``) and keeps it to the end, so a job that started
    before the last re-wrap finished may still write objects wrapped only under the old active key,
    which ``keys_in_use`` cannot see yet. Retiring that key would make those results unreadable.
    While a re-wrap is queued or running, every started job counts (the rotation is under way).
    Returns [{"id", "status", "started_at"}] of such jobs not yet done or failed."""
    c = index.conn()
    rewraps = c.execute("SELECT status, finished_at FROM maintenance WHERE kind='rewrap'").fetchall()
    if not rewraps:
        return []  # no rotation through the node: every job started with the keyring it has now
    if any(r["status"] not in ("done", "failed") for r in rewraps):
        cutoff = time.time() if now is None else now
    else:
        cutoff = max(r["finished_at"] or 0.0 for r in rewraps)
    terminal = ",".join("?" * len(TERMINAL_JOB))
    rows = c.execute(f"SELECT id, status, started_at FROM jobs WHERE status NOT IN ({terminal}) "
                     "AND started_at IS NOT NULL AND started_at <= ? ORDER BY id", (*TERMINAL_JOB, cutoff)).fetchall()
    return [dict(r) for r in rows]
