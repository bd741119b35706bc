"""DICOM SEG: exact round trip through highdicom, references, provenance, empty segments."""
from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest

from node.encoders.seg import encode_seg
from node.results import LabelMap
from tests.encoder_sources import (
    anatomy_labels,
    context,
    ct_series,
    oblique_orientation,
    save_valid,
    segment_table,
)


@pytest.fixture(scope="module", params=["axial", "oblique"])
def source(request, tmp_path_factory):
    orientation = oblique_orientation() if request.param == "oblique" else (1, 0, 0, 0, 1, 0)
    return ct_series(tmp_path_factory.mktemp(request.param), orientation=orientation, seed=request.param)


def _labelmap(series, labels=None, **kwargs) -> LabelMap:
    g = series.volume.geometry
    return LabelMap(series.series_uid, g, anatomy_labels(g.shape) if labels is None else labels,
                    segment_table(), description="CT anatomy", **kwargs)


def _decode(path, series, labelmap) -> np.ndarray:
    """Label map read back with highdicom, on the source slices, in the handler's label values."""
    seg = hd.seg.segread(path)
    numbers = list(range(1, len(labelmap.segments) + 1))
    stack = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in series.datasets],
        segment_numbers=numbers, combine_segments=False,
    )
    labels = np.zeros(stack.shape[:3], dtype=np.uint8)
    for i, s in enumerate(labelmap.segments):
        assert not np.any(labels[stack[..., i] > 0]), "segments overlap after decoding"
        labels[stack[..., i] > 0] = s.label
    return labels


def test_round_trip_is_exact(source, tmp_path):
    lm = _labelmap(source)
    ds, ref = encode_seg(lm, {source.series_uid: source}, context(), series_number=9000)
    path = save_valid(ds, tmp_path)
    assert np.array_equal(_decode(path, source, lm), lm.labels)
    assert ref.segment_numbers == {1: 1, 4: 2, 9: 3}


def test_references_codes_and_provenance(source, tmp_path):
    lm = _labelmap(source)
    ds, _ = encode_seg(lm, {source.series_uid: source}, context(), series_number=9000)
    r = pydicom.dcmread(save_valid(ds, tmp_path))
    assert r.StudyInstanceUID == source.first.StudyInstanceUID
    assert r.PatientName == source.first.PatientName and r.PatientID == source.first.PatientID
    assert r.FrameOfReferenceUID == source.first.FrameOfReferenceUID
    # OHIF needs the series reference; every frame names its source image at its position.
    assert r.ReferencedSeriesSequence[0].SeriesInstanceUID == source.series_uid
    by_uid = {d.SOPInstanceUID: d for d in source.datasets}
    for frame in r.PerFrameFunctionalGroupsSequence:
        src_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        frame_pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(frame_pos, [float(v) for v in by_uid[src_uid].ImagePositionPatient], atol=1e-3)
    for item, segment in zip(r.SegmentSequence, lm.segments):
        assert item.SegmentLabel == segment.name
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == segment.type.value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == segment.category.value
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("ct-anatomy", "1.2.0")
        params = algo.AlgorithmParameters
        assert "chest-ct-anatomy" in params and "lungnet 3.1" in params
        color = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
        assert tuple(color) == pytest.approx(segment.color, abs=2)
    assert r.Manufacturer == "Hilum" and r.SoftwareVersions
    equip = next(e for e in r.ContributingEquipmentSequence if e.Manufacturer == "Hilum")
    assert "chest-ct-anatomy" in equip.ContributionDescription and "ct-anatomy 1.2.0" in equip.ContributionDescription
    assert "lungnet 3.1" in equip.SoftwareVersions
    assert r.SeriesDescription == "AI: CT anatomy (SEG)"
    assert r.SeriesNumber == 9000


