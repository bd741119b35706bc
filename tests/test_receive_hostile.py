"""The receiver against hostile or broken peers and a failing index: real sockets, DCMTK as the peer.

Each test here failed before its fix: a deflate bomb inflated whole by pydicom, P-DATA-TF PDUs full of
empty or 1-byte PDVs that grew memory uncounted, a peer trickling a byte now and then that held its
connection for ever, an index error that dropped the association with no answer, and a UID with a
trailing newline taken as valid.
"""
from __future__ import annotations

import json
import logging
import select
import socket
import sqlite3
import struct
import subprocess
import time
import tracemalloc
import zlib
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.config import load_settings
from node.receive import ingest as ingest_module
from node.receive import scp as scp_module
from node.receive import ul
from node.receive.ingest import Ingest
from node.receive.scp import StoreSCP
from node.receive.spool import valid_uid
from node.store.index import Index
from node.store.vault import Vault
from tests.nodeproc import DCMTK_ENV, FlushedIndex, free_port
from tests.test_receive import make_ct

DEFLATED = str(DeflatedExplicitVRLittleEndian)


@pytest.fixture
def node(tmp_path):
    """An in-process SCP: (settings, index as committed, the Index object itself, the Ingest)."""
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    settings = load_settings(data_dir=data_dir, dicom_host="127.0.0.1", dicom_port=free_port(), min_free_disk_mb=0)
    index = Index(data_dir / "index.db")
    ingest = Ingest(index, Vault(data_dir, None, writer=True))
    server = StoreSCP(settings, ingest)
    server.start()
    yield settings, FlushedIndex(index, ingest), index, ingest
    server.stop(wait_s=5)
    ingest.close()
    ingest.vault.close()


def _statuses(port: int, files: list[Path], *args: str) -> dict[str, str]:
    """Each file's C-STORE response as DCMTK's storescu logs it (not halting at a refusal). Fails unless
    every file was answered: an association dropped mid-way leaves some unanswered."""
    out = subprocess.run(["storescu", "-v", "--no-halt", *args, "-aet", "MOD1", "-aec", "HILUM", "127.0.0.1",
                          str(port), *map(str, files)], env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
    statuses, current = {}, None
    for line in (out.stdout + out.stderr).splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
        elif "Received Store Response (" in line and current is not None:
            statuses[Path(current).name] = line.split("Received Store Response (", 1)[1].rstrip(")")
    assert len(statuses) == len(files), out.stdout[-2000:] + out.stderr[-2000:]
    return statuses


def _quarantined(data_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((data_dir / "quarantine").glob("*.json"))]


# -- 1. deflate bombs -----------------------------------------------------------------------------------
def _deflate_bomb(zeros: int) -> bytes:
    """A Part 10 CT header in the deflated syntax whose data set ends with ``zeros`` zero bytes in a
    private OB element: a few KiB of deflate per MiB inflated."""
    ds = make_ct(None, rows=4)
    del ds.PixelData
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [z.compress(buf.getvalue()), z.compress(struct.pack("<HH2sHI", 0x0029, 0x1001, b"OB", 0, zeros))]
    parts += [z.compress(bytes(1 << 20)) for _ in range(zeros >> 20)]
    parts.append(z.flush())
    return ul.part10_header(ds.SOPClassUID, ds.SOPInstanceUID, DEFLATED, "EVIL", "1.2.3", "X") + b"".join(parts)


def test_a_deflate_bomb_is_never_inflated_past_the_limit(monkeypatch):
    """pydicom inflates a deflated data set whole, in one zlib.decompress: the ingest inflates it first,
    bounded, and refuses it without holding more than the limit."""
    monkeypatch.setattr(ingest_module, "MAX_INFLATED", 4 << 20, raising=False)
    raw = _deflate_bomb(64 << 20)
    assert len(raw) < 128 << 10
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="inflated size over 4 MB"):
            ingest_module.instance_facts(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak >> 20} MiB allocated for a 4 MiB limit"


