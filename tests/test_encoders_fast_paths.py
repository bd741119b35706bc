"""The encoders' fast paths give what the slow, general ones gave: the SEG's overlap (told to
highdicom instead of computed by it), the RTSTRUCT's filled External (its outermost contours
instead of a filled mask traced); and a re-encoded job gives the same SEG identity."""
from __future__ import annotations

import dataclasses

import highdicom as hd
import numpy as np
import pytest
from scipy import ndimage

import node.encoders.seg as seg_module
from node.encoders.contours import Contours, outermost, packed_contours
from node.encoders.rtstruct import encode_rtstruct
from node.encoders.seg import encode_seg
from node.results import LabelMap
from tests.encoder_sources import anatomy_labels, context, ct_series, segment_table


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return ct_series(tmp_path_factory.mktemp("ct"), seed="fast")


def _labelmap(source, labels=None, includes=(4, 9)) -> LabelMap:
    g = source.volume.geometry
    body, *rest = segment_table()
    segments = (dataclasses.replace(body, includes=tuple(includes)), *rest)
    return LabelMap(source.series_uid, g, anatomy_labels(g.shape) if labels is None else labels, segments)


def _highdicom_by_itself(overlap: bool, members: dict[int, tuple[int, ...]], everything: tuple[int, ...]) -> type:
    """Plain highdicom, given overlapping segments as it documents them: a (..., segments) bool
    stack built from the segment-numbered label map; it finds the overlap itself."""

    class ByItself(hd.seg.Segmentation):
        def __init__(self, *, pixel_array, **kwargs):
            stack = np.stack([np.isin(pixel_array, members[n]) for n in sorted(members)], axis=-1)
            super().__init__(pixel_array=stack, **kwargs)

    return ByItself


@pytest.mark.parametrize("case", ["organs present", "organs absent"])
def test_known_overlap_seg_is_the_seg_highdicom_makes_by_itself(source, monkeypatch, case):
    labels = anatomy_labels(source.volume.geometry.shape)
    if case == "organs absent":
        labels = np.where(labels == 1, 1, 0).astype(np.uint8)  # the body holds nothing it includes
    lm = _labelmap(source, labels)
    fast, _ = encode_seg(lm, {source.series_uid: source}, context(), series_number=9000)
    monkeypatch.setattr(seg_module, "_with_known_overlap", _highdicom_by_itself)
    slow, _ = encode_seg(lm, {source.series_uid: source}, context(), series_number=9000)
    assert fast.SegmentsOverlap == slow.SegmentsOverlap == ("YES" if case == "organs present" else "NO")
    assert fast.PixelData == slow.PixelData and int(fast.NumberOfFrames) == int(slow.NumberOfFrames)
    assert fast.PerFrameFunctionalGroupsSequence == slow.PerFrameFunctionalGroupsSequence
    # The Dimension Organization UID derives from the job, like every other UID of the SEG.
    assert fast.DimensionOrganizationSequence == slow.DimensionOrganizationSequence


@pytest.mark.parametrize("seg_format", ["labelmap", "binary"])
def test_a_seg_made_without_highdicoms_frame_index_is_the_same_object(source, monkeypatch, seg_format):
    """The encoder's SEGs skip the frame index highdicom builds for queries: every part written is
    byte for byte the SEG highdicom's own class makes, and it copies like a data set."""
    import copy
    import datetime
    from io import BytesIO

    lm = dataclasses.replace(_labelmap(source), seg_format=seg_format)

    def written(ds) -> bytes:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    def every_part() -> list:  # a job's time fixed, or the two runs may fall in different seconds
        ctx = context(created=datetime.datetime(2026, 12, 6, 10, 0, 0))
        return [encode_seg(lm, {source.series_uid: source}, ctx, series_number=9000, part=part)[0]
                for part in seg_module.seg_parts(lm)]

    fast = every_part()
    assert len(fast) == (2 if seg_format == "labelmap" else 1)
    for ds in fast:
        assert written(copy.deepcopy(ds)) == written(ds)
    monkeypatch.setattr(seg_module, "_WrittenSegmentation", hd.seg.Segmentation)
    plain = every_part()
    assert [written(ds) for ds in fast] == [written(ds) for ds in plain]


