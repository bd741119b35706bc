"""Sequences serialised by node.encoders.fastwrite are the bytes pydicom writes, for every kind of
object Hilum makes, in every character set, with text it cannot take (non-ASCII) left to pydicom."""
from __future__ import annotations

import copy
import struct
from io import BytesIO

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.encoders import encode_all
from node.encoders.common import settle_encoding
from node.encoders.fastwrite import presize_sequences
from tests.encoder_sources import context, ct_series
from tests.test_encoders_charsets import CHARSETS, _results
from tests.test_encoders_deterministic import KINDS, build_job


def _written(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _same_bytes(ds: Dataset) -> int:
    """How many sequences were presized; asserts the file is what pydicom alone writes."""
    plain = _written(copy.deepcopy(ds))
    n = presize_sequences(ds)
    assert _written(ds) == plain, ds.SOPClassUID
    return n


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory):
    results, sources = build_job(tmp_path_factory.mktemp("fastwrite"))
    return encode_all(results, sources, context())


def test_every_kind_of_object_is_written_byte_for_byte_as_pydicom_writes_it(every_kind):
    presized = {}
    for ds in every_kind:
        kind = KINDS[str(ds.SOPClassUID)]
        presized[kind] = presized.get(kind, 0) + _same_bytes(ds)
    assert set(presized) == set(KINDS.values())
    # It is used where the time goes: the SEGs' per-frame items, the structure set, the SR's tree.
    for kind in ("SEG", "Label Map SEG", "RTSTRUCT", "Comprehensive 3D SR"):
        assert presized[kind] > 0, (kind, presized)


@pytest.mark.parametrize("name", sorted(CHARSETS))
def test_character_sets_give_the_same_bytes(tmp_path, name):
    charset, patient = CHARSETS[name]
    series = ct_series(tmp_path / "src", charset=charset, patient_name=patient, seed=f"fw-{name}")
    for ds in encode_all(_results(series), {series.series_uid: series}, context()):
        _same_bytes(ds)


def _settled_item_holder(value_item: Dataset) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ReferencedImageSequence = Sequence([value_item])
    return settle_encoding(ds)


def test_what_it_does_not_write_itself_is_left_to_pydicom():
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.ContentDescription = "Lunge rechts, Überblähung"  # LO, not ASCII: the charset's bytes
    ds = _settled_item_holder(item)
    assert _same_bytes(ds) == 0 and not isinstance(ds.get_item("ReferencedImageSequence"), RawDataElement)

    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.ContentDescription = "Right lung"
    item.ReferencedFrameNumber = [1, 2, 3]  # IS, multi-valued
    item.PixelSpacing = [0.5, 0.25]  # DS
    item.ReferencedSegmentNumber = 7  # US
    ds = _settled_item_holder(item)
    assert _same_bytes(ds) == 1 and isinstance(ds.get_item("ReferencedImageSequence"), RawDataElement)


def test_a_value_it_cannot_encode_is_left_to_pydicom_to_write_or_refuse():
    item = Dataset()
    item.ReferencedSegmentNumber = 1
    ds = _settled_item_holder(item)
    ds.ReferencedImageSequence[0]["ReferencedSegmentNumber"].value = 70_000  # beyond US
    assert presize_sequences(ds) == 0
    with pytest.raises(Exception):
        _written(ds)  # pydicom's own error, as without presizing


def test_raw_bytes_under_an_item_pydicom_decodes_are_left_to_pydicom():
    """pydicom decodes everything under an item whose encoding is not settled and writes it anew
    (a group length inside is dropped): copying those raw bytes would give another file."""
    def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value

    body = element(0x0020, 0x0000, b"UL", struct.pack("<I", 14)) + element(0x0020, 0x000E, b"UI", b"1.2.3\0")
    items = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(body)) + body
    read = struct.pack("<HH", 0x0008, 0x1115) + b"SQ\0\0" + struct.pack("<I", len(items)) + items
    source = read_dataset(DicomBytesIO(read), False, True)  # settled, its sequence still raw
    ds = _settled_item_holder(Dataset())
    middle = Dataset()  # an item added after the whole was settled: its encoding is not
    middle.ReferencedStudySequence = [source]
    ds.ReferencedImageSequence = [middle]
    assert _same_bytes(ds) == 0
    settle_encoding(ds)  # settled all through: pydicom keeps the raw bytes, so may this module
    assert _same_bytes(ds) == 1


def test_an_implicit_vr_or_unsettled_data_set_is_not_touched():
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    ds = _settled_item_holder(item)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert presize_sequences(ds) == 0
    ds = _settled_item_holder(item)
    ds.set_original_encoding(None, None, None)  # pydicom would decode raw elements again: no gain
    assert presize_sequences(ds) == 0
