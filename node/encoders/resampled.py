"""The moving series resampled onto the fixed grid, as a derived image series (CT or MR Image).

It lives in the fixed series' study and Frame of Reference, slice for slice on the fixed grid, so a
viewer shows it side by side with, or fused over, the fixed series without knowing anything about
registration. Each image names the moving images it was computed from (Source Image Sequence,
derivation "Spatial resampling") and the registration object that placed them (Referenced
Instance Sequence). Values keep the moving modality's units (HU for CT), stored as signed 16 bits
with a rescale when they do not fit as they are.
"""
from __future__ import annotations

import copy

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage
from pydicom.valuerep import format_number_as_ds

from node.encoders.common import (
    MODEL_NAME,
    choose_charset,
    clip_text,
    contributing_equipment,
    copy_patient_study,
    new_instance,
    series_description,
    settle_encoding,
    source_series,
)
from node.encoders.context import EncodeContext
from node.results import ResampledSeries
from node.volume import SeriesData

__all__ = ["encode_resampled"]

SOURCE_FOR_PROCESSING = ("121322", "DCM", "Source image for image processing operation")  # CID 7202
SPATIAL_RESAMPLING = ("113085", "DCM", "Spatial resampling")  # CID 7203
# CID 7013 names the deformable registration a derived image comes from; the rigid one shares it,
# being the degenerate case (no deformation).
SOURCE_REGISTRATION = ("125028", "DCM", "Source Deformable Spatial Registration")
_MR_ACQUISITION = ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "RepetitionTime",
                   "EchoTime", "EchoTrainLength", "InversionTime", "MagneticFieldStrength", "ImagedNucleus",
                   "SequenceName", "FlipAngle")
_CT_ACQUISITION = ("KVP", "ConvolutionKernel")
_SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}  # what a resampled series is written as


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    ds = Dataset()
    ds.CodeValue, ds.CodingSchemeDesignator, ds.CodeMeaning = value, scheme, meaning
    return ds


def _ds(v: float) -> str:
    return format_number_as_ds(float(v))


