"""Faults of the spool and its upkeep: retention that must keep what is still needed, damaged
files that must never pass for data, sync failures that must not be swallowed, leftovers of an
interrupted retention pass, retiring a key a running job still seals with, a bounded quarantine."""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections import namedtuple
from io import BytesIO

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import node.store.segments as segments
from node.audit import AuditTrail, ChainedLog
from node.config import load_settings
from node.receive.spool import Quarantine
from node.store.envelope import IntegrityError, Keyring
from node.store.index import Index, InstanceRow
from node.store.retention import purge_due
from node.store.retrieves import RetrieveStore
from node.store.vault import Vault

CT = "1.2.840.10008.5.1.4.1.1.2"


def _dicom(study: str, series: str, sop: str) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = CT, sop, study, series
    ds.PatientID, ds.Modality = "P1", "CT"
    ds.BitsAllocated = 16
    ds.PixelData = bytes(200)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _study(index: Index, vault: Vault, n: int = 2) -> tuple[str, str, list[str]]:
    """A study in its own segment, stable, routed, its originals archived: due for retention."""
    study, series, now = generate_uid(), generate_uid(), time.time() - 10
    rows, sops = [], []
    for _ in range(n):
        sop = generate_uid()
        loc = vault.append(_dicom(study, series, sop), {"calling_ae": "CT"})
        rows.append(InstanceRow(sop, series, study, CT, ExplicitVRLittleEndian, loc, 200, now, "{}", "CT", "", "1",
                                "P1", "X", "20240101", "", "", "CT", "HILUM", "127.0.0.1"))
        sops.append(sop)
    index.add_instances(rows)
    vault.close_segment(_seg(loc))  # the next study goes to a segment of its own
    c = index.conn()
    c.execute("UPDATE studies SET state='stable', stable_at=?, routed_generation=generation WHERE study_uid=?",
              (now, study))
    index.add_original_deliveries(study, series, ["orthanc"])
    c.execute("UPDATE deliveries SET status='delivered', delivered_at=? WHERE kind='original' AND study_uid=?",
              (now, study))
    return study, series, sops


def _seg(locator: str) -> int:
    return int(locator.split(":")[1])


def _segment_of(index: Index, sop: str) -> int:
    return _seg(index.conn().execute("SELECT path FROM instances WHERE sop_uid=?", (sop,)).fetchone()[0])


def _purged(index: Index, sops: list[str]) -> bool:
    marks = [index.conn().execute("SELECT purged_at FROM instances WHERE sop_uid=?", (s,)).fetchone()[0]
             for s in sops]
    assert all(m is None for m in marks) or all(m is not None for m in marks)
    return marks[0] is not None


@pytest.fixture()
def spool(tmp_path):
    settings = load_settings(None, data_dir=str(tmp_path), retention={"originals_days": 0, "results_days": 0})
    index = Index(tmp_path / "index.db")
    vault = Vault(tmp_path, None, writer=True, segment_mb=8)
    yield settings, index, vault
    vault.close()


def _job(index: Index, study: str, key: str) -> int:
    return index.add_job(job_key=key, study_uid=study, series_uid=None, level="study", rule="r", handler="h",
                         params={}, destinations=["pacs"], priority="normal", timeout_s=None, generation=0, note="")


def _result(vault: Vault, job_id: int, sop: str) -> list[dict]:
    return [{"sop_instance_uid": sop, "sop_class_uid": "1.2", "series_instance_uid": "1.2.3", "modality": "SEG",
             "path": str(vault.data_dir / "results" / str(job_id) / f"{sop}.dcm")}]


# -- 1: retention keeps originals still needed ------------------------------------------------------
@pytest.mark.parametrize("case", ["waiting-for-priors", "result-pending", "result-failed", "prior-of-another-job",
                                  "control: done and delivered"])
