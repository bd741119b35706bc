"""Secondary Capture images for renders and key images.

One SC Image instance per frame (highdicom ``SCImage``), or, for a cine, one Multi-frame
Grayscale Byte or Multi-frame True Color SC instance (written here: highdicom has no builder for
those IODs). Renders carry no patient orientation that a viewer could trust, so Patient
Orientation is left empty (Type 2C, "unknown").
"""
from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.valuerep import format_number_as_ds
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
)

from node.encoders.common import (
    MODEL_NAME,
    choose_charset,
    clip_text,
    contributing_equipment,
    copy_patient_study,
    job_time,
    new_instance,
    series_description,
    source_series,
)
from node.encoders.context import EncodeContext
from node.results import ImageSeries
from node.volume import SeriesData

__all__ = ["encode_sc"]

CONVERSION_TYPE = "WSD"  # workstation: the image was rendered, not digitised



def _ds_spacing(spacing):
    """Pixel spacing as DS values of at most 16 characters (PS3.5 6.2), e.g. 0.872392991288903 → 0.87239299128890."""
    if not spacing:
        return None
    return [float(format_number_as_ds(float(v))) for v in spacing]

def _common(ds: Dataset, images: ImageSeries, source: Dataset, ctx: EncodeContext, description: str,
            charset) -> None:
    """Attributes both SC flavours share (after the SOP class specific ones)."""
    copy_patient_study(ds, source, charset)
    ds.SeriesDescription = description
    ds.ConversionType = CONVERSION_TYPE
    ds.SecondaryCaptureDeviceManufacturer = ctx.manufacturer
    ds.SecondaryCaptureDeviceManufacturerModelName = MODEL_NAME
    ds.SecondaryCaptureDeviceSoftwareVersions = ctx.software_version
    ds.ManufacturerModelName = MODEL_NAME
    ds.DeviceSerialNumber = ctx.device_serial
    ds.SoftwareVersions = ctx.software_version
    ds.BurnedInAnnotation = "YES" if images.burned_in_annotation else "NO"
    ds.PatientOrientation = ""
    ds.Laterality = source.get("Laterality", "")  # Type 2C: dciodvfy cannot know the body part is unpaired
    ds.DerivationDescription = clip_text(
        f"Rendered by {ctx.handler} {ctx.handler_version} (rule {ctx.rule}) from series {images.source_series_uid}",
        1024)
    ds.ContributingEquipmentSequence = [contributing_equipment(ctx)]
    job_time(ds, ctx)  # highdicom's SCImage stamps the clock


def _single_frames(images: ImageSeries, source: Dataset, ctx: EncodeContext, series_number: int,
                   description: str, charset) -> list[Dataset]:
    uid_key = ("SC", series_number)
    out = []
    for n, frame in enumerate(images.frames, start=1):
        sc = hd.sc.SCImage(
            pixel_array=frame,
            photometric_interpretation="RGB" if images.rgb else "MONOCHROME2",
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            # Required by highdicom for patient images; blanked in _common (orientation unknown).
            patient_orientation=("L", "P"),
            study_instance_uid=source.StudyInstanceUID,
            series_instance_uid=ctx.uid(*uid_key, "series"),
            series_number=series_number,
            sop_instance_uid=ctx.uid(*uid_key, "instance", n),
            instance_number=n,
            manufacturer=ctx.manufacturer,
            pixel_spacing=_ds_spacing(images.pixel_spacing_mm),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            specific_character_set=None,  # set by copy_patient_study
        )
        _common(sc, images, source, ctx, description, charset)
        if images.frame_labels:
            sc.ImageComments = images.frame_labels[n - 1]
        out.append(sc)
    return out


def _multiframe(images: ImageSeries, source: Dataset, ctx: EncodeContext, series_number: int,
                description: str, charset) -> Dataset:
    uid_key = ("SC", series_number)
    sop_class = (MultiFrameTrueColorSecondaryCaptureImageStorage if images.rgb
                 else MultiFrameGrayscaleByteSecondaryCaptureImageStorage)
    now = ctx.created
    ds = new_instance(sop_class, ctx.uid(*uid_key, "instance", 1))
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.Modality = "OT"
    ds.SeriesInstanceUID = ctx.uid(*uid_key, "series")
    ds.SeriesNumber = series_number
    ds.Manufacturer = ctx.manufacturer
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.ImageType = ["DERIVED", "SECONDARY"]
    frames = images.frames
    n, rows, cols = frames.shape[:3]
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if images.rgb:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PresentationLUTShape = "IDENTITY"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    # Frame Increment Pointer: the frames are labelled (FrameLabelVector) or simply pages.
    if images.frame_labels:
        ds.FrameLabelVector = [clip_text(label, 16) for label in images.frame_labels]  # SH
        ds.FrameIncrementPointer = Tag("FrameLabelVector")
    else:
        ds.PageNumberVector = list(range(1, n + 1))
        ds.FrameIncrementPointer = Tag("PageNumberVector")
    if images.pixel_spacing_mm:
        ds.PixelSpacing = _ds_spacing(images.pixel_spacing_mm)
    data = np.ascontiguousarray(frames).tobytes()
    ds.PixelData = data + b"\0" if len(data) % 2 else data
    _common(ds, images, source, ctx, description, charset)
    return ds


def encode_sc(images: ImageSeries, sources: dict[str, SeriesData], ctx: EncodeContext, *,
              series_number: int) -> list[Dataset]:
    series = source_series(sources, images.source_series_uid, "ImageSeries")
    description = series_description(images.description, "SC")
    charset = choose_charset(series.first, [description, *images.frame_labels], ctx)
    if images.multiframe:
        return [_multiframe(images, series.first, ctx, series_number, description, charset)]
    return _single_frames(images, series.first, ctx, series_number, description, charset)
