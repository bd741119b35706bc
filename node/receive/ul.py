"""The DICOM Upper Layer (PS3.8) and DIMSE command sets (PS3.7), as bytes.

Only what the node's receivers need. As acceptor (the SCP): A-ASSOCIATE-RQ in, -AC/-RJ out,
P-DATA-TF both ways, release and abort; C-ECHO and C-STORE command sets. As requestor
(node/pacs/qrscu.py): A-ASSOCIATE-RQ (with SCP role selection for a C-GET) out, -AC/-RJ in, the
C-GET / C-MOVE / C-FIND request, its responses and a C-GET's sub-operation C-STOREs. Every parser
checks lengths before it reads and raises ``ProtocolError`` on anything malformed, so hostile bytes
end an association with an A-ABORT, never an exception elsewhere.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

# PDU types (PS3.8 9.3)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 1, 2, 3, 4, 5, 6, 7
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# Presentation context results (PS3.8 9.3.3.2)
PC_ACCEPT, PC_ABSTRACT_REJECTED, PC_TS_REJECTED = 0, 3, 4
# DIMSE command fields and statuses
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
NO_DATASET = 0x0101
CANNOT_UNDERSTAND = 0xC000


class ProtocolError(Exception):
    """Malformed or unexpected bytes from the peer: the association is aborted."""


@dataclass
class AssociateRequest:
    called_ae: str
    calling_ae: str
    contexts: list[tuple[int, str, list[str]]]  # (id, abstract syntax, transfer syntaxes)
    max_pdu: int = 0  # the largest PDU the peer accepts (0: no limit)
    raw_called: bytes = b""
    raw_calling: bytes = b""


def _uid(b: bytes) -> str:
    return b.rstrip(b"\0 ").decode("ascii", "replace")


def _items(body: bytes) -> list[tuple[int, bytes]]:
    """(type, value) of each item/sub-item: 1-byte type, 1 reserved, 2-byte big-endian length."""
    out, pos = [], 0
    while pos < len(body):
        if pos + 4 > len(body):
            raise ProtocolError("truncated item header")
        kind, length = body[pos], struct.unpack_from(">H", body, pos + 2)[0]
        if pos + 4 + length > len(body):
            raise ProtocolError(f"item 0x{kind:02X} runs past its PDU")
        out.append((kind, body[pos + 4: pos + 4 + length]))
        pos += 4 + length
    return out


def parse_associate_rq(body: bytes) -> AssociateRequest:
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ too short")
    version = struct.unpack_from(">H", body, 0)[0]
    if not version & 1:
        raise ProtocolError(f"protocol version 0x{version:04X} not supported")
    raw_called, raw_calling = body[4:20], body[20:36]
    rq = AssociateRequest(raw_called.decode("ascii", "replace").strip(), raw_calling.decode("ascii", "replace").strip(),
                          [], raw_called=raw_called, raw_calling=raw_calling)
    app_context = None
    for kind, value in _items(body[68:]):
        if kind == 0x10:
            app_context = _uid(value)
        elif kind == 0x20:
            if len(value) < 4:
                raise ProtocolError("presentation context item too short")
            abstract, tss = "", []
            for sub, sv in _items(value[4:]):
                if sub == 0x30:
                    abstract = _uid(sv)
                elif sub == 0x40:
                    tss.append(_uid(sv))
            rq.contexts.append((value[0], abstract, tss))
        elif kind == 0x50:
            for sub, sv in _items(value):
                if sub == 0x51 and len(sv) == 4:
                    rq.max_pdu = struct.unpack(">I", sv)[0]
    if app_context != APPLICATION_CONTEXT:
        raise ProtocolError(f"application context {app_context!r} is not DICOM's")
    return rq


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def associate_ac(rq: AssociateRequest, results: list[tuple[int, int, str]], max_pdu: int,
                 implementation_uid: str, implementation_version: str) -> bytes:
    """``results``: (context id, result, transfer syntax) per proposed context."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for cid, result, ts in results:
        items.append(_item(0x21, bytes([cid, 0, result, 0]) + _item(0x40, ts.encode() if result == 0 else b"")))
    user = (_item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, implementation_uid.encode())
            + _item(0x55, implementation_version.encode()))
    items.append(_item(0x50, user))
    head = struct.pack(">HH", 1, 0) + rq.raw_called + rq.raw_calling + bytes(32)
    return _pdu(ASSOCIATE_AC, head + b"".join(items))


def associate_rj(result: int, source: int, reason: int) -> bytes:
    return _pdu(ASSOCIATE_RJ, bytes([0, result, source, reason]))


def release_rp() -> bytes:
    return _pdu(RELEASE_RP, bytes(4))


def abort(source: int = 2, reason: int = 0) -> bytes:
    return _pdu(ABORT, bytes([0, 0, source, reason]))


def release_rq() -> bytes:
    return _pdu(RELEASE_RQ, bytes(4))


