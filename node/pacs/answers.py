"""C-FIND study answers read from their bytes, without pydicom.

A study-level C-FIND answers one identifier per study (1 000 for a wide query), a few short
elements each. Decoding each through pydicom (a Dataset, then one DataElement conversion per
attribute read) cost about 0.3 ms per answer, more than the PACS took to send it. The answers
arrive in implicit VR little endian (the only transfer syntax the node proposes for C-FIND,
node/pacs/qrscu.py), so the elements are a tag, a length and a value; this walks them and turns
the values the node keeps into text exactly as pydicom would (tests/test_pacs_answers.py compares
the two over varied answers).

Anything it is not sure about (an undefined length, a tag twice, a character set other than the
default, Latin-1 or UTF-8, bytes the character set cannot decode, a multi-valued field that is not
multi-valued by definition, a count that is not a plain integer in 0..MAX_COUNT) returns ``UNSURE``, and the caller
decodes that answer with pydicom instead. It never guesses.
"""
from __future__ import annotations

import struct

from node.pacs.model import MAX_COUNT, StudyMatch

UNSURE = object()

_CHARSET = 0x00080005
# The study answer's attributes the node keeps: tag -> (keyword, kind). ``text``: SH/LO/PN, decoded in
# the answer's character set; ``plain``: CS/DA/TM/UI, ASCII; ``multi``: multi-valued by definition
# (ModalitiesInStudy CS, SOPClassesInStudy UI); ``count``: IS.
_STUDY = {
    0x00100020: ("patient_id", "text"), 0x00100010: ("patient_name", "pn"), 0x00080020: ("study_date", "plain"),
    0x00080030: ("study_time", "plain"), 0x00080050: ("accession", "text"), 0x00081030: ("description", "text"),
    0x00080061: ("modalities", "multi"), 0x00201208: ("instances", "count"), 0x0020000D: ("study_uid", "plain"),
    0x00080062: ("sop_classes", "multi"), 0x00100021: ("issuer", "text"),
}
_CHARSETS = {"": "ascii", "ISO_IR 6": "ascii", "ISO 2022 IR 6": "ascii", "ISO_IR 100": "latin_1",
             "ISO_IR 192": "utf_8"}


class _Unsure(Exception):
    pass


def study_answer(data: bytes | bytearray) -> StudyMatch | None | object:
    """The StudyMatch of one C-FIND study answer; None if it has no StudyInstanceUID (malformed);
    ``UNSURE`` when pydicom must decide."""
    try:
        values = _elements(data)
        encoding = _CHARSETS.get(values.pop(_CHARSET, b"").decode("ascii").rstrip(" \0").lstrip(" "))
        if encoding is None:
            return UNSURE
        out: dict[str, object] = {}
        for tag, raw in values.items():
            name, kind = _STUDY[tag]
            out[name] = _value(raw, kind, encoding)
    except (_Unsure, UnicodeDecodeError, struct.error):
        return UNSURE
    if not out.get("study_uid"):
        return None
    return StudyMatch(study_uid=out["study_uid"], patient_id=out.get("patient_id", ""),
                      patient_name=out.get("patient_name", ""), study_date=out.get("study_date", ""),
                      study_time=out.get("study_time", ""), accession=out.get("accession", ""),
                      description=out.get("description", ""), modalities=out.get("modalities", []),
                      instances=out.get("instances"), sop_classes=out.get("sop_classes", []),
                      issuer=out.get("issuer", ""))


def _elements(data: bytes | bytearray) -> dict[int, bytes]:
    """The values of the kept tags (and the character set), by tag; every element is checked to fit."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise _Unsure
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if length == 0xFFFFFFFF or pos + length > end:
            raise _Unsure  # a sequence of undefined length, or truncated: pydicom decides
        tag = (group << 16) | elem
        if tag in _STUDY or tag == _CHARSET:
            if tag in out:
                raise _Unsure
            out[tag] = bytes(data[pos: pos + length])
        pos += length
    return out


def _value(raw: bytes, kind: str, encoding: str) -> object:
    """One value as ``node.pacs.dimse._study`` makes it from pydicom's."""
    if kind == "text":  # SH / LO: each value's trailing spaces and NULs dropped, joined again
        text = raw.decode(encoding)
        if "\\" in text:
            raise _Unsure
        return text.rstrip("\0 ")
    if kind == "pn":  # PN: trailing spaces and NULs of the whole value
        text = raw.rstrip(b"\0 ").decode(encoding)
        if "\\" in text:
            raise _Unsure
        return text
    text = raw.decode("ascii").rstrip(" \0")
    if kind == "plain":
        if "\\" in text:
            raise _Unsure
        return text
    if kind == "multi":  # pydicom's MultiValue: split, each value kept as it is (empty ones too)
        items = text.split("\\")
        return items if len(items) > 1 else ([items[0]] if items[0] else [])
    # count (IS): empty is "not given"; anything but a plain integer goes to pydicom
    if not text:
        return None
    digits = text.strip(" ")
    if not digits.lstrip("+-").isdigit() or digits[:1] in "+-" and digits[1:2] in "+-":
        raise _Unsure
    if not 0 <= (n := int(digits)) <= MAX_COUNT:
        raise _Unsure  # pydicom's path drops it with a warning naming the study (model.answered_count)
    return n
