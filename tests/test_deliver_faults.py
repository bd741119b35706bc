"""Faults of a delivery's peer, each instance keeping its own outcome.

A DICOM peer (a pynetdicom SCP in this process, scripted per C-STORE) that drops the association
mid-batch: what it stored stays delivered, the rest is retried with the reason. Its failure
statuses name their code in the delivery record; its warning statuses are stored instances. A
planning system slower than the destination's dimse_timeout_s loses the association the same way.

An Orthanc with its default configuration (no OverwriteInstances) answers "AlreadyStored" to a
re-run job's result (same deterministic UID, new content) and keeps the old one: refused with the
reason, not counted delivered."""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from contextlib import contextmanager

import httpx
import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt

from node.archive.orthanc import ArchiveEndpoint
from node.audit import AuditTrail, ChainedLog
from node.config import ConfigError, DimseDestination, load_settings
from node.deliver.destinations import DeliveryError, DimseStoreDestination, Item, OrthancDestination
from node.deliver.loop import DeliveryLoop
from node.store.index import Index
from node.store.vault import VaultSpec
from tests.nodeproc import free_port
from tests.pacs_peers import PacsOrthanc, tiny_study

ABORT = "abort"


@contextmanager
def scripted_scp(script: list):
    """A storage SCP answering its n-th C-STORE (over all associations) with ``script[n]``: a
    status code, ABORT (it aborts the association instead of answering) or ("sleep", s, status).
    Past the script: success. Yields (port, SOP Instance UIDs it stored, in order)."""
    stored: list[str] = []
    calls = [0]
    lock = threading.Lock()

    def on_store(event):
        with lock:
            n = calls[0]
            calls[0] += 1
        step = script[n] if n < len(script) else 0x0000
        if step == ABORT:
            event.assoc.abort()
            return 0xC000  # never sent: the association is gone
        if isinstance(step, tuple):
            _, seconds, step = step
            time.sleep(seconds)
        if step < 0xA000 or 0xB000 <= step < 0xC000:  # success and warnings: the peer keeps it
            stored.append(str(event.request.AffectedSOPInstanceUID))
        return step

    ae = AE("TPS")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield port, stored
    finally:
        server.shutdown()


@pytest.fixture
def files(tmp_path):
    study = tiny_study(tmp_path / "study", patient_id="F1", series=(("AX", 1.0, 7),))
    return [Item(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), str(f), "result")
            for f in study.files]


def _peer(port: int) -> dict:
    return {"ae_title": "TPS", "host": "127.0.0.1", "port": port}


def _tps(port: int, **kw) -> DimseStoreDestination:
    return DimseStoreDestination(DimseDestination(ae_title="TPS", host="127.0.0.1", port=port, **kw), "HILUM")


def test_an_association_aborted_mid_batch_keeps_what_the_peer_stored(files):
    items = files[:5]
    with scripted_scp([0x0000, 0x0000, ABORT]) as (port, stored):
        got = _tps(port).send(items)
    assert stored == [items[0].sop_uid, items[1].sop_uid]
    assert got == set(stored) and not got.refused and not got.failed
    assert got.missing_reason == (f"association to TPS@127.0.0.1:{port} lost after 2 instance(s): "
                                  "aborted by the peer or the connection dropped")
    with scripted_scp([ABORT]) as (port, stored):  # nothing got there: an error for the whole batch
        with pytest.raises(DeliveryError, match="lost after 0 instance"):
            _tps(port).send(items)


def _loop_over(tmp_path, items: list[Item], destination: dict):
    """A delivery loop over a real index holding ``items`` as one job's results for "tps", and a
    real audit trail."""
    index = Index(tmp_path / "index.db")
    job = index.add_job(job_key="k", study_uid="1.2.3", series_uid=None, level="study", rule="r",
                        handler="h", params={}, destinations=["tps"], priority="normal", timeout_s=None,
                        generation=0, note="test")
    results = [{"sop_instance_uid": it.sop_uid, "sop_class_uid": "x", "series_instance_uid": "s",
                "modality": "RTSTRUCT", "path": it.locator} for it in items]
    index.add_results(job, results, [(r["sop_instance_uid"], "tps") for r in results])
    settings = load_settings(data_dir=tmp_path / "data", delivery_max_attempts=6, delivery_backoff_s=0.1,
                             destinations={"tps": destination})
    audit = AuditTrail(ChainedLog(tmp_path / "audit.jsonl", bytes(range(32))), "HILUM")
    loop = DeliveryLoop(settings, index, {"tps": DimseStoreDestination(settings.destinations["tps"], "HILUM")},
                        VaultSpec(str(tmp_path / "data"), None).open(), audit)
    return loop, index, job, audit


def test_the_delivery_loop_delivers_what_was_stored_before_the_abort(files, tmp_path):
    """Exactly the two the peer stored are delivered (and audited as transferred, not as an error);
    the other three are audited as a failed attempt and retried with the reason, and the retry sends
    those three only."""
    items = files[:5]
    with scripted_scp([0x0000, 0x0000, ABORT]) as (port, stored):  # past the script: stored
        loop, index, job, audit = _loop_over(tmp_path, items, _peer(port))
        assert loop.run_once() == 2
        rows = {r["sop_uid"]: r for r in index.deliveries_of_job(job)}
        assert {u for u, r in rows.items() if r["status"] == "delivered"} == set(stored) and len(stored) == 2
        lost = (f"association to TPS@127.0.0.1:{port} lost after 2 instance(s): "
                "aborted by the peer or the connection dropped")
        assert [(r["status"], r["attempts"], r["last_error"]) for u, r in rows.items() if u not in stored] == [
            ("pending", 1, lost)] * 3
        sent, failed = [e for e in audit.log.entries() if e["event"] == "delivery"]
        assert (sent["outcome"], sent["objects"]) == (0, 2)  # transferred, not an error
        assert (failed["outcome"], failed["objects"], failed["outcome_description"]) == (8, 3, lost)  # the attempt
        time.sleep(0.2)  # past the retry's backoff
        assert loop.run_once() == 3
    assert sorted(stored) == sorted(it.sop_uid for it in items)  # each once: the first two never again
    assert {r["status"] for r in index.deliveries_of_job(job)} == {"delivered"}