def test_retention_keeps_originals_a_job_still_needs(spool, case):
    settings, index, vault = spool
    study, series, sops = _study(index, vault)
    c = index.conn()
    if case == "waiting-for-priors":
        c.execute("UPDATE jobs SET status='waiting-for-priors' WHERE id=?", (_job(index, study, "j"),))
    elif case.startswith("result") or case.startswith("control"):
        jid = _job(index, study, "j")
        index.finish_job(jid, _result(vault, jid, "1.2.3.4"), [("1.2.3.4", "pacs")])
        status = {"result-pending": "pending", "result-failed": "failed"}.get(case, "delivered")
        c.execute("UPDATE deliveries SET status=?, delivered_at=? WHERE kind='result'", (status, time.time() - 5))
    elif case == "prior-of-another-job":
        rs = RetrieveStore(index)
        jid = _job(index, "1.2.999", "other")  # another study's job, pending, with our study as its prior
        with index.tx(immediate=True):
            rs.hold_for_priors(jid, {"count": 1}, 0)
        rs.priors_chosen(jid, [{"study_uid": study, "source": "local", "series": [series]}], None)
        rs.release_priors(jid, "priors ready")
    rep = purge_due(settings, index, vault)
    assert rep.errors == []
    if case.startswith("control"):
        assert _purged(index, sops) and rep.segments == 1
    else:
        assert not _purged(index, sops) and rep.segments == 0
        assert all(vault.read(r[0]) for r in c.execute("SELECT path FROM instances"))


def test_a_prior_goes_once_the_job_that_chose_it_is_done(spool):
    settings, index, vault = spool
    study, series, sops = _study(index, vault)
    rs = RetrieveStore(index)
    jid = _job(index, "1.2.999", "other")
    with index.tx(immediate=True):
        rs.hold_for_priors(jid, {"count": 1}, 0)
    rs.priors_chosen(jid, [{"study_uid": study, "source": "local", "series": [series]}], None)
    assert purge_due(settings, index, vault).segments == 0
    index.finish_job(jid, [], [])
    assert purge_due(settings, index, vault).segments == 1 and _purged(index, sops)


# -- 2: a damaged plain file is not data ------------------------------------------------------------
@pytest.mark.parametrize("damage", ["magic-bit", "empty", "7-bytes"])
@pytest.mark.parametrize("where", ["results/7/1.2.3.dcm", "quarantine/x.dcm", "artefacts/a.z"])
def test_a_plain_sealed_file_with_damaged_magic_or_truncated_is_refused(tmp_path, damage, where):
    v = Vault(tmp_path, None)
    p = tmp_path / where
    v.write_file(p, b"\0" * 128 + b"DICM" + b"result payload")
    assert v.read(str(p)).endswith(b"result payload")
    blob = bytearray(p.read_bytes())
    if damage == "magic-bit":
        blob[0] ^= 0x01
        p.write_bytes(bytes(blob))
    else:
        p.write_bytes(bytes(blob[: 0 if damage == "empty" else 7]))
    with pytest.raises(IntegrityError, match=str(p.name)) as exc:
        v.read(str(p))
    assert exc.value.locator == str(p)


def test_a_remote_workers_plain_inputs_outside_the_sealed_folders_still_read(tmp_path):
    v = Vault(tmp_path, None)  # the worker's keyless local vault over its temporary directory
    p = tmp_path / "inputs" / "0" / "000000.dcm"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"plain DICOM fetched from the node")
    assert v.read(str(p)) == b"plain DICOM fetched from the node"


# -- 3: a failed sync is never swallowed --------------------------------------------------------------
def _flaky_fdatasync(monkeypatch, fail_times: int = 1) -> dict:
    calls = {"n": 0, "fail": fail_times}
    real = os.fdatasync

    def flaky(fd):
        calls["n"] += 1
        if calls["fail"]:
            calls["fail"] -= 1
            raise OSError(errno.EIO, "Input/output error (simulated writeback)")
        return real(fd)

    monkeypatch.setattr(segments.os, "fdatasync", flaky)
    return calls