def _storage(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(int16 stored values, slope, intercept) holding ``array``."""
    if array.dtype == np.int16:
        return array, 1.0, 0.0  # as it is: a copy would be a second volume while the images are made
    if np.issubdtype(array.dtype, np.integer) and array.min() >= -32768 and array.max() <= 32767:
        return array.astype(np.int16), 1.0, 0.0
    lo, hi = float(array.min()), float(array.max())
    slope = max((hi - lo) / 65000.0, 1e-6)
    intercept = lo + 32768 * slope
    return np.clip(np.rint((array - intercept) / slope), -32768, 32767).astype(np.int16), slope, intercept


def _patient_study(src: Dataset, charset) -> list:
    """The patient and study modules every image of the series copies (``copy_patient_study``)."""
    template = Dataset()
    copy_patient_study(template, src, charset)
    return list(template.values())


def encode_resampled(res: ResampledSeries, sources: dict[str, SeriesData], ctx: EncodeContext, *,
                     series_number: int, registration: Dataset | None) -> list[Dataset]:
    """One image per fixed slice; ``registration`` is the SRO/DSRO the images reference.

    What every image holds alike is made once: the patient and study elements are copied from
    one set (each image its own elements, their values shared), and the items of its sequences
    (equipment, codes, the registration reference) are the same items in every image; nothing
    changes an item once made. Each image is settled (``settle_encoding``), so its sequences are
    written in one pass (node/encoders/fastwrite.py): a CT's 300 images took 1.2 CPU s to make and
    2.1 s to write element by element."""
    fixed = source_series(sources, res.source_series_uid, "ResampledSeries")
    src = fixed.first
    geom = res.volume.geometry
    if "FrameOfReferenceUID" not in src:
        raise ValueError(f"ResampledSeries: fixed series {fixed.series_uid} has no Frame of Reference")
    moving_header = sources[res.moving.series_uid].first if res.moving.series_uid in sources else None
    modality = res.moving.modality
    if modality not in _SOP_CLASSES:  # ResampledSeries refuses it already; never write PET as MR
        raise ValueError(f"ResampledSeries.moving.modality {modality!r}: only CT or MR can be resampled; "
                         "PET/NM resampling is not supported yet")
    sop_class = _SOP_CLASSES[modality]
    stored, slope, intercept = _storage(res.volume.array)
    description = series_description(res.description, "REG")
    uid_key = ("RESAMPLED", series_number)
    now = ctx.created
    date, time_ = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    equipment = contributing_equipment(ctx)
    resampling = _code(*SPATIAL_RESAMPLING)
    source_purpose = _code(*SOURCE_FOR_PROCESSING)
    derivation = clip_text(f"{modality} series {res.moving.series_uid} resampled onto series "
                           f"{fixed.series_uid} by a {res.method} registration ({ctx.handler})", 1024)
    reference = None
    if registration is not None:
        reference = Dataset()
        reference.ReferencedSOPClassUID = registration.SOPClassUID
        reference.ReferencedSOPInstanceUID = registration.SOPInstanceUID
        reference.PurposeOfReferenceCodeSequence = [_code(*SOURCE_REGISTRATION)]
    sources_of = {}  # moving image index -> its Source Image Sequence item (fixed slices share them)

    def source_item(i: int) -> Dataset:
        if i not in sources_of:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = res.moving.instances[i]
            item.PurposeOfReferenceCodeSequence = [source_purpose]
            sources_of[i] = item
        return sources_of[i]

    orientation = [_ds(v) for v in geom.image_orientation]
    spacing = [_ds(geom.spacing[1]), _ds(geom.spacing[0])]
    thickness = _ds(geom.spacing[2])
    acquisition = [moving_header[k] for k in (_CT_ACQUISITION if modality == "CT" else _MR_ACQUISITION)
                   if moving_header is not None and k in moving_header]
    # The moving series' acquisition text (a sequence name) is written in this object's charset too.
    copied = [str(v) for e in acquisition if e.VR in ("SH", "LO", "ST", "LT", "UT", "UC")
              for v in (e.value if e.VM > 1 else [e.value]) if v is not None]
    charset = choose_charset(src, [description, derivation, *copied], ctx)
    patient_study = _patient_study(src, charset)
    rescale = (_ds(intercept), _ds(slope))
    window = (_ds(res.window[0]), _ds(res.window[1]))
    out = []
    for k in range(geom.shape[0]):
        ds = new_instance(sop_class, ctx.uid(*uid_key, "instance", k + 1))
        for elem in patient_study:
            ds[elem.tag] = copy.copy(elem)
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time_
        ds.Modality = modality
        ds.SeriesInstanceUID = ctx.uid(*uid_key, "series")
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.FrameOfReferenceUID = src.FrameOfReferenceUID
        ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "")
        ds.Manufacturer = ctx.manufacturer
        ds.ManufacturerModelName = MODEL_NAME
        ds.DeviceSerialNumber = ctx.device_serial
        ds.SoftwareVersions = ctx.software_version
        ds.ContributingEquipmentSequence = [equipment]
        if "PatientPosition" in src:
            ds.PatientPosition = src.PatientPosition
        ds.Laterality = ""
        ds.InstanceNumber = k + 1
        ds.ContentDate, ds.ContentTime = date, time_
        ds.AcquisitionNumber = ""
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.DerivationDescription = derivation
        ds.DerivationCodeSequence = [resampling]
        picks = res.source_slices[k] if res.source_slices else range(len(res.moving.instances))
        ds.SourceImageSequence = [source_item(i) for i in picks]
        if reference is not None:
            ds.ReferencedInstanceSequence = [reference]
        ds.PatientOrientation = ""
        position = geom.slice_position(k)
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = spacing
        ds.SliceThickness = thickness
        ds.SpacingBetweenSlices = thickness
        ds.SliceLocation = _ds(position[2])
        for elem in acquisition:
            ds[elem.tag] = copy.copy(elem)
        if modality == "CT":
            ds.KVP = ds.get("KVP", "")
            ds.RescaleType = "HU"
        else:
            ds.ScanningSequence = ds.get("ScanningSequence", "RM")
            ds.SequenceVariant = ds.get("SequenceVariant", "NONE")
            for keyword in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"):
                if keyword not in ds:
                    setattr(ds, keyword, "")
            if "RepetitionTime" not in ds:
                ds.RepetitionTime = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = geom.shape[1], geom.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = rescale
        ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<i2").tobytes()
        out.append(settle_encoding(ds))
    return out
