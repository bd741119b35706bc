"""Delivery order on a real index: a result that becomes durable while a study's originals are
being forwarded waits for one pass of the loop (a few dozen originals), not for the whole study;
results have lanes of their own, so a small result is sent while a large one is being stored.

The destination here records the batches it is given instead of storing them: what is tested is
the loop's choice of what to send next, which no peer can observe; the real destinations' sending
is tested against Orthanc and DCMTK elsewhere (test_e2e, test_deid)."""
from __future__ import annotations

import threading
import time

from node.config import load_settings
from node.deliver.destinations import Destination
from node.deliver.loop import ORIGINALS_PER_PASS, DeliveryLoop
from node.store.index import Index
from node.store.vault import VaultSpec
from tests.test_router import T0, _instance


class Recording(Destination):
    def __init__(self, on_first_batch) -> None:
        self.batches: list[list[str]] = []
        self.on_first_batch = on_first_batch

    def send(self, items) -> set[str]:
        self.batches.append([i.kind for i in items])
        if len(self.batches) == 1:
            self.on_first_batch()  # the job's SR became durable while this batch was under way
        return {i.sop_uid for i in items}


def test_a_result_made_while_originals_are_forwarded_goes_next(tmp_path):
    settings = load_settings(data_dir=tmp_path)
    index = Index(tmp_path / "index.db")
    n = 3 * ORIGINALS_PER_PASS + 5
    index.add_instances([_instance("1.2.3", "1.2.3.1", f"1.2.3.1.{i}", T0) for i in range(n)])
    index.add_original_deliveries("1.2.3", "1.2.3.1", ["orthanc"])
    job = index.add_job(job_key="k", study_uid="1.2.3", series_uid="1.2.3.1", level="series", rule="r",
                        handler="overview", params={}, destinations=["orthanc"], priority="normal",
                        timeout_s=None, generation=0, note="test")
    sr = {"sop_instance_uid": "1.9.1", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.34",
          "series_instance_uid": "1.9", "modality": "SR", "path": "/r/1.9.1.dcm"}
    dest = Recording(lambda: index.add_results(job, [sr], [("1.9.1", "orthanc")]))
    loop = DeliveryLoop(settings, index, {"orthanc": dest}, VaultSpec(str(tmp_path), None).open())
    while loop.run_once():
        pass
    assert dest.batches[0] == ["original"] * ORIGINALS_PER_PASS
    # In the next pass, beside the next originals (a lane of its own), not after the rest of the study's
    assert ["result"] in dest.batches[1:3] and dest.batches[1:3].count(["original"] * ORIGINALS_PER_PASS) == 1
    assert sum(len(b) for b in dest.batches) == n + 1
    assert all(d["status"] == "delivered" for d in index.deliveries_of_job(job))


class Gate(Destination):
    """A destination that holds every batch until released, counting the batches under way."""

    result_lanes = 2

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.active: list[list[str]] = []
        self.most = 0

    def send(self, items) -> set[str]:
        uids = [i.sop_uid for i in items]
        with self.lock:
            self.active.append(uids)
            self.most = max(self.most, len(self.active))
        self.release.wait(60)  # a guard against a hung test, not a timing
        with self.lock:
            self.active.remove(uids)
        return set(uids)

    def under_way(self, n: int) -> bool:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.active) == n:
                    return True
            time.sleep(0.01)
        return False


def _result(uid: str) -> dict:
    return {"sop_instance_uid": uid, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.481.3", "series_instance_uid": uid,
            "modality": "RTSTRUCT", "path": f"/r/{uid}.dcm"}


def test_a_result_is_sent_while_another_result_and_originals_are_being_stored(tmp_path):
    """A job's results become due one by one while its study's originals are forwarded: each is
    sent at once in a result lane of the destination (two for Orthanc's STOW-RS), not after the
    batch under way; a third waits for a lane."""
    settings = load_settings(data_dir=tmp_path)
    index = Index(tmp_path / "index.db")
    index.add_instances([_instance("1.2.3", "1.2.3.1", f"1.2.3.1.{i}", T0) for i in range(3)])
    index.add_original_deliveries("1.2.3", "1.2.3.1", ["orthanc"])
    job = index.add_job(job_key="k", study_uid="1.2.3", series_uid="1.2.3.1", level="series", rule="r",
                        handler="ct-anatomy", params={}, destinations=["orthanc"], priority="normal",
                        timeout_s=None, generation=0, note="test")
    gate = Gate()
    loop = DeliveryLoop(settings, index, {"orthanc": gate}, VaultSpec(str(tmp_path), None).open())
    batches = loop.dispatch()
    assert len(batches) == 1 and gate.under_way(1)  # the originals, held
    started = []
    for uid in ("1.9.1", "1.9.2"):  # e.g. the SEG, then the RTSTRUCT
        index.add_results(job, [_result(uid)], [(uid, "orthanc")])
        started = loop.dispatch()
        assert [[r["sop_uid"] for r in b.rows] for b in started] == [[uid]], uid
        batches += started
    assert gate.under_way(3)  # the originals and two results stored side by side
    index.add_results(job, [_result("1.9.3")], [("1.9.3", "orthanc")])
    assert loop.dispatch() == []  # both result lanes busy: it waits
    gate.release.set()
    assert sum(b.join() for b in batches) == 5
    assert loop.run_once() == 1
    assert gate.most == 3
    assert all(d["status"] == "delivered" for d in index.deliveries_of_job(job))
