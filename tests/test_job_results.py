"""A job's results reach delivery one by one, as each is durable; its figures land in the history;
a job that fails after handing some results over says so."""
from __future__ import annotations

import json
import threading
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest

from node.encoders import OTHER_LANE, REPORT_LANE, SEG_LANE, EncodeTask, encode_all, encode_plan
from node.encoders.context import EncodeContext
from node.handler_api import HandlerInput, get_handler
from node.jobs.lanes import run_lanes
from node.jobs.worker import JobSpec, run_job
from node.phantom import generate_ct
from node.results import QualityFlag
from node.store.index import Index
from node.store.vault import VaultSpec
from node.volume import load_series


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return generate_ct(tmp_path_factory.mktemp("ct") / "study", seed=5, rows=64, cols=64, slices=20,
                       pixel_spacing=6.0, slice_thickness=8.0, nodules=0)


def _job(index: Index, key: str = "k1") -> int:
    return index.add_job(job_key=key, study_uid="1.2.3", series_uid="1.2.3.4", level="series", rule="r",
                         handler="ct-anatomy", params={}, destinations=["orthanc"], priority="normal",
                         timeout_s=None, generation=0, note="test")


def test_each_result_is_handed_over_when_durable_and_the_job_reports_its_phases(ct, tmp_path):
    paths = sorted(str(p) for p in ct.dicom_dir.iterdir())
    spec = JobSpec(job_id=7, job_key="stream", study_uid=ct.study_uid, rule="r", handler="ct-anatomy", params={},
                   series={ct.series_uid: paths}, results_dir=str(tmp_path / "results"),
                   vault=VaultSpec(str(tmp_path), None))
    vault = spec.vault.open()
    handed: list[tuple[dict, set[str]]] = []

    def on_result(made: list[dict]) -> None:
        (meta,) = made  # one object per encoder here
        # Durable and complete when handed over: the file reads back as the object it claims to be ...
        ds = pydicom.dcmread(BytesIO(vault.read(meta["path"])))
        assert str(ds.SOPInstanceUID) == meta["sop_instance_uid"] and ds.Modality == meta["modality"]
        # ... and handed over before the next object was written.
        handed.append((meta, {p.name for p in (tmp_path / "results" / "7").iterdir()}))

    meta, _, figures = run_job(spec, lambda f, m: None, on_result)
    # Listed in the plan's order; handed over as each lane made them (the SR after the SEG it cites).
    # ct-anatomy's SEGs: the organs' Label Map SEG and the External's binary SEG.
    assert [m["modality"] for m in meta] == ["SEG", "SEG", "RTSTRUCT", "SR"]
    assert sorted(m["modality"] for m, _ in handed) == sorted(m["modality"] for m in meta)
    assert sorted(m["sop_instance_uid"] for m, _ in handed) == sorted(m["sop_instance_uid"] for m in meta)
    assert [len(files) for _, files in handed] == [1, 2, 3, 4]
    seconds = figures["seconds"]
    for phase in ("load", "handler", "encode SEG", "write SEG", "encode RTSTRUCT", "write RTSTRUCT",
                  "encode SR", "write SR"):
        assert seconds[phase] >= 0, phase
    assert seconds["handler"] > 0 and seconds["encode SEG"] > 0
    assert set(figures["cpu_seconds"]) == set(seconds) and figures["cpu_seconds"]["handler"] > 0
    assert figures["input_volume_mb"] == pytest.approx(64 * 64 * 20 * 2 / 2**20, abs=0.05)  # int16 HU volume
    # Linux updates RSS counters lazily: the peak may read a fraction of a MB under the start figure.
    assert figures["peak_rss_mb"] >= figures["start_rss_mb"] - 2 and figures["start_rss_mb"] > 0