def test_after_a_failed_sync_every_later_sync_and_deferred_append_fails(tmp_path, monkeypatch):
    v = Vault(tmp_path, None, writer=True, segment_mb=8)
    v.append(b"retrieve A", {}, durable=False)
    v.append(b"retrieve B", {}, durable=False)  # a concurrent retrieve, same deferred segment
    _flaky_fdatasync(monkeypatch)
    with pytest.raises(OSError, match="simulated writeback"):
        v.sync()  # A's commit
    with pytest.raises(OSError, match="earlier spool sync failed.*simulated writeback"):
        v.sync()  # B's commit: its bytes were never synced after the failure
    with pytest.raises(OSError, match="earlier spool sync failed"):
        v.append(b"retrieve C", {}, durable=False)
    assert v.deferred._unsynced  # kept unsynced, not forgotten
    assert v.deferred.active()  # and retention never deletes them
    push = v.append(b"a push (O_DSYNC, not affected)", {})
    assert v.read(push) == b"a push (O_DSYNC, not affected)"
    v.close()  # logs, does not raise, closes the descriptors


def test_a_retired_segment_whose_sync_fails_is_logged_and_closed(tmp_path, monkeypatch, caplog):
    v = Vault(tmp_path, None, writer=True, segment_mb=8)
    loc = v.append(b"retrieve A", {}, durable=False)
    closed = []
    real_close = segments._close
    monkeypatch.setattr(segments, "_close", lambda seg: (closed.append(seg.number), real_close(seg)))
    _flaky_fdatasync(monkeypatch)
    v.close_segment(_seg(loc))  # retired on a daemon thread, which syncs, then closes
    deadline = time.monotonic() + 10
    while not closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert closed == [_seg(loc)]
    assert "retired without a successful sync" in caplog.text
    with pytest.raises(OSError, match="earlier spool sync failed"):
        v.sync()  # the retrieve's commit learns of it
    v.close()


# -- 4: a record not in the index does not end the pass ---------------------------------------------
def test_retention_keeps_a_segment_with_an_unindexed_record_and_goes_on(spool):
    settings, index, vault = spool
    study, series, sops = _study(index, vault)
    seg1 = _segment_of(index, sops[0])
    # a record appended into seg1 whose index row is not committed yet (an IndexWriter batch)
    extra = _append_into(vault, seg1, _dicom(study, series, generate_uid()))
    second, _, sops2 = _study(index, vault)
    assert index.instance_locator(sops[0]) is not None and index.instance_locator("1.2.3.4.5") is None
    rep = purge_due(settings, index, vault)
    assert rep.errors == []
    assert not _purged(index, sops) and vault.log.path(seg1).exists() and vault.read(extra)
    assert _purged(index, sops2)  # the pass went on past seg1


def _append_into(vault: Vault, seg: int, data: bytes) -> str:
    """A record sealed into segment ``seg`` after its last one, as a writer would have put it there."""
    from node.store.segments import BLOCK, locator_context, payload_parts

    path = vault.log.path(seg)
    recs = list(vault.log.scan(seg))
    off = max(r.offset + r.length for r in recs)
    off = (off + BLOCK - 1) // BLOCK * BLOCK
    parts = payload_parts({}, data)
    blob = b"".join(bytes(p) for p in vault.sealer.seal_parts(parts, locator_context(seg, off)))
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(blob)
    return f"log:{seg}:{off}:{len(blob)}"


def test_one_segments_error_is_reported_and_the_pass_goes_on(spool, monkeypatch):
    settings, index, vault = spool
    _, _, sops1 = _study(index, vault)
    _, _, sops2 = _study(index, vault)
    bad = _segment_of(index, sops1[0])
    real_scan = vault.log.scan

    def scan(seg):
        if seg == bad:
            raise OSError(errno.EIO, "read error")
        return real_scan(seg)

    monkeypatch.setattr(vault.log, "scan", scan)
    rep = purge_due(settings, index, vault)
    assert len(rep.errors) == 1 and f"segment {bad}" in rep.errors[0] and "read error" in rep.errors[0]
    assert rep.as_dict()["errors"] == rep.errors
    assert not _purged(index, sops1) and _purged(index, sops2)