def test_a_deflate_bomb_is_refused_and_quarantined_and_a_deflated_instance_is_stored(node, tmp_path, monkeypatch):
    settings, index, _, _ = node
    monkeypatch.setattr(ingest_module, "MAX_INFLATED", 4 << 20, raising=False)
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(_deflate_bomb(16 << 20))
    good = tmp_path / "good.dcm"
    ds = make_ct(None)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(good, enforce_file_format=True)
    # -xd: storescu proposes (and sends) the deflated syntax
    statuses = _statuses(settings.dicom_port, [bomb, good], "-xd")
    assert statuses == {"bomb.dcm": "Refused: OutOfResources", "good.dcm": "Success"}, statuses
    [q] = _quarantined(settings.data_dir)
    assert q["reason"] == "inflated size over 4 MB"
    kept = next((settings.data_dir / "quarantine").glob("*.dcm"))
    raw = Vault(settings.data_dir, None).read(str(kept))
    assert pydicom.dcmread(BytesIO(raw), stop_before_pixels=True).file_meta.TransferSyntaxUID == DEFLATED
    # The well-formed one: stored as sent (deflated), indexed, its header read from the inflated bytes.
    [row] = index.instances_of_study(ds.StudyInstanceUID)
    assert row["sop_uid"] == ds.SOPInstanceUID and row["transfer_syntax"] == DEFLATED
    assert index.study(ds.StudyInstanceUID)["patient_name"] == "TEST^RECEIVE"
    stored = pydicom.dcmread(BytesIO(Vault(settings.data_dir, None).read(row["path"])))
    assert stored.file_meta.TransferSyntaxUID == DEFLATED and stored.PixelData == ds.PixelData
    assert json.loads(index.series_of_study(ds.StudyInstanceUID)[0]["header_json"])["00080060"]["Value"] == ["CT"]
    assert index.count_studies() == 1


# -- 2. PDV floods ---------------------------------------------------------------------------------------
def _associated(port: int) -> socket.socket:
    """A raw socket with an association for CT storage (context 1) accepted."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(ul.associate_rq("HILUM", "FLOOD", [(1, CTImageStorage, [ExplicitVRLittleEndian])], 16384,
                              "1.2.3.4", "FLOOD"))
    head = _recv_exactly(s, 6)
    assert head[0] == ul.ASSOCIATE_AC, head
    _recv_exactly(s, struct.unpack(">I", head[2:])[0])
    return s


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, f"connection closed after {len(out)} of {n} bytes"
        out += chunk
    return out


def _command_pdu() -> bytes:
    cmd = ul.request(ul.C_STORE_RQ, 1, CTImageStorage)
    return ul.p_data(1, True, cmd, 0)[0]


def _c_store(port: int, sop_class: str, sop_instance: str, dataset: bytes) -> ul.Command:
    """One C-STORE on a raw association, the data set's bytes exactly as given; its response."""
    def element(elem: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0, elem, len(value) + len(value) % 2) + value + b"\0" * (len(value) % 2)

    body = b"".join((element(0x0002, sop_class.encode()), element(0x0100, struct.pack("<H", ul.C_STORE_RQ)),
                     element(0x0110, struct.pack("<H", 7)), element(0x0700, struct.pack("<H", 0)),
                     element(0x0800, struct.pack("<H", 0)), element(0x1000, sop_instance.encode())))
    command = element(0x0000, struct.pack("<I", len(body))) + body
    with _associated(port) as s:
        s.sendall(b"".join(ul.p_data(1, True, command, 16384) + ul.p_data(1, False, dataset, 16384)))
        head = _recv_exactly(s, 6)
        assert head[0] == ul.P_DATA_TF, head
        [(_, _, rsp)] = ul.pdvs(_recv_exactly(s, struct.unpack(">I", head[2:])[0]))
        s.sendall(ul.release_rq())
        _answer(s)
    return ul.parse_command(bytes(rsp))


def _pdata(pdvs: bytes) -> bytes:
    return struct.pack(">BBI", ul.P_DATA_TF, 0, len(pdvs)) + pdvs


