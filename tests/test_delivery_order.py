"""Delivery order on a real index: a result that becomes durable while a study's originals are
being forwarded waits for one pass of the loop (a few dozen originals), not for the whole study.

The destination here records the batches it is given instead of storing them: what is tested is
the loop's choice of what to send next, which no peer can observe; the real destinations' sending
is tested against Orthanc and DCMTK elsewhere (test_e2e, test_deid)."""
from __future__ import annotations

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
    assert dest.batches[1] == ["result"]  # next, before the rest of the study's originals
    assert sum(len(b) for b in dest.batches) == n + 1
    assert all(d["status"] == "delivered" for d in index.deliveries_of_job(job))
