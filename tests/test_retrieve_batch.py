"""Retrieved instances are made durable per retrieve (one log sync for many), never indexed before
that sync; pushes stay durable one by one. The SCP recognises a C-MOVE's sub-operations by their
Move Originator (a real pynetdicom SCU sending them, as a PACS does)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from pynetdicom import AE
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.config import load_settings
from node.receive.ingest import Ingest, Origin
from node.receive.scp import StoreSCP
from node.store.index import Index
from node.store.vault import Vault
from tests.nodeproc import free_port
from tests.pacs_peers import pacs_orthanc, tiny_study
from tests.test_pacs import dimse, local  # noqa: F401 - the in-process node with its retriever

PACS = Origin("PACS", "HILUM", "127.0.0.1", "retrieve:1")


class Counted:
    """The real vault, with its syncs counted."""

    def __init__(self, vault: Vault) -> None:
        self.vault, self.syncs = vault, 0
        self._sync = vault.sync

        def sync() -> None:
            self.syncs += 1
            self._sync()

        vault.sync = sync


@pytest.fixture
def ingest(tmp_path):
    index = Index(tmp_path / "index.db")
    ing = Ingest(index, Vault(tmp_path, None, writer=True))
    yield ing
    ing.close()
    ing.vault.close()


def _held(ing: Ingest, study_uid: str) -> set[str]:
    assert ing.writer.flush(10)
    return {r["sop_uid"] for r in ing.index.instances_of_study(study_uid)}


def test_a_retrieve_batch_is_indexed_only_after_one_sync_and_reads_back(tmp_path, ingest):
    st = tiny_study(tmp_path / "s", series=(("AX", 1.0, 5),))
    spy = Counted(ingest.vault)
    raws = [f.read_bytes() for f in st.files]
    with ingest.retrieve_batch() as batch:
        for raw in raws:
            assert ingest.store(raw, PACS, batch) == (0, "stored")
        assert ingest.store(raws[0], PACS, batch) == (0, "duplicate")  # waiting for its sync still counts
        assert _held(ingest, st.study_uid) == set() and spy.syncs == 0  # not synced: not in the index
        ingest.commit(batch)
        assert spy.syncs == 1 and _held(ingest, st.study_uid) == st.sop_uids
        ingest.commit(batch)  # nothing new: no sync
        assert spy.syncs == 1
    assert spy.syncs == 1  # leaving with nothing new in the batch does not sync either
    for row in ingest.index.instances_of_study(st.study_uid):
        assert ingest.vault.read(row["path"]) in raws
    # A store that arrives after its retrieve ended is made durable on its own, and indexed.
    late = tiny_study(tmp_path / "late", study_uid=st.study_uid, series=(("AX", 1.0, 1),))
    assert ingest.store(late.files[0].read_bytes(), PACS, batch) == (0, "stored")
    assert spy.syncs == 2 and late.sop_uids <= _held(ingest, st.study_uid)
    # A push never waits for a batch: durable (O_DSYNC) and indexed without a sync call.
    pushed = tiny_study(tmp_path / "push", series=(("AX", 1.0, 2),))
    for f in pushed.files:
        assert ingest.store(f.read_bytes(), Origin("CT1", "HILUM", "10.0.0.9"))[0] == 0
    assert spy.syncs == 2 and _held(ingest, pushed.study_uid) == pushed.sop_uids


def test_a_push_of_an_instance_a_retrieve_holds_unsynced_is_made_durable_before_it_is_answered(tmp_path, ingest):
    """Before: answered "duplicate" at once, with the retrieve's copy not yet synced; the modality
    could delete its own, and a failing retrieve sync then lost the instance."""
    st = tiny_study(tmp_path / "s", series=(("AX", 1.0, 2),))
    raws = [f.read_bytes() for f in st.files]
    spy = Counted(ingest.vault)
    modality = Origin("CT1", "HILUM", "10.0.0.9")
    with ingest.retrieve_batch() as batch:
        assert ingest.store(raws[0], PACS, batch) == (0, "stored")
        assert spy.syncs == 0
        assert ingest.store(raws[0], modality) == (0, "duplicate")
        assert spy.syncs == 1  # the held copy is durable before the push is answered

        def broken() -> None:
            raise OSError(5, "Input/output error")

        ingest.vault.sync = broken
        assert ingest.store(raws[0], modality) == (0xA700, "cannot persist: Input/output error")
        ingest.vault.sync = lambda: None
    # A push of an instance no retrieve holds does not sync for it.
    before = spy.syncs
    assert ingest.store(raws[0], modality) == (0, "duplicate")
    assert spy.syncs == before


def test_leaving_a_retrieve_batch_commits_it_even_when_the_retrieve_failed(tmp_path, ingest):
    st = tiny_study(tmp_path / "s", series=(("AX", 1.0, 3),))
    with pytest.raises(RuntimeError, match="PACS gone"):
        with ingest.retrieve_batch() as batch:
            for f in st.files:
                ingest.store(f.read_bytes(), PACS, batch)
            raise RuntimeError("PACS gone")
    assert _held(ingest, st.study_uid) == st.sop_uids  # what arrived before the failure is kept


def test_scp_routes_a_c_moves_sub_operations_to_its_retrieve_and_nothing_else(tmp_path, ingest):
    settings = load_settings(data_dir=tmp_path, dicom_host="127.0.0.1", dicom_port=free_port(), min_free_disk_mb=0)
    scp = StoreSCP(settings, ingest)
    scp.start()
    st = tiny_study(tmp_path / "s", series=(("AX", 1.0, 3),))
    mine, stranger, push = st.files
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    try:
        with ingest.retrieve_batch(("HILUM", 4242)) as batch:
            assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title="HILUM")
            assert assoc.is_established
            try:
                assert assoc.send_c_store(mine, originator_aet="HILUM", originator_id=4242).Status == 0
                # Another C-MOVE's sub-operation (another message ID) and a plain push: durable at once.
                assert assoc.send_c_store(stranger, originator_aet="HILUM", originator_id=4243).Status == 0
                assert assoc.send_c_store(push).Status == 0
            finally:
                assoc.release()
            assert _held(ingest, st.study_uid) == st.sop_uids - {_sop(mine)}  # waits for its retrieve's sync
        assert _held(ingest, st.study_uid) == st.sop_uids and batch.closed
    finally:
        scp.stop(wait_s=5)


def _sop(path: Path) -> str:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("method", ["move", "get"])
def test_an_instance_answered_early_but_not_stored_makes_the_retrieve_partial_naming_it(tmp_path, local, method):
    import pydicom

    st = tiny_study(tmp_path / "s", series=(("AX", 1.0, 4),))
    bad = pydicom.dcmread(st.files[0])
    bad.SeriesInstanceUID = "1.2.03.4"  # a leading zero: not a UID, so the ingest refuses it (quarantine)
    bad.save_as(st.files[0], enforce_file_format=True)
    with pacs_orthanc(tmp_path / "pacs") as pacs:
        pacs.upload(st.files)
        node = local({"pacs": dimse(pacs.dicom_port, retrieve=method)})
        pacs.set_node("HILUM", node.settings.dicom_port)
        spy = Counted(node.ingest.vault)
        node.retriever.start()
        rid, _ = node.store.add("pacs", st.study_uid, None, "test")
        node.retriever.wake()
        r = node.wait(rid)
        assert (r["status"], r["completed"], r["failed"], r["received"]) == ("partial", 3, 1, 3)
        assert "1 received but not stored" in r["error"] and "SeriesInstanceUID" in r["error"]
        assert json.loads(r["detail_json"])["failed_uids"] == [bad.SOPInstanceUID]
        assert node.held(st.study_uid) == st.sop_uids - {bad.SOPInstanceUID}
        assert node.index.stat("quarantined") == 1
        assert 1 <= spy.syncs < 3  # the three stored instances were made durable together


def test_the_store_queue_is_bounded_in_bytes_and_takes_one_instance_whatever_its_size():
    """The SCP's store thread holds at most ``max_bytes`` of answered instances (the receiving thread
    waits beyond it), always at least one; a failed store is named in its batch, its SOP UID read
    only then."""
    import threading

    from node.receive.batch import RetrieveBatch, StoreThread

    gate, stored = threading.Event(), []

    def store(i: int):
        def run():
            gate.wait(10)
            stored.append(i)
            return 0, "stored"
        return run

    def never() -> str:
        raise AssertionError("the SOP UID of a stored instance is not read")

    batch, queue = RetrieveBatch(), StoreThread(max_bytes=100)
    for _ in range(4):
        assert batch.begin()
    queue.put(150, never, batch, store(0))  # over the bound, but the queue is empty: taken
    second = threading.Thread(target=queue.put, args=(60, "1.2", batch, store(1)))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # 150 + 60 bytes would be over the bound: the receiving thread waits
    gate.set()
    second.join(5)
    assert not second.is_alive()
    queue.put(30, lambda: "1.3", batch, lambda: (0xA700, "disk full"))
    queue.put(30, "1.4", batch, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    queue.close()
    assert stored == [0, 1] and batch.wait_idle(1)
    assert batch.failures == [("1.3", "disk full"), ("1.4", "internal error: boom")]


def test_relaxed_commits_are_not_synced_and_the_level_comes_back(tmp_path):
    index = Index(tmp_path / "index.db")
    c = index.conn()
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with index.relaxed():
        assert c.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 2
    c.execute("PRAGMA synchronous=NORMAL")  # a connection that is NORMAL already (the index writer's) stays so
    with index.relaxed():
        pass
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 1
