"""DICOM Segmentation (highdicom): one segment per label, binary, label map or fractional.

``LabelMap.seg_format`` chooses the SEG objects (``seg_parts``):

- "binary": one SEG of every segment, a bit-packed frame per segment and slice. A label map whose
  segments overlap (``Segment.includes``: an External holding the organs it contains) is written
  as one mask per segment, SegmentsOverlap YES.
- "labelmap": the exclusive segments (those that include no other) as one Label Map
  Segmentation (SOP class 1.2.840.10008.5.1.4.1.1.66.7): one frame per slice holding each
  pixel's segment number, JPEG-LS lossless. For ct-anatomy at 512x512x300 that is 1 MB instead
  of 32 MB of bit frames, and less CPU to make (docs/benchmarks.md seg-formats). A label map
  cannot overlap, so the segments that include others (the External) go in a second, binary SEG
  of their own, whole: the External stays the entire body, as its code says.

Empty slices are left out (omit_empty_frames), which keeps a 10-structure SEG of a 300-slice
CT small. A segment that is empty everywhere would then have no frame at all, which older OHIF
releases cannot load (OHIF/Viewers#3991, the loader hangs): such a segment gets one empty frame.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.spatial import get_image_coordinate_system
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, SegmentationStorage

from node.encoders.common import (
    MODEL_NAME,
    algorithm_identification,
    choose_charset,
    clip_text,
    coded,
    contributing_equipment,
    copy_patient_study,
    header_views,
    job_time,
    labelmap_texts,
    pixels_per_slice,
    series_description,
    settle_encoding,
    source_grid,
    source_series,
)
from node.encoders.context import EncodeContext
from node.results import LabelMap
from node.volume import SeriesData, lookup

__all__ = ["LABELMAP_SEGMENTATION_STORAGE", "SegPart", "SegReference", "encode_seg", "seg_parts", "seg_reference"]

LABELMAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage


@dataclass(frozen=True)
class SegPart:
    """One SEG object of a label map: its type (BINARY or LABELMAP) and the labels of its segments,
    numbered 1.. in that order."""

    kind: str
    labels: tuple[int, ...]

    @property
    def sop_class_uid(self) -> str:
        return LABELMAP_SEGMENTATION_STORAGE if self.kind == "LABELMAP" else str(SegmentationStorage)


def seg_parts(labelmap: LabelMap) -> tuple[SegPart, ...]:
    """The SEG objects ``labelmap`` is written as, per its ``seg_format`` (module docstring)."""
    every = tuple(s.label for s in labelmap.segments)
    if labelmap.seg_format == "binary":
        return (SegPart("BINARY", every),)
    # Never empty: a segment's includes are segments that include nothing themselves.
    exclusive = tuple(s.label for s in labelmap.segments if not s.includes)
    covering = tuple(s.label for s in labelmap.segments if s.includes)
    return (SegPart("LABELMAP", exclusive),) + ((SegPart("BINARY", covering),) if covering else ())


@dataclass(frozen=True, eq=False)
class SegReference:
    """What an SR needs to point at the segments of a SEG made in the same job. All of it is
    known before the SEG is encoded (its UIDs derive from the job), so a report is made, written
    and delivered without waiting for a big SEG."""

    labelmap: LabelMap
    source_series_uid: str
    study_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    segment_numbers: dict[int, int]  # LabelMap label -> SEG segment number
    tracking_uids: dict[int, str]  # LabelMap label -> the segment's Tracking UID
    sop_class_uid: str = SegmentationStorage

    def __contains__(self, label: int) -> bool:
        return label in self.segment_numbers

    def tracking_uid(self, label: int) -> str:
        return self.tracking_uids[label]

    def evidence(self) -> Dataset:
        """The SEG as SR evidence lists it (its study, series and SOP identity)."""
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = self.study_uid, self.series_instance_uid
        ds.SOPClassUID, ds.SOPInstanceUID = self.sop_class_uid, self.sop_instance_uid
        return ds


def seg_reference(labelmap: LabelMap, sources: dict[str, SeriesData], ctx: EncodeContext, *,
                  series_number: int, part: SegPart | None = None) -> SegReference:
    """The reference to the SEG ``encode_seg`` makes of ``labelmap`` (its ``part``, the first of
    ``seg_parts`` by default) with ``series_number``."""
    series = source_series(sources, labelmap.source_series_uid, "LabelMap")
    part = part or seg_parts(labelmap)[0]
    uid_key = ("SEG", series_number)
    return SegReference(
        labelmap=labelmap, source_series_uid=series.series_uid, study_uid=str(series.first.StudyInstanceUID),
        series_instance_uid=ctx.uid(*uid_key, "series"), sop_instance_uid=ctx.uid(*uid_key, "instance", 1),
        segment_numbers={label: n for n, label in enumerate(part.labels, start=1)},
        tracking_uids={label: labelmap.segment(label).tracking_uid or ctx.uid(*uid_key, "segment", label)
                       for label in part.labels},
        sop_class_uid=part.sop_class_uid,
    )


def _content_label(handler: str) -> str:
    # ContentLabel is CS: upper case, digits, space and underscore, at most 16 characters.
    label = "".join(ch if ch.isalnum() and ch.isascii() else "_" for ch in handler.upper())[:16]
    return label if label and label[0].isalpha() else "HILUM_SEG"


def _segment_descriptions(labelmap: LabelMap, ctx: EncodeContext, uid_key: tuple,
                          labels: tuple[int, ...] | None = None) -> list[hd.seg.SegmentDescription]:
    """The descriptions of the segments ``labels`` (all by default), numbered 1.. in that order."""
    algorithm = algorithm_identification(ctx)
    chosen = labelmap.segments if labels is None else [labelmap.segment(label) for label in labels]
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=s.name,
            segmented_property_category=coded(s.category),
            segmented_property_type=coded(s.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=s.tracking_uid or ctx.uid(*uid_key, "segment", s.label),
            tracking_id=clip_text(s.tg263 or s.name, 64),
            display_color=hd.color.CIELabColor.from_rgb(*s.color),
        )
        for number, s in enumerate(chosen, start=1)
    ]


def _segment_number_array(labels: np.ndarray, numbers: dict[int, int]) -> np.ndarray:
    """Label values -> consecutive segment numbers 1..n (highdicom's label-map input)."""
    if all(label == number for label, number in numbers.items()):
        return labels  # already numbered 1..n: no copy of a possibly large volume
    out = np.zeros_like(labels)
    for label, number in numbers.items():
        out[labels == label] = number
    return out


def _segment_members(labelmap: LabelMap, numbers: dict[int, int]) -> dict[int, tuple[int, ...]]:
    """Segment number -> the segment numbers of the label-map values it covers (its own, plus
    those it ``includes``)."""
    return {numbers[s.label]: tuple(sorted(numbers[lab] for lab in {s.label, *s.includes}))
            for s in labelmap.segments}


def _label_map_pixels(labels: np.ndarray, numbers: dict[int, int]) -> np.ndarray:
    """Label values -> the LABELMAP SEG's segment numbers, 0 for every other value (the External's
    own label, body outside the organs, is background there)."""
    lut = np.zeros(max(256, int(labels.max(initial=0)) + 1), dtype=np.uint8)
    for label, number in numbers.items():
        lut[label] = number
    # One pass, one uint8 volume, no per-segment masks.
    return lookup(lut, labels)


class _WrittenSegmentation(hd.seg.Segmentation):
    """highdicom's Segmentation as an encoder uses it: made, then written, never queried. Its
    constructor ends by indexing every frame for later queries (the segment, source frame and
    dimension index of each, 0.05 CPU s for a 300-frame SEG); only the attributes the rest of
    construction expects are set here. highdicom is pinned (pyproject)."""

    def _build_luts(self) -> None:
        self._file_reader = None
        self._coordinate_system = get_image_coordinate_system(self)

    @classmethod
    def _check_and_cast_pixel_array(cls, pixel_array, segment_numbers, segmentation_type, dtype):
        """highdicom's checks of a label map already in the SEG's type, without its copy of it
        (``astype`` copies even to the same type: 79 MB for a 512x512x300 CT, the largest thing
        a ct-anatomy job then held). Segments numbered 1..n, as every node SEG has them, need only
        the largest value checked; anything else goes to highdicom."""
        numbers = np.asarray(segment_numbers)
        if (segmentation_type == hd.seg.SegmentationTypeValues.LABELMAP and isinstance(pixel_array, np.ndarray)
                and pixel_array.ndim == 3 and pixel_array.dtype == np.dtype(dtype)
                and np.array_equal(np.sort(numbers), np.arange(1, numbers.size + 1))):
            if int(pixel_array.max(initial=0)) > numbers.size:
                raise ValueError("Pixel array contains segments that lack descriptions.")
            return pixel_array, hd.seg.SegmentsOverlapValues.NO
        return super()._check_and_cast_pixel_array(pixel_array, segment_numbers, segmentation_type, dtype)

    # Copied and pickled as any data set: highdicom's own state methods carry the index (an
    # in-memory SQLite database) this class does not build.
    def __getstate__(self) -> dict:
        return self.__dict__.copy()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def _with_known_overlap(overlap: bool, members: dict[int, tuple[int, ...]],
                        everything: tuple[int, ...]) -> type[hd.seg.Segmentation]:
    """highdicom's Segmentation taking the segment-numbered label map of overlapping segments.

    highdicom wants overlapping segments as a (slices, rows, cols, segments) bool stack: 5 bytes a
    voxel for a five-structure CT (390 MB at 512x512x300, and a second to fill), then sums it into
    an int64 volume to learn whether the segments overlap. Here it keeps the label map, told the
    overlap up front, and each frame's mask is made from the label map's plane as highdicom
    encodes that frame: the same frames, bit for bit, with no volume-sized copy.

    ``members``: SEG segment number -> the pixel values it covers; ``everything``: every nonzero
    pixel value (a segment covering all of them is the label map's nonzero pixels)."""
    value = hd.seg.SegmentsOverlapValues.YES if overlap else hd.seg.SegmentsOverlapValues.NO

    class KnownOverlap(_WrittenSegmentation):
        @classmethod
        def _check_and_cast_pixel_array(cls, pixel_array, segment_numbers, segmentation_type, dtype):
            if pixel_array.ndim != 3 or pixel_array.dtype.kind != "u":
                raise ValueError("KnownOverlap takes a (slices, rows, cols) segment-numbered label map")
            return pixel_array, value

        @staticmethod
        def _get_segment_pixel_array(pixel_array, segment_number, described_segment_numbers, segmentation_type,
                                     max_fractional_value, dtype):
            wanted = members[segment_number]
            if len(wanted) == 1:
                mask = pixel_array == wanted[0]
            elif wanted == everything:  # a body outline holding every organ
                mask = pixel_array != 0
            else:
                mask = np.isin(pixel_array, wanted)
            return mask.astype(dtype)

    return KnownOverlap


def _add_placeholder_frames(seg: hd.seg.Segmentation, empty: list[int]) -> None:
    """Give each segment in ``empty`` one all-zero frame, a copy of frame 1's position and references."""
    frames = int(seg.NumberOfFrames)
    rows, cols = int(seg.Rows), int(seg.Columns)
    bits = int(seg.BitsAllocated)
    template = seg.PerFrameFunctionalGroupsSequence[0]
    pointers = [int(d.DimensionIndexPointer) for d in seg.DimensionIndexSequence]
    segment_axis = pointers.index(0x0062000B)  # the ReferencedSegmentNumber dimension
    for number in empty:
        item = copy.deepcopy(template)
        item.SegmentIdentificationSequence[0].ReferencedSegmentNumber = number
        content = item.FrameContentSequence[0]
        index = list(content.DimensionIndexValues) if content["DimensionIndexValues"].VM > 1 else [
            content.DimensionIndexValues]
        index[segment_axis] = number
        content.DimensionIndexValues = index
        seg.PerFrameFunctionalGroupsSequence.append(item)
    # Native pixel data: frames are packed back to back (1 bit per pixel for BINARY), so the
    # new frames are zero bits after the existing ones; the data ends on an even byte boundary.
    total = frames + len(empty)
    used = (frames * rows * cols * bits + 7) // 8
    needed = (total * rows * cols * bits + 7) // 8
    data = bytes(seg.PixelData)[:used] + bytes(needed - used + (needed % 2))
    seg.PixelData = data
    seg.NumberOfFrames = total


def _drop_background_segment(seg: hd.seg.Segmentation) -> None:
    """Remove the "Background" item (Segment Number 0) highdicom puts first in a Label Map SEG's
    Segment Sequence. The standard does not require it (pixel value 0 is background either way),
    and OHIF 3.12 takes the sequence's items in order as segments 1, 2, ...: with it, each label
    was drawn in the next segment's colour and the first segment not at all (the browser test)."""
    seg.SegmentSequence = [item for item in seg.SegmentSequence if int(item.SegmentNumber) != 0]


def encode_seg(
    labelmap: LabelMap,
    sources: dict[str, SeriesData],
    ctx: EncodeContext,
    *,
    series_number: int,
    fractional: bool = False,
    part: SegPart | None = None,
) -> tuple[Dataset, SegReference | None]:
    """The SEG ``part`` (``seg_parts``; the first by default) of ``labelmap``, or a fractional SEG of
    every segment of ``labelmap.fractions``, on its source series; and the reference an SR cites
    (None for a fractional SEG, which a report does not point at)."""
    what = "LabelMap"
    series = source_series(sources, labelmap.source_series_uid, what)
    source_grid(series, labelmap, what)
    if any("ImagePositionPatient" in ds and "FrameOfReferenceUID" not in ds for ds in series.datasets):
        raise ValueError(f"{what}: source series {series.series_uid} has patient positions but no FrameOfReferenceUID")
    kind = "FSEG" if fractional else "SEG"
    uid_key = (kind, series_number)
    every = tuple(s.label for s in labelmap.segments)
    part = SegPart("FRACTIONAL", every) if fractional else (part or seg_parts(labelmap)[0])
    numbers = {label: n for n, label in enumerate(part.labels, start=1)}  # label -> this SEG's segment number
    segmentation_class = _WrittenSegmentation
    syntax = ExplicitVRLittleEndian
    present: list[bool] = []  # BINARY only: which segments have a frame (the others get a placeholder)
    if fractional:
        if labelmap.fractions is None:
            raise ValueError("LabelMap.fractions is None: no fractional SEG to encode")
        if np.isnan(labelmap.fractions).any():
            raise ValueError("LabelMap.fractions holds NaN: probabilities must be numbers in [0, 1]")
        pixels = np.moveaxis(labelmap.fractions, 0, -1)  # (slices, rows, cols, segments), a view
        present = [bool(np.any(labelmap.fractions[i])) for i in range(len(labelmap.segments))]
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    elif part.kind == "LABELMAP":
        # Frames per slice, not per segment: a segment with no pixel needs no frame of its own.
        pixels = _label_map_pixels(labelmap.labels, numbers)
        seg_type = hd.seg.SegmentationTypeValues.LABELMAP
        syntax = JPEGLSLossless
    else:
        # Pixel values number every label of the map; each segment of this SEG covers some of them.
        values = {label: n for n, label in enumerate(every, start=1)}
        pixels = _segment_number_array(labelmap.labels, values)
        per_slice = pixels_per_slice(labelmap.labels, ctx)  # the report's counts, when it came first
        counts = np.zeros(len(values) + 1, dtype=np.int64)  # pixels per value of ``pixels``
        for label, number in values.items():
            counts[number] = int(per_slice[label].sum()) if label in per_slice else 0
        counts[0] = labelmap.labels.size - counts[1:].sum()
        seg_type = hd.seg.SegmentationTypeValues.BINARY
        covered = _segment_members(labelmap, values)
        members = {numbers[label]: covered[values[label]] for label in part.labels}
        present = [any(counts[m] for m in members[n]) for n in range(1, len(numbers) + 1)]
        if labelmap.overlapping or part.labels != every:
            # Two segments share a voxel when a present value is covered by both.
            shared = Counter(m for ms in members.values() for m in ms if counts[m])
            overlap = any(c > 1 for c in shared.values())
            segmentation_class = _with_known_overlap(overlap, members, tuple(range(1, len(values) + 1)))
    description = series_description(labelmap.description, "SEG" if not fractional else "SEG probability")
    texts = [description, *labelmap_texts(labelmap)]
    seg = segmentation_class(
        source_images=header_views(series, ctx),
        pixel_array=pixels,
        segmentation_type=seg_type,
        segment_descriptions=_segment_descriptions(labelmap, ctx, uid_key, part.labels),
        series_instance_uid=ctx.uid(*uid_key, "series"),
        series_number=series_number,
        sop_instance_uid=ctx.uid(*uid_key, "instance", 1),
        instance_number=1,
        manufacturer=ctx.manufacturer,
        manufacturer_model_name=MODEL_NAME,
        software_versions=ctx.software_version,
        device_serial_number=ctx.device_serial,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        content_description=clip_text(labelmap.description, 64),
        content_label=_content_label(ctx.handler),
        series_description=description,
        contributing_equipment=[contributing_equipment(ctx)],
        omit_empty_frames=True,
        transfer_syntax_uid=syntax,
        specific_character_set=None,  # set by copy_patient_study
    )
    # highdicom draws a random Dimension Organization UID; one derived from the job keeps a
    # re-encoded job's SEG the same object, as its other UIDs are.
    dimension_uid = ctx.uid(*uid_key, "dimension-organization")
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimension_uid
    if any(present) and not all(present):
        _add_placeholder_frames(seg, [n for n, p in enumerate(present, start=1) if not p])
    if part.kind == "LABELMAP":
        _drop_background_segment(seg)
    copy_patient_study(seg, series.first, choose_charset(series.first, texts, ctx))
    job_time(seg, ctx)
    reference = None if fractional else seg_reference(labelmap, sources, ctx, series_number=series_number, part=part)
    return settle_encoding(seg), reference
