"""RT Structure Set written directly with pydicom (rt-utils leaves out the Frame of Reference in
places and writes DS values longer than 16 characters, which dciodvfy and some TPS reject).

One ROI per segment, named by its TG-263 name where it has one; an EXTERNAL structure is the
body outline with what it encloses filled in (``external_mask``). Contours are CLOSED_PLANAR
polygons in patient coordinates on the source slices; a hole is a further contour inside its
island on the same plane, which planning systems combine with the even-odd rule. Each contour
references its image, and the structure set carries the full chain Frame of Reference → study →
series → every image.
"""
from __future__ import annotations

import struct

import numpy as np
from scipy import ndimage
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import RTStructureSetStorage

from node.encoders.common import (
    MODEL_NAME,
    choose_charset,
    contributing_equipment,
    copy_patient_study,
    new_instance,
    series_description,
    source_grid,
    source_series,
)
from node.encoders.context import EncodeContext
from node.encoders.contours import label_contours, mask_contours
from node.results import LabelMap
from node.volume import Geometry, SeriesData

__all__ = ["encode_rtstruct", "format_ds_runs", "format_ds_values"]

# RT Referenced Study Sequence items reference the study through this (retired, still
# universally used) SOP Class: Detached Study Management.
STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
_CONTOUR_SEQUENCE = Tag(0x3006, 0x0040)


def format_ds_values(values: np.ndarray) -> bytes:
    """Backslash-separated DS text with 4 decimals (0.1 µm), at most 16 characters per value."""
    return format_ds_runs(values, [np.asarray(values).size])[0]


def format_ds_runs(values: np.ndarray, counts: list[int]) -> list[bytes]:
    """``format_ds_values`` of consecutive runs of ``values`` (``counts`` values each), rounded and
    range-checked in one pass: a structure set has tens of thousands of contours, and the NumPy
    calls per contour cost as much as the formatting itself."""
    flat = np.round(np.asarray(values, dtype=float).ravel(), 4) + 0.0  # + 0.0 turns -0.0 into 0.0
    if flat.size and np.max(np.abs(flat)) >= 1e10:
        raise ValueError("contour coordinate beyond 1e10 mm: cannot be written as DS")
    numbers = flat.tolist()
    out, start = [], 0
    for count in counts:
        text = ("\\".join(["%.4f"] * count) % tuple(numbers[start:start + count])).encode("ascii")
        out.append(text + b" " if len(text) % 2 else text)
        start += count
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


def _contour_sequence(images: list[tuple[str, str]], points: np.ndarray, counts: list[int]) -> RawDataElement:
    """The Contour Sequence of one ROI, encoded here: a big structure set has tens of thousands of
    contours and millions of coordinates, and building them as pydicom items (then serialising
    them element by element) took most of the encoder's time. Contour i lies on ``images[i]``
    and has the next ``counts[i]`` rows of ``points`` (x, y, z). Every value is ASCII, so the
    bytes are the same in any character set."""
    items = []
    data = format_ds_runs(points, [3 * n for n in counts])
    for number, ((sop_class, sop_uid), n, xyz) in enumerate(zip(images, counts, data), start=1):
        image = _item(_element(0x00081150, b"UI", _text(sop_class, b"\0")) +
                      _element(0x00081155, b"UI", _text(sop_uid, b"\0")))
        items.append(_item(
            _element(0x30060016, b"SQ", image)
            + _element(0x30060042, b"CS", b"CLOSED_PLANAR ")
            + _element(0x30060046, b"IS", _text(str(n)))
            + _element(0x30060048, b"IS", _text(str(number)))
            + _element(0x30060050, b"DS", xyz)
        ))
    value = b"".join(items)
    return RawDataElement(_CONTOUR_SEQUENCE, "SQ", len(value), value, 0, False, True)


