"""RT Structure Set written directly with pydicom (rt-utils leaves out the Frame of Reference in
places and writes DS values longer than 16 characters, which dciodvfy and some TPS reject).

One ROI per segment, named by its TG-263 name where it has one; an EXTERNAL structure is the
body outline with what it encloses filled in (``contours.outermost``). Contours are CLOSED_PLANAR
polygons in patient coordinates on the source slices; a hole is a further contour inside its
island on the same plane, which planning systems combine with the even-odd rule. Each contour
references its image, and the structure set carries the full chain Frame of Reference → study →
series → every image.
"""
from __future__ import annotations

import struct

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import RTStructureSetStorage

from node.encoders.common import (
    MODEL_NAME,
    choose_charset,
    clip_text,
    contributing_equipment,
    copy_patient_study,
    labelmap_texts,
    new_instance,
    series_description,
    source_grid,
    source_series,
)
from node.encoders.context import EncodeContext
from node.encoders.contours import Contours, outermost, packed_contours
from node.results import LabelMap
from node.volume import Geometry, SeriesData

__all__ = ["encode_rtstruct", "format_ds_runs", "format_ds_values"]

# RT Referenced Study Sequence items reference the study through this (retired, still
# universally used) SOP Class: Detached Study Management.
STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
_CONTOUR_SEQUENCE = Tag(0x3006, 0x0040)
_CONTOUR_IMAGE_SEQUENCE = Tag(0x3006, 0x0016)
# DS text in 32-bit words of ASCII (little-endian: the first character in the lowest byte):
# "0000".."9999" for the whole part; the four decimals t (0..9999) with the point before and the
# separator after, ".dddd\\" and two unused bytes, as one 64-bit word; how many characters of
# ".dddd" a value leaves out (its trailing zeros, and the point with them when t is 0); and how
# many digits a whole part below 10 000 has.
_FOUR_DIGITS = np.frombuffer(b"".join(b"%04d" % n for n in range(10000)), dtype="<u4").astype(np.uint32)
_TAIL_TEXT = np.frombuffer(b"".join(b".%04d\\\0\0" % t for t in range(10000)), dtype="<u8").astype(np.uint64)
_TAIL_CUT = np.array([5 if t == 0 else 4 - len((b"%04d" % t).rstrip(b"0")) for t in range(10000)], dtype=np.int64)
_WHOLE_DIGITS = np.array([len(str(n)) for n in range(10000)], dtype=np.int64)


def format_ds_values(values: np.ndarray) -> bytes:
    """Backslash-separated DS text to 4 decimals (0.1 µm) without trailing zeros, at most 16
    characters per value."""
    return format_ds_runs(values, [np.asarray(values).size])[0]


def format_ds_runs(values: np.ndarray, counts) -> list[bytes]:
    """``format_ds_values`` of consecutive runs of ``values`` (``counts`` values each), each run's
    text padded to an even length. A structure set has millions of coordinates in tens of
    thousands of contours, so the text is made for all of them at once in NumPy (Python's "%.4f"
    on each number took a fifth of the whole encoder's time): each value a row of a byte matrix,
    its characters ending at a fixed column, filled from tables a 32- or 64-bit word at a time;
    its separator moved up to its last character; the rows' used characters read out in one go,
    then cut per run. The bytes are "%.4f" of the value rounded to 4 decimals, less its trailing
    zeros (and its point when nothing is left after it), without a minus sign on a value that
    rounds to zero.

    The runs are made a block of whole runs at a time, some 64 Ki values (a longer run alone):
    each block's arrays stay under 1 MB, which a job worker takes from its heap again and again,
    where a whole ROI's were tens of MB mapped afresh (node/jobs/worker.py)."""
    flat = np.asarray(values, dtype=float).ravel()
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != flat.size:
        raise ValueError(f"format_ds_runs: runs of {int(counts.sum())} values given {flat.size}")
    ends = np.cumsum(counts)
    out: list[bytes] = []
    first_run = 0
    while first_run < counts.size:
        start = int(ends[first_run - 1]) if first_run else 0
        stop_run = max(first_run + 1, int(np.searchsorted(ends, start + _DS_BLOCK, side="right")))
        out += _format_block(flat[start:int(ends[stop_run - 1])], counts[first_run:stop_run])
        first_run = stop_run
    return out


_DS_BLOCK = 1 << 16


