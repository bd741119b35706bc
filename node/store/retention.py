"""Retention: delete spooled copies once they are safe elsewhere and their period has passed.

Originals live in log segments, so a segment goes only when every instance in it may go (see
``Index.purgeable_segments``); results are files and go one by one. The index is marked first
and the data deleted second: a crash in between leaves an orphan file, never a reference to
data that is gone; the next pass deletes such a segment or result file first. Every
deletion is logged and audited, one entry per study. A segment that cannot be handled (an
error) is logged and reported in the pass's ``errors``; the pass goes on with the next one.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
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
    orphans: int = 0  # segments and result files marked purged by an interrupted pass, deleted by this one
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"segments": self.segments, "instances": self.instances, "results": self.results,
                "orphans": self.orphans, "errors": self.errors[:20]}


def purge_due(settings: Settings, index: Index, vault: Vault, audit: AuditTrail = NULL_AUDIT,
              now: float | None = None) -> PurgeReport:
    now = time.time() if now is None else now
    r = settings.retention
    rep = PurgeReport()
    if r.originals_days is not None:
        _purge_orphans(settings, index, vault, audit, rep)
        _purge_originals(settings, index, vault, audit, now - r.originals_days * DAY, now, rep)
    if r.results_days is not None:
        _purge_results(index, audit, now - r.results_days * DAY, now, rep)
    if rep.segments or rep.results or rep.orphans:
        log.info("retention: deleted %d segment(s) (%d original(s)), %d file(s) left by an interrupted pass, and %d "
                 "result file(s)", rep.segments, rep.instances, rep.orphans, rep.results)
    return rep


def _purge_originals(settings: Settings, index: Index, vault: Vault, audit: AuditTrail, cutoff: float, now: float,
                     rep: PurgeReport) -> None:
    require_archive = settings.store_originals_in_orthanc
    for seg, sops in sorted(index.purgeable_segments(cutoff, require_archive).items()):
        # One segment's failure (unreadable, index busy, ...) must not end the pass: every segment
        # after it would then be kept past its retention for ever.
        try:
            vault.close_segment(seg)  # nothing more goes into a segment about to be deleted
            if not _only_purgeable(vault, index, seg, set(sops)):
                continue
            studies = Counter(index.study_of_instances(sops))
            if not index.mark_instances_purged(sops, now, cutoff, require_archive):
                continue  # something needs them again since the first look
            _delete_segment(vault, seg)
        except Exception as exc:  # noqa: BLE001 - reported in the pass result, the next segment goes on
            log.exception("retention: segment %d not purged", seg)
            rep.errors.append(f"segment {seg}: {type(exc).__name__}: {exc}")
            continue
        rep.segments += 1
        rep.instances += len(sops)
        audit.spool_purged("original", dict(studies), {"segment": seg, "policy_days": settings.retention.originals_days})


def _delete_segment(vault: Vault, seg: int) -> None:
    try:
        vault.log.path(seg).unlink()
    except FileNotFoundError:
        pass
    _fsync_dir(vault.log.root)


def _purge_orphans(settings: Settings, index: Index, vault: Vault, audit: AuditTrail, rep: PurgeReport) -> None:
    """Segments still on disk although every indexed record in them is marked purged: a pass was
    killed between ``mark_instances_purged`` and the unlink, and no later pass would look at them
    again (``purgeable_segments`` only sees unpurged rows). Deleted here, unless the segment is one
    a writer still uses or holds a record the index does not account for (not yet indexed)."""
    active = vault.active_segments()
    on_disk = [s for s in vault.log.segments() if s not in active]
    if not on_disk:
        return
    purged = index.fully_purged_segments()
    for seg in on_disk:
        sops = purged.get(seg)
        if not sops:
            continue
        try:
            vault.close_segment(seg)  # no writer appends to it (it is not active): a no-op, for safety
            if not _only_purgeable(vault, index, seg, set(sops)):
                continue
            studies = Counter(index.study_of_instances(sops))
            _delete_segment(vault, seg)
        except Exception as exc:  # noqa: BLE001 - as in _purge_originals
            log.exception("retention: leftover segment %d not deleted", seg)
            rep.errors.append(f"segment {seg}: {type(exc).__name__}: {exc}")
            continue
        log.warning("retention: deleted segment %d, marked purged by an interrupted pass", seg)
        rep.orphans += 1
        audit.spool_purged("original", dict(studies), {"segment": seg, "policy_days": settings.retention.originals_days,
                                                      "after_interrupted_pass": True})


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
    _purge_result_orphans(index, audit, rep)
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


def _purge_result_orphans(index: Index, audit: AuditTrail, rep: PurgeReport) -> None:
    """A pass killed between marking results purged and unlinking them left files no later pass would
    look at: the last pass's go first, before this pass marks any (a kill now leaves the same set).
    A file written after its row was marked is a retried job's new result under the same path (the
    row is recorded again when the job ends): it stays."""
    studies: Counter = Counter()
    for row in index.last_purged_results():
        p = Path(row["path"])
        try:
            if p.stat().st_mtime > row["purged_at"]:
                continue
            p.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:  # reported; the pass goes on (this runs first on every pass)
            rep.errors.append(f"result {row['sop_uid']} left by an interrupted pass: {exc}")
            continue
        rep.orphans += 1
        studies[row["study_uid"]] += 1
    if studies:
        audit.spool_purged("result", dict(studies), {"after_interrupted_pass": True})


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