def test_results_handed_over_early_are_not_queued_again_when_the_job_finishes(tmp_path):
    index = Index(tmp_path / "index.db")
    job_id = _job(index)
    seg = {"sop_instance_uid": "1.9.1", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4", "series_instance_uid": "1.9",
           "modality": "SEG", "path": "/r/1.9.1.dcm"}
    sr = {**seg, "sop_instance_uid": "1.9.2", "modality": "SR", "path": "/r/1.9.2.dcm"}
    index.add_results(job_id, [seg], [("1.9.1", "orthanc")])
    (row,) = index.due_deliveries(now=1e12)
    assert row["sop_uid"] == "1.9.1" and row["kind"] == "result"
    index.delivered([row["id"]])  # the SEG is in the archive before the job ends
    index.finish_job(job_id, [seg, sr], [("1.9.2", "orthanc")], {"model": "none"}, {"seconds": {"handler": 1.5}})
    status = {d["sop_uid"]: d["status"] for d in index.deliveries_of_job(job_id)}
    assert status == {"1.9.1": "delivered", "1.9.2": "pending"}
    assert [r["sop_uid"] for r in index.results_of_job(job_id)] == ["1.9.1", "1.9.2"]
    done = json.loads(index.job(job_id)["history_json"])[-1]
    assert done["event"] == "done" and done["results"] == 2 and done["figures"]["seconds"]["handler"] == 1.5


def test_a_job_failing_after_handing_over_results_lists_them_in_its_history(tmp_path):
    index = Index(tmp_path / "index.db")
    job_id = _job(index)
    seg = {"sop_instance_uid": "1.9.1", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4", "series_instance_uid": "1.9",
           "modality": "SEG", "path": "/r/1.9.1.dcm"}
    index.add_results(job_id, [seg], [("1.9.1", "orthanc")])
    index.fail_job(job_id, "encoder failed", [seg])
    job = index.job(job_id)
    failed = json.loads(job["history_json"])[-1]
    assert job["status"] == "failed"
    assert failed["event"] == "failed" and failed["partial_results"] == [{"sop_uid": "1.9.1", "modality": "SEG"}]


def test_objects_are_made_reports_first_then_the_rest_then_the_segs_each_handed_over_at_once():
    """One encoder at a time (the GIL and two cores: side by side they were slower), in the order
    that gets every object into the archive soonest: the reports, then an RTSTRUCT (the slowest
    for the archive to store), then the SEGs; each object handed over before the next is made."""
    started: list[str] = []
    handed: list[str] = []

    def task(lane: int, kind: str) -> EncodeTask:
        def make():
            started.append(kind)
            return [kind]
        return EncodeTask(lane, kind, make)

    tasks = [task(SEG_LANE, "SEG"), task(SEG_LANE, "SEG2"), task(OTHER_LANE, "RTSTRUCT"), task(REPORT_LANE, "SR")]
    made = []
    for m in run_lanes(tasks):
        time.sleep(0.05)  # a write: the next encoder may run meanwhile, but not overtake this hand-over
        handed.append(m.kind)
        made.append(m)
    assert started == ["SR", "RTSTRUCT", "SEG", "SEG2"]
    assert [(m.kind, m.index) for m in made] == [("SR", 3), ("RTSTRUCT", 2), ("SEG", 0), ("SEG2", 1)]
    # A job's thread still writing holds the encoder back after one more object (a SEG's frames
    # are tens of MB): one in its hands, one waiting, one made and waiting to be handed over.
    started.clear()
    pending = run_lanes([task(SEG_LANE, f"SEG{n}") for n in range(5)])
    next(pending)
    deadline = time.monotonic() + 10
    while len(started) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # room to overtake, were it allowed to
    assert started == ["SEG0", "SEG1", "SEG2"]
    assert [m.kind for m in pending] == ["SEG1", "SEG2", "SEG3", "SEG4"]


def test_a_failing_encoder_stops_the_rest_and_fails_the_job():
    later: list[str] = []

    def boom():
        raise ValueError("report failed")

    tasks = [EncodeTask(SEG_LANE, "SEG", lambda: later.append("SEG") or ["seg"]),
             EncodeTask(REPORT_LANE, "SR", boom)]
    with pytest.raises(ValueError, match="report failed"):
        list(run_lanes(tasks))
    assert later == []  # the SEG, after the report, was never started
    # A consumer that stops early (its write failed) stops the encoding too, and no thread lives on.
    made = run_lanes([EncodeTask(OTHER_LANE, "RTSTRUCT", lambda: ["rt"]),
                      EncodeTask(SEG_LANE, "SEG", lambda: later.append("SEG") or ["seg"])])
    assert next(made).kind == "RTSTRUCT"
    made.close()
    assert not any(t.name == "encode" for t in threading.enumerate())