def test_empty_segment_keeps_one_frame_and_decodes_empty(source, tmp_path):
    labels = anatomy_labels(source.volume.geometry.shape)
    labels[labels == 4] = 0  # the lung is absent
    lm = _labelmap(source, labels)
    ds, _ = encode_seg(lm, {source.series_uid: source}, context(), series_number=9000)
    path = save_valid(ds, tmp_path)
    r = pydicom.dcmread(path)
    per_segment = [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                   for f in r.PerFrameFunctionalGroupsSequence]
    assert per_segment.count(2) == 1  # the placeholder frame (OHIF/Viewers#3991)
    assert np.array_equal(_decode(path, source, lm), labels)


def test_empty_frames_are_omitted(source, tmp_path):
    lm = _labelmap(source)
    ds, _ = encode_seg(lm, {source.series_uid: source}, context(), series_number=9000)
    expected = sum(int(np.any(lm.labels[k] == s.label)) for s in lm.segments for k in range(lm.labels.shape[0]))
    assert int(ds.NumberOfFrames) == expected < 3 * lm.labels.shape[0]


def test_all_empty_label_map_still_encodes(source, tmp_path):
    lm = _labelmap(source, np.zeros(source.volume.geometry.shape, dtype=np.uint8))
    ds, _ = encode_seg(lm, {source.series_uid: source}, context(), series_number=9000)
    path = save_valid(ds, tmp_path)
    assert not np.any(_decode(path, source, lm))


def test_fractional_segmentation_round_trips_within_quantisation(source, tmp_path):
    g = source.volume.geometry
    rng = np.random.default_rng(1)
    labels = anatomy_labels(g.shape)
    fractions = np.stack([(labels == s.label) * rng.uniform(0.2, 1.0, g.shape) for s in segment_table()])
    lm = _labelmap(source, labels, fractions=fractions.astype(np.float32))
    ds, _ = encode_seg(lm, {source.series_uid: source}, context(), series_number=9001, fractional=True)
    path = save_valid(ds, tmp_path)
    r = hd.seg.segread(path)
    assert r.SegmentationType == "FRACTIONAL"
    back = r.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in source.datasets], segment_numbers=[1, 2, 3],
        combine_segments=False, rescale_fractional=True)
    assert np.allclose(np.moveaxis(back, -1, 0), fractions, atol=1 / 255 / 2 + 1e-6)
    assert r.SeriesDescription == "AI: CT anatomy (SEG probability)"


def test_uids_are_deterministic(source):
    lm = _labelmap(source)
    a, _ = encode_seg(lm, {source.series_uid: source}, context(), series_number=9000)
    b, _ = encode_seg(lm, {source.series_uid: source}, context(), series_number=9000)
    c, _ = encode_seg(lm, {source.series_uid: source}, context(job_key="other"), series_number=9000)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert [s.TrackingUID for s in a.SegmentSequence] == [s.TrackingUID for s in b.SegmentSequence]
    assert a.SOPInstanceUID != c.SOPInstanceUID and a.SeriesInstanceUID != c.SeriesInstanceUID


def test_source_is_not_modified(source):
    before = [(d.PatientName, len(d)) for d in source.datasets]
    encode_seg(_labelmap(source), {source.series_uid: source}, context(), series_number=9000)
    assert [(d.PatientName, len(d)) for d in source.datasets] == before


def test_unknown_source_series_is_a_clear_error(source):
    lm = _labelmap(source)
    with pytest.raises(ValueError, match="source_series_uid"):
        encode_seg(lm, {}, context(), series_number=9000)


def test_label_map_on_another_grid_is_refused(source):
    g = source.volume.geometry
    shifted = type(g)(shape=g.shape, origin=(g.origin[0] + 5, *g.origin[1:]), spacing=g.spacing, direction=g.direction)
    lm = LabelMap(source.series_uid, shifted, anatomy_labels(g.shape), segment_table())
    with pytest.raises(ValueError, match="not the voxel grid"):
        encode_seg(lm, {source.series_uid: source}, context(), series_number=9000)


def test_missing_frame_of_reference_is_a_clear_error(tmp_path):
    series = ct_series(tmp_path, drop=("FrameOfReferenceUID",), seed="nofor")
    lm = _labelmap(series)
    with pytest.raises(ValueError, match="no FrameOfReferenceUID"):
        encode_seg(lm, {series.series_uid: series}, context(), series_number=9000)


