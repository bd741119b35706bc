"""The spool at rest: sealed envelopes, the received-instance log, key rotation, retention,
recovery of the index from the log — in units, then through a real `hilum up` with DCMTK."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.config import ConfigError, load_settings
from node.config_security import SpoolEncryption
from node.handler_api import ArtefactKey
from node.jobs.artefacts import ArtefactCache
from node.phantom import generate_ct
from node.store.envelope import HEADER_SIZE, IntegrityError, Keyring, Sealer, new_salt
from node.store.keys import KeyringError, load_keyring
from node.store.rewrap import drop_key, keys_in_use, rewrap_all
from node.store.segments import SegmentReader, SegmentWriter, locator_context
from node.store.vault import Vault
from tests.nodeproc import REPO, running_node, storescu, wait_for
from tests.test_e2e import write_rules

RING = Keyring(active="k0", keys={"k0": bytes(range(32))})


# -- envelopes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ring", [None, RING], ids=["plain", "aes-gcm"])
def test_envelope_round_trip_and_every_kind_of_damage_is_detected(ring):
    sealer = Sealer(new_salt(), ring)
    data = os.urandom(5000)
    blob = sealer.seal(data)
    assert sealer.open(blob) == data
    if ring is not None:
        assert data[:64] not in blob  # ciphertext
    for pos in (3, 40, HEADER_SIZE + 10, len(blob) - 1):  # magic, fixed header, payload, GCM tag / last byte
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(IntegrityError):
            sealer.open(bytes(bad))
    with pytest.raises(IntegrityError, match="payload is"):
        sealer.open(blob[:-7])
    with pytest.raises(IntegrityError, match="another spool"):
        Sealer(new_salt(), ring).open(blob)


def test_the_seal_crc_is_zlibs_crc32_whichever_library_computes_it(monkeypatch):
    """node/store/crc.py uses the system's libdeflate where it is installed (it is here: checked, so
    the fast path is the one under test), else zlib; the values must be zlib's for every kind of
    buffer and running value, or records written by one could not be read by the other."""
    import zlib

    from node.store import crc

    assert crc._fn is not None, "libdeflate is installed on this machine: the fast path must be taken"
    big = os.urandom(300_001)
    cases = [(big, 0), (big, 0xDEADBEEF), (bytearray(big), 7), (memoryview(big)[5:], 1),
             (memoryview(bytearray(big))[3:200_000], 0), (b"tiny", 0), (b"", 5)]
    for data, value in cases:
        assert crc.crc32(data, value) == zlib.crc32(data, value)
    monkeypatch.setattr(crc, "_fn", None)  # a machine without libdeflate
    for data, value in cases:
        assert crc.crc32(data, value) == zlib.crc32(data, value)


@pytest.mark.parametrize("ring", [None, RING], ids=["plain", "aes-gcm"])
def test_an_envelope_sealed_in_parts_opens_like_one_sealed_whole(ring, tmp_path):
    """Ingest seals a received instance as a list of buffers (meta, then the instance, written with
    one pwritev, never joined): the record opens to the same payload, bound to its place, and an
    unencrypted one is byte for byte what sealing the joined payload gives."""
    from node.store.vault import Vault

    sealer = Sealer(new_salt(), ring)
    parts = [b"m" * 37, bytearray(os.urandom(70_001)), memoryview(os.urandom(3))]
    joined = b"".join(parts)
    blob = b"".join(bytes(p) for p in sealer.seal_parts(parts, b"log:1:4096"))
    assert sealer.open(blob, b"log:1:4096") == joined
    if ring is None:
        assert blob == sealer.seal(joined, b"log:1:4096")
    with pytest.raises(IntegrityError):
        sealer.open(blob, b"log:1:8192")  # moved elsewhere
    vault = Vault(tmp_path, ring, writer=True)
    try:
        locators = [vault.append(bytes(p) * 3, {"calling_ae": "PACS"}, durable=False) for p in parts]
        vault.sync()
        for p, loc in zip(parts, locators):
            assert vault.log.read(loc) == ({"calling_ae": "PACS"}, bytes(p) * 3)
    finally:
        vault.close()


def test_an_encrypted_object_needs_its_key():
    blob = Sealer(b"s" * 16, RING).seal(b"x" * 100)
    with pytest.raises(IntegrityError, match="no keyring"):
        Sealer(b"s" * 16, None).open(blob)
    other = Keyring(active="k9", keys={"k9": b"\x01" * 32})
    with pytest.raises(IntegrityError, match="k0"):
        Sealer(b"s" * 16, other).open(blob)


def test_a_torn_rewrap_leaves_the_old_wrap_usable():
    sealer = Sealer(b"s" * 16, RING)
    blob = bytearray(sealer.seal(b"payload" * 100))
    sealer.keyring = RING.with_new_active()
    pos, sector = sealer.rewrap(bytes(blob[:HEADER_SIZE]))
    blob[pos: pos + 40] = sector[:40]  # power cut half-way through the sector write
    assert sealer.open(bytes(blob)) == b"payload" * 100  # the untouched slot still unwraps the data key


# -- the log ------------------------------------------------------------------------------------
def test_log_appends_concurrently_and_scan_steps_over_a_hole(tmp_path):
    sealer = Sealer(new_salt(), RING)
    reader = SegmentReader(tmp_path / "log", sealer)
    writer = SegmentWriter(reader, max_segment=1 << 20, first_chunk=256 << 10)
    payloads = {i: os.urandom(20_000 + 997 * i) for i in range(60)}
    locs: dict[int, str] = {}

    def put(keys):
        for i in keys:
            data = b"\0\0\0\0" + payloads[i]  # an empty meta, then the bytes
            locs[i] = writer.append(sealer.sealed_length(len(data)),
                                    lambda seg, off, data=data: sealer.seal(data, locator_context(seg, off)))

    threads = [threading.Thread(target=put, args=(range(k, 60, 4),)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    writer.close()
    assert len(reader.segments()) > 1  # rolled over at max_segment
    assert {i: reader.read(loc)[1] for i, loc in locs.items()} == payloads
    # A crash after reserving a range but before writing it leaves zeros: later records are still found.
    seg, off, _ = (int(x) for x in locs[10].split(":")[1:])
    with open(reader.path(seg), "r+b") as f:
        f.seek(off)
        f.write(bytes(HEADER_SIZE))
    found = {r.locator for s in reader.segments() for r in reader.scan(s)}
    assert found == set(locs.values()) - {locs[10]}


def test_a_record_only_opens_where_it_was_written(tmp_path):
    vault = Vault(tmp_path, RING, writer=True, segment_mb=8)
    a, b = vault.append(b"first" * 100, {}), vault.append(b"second" * 100, {})
    (seg, off_a, len_a), (_, off_b, _) = (tuple(int(x) for x in loc.split(":")[1:]) for loc in (a, b))
    path = vault.log.path(seg)
    with open(path, "r+b") as f:  # a whole, valid envelope copied over another one
        f.seek(off_a)
        blob = f.read(len_a)
        f.seek(off_b)
        f.write(blob)
    with pytest.raises(IntegrityError):
        vault.read(f"log:{seg}:{off_b}:{len_a}")
    assert vault.read(a) == b"first" * 100
    vault.close()


def test_an_unencrypted_envelope_is_refused_in_an_encrypted_spool(tmp_path):
    plain = Vault(tmp_path, None, writer=True, segment_mb=8)
    loc = plain.append(b"written before encryption was turned on", {})
    plain.close()
    with pytest.raises(IntegrityError, match="unencrypted object in an encrypted spool"):
        Vault(tmp_path, RING).read(loc)


def test_segment_numbers_are_never_reused_and_big_records_need_no_wait(tmp_path):
    vault = Vault(tmp_path, None, writer=True, segment_mb=8)
    loc = vault.append(b"x" * 1000, {})
    vault.close()
    seg = int(loc.split(":")[1])
    vault.log.path(seg).unlink()  # retention deleted the newest segment
    again = Vault(tmp_path, None, writer=True, segment_mb=8)
    big = again.append(os.urandom(6 << 20), {})  # more than the space prepared ahead of a new segment
    assert int(big.split(":")[1]) > seg
    assert len(again.read(big)) == 6 << 20
    again.close()


def test_rewrap_brings_every_object_under_the_new_key_and_the_old_key_can_go(tmp_path):
    vault = Vault(tmp_path, RING, writer=True, segment_mb=8)
    locs = [vault.append(os.urandom(3000), {"calling_ae": "CT"}) for _ in range(20)]
    result = tmp_path / "results" / "1" / "r.dcm"
    vault.write_file(result, b"result bytes")
    # the artefact cache (a series' lungs, derived from its images) is sealed under the same keys
    lungs = np.zeros((4, 8, 8), np.uint8)
    lungs[1:3, 2:6, 2:6] = 1
    series_key, artefact = "s" * 16, ArtefactKey("ct-anatomy", "1", "lungs")
    ArtefactCache(tmp_path / "artefacts", vault).save(series_key, artefact, lungs)
    assert keys_in_use(vault) == {"k0": 22}
    new = RING.with_new_active()
    vault.use_keyring(new)
    locs.append(vault.append(b"after the switch", {}))
    rep = rewrap_all(vault)
    assert rep.errors == [] and rep.rewrapped == 22
    assert keys_in_use(vault) == {new.active: 23}
    only_new = Keyring(active=new.active, keys={new.active: new.keys[new.active]})
    reader = Vault(tmp_path, only_new)
    assert all(reader.read(loc) for loc in locs) and reader.read(str(result)) == b"result bytes"
    assert np.array_equal(ArtefactCache(tmp_path / "artefacts", reader).load(series_key, artefact), lungs)
    assert Vault(tmp_path, RING).read(locs[0])  # a job started before the rotation still reads
    assert drop_key(vault, "k0") == 22  # retiring k0
    with pytest.raises(IntegrityError):
        Vault(tmp_path, RING).read(locs[0])  # the old key alone no longer opens anything
    assert ArtefactCache(tmp_path / "artefacts", Vault(tmp_path, RING)).load(series_key, artefact) is None
    assert reader.read(locs[0])
    vault.close()


# -- key sources ----------------------------------------------------------------------------------
def test_key_sources_and_their_errors_name_the_field(tmp_path, monkeypatch):
    f = tmp_path / "keys" / "spool.json"
    ring = load_keyring(SpoolEncryption(key_file=f))  # created on first use
    assert (f.stat().st_mode & 0o777) == 0o600 and load_keyring(SpoolEncryption(key_file=f)) == ring
    f.chmod(0o644)
    with pytest.raises(KeyringError, match="spool_encryption.key_file: .*chmod 600"):
        load_keyring(SpoolEncryption(key_file=f))
    with pytest.raises(KeyringError, match="spool_encryption.key_env: environment variable HILUM_TEST_KEY"):
        load_keyring(SpoolEncryption(key_env="HILUM_TEST_KEY"))
    monkeypatch.setenv("HILUM_TEST_KEY", "not base64!")
    with pytest.raises(KeyringError, match="key_env.*not base64"):
        load_keyring(SpoolEncryption(key_env="HILUM_TEST_KEY"))
    import base64

    monkeypatch.setenv("HILUM_TEST_KEY", base64.b64encode(b"k" * 32).decode())
    assert list(load_keyring(SpoolEncryption(key_env="HILUM_TEST_KEY")).keys.values()) == [b"k" * 32]
    cmd = [sys.executable, "-c", f"print({RING.to_json()!r})"]
    assert load_keyring(SpoolEncryption(key_command=cmd)) == RING
    with pytest.raises(KeyringError, match="key_command: exit status 3"):
        load_keyring(SpoolEncryption(key_command=[sys.executable, "-c", "import sys; sys.exit(3)"]))
    with pytest.raises(ValueError, match="exactly one of"):
        SpoolEncryption(key_file=f, key_env="X")
    with pytest.raises(ConfigError, match="spool_encryption.key_file: .* is inside data_dir"):
        load_settings(data_dir=tmp_path, spool_encryption={"key_file": str(tmp_path / "k.json")})


# -- through a running node -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return generate_ct(tmp_path_factory.mktemp("spool-ct") / "study", seed=5, rows=96, cols=96, slices=24,
                       pixel_spacing=4.0, slice_thickness=5.0)


def _encrypted(tmp_path: Path, **kw) -> dict:
    return {"spool_encryption": {"key_file": str(tmp_path / "keys" / "spool.json")}, **kw}


def _spool_files(data_dir: Path) -> list[Path]:
    return [p for d in ("spool", "results", "quarantine") for p in (data_dir / d).rglob("*") if p.is_file()]


def _delivered(node, study_uid: str, originals: int) -> dict | None:
    st = node.study(study_uid)
    jobs = st.get("jobs", [])
    if not jobs or any(j["status"] != "done" for j in jobs):
        return None
    with node.orthanc() as c:
        found = c.post("/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}).json()
    results = sum(len(j["results"]) for j in jobs)
    return st if len(found) == originals + results else None


def test_encrypted_spool_holds_no_plaintext_and_the_archive_gets_the_originals(ct, tmp_path):
    files = sorted(ct.dicom_dir.iterdir())
    sample = pydicom.dcmread(files[12])
    pixels = sample.PixelData[len(sample.PixelData) // 2: len(sample.PixelData) // 2 + 64]
    with running_node(tmp_path / "data", write_rules(tmp_path / "rules", destinations="[orthanc]"),
                      **_encrypted(tmp_path)) as node:
        assert storescu(node.dicom_port, ct.dicom_dir).returncode == 0
        wait_for(lambda: _delivered(node, ct.study_uid, len(files)), 120, "processed and archived", interval=0.5)
        on_disk = _spool_files(node.data_dir)
        assert any(p.suffix == ".seg" for p in on_disk) and any(p.suffix == ".dcm" for p in on_disk)
        for p in on_disk:
            blob = p.read_bytes()
            # "DICM" with the first file-meta group tag after it: four bytes alone turn up by chance in
            # megabytes of ciphertext (about once in a few hundred runs), six do not.
            assert b"PHANTOM^CHEST" not in blob and pixels not in blob and b"DICM\x02\x00" not in blob, p
        with node.orthanc() as c:  # what left the spool is the instance exactly as it was sent
            (oid,) = c.post("/tools/find", json={"Level": "Instance",
                                                  "Query": {"SOPInstanceUID": sample.SOPInstanceUID}}).json()
            archived = pydicom.dcmread(BytesIO(c.get(f"/instances/{oid}/file").content))
        assert archived.PixelData == sample.PixelData and str(archived.PatientName) == "PHANTOM^CHEST"


def test_a_flipped_byte_is_detected_quarantined_and_never_reaches_a_handler(ct, tmp_path):
    files = sorted(ct.dicom_dir.iterdir())
    with running_node(tmp_path / "data", write_rules(tmp_path / "rules", destinations="[orthanc]"),
                      stable_after=600, **_encrypted(tmp_path)) as node:
        assert storescu(node.dicom_port, ct.dicom_dir).returncode == 0
        db = sqlite3.connect(node.data_dir / "index.db")
        sop, locator = db.execute("SELECT sop_uid, path FROM instances ORDER BY sop_uid LIMIT 1").fetchone()
        seg, off, length = (int(x) for x in locator.split(":")[1:])
        with open(node.data_dir / "spool" / "log" / f"{seg:08d}.seg", "r+b") as f:
            f.seek(off + length // 2)
            b = f.read(1)
            f.seek(off + length // 2)
            f.write(bytes([b[0] ^ 0x20]))
        assert node.api("POST", f"/api/studies/{ct.study_uid}/complete").status_code == 200

        def settled():
            st = node.study(ct.study_uid)
            jobs = st.get("jobs", [])
            return st if jobs and jobs[0]["status"] == "failed" else None

        job = wait_for(settled, 120, "the job refused", interval=0.5)["jobs"][0]
        assert "integrity" in job["error"] and locator in job["error"]
        quarantined = sorted((node.data_dir / "quarantine").glob("*-damaged-*.json"))
        assert quarantined and json.loads(quarantined[0].read_text())["locator"] == locator

        def original_failed():
            row = db.execute("SELECT status, last_error FROM deliveries WHERE kind='original' AND sop_uid=?",
                             (sop,)).fetchone()
            return row if row and row[0] == "failed" else None

        status, error = wait_for(original_failed, 60, "the damaged original's delivery failed", interval=0.5)
        assert "integrity" in error
        def in_archive():
            with node.orthanc() as c:
                return c.post("/tools/find", json={"Level": "Instance",
                                                   "Query": {"StudyInstanceUID": ct.study_uid}}).json()
        # The other originals reach the archive: those after the damaged one in its batch go in the
        # next batch, which may still be under way when that delivery is recorded failed.
        wait_for(lambda: len(in_archive()) == len(files) - 1, 60, "the other originals archived", interval=0.5)
        assert len(in_archive()) == len(files) - 1


def _audit(node) -> list[dict]:
    return [json.loads(line) for line in (node.data_dir / "audit" / "audit.jsonl").read_text().splitlines() if line]


def _hilum(node, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args, "--config", str(node.config_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_key_rotation_while_receiving_loses_nothing(tmp_path):
    big = generate_ct(tmp_path / "big", seed=6, rows=128, cols=128, slices=80, pixel_spacing=3.0,
                      slice_thickness=2.5)
    files = sorted(big.dicom_dir.iterdir())
    with running_node(tmp_path / "data", write_rules(tmp_path / "rules", destinations="[orthanc]"),
                      stable_after=600, **_encrypted(tmp_path)) as node:
        sender = subprocess.Popen(["storescu", "-aet", "MOD", "-aec", "HILUM", "127.0.0.1", str(node.dicom_port),
                                   *map(str, files)], env={**os.environ, "TCP_NODELAY": "1"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: node.study(big.study_uid).get("instances_received", 0) >= 5, 60, "reception under way",
                 interval=0.05)
        first_key = json.loads((tmp_path / "keys" / "spool.json").read_text())["active"]
        out = _hilum(node, "keys", "rotate", "--wait")
        assert out.returncode == 0, out.stdout + out.stderr
        assert sender.wait(120) == 0 and b"E: " not in sender.stderr.read()
        assert node.study(big.study_uid)["instances_received"] == len(files)
        out = _hilum(node, "keys", "rewrap", "--wait")  # anything sealed under k0 while the first pass ran
        assert out.returncode == 0, out.stdout + out.stderr
        status = json.loads(_hilum(node, "keys", "status").stdout)
        assert status["active"] != first_key and set(status["objects_by_key"]) == {status["active"]}
        assert status["objects_by_key"][status["active"]] >= len(files)
        out = _hilum(node, "keys", "retire", first_key)
        assert out.returncode == 0, out.stderr
        assert node.api("POST", f"/api/studies/{big.study_uid}/complete").status_code == 200
        wait_for(lambda: _delivered(node, big.study_uid, len(files)), 180, "processed and archived", interval=0.5)
        events = _audit(node)
        assert {e["detail"]["what"] for e in events if e["event"] == "spool-keys"} >= {"rewrap", "retire"}


def test_retention_deletes_spooled_copies_after_delivery_and_says_so(ct, tmp_path):
    files = sorted(ct.dicom_dir.iterdir())
    with running_node(tmp_path / "data", write_rules(tmp_path / "rules", destinations="[orthanc]"),
                      retention={"originals_days": 0, "results_days": 0, "check_every_s": 1}) as node:
        assert storescu(node.dicom_port, ct.dicom_dir).returncode == 0
        st = wait_for(lambda: _delivered(node, ct.study_uid, len(files)), 120, "processed and archived", interval=0.5)
        db = sqlite3.connect(node.data_dir / "index.db")

        def purged():
            n = db.execute("SELECT count(*) FROM instances WHERE purged_at IS NOT NULL").fetchone()[0]
            r = db.execute("SELECT count(*) FROM results WHERE purged_at IS NOT NULL").fetchone()[0]
            return n == len(files) and r >= 1

        wait_for(purged, 60, "retention ran", interval=0.5)
        locators = {row[0] for row in db.execute("SELECT path FROM instances")}
        segments = {int(loc.split(":")[1]) for loc in locators}
        log_dir = node.data_dir / "spool" / "log"
        assert not any((log_dir / f"{s:08d}.seg").exists() for s in segments)
        assert not [p for p in (node.data_dir / "results").rglob("*.dcm")]
        purges = [e for e in _audit(node) if e["event"] == "retention-purge"]
        assert {e["detail"]["kind"] for e in purges} == {"original", "result"}
        assert sum(e["objects"] for e in purges if e["detail"]["kind"] == "original") == len(files)
        # Reprocessing needs the study sent again. Half of it is not enough: a clear refusal, not a
        # handler run on half a series; the whole study again is processed like new.
        first_job = st["jobs"][0]["id"]
        assert storescu(node.dicom_port, files[:1]).returncode == 0
        assert node.api("POST", f"/api/studies/{ct.study_uid}/complete").status_code == 200
        refused = wait_for(lambda: next((j for j in node.study(ct.study_uid)["jobs"]
                                         if j["id"] != first_job and j["status"] == "failed"), None), 60, "refused")
        assert "retention" in refused["error"] and "send the study again" in refused["error"]
        assert storescu(node.dicom_port, ct.dicom_dir).returncode == 0
        assert node.api("POST", f"/api/studies/{ct.study_uid}/complete").status_code == 200
        wait_for(lambda: any(j["status"] == "done" and j["id"] not in (first_job, refused["id"])
                             for j in node.study(ct.study_uid)["jobs"]), 120, "reprocessed after a full re-send")


def test_index_rows_lost_to_a_power_cut_come_back_from_the_log(ct, tmp_path):
    files = sorted(ct.dicom_dir.iterdir())
    rules = write_rules(tmp_path / "rules", destinations="[orthanc]")
    with running_node(tmp_path / "data", rules, stable_after=600, **_encrypted(tmp_path)) as node:
        assert storescu(node.dicom_port, ct.dicom_dir, calling="CTSCANNER").returncode == 0
        node.stop(signal.SIGKILL)
        db = sqlite3.connect(node.data_dir / "index.db")
        before = {r[0]: r[1] for r in db.execute("SELECT sop_uid, path FROM instances")}
        assert len(before) == len(files)
        # What a power cut can take: the unsynced tail of the index's write-ahead log.
        db.execute("DELETE FROM instances WHERE sop_uid IN (SELECT sop_uid FROM instances ORDER BY sop_uid LIMIT 10)")
        db.commit()
        db.close()
        node.start()
        db = sqlite3.connect(node.data_dir / "index.db")
        after = {r[0]: r[1] for r in db.execute("SELECT sop_uid, path FROM instances")}
        assert after == before
        (ae,) = {r[0] for r in db.execute("SELECT calling_ae FROM series")}
        assert ae == "CTSCANNER"
        assert "indexed 10 instance(s) found in the spool log" in node.log_tail()


def test_deferred_appends_have_segments_of_their_own_that_are_never_zero_filled(tmp_path):
    """A retrieve's instances (appended durable=False, synced per batch) go to a segment that just grows
    as it is written, never through the pushes' zero-filled space; both share one numbering, which a
    restart continues; every record reads back and a scan of the log finds them all."""
    from node.store.segments import parse_locator

    v = Vault(tmp_path, None, writer=True)
    push = v.append(b"P" * 5000, {"calling_ae": "CT"})
    retrieved = [v.append(bytes([i]) * 70001, {"calling_ae": "PACS"}, durable=False) for i in range(3)]
    v.sync()
    push_seg = parse_locator(push)[0]
    where = [parse_locator(loc) for loc in retrieved]
    assert {seg for seg, _, _ in where} == {push_seg + 1}
    last_seg, last_off, last_len = where[-1]
    assert os.path.getsize(v.log.path(last_seg)) == last_off + last_len  # no space written ahead
    assert os.path.getsize(v.log.path(push_seg)) > parse_locator(push)[1] + parse_locator(push)[2]  # prepared ahead
    assert v.read(push) == b"P" * 5000 and [v.read(loc) for loc in retrieved] == [bytes([i]) * 70001 for i in range(3)]
    with pytest.raises(ValueError, match="deferred appends only"):
        v.deferred.append(10, lambda seg, off: b"x" * 10, durable=True)
    assert {r.locator for s in v.log.segments() for r in v.log.scan(s)} == {push, *retrieved}
    v.close()
    again = Vault(tmp_path, None, writer=True)  # a restart: new segments, numbers never reused
    loc = again.append(b"Q" * 10, {}, durable=False)
    again.sync()
    assert parse_locator(loc)[0] == push_seg + 2 and again.read(loc) == b"Q" * 10
    again.close()