def _format_block(flat: np.ndarray, counts: np.ndarray) -> list[bytes]:
    """``format_ds_runs`` of one block of runs (``counts`` summing to ``flat.size``)."""
    if flat.size == 0:
        return [b""] * counts.size
    # The value in units of 0.1 µm, rounded as np.round(value, 4) rounds; "%.4f" of that rounded
    # value is exactly these digits (a double is far closer to q / 10^4 than 0.5 of the last digit).
    tenths = np.rint(flat * 1e4)
    if not (np.all(np.isfinite(tenths)) and np.max(np.abs(tenths)) < 1e14):
        raise ValueError("contour coordinate beyond 1e10 mm or not a number: cannot be written as DS")
    q = tenths.astype(np.int64)
    negative = q < 0
    whole, tail = np.divmod(np.abs(q), 10000)
    top = int(whole.max())
    if top < 10000:
        digits = _WHOLE_DIGITS[whole]
    else:
        digits = np.ones(q.shape, dtype=np.int64)
        power = 10
        while power <= top:
            digits += whole >= power
            power *= 10
    # Each value a row of 4-byte words: the whole part's groups of four digits (with room for a
    # sign before them, and an even count of words so the decimals' 8 bytes are one aligned word),
    # then ".dddd\\" and two unused bytes. Columns before a value's first character stay unset.
    groups = len(str(top)) // 4 + 1
    words = np.empty((flat.size, groups + groups % 2 + 2), dtype=np.uint32)
    point = 4 * (words.shape[1] - 2)  # the point's column
    words.view(np.uint64)[:, -1] = _TAIL_TEXT[tail]
    rest = whole
    for group in range(groups):  # the whole part, four digits at a time from the units up
        last = top < 10000 ** (group + 1)  # no value has digits beyond these
        words[:, -3 - group] = _FOUR_DIGITS[rest if last else rest % 10000]
        if last:
            break
        rest = rest // 10000
    text = words.view(np.uint8)  # (values, 4 * words) characters
    first = point - digits - negative  # the value's first column
    text[np.flatnonzero(negative), first[negative]] = ord("-")
    # Trailing zeros of the decimals are left out, and the point with them when all four are zero:
    # "-150" and "12.35", not "-150.0000" and "12.3500" (the same numbers; a quarter of the bytes
    # of a CT's contours, which the archive and the viewer parse). The separator moves up to the
    # last character kept, so each row's text is one run of columns: first .. first + length - 1.
    cut = _TAIL_CUT[tail]
    row_starts = np.arange(0, text.size, text.shape[1], dtype=np.int64)
    text.reshape(-1)[row_starts + (point + 5 - cut)] = ord("\\")
    length = negative + digits + 6 - cut  # with the separator
    column = np.arange(text.shape[1], dtype=np.uint8)
    # column - first wraps below 0 in 8 bits, so one comparison tells first <= column < first + length.
    used = (column[None, :] - first.astype(np.uint8)[:, None]) < length.astype(np.uint8)[:, None]
    blob = text[used].tobytes()
    ends = np.cumsum(length)[np.cumsum(counts) - 1].tolist()
    out, start = [], 0
    for n, end in zip(counts.tolist(), ends):
        if n == 0:
            out.append(b"")
            continue
        piece = blob[start:end - 1]  # without the run's last separator
        out.append(piece + b" " if len(piece) % 2 else piece)
        start = end
    return out


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element; ``value`` already padded to an even length."""
    group, elem = tag >> 16, tag & 0xFFFF
    if vr == b"SQ" or len(value) > 0xFFFF:
        # A 16-bit length cannot hold a longer value: UN with a 32-bit length, as PS3.5 6.2.2 says
        # (and as pydicom writes it).
        return struct.pack("<HH2sHI", group, elem, vr if vr == b"SQ" else b"UN", 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _item(body: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


def _text(value: str, pad: bytes = b" ") -> bytes:
    data = value.encode("ascii")
    return data + pad if len(data) % 2 else data


def _image_item(sop_class: str, sop_uid: str) -> bytes:
    """A Contour Image Sequence item referencing one image, encoded."""
    return _item(_element(0x00081150, b"UI", _text(sop_class, b"\0")) + _element(0x00081155, b"UI", _text(sop_uid, b"\0")))


def _contour_sequence(images: list[bytes], contours: Contours, points: np.ndarray) -> RawDataElement:
    """The Contour Sequence of one ROI, encoded here: a big structure set has tens of thousands of
    contours and millions of coordinates, and building them as pydicom items (then serialising
    them element by element) took most of the encoder's time. Contour i lies on the image whose
    encoded Contour Image Sequence is ``images[contours.slices[i]]`` and has the next
    ``contours.counts[i]`` rows of ``points`` (x, y, z). Every value is ASCII, so the bytes are
    the same in any character set."""
    closed = _element(0x30060042, b"CS", b"CLOSED_PLANAR ")
    counts = contours.counts.tolist()
    data = format_ds_runs(points, contours.counts * 3)
    items = [
        _item(b"".join((images[k], closed, _element(0x30060046, b"IS", _text(str(n))),
                        _element(0x30060048, b"IS", _text(str(number))), _element(0x30060050, b"DS", xyz))))
        for number, (k, n, xyz) in enumerate(zip(contours.slices.tolist(), counts, data), start=1)
    ]
    value = b"".join(items)
    return RawDataElement(_CONTOUR_SEQUENCE, "SQ", len(value), value, 0, False, True)


def _dataset(**attrs) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def _plane_axes(series: SeriesData, geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-slice origin (from each image's own position) and the in-plane step vectors."""
    origins = np.array([[float(v) for v in d.ImagePositionPatient] for d in series.datasets])
    row_step = geometry.row_direction * geometry.spacing[0]  # one column to the right
    col_step = geometry.column_direction * geometry.spacing[1]  # one row down
    return origins, row_step, col_step