# -- 5: a segment marked purged by an interrupted pass is deleted by the next ------------------------
def test_a_segment_left_by_an_interrupted_pass_is_deleted_by_the_next(spool):
    settings, index, vault = spool
    _, _, sops = _study(index, vault)
    seg = _segment_of(index, sops[0])
    # what a kill -9 between the index commit and the unlink leaves behind
    assert index.mark_instances_purged(sops, time.time(), time.time(), False)
    assert vault.log.path(seg).exists()
    rep = purge_due(settings, index, vault)
    assert rep.orphans == 1 and rep.errors == [] and not vault.log.path(seg).exists()


def test_a_result_file_left_by_an_interrupted_pass_is_deleted_by_the_next(spool):
    """Results are marked purged, then unlinked: a kill in between left files (derived from patient
    images) on disk for good, as no later pass looked at purged rows. The next pass deletes them first;
    a result not yet due stays."""
    settings, index, vault = spool
    study, _, _ = _study(index, vault)
    c = index.conn()
    files = {}
    for key, sop in (("j1", "1.2.3.4"), ("j2", "1.2.3.5")):
        jid = _job(index, study, key)
        [meta] = _result(vault, jid, sop)
        files[sop] = vault.data_dir / "results" / str(jid) / f"{sop}.dcm"
        files[sop].parent.mkdir(parents=True)
        vault.write_file(files[sop], b"result bytes")
        index.finish_job(jid, [meta], [(sop, "pacs")])
    c.execute("UPDATE deliveries SET status='delivered', delivered_at=? WHERE kind='result'", (time.time() - 5,))
    c.execute("UPDATE deliveries SET status='pending' WHERE kind='result' AND sop_uid='1.2.3.5'")
    index.mark_results_purged(["1.2.3.4"], time.time() - 1)  # what a kill -9 before the unlink leaves behind
    os.utime(files["1.2.3.4"], (time.time() - 60, time.time() - 60))  # written before it was marked
    audit = AuditTrail(ChainedLog(settings.data_dir / "audit.jsonl", bytes(range(32))), "HILUM")
    rep = purge_due(settings, index, vault, audit)
    assert rep.errors == [] and rep.orphans == 1 and rep.results == 0
    assert not files["1.2.3.4"].exists() and files["1.2.3.5"].exists()
    [entry] = [e for e in audit.log.entries() if e["event"] == "retention-purge" and e["detail"]["kind"] == "result"]
    assert entry["detail"]["after_interrupted_pass"] and entry["objects"] == 1


def test_a_retried_jobs_new_result_under_a_purged_path_is_not_taken_for_a_leftover(spool):
    """A retried job runs under its id again and writes its result where the purged one was before the
    index records it: that new file is not a leftover of the last pass, and stays."""
    settings, index, vault = spool
    study, _, _ = _study(index, vault)
    jid = _job(index, study, "j1")
    [meta] = _result(vault, jid, "1.2.3.4")
    path = vault.data_dir / "results" / str(jid) / "1.2.3.4.dcm"
    index.finish_job(jid, [meta], [("1.2.3.4", "pacs")])
    index.mark_results_purged(["1.2.3.4"], time.time() - 5)  # purged by the last pass, file gone
    path.parent.mkdir(parents=True)
    vault.write_file(path, b"the retried job's result")  # the retry, before the job is recorded again
    rep = purge_due(settings, index, vault)
    assert rep.errors == [] and rep.orphans == 0
    assert vault.read_file(path) == b"the retried job's result"