def associate_rq(called_ae: str, calling_ae: str, contexts: list[tuple[int, str, list[str]]], max_pdu: int,
                 implementation_uid: str, implementation_version: str, scp_roles: list[str] = ()) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``contexts`` (id, abstract syntax, transfer syntaxes); ``scp_roles``:
    the SOP classes for which we ask to be the SCP (role selection, PS3.7 D.3.3.4: a C-GET's C-STOREs)."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for cid, abstract, tss in contexts:
        subs = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in tss)
        items.append(_item(0x20, bytes([cid, 0, 0, 0]) + subs))
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, implementation_uid.encode())
    for uid in scp_roles:  # SCU role: no, SCP role: yes
        u = uid.encode()
        user += _item(0x54, struct.pack(">H", len(u)) + u + bytes([0, 1]))
    user += _item(0x55, implementation_version.encode())
    items.append(_item(0x50, user))
    head = (struct.pack(">HH", 1, 0) + called_ae.encode("ascii").ljust(16)[:16]
            + calling_ae.encode("ascii").ljust(16)[:16] + bytes(32))
    return _pdu(ASSOCIATE_RQ, head + b"".join(items))


def parse_associate_ac(body: bytes) -> tuple[dict[int, tuple[int, str]], int]:
    """({context id: (result, transfer syntax)}, the peer's maximum PDU length, 0: none) of an A-ASSOCIATE-AC."""
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE-AC too short")
    results: dict[int, tuple[int, str]] = {}
    max_pdu = 0
    for kind, value in _items(body[68:]):
        if kind == 0x21:
            if len(value) < 4:
                raise ProtocolError("presentation context result too short")
            ts = next((_uid(sv) for sub, sv in _items(value[4:]) if sub == 0x40), "")
            results[value[0]] = (value[2], ts)
        elif kind == 0x50:
            for sub, sv in _items(value):
                if sub == 0x51 and len(sv) == 4:
                    max_pdu = struct.unpack(">I", sv)[0]
    return results, max_pdu


_U32 = struct.Struct(">I")


def iter_pdvs(body: bytes):
    """(context id, message control header, data) of each PDV in a P-DATA-TF body, one at a time: a
    PDU may hold millions of tiny PDVs, and a list of them all would cost far more than the PDU."""
    pos, end, view = 0, len(body), memoryview(body)
    unpack = _U32.unpack_from
    while pos < end:
        if pos + 6 > end:
            raise ProtocolError("truncated PDV")
        length = unpack(body, pos)[0]
        if length < 2 or pos + 4 + length > end:
            raise ProtocolError("PDV length does not fit its PDU")
        yield body[pos + 4], body[pos + 5], view[pos + 6: pos + 4 + length]
        pos += 4 + length


def pdvs(body: bytes) -> list[tuple[int, int, memoryview]]:
    """(context id, message control header, data) of each PDV in a P-DATA-TF body."""
    return list(iter_pdvs(body))


# A message's fragments, as ``Fragments`` keeps them: one of at least MIN_VIEW bytes that is most of its
# PDU stays a view of that PDU (no copy: the hot path); a smaller one is copied onto the bytes kept so
# far, and counts PDV_COST bytes more than its data against the size limit, so that a peer sending
# millions of empty or 1-byte PDVs reaches the limit long before they cost the node memory or time.
MIN_VIEW = 1024
PDV_COST = 1024


class Fragments:
    """One message's data set as its PDVs bring it, with what it costs counted against ``limit``.

    ``add`` raises ``ProtocolError`` on an empty PDV that is not the last fragment (it carries
    nothing: only a hostile peer sends one) and once the data set, with PDV_COST per small
    fragment, is over ``limit``. ``take`` gives the parts to join, in order: views of the PDUs
    for the large fragments, bytearrays for runs of small ones (never an object per PDV)."""

    __slots__ = ("limit", "parts", "small", "size", "cost")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[memoryview | bytearray] = []
        self.small = bytearray()
        self.size = 0  # bytes of data
        self.cost = 0  # what the small fragments count besides their bytes

    def add(self, data: memoryview, last: bool) -> None:
        n = len(data)
        if n >= MIN_VIEW and 2 * n >= len(data.obj):
            if self.small:
                self.parts.append(self.small)
                self.small = bytearray()
            self.parts.append(data)
        elif n or last:
            self.small += data
            self.cost += PDV_COST
        else:
            raise ProtocolError("an empty PDV that is not the last fragment of its message")
        self.size += n
        if self.size + self.cost > self.limit:
            raise ProtocolError(f"a data set over {self.limit} bytes (with {PDV_COST} bytes counted per small PDV)")

    def take(self) -> list[memoryview | bytearray]:
        if self.small:
            self.parts.append(self.small)
            self.small = bytearray()
        parts, self.parts = self.parts, []
        return parts


def p_data(context_id: int, command: bool, data: bytes, max_pdu: int) -> list[bytes]:
    """P-DATA-TF PDUs carrying one message part, fragmented to the peer's maximum PDU."""
    room = (max_pdu - 6) if max_pdu else len(data) or 1
    room = max(room, 1)
    out = []
    for start in range(0, max(len(data), 1), room):
        chunk = data[start: start + room]
        last = start + room >= len(data)
        mch = (1 if command else 0) | (2 if last else 0)
        out.append(_pdu(P_DATA_TF, struct.pack(">IBB", len(chunk) + 2, context_id, mch) + chunk))
    return out


