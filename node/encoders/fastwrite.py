"""A result's sequences serialised in one pass, byte for byte as pydicom writes them.

pydicom writes a data set element by element through a general-purpose path (a buffer, an
encoding lookup and an ambiguous-VR check for every element and every item). A SEG's Per-frame
Functional Groups are thousands of small elements in hundreds of nested items: pydicom took
0.15-0.2 CPU s for each of ct-anatomy's 300-frame SEGs, longer than highdicom took to build them.
``presize_sequences`` encodes each top-level sequence here, into a raw element that pydicom then
copies as it is. Only the explicit VR little endian encoding and the value types a result holds
are done here (ASCII strings, DS/IS, binary numbers, nested sequences); a sequence holding anything
else (a person name, non-ASCII text, a date object, an ambiguous VR) is left to pydicom whole, so
the bytes never differ from pydicom's (tests/test_encoders_fastwrite.py compares them).
"""
from __future__ import annotations

import struct

import numpy as np
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import _LUT_DESCRIPTOR_TAGS as _LUT_DESCRIPTORS
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

__all__ = ["presize_sequences"]

_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, 0)[:4]
_STRINGS = frozenset({"AE", "AS", "CS", "UI", "UR", "DA", "TM", "DT"})
_TEXT = frozenset({"SH", "LO", "ST", "LT", "UC", "UT"})  # ASCII is the same bytes in every character set
_NUMBERS = {"US": "H", "UL": "L", "SS": "h", "SL": "l", "FD": "d", "FL": "f", "SV": "q", "UV": "Q"}
_LONG = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
# Syntaxes whose data set is explicit VR little endian (the encapsulated ones only differ in Pixel Data).
_EXPLICIT_LE = frozenset({ExplicitVRLittleEndian, JPEGLSLossless, RLELossless, "1.2.840.10008.1.2.4.80",
                          "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.50"})


class _Unsupported(Exception):
    """Something this writer does not do exactly as pydicom: pydicom writes the sequence."""


def _multi(value) -> bool:
    """Multi-valued as pydicom's text writers take it (a NumPy array too: DS/IS read as arrays)."""
    return isinstance(value, (list, tuple, MultiValue, np.ndarray))


def _ascii(text: str) -> bytes:
    if not text.isascii():
        raise _Unsupported
    return text.encode("ascii")


def _string_value(value, padding: bytes) -> bytes:
    if _multi(value):
        if not all(isinstance(v, str) for v in value):
            raise _Unsupported
        out = _ascii("\\".join(value))
    elif isinstance(value, str):
        out = _ascii(value)
    else:
        raise _Unsupported  # a date or time object, bytes: pydicom formats those
    return out + padding if len(out) % 2 else out


def _number_string(value) -> bytes:
    def one(x) -> str:
        return x.original_string if hasattr(x, "original_string") else str(x)

    text = "\\".join(one(x) for x in value) if _multi(value) else one(value)
    out = _ascii(text)
    return out + b" " if len(out) % 2 else out


def _value(elem: DataElement, vr: str, decoded: bool = False) -> bytes:
    value = elem.value
    if vr == "SQ":
        return b"".join(_item(ds, decoded) for ds in value)
    if vr in _NUMBERS:
        if isinstance(value, np.ndarray) or elem.tag in _LUT_DESCRIPTORS:
            raise _Unsupported  # pydicom packs an array as one value (and fails), a descriptor's first as US
        fmt = _NUMBERS[vr]
        if hasattr(value, "append"):  # pydicom's test for several numbers
            return struct.pack(f"<{len(value)}{fmt}", *value)
        return struct.pack(f"<{fmt}", value)
    if vr == "UI":
        return _string_value(value, b"\0")
    if vr in _STRINGS or vr in _TEXT:
        return _string_value(value, b" ")
    if vr in ("DS", "IS"):
        return _number_string(value)
    if vr in ("OB", "UN") and isinstance(value, bytes):
        return value + b"\0" if len(value) % 2 and vr == "OB" else value
    raise _Unsupported


def _element(elem, decoded: bool) -> bytes:
    if elem.tag.element == 0 and elem.tag.group > 6:
        return b""  # group lengths are not written (PS3.5 7.2)
    vr = elem.VR
    if vr is None or len(vr) != 2:
        raise _Unsupported  # implicit or ambiguous: pydicom decides it
    if isinstance(elem, RawDataElement):
        if elem.length == 0xFFFFFFFF or (elem.value is None and elem.length):
            raise _Unsupported  # undefined length, or a value not read yet (deferred)
        value = elem.value or b""
    else:
        if elem.is_undefined_length or getattr(elem, "is_buffered", False):
            raise _Unsupported
        value = b"" if elem.is_empty else _value(elem, vr, decoded)
    tag = struct.pack("<HH", elem.tag.group, elem.tag.element)
    if vr in _LONG:
        return tag + vr.encode() + struct.pack("<HI", 0, len(value)) + value
    if len(value) > 0xFFFF:
        raise _Unsupported  # pydicom turns it into UN, with a warning
    return tag + vr.encode() + struct.pack("<H", len(value)) + value


def _item(ds: Dataset, decoded: bool) -> bytes:
    """One item; ``decoded``: pydicom decodes every raw element in it (an item above it is not
    settled: its ambiguous-VR pass decodes the whole subtree, and the subtree is written anew)."""
    if not isinstance(ds, Dataset) or getattr(ds, "is_undefined_length_sequence_item", False):
        raise _Unsupported
    if "SpecificCharacterSet" in ds:
        raise _Unsupported  # an item with a character set of its own
    decoded = decoded or not _settled(ds)
    if decoded and any(isinstance(e, RawDataElement) for e in ds._dict.values()):
        raise _Unsupported  # pydicom decodes and re-encodes those first
    body = b"".join(_element(ds.get_item(tag), decoded) for tag in sorted(ds.keys()))
    return _ITEM + struct.pack("<I", len(body)) + body


def _settled(ds: Dataset) -> bool:
    """Whether pydicom writes ``ds``'s undecoded elements as they are (``settle_encoding``);
    otherwise it decodes each first, and would decode a presized sequence again."""
    return ds.original_encoding == (False, True) and ds.original_character_set == ds._character_set


def presize_sequences(ds: Dataset, min_items: int = 1) -> int:
    """Encode every top-level sequence of ``ds`` with at least ``min_items`` items here and put it
    back as a raw element holding those bytes; returns how many were. In place: the data set is
    about to be written (the file's bytes are the same either way). A data set whose encoding is
    not settled (``node.encoders.common.settle_encoding``) is left as it is: pydicom would decode
    the raw elements again before writing them."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax not in _EXPLICIT_LE or not _settled(ds):
        return 0
    done = 0
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement) or elem.VR != "SQ" or elem.is_undefined_length:
            continue
        if len(elem.value) < min_items:
            continue
        try:
            value = _value(elem, "SQ")
        except Exception:  # noqa: BLE001 - _Unsupported, or a value pydicom reports better (a US of 70 000):
            continue  # pydicom writes the sequence, or raises, exactly as it did without this module
        ds[tag] = RawDataElement(elem.tag, "SQ", len(value), value, 0, False, True)
        done += 1
    return done