def test_the_report_is_made_without_waiting_for_the_seg_it_cites(ct):
    series = load_series(sorted(ct.dicom_dir.iterdir()))
    # The phantom is a slab: its lungs are cut (lung_truncated flags), which the node turns into
    # warnings before it encodes (node/jobs/worker.py); the results are what is encoded.
    results = [r for r in get_handler("ct-anatomy")({}).run(HandlerInput(ct.study_uid, [series]), lambda f, m: None)
               if not isinstance(r, QualityFlag)]
    ctx = EncodeContext(job_key="lanes", rule="r", handler="ct-anatomy", handler_version="1")
    tasks = encode_plan(results, {series.series_uid: series}, ctx)
    # The organs' Label Map SEG and the External's binary SEG, each a task of the SEG lane.
    assert [(t.kind, t.lane) for t in tasks] == [("SEG", SEG_LANE), ("SEG", SEG_LANE), ("RTSTRUCT", OTHER_LANE),
                                                 ("SR", REPORT_LANE)]
    (sr,) = tasks[3].make()  # before any SEG exists
    segs = [tasks[0].make()[0], tasks[1].make()[0]]
    cited = {str(r.ReferencedSOPInstanceUID) for item in sr.CurrentRequestedProcedureEvidenceSequence
             for s in item.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert {str(seg.SOPInstanceUID) for seg in segs} <= cited
    tracking = {str(s.TrackingUID) for seg in segs for s in seg.SegmentSequence}
    in_report = {str(i.UID) for i in _walk(sr) if "UID" in i and i.get("ConceptNameCodeSequence")
                 and i.ConceptNameCodeSequence[0].CodeValue == "112040"}  # Tracking Unique Identifier
    assert tracking <= in_report
    # The same report as a sequential encode_all makes (the order the tasks ran in changes nothing).
    in_order = encode_all(results, {series.series_uid: series}, ctx)[3]
    assert sr.ContentSequence == in_order.ContentSequence


def _walk(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def test_the_source_pixels_go_once_the_reports_are_made_and_the_results_are_unchanged(ct, tmp_path, monkeypatch):
    """The SR reads the CT's HU on its key slices; the SEG and RTSTRUCT only the label map. The
    worker lets the volume's pixels go once the report is made (the largest thing a job holds while
    a big SEG encodes), and every object is what a job that kept them makes."""
    import numpy as np

    import node.jobs.worker as worker
    from node.volume import ReleasedPixels

    paths = sorted(str(p) for p in ct.dicom_dir.iterdir())

    def run(out: Path) -> dict[str, bytes]:
        spec = JobSpec(job_id=9, job_key="release", study_uid=ct.study_uid, rule="r", handler="ct-anatomy",
                       params={}, series={ct.series_uid: paths}, results_dir=str(out / "results"),
                       vault=VaultSpec(str(out), None), created="2026-01-02T03:04:05")
        meta, _, _ = run_job(spec, lambda f, m: None, lambda made: events.append(made[0]["modality"]))
        vault = spec.vault.open()
        return {m["modality"]: vault.read(m["path"]) for m in meta}

    real = worker._release_pixels
    events: list[str] = []

    def release(sources):
        real(sources)
        events.append("released")
        assert all(isinstance(s.volume.array, ReleasedPixels) for s in sources.values())

    monkeypatch.setattr(worker, "_release_pixels", release)
    released = run(tmp_path / "released")
    # Once, as the SR was made: just before it was written and handed over.
    assert events.count("released") == 1 and events.index("released") == events.index("SR") - 1
    monkeypatch.setattr(worker, "_release_pixels", lambda sources: None)  # the pixels kept to the end
    kept = run(tmp_path / "kept")
    assert released == kept and set(kept) == {"SEG", "RTSTRUCT", "SR"}
    assert np.any(pydicom.dcmread(BytesIO(kept["SR"])).ContentSequence)
