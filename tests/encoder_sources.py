"""Small synthetic source series for the encoder tests, written as valid CT Image instances.

Built here (not by the phantom) so each test controls exactly what the encoders must cope with:
oblique planes, character sets, missing Type 2 attributes, irregular spacing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.uids import derived_uid
from node.volume import SeriesData, load_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def oblique_orientation(degrees: float = 25.0) -> tuple[float, ...]:
    """Row/column directions rotated about two axes: a truly oblique plane."""
    a, b = np.radians(degrees), np.radians(degrees / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = rx @ rz
    return tuple(float(v) for v in (*m[:, 0], *m[:, 1]))


def write_ct_series(
    out_dir: Path,
    *,
    rows: int = 64,
    cols: int = 64,
    slices: int = 20,
    pixel_spacing: float = 0.8,
    slice_spacing: float = 2.5,
    orientation: tuple[float, ...] = AXIAL,
    origin: tuple[float, float, float] = (-25.0, -30.0, -40.0),
    z_offsets: list[float] | None = None,
    charset: str | list[str] | None = None,
    patient_name: str = "PHANTOM^CHEST",
    drop: tuple[str, ...] = (),
    seed: str = "src",
) -> list[Path]:
    """Write a CT series (HU-like pixels) and return its file paths, in shuffled order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    study, series, frame = (derived_uid(seed, x) for x in ("study", "series", "for"))
    offsets = z_offsets if z_offsets is not None else [k * slice_spacing for k in range(slices)]
    yy, xx = np.mgrid[:rows, :cols]
    paths = []
    for k, dz in enumerate(offsets):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = derived_uid(seed, "sop", k)
        if charset is not None:
            ds.SpecificCharacterSet = charset
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName = patient_name
        ds.PatientID = "PHANTOM-001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.PatientAge = "055Y"
        ds.StudyInstanceUID = study
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = "ACC0001"
        ds.StudyDescription = "CT CHEST PHANTOM"
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = 2
        ds.SeriesDescription = "Chest 2.5mm"
        ds.Laterality = ""
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "Synthetic"
        ds.InstanceNumber = len(offsets) - k  # deliberately not in geometric order
        ds.PatientOrientation = ""
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = ds.StudyTime
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ipp = np.array(origin) + normal * dz
        ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in orientation]
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.SliceThickness = slice_spacing
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.KVP = 120
        ds.WindowCenter, ds.WindowWidth = 40, 400
        body = ((yy - rows / 2) ** 2 + (xx - cols / 2) ** 2) < (0.4 * min(rows, cols)) ** 2
        pixels = np.where(body, 1064, 24).astype(np.int16) + np.int16(k)
        ds.PixelData = pixels.tobytes()
        for keyword in drop:
            if keyword in ds:
                delattr(ds, keyword)
        path = out_dir / f"{derived_uid(seed, 'name', k)[-12:]}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def ct_series(out_dir: Path, **kwargs) -> SeriesData:
    """Write a series with ``write_ct_series`` and load it the way handlers receive it."""
    return load_series(write_ct_series(out_dir, **kwargs))


def write_enhanced_ct(out_dir: Path, *, frames: int = 4, rows: int = 32, cols: int = 32) -> Path:
    """A small Enhanced CT multi-frame instance (via highdicom's legacy converter)."""
    import highdicom as hd

    paths = write_ct_series(out_dir / "legacy", rows=rows, cols=cols, slices=frames, seed="enh")
    legacy = [pydicom.dcmread(p) for p in paths]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=legacy,
        series_instance_uid=derived_uid("enh", "mf-series"),
        series_number=3,
        sop_instance_uid=derived_uid("enh", "mf-sop"),
        instance_number=1,
    )
    path = out_dir / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    return path




def segment_table():
    """Three structures with SNOMED codes, TG-263 names and RT types, as a handler would declare them."""
    from node.results import Code, Segment

    anat = Code("91723000", "SCT", "Anatomical Structure")
    return (
        Segment(1, "Body", anat, Code("38266002", "SCT", "Entire body"), tg263="External",
                color=(0, 255, 0), rt_roi_type="EXTERNAL"),
        Segment(4, "Left lung", anat, Code("44029006", "SCT", "Left lung"), tg263="Lung_L", color=(0, 0, 255)),
        Segment(9, "Bone", anat, Code("272673000", "SCT", "Bone"), tg263="Bone", color=(255, 255, 200)),
    )