def encode_rtstruct(
    labelmap: LabelMap,
    sources: dict[str, SeriesData],
    ctx: EncodeContext,
    *,
    series_number: int,
) -> Dataset:
    """An RT Structure Set of ``labelmap`` on its source series (which must be a regular volume)."""
    what = "LabelMap"
    series = source_series(sources, labelmap.source_series_uid, what)
    geometry = source_grid(series, labelmap, f"{what} (RTSTRUCT)")
    first = series.first
    frame_uid = first.get("FrameOfReferenceUID")
    if not frame_uid:
        raise ValueError(f"RTSTRUCT: source series {series.series_uid} has no FrameOfReferenceUID")
    if any(d.get("FrameOfReferenceUID") != frame_uid for d in series.datasets):
        raise ValueError(f"RTSTRUCT: source series {series.series_uid} mixes Frames of Reference")
    if any("ImagePositionPatient" not in d for d in series.datasets):
        raise ValueError(f"RTSTRUCT: source series {series.series_uid} lacks ImagePositionPatient")

    uid_key = ("RTSTRUCT", series_number)
    now = ctx.created
    ds = new_instance(RTStructureSetStorage, ctx.uid(*uid_key, "instance", 1))

    description = series_description(labelmap.description, "RTSTRUCT")
    names = [(s.tg263 or s.name) for s in labelmap.segments]
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    # Every string written below: the label map's (ROI names and descriptions, code meanings), the
    # job's (rule, handler: structure set and ROI generation descriptions).
    copy_patient_study(ds, first, choose_charset(first, [description, *labelmap_texts(labelmap)], ctx))
    # RT Series
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = ctx.uid(*uid_key, "series")
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.SeriesDate, ds.SeriesTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.OperatorsName = ""
    # Frame of Reference (mandatory in the RT Structure Set IOD since 2020): the source's.
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    # General Equipment
    ds.Manufacturer = ctx.manufacturer
    ds.ManufacturerModelName = MODEL_NAME
    ds.DeviceSerialNumber = ctx.device_serial
    ds.SoftwareVersions = ctx.software_version
    ds.ContributingEquipmentSequence = [contributing_equipment(ctx)]
    # Structure Set
    ds.StructureSetLabel = clip_text(labelmap.description or "AI", 16)
    ds.StructureSetName = clip_text(labelmap.description, 64)
    ds.StructureSetDescription = clip_text(f"{MODEL_NAME}: rule {ctx.rule}, handler {ctx.handler} {ctx.handler_version}",
                                           1024)
    ds.InstanceNumber = 1
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    # Every image of the series, each as a Contour Image Sequence item, encoded once: the series'
    # list below and each contour's own reference take them as they are.
    image_items = [_image_item(d.SOPClassUID, d.SOPInstanceUID) for d in series.datasets]
    referenced_series = _dataset(SeriesInstanceUID=series.series_uid)
    every_image = b"".join(image_items)
    referenced_series[_CONTOUR_IMAGE_SEQUENCE] = RawDataElement(_CONTOUR_IMAGE_SEQUENCE, "SQ", len(every_image),
                                                                every_image, 0, False, True)
    ds.ReferencedFrameOfReferenceSequence = [_dataset(
        FrameOfReferenceUID=frame_uid,
        RTReferencedStudySequence=[_dataset(
            ReferencedSOPClassUID=STUDY_SOP_CLASS,
            ReferencedSOPInstanceUID=first.StudyInstanceUID,
            RTReferencedSeriesSequence=[referenced_series],
        )],
    )]

    origins, row_step, col_step = _plane_axes(series, geometry)
    images = [_element(0x30060016, b"SQ", item) for item in image_items]
    roi_seq, contour_seq, obs_seq = Sequence(), Sequence(), Sequence()
    # Every structure traced in one pass over the label map. An EXTERNAL one is the region its
    # segment covers (its own label and those it includes, as its SEG has it) with, slice by
    # slice, everything it encloses filled in: a label map is exclusive, so the body label has
    # holes where the lungs, bones or bowel gas are, and a planning system takes EXTERNAL as the
    # patient's outer surface, on which those holes would count as outside the patient. Its
    # outermost contours are that outline (filling the holes first, by a labelling of every
    # slice, took three times as long as tracing the structure).
    external = {s.label: (s.label, *s.includes) for s in labelmap.segments if s.rt_roi_type == "EXTERNAL"}
    traced = packed_contours(labelmap.labels, skip=frozenset(external), masks=external)
    traced.update({label: outermost(traced[label]) for label in external if label in traced})
    for number, (segment, name) in enumerate(zip(labelmap.segments, names), start=1):
        roi_seq.append(_dataset(
            ROINumber=number,
            ReferencedFrameOfReferenceUID=frame_uid,
            ROIName=name,
            ROIDescription=segment.name,
            ROIGenerationAlgorithm="AUTOMATIC",
            ROIGenerationDescription=clip_text(f"{ctx.handler} {ctx.handler_version}", 64),
        ))
        mine = traced.get(segment.label)
        roi_contour = _dataset(ROIDisplayColor=list(segment.color), ReferencedROINumber=number)
        if mine is not None:  # an empty structure is an ROI without contours (TPS show it as empty)
            slices = np.repeat(mine.slices, mine.counts)
            pixels = mine.points  # (row, col) pixel indices
            points = origins[slices] + pixels[:, 1:2] * row_step + pixels[:, 0:1] * col_step
            roi_contour[_CONTOUR_SEQUENCE] = _contour_sequence(images, mine, points)
        contour_seq.append(roi_contour)
        obs_seq.append(_dataset(
            ObservationNumber=number,
            ReferencedROINumber=number,
            ROIObservationLabel=clip_text(name, 16),
            RTROIIdentificationCodeSequence=[_dataset(
                CodeValue=segment.type.value, CodingSchemeDesignator=segment.type.scheme,
                CodeMeaning=segment.type.meaning)],
            RTROIInterpretedType=segment.rt_roi_type,
            ROIInterpreter="",
        ))
    ds.StructureSetROISequence = roi_seq
    ds.ROIContourSequence = contour_seq
    ds.RTROIObservationsSequence = obs_seq
    ds.ApprovalStatus = "UNAPPROVED"
    # Mark the ROI contour items as already encoded (explicit VR little endian, this charset) so that
    # writing them keeps the prepared Contour Sequence bytes; any other encoding (an Implicit VR
    # C-STORE) decodes them first.
    # The structure set itself too: a dataset of unknown encoding is walked whole before writing
    # (pydicom's ambiguous-VR correction), which would decode every prepared contour again. It
    # has no ambiguous VRs (none of its attributes is US-or-SS or OB-or-OW). So too the items the
    # series' image list hangs from (frame of reference, study): one of unknown encoding above it
    # has the list decoded and written anew.
    frame_item = ds.ReferencedFrameOfReferenceSequence[0]
    for prepared in (*contour_seq, referenced_series, frame_item, frame_item.RTReferencedStudySequence[0]):
        prepared.set_original_encoding(False, True, prepared._character_set)
    ds.set_original_encoding(False, True, ds._character_set)
    return ds
