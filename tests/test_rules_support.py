"""Shared pieces for the rules tests: synthetic DICOM headers and small test handlers.

Headers are written as Part 10 files and read back with ``stop_before_pixels`` so the facts see
exactly what a receiver sees (DS/IS as text in the file, private elements, no pixel data).
"""
from __future__ import annotations

import io
import textwrap
from datetime import datetime
from pathlib import Path

import pydicom
from pydantic import BaseModel, ConfigDict
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from node.handler_api import Handler
from node.rules.facts import SeriesFacts, StudyFacts

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
BASIC_SR = "1.2.840.10008.5.1.4.1.1.88.11"
AXIAL = ["1", "0", "0", "0", "1", "0"]
CORONAL = ["1", "0", "0", "0", "0", "-1"]
SAGITTAL = ["0", "1", "0", "0", "0", "-1"]
ARRIVED = datetime(2025, 3, 12, 14, 30, 0)  # a Wednesday afternoon


def _base(sop_class: str, modality: str, study: str, series: str, **attrs) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = f"{series}.1"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = modality
    ds.PatientName = "PHANTOM^CHEST"
    ds.PatientID = "PHANTOM-001"
    ds.PatientBirthDate = "19800615"
    ds.PatientSex = "O"
    ds.StudyDate = "20250312"
    ds.StudyTime = "143000"
    ds.Manufacturer = "PHANTOM"
    ds.SeriesNumber = "3"
    ds.InstanceNumber = "007"
    for k, v in attrs.items():
        if v is None:
            if k in ds:
                delattr(ds, k)
        else:
            setattr(ds, k, v)
    return ds


def ct_header(study: str = "1.2.826.0.1.3680043.10.1.1", series: str = "1.2.826.0.1.3680043.10.1.1.1",
              **attrs) -> Dataset:
    ds = _base(CT_IMAGE, "CT", study, series, BodyPartExamined="CHEST", SeriesDescription="Thorax 1.0 B31f",
               StudyDescription="CT CHEST W/O CONTRAST", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
               SliceThickness="1.6000", ImageOrientationPatient=AXIAL,
               ImagePositionPatient=["-250", "-250", "-100.5"], PixelSpacing=["0.7", "0.8"], Rows=512,
               Columns=512, KVP="120")
    ds.private_block(0x0009, "HILUM TEST", create=True).add_new(0x01, "LO", "lung-protocol")
    ds.private_block(0x0009, "HILUM TEST").add_new(0x02, "DS", "2.50")
    for k, v in attrs.items():
        if v is None:
            if k in ds:
                delattr(ds, k)
        else:
            setattr(ds, k, v)
    return roundtrip(ds)


def mr_header(study: str = "1.2.826.0.1.3680043.10.1.2", series: str = "1.2.826.0.1.3680043.10.1.2.1",
              **attrs) -> Dataset:
    defaults = dict(BodyPartExamined="BRAIN", SeriesDescription="t1_mprage_sag", StudyDescription="MR HEAD",
                    ImageType=["ORIGINAL", "PRIMARY", "M", "ND"], SliceThickness="1", PatientAge="045Y",
                    ImageOrientationPatient=SAGITTAL, ImagePositionPatient=["-80", "-120", "100"],
                    PixelSpacing=["1", "1"], MagneticFieldStrength="3")
    return roundtrip(_base(MR_IMAGE, "MR", study, series, **{**defaults, **attrs}))


def cr_header(study: str = "1.2.826.0.1.3680043.10.1.3", series: str = "1.2.826.0.1.3680043.10.1.3.1",
              modality: str = "CR", **attrs) -> Dataset:
    defaults = dict(BodyPartExamined="CHEST", SeriesDescription="PA", StudyDescription="XR CHEST PA",
                    ImageType=["ORIGINAL", "PRIMARY"], PatientAge="006M")
    sop = CR_IMAGE if modality == "CR" else DX_IMAGE
    return roundtrip(_base(sop, modality, study, series, **{**defaults, **attrs}))


def other_header(sop_class: str, modality: str, study: str, series: str, **attrs) -> Dataset:
    return roundtrip(_base(sop_class, modality, study, series, **attrs))


def roundtrip(ds: Dataset) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()), stop_before_pixels=True)


def facts(ds: Dataset, *, instance_count: int = 120, arrived_at: datetime = ARRIVED, calling_ae: str = "CT_SCANNER_1",
          called_ae: str = "HILUM", source_ip: str = "10.1.2.3", is_volume: bool | None = None) -> SeriesFacts:
    return SeriesFacts.from_dataset(ds, instance_count=instance_count, calling_ae=calling_ae, called_ae=called_ae,
                                    source_ip=source_ip, arrived_at=arrived_at, study_uid=ds.StudyInstanceUID,
                                    series_uid=ds.SeriesInstanceUID, is_volume=is_volume)


def study(*series: SeriesFacts) -> StudyFacts:
    return StudyFacts(list(series))


# -- handlers ---------------------------------------------------------------------------------

class SegParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = 0.5
    organs: list[str] = ["lung_left", "lung_right"]


class AnyParams(BaseModel):
    model_config = ConfigDict(extra="allow")


def handler_class(name: str, params: type[BaseModel]) -> type[Handler]:
    return type(f"Test_{name.replace('-', '_')}", (Handler,), {"name": name, "version": "0.0.1", "Params": params})


TEST_HANDLERS = {
    "test-seg": handler_class("test-seg", SegParams),
    "test-overview": handler_class("test-overview", AnyParams),
}
SHIPPED_HANDLERS = {n: handler_class(n, AnyParams)
                    for n in ("ct-anatomy", "renders", "overview", "registration", "lung-nodules")}
DESTINATIONS = {"orthanc", "tps", "pacs"}


def lookup(table: dict[str, type[Handler]]):
    def get(name: str) -> type[Handler]:
        try:
            return table[name]
        except KeyError:
            raise KeyError(f"no handler named {name!r}; known: {', '.join(sorted(table))}") from None

    return get


def write_rules(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory
