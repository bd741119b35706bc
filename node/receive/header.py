"""The few header attributes ingest needs, read straight from the bytes of a Part 10 instance.

Ingest needs a dozen text attributes, all in groups 0008-0020, from every instance; building a
pydicom Dataset for that costs more than writing the instance durably. This walks the elements
of a little-endian data set (explicit or implicit VR), steps over sequences (defined or
undefined length, nested), stops after group 0020, and decodes only what is asked for.

Compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE) are read like explicit VR
little endian: only their pixel data differs, and the walk stops before it. Anything it is not
sure about — big endian, deflate, a character set other than the default,
Latin-1 or UTF-8, a multi-valued field, a malformed element — returns None, and the caller reads
the instance with pydicom instead. It never guesses.
"""
from __future__ import annotations

import struct

WANTED = {
    0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID", 0x00080020: "StudyDate",
    0x00080050: "AccessionNumber", 0x00080060: "Modality", 0x00081030: "StudyDescription",
    0x0008103E: "SeriesDescription", 0x00100010: "PatientName", 0x00100020: "PatientID",
    0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID", 0x00200011: "SeriesNumber",
}
EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
# Compressed syntaxes encode the data set in explicit VR little endian; only the pixels differ.
RLE, ENCAPSULATED = "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4."
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_CHARSETS = {"": "ascii", "ISO_IR 6": "ascii", "ISO 2022 IR 6": "ascii", "ISO_IR 100": "latin_1",
             "ISO_IR 192": "utf_8"}
_CHARSET_TAG = 0x00080005
_LAST_GROUP = 0x0020FFFF
UNDEFINED = 0xFFFFFFFF
_EXPLICIT_HEAD = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length (explicit VR short form)
_U32 = struct.Struct("<I")
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _Unsure(Exception):
    pass


def read_header(raw: bytes) -> tuple[str, dict[str, str]] | None:
    """(transfer syntax, {keyword: text}) for the WANTED attributes present, or None (use pydicom)."""
    try:
        return _read(raw)
    except (_Unsure, struct.error, IndexError, UnicodeDecodeError):
        return None


def read_inflated(data: bytes) -> dict[str, str] | None:
    """{keyword: text} of the WANTED attributes of a bare data set in explicit VR little endian (an
    inflated deflated one: node/receive/ingest.py's ``inflate``), or None (use pydicom)."""
    try:
        return _dataset(data, 0, False)
    except (_Unsure, struct.error, IndexError, UnicodeDecodeError):
        return None


def _read(raw: bytes) -> tuple[str, dict[str, str]]:
    if len(raw) < 144 or raw[128:132] != b"DICM":
        raise _Unsure
    pos, ts, meta_end = 132, None, None
    # File meta: explicit VR little endian, group 0002.
    while pos + 8 <= len(raw):
        group, elem = struct.unpack_from("<HH", raw, pos)
        if group != 0x0002:
            break
        pos, value = _explicit_element(raw, pos)
        if elem == 0x0010:
            ts = value.rstrip(b"\0 ").decode("ascii")
        elif elem == 0x0000 and len(value) == 4:
            meta_end = pos + struct.unpack("<I", value)[0]
    if meta_end is not None and meta_end != pos:
        raise _Unsure
    if ts is None or not (ts in (EXPLICIT_LE, IMPLICIT_LE, RLE) or ts.startswith(ENCAPSULATED)):
        raise _Unsure  # none named, big endian, deflate, or a syntax we do not know
    return ts, _dataset(raw, pos, ts == IMPLICIT_LE)


