"""RTSTRUCT: contours read back from the file and filled again match the mask; references; errors."""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from node.encoders.contours import label_contours, mask_contours
from node.encoders.rtstruct import STUDY_SOP_CLASS, encode_rtstruct, format_ds_runs, format_ds_values
from node.results import LabelMap
from node.volume import Geometry
from tests.encoder_sources import (
    anatomy_labels,
    context,
    ct_series,
    dice,
    external_truth,
    oblique_orientation,
    rasterise_even_odd,
    save_valid,
    segment_table,
)


@pytest.fixture(scope="module", params=["axial", "oblique"])
def source(request, tmp_path_factory):
    orientation = oblique_orientation() if request.param == "oblique" else (1, 0, 0, 0, 1, 0)
    return ct_series(tmp_path_factory.mktemp(request.param), orientation=orientation, seed=request.param)


@pytest.fixture(scope="module")
def written(source, tmp_path_factory):
    g = source.volume.geometry
    lm = LabelMap(source.series_uid, g, anatomy_labels(g.shape), segment_table(), description="CT anatomy")
    ds = encode_rtstruct(lm, {source.series_uid: source}, context(), series_number=9002)
    path = save_valid(ds, tmp_path_factory.mktemp("rt"))
    return lm, pydicom.dcmread(path)


