"""A quantity map (e.g. a model's voxel entropy) as a DICOM Parametric Map (highdicom).

The map keeps its own grid (a model's network grid, coarser than the source) and is placed in the
source series' Frame of Reference through its plane positions, so a viewer overlays it on the
source slices without resampling it to the source's 512x512 grid first. The source series' images
are its Referenced Series (the derivation source); float32 values are stored as they are (Float
Pixel Data) with an identity Real World Value Mapping that names the quantity and its unit.
"""
from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from node.encoders.common import (
    MODEL_NAME,
    choose_charset,
    clip_text,
    code_texts,
    coded,
    contributing_equipment,
    copy_patient_study,
    header_views,
    job_time,
    series_description,
    settle_encoding,
    source_series,
)
from node.encoders.context import EncodeContext
from node.results import QuantityMap
from node.volume import Geometry, SeriesData

__all__ = ["encode_quantity_map"]


def _affine(geom: Geometry) -> np.ndarray:
    """4x4 from (slice, row, column) array indices to patient mm: highdicom's Volume convention."""
    origin = np.asarray(geom.origin, dtype=float)
    affine = np.eye(4)
    for axis in range(3):
        step = [0, 0, 0]
        step[axis] = 1
        affine[:3, axis] = geom.index_to_patient(step) - origin
    affine[:3, 3] = origin
    return affine


def encode_quantity_map(qmap: QuantityMap, sources: dict[str, SeriesData], ctx: EncodeContext, *,
                        series_number: int) -> Dataset:
    """One multi-frame Parametric Map of ``qmap``, one frame per slice of its grid."""
    series = source_series(sources, qmap.source_series_uid, "QuantityMap")
    src = series.first
    if "FrameOfReferenceUID" not in src:
        raise ValueError(f"QuantityMap: source series {series.series_uid} has no Frame of Reference")
    volume = hd.Volume(qmap.values, _affine(qmap.geometry), "PATIENT", frame_of_reference_uid=src.FrameOfReferenceUID)
    lo, hi = (float(v) for v in qmap.value_range)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=clip_text(qmap.quantity.value, 16), lut_explanation=clip_text(qmap.quantity.meaning, 64),
        unit=coded(qmap.unit),
        value_range=(lo, hi), slope=1.0, intercept=0.0, quantity_definition=coded(qmap.quantity))
    description = series_description(qmap.description, "MAP")
    uid_key = ("PMAP", series_number)
    pm = hd.pm.ParametricMap(
        source_images=header_views(series, ctx),
        pixel_array=volume,
        series_instance_uid=ctx.uid(*uid_key, "series"),
        series_number=series_number,
        sop_instance_uid=ctx.uid(*uid_key, "instance", 1),
        instance_number=1,
        manufacturer=ctx.manufacturer,
        manufacturer_model_name=MODEL_NAME,
        software_versions=ctx.software_version,
        device_serial_number=ctx.device_serial,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=(lo + hi) / 2, window_width=hi - lo,
                                                         window_explanation="full range")],
        content_description=clip_text(qmap.description, 64),
        content_label="UNCERTAINTY" if "ntropy" in qmap.quantity.meaning else "MAP",
        contributing_equipment=[contributing_equipment(ctx)],
        specific_character_set=None,  # set by copy_patient_study
    )
    pm.SeriesDescription = description
    pm.Laterality = ""  # Type 2C: the map's laterality is its source's, which a chest series does not state
    # highdicom draws a random Dimension Organization UID; one from the job keeps re-encoding stable
    dimension_uid = ctx.uid(*uid_key, "dimension-organization")
    for item in (*pm.DimensionOrganizationSequence, *pm.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimension_uid
    copy_patient_study(pm, src, choose_charset(src, [description, qmap.description,
                                                     *code_texts(qmap.quantity, qmap.unit)], ctx))
    job_time(pm, ctx)  # highdicom stamps the clock: the job's time keeps a re-encoded job the same bytes
    _frames_along_the_normal(pm)
    return settle_encoding(pm)


def _frames_along_the_normal(pm: Dataset) -> None:
    """Store the frames in ascending order along row x column direction (each keeps its own position).

    highdicom writes them the other way round. Both are valid DICOM, but OHIF's parametric-map viewer
    (OHIF 3.12, @cornerstonejs/adapters) ignores the frames' positions and lays them onto its volume of
    the source series in file order, which ascends along that normal: the other order shows the map
    upside down (tests/test_web_ohif.py reads the values back from OHIF)."""
    shared = pm.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    frames = pm.PerFrameFunctionalGroupsSequence
    along = [float(np.dot(normal, np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, dtype=float)))
             for f in frames]
    order = np.argsort(along, kind="stable")
    if (order == np.arange(len(order))).all():
        return
    size = int(pm.Rows) * int(pm.Columns) * int(pm.BitsAllocated) // 8
    keyword = next(k for k in ("FloatPixelData", "DoubleFloatPixelData", "PixelData") if k in pm)
    data = bytes(pm[keyword].value)
    pm[keyword].value = b"".join(data[i * size:(i + 1) * size] for i in order)
    pm.PerFrameFunctionalGroupsSequence = [frames[i] for i in order]