def _dataset(raw: bytes, pos: int, implicit: bool) -> dict[str, str]:
    """The WANTED attributes of the data set that starts at ``pos``."""
    found: dict[int, bytes] = {}
    # The loop below runs for every element of every received instance (the hot path of ingest):
    # element headers are unpacked inline with precompiled structs rather than through
    # ``_element_header`` (same rules, checked by tests/test_receive_header.py).
    end = len(raw)
    while pos + 8 <= end:
        group, elem, vr, short = _EXPLICIT_HEAD.unpack_from(raw, pos)
        tag = (group << 16) | elem
        if tag > _LAST_GROUP:
            break
        if implicit or group == 0xFFFE:
            vr, length, value_at = None, _U32.unpack_from(raw, pos + 4)[0], pos + 8
        elif vr in _LONG_VRS:
            if pos + 12 > end:
                raise _Unsure
            length, value_at = _U32.unpack_from(raw, pos + 8)[0], pos + 12
        elif vr.isalpha() and vr.isupper():
            length, value_at = short, pos + 8
        else:
            raise _Unsure
        if length == UNDEFINED:
            if vr not in (b"SQ", None):
                raise _Unsure  # undefined-length non-sequence (encapsulated) this early: not ours to guess
            pos = _skip_sequence(raw, value_at, implicit)
            continue
        pos = value_at + length
        if pos > end:
            raise _Unsure
        if tag in WANTED or tag == _CHARSET_TAG:
            found[tag] = raw[value_at: pos]
    else:
        # The bytes ended before anything after group 0020: a truncated instance (cut on an element
        # boundary) or one that has nothing more; either way pydicom decides, this does not guess.
        raise _Unsure
    encoding = _CHARSETS.get(found.pop(_CHARSET_TAG, b"").decode("ascii").strip())
    if encoding is None:
        raise _Unsure
    out = {}
    for tag, value in found.items():
        text = value.decode(encoding).rstrip("\0 ")
        if "\\" in text:
            raise _Unsure  # multi-valued: pydicom's rendering is the reference
        out[WANTED[tag]] = text.strip(" ") if tag == 0x00200011 else text  # IS: both ends, like pydicom
    return out


def _explicit_element(raw: bytes, pos: int) -> tuple[int, bytes]:
    pos, length, _ = _element_header(raw, pos, False)
    if length == UNDEFINED or pos + length > len(raw):
        raise _Unsure
    return pos + length, raw[pos: pos + length]


def _element_header(raw: bytes, pos: int, implicit: bool) -> tuple[int, int, bytes | None]:
    """(position of the value, value length, VR or None when implicit)."""
    group = struct.unpack_from("<H", raw, pos)[0]
    if implicit or group == 0xFFFE:
        return pos + 8, struct.unpack_from("<I", raw, pos + 4)[0], None
    vr = raw[pos + 4: pos + 6]
    if vr in _LONG_VRS:
        return pos + 12, struct.unpack_from("<I", raw, pos + 8)[0], vr
    if not vr.isalpha() or not vr.isupper():
        raise _Unsure
    return pos + 8, struct.unpack_from("<H", raw, pos + 6)[0], vr


def _skip_sequence(raw: bytes, pos: int, implicit: bool, depth: int = 0) -> int:
    """Past the sequence delimiter of an undefined-length sequence whose first item starts at ``pos``."""
    if depth > 32:
        raise _Unsure
    while True:
        tag, length = _tag(raw, pos), struct.unpack_from("<I", raw, pos + 4)[0]
        pos += 8
        if tag == SEQ_END:
            return pos
        if tag != ITEM:
            raise _Unsure
        if length != UNDEFINED:
            pos += length
            continue
        while (t := _tag(raw, pos)) != ITEM_END:  # an undefined-length item: its elements, then its end
            if pos + 8 > len(raw):
                raise _Unsure
            pos, n, vr = _element_header(raw, pos, implicit)
            if n == UNDEFINED:
                pos = _skip_sequence(raw, pos, implicit, depth + 1)
            else:
                pos += n
            if t == SEQ_END:
                raise _Unsure
        pos += 8


def _tag(raw: bytes, pos: int) -> int:
    if pos + 8 > len(raw):
        raise _Unsure
    group, elem = struct.unpack_from("<HH", raw, pos)
    return (group << 16) | elem