def test_a_label_map_is_checked_as_highdicom_checks_it_without_a_copy():
    labelmap_type = hd.seg.SegmentationTypeValues.LABELMAP
    check = seg_module._WrittenSegmentation._check_and_cast_pixel_array
    pixels = np.array([[[0, 1], [2, 2]]], dtype=np.uint8)
    same, overlap = check(pixels, np.array([1, 2]), labelmap_type, np.uint8)
    assert same is pixels and overlap == hd.seg.SegmentsOverlapValues.NO  # no 79 MB copy of a CT's
    for numbers in ([1], np.array([1])):  # a value no segment describes: refused, as highdicom refuses it
        with pytest.raises(ValueError, match="lack descriptions"):
            check(pixels, numbers, labelmap_type, np.uint8)
    with pytest.raises(ValueError, match="lack descriptions"):  # numbers not 1..n: highdicom's own check
        hd.seg.Segmentation._check_and_cast_pixel_array(pixels, np.array([1, 3]), labelmap_type, np.uint8)
    with pytest.raises(ValueError, match="lack descriptions"):
        check(pixels, np.array([1, 3]), labelmap_type, np.uint8)


def _same(a: Contours, b: Contours) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("slices", "counts", "points"))


def test_external_outline_is_the_outline_of_the_mask_with_its_holes_filled():
    """``outermost`` keeps the contours of the mask with every hole filled, islands in holes gone:
    exactly what tracing the filled mask gives (background 8-connected, as the tracing has it)."""
    eight = np.zeros((3, 3, 3), dtype=bool)
    eight[1] = True
    rng = np.random.default_rng(15)
    for density in (0.3, 0.5, 0.6, 0.7):
        mask = ndimage.binary_opening(rng.random((6, 40, 47)) < density, structure=eight[1:2]) if density > 0.6 \
            else rng.random((6, 40, 47)) < density
        filled = ndimage.binary_fill_holes(mask, structure=eight)
        expected = packed_contours(filled.view(np.uint8))[1]
        got = outermost(packed_contours(mask.view(np.uint8))[1])
        assert _same(got, expected), density
    rings = np.zeros((1, 15, 15), dtype=np.uint8)
    rings[0, 1:14, 1:14], rings[0, 3:12, 3:12] = 1, 0  # a ring with a ring inside it, and an island
    rings[0, 5:10, 5:10], rings[0, 6:9, 6:9], rings[0, 7, 7] = 1, 0, 1
    traced = packed_contours(rings)[1]
    assert traced.counts.size == 5
    outline = outermost(traced)
    assert outline.counts.size == 1  # the outer ring's outline only
    assert (outline.points.min(axis=0).tolist(), outline.points.max(axis=0).tolist()) == ([0.5, 0.5], [13.5, 13.5])


def _external_points(source, labels) -> np.ndarray:
    ds = encode_rtstruct(_labelmap(source, labels), {source.series_uid: source}, context(), series_number=9001)
    names = {roi.ROINumber: roi.ROIName for roi in ds.StructureSetROISequence}
    external = next(c for c in ds.ROIContourSequence if names[c.ReferencedROINumber] == "External")
    return np.concatenate([np.asarray(c.ContourData, dtype=float) for c in external.ContourSequence])


def test_the_rtstruct_external_encloses_what_its_segment_includes_even_at_the_surface(source):
    """An organ reaching the body's surface (a lung cut by the field of view) stays inside the
    External, as in its SEG: the External is its own label and those it includes, holes filled."""
    labels = anatomy_labels(source.volume.geometry.shape)
    outline = _external_points(source, labels)
    labels = labels.copy()  # a LabelMap makes its array read-only
    organ = 4  # included by the body (see _labelmap)
    top = int(np.flatnonzero((labels == 1).any(axis=(0, 2)))[0])
    band = labels[:, top:top + 3, :]
    band[band == 1] = organ  # the body's first three rows become the organ: it now forms the surface
    assert np.array_equal(_external_points(source, labels), outline)