def _overlapping(series, labels=None) -> LabelMap:
    """The body segment covers the lung and the bone too (``Segment.includes``)."""
    import dataclasses

    body, lung, bone = segment_table()
    g = series.volume.geometry
    return LabelMap(series.series_uid, g, anatomy_labels(g.shape) if labels is None else labels,
                    (dataclasses.replace(body, includes=(4, 9)), lung, bone), description="CT anatomy")


def test_a_segment_including_others_is_written_whole_and_overlapping(source, tmp_path):
    lm = _overlapping(source)
    ds, ref = encode_seg(lm, {source.series_uid: source}, context(), series_number=9000)
    path = save_valid(ds, tmp_path)  # dciodvfy: no errors
    r = hd.seg.segread(path)
    assert r.SegmentsOverlap == "YES"
    stack = r.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in source.datasets], segment_numbers=[1, 2, 3],
        combine_segments=False)
    assert np.array_equal(stack[..., 0] > 0, lm.labels > 0)  # the body, organs included
    assert np.array_equal(stack[..., 1] > 0, lm.labels == 4)
    assert np.array_equal(stack[..., 2] > 0, lm.labels == 9)
    assert ref.segment_numbers == {1: 1, 4: 2, 9: 3}


def test_an_included_segment_that_is_empty_keeps_its_placeholder_frame(source, tmp_path):
    labels = anatomy_labels(source.volume.geometry.shape)
    labels[labels == 4] = 0
    ds, _ = encode_seg(_overlapping(source, labels), {source.series_uid: source}, context(), series_number=9000)
    r = pydicom.dcmread(save_valid(ds, tmp_path))
    per_segment = [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                   for f in r.PerFrameFunctionalGroupsSequence]
    assert per_segment.count(2) == 1


def test_includes_are_validated(source):
    import dataclasses

    body, lung, bone = segment_table()
    g = source.volume.geometry
    labels = anatomy_labels(g.shape)
    with pytest.raises(ValueError, match="includes labels without a segment: \\[7\\]"):
        LabelMap(source.series_uid, g, labels, (dataclasses.replace(body, includes=(4, 7)), lung, bone))
    with pytest.raises(ValueError, match="Segment.includes"):
        dataclasses.replace(body, includes=(1,))
    with pytest.raises(ValueError, match="Segment.includes"):
        dataclasses.replace(body, includes=[4])
    with pytest.raises(ValueError, match="include others"):
        LabelMap(source.series_uid, g, labels,
                 (dataclasses.replace(body, includes=(4,)), dataclasses.replace(lung, includes=(9,)), bone))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_label_values_without_a_segment_are_refused_by_name(source, dtype):
    """The few-gaps path (labels 1..n) and np.unique's agree: a value no segment has is named."""
    g = source.volume.geometry
    labels = anatomy_labels(g.shape).astype(dtype)
    known = sorted(s.label for s in segment_table())
    LabelMap(source.series_uid, g, labels, segment_table())  # only known values: accepted
    for stray in (max(known) + 1, max(known) + 40):
        bad = labels.copy()
        bad[0, 0, 0] = stray
        with pytest.raises(ValueError, match=rf"without a segment: \[{stray}\]"):
            LabelMap(source.series_uid, g, bad, segment_table())


# -- seg_format "labelmap": the exclusive segments as a Label Map SEG, the including ones as a binary SEG --

def _as_labelmap_format(lm: LabelMap) -> LabelMap:
    import dataclasses

    return dataclasses.replace(lm, seg_format="labelmap")


def _decode_label_map_seg(path, series) -> np.ndarray:
    """The pixel values of a Label Map SEG on the source slices (its segment numbers, 0 background)."""
    r = hd.seg.segread(path)
    return r.get_pixels_by_source_instance(source_sop_instance_uids=[d.SOPInstanceUID for d in series.datasets],
                                           combine_segments=True)


