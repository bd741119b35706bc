"""The same job encoded twice gives the same bytes, for every kind of object Hilum writes.

Every time an object carries is the job's (``EncodeContext.created``), never the clock's: the two
encodings below run in different wall-clock seconds, so any clock stamp (Hilum's or highdicom's)
shows up as a byte difference, and the job's time, a fixed day years ago, is the only date of
the encoder's own making in them.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

from node.encoders import encode_all
from node.results import (Code, DeformableRegistration, ImageSeries, LabelMap, Measurement, MeasurementGroup,
                          MeasurementReport, QuantityMap, ResampledSeries, SeriesRef, SpatialRegistration,
                          TextFinding)
from node.volume import Geometry, Volume
from tests.encoder_sources import anatomy_labels, context, ct_series, segment_table

JOB_CREATED = dt.datetime(2021, 3, 4, 5, 6, 7, 890123)
KINDS = {  # SOP Class UID -> object kind, every one of which must appear
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map SEG",
    "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.7": "SC",
    "1.2.840.10008.5.1.4.1.1.7.2": "multi-frame SC",
    "1.2.840.10008.5.1.4.1.1.66.1": "Spatial Registration",
    "1.2.840.10008.5.1.4.1.1.66.3": "Deformable Spatial Registration",
    "1.2.840.10008.5.1.4.1.1.2": "resampled CT",
    "1.2.840.10008.5.1.4.1.1.30": "Parametric Map",
}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return build_job(tmp_path_factory.mktemp("determinism"))


def build_job(root: Path):
    """Results of every kind on a fixed and a moving series (as one job's handlers would return)."""
    fixed = ct_series(root / "fixed", rows=32, cols=32, slices=12, seed="fixed")
    moving = ct_series(root / "moving", rows=32, cols=32, slices=12, seed="moving")
    g = fixed.volume.geometry
    labels = anatomy_labels(g.shape)
    fractions = np.stack([(labels == s.label).astype(np.float32) * 0.75 for s in segment_table()])
    ref = lambda s: SeriesRef(s.series_uid, str(s.first.StudyInstanceUID), str(s.first.FrameOfReferenceUID),  # noqa: E731
                              s.modality, tuple((str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in s.datasets))
    shift = np.eye(4)
    shift[:3, 3] = (1.0, -2.0, 0.5)
    grid = Geometry(shape=(3, 4, 4), origin=g.origin, spacing=(8.0, 8.0, 10.0), direction=g.direction)
    frames = np.arange(2 * 16 * 16, dtype=np.uint16).reshape(2, 16, 16).astype(np.uint8)
    results = [
        LabelMap(fixed.series_uid, g, labels, segment_table(), description="CT anatomy", fractions=fractions),
        # As ct-anatomy delivers it: the organs as a Label Map SEG (JPEG-LS), the body as a binary SEG.
        LabelMap(moving.series_uid, moving.volume.geometry, anatomy_labels(moving.volume.geometry.shape),
                 (dataclasses.replace(segment_table()[0], includes=(4, 9)), *segment_table()[1:]),
                 description="CT anatomy", encodings=("SEG",), seg_format="labelmap"),
        MeasurementReport(fixed.series_uid, "ct-anatomy", (
            MeasurementGroup("Lung_L", "lung_left", (Measurement("volume", 12.5, "ml"),), segment_label=4),)),
        TextFinding("the moving series was read too", moving.series_uid),
        ImageSeries(fixed.series_uid, "Key images", frames),
        ImageSeries(fixed.series_uid, "Cine", frames, multiframe=True),
        SpatialRegistration(ref(fixed), ref(moving), shift, "rigid"),
        DeformableRegistration(ref(fixed), ref(moving), shift, grid,
                               np.random.default_rng(1).normal(0, 1, (*grid.shape, 3)).astype(np.float32)),
        ResampledSeries(fixed.series_uid, ref(moving), Volume(moving.volume.array.copy(), g), "Moving on fixed",
                        (40.0, 400.0), "rigid"),
        # A model's uncertainty on its own coarser grid (highdicom's Parametric Map stamps the clock).
        QuantityMap(fixed.series_uid, grid, np.linspace(0.0, 1.0, int(np.prod(grid.shape)), dtype=np.float32)
                    .reshape(grid.shape), Code("ENTROPY", "99HILUM", "Normalized predictive entropy"),
                    Code("1", "UCUM", "no units"), "Uncertainty", (0.0, 1.0)),
    ]
    return results, {fixed.series_uid: fixed, moving.series_uid: moving}


def _bytes(ds) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # as the worker writes result files
    return buf.getvalue()


def _next_second() -> None:
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.02)


def _dates(ds):
    """Every DA/DT value anywhere in the dataset (sequences included), with its keyword."""
    for elem in ds.iterall():
        if elem.VR in ("DA", "DT") and elem.value:
            yield elem.keyword, str(elem.value)


def test_same_job_encoded_twice_gives_identical_bytes(job):
    results, sources = job
    first = encode_all(results, sources, context(created=JOB_CREATED))
    _next_second()  # a clock stamp, to the second or finer, now differs
    second = encode_all(results, sources, context(created=JOB_CREATED))

    assert {KINDS.get(str(ds.SOPClassUID), str(ds.SOPClassUID)) for ds in first} == set(KINDS.values())
    assert [ds.SOPInstanceUID for ds in first] == [ds.SOPInstanceUID for ds in second]
    for a, b in zip(first, second):
        assert _bytes(a) == _bytes(b), f"{KINDS[str(a.SOPClassUID)]} {a.SOPInstanceUID} differs between encodings"


def test_objects_carry_the_jobs_time_not_the_clock(job):
    results, sources = job
    today = dt.date.today().strftime("%Y%m%d")
    for ds in encode_all(results, sources, context(created=JOB_CREATED)):
        kind = KINDS[str(ds.SOPClassUID)]
        assert (ds.InstanceCreationDate, ds.InstanceCreationTime) == ("20210304", "050607"), kind
        if "ContentDate" in ds:
            assert (ds.ContentDate, ds.ContentTime) == ("20210304", "050607"), kind
        stamped = [(k, v) for k, v in _dates(ds) if v.startswith(today)]
        assert not stamped, f"{kind} carries the clock's date in {stamped}"


def test_a_later_job_gets_its_own_time(job):
    """The time is the job's, not a constant: another job's objects say when that job was made."""
    results, sources = job
    later = JOB_CREATED + dt.timedelta(days=1, hours=2)
    sr = next(ds for ds in encode_all(results[1:2], sources, context(created=later)))
    assert (sr.ContentDate, sr.ContentTime) == ("20210305", "070607")


def digests(root: Path) -> list[str]:
    """SHA-256 of every object of the job built under ``root``, in encoding order."""
    results, sources = build_job(root)
    return [hashlib.sha256(_bytes(ds)).hexdigest() for ds in encode_all(results, sources, context(created=JOB_CREATED))]


def test_another_process_encodes_the_same_bytes(tmp_path):
    """A re-run on another worker is another interpreter: other string hashes (set order), other
    memory addresses. The objects must not depend on either."""
    here = digests(tmp_path / "here")
    code = ("import json, sys; from pathlib import Path; from tests.test_encoders_deterministic import digests; "
            "print(json.dumps(digests(Path(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "PYTHONHASHSEED": "4242"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_objects_name_the_nodes_device_whichever_host_encodes_them(job):
    """A remote worker encodes with the node's device serial (handed over at its claim): every Device
    Serial Number in every object is the node's, so the bytes do not depend on the worker's host name."""
    results, sources = job
    ctx = dataclasses.replace(context(created=JOB_CREATED), device_serial="hilum-node-7")
    for ds in encode_all(results, sources, ctx):
        kind = KINDS[str(ds.SOPClassUID)]
        serials = {str(e.value) for e in ds.iterall() if e.keyword in ("DeviceSerialNumber",) and e.value}
        assert serials == {"hilum-node-7"}, f"{kind}: {serials}"