def test_the_active_segment_and_one_with_an_unindexed_record_are_never_deleted_as_leftovers(spool):
    settings, index, vault = spool
    study, series, sops = _study(index, vault)
    seg = _segment_of(index, sops[0])
    extra = _append_into(vault, seg, _dicom(study, series, generate_uid()))  # not indexed (yet)
    assert index.mark_instances_purged(sops, time.time(), time.time(), False)
    # the active segment: its only row marked purged (it cannot be in practice; it must still stay)
    sop = generate_uid()
    loc = vault.append(_dicom(study, series, sop), {})
    index.add_instances([InstanceRow(sop, series, study, CT, ExplicitVRLittleEndian, loc, 200, time.time(), "{}",
                                     "CT", "", "1", "P1", "X", "20240101", "", "", "CT", "HILUM", "127.0.0.1")])
    index.conn().execute("UPDATE instances SET purged_at=? WHERE sop_uid=?", (time.time(), sop))
    rep = purge_due(settings, index, vault)
    assert rep.orphans == 0 and rep.errors == []
    assert vault.log.path(seg).exists() and vault.read(extra)
    assert vault.log.path(_seg(loc)).exists() and vault.read(loc)


# -- 6: no retiring a key a running job still seals with ----------------------------------------------
def test_retire_is_refused_while_a_job_started_before_the_rewrap_runs(tmp_path, capsys):
    from node.store.cli import cli
    from node.store.keys import write_keyring
    from node.store.rewrap import rewrap_all

    data, key_file = tmp_path / "data", tmp_path / "keys" / "spool.json"
    key_file.parent.mkdir(mode=0o700)
    data.mkdir()
    config = tmp_path / "hilum.yaml"
    config.write_text(f"data_dir: {data}\nspool_encryption:\n  key_file: {key_file}\n")
    k1 = Keyring.new()
    write_keyring(key_file, k1)
    index = Index(data / "index.db")
    node = Vault(data, k1, writer=True, segment_mb=8)
    node.append(b"an original", {})
    jid = _job(index, "1.2.3", "running-job")
    index.claim_job()  # dispatched: its worker holds k1 only
    time.sleep(0.01)
    k2 = k1.with_new_active()  # `hilum keys rotate`, then the node's housekeeping re-wraps
    write_keyring(key_file, k2)
    req = index.request_maintenance("rewrap", "cli test")
    index.next_maintenance()
    node.use_keyring(k2)
    assert rewrap_all(node).errors == []
    index.finish_maintenance(req, True, "{}")
    args = ["retire", k1.active, "--config", str(config)]
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert f"{jid} (running)" in err and "wait" in err
    assert k1.active in json.loads(key_file.read_text())["keys"]  # not removed
    index.finish_job(jid, [], [])
    assert cli(args) == 0, capsys.readouterr().err
    assert k1.active not in json.loads(key_file.read_text())["keys"]
    node.close()


# -- 7: the quarantine is bounded ------------------------------------------------------------------
_Usage = namedtuple("_Usage", "total used free")


def test_quarantine_writes_nothing_when_the_disk_is_at_its_reserve(tmp_path, monkeypatch):
    q = Quarantine(tmp_path, Vault(tmp_path, None).write_file)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(100 << 30, (100 << 30) - (10 << 20), 10 << 20))
    assert q.quarantine(b"\0" * (4 << 20), "junk", {}) is None
    assert list((tmp_path / "quarantine").iterdir()) == []


def test_a_full_quarantine_keeps_the_reason_without_the_payload_and_reports_its_size(tmp_path):
    vault = Vault(tmp_path, None)
    q = Quarantine(tmp_path, vault.write_file)
    q.MAX_FILES = 4  # two rejected instances, each a payload and its reason
    kept = [q.quarantine(b"junk %d" % i, "unparseable", {"calling_ae": "EVIL"}) for i in range(3)]
    assert [p.suffix for p in kept] == [".dcm", ".dcm", ".json"]
    doc = json.loads(kept[2].read_text())
    assert doc["payload_kept"] is False and "quarantine full" in doc["why_not_kept"] and doc["reason"] == "unparseable"
    assert not kept[2].with_suffix(".dcm").exists() and vault.read(str(kept[0])) == b"junk 0"
    files = list((tmp_path / "quarantine").iterdir())
    used = Quarantine(tmp_path, vault.write_file).usage()  # a fresh count of the folder
    assert used == {"files": len(files), "bytes": sum(p.stat().st_size for p in files)} and used["files"] == 5
