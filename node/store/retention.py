"""Retention: delete spooled copies once they are safe elsewhere and their period has passed.

Originals live in log segments, so a segment goes only when every instance in it may go (see
``Index.purgeable_segments``); results are files and go one by one. The index is marked first
and the data deleted second: a crash in between leaves an orphan file, never a reference to
data that is gone. Every deletion is logged and audited, one entry per study.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom

from node.audit import NULL_AUDIT, AuditTrail
from node.config import Settings
from node.store.index import Index
from node.store.vault import Vault

log = logging.getLogger("hilum.retention")
DAY = 86400.0


@dataclass
class PurgeReport:
    segments: int = 0
    instances: int = 0
    results: int = 0

    def as_dict(self) -> dict:
        return {"segments": self.segments, "instances": self.instances, "results": self.results}


def purge_due(settings: Settings, index: Index, vault: Vault, audit: AuditTrail = NULL_AUDIT,
              now: float | None = None) -> PurgeReport:
    now = time.time() if now is None else now
    r = settings.retention
    rep = PurgeReport()
    if r.originals_days is not None:
        _purge_originals(settings, index, vault, audit, now - r.originals_days * DAY, now, rep)
    if r.results_days is not None:
        _purge_results(index, audit, now - r.results_days * DAY, now, rep)
    if rep.segments or rep.results:
        log.info("retention: deleted %d segment(s) (%d original(s)) and %d result file(s)",
                 rep.segments, rep.instances, rep.results)
    return rep


def _purge_originals(settings: Settings, index: Index, vault: Vault, audit: AuditTrail, cutoff: float, now: float,
                     rep: PurgeReport) -> None:
    require_archive = settings.store_originals_in_orthanc
    for seg, sops in sorted(index.purgeable_segments(cutoff, require_archive).items()):
        vault.close_segment(seg)  # nothing more goes into a segment about to be deleted
        if not _only_purgeable(vault, index, seg, set(sops)):
            continue
        studies = Counter(index.study_of_instances(sops))
        if not index.mark_instances_purged(sops, now, cutoff, require_archive):
            continue  # something needs them again since the first look
        try:
            vault.log.path(seg).unlink()
        except FileNotFoundError:
            pass
        _fsync_dir(vault.log.root)
        rep.segments += 1
        rep.instances += len(sops)
        audit.spool_purged("original", dict(studies), {"segment": seg, "policy_days": settings.retention.originals_days})


def _only_purgeable(vault: Vault, index: Index, seg: int, sops: set[str]) -> bool:
    """Every record in the segment is one of ``sops`` or a duplicate of an instance stored elsewhere.
    A record not yet indexed (its C-STORE still committing) keeps the segment."""
    for rec in vault.log.scan(seg):
        try:
            _, raw = vault.log.read(rec.locator)
            sop = str(pydicom.dcmread(BytesIO(raw), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                      .SOPInstanceUID)
        except Exception:  # noqa: BLE001 - unreadable: keep the segment, let an admin look
            log.warning("retention: record %s unreadable; segment %d kept", rec.locator, seg)
            return False
        if sop in sops:
            continue
        where = index.instance_locator(sop)
        if where is None or where == rec.locator:
            return False
    return True


def _purge_results(index: Index, audit: AuditTrail, cutoff: float, now: float, rep: PurgeReport) -> None:
    rows = index.purgeable_results(cutoff)
    if not rows:
        return
    index.mark_results_purged([r["sop_uid"] for r in rows], now)
    dirs = set()
    studies: Counter = Counter()
    for row in rows:
        p = Path(row["path"])
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        dirs.add(p.parent)
        studies[row["study_uid"]] += 1
    for d in dirs:
        try:
            if not any(d.iterdir()):
                d.rmdir()
        except OSError:
            pass
    if dirs:
        _fsync_dir(next(iter(dirs)).parent)
    rep.results += len(rows)
    audit.spool_purged("result", dict(studies), {})


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
