"""The encoders' fast paths give what the slow, general ones gave: the SEG's overlap (told to
highdicom instead of computed by it), the RTSTRUCT's filled External (labelling instead of
repeated dilation); and a re-encoded job gives the same SEG identity."""
from __future__ import annotations

import dataclasses

import highdicom as hd
import numpy as np
import pytest
from scipy import ndimage

import node.encoders.seg as seg_module
from node.encoders.rtstruct import external_mask
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


def test_external_filled_by_labelling_equals_binary_fill_holes():
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    rng = np.random.default_rng(15)
    for density in (0.3, 0.5, 0.6, 0.7):
        labels = (rng.random((5, 24, 31)) < density).astype(np.uint8)
        expected = ndimage.binary_fill_holes(labels == 1, structure=in_plane)
        assert np.array_equal(external_mask(labels, 1), expected)
    ring = np.zeros((1, 9, 9), dtype=np.uint8)
    ring[0, 2:7, 2:7], ring[0, 3:6, 3:6] = 1, 0  # a closed ring: its inside is filled, the outside not
    assert external_mask(ring, 1)[0, 4, 4] and not external_mask(ring, 1)[0, 0, 0]
