"""C-FIND study answers read from their bytes (node/pacs/answers.py) give exactly what pydicom's
decoding gave, over varied and odd answers; whatever the reader is not sure of goes to pydicom."""
from __future__ import annotations

import struct

import pytest

from node.pacs.answers import UNSURE, study_answer
from node.pacs.dimse import _study, _study_answer
from node.pacs.qrscu import decode_identifier

UID = b"1.2.826.0.1.3680043.8.498.1234567890"


def el(tag: int, value: bytes) -> bytes:
    """One implicit VR little endian element, its value as given (odd lengths too: a PACS may send them)."""
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def answer(**over: bytes | None) -> bytes:
    """A study answer as Orthanc sends one, with elements replaced (bytes) or left out (None)."""
    base = {
        0x00080005: b"ISO_IR 100", 0x00080020: b"20240101", 0x00080030: b"101500", 0x00080050: b"A123  ",
        0x00080052: b"STUDY ", 0x00080054: b"PACS", 0x00080056: b"ONLINE", 0x00080061: b"CT\\SR ",
        0x00081030: b"CT CHEST", 0x00100010: b"DOE^JANE", 0x00100020: b"P1", 0x00100021: b"HOSP",
        0x0020000D: UID + b"\0", 0x00201208: b"12",
    }
    names = {"charset": 0x00080005, "date": 0x00080020, "time": 0x00080030, "accession": 0x00080050,
             "modalities": 0x00080061, "description": 0x00081030, "name": 0x00100010, "pid": 0x00100020,
             "issuer": 0x00100021, "uid": 0x0020000D, "count": 0x00201208, "classes": 0x00080062}
    for k, v in over.items():
        if v is None:
            base.pop(names[k], None)
        else:
            base[names[k]] = v
    return b"".join(el(t, v) for t, v in sorted(base.items()))


FAST = [
    answer(),
    answer(charset=None),  # default repertoire
    answer(charset=b"ISO_IR 192", name="MÜLLER^JÖRG=ミュラー".encode()),
    answer(name="MÜLLER^JÖRG".encode("latin_1"), description="Thorax ñ  ".encode("latin_1")),
    answer(name=b"DOE^JANE^^^ \0", pid=b" P1 ", accession=b"", description=b"  LEADING"),
    answer(modalities=b"CT", count=b" 12 "), answer(modalities=b"", count=b""), answer(modalities=b"CT \\\\MR\\"),
    answer(classes=b"1.2.840.10008.5.1.4.1.1.2\\1.2.840.10008.5.1.4.1.1.88.22\0"), answer(classes=b"1.2.3\0"),
    answer(count=b"+7"), answer(count=b"0"), answer(date=b"20240101 ", time=b"101500.123 "),
    answer(uid=UID + b" "), answer(uid=b"1.2.3.4"),
]
UNSURE_ONES = [
    answer(charset=b"ISO 2022 IR 87"),  # a character set the reader does not decode
    answer(charset=None, name="MÜLLER".encode("latin_1")),  # non-ASCII without a character set
    answer(charset=b"ISO_IR 192", name=b"\xff\xfe"),  # not UTF-8
    answer(pid=b"P1\\P2"), answer(name=b"A^B\\C^D"), answer(date=b"20240101\\20240102"),  # multi-valued
    answer(count=b"1.0"), answer(count=b"abc"), answer(count=b"12\\13"), answer(count=b"--1"),
    answer(count=b"99999999999999999999"), answer(count=b"-5"),  # out of range: pydicom's path drops them
    answer() + el(0x00100020, b"P2"),  # the same tag twice
    answer() + struct.pack("<HHI", 0x0040, 0x0275, 0xFFFFFFFF) + b"\xfe\xff\xdd\xe0\0\0\0\0",  # undefined length
    answer()[:-3],  # truncated
]


@pytest.mark.parametrize("raw", FAST)
def test_the_byte_reader_gives_what_pydicom_gives(raw):
    fast = study_answer(raw)
    assert fast is not UNSURE
    assert fast == _study(decode_identifier(raw))


@pytest.mark.parametrize("raw", UNSURE_ONES)
def test_what_the_byte_reader_is_not_sure_of_goes_to_pydicom(raw):
    assert study_answer(raw) is UNSURE
    assert _study_answer(raw) == _study(decode_identifier(raw))  # the same outcome, malformed (None) included


def test_an_answer_without_a_study_uid_is_malformed_either_way():
    for raw in (answer(uid=None), answer(uid=b""), answer(uid=b"\0")):
        assert study_answer(raw) is None and _study(decode_identifier(raw)) is None


@pytest.mark.parametrize("count", [b"99999999999999999999", b"-5", b"2147483648"])
def test_a_count_out_of_range_is_taken_as_not_given(count):
    m = _study_answer(answer(count=count))
    assert m.study_uid == UID.decode() and m.instances is None
    assert _study_answer(answer(count=b"2147483647")).instances == 2147483647