# -- DIMSE command sets: implicit VR little endian, group 0000 ---------------------------------------
@dataclass
class Command:
    field: int
    message_id: int = 0
    sop_class: str = ""
    sop_instance: str = ""
    has_dataset: bool = False
    # Responses: Status, Error Comment, and a C-GET's sub-operation counts (remaining, completed,
    # failed, warning: PS3.7 C.4.3.1.3), where present.
    status: int | None = None
    comment: str = ""
    subops: dict[str, int] = field(default_factory=dict)
    # C-STORE sub-operation of a C-MOVE: (Move Originator AE title, its Message ID), PS3.7 9.3.1.1
    move_originator: tuple[str, int] | None = None


_CMD_UIDS = {0x0002: "sop_class", 0x1000: "sop_instance"}
_SUBOPS = {0x1020: "remaining", 0x1021: "completed", 0x1022: "failed", 0x1023: "warning"}


def parse_command(data: bytes) -> Command:
    elements: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        if pos + 8 > len(data):
            raise ProtocolError("truncated command element")
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        if group != 0x0000 or pos + 8 + length > len(data):
            raise ProtocolError("malformed command set")
        elements[elem] = data[pos + 8: pos + 8 + length]
        pos += 8 + length

    def us(elem: int) -> int:
        v = elements.get(elem)
        if v is None or len(v) != 2:
            raise ProtocolError(f"command element (0000,{elem:04X}) missing or not US")
        return struct.unpack("<H", v)[0]

    # A response names the request's Message ID as Message ID Being Responded To (0000,0120).
    field = us(0x0100)
    cmd = Command(field=field, message_id=us(0x0110 if 0x0110 in elements or not field & 0x8000 else 0x0120),
                  has_dataset=us(0x0800) != NO_DATASET)
    for elem, attr in _CMD_UIDS.items():
        if elem in elements:
            setattr(cmd, attr, _uid(elements[elem]))
    if 0x1030 in elements and len(elements.get(0x1031, b"")) == 2:
        cmd.move_originator = (elements[0x1030].decode("ascii", "replace").strip(" \0"), us(0x1031))
    if 0x0900 in elements:
        cmd.status = us(0x0900)
        cmd.comment = elements.get(0x0902, b"").decode("ascii", "replace").strip(" \0")
    for elem, name in _SUBOPS.items():
        if len(elements.get(elem, b"")) == 2:
            cmd.subops[name] = us(elem)
    return cmd


def _element(elem: int, value: bytes, pad: bytes = b"\0") -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def response(field: int, message_id: int, status: int, sop_class: str, sop_instance: str = "",
             comment: str = "") -> bytes:
    body = [_element(0x0002, sop_class.encode()), _element(0x0100, struct.pack("<H", field)),
            _element(0x0120, struct.pack("<H", message_id)), _element(0x0800, struct.pack("<H", NO_DATASET)),
            _element(0x0900, struct.pack("<H", status))]
    if comment:
        body.append(_element(0x0902, comment.encode("ascii", "replace")[:64], pad=b" "))  # LO: space
    if sop_instance:
        body.append(_element(0x1000, sop_instance.encode()))
    payload = b"".join(body)
    return _element(0x0000, struct.pack("<I", len(payload))) + payload


def request(field: int, message_id: int, sop_class: str, priority: int = 0, move_destination: str = "") -> bytes:
    """The command set of a request that carries a data set (a C-GET / C-MOVE / C-FIND identifier)."""
    dest = (_element(0x0600, move_destination.encode("ascii"), b" "),) if move_destination else ()
    payload = b"".join((_element(0x0002, sop_class.encode()), _element(0x0100, struct.pack("<H", field)),
                        _element(0x0110, struct.pack("<H", message_id)), *dest,
                        _element(0x0700, struct.pack("<H", priority)), _element(0x0800, struct.pack("<H", 0x0000))))
    return _element(0x0000, struct.pack("<I", len(payload))) + payload


# -- Part 10 -----------------------------------------------------------------------------------------
def _explicit(elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str,
                  implementation_uid: str, implementation_version: str) -> bytes:
    """Preamble, DICM and the file meta group of a received instance (PS3.10 7.1)."""
    body = b"".join((
        _explicit(0x0001, b"OB", b"\0\1"),
        _explicit(0x0002, b"UI", sop_class.encode()),
        _explicit(0x0003, b"UI", sop_instance.encode()),
        _explicit(0x0010, b"UI", transfer_syntax.encode()),
        _explicit(0x0012, b"UI", implementation_uid.encode()),
        _explicit(0x0013, b"SH", implementation_version.encode()[:16]),
        _explicit(0x0016, b"AE", source_ae.encode("ascii", "replace")[:16]),
    ))
    return bytes(128) + b"DICM" + _explicit(0x0000, b"UL", struct.pack("<I", len(body))) + body