def test_labelmap_format_round_trips_as_a_label_map_seg_and_a_binary_body(source, tmp_path):
    from node.encoders.seg import seg_parts

    lm = _as_labelmap_format(_overlapping(source))
    organs, body = seg_parts(lm)
    assert (organs.kind, organs.labels, body.kind, body.labels) == ("LABELMAP", (4, 9), "BINARY", (1,))
    sources = {source.series_uid: source}
    ds, ref = encode_seg(lm, sources, context(), series_number=9000, part=organs)
    path = save_valid(ds, tmp_path, "labelmap.dcm")  # dciodvfy: no errors
    r = pydicom.dcmread(path)
    assert r.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7" == ref.sop_class_uid
    assert r.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"  # JPEG-LS lossless
    assert r.SegmentationType == "LABELMAP"
    assert int(r.NumberOfFrames) == int(np.count_nonzero(np.isin(lm.labels, (4, 9)).any(axis=(1, 2))))
    described = {int(s.SegmentNumber): s.SegmentLabel for s in r.SegmentSequence if int(s.SegmentNumber)}
    assert described == {1: "Left lung", 2: "Bone"} and ref.segment_numbers == {4: 1, 9: 2}
    # Exact: each organ voxel holds its segment number, the body's own voxels are background.
    expected = np.select([lm.labels == 4, lm.labels == 9], [1, 2], 0)
    assert np.array_equal(_decode_label_map_seg(path, source), expected)

    ds, ref = encode_seg(lm, sources, context(), series_number=9001, part=body)
    path = save_valid(ds, tmp_path, "body.dcm")
    r = hd.seg.segread(path)
    assert r.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and r.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in r.SegmentSequence] == ["Body"] and ref.segment_numbers == {1: 1}
    stack = r.get_pixels_by_source_instance(source_sop_instance_uids=[d.SOPInstanceUID for d in source.datasets],
                                            segment_numbers=[1], combine_segments=False)
    assert np.array_equal(stack[..., 0] > 0, lm.labels > 0)  # the whole body, organs included


def test_labelmap_format_without_including_segments_is_one_label_map_seg(source, tmp_path):
    from node.encoders.seg import seg_parts

    lm = _as_labelmap_format(_labelmap(source))
    (part,) = seg_parts(lm)
    assert (part.kind, part.labels) == ("LABELMAP", (1, 4, 9))
    ds, _ = encode_seg(lm, {source.series_uid: source}, context(), series_number=9000)
    path = save_valid(ds, tmp_path)
    assert np.array_equal(_decode_label_map_seg(path, source), np.select([lm.labels == v for v in (1, 4, 9)],
                                                                         [1, 2, 3], 0))


def test_labelmap_format_with_an_absent_organ_and_an_empty_map(source, tmp_path):
    labels = anatomy_labels(source.volume.geometry.shape)
    labels[labels == 4] = 0  # the lung is absent: still described, no frame needed in a label map
    lm = _as_labelmap_format(_labelmap(source, labels))
    ds, _ = encode_seg(lm, {source.series_uid: source}, context(), series_number=9000)
    path = save_valid(ds, tmp_path, "absent.dcm")
    assert [s.SegmentLabel for s in pydicom.dcmread(path).SegmentSequence if int(s.SegmentNumber)] == \
        ["Body", "Left lung", "Bone"]
    assert np.array_equal(_decode_label_map_seg(path, source), np.select([labels == 1, labels == 9], [1, 3], 0))
    empty = _as_labelmap_format(_labelmap(source, np.zeros(source.volume.geometry.shape, dtype=np.uint8)))
    ds, _ = encode_seg(empty, {source.series_uid: source}, context(), series_number=9000)
    path = save_valid(ds, tmp_path, "empty.dcm")
    assert not np.any(_decode_label_map_seg(path, source))


def test_unknown_seg_format_is_refused_naming_the_field(source):
    with pytest.raises(ValueError, match="seg_format"):
        _labelmap(source, seg_format="rle")