def context(**overrides):
    from node.encoders.context import EncodeContext

    values = dict(job_key="job-42", rule="chest-ct-anatomy", handler="ct-anatomy", handler_version="1.2.0",
                  model_name="lungnet", model_version="3.1")
    values.update(overrides)
    return EncodeContext(**values)


def save_valid(ds, directory: Path, name: str | None = None) -> Path:
    """Write ``ds`` as a Part 10 file and fail on any dciodvfy error; return the path."""
    from tests.iod import assert_valid_iod

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or f"{ds.Modality}-{ds.SeriesNumber}-{ds.InstanceNumber}.dcm")
    ds.save_as(path, enforce_file_format=True)
    assert_valid_iod(path)
    return path


def rasterise_even_odd(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Fill (row, col) polygons at pixel centres with the even-odd rule (as a TPS combines contours)."""
    rows, cols = shape
    toggles = np.zeros((rows, cols + 1), dtype=np.int64)
    for poly in polygons:
        y0, x0 = poly[:, 0], poly[:, 1]
        y1, x1 = np.roll(y0, -1), np.roll(x0, -1)
        lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
        for j in range(rows):
            sel = (lo <= j) & (j < hi)  # half-open: a vertex on the scan line counts once
            if not sel.any():
                continue
            xi = x0[sel] + (j - y0[sel]) / (y1[sel] - y0[sel]) * (x1[sel] - x0[sel])
            np.add.at(toggles[j], np.clip(np.floor(xi).astype(int) + 1, 0, cols), 1)
    return (np.cumsum(toggles, axis=1)[:, :cols] % 2).astype(bool)


def external_truth(labels: np.ndarray, segment) -> np.ndarray:
    """What an RTSTRUCT's EXTERNAL structure outlines: the segment's region (its label and those
    it includes) with, slice by slice, every hole filled, a hole being background that does not
    reach the slice's edge, diagonal steps included (8-connected, as the contours have it)."""
    from scipy import ndimage

    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = True
    return ndimage.binary_fill_holes(np.isin(labels, (segment.label, *segment.includes)), structure=in_plane)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def anatomy_labels(shape: tuple[int, int, int]) -> np.ndarray:
    """Labels for ``segment_table``: a body touching the image border with the lungs cut out of it
    (holes), a lung in two islands per slice, one of them a ring with bone inside its hole, and
    bone pieces that touch the border, each other diagonally, or are a single pixel."""
    s, r, c = shape
    yy, xx = np.mgrid[:r, :c]
    labels = np.zeros(shape, dtype=np.uint8)
    for k in range(2, s - 2):
        body = ((yy - r * 0.5) / (r * 0.45)) ** 2 + ((xx - c * 0.42) / (c * 0.5)) ** 2 < 1  # cut by the left edge
        ring = (((yy - r * 0.4) ** 2 + (xx - c * 0.3) ** 2) < (r * 0.15) ** 2)
        hole = (((yy - r * 0.4) ** 2 + (xx - c * 0.3) ** 2) < (r * 0.06 + k % 3) ** 2)
        island = (np.abs(yy - r * 0.7) < r * 0.08) & (np.abs(xx - c * 0.62) < c * 0.1 + k % 4)
        labels[k][body] = 1
        labels[k][ring | island] = 4
        labels[k][hole] = 9  # bone inside the lung's hole: nested contours
        labels[k][hole & (xx < c * 0.3)] = 0  # ... and background beside it
    labels[3:9, r - 4:, c // 3:c // 3 + 10] = 9  # bone touching the bottom border
    labels[5, 10, c - 14], labels[5, 11, c - 13], labels[5, 10, c - 12] = 9, 9, 9  # diagonal neighbours (saddles)
    labels[min(6, s - 1), 0, c - 1] = 9  # a single pixel in the corner
    return labels