def _answer(s: socket.socket) -> bytes:
    """What the SCP sends until it closes (or 10 s pass: a timeout fails the test)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


@pytest.mark.parametrize("fragment", [b"", b"x"], ids=["empty", "one-byte"])
def test_a_flood_of_tiny_pdvs_ends_the_association(node, monkeypatch, caplog, fragment):
    """Before: each PDV was kept as an object of its own and counted by its data alone, so millions of
    empty (or 1-byte) PDVs grew memory without ever reaching the instance limit. Now an empty one that is
    not the last fragment is an A-ABORT at once, and each small one counts PDV_COST against the limit."""
    settings, index, _, _ = node
    monkeypatch.setattr(scp_module, "MAX_INSTANCE", 1 << 20)
    pdv = struct.pack(">IBB", 2 + len(fragment), 1, 0) + fragment  # data set, not the last fragment
    n = 3072  # a few KiB of data: far below the limit by its bytes alone, over it at PDV_COST (1 KiB) each
    with caplog.at_level(logging.WARNING, logger="hilum.scp"), _associated(settings.dicom_port) as s:
        s.sendall(_command_pdu() + _pdata(pdv * n))
        answer = _answer(s)
    assert answer[:1] == bytes([ul.ABORT]), answer[:32]
    why = "empty PDV" if not fragment else "data set over"
    assert any(why in r.getMessage() and "127.0.0.1" in r.getMessage() for r in caplog.records), caplog.text
    assert index.count_studies() == 0


def test_small_fragments_are_kept_together_not_one_object_each():
    """A P-DATA-TF of a million 1-byte PDVs costs about a megabyte kept, not an object per PDV (a
    memoryview is ~200 bytes) nor a list of them all while the PDU is read."""
    n = 1_000_000
    body = (struct.pack(">IBB", 3, 1, 0) + b"x") * n
    tracemalloc.start()
    try:
        kept = ul.Fragments(1 << 40)
        for _cid, mch, data in ul.iter_pdvs(body):
            kept.add(data, bool(mch & 2))
        parts = kept.take()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert b"".join(parts) == b"x" * n and kept.size == n and len(parts) == 1
    assert peak < 4 * n, f"{peak >> 20} MiB to keep 1 MiB"
    with pytest.raises(ul.ProtocolError, match="empty PDV"):
        ul.Fragments(1 << 20).add(memoryview(b""), False)
    last = ul.Fragments(1 << 20)
    last.add(memoryview(b""), True)  # an empty last fragment is fine
    assert last.take() == []


def test_large_fragments_stay_views_of_their_pdus():
    big = bytes(6 + 16384)
    kept = ul.Fragments(1 << 30)
    [(_, _, data)] = ul.iter_pdvs(struct.pack(">IBB", 2 + 16384, 1, 0) + big[6:])
    kept.add(data, False)
    kept.add(memoryview(b"tail"), True)
    parts = kept.take()
    assert parts[0] is data and bytes(parts[1]) == b"tail" and kept.cost == ul.PDV_COST


# -- 3. trickling peers ---------------------------------------------------------------------------------
def _closed_within(s: socket.socket, trickle: bytes, every_s: float, limit_s: float) -> float | None:
    """Send ``trickle`` one byte every ``every_s``; the seconds until the SCP closed the connection, or None
    if it was still open after ``limit_s``."""
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < limit_s:
        try:
            s.send(trickle[i % len(trickle): i % len(trickle) + 1])
        except OSError:
            return time.monotonic() - t0
        i += 1
        end = time.monotonic() + every_s
        while (left := end - time.monotonic()) > 0:
            if select.select([s], [], [], left)[0]:
                try:
                    if not s.recv(65536):
                        return time.monotonic() - t0
                except OSError:
                    return time.monotonic() - t0
    return None


def test_a_peer_trickling_its_associate_request_is_closed_at_the_acse_deadline(node, monkeypatch, caplog):
    """Before: the ACSE timeout was per recv, so a byte every (timeout - 1) s held the connection for ever
    (64 such peers locked everyone out). Now the whole A-ASSOCIATE-RQ must arrive within it."""
    settings, _, _, _ = node
    monkeypatch.setattr(scp_module, "ACSE_TIMEOUT_S", 1.0)
    rq = ul.associate_rq("HILUM", "SLOW", [(1, Verification, [ExplicitVRLittleEndian])], 16384, "1.2.3", "SLOW")
    with caplog.at_level(logging.WARNING, logger="hilum.scp"), \
            socket.create_connection(("127.0.0.1", settings.dicom_port), timeout=10) as s:
        took = _closed_within(s, rq, 0.3, 5.0)
    assert took is not None and took < 3.0, took
    assert any("127.0.0.1" in r.getMessage() and "A-ASSOCIATE-RQ" in r.getMessage() for r in caplog.records), \
        caplog.text
    ae = AE(ae_title="PYSCU")  # and the next peer is served
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title="HILUM")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()


def test_a_peer_trickling_a_pdu_is_closed_at_the_network_deadline(node, monkeypatch, caplog):
    settings, _, _, _ = node
    monkeypatch.setattr(scp_module, "NETWORK_TIMEOUT_S", 1.0)
    with caplog.at_level(logging.WARNING, logger="hilum.scp"), _associated(settings.dicom_port) as s:
        s.sendall(struct.pack(">BBI", ul.P_DATA_TF, 0, 1000))  # a PDU of 1000 bytes, sent a byte at a time
        took = _closed_within(s, b"\0", 0.3, 5.0)
    assert took is not None and took < 3.0, took
    assert any("127.0.0.1" in r.getMessage() and "no complete PDU" in r.getMessage() for r in caplog.records), \
        caplog.text


# -- 4. index errors -------------------------------------------------------------------------------------
def _disk_full(*_a, **_k):
    raise sqlite3.OperationalError("database or disk is full")


def test_index_errors_are_answered_not_dropped(node, tmp_path, monkeypatch):
    """A full disk cannot be made here cheaply (the index lives beside the spool, and the test for the
    spool's full disk mounts a tmpfs, not always allowed): the index's calls are made to raise what
    SQLite raises then. Before: sqlite3.Error from those calls dropped the association, no answer."""
    settings, index, raw_index, _ = node
    first, purged, dup, malformed, after = (tmp_path / f"{n}.dcm" for n in
                                            ("first", "purged", "dup", "malformed", "after"))
    looked_at = make_ct(first)
    was_purged = make_ct(purged)
    make_ct(dup)
    bad = make_ct(None)
    del bad.SeriesInstanceUID
    bad.save_as(malformed, enforce_file_format=True)
    make_ct(after)
    assert _statuses(settings.dicom_port, [purged, dup]) == {"purged.dcm": "Success", "dup.dcm": "Success"}
    with sqlite3.connect(settings.data_dir / "index.db") as db:
        db.execute("UPDATE instances SET purged_at=1 WHERE sop_uid=?", (str(was_purged.SOPInstanceUID),))

    instance_state = raw_index.instance_state

    def state_fails_for_first(sop):
        if sop == looked_at.SOPInstanceUID:
            _disk_full()
        return instance_state(sop)

    monkeypatch.setattr(raw_index, "instance_state", state_fails_for_first)
    monkeypatch.setattr(raw_index, "forget_purged", _disk_full)
    monkeypatch.setattr(raw_index, "bump", _disk_full)  # counters: best effort, never a failure
    statuses = _statuses(settings.dicom_port, [first, purged, dup, malformed, after])
    assert statuses == {"first.dcm": "Refused: OutOfResources", "purged.dcm": "Refused: OutOfResources",
                        "dup.dcm": "Success", "malformed.dcm": "Error: CannotUnderstand",
                        "after.dcm": "Success"}, statuses
    assert [q["reason"] for q in _quarantined(settings.data_dir)] == [
        "unparseable or incomplete dataset: missing or invalid SeriesInstanceUID"]
    assert not index.has_instance(looked_at.SOPInstanceUID)


def test_an_unexpected_error_storing_one_instance_is_answered_out_of_resources(node, tmp_path, monkeypatch):
    settings, index, _, ingest = node
    a, b = tmp_path / "a.dcm", tmp_path / "b.dcm"
    ds_a, ds_b = make_ct(a), make_ct(b)
    store = ingest.store

    def broken(raw, origin, batch=None, header=None, sop_uid=None):
        if ds_a.SOPInstanceUID.encode() in raw[:4096]:
            raise RuntimeError("a bug")
        return store(raw, origin, batch, header, sop_uid=sop_uid)

    monkeypatch.setattr(ingest, "store", broken)
    assert _statuses(settings.dicom_port, [a, b]) == {"a.dcm": "Refused: OutOfResources", "b.dcm": "Success"}
    assert index.has_instance(ds_b.SOPInstanceUID) and not index.has_instance(ds_a.SOPInstanceUID)


# -- 5. UIDs with a trailing newline ---------------------------------------------------------------------
def test_valid_uid_refuses_a_trailing_newline():
    assert valid_uid("1.2.3") and not valid_uid("1.2.3\n") and not valid_uid("1.2.3\n\n")
    assert not valid_uid("1.02.3") and not valid_uid("")


def test_a_study_uid_ending_in_a_newline_is_quarantined_not_indexed(node, tmp_path):
    """Sent as raw bytes: DCMTK (and pydicom writing it) would tidy the value up first."""
    settings, index, _, _ = node
    ds = make_ct(None)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    old = ds.StudyInstanceUID.encode()
    new = (ds.StudyInstanceUID[:-2] + "\n").encode().ljust(len(old), b"\0")  # same length: "...\n\0"
    raw = buf.getvalue()
    assert raw.count(old) == 1
    rsp = _c_store(settings.dicom_port, ds.SOPClassUID, ds.SOPInstanceUID, raw.replace(old, new))
    # the comment is an LO: cut at 64 characters, within the field's name; the quarantine has it whole
    assert rsp.status == ul.CANNOT_UNDERSTAND and "invalid StudyInsta" in rsp.comment, (rsp.status, rsp.comment)
    [q] = _quarantined(settings.data_dir)
    assert "StudyInstanceUID" in q["reason"]
    assert index.count_studies() == 0 and not index.has_instance(ds.SOPInstanceUID)


def test_a_data_set_naming_another_instance_than_its_request_is_quarantined(node, tmp_path):
    """PS3.7: the request's Affected SOP Instance UID is the data set's. Before, the node answered
    (and wrote into the file meta) the request's UID and indexed the data set's: two names for one
    file, and the sender told 'stored' for an instance it did not send."""
    settings, index, _, _ = node
    ds = make_ct(None)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    other = ds.SOPInstanceUID[:-1] + ("1" if ds.SOPInstanceUID[-1] != "1" else "2")
    rsp = _c_store(settings.dicom_port, ds.SOPClassUID, other, buf.getvalue())
    assert rsp.status == ul.CANNOT_UNDERSTAND and "SOP Instance UID" in rsp.comment, (rsp.status, rsp.comment)
    [q] = _quarantined(settings.data_dir)
    assert q["reason"] == f"the data set's SOP Instance UID {ds.SOPInstanceUID} is not the request's {other}"
    assert not index.has_instance(ds.SOPInstanceUID) and not index.has_instance(other)
    rsp = _c_store(settings.dicom_port, ds.SOPClassUID, ds.SOPInstanceUID, buf.getvalue())  # the same, named right
    assert rsp.status == 0 and index.has_instance(ds.SOPInstanceUID)


def test_the_worker_api_refuses_a_result_uid_ending_in_a_newline(monkeypatch):
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from node.web import worker_api

    app = FastAPI()
    app.include_router(worker_api.router)
    app.dependency_overrides[worker_api.require_worker] = lambda: "w1"
    app.state.node = SimpleNamespace(settings=SimpleNamespace(stow_max_mb=1))
    stored = []
    monkeypatch.setattr(worker_api, "_attempt", lambda request, job_id: {"attempt": 1})
    monkeypatch.setattr(worker_api, "_store_result", lambda node, job_id, a, uid, data: stored.append(uid))
    client = TestClient(app)
    assert client.put("/api/worker/jobs/1/results/1.2.3%0A", content=b"x").status_code == 422
    assert client.put("/api/worker/jobs/1/results/1.2.3", content=b"x").status_code == 200
    assert stored == ["1.2.3"]
