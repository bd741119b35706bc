"""encode / encode_all: which objects each result becomes, series numbers, deterministic UIDs."""
from __future__ import annotations

import numpy as np
import pytest

from node.encoders import encode, encode_all, series_count
from node.results import (
    ImageSeries,
    LabelMap,
    Measurement,
    MeasurementGroup,
    MeasurementReport,
    TextFinding,
)
from tests.encoder_sources import anatomy_labels, context, ct_series, segment_table


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return ct_series(tmp_path_factory.mktemp("src"), rows=48, cols=48, slices=8)


def _labelmap(source, **kwargs):
    g = source.volume.geometry
    return LabelMap(source.series_uid, g, anatomy_labels(g.shape), segment_table(), **kwargs)


def _report(source):
    return MeasurementReport(source.series_uid, "ct-anatomy", (
        MeasurementGroup("Lung_L", "lung_left", (Measurement("volume", 12.5, "ml"),), segment_label=4),))


def test_each_result_type_picks_its_encoders(source):
    sources = {source.series_uid: source}
    ctx = context()
    assert [d.Modality for d in encode(_labelmap(source), sources, ctx)] == ["SEG", "RTSTRUCT"]
    assert [d.Modality for d in encode(_labelmap(source, encodings=("RTSTRUCT",)), sources, ctx)] == ["RTSTRUCT"]
    fractions = np.stack([(anatomy_labels(source.volume.geometry.shape) == s.label).astype(np.float32)
                          for s in segment_table()])
    with_fractions = encode(_labelmap(source, fractions=fractions), sources, ctx)
    assert [d.Modality for d in with_fractions] == ["SEG", "SEG", "RTSTRUCT"]
    assert [d.SegmentationType for d in with_fractions[:2]] == ["BINARY", "FRACTIONAL"]
    assert [d.SeriesNumber for d in with_fractions] == [9000, 9001, 9002]
    assert [d.Modality for d in encode(_report(source), sources, ctx)] == ["SR"]
    assert [d.Modality for d in encode(TextFinding("x", source.series_uid), sources, ctx)] == ["SR"]
    frames = np.zeros((3, 8, 8), dtype=np.uint8)
    assert len(encode(ImageSeries(source.series_uid, "r", frames), sources, ctx)) == 3
    with pytest.raises(TypeError, match="not a node.results type"):
        encode({"labels": 1}, sources, ctx)


def test_encode_all_orders_numbers_and_links(source):
    sources = {source.series_uid: source}
    results = [ImageSeries(source.series_uid, "r", np.zeros((1, 8, 8), dtype=np.uint8)), _report(source),
               _labelmap(source), TextFinding("other series", "2.25.1")]
    with pytest.raises(ValueError, match=r"TextFinding\.source_series_uid '2\.25\.1'"):
        encode_all(results, sources, context())
    out = encode_all(results[:3], sources, context())
    assert [d.Modality for d in out] == ["SEG", "RTSTRUCT", "SR", "OT"]
    assert [int(d.SeriesNumber) for d in out] == [9000, 9001, 9002, 9003]
    assert len({d.SeriesInstanceUID for d in out}) == 4
    assert {d.StudyInstanceUID for d in out} == {source.first.StudyInstanceUID}
    seg = out[0]
    groups = out[2].ContentSequence[-1].ContentSequence  # planar (key slice) and volumetric (SEG segment) groups
    image_refs = [i for g in groups for i in g.ContentSequence if i.ValueType == "IMAGE"]
    assert seg.SOPInstanceUID in {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in image_refs}
    assert sum(series_count(r) for r in results[:3]) == len({d.SeriesInstanceUID for d in out})


def test_series_numbers_skip_the_sources(source):
    sources = {source.series_uid: source}
    assert int(source.first.SeriesNumber) == 2
    out = encode_all([_labelmap(source)], sources, context(series_number=1))
    assert [int(d.SeriesNumber) for d in out] == [1, 3]
    shifted = encode(_report(source), sources, context(), series_offset=5)
    assert int(shifted[0].SeriesNumber) == 9005


def test_uids_are_deterministic_per_job(source):
    sources = {source.series_uid: source}
    results = [_labelmap(source), _report(source)]
    first = encode_all(results, sources, context())
    again = encode_all(results, sources, context())
    other = encode_all(results, sources, context(job_key="job-43"))
    uids = lambda out: [(d.SeriesInstanceUID, d.SOPInstanceUID) for d in out]  # noqa: E731
    assert uids(first) == uids(again)
    assert not set(uids(first)) & set(uids(other))
    assert len({u for pair in uids(first) for u in pair}) == 2 * len(first)
