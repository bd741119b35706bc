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

import datetime as _dt

import numpy as np
from scipy import ndimage
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import RTStructureSetStorage

from node.encoders.common import (
    DEVICE_SERIAL,
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

__all__ = ["encode_rtstruct", "format_ds_values"]

# RT Referenced Study Sequence items reference the study through this (retired, still
# universally used) SOP Class: Detached Study Management.
STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
_CONTOUR_DATA = Tag(0x3006, 0x0050)


def format_ds_values(values: np.ndarray) -> bytes:
    """Backslash-separated DS text with 4 decimals (0.1 µm), at most 16 characters per value."""
    flat = np.round(np.asarray(values, dtype=float).ravel(), 4) + 0.0  # + 0.0 turns -0.0 into 0.0
    if flat.size and np.max(np.abs(flat)) >= 1e10:
        raise ValueError("contour coordinate beyond 1e10 mm: cannot be written as DS")
    text = ("\\".join(["%.4f"] * flat.size) % tuple(flat.tolist())).encode("ascii")
    return text + b" " if len(text) % 2 else text


def _contour_data_element(points: np.ndarray) -> RawDataElement:
    # Hand pydicom the encoded value: a big structure set has millions of coordinates, and one
    # DSfloat object per value would cost seconds and hundreds of megabytes.
    value = format_ds_values(points)
    return RawDataElement(_CONTOUR_DATA, "DS", len(value), value, 0, False, True)


def external_mask(labels: np.ndarray, label: int) -> np.ndarray:
    """The body outline of an EXTERNAL structure: its label with, slice by slice, everything it
    encloses filled in. A label map is exclusive, so the body label has holes where the lungs,
    bones or bowel gas are; a planning system takes EXTERNAL as the patient's outer surface, and
    those holes would count as outside the patient."""
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(labels == label, structure=in_plane)


def _item(**attrs) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def _image_refs(series: SeriesData) -> list[Dataset]:
    return [_item(ReferencedSOPClassUID=d.SOPClassUID, ReferencedSOPInstanceUID=d.SOPInstanceUID)
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
    now = _dt.datetime.now()
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
    ds.DeviceSerialNumber = DEVICE_SERIAL
    ds.SoftwareVersions = ctx.software_version
    ds.ContributingEquipmentSequence = [contributing_equipment(ctx)]
    # Structure Set
    ds.StructureSetLabel = (labelmap.description or "AI")[:16]
    ds.StructureSetName = labelmap.description[:64]
    ds.StructureSetDescription = f"{MODEL_NAME}: rule {ctx.rule}, handler {ctx.handler} {ctx.handler_version}"[:1024]
    ds.InstanceNumber = 1
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.ReferencedFrameOfReferenceSequence = [_item(
        FrameOfReferenceUID=frame_uid,
        RTReferencedStudySequence=[_item(
            ReferencedSOPClassUID=STUDY_SOP_CLASS,
            ReferencedSOPInstanceUID=first.StudyInstanceUID,
            RTReferencedSeriesSequence=[_item(
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
        roi_seq.append(_item(
            ROINumber=number,
            ReferencedFrameOfReferenceUID=frame_uid,
            ROIName=name,
            ROIDescription=segment.name,
            ROIGenerationAlgorithm="AUTOMATIC",
            ROIGenerationDescription=f"{ctx.handler} {ctx.handler_version}"[:64],
        ))
        contours = Sequence()
        for k, polygon in polygons.get(segment.label, []):
            # polygon rows are (row, col) pixel indices on slice k
            xyz = origins[k] + polygon[:, 1:2] * row_step + polygon[:, 0:1] * col_step
            item = Dataset()
            item.ContourImageSequence = [_item(
                ReferencedSOPClassUID=image_uids[k][0], ReferencedSOPInstanceUID=image_uids[k][1])]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(xyz)
            item.ContourNumber = len(contours) + 1
            item[_CONTOUR_DATA] = _contour_data_element(xyz)
            contours.append(item)
        roi_contour = _item(ROIDisplayColor=list(segment.color), ReferencedROINumber=number)
        if contours:  # an empty structure is an ROI without contours (TPS show it as empty)
            roi_contour.ContourSequence = contours
        contour_seq.append(roi_contour)
        obs_seq.append(_item(
            ObservationNumber=number,
            ReferencedROINumber=number,
            ROIObservationLabel=name[:16],
            RTROIIdentificationCodeSequence=[_item(
                CodeValue=segment.type.value, CodingSchemeDesignator=segment.type.scheme,
                CodeMeaning=segment.type.meaning)],
            RTROIInterpretedType=segment.rt_roi_type,
            ROIInterpreter="",
        ))
    ds.StructureSetROISequence = roi_seq
    ds.ROIContourSequence = contour_seq
    ds.RTROIObservationsSequence = obs_seq
    ds.ApprovalStatus = "UNAPPROVED"
    # Mark the contour items as already encoded (explicit VR little endian, this charset) so that
    # writing them keeps the prepared ContourData bytes instead of decoding and re-encoding them.
    for roi_contour in contour_seq:
        for item in roi_contour.get("ContourSequence", []):
            item.set_original_encoding(False, True, item._character_set)
    return ds
