"""Writing phantom instances as DICOM Part 10 files.

One template dataset per series holds every module attribute; each instance only changes its
UID, position and pixels, so a 300-slice series costs little more than its pixel bytes.
File names are a hash of the SOP Instance UID: like a real modality's, they say nothing of order.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.pixels import get_encoder
from pydicom.tag import Tag
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from node import __version__
from node.uids import derived_uid

TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "j2k": JPEG2000Lossless,
}
IMPLEMENTATION_UID = derived_uid("hilum", "implementation-class")


@dataclass(frozen=True)
class StudyInfo:
    patient_name: str
    patient_id: str
    study_uid: str
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS
    accession: str
    study_id: str
    description: str
    birth_date: str = "19600101"
    sex: str = "O"


@dataclass(frozen=True)
class SeriesInfo:
    modality: str
    sop_class_uid: str
    series_uid: str
    series_number: int
    description: str
    body_part: str
    frame_of_reference_uid: str | None = None
    patient_position: str | None = None  # Type 2C for CT and MR


def instance_file_name(sop_uid: str) -> str:
    return hashlib.sha256(sop_uid.encode()).hexdigest()[:20] + ".dcm"


def series_template(study: StudyInfo, series: SeriesInfo) -> Dataset:
    """Patient, General Study, General Series, Frame of Reference, General Equipment, SOP Common."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = series.sop_class_uid
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = f"HILUM_{__version__}"[:16]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = study.study_time
    ds.SOPClassUID = series.sop_class_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession
    ds.Modality = series.modality
    ds.Manufacturer = "Hilum"
    ds.InstitutionName = "Hilum Phantom Site"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM1"
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = "Synthetic phantom"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.BodyPartExamined = series.body_part
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = f"hilum {__version__}"
    if series.patient_position is not None:
        ds.PatientPosition = series.patient_position
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.series_number
    ds.AcquisitionNumber = 1
    if series.frame_of_reference_uid is not None:
        ds.FrameOfReferenceUID = series.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
    return ds


def set_pixel_format(ds: Dataset, rows: int, cols: int, bits_stored: int,
                     photometric: str = "MONOCHROME2") -> None:
    """Image Pixel module for unsigned 16-bit grey pixels."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0


def _explicit_element(tag: int, vr: str, value: bytes) -> bytes:
    """One explicit-VR little-endian element with a 2-byte length (the file meta's UI and UL elements)."""
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


class InstanceWriter:
    """Writes instances of one series from its template in the chosen transfer syntax.

    The template's constant elements are encoded once (by pydicom); per instance only the file
    meta, the attributes that vary and the pixel data are encoded, and the byte runs are joined in
    tag order. The files are byte for byte what ``Dataset.save_as`` writes, at a fraction of its cost.
    """

    def __init__(self, template: Dataset, out_dir: Path, transfer_syntax: str,
                 per_instance: tuple[str, ...] = ("SOPInstanceUID", "InstanceNumber", "ImagePositionPatient",
                                                  "SliceLocation")) -> None:
        if transfer_syntax not in TRANSFER_SYNTAXES:
            raise ValueError(f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}, got {transfer_syntax!r}")
        self.out_dir = Path(out_dir)
        self.ts = TRANSFER_SYNTAXES[transfer_syntax]
        self.implicit = self.ts == ImplicitVRLittleEndian
        self.encodings = convert_encodings(template.get("SpecificCharacterSet", "ISO_IR 100"))
        self.encoder = get_encoder(self.ts) if self.ts.is_compressed else None
        self.rows, self.cols = int(template.Rows), int(template.Columns)
        self.encode_args = dict(
            rows=self.rows, columns=self.cols, samples_per_pixel=1, bits_allocated=16,
            bits_stored=int(template.BitsStored), pixel_representation=0,
            photometric_interpretation=str(template.PhotometricInterpretation), number_of_frames=1,
        )
        for k in per_instance:
            if k in template:
                raise ValueError(f"template must not set per-instance attribute {k}")
        if "PixelData" in template:
            raise ValueError("template must not hold PixelData")
        # File meta around (0002,0003) Media Storage SOP Instance UID, the only part that varies.
        fm = template.file_meta
        self.meta_head = self._explicit(Tag(0x00020001), "OB", b"\0\1") + self._explicit(
            Tag(0x00020002), "UI", fm.MediaStorageSOPClassUID)
        self.meta_tail = b"".join(self._explicit(Tag(t), vr, v) for t, vr, v in (
            (0x00020010, "UI", self.ts), (0x00020012, "UI", fm.ImplementationClassUID),
            (0x00020013, "SH", fm.ImplementationVersionName)))
        # Constant runs between the per-instance tags; the pixel data comes last.
        self.order = sorted((Tag(tag_for_keyword(k)), k) for k in per_instance)
        bounds = [t for t, _ in self.order] + [Tag(0x7FE00010)]
        runs: list[list[DataElement]] = [[] for _ in bounds]
        for elem in template:
            runs[next(n for n, b in enumerate(bounds) if elem.tag < b)].append(elem)
        self.constant = [b"".join(self._element(e) for e in run) for run in runs]
        self.pixel_header = (struct.pack("<HHI", 0x7FE0, 0x0010, 0) if self.implicit
                             else struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 0))[:-4]

    def _element(self, elem: DataElement, implicit: bool | None = None) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = self.implicit if implicit is None else implicit
        write_data_element(fp, elem, self.encodings)
        return fp.getvalue()

    def _explicit(self, tag: Tag, vr: str, value) -> bytes:
        return self._element(DataElement(tag, vr, value), implicit=False)

    def _file_meta(self, sop_uid: str) -> bytes:
        uid = sop_uid.encode()
        uid += b"\0" * (len(uid) % 2)
        body = self.meta_head + _explicit_element(0x00020003, "UI", uid) + self.meta_tail
        return b"\0" * 128 + b"DICM" + _explicit_element(0x00020000, "UL", struct.pack("<I", len(body))) + body

    def write(self, pixels: np.ndarray, sop_uid: str, **attributes) -> Path:
        if pixels.dtype != np.uint16 or pixels.shape != (self.rows, self.cols):
            raise ValueError(f"pixels must be uint16 {self.rows}x{self.cols}, got {pixels.dtype} {pixels.shape}")
        values = {"SOPInstanceUID": sop_uid, **attributes}
        parts = [self._file_meta(sop_uid), self.constant[0]]
        for n, (tag, keyword) in enumerate(self.order):
            if keyword not in values:
                raise ValueError(f"write: per-instance attribute {keyword} missing")
            parts += [self._element(DataElement(tag, dictionary_VR(tag), values.pop(keyword))), self.constant[n + 1]]
        if values:
            raise ValueError(f"write: {sorted(values)} are not per-instance attributes of this writer")
        if self.encoder is None:
            data = pixels.astype("<u2", copy=False).tobytes()
            parts += [self.pixel_header, struct.pack("<I", len(data)), data]
        else:
            frame = self.encoder.encode(np.ascontiguousarray(pixels), encoding_plugin="pylibjpeg", **self.encode_args)
            elem = DataElement(Tag(0x7FE00010), "OB", encapsulate([frame]))
            elem.is_undefined_length = True
            parts.append(self._element(elem))
        path = self.out_dir / instance_file_name(sop_uid)
        path.write_bytes(b"".join(parts))
        return path