def external_mask(labels: np.ndarray, label: int) -> np.ndarray:
    """The body outline of an EXTERNAL structure: its label with, slice by slice, everything it
    encloses filled in. A label map is exclusive, so the body label has holes where the lungs,
    bones or bowel gas are; a planning system takes EXTERNAL as the patient's outer surface, and
    those holes would count as outside the patient."""
    # Slice by slice, a hole is a piece of background that does not reach the edge of its slice:
    # one labelling pass per slice finds them all (binary_fill_holes gets there by repeated
    # dilation, about three times slower on a 512x512x300 volume, with the same result). Only
    # the body's bounding box is labelled, with a ring of background around it: everything
    # outside the box is background joined to the image's edge, and the ring joins whatever
    # reaches the box's edge to it, so the piece holding the ring's corner is all that is outside.
    four_connected = ndimage.generate_binary_structure(2, 1)
    out = np.zeros(labels.shape, dtype=bool)
    for k, plane in enumerate(labels):
        body = plane == label
        rows = np.flatnonzero(body.any(axis=1))
        if rows.size == 0:
            continue
        cols = np.flatnonzero(body.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        background, _ = ndimage.label(np.pad(~body[box], 1, constant_values=True), structure=four_connected)
        out[k][box] = background[1:-1, 1:-1] != background[0, 0]
    return out


def _dataset(**attrs) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def _image_refs(series: SeriesData) -> list[Dataset]:
    return [_dataset(ReferencedSOPClassUID=d.SOPClassUID, ReferencedSOPInstanceUID=d.SOPInstanceUID)
            for d in series.datasets]


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
    copy_patient_study(ds, first, choose_charset(first, [description, labelmap.description, *names]))
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
    ds.StructureSetLabel = (labelmap.description or "AI")[:16]
    ds.StructureSetName = labelmap.description[:64]
    ds.StructureSetDescription = f"{MODEL_NAME}: rule {ctx.rule}, handler {ctx.handler} {ctx.handler_version}"[:1024]
    ds.InstanceNumber = 1
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.ReferencedFrameOfReferenceSequence = [_dataset(
        FrameOfReferenceUID=frame_uid,
        RTReferencedStudySequence=[_dataset(
            ReferencedSOPClassUID=STUDY_SOP_CLASS,
            ReferencedSOPInstanceUID=first.StudyInstanceUID,
            RTReferencedSeriesSequence=[_dataset(
                SeriesInstanceUID=series.series_uid,
                ContourImageSequence=_image_refs(series),
            )],
        )],
    )]

    origins, row_step, col_step = _plane_axes(series, geometry)
    image_uids = [(d.SOPClassUID, d.SOPInstanceUID) for d in series.datasets]
    roi_seq, contour_seq, obs_seq = Sequence(), Sequence(), Sequence()
    external = {s.label for s in labelmap.segments if s.rt_roi_type == "EXTERNAL"}
    polygons = label_contours(labelmap.labels, skip=frozenset(external))
    for label in external:
        polygons[label] = mask_contours(external_mask(labelmap.labels, label))
    for number, (segment, name) in enumerate(zip(labelmap.segments, names), start=1):
        roi_seq.append(_dataset(
            ROINumber=number,
            ReferencedFrameOfReferenceUID=frame_uid,
            ROIName=name,
            ROIDescription=segment.name,
            ROIGenerationAlgorithm="AUTOMATIC",
            ROIGenerationDescription=f"{ctx.handler} {ctx.handler_version}"[:64],
        ))
        mine = polygons.get(segment.label, [])
        roi_contour = _dataset(ROIDisplayColor=list(segment.color), ReferencedROINumber=number)
        if mine:  # an empty structure is an ROI without contours (TPS show it as empty)
            counts = [len(polygon) for _, polygon in mine]
            slices = np.repeat([k for k, _ in mine], counts)
            pixels = np.concatenate([polygon for _, polygon in mine])  # (row, col) pixel indices
            points = origins[slices] + pixels[:, 1:2] * row_step + pixels[:, 0:1] * col_step
            roi_contour[_CONTOUR_SEQUENCE] = _contour_sequence([image_uids[k] for k, _ in mine], points, counts)
        contour_seq.append(roi_contour)
        obs_seq.append(_dataset(
            ObservationNumber=number,
            ReferencedROINumber=number,
            ROIObservationLabel=name[:16],
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
    # has no ambiguous VRs (none of its attributes is US-or-SS or OB-or-OW).
    for roi_contour in contour_seq:
        roi_contour.set_original_encoding(False, True, roi_contour._character_set)
    ds.set_original_encoding(False, True, ds._character_set)
    return ds