def test_failure_statuses_are_named_and_warning_statuses_are_stored(files, tmp_path, caplog):
    """PS3.4 B.2.3: a C-STORE warning (0xB000, 0xB006, 0xB007, any 0xBxxx; 0x0107, 0x0116 of PS3.7)
    means the peer stored the instance, with a remark that is logged; a failure is retried with its code."""
    script = [0xA700, 0xB000, 0xB006, 0xB007, 0x0107, 0x0116, 0xB123]
    with scripted_scp(script) as (port, stored), caplog.at_level(logging.WARNING, "hilum.deliver"):
        loop, index, job, _ = _loop_over(tmp_path, files, _peer(port))
        assert loop.run_once() == 6
    rows = {r["sop_uid"]: r for r in index.deliveries_of_job(job)}
    assert {u for u, r in rows.items() if r["status"] == "delivered"} == set(stored) and len(stored) == 6
    (refused,) = [r for u, r in rows.items() if u not in stored]
    assert (refused["status"], refused["attempts"], refused["last_error"]) == (
        "pending", 1,
        f"TPS@127.0.0.1:{port} did not store the instance: C-STORE status 0xA700 (Refused: Out of Resources)")
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for code in ("0xB000", "0xB006", "0xB007", "0x0107", "0x0116", "0xB123"):
        assert f"stored with warning status {code}" in warned


def test_dimse_timeout_is_the_destinations_and_bounds_the_wait(files):
    """A peer slower than dimse_timeout_s to answer: pynetdicom aborts; what it answered before stays
    delivered, the rest is retried with a reason naming the setting."""
    items = files[:3]
    with scripted_scp([0x0000, ("sleep", 3.0, 0x0000)]) as (port, stored):
        got = _tps(port, dimse_timeout_s=1).send(items)
    assert got == {items[0].sop_uid}
    assert got.missing_reason == (f"association to TPS@127.0.0.1:{port} lost after 1 instance(s): "
                                  "no C-STORE response within dimse_timeout_s (1 s)")


def test_dimse_timeout_is_validated_naming_the_field(tmp_path):
    tps = {"ae_title": "TPS", "host": "127.0.0.1", "port": 11113}
    assert load_settings(data_dir=tmp_path, destinations={"tps": tps}).destinations["tps"].dimse_timeout_s == 120
    for bad in (0, -5, 7200, "soon"):
        with pytest.raises(ConfigError, match="destinations.tps.dimse_timeout_s: "):
            load_settings(data_dir=tmp_path, destinations={"tps": {**tps, "dimse_timeout_s": bad}})


# -- an archive that keeps the first version of a result --

SR_UID = "2.25.318745261738201987364829187364512"


def _result(path, description: str) -> Item:
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = SR_UID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "2.25.1", "2.25.2"
    ds.Modality, ds.PatientID, ds.SeriesDescription = "SR", "F2", description
    ds.save_as(path, enforce_file_format=True)
    return Item(SR_UID, str(path), "result")


def _held(pacs) -> str:
    with httpx.Client(base_url=pacs.url) as c:
        (found,) = c.post("/tools/lookup", content=SR_UID).json()
        return c.get(f"/instances/{found['ID']}/simplified-tags").json()["SeriesDescription"]


@contextmanager
def pacs_orthanc_started(pacs: PacsOrthanc):
    pacs.start()
    try:
        yield pacs
    finally:
        pacs.stop()


@pytest.mark.parametrize("store_md5", [True, False], ids=["md5-attachment", "no-md5-attachment"])
def test_a_result_the_archive_did_not_overwrite_is_refused(tmp_path, store_md5):
    """A stock Orthanc (OverwriteInstances: false) keeps v1 of a re-run job's result: v2 is refused
    with the reason, v1's bytes again are delivered, and an original answered "AlreadyStored" is
    the same instance. Without MD5s of attachments (StoreMD5ForAttachments: false) the stored file
    is compared."""
    pacs = PacsOrthanc(tmp_path / "orthanc")
    if not store_md5:
        cfg = json.loads(pacs.config_path.read_text())
        pacs.config_path.write_text(json.dumps({**cfg, "StoreMD5ForAttachments": False}))
    v1 = _result(tmp_path / "v1.dcm", "model v1: nodule 12 mm")
    v2 = _result(tmp_path / "v2.dcm", "model v2: nodule 4 mm")
    assert hashlib.md5(open(v1.locator, "rb").read()).digest() != hashlib.md5(open(v2.locator, "rb").read()).digest()
    with pacs_orthanc_started(pacs):
        dest = OrthancDestination(ArchiveEndpoint(pacs.url, None, None))
        assert dest.send([v1]) == {SR_UID}
        got = dest.send([v2])
        assert got == set() and got.refused == {SR_UID: (
            "the archive kept an older version of this result (Orthanc answered AlreadyStored and holds other "
            "bytes under its SOP Instance UID); set OverwriteInstances: true on it")}
        assert _held(pacs) == "model v1: nodule 12 mm"
        assert dest.send([v1]) == {SR_UID}  # the same bytes: delivered
        assert dest.send([Item(SR_UID, v2.locator, "original")]) == {SR_UID}  # an original: not compared
