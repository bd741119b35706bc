"""The byte-level header reader gives exactly what pydicom gives, or steps aside (None)."""
from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, generate_uid)

from node.receive.header import WANTED, read_header


def _pydicom_facts(raw: bytes) -> dict[str, str]:
    ds = pydicom.dcmread(BytesIO(raw), stop_before_pixels=True)
    return {k: str(ds.get(k)) for k in WANTED.values() if ds.get(k) is not None}


def _encode(ds: Dataset, ts) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True, little_endian=ts != ExplicitVRBigEndian,
               implicit_vr=ts == ImplicitVRLittleEndian)
    return buf.getvalue()


def _ct(**attrs) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = attrs.pop("charset", "ISO_IR 100")
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyDate, ds.Modality, ds.AccessionNumber = "20261126", "CT", "A123"
    ds.StudyDescription, ds.SeriesDescription = "CT CHEST", "AXIAL 1.25"
    # Sequences (undefined length, nested) before the attributes that come after them.
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CTImageStorage, generate_uid()
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D3000", "SRT", "Chest"
    ref.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([ref, ref])
    ds.PatientName, ds.PatientID = "PHANTOM^CHEST", "PH-1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), generate_uid(), "3"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 2, 2, 16, 16, 15
    ds.PixelRepresentation, ds.SamplesPerPixel, ds.PhotometricInterpretation = 0, 1, "MONOCHROME2"
    ds.PixelData = b"\0" * 8
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_same_as_pydicom_with_nested_sequences(ts):
    raw = _encode(_ct(), ts)
    got = read_header(raw)
    assert got is not None and got[0] == ts
    assert got[1] == _pydicom_facts(raw)


@pytest.mark.parametrize("charset,name", [("ISO_IR 100", "Müller^Jürgen"), ("ISO_IR 192", "Øster^Åsa=山田^太郎"),
                                          ("", "PLAIN^NAME")])
def test_character_sets_it_knows_decode_like_pydicom(charset, name):
    raw = _encode(_ct(charset=charset, PatientName=name), ExplicitVRLittleEndian)
    got = read_header(raw)
    assert got is not None and got[1] == _pydicom_facts(raw)
    assert got[1]["PatientName"] == name


@pytest.mark.parametrize("case", ["big-endian", "deflated", "gb18030", "multi-valued", "truncated", "not-part10"])
def test_anything_unsure_is_left_to_pydicom(case):
    ts = {"big-endian": ExplicitVRBigEndian, "deflated": DeflatedExplicitVRLittleEndian}.get(case,
                                                                                            ExplicitVRLittleEndian)
    ds = _ct(charset="GB18030") if case == "gb18030" else _ct()
    if case == "multi-valued":
        ds.SeriesDescription = ["A", "B"]
    raw = _encode(ds, ts)
    if case == "truncated":
        raw = raw[:400]
    if case == "not-part10":
        raw = raw[132:]
    assert read_header(raw) is None


def test_compressed_instances_are_read_too(tmp_path):
    from node.phantom import generate_ct

    study = generate_ct(tmp_path / "rle", seed=2, rows=32, cols=32, slices=3, nodules=0, transfer_syntax="rle")
    for f in sorted(study.dicom_dir.iterdir()):
        raw = f.read_bytes()
        got = read_header(raw)
        assert got is not None and got[0] == "1.2.840.10008.1.2.5"
        assert got[1] == _pydicom_facts(raw)


def test_phantom_instances_of_every_kind_match_pydicom(phantom_ct, phantom_mr, phantom_cr):
    for study in (phantom_ct, phantom_mr, phantom_cr):
        for f in sorted(study.dicom_dir.iterdir())[:5]:
            raw = f.read_bytes()
            got = read_header(raw)
            assert got is not None, f
            assert got[1] == _pydicom_facts(raw), f
