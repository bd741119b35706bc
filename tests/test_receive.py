"""The receive stage with real peers: DCMTK storescu/echoscu against the SCP."""
from __future__ import annotations

import json
from io import BytesIO
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.config import load_settings
from node.receive.ingest import Ingest
from node.receive.scp import StoreSCP
from node.store.vault import Vault
from node.store.index import Index
from tests.nodeproc import DCMTK_ENV, FlushedIndex, free_port


def make_ct(path: Path | None, rows: int = 64, study: str | None = None, series: str | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "TEST^RECEIVE", "R1", "CT"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.random.default_rng(0).integers(0, 4000, (rows, rows), dtype=np.uint16).tobytes()
    if path is not None:
        ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.fixture
def scp(tmp_path):
    def start(data_dir: Path, **kw):
        settings = load_settings(**{"data_dir": data_dir, "dicom_host": "127.0.0.1", "dicom_port": free_port(),
                                    "min_free_disk_mb": 0, **kw})
        data_dir.mkdir(parents=True, exist_ok=True)
        index = Index(data_dir / "index.db")
        ingest = Ingest(index, Vault(data_dir, None, writer=True))
        server = StoreSCP(settings, ingest)
        server.start()
        started.append((server, ingest))
        return settings, FlushedIndex(index, ingest)

    started: list = []
    yield start
    for server, ingest in started:
        server.stop()
        ingest.close()
        ingest.vault.close()


def _storescu(port: int, files: list[Path], calling="MOD1", called="HILUM"):
    return subprocess.run(["storescu", "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=120)


def test_storescu_instances_are_durable_and_indexed(scp, tmp_path):
    settings, index = scp(tmp_path / "d")
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(5):
        f = tmp_path / f"f{i}.dcm"
        make_ct(f, study=study, series=series)
        files.append(f)
    out = _storescu(settings.dicom_port, files)
    assert out.returncode == 0, out.stderr
    rows = index.instances_of_study(study)
    assert len(rows) == 5
    vault = Vault(settings.data_dir, None)
    for r in rows:  # stored byte-for-byte as sent (no transcoding)
        sent = next(f for f in files if pydicom.dcmread(f).SOPInstanceUID == r["sop_uid"])
        assert pydicom.dcmread(BytesIO(vault.read(r["path"]))).PixelData == pydicom.dcmread(sent).PixelData
    st = index.study(study)
    assert st["instances"] == 5 and st["state"] == "receiving"
    assert json.loads(index.series_of_study(study)[0]["header_json"])["00080060"]["Value"] == ["CT"]


def _log_records(data_dir: Path) -> int:
    """Records in the spool log (every one of them verified by its checksum)."""
    v = Vault(data_dir, None)
    return sum(1 for seg in v.log.segments() for rec in v.log.scan(seg) if v.read(rec.locator))


def test_duplicate_is_stored_once_and_counted(scp, tmp_path):
    settings, index = scp(tmp_path / "d")
    f = tmp_path / "a.dcm"
    ds = make_ct(f)
    out = _storescu(settings.dicom_port, [f, f, f])
    assert out.returncode == 0, out.stderr
    assert len(index.instances_of_study(ds.StudyInstanceUID)) == 1
    assert index.stat("duplicates") == 2
    assert _log_records(tmp_path / "d") == 1
    # Once retention has deleted our copy, the same instance sent again is stored anew, not a duplicate.
    import sqlite3
    with sqlite3.connect(tmp_path / "d" / "index.db") as db:
        db.execute("UPDATE instances SET purged_at=1 WHERE sop_uid=?", (str(ds.SOPInstanceUID),))
    assert _storescu(settings.dicom_port, [f]).returncode == 0
    [row] = index.instances_of_study(ds.StudyInstanceUID)
    assert row["purged_at"] is None and index.stat("duplicates") == 2
    assert _log_records(tmp_path / "d") == 2


def test_a_duplicate_arriving_while_the_first_copy_is_committed_is_still_a_duplicate(tmp_path, monkeypatch):
    """The index writer commits the first copy's row between ingest's two looks (is it waiting? is it
    indexed?) for the second: whichever order those looks take, one of them must see it."""
    import threading
    from node.receive.ingest import Origin
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    index = Index(data_dir / "index.db")
    ingest = Ingest(index, Vault(data_dir, None, writer=True))
    try:
        commit_may_run = threading.Event()
        add_instances = index.add_instances

        def held_commit(rows):  # the writer's commit waits until the second copy is being looked at
            commit_may_run.wait(10)
            return add_instances(rows)

        instance_state = index.instance_state

        def commit_in_between(sop):  # ingest's look at the index, with the commit landing right after it
            state = instance_state(sop)
            commit_may_run.set()
            assert ingest.writer.flush(10)
            return state

        monkeypatch.setattr(index, "add_instances", held_commit)
        buf = BytesIO()
        ds = make_ct(None)
        ds.save_as(buf, enforce_file_format=True)
        origin = Origin("MOD1", "HILUM", "127.0.0.1")
        assert ingest.store(buf.getvalue(), origin) == (0, "stored")
        monkeypatch.setattr(index, "instance_state", commit_in_between)
        assert ingest.store(buf.getvalue(), origin) == (0, "duplicate")
        assert ingest.writer.flush(10)
        assert len(index.instances_of_study(ds.StudyInstanceUID)) == 1 and index.stat("duplicates") == 1
    finally:
        ingest.close()
        ingest.vault.close()
    assert _log_records(data_dir) == 1


def test_caught_up_waits_for_what_was_acknowledged_before_it_not_after(tmp_path, monkeypatch):
    """The study view and an admin's "complete" wait for the rows of the instances acknowledged
    before them (``IndexWriter.caught_up``), not for a stream that keeps arriving."""
    import threading
    from node.receive.ingest import Origin
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    index = Index(data_dir / "index.db")
    ingest = Ingest(index, Vault(data_dir, None, writer=True))
    try:
        gates = [threading.Event(), threading.Event()]
        commits = iter(gates)
        add_instances = index.add_instances

        def gated_commit(rows):
            next(commits).wait(10)
            return add_instances(rows)

        monkeypatch.setattr(index, "add_instances", gated_commit)
        origin, study = Origin("MOD1", "HILUM", "127.0.0.1"), generate_uid()

        def store():
            buf = BytesIO()
            make_ct(None, study=study).save_as(buf, enforce_file_format=True)
            assert ingest.store(buf.getvalue(), origin) == (0, "stored")

        store()  # acknowledged; its row waits at the first gate
        assert ingest.writer.caught_up(timeout=0.3) is False  # its row is not committed
        answer = []
        waiter = threading.Thread(target=lambda: answer.append(ingest.writer.caught_up(timeout=10)))
        waiter.start()
        store()  # acknowledged after the call began: not waited for
        gates[0].set()
        waiter.join(10)
        assert answer == [True]
        assert len(index.instances_of_study(study)) == 1  # the second row still waits at its gate
        gates[1].set()
        assert ingest.writer.flush(10) and len(index.instances_of_study(study)) == 2
    finally:
        for g in gates:
            g.set()
        ingest.close()
        ingest.vault.close()


def test_unknown_calling_ae_and_wrong_called_ae_are_rejected(scp, tmp_path):
    settings, index = scp(tmp_path / "d", allowed_callers=[{"ae_title": "CT1"}])
    f = tmp_path / "a.dcm"
    make_ct(f)
    bad = _storescu(settings.dicom_port, [f], calling="INTRUDER")
    assert bad.returncode != 0 and "Calling AE Title Not Recognized" in bad.stderr
    wrong = _storescu(settings.dicom_port, [f], calling="CT1", called="NOTME")
    assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stderr
    assert index.count_studies() == 0
    ok = _storescu(settings.dicom_port, [f], calling="CT1")
    assert ok.returncode == 0 and index.count_studies() == 1
    echo = subprocess.run(["echoscu", "-aet", "CT1", "-aec", "HILUM", "127.0.0.1", str(settings.dicom_port)],
                          env=DCMTK_ENV, capture_output=True, text=True)
    assert echo.returncode == 0


def _statuses(port: int, files: list[Path]) -> dict[str, str]:
    """Each file's C-STORE response as DCMTK's storescu logs it (told not to halt at a refusal). A
    pynetdicom SCU here lost a response now and then: its reactor thread can take a reply that comes
    back fast, as a refusal does, before send_c_store waits for it."""
    out = subprocess.run(["storescu", "-v", "--no-halt", "-aet", "MOD1", "-aec", "HILUM", "127.0.0.1", str(port),
                          *map(str, files)], env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
    statuses, current = {}, None
    for line in (out.stdout + out.stderr).splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
        elif "Received Store Response (" in line and current is not None:
            statuses[current] = line.split("Received Store Response (", 1)[1].rstrip(")")
    assert len(statuses) == len(files), out.stdout[-2000:] + out.stderr[-2000:]
    return statuses


@pytest.mark.parametrize("breakage", ["no-study-uid", "hostile-uid"])
def test_malformed_dataset_gets_failure_status_and_is_quarantined(scp, tmp_path, breakage):
    settings, index = scp(tmp_path / "d")
    ds = make_ct(None)
    if breakage == "no-study-uid":
        del ds.StudyInstanceUID
    else:
        ds.SeriesInstanceUID = "../../../etc/passwd"
    bad_file, good_file = tmp_path / "bad.dcm", tmp_path / "good.dcm"
    ds.save_as(bad_file, enforce_file_format=True)
    make_ct(good_file)
    statuses = _statuses(settings.dicom_port, [bad_file, good_file])  # the association survives the bad one
    assert statuses == {str(bad_file): "Error: CannotUnderstand", str(good_file): "Success"}, statuses  # 0xC000
    q = sorted((tmp_path / "d" / "quarantine").glob("*.json"))
    assert len(q) == 1
    reason = json.loads(q[0].read_text())["reason"]
    assert ("StudyInstanceUID" if breakage == "no-study-uid" else "SeriesInstanceUID") in reason
    kept = Vault(tmp_path / "d", None).read(str(q[0].with_suffix(".dcm")))  # sealed like the rest of the spool
    assert pydicom.dcmread(BytesIO(kept)).SOPInstanceUID == ds.SOPInstanceUID
    assert index.stat("quarantined") == 1
    assert not (tmp_path / "etc").exists()


def test_disk_full_returns_out_of_resources_and_leaves_nothing_corrupt(scp, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        settings, index = scp(mnt / "d")
        study = generate_uid()
        files = [tmp_path / f"f{i:02d}.dcm" for i in range(30)]
        sent = [make_ct(f, rows=256, study=study) for f in files]  # ~128 KiB each, 3.8 MiB in all
        statuses = _statuses(settings.dicom_port, files)
        assert "Refused: OutOfResources" in statuses.values(), statuses
        ok = [ds for f, ds in zip(files, sent) if statuses[str(f)] == "Success"]
        assert 0 < len(ok) < len(sent)
        assert set(statuses.values()) == {"Success", "Refused: OutOfResources"}, statuses
        # Every acknowledged instance is indexed and readable with its pixels; nothing else is.
        rows = {r["sop_uid"]: r["path"] for r in index.instances_of_study(study)}
        assert set(rows) == {ds.SOPInstanceUID for ds in ok}
        vault = Vault(mnt / "d", None)
        for ds in ok:
            assert pydicom.dcmread(BytesIO(vault.read(rows[ds.SOPInstanceUID]))).PixelData == ds.PixelData
        assert not [p for p in (mnt / "d").rglob("*") if p.name.endswith(".tmp")], "partial files left behind"
        assert _log_records(mnt / "d") == len(ok)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_free_disk_watermark_refuses_new_associations(scp, tmp_path):
    settings, index = scp(tmp_path / "d", min_free_disk_mb=10**9)
    f = tmp_path / "a.dcm"
    make_ct(f)
    out = _storescu(settings.dicom_port, [f])
    assert out.returncode != 0 and "Rejected Transient" in out.stderr
    assert index.count_studies() == 0
