"""Spatial Registration and Deformable Spatial Registration objects (PS3.3 A.39, C.20).

Both sit in the fixed series' study and Frame of Reference (the "registered RCS"). The Registration
Sequence holds two items: the fixed Frame of Reference with the identity (so a reader finds the
registered RCS itself) and the moving one with its matrix into the fixed RCS. The Common Instance
Reference module names every image of both series; a moving series from a prior study goes under
Studies Containing Other Referenced Instances.

Deformable (PS3.3 C.20.3.1.1): a reader maps a point P of the registered (fixed) RCS to the source
(moving) RCS as M_post (M_pre P + D(P)), D interpolated on the grid, which lies in the registered
RCS. Hilum's mapping is linear(g + u(g)) (ITK's displacement field, then the rigid/affine part
fixed → moving), so: Pre Deformation Matrix = identity, grid vectors = u, Post Deformation Matrix
= the rigid/affine part from the fixed RCS into the moving one (the inverse of the Spatial
Registration's matrix, whose direction is moving → fixed).
"""
from __future__ import annotations


import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import DeformableSpatialRegistrationStorage, SpatialRegistrationStorage
from pydicom.valuerep import format_number_as_ds

from node.encoders.common import (
    MODEL_NAME,
    choose_charset,
    clip_text,
    contributing_equipment,
    copy_patient_study,
    new_instance,
    series_description,
    source_series,
)
from node.encoders.context import EncodeContext
from node.results import DeformableRegistration, SeriesRef, SpatialRegistration
from node.volume import SeriesData

__all__ = ["encode_spatial_registration", "encode_deformable_registration", "IMAGE_CONTENT_ALIGNMENT"]

IMAGE_CONTENT_ALIGNMENT = ("125024", "DCM", "Image Content-based Alignment")  # CID 7100


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    ds = Dataset()
    ds.CodeValue, ds.CodingSchemeDesignator, ds.CodeMeaning = value, scheme, meaning
    return ds


def _ds_values(values) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


def _matrix_item(matrix: np.ndarray, kind: str) -> Dataset:
    item = Dataset()
    item.FrameOfReferenceTransformationMatrix = _ds_values(np.asarray(matrix, float).ravel())
    item.FrameOfReferenceTransformationMatrixType = kind
    return item


def _matrix_type(matrix: np.ndarray) -> str:
    a = np.asarray(matrix, float)[:3, :3]
    if np.allclose(a @ a.T, np.eye(3), atol=1e-4):
        return "RIGID"
    return "AFFINE"


def _instances(ref: SeriesRef) -> list[Dataset]:
    out = []
    for sop_class, sop_instance in ref.instances:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        out.append(item)
    return out


def _common_instance_reference(ds: Dataset, study_uid: str, refs: list[SeriesRef]) -> None:
    here, elsewhere = [], {}
    for ref in refs:
        item = Dataset()
        item.SeriesInstanceUID = ref.series_uid
        item.ReferencedInstanceSequence = _instances(ref)
        (here if ref.study_uid == study_uid else elsewhere.setdefault(ref.study_uid, [])).append(item)
    if here:
        ds.ReferencedSeriesSequence = here
    if elsewhere:
        studies = []
        for uid, series in elsewhere.items():
            study = Dataset()
            study.StudyInstanceUID = uid
            study.ReferencedSeriesSequence = series
            studies.append(study)
        ds.StudiesContainingOtherReferencedInstancesSequence = studies


def _base(sop_class: str, fixed: SeriesRef, moving: SeriesRef, sources: dict[str, SeriesData], ctx: EncodeContext,
          series_number: int, kind: str, text: str) -> Dataset:
    series = source_series(sources, fixed.series_uid, kind)
    src = series.first
    uid_key = (kind, series_number)
    ds = new_instance(sop_class, ctx.uid(*uid_key, "instance", 1))
    now = ctx.created
    description = series_description(text, "REG")
    content = clip_text(f"{text}: series {moving.series_uid} onto {fixed.series_uid}", 64)
    copy_patient_study(ds, src, choose_charset(src, [description, content, fixed.modality, moving.modality], ctx))
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.Modality = "REG"
    ds.SeriesInstanceUID = ctx.uid(*uid_key, "series")
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.Laterality = src.get("Laterality", "")  # Type 2C: dciodvfy cannot know the body part is unpaired
    ds.FrameOfReferenceUID = fixed.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = ctx.manufacturer
    ds.ManufacturerModelName = MODEL_NAME
    ds.DeviceSerialNumber = ctx.device_serial
    ds.SoftwareVersions = ctx.software_version
    ds.ContributingEquipmentSequence = [contributing_equipment(ctx)]
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.ContentLabel = "REGISTRATION"
    ds.ContentDescription = content
    ds.ContentCreatorName = ""
    _common_instance_reference(ds, str(src.StudyInstanceUID), [fixed, moving])
    return ds


def encode_spatial_registration(reg: SpatialRegistration, sources: dict[str, SeriesData], ctx: EncodeContext, *,
                                series_number: int) -> Dataset:
    ds = _base(SpatialRegistrationStorage, reg.fixed, reg.moving, sources, ctx, series_number, "REG",
               reg.description)
    items = []
    for ref, matrix in ((reg.fixed, np.eye(4)), (reg.moving, reg.matrix)):
        item = Dataset()
        item.FrameOfReferenceUID = ref.frame_of_reference_uid
        item.ReferencedImageSequence = _instances(ref)
        matrix_reg = Dataset()
        matrix_reg.RegistrationTypeCodeSequence = [_code(*IMAGE_CONTENT_ALIGNMENT)]
        matrix_reg.FrameOfReferenceTransformationComment = (
            f"{reg.method} registration, {'fixed' if ref is reg.fixed else 'moving'} {ref.modality}")
        matrix_reg.MatrixSequence = [_matrix_item(matrix, _matrix_type(matrix))]
        item.MatrixRegistrationSequence = [matrix_reg]
        items.append(item)
    ds.RegistrationSequence = items
    return ds


def encode_deformable_registration(reg: DeformableRegistration, sources: dict[str, SeriesData],
                                   ctx: EncodeContext, *, series_number: int) -> Dataset:
    ds = _base(DeformableSpatialRegistrationStorage, reg.fixed, reg.moving, sources, ctx, series_number, "DREG",
               reg.description)
    item = Dataset()
    item.SourceFrameOfReferenceUID = reg.moving.frame_of_reference_uid
    item.ReferencedImageSequence = _instances(reg.moving)
    item.RegistrationTypeCodeSequence = [_code(*IMAGE_CONTENT_ALIGNMENT)]
    item.FrameOfReferenceTransformationComment = "deformation grid, then post: rigid/affine part"
    post = np.linalg.inv(reg.matrix)  # registered (fixed) RCS → source (moving) RCS, after the deformation
    item.PreDeformationMatrixRegistrationSequence = [_matrix_item(np.eye(4), "RIGID")]
    item.PostDeformationMatrixRegistrationSequence = [_matrix_item(post, _matrix_type(post))]
    grid = Dataset()
    g = reg.grid
    grid.ImagePositionPatient = _ds_values(g.origin)
    grid.ImageOrientationPatient = _ds_values(g.image_orientation)
    grid.GridDimensions = [int(g.shape[2]), int(g.shape[1]), int(g.shape[0])]  # columns, rows, slices
    grid.GridResolution = [float(v) for v in g.spacing]
    grid.VectorGridData = np.ascontiguousarray(reg.vectors, dtype="<f4").tobytes()
    item.DeformableRegistrationGridSequence = [grid]
    ds.DeformableRegistrationSequence = [item]
    return ds