def _mask_from_file(rt, roi_number: int, source) -> np.ndarray:
    """Rasterise an ROI's contours (patient mm, from the file) back onto the source grid."""
    g = source.volume.geometry
    by_uid = {d.SOPInstanceUID: k for k, d in enumerate(source.datasets)}
    per_slice: dict[int, list[np.ndarray]] = {}
    roi = next(r for r in rt.ROIContourSequence if r.ReferencedROINumber == roi_number)
    for contour in roi.get("ContourSequence", []):
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        xyz = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
        assert len(xyz) == contour.NumberOfContourPoints
        kji = g.patient_to_index(xyz)
        k = by_uid[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        assert np.allclose(kji[:, 0], k, atol=1e-3), "contour not on the plane of its referenced image"
        per_slice.setdefault(k, []).append(kji[:, 1:])
    mask = np.zeros(g.shape, dtype=bool)
    for k, polys in per_slice.items():
        mask[k] = rasterise_even_odd(polys, g.shape[1:])
    return mask


def test_contours_fill_back_to_the_mask(source, written):
    lm, rt = written
    for number, segment in enumerate(lm.segments, start=1):
        truth = lm.labels == segment.label
        if segment.rt_roi_type == "EXTERNAL":
            truth = external_truth(lm.labels, segment)
        back = _mask_from_file(rt, number, source)
        assert dice(back, truth) >= 0.98, segment.name
        # The construction is exact at pixel centres, not merely close.
        assert np.array_equal(back, truth), segment.name


def test_external_encloses_the_other_structures(source, written):
    lm, rt = written
    body = _mask_from_file(rt, 1, source)
    lung = lm.labels == 4
    assert lung.any() and body[lung].all()  # the lungs lie inside the body outline ...
    assert not body[lm.labels == 0].all()  # ... which is not everything


def test_structures_and_observations(written):
    lm, rt = written
    names = [r.ROIName for r in rt.StructureSetROISequence]
    assert names == ["External", "Lung_L", "Bone"]
    assert [list(r.ROIDisplayColor) for r in rt.ROIContourSequence] == [list(s.color) for s in lm.segments]
    types = {o.ReferencedROINumber: o.RTROIInterpretedType for o in rt.RTROIObservationsSequence}
    assert types == {1: "EXTERNAL", 2: "ORGAN", 3: "ORGAN"}
    codes = [o.RTROIIdentificationCodeSequence[0].CodeValue for o in rt.RTROIObservationsSequence]
    assert codes == [s.type.value for s in lm.segments]
    assert all(r.ROIGenerationAlgorithm == "AUTOMATIC" for r in rt.StructureSetROISequence)


def test_reference_chain(source, written):
    _, rt = written
    frame_uid = source.first.FrameOfReferenceUID
    assert rt.FrameOfReferenceUID == frame_uid
    ref_for = rt.ReferencedFrameOfReferenceSequence[0]
    assert ref_for.FrameOfReferenceUID == frame_uid
    study = ref_for.RTReferencedStudySequence[0]
    assert study.ReferencedSOPClassUID == STUDY_SOP_CLASS
    assert study.ReferencedSOPInstanceUID == source.first.StudyInstanceUID == rt.StudyInstanceUID
    series = study.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.series_uid
    images = [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence]
    assert images == [d.SOPInstanceUID for d in source.datasets]
    assert all(r.ReferencedFrameOfReferenceUID == frame_uid for r in rt.StructureSetROISequence)
    for roi in rt.ROIContourSequence:
        for c in roi.ContourSequence:
            assert c.ContourImageSequence[0].ReferencedSOPInstanceUID in images
            assert c.ContourImageSequence[0].ReferencedSOPClassUID == source.first.SOPClassUID


def test_ds_values_fit_16_characters(written):
    _, rt = written
    raw = rt.ROIContourSequence[0].ContourSequence[0]["ContourData"]
    values = [str(v) for v in raw.value]
    assert values and all(len(v) <= 16 for v in values)
    assert max(len(v) for v in format_ds_values(np.array([-98765.432109, 1e-9, -0.0])).decode().split("\\")) <= 16
    assert format_ds_values(np.array([-0.00001])) == b"0 "  # no "-0": it rounds to zero
    # To 4 decimals, without trailing zeros (nor a point with nothing after it):
    assert format_ds_values(np.array([-150.0, 12.35, 12.34567, -88.5501, 0.5])) == b"-150\\12.35\\12.3457\\-88.5501\\0.5 "


def _python_ds(value: float) -> str:
    text = ("%.4f" % round(float(value), 4)).rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


@pytest.mark.parametrize("scale", [1e-4, 1.0, 300.0, 5e3, 1e5])
def test_ds_runs_are_python_formatting_of_every_value(scale):
    """The table-driven DS text is Python's "%.4f" of each value rounded to 4 decimals, less
    trailing zeros, value for value and run for run (empty runs too), whatever the magnitudes."""
    rng = np.random.default_rng(int(scale * 10))
    values = rng.normal(0, scale, 20_000)
    values[::7] = np.round(values[::7], rng.integers(0, 5))  # fewer decimals, exact zeros after them
    values[::11] *= -1e-7  # rounds to (minus) zero
    values[::13] = np.round(values[::13] / 100) * 100  # whole numbers: no point
    counts = rng.multinomial(values.size, np.ones(40) / 40)
    counts[1] += counts[0]
    counts[0] = 0
    runs = format_ds_runs(values, counts)
    assert len(runs) == counts.size and runs[0] == b""
    start = 0
    for n, text in zip(counts, runs):
        expected = "\\".join(_python_ds(v) for v in values[start:start + n]).encode("ascii")
        assert text == expected + b" " * (len(expected) % 2)
        start += n


def test_ds_runs_across_blocks_are_each_runs_own_text():
    """Runs are made in blocks of whole runs (some 64 Ki values; a longer run alone): every run's
    text is the same whichever block it falls in, runs of no values included."""
    rng = np.random.default_rng(11)
    counts = [int(n) for n in rng.integers(0, 300, 600)] + [100_000, 0, 65_536, 1]
    rng.shuffle(counts)
    values = rng.normal(0, 300, sum(counts))
    runs = format_ds_runs(values, counts)
    assert len(runs) == len(counts)
    start = 0
    for n, text in zip(counts, runs):
        assert text == format_ds_values(values[start:start + n]) if n else text == b""
        start += n
    assert runs[counts.index(100_000)].count(b"\\") == 100_000 - 1


def test_provenance_and_study_placement(source, written):
    _, rt = written
    assert rt.Modality == "RTSTRUCT" and rt.SeriesNumber == 9002
    assert rt.SeriesDescription == "AI: CT anatomy (RTSTRUCT)"
    assert rt.PatientID == source.first.PatientID and rt.AccessionNumber == source.first.AccessionNumber
    equip = rt.ContributingEquipmentSequence[0]
    assert equip.Manufacturer == "Hilum" and "chest-ct-anatomy" in equip.ContributionDescription
    assert rt.ApprovalStatus == "UNAPPROVED"


def test_empty_structure_is_an_roi_without_contours(source, tmp_path):
    g = source.volume.geometry
    labels = anatomy_labels(g.shape)
    labels[labels == 9] = 0
    lm = LabelMap(source.series_uid, g, labels, segment_table())
    rt = pydicom.dcmread(save_valid(encode_rtstruct(lm, {source.series_uid: source}, context(), series_number=9002),
                                    tmp_path))
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["External", "Lung_L", "Bone"]
    assert "ContourSequence" not in rt.ROIContourSequence[2]


def test_irregular_slice_spacing_is_refused(tmp_path):
    offsets = [0, 2.5, 5, 7.5, 12.5, 15, 17.5]  # one slice missing: a 5 mm gap
    series = ct_series(tmp_path, slices=len(offsets), z_offsets=offsets, seed="gap")
    assert series.volume is None
    # The regular grid a careless handler might have assumed for this series:
    g = Geometry(shape=(len(offsets), 64, 64), origin=(-25.0, -30.0, -40.0), spacing=(0.8, 0.8, 2.5),
                 direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    lm = LabelMap(series.series_uid, g, anatomy_labels(g.shape), segment_table())
    with pytest.raises(ValueError, match="irregular slice spacing"):
        encode_rtstruct(lm, {series.series_uid: series}, context(), series_number=9002)


def test_missing_frame_of_reference_is_refused(tmp_path):
    series = ct_series(tmp_path, drop=("FrameOfReferenceUID",), seed="nofor")
    g = series.volume.geometry
    lm = LabelMap(series.series_uid, g, anatomy_labels(g.shape), segment_table())
    with pytest.raises(ValueError, match="FrameOfReferenceUID"):
        encode_rtstruct(lm, {series.series_uid: series}, context(), series_number=9002)


def test_contour_tracer_is_exact_on_random_masks():
    rng = np.random.default_rng(7)
    for _ in range(25):
        mask = rng.random((2, 23, 17)) < rng.uniform(0.1, 0.9)
        contours = mask_contours(mask)
        for k in range(mask.shape[0]):
            back = rasterise_even_odd([p for kk, p in contours if kk == k], mask.shape[1:])
            assert np.array_equal(back, mask[k])


def test_contour_tracer_is_exact_on_masks_in_part_of_the_field():
    """Each chunk is traced within the rows and columns its masks occupy: structures anywhere in
    the field, slices with nothing, a chunk ending mid-structure, still fill back exactly."""
    rng = np.random.default_rng(8)
    for _ in range(40):
        mask = np.zeros((int(rng.integers(1, 9)), 30, 26), dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            k0, r0, c0 = (int(rng.integers(0, n)) for n in mask.shape)
            k1, r1, c1 = k0 + int(rng.integers(1, 4)), r0 + int(rng.integers(1, 12)), c0 + int(rng.integers(1, 12))
            mask[k0:k1, r0:r1, c0:c1] |= rng.random(mask[k0:k1, r0:r1, c0:c1].shape) < 0.7
        contours = mask_contours(mask, chunk=int(rng.integers(1, 4)))
        for k in range(mask.shape[0]):
            back = rasterise_even_odd([p for kk, p in contours if kk == k], mask.shape[1:])
            assert np.array_equal(back, mask[k])


def test_contour_tracer_counts_islands_and_holes():
    mask = np.zeros((1, 12, 20), dtype=bool)
    mask[0, 1:11, 1:9] = True
    mask[0, 4:7, 3:6] = False  # one hole
    mask[0, 2:5, 12:15] = True  # a second island
    mask[0, 8:12, 16:20] = True  # a third, touching the border
    polygons = [p for _, p in mask_contours(mask)]
    assert len(polygons) == 4
    # Straight runs are merged: a rectangle needs 8 vertices (its corners are cut by marching squares).
    assert sorted(len(p) for p in polygons) == [8, 8, 8, 8]
    assert label_contours(np.zeros((2, 3, 3), dtype=np.uint8)) == {}


def test_prepared_contour_data_survives_implicit_vr(source, tmp_path):
    """ContourData is handed to pydicom pre-encoded; a C-STORE in Implicit VR must still carry it."""
    from pynetdicom.dsutils import decode, encode

    g = source.volume.geometry
    lm = LabelMap(source.series_uid, g, anatomy_labels(g.shape), segment_table())
    ds = encode_rtstruct(lm, {source.series_uid: source}, context(), series_number=9002)
    explicit = pydicom.dcmread(save_valid(ds, tmp_path))
    implicit = decode(io.BytesIO(encode(ds, True, True)), True, True)
    points = lambda rt: [[float(v) for v in c.ContourData] for r in rt.ROIContourSequence  # noqa: E731
                         for c in r.get("ContourSequence", [])]
    assert points(implicit) == points(explicit) and len(points(explicit)) > 10
    # The series' list of images is prepared the same way
    images = lambda rt: [i.ReferencedSOPInstanceUID for i in rt.ReferencedFrameOfReferenceSequence[0]  # noqa: E731
                         .RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence]
    assert images(implicit) == images(explicit) == [d.SOPInstanceUID for d in source.datasets]


def test_labels_and_masks_traced_together_as_each_alone():
    """One pass traces every label and mask of a volume (packed_contours): each one's polygons,
    vertex for vertex and in the same order, are those of its own mask traced alone, whatever
    the label type, the labels skipped or the slices per chunk."""
    from node.encoders.contours import packed_contours

    rng = np.random.default_rng(4)
    for n in range(30):
        shape = (int(rng.integers(1, 6)), int(rng.integers(1, 25)), int(rng.integers(1, 25)))
        top = 40 if n % 5 == 0 else 6
        dtype = (np.uint8, np.uint16, np.int32)[n % 3]
        labels = (rng.integers(0, top + 1, size=shape) * (rng.random(shape) < rng.uniform(0.2, 0.95))).astype(dtype)
        outline = rng.random(shape) < rng.uniform(0.1, 0.9)
        skip = frozenset({int(rng.integers(0, 5))})
        both = label_contours(labels, chunk=int(rng.integers(1, 4)), skip=skip, masks={1000: outline})
        alone = {int(v): mask_contours(labels == v) for v in np.unique(labels) if v and int(v) not in skip}
        alone[1000] = mask_contours(outline)
        alone = {key: polygons for key, polygons in alone.items() if polygons}
        assert sorted(both) == sorted(alone), n
        for key, polygons in alone.items():
            assert [k for k, _ in both[key]] == [k for k, _ in polygons], (n, key)
            assert all(np.array_equal(p, q) for (_, p), (_, q) in zip(both[key], polygons)), (n, key)
        packed = packed_contours(labels, skip=skip, masks={1000: outline})
        assert {key: c.polygons() for key, c in packed.items()}.keys() == both.keys()
    with pytest.raises(ValueError, match="mask keys"):  # a mask under a label's key would mix the two
        packed_contours(np.ones((1, 3, 3), np.uint8), masks={1: np.ones((1, 3, 3), bool)})
