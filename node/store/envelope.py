"""The on-disk envelope of every spooled object: received instances, results, quarantined files.

An envelope is a 2 KiB header followed by the payload. Without a keyring the payload is the
DICOM bytes as received, with a CRC-32 in the header (a flipped or truncated byte is still
detected). With a keyring the payload is AES-256-GCM ciphertext under a random data key of its
own; the data key is stored wrapped (AES-GCM) by the keyring's active key.

The header is laid out in 512-byte sectors so that rewriting one part can never tear another:

    sector 0  fixed: magic, salt (the spool's identity), mode, nonce, payload length, CRC-32s
    sector 1  wrap slot A: key id + wrapped data key
    sector 2  wrap slot B: key id + wrapped data key
    sector 3  unused

Key rotation rewrites only a wrap slot — the one not holding the wrap in use — so rotating the
master key never moves or re-encrypts payloads, never changes where an object lives, and a
crash in the middle leaves the other slot intact.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import struct
import zlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from node.store.crc import crc32

HEADER_SIZE = 2048
SECTOR = 512
MAGIC = b"HLMENV01"
MODE_PLAIN, MODE_AES_GCM = 0, 1
# magic, salt, mode, payload nonce, payload length, payload crc32, header crc32
_FIXED = struct.Struct("<8s16sB12sQII")
# key id (ASCII, NUL padded), wrap nonce, wrapped data key (32 bytes + 16-byte tag), slot crc32
_SLOT = struct.Struct("<32s12s48sI")
KEY_ID_MAX = 32
MAX_PAYLOAD = (1 << 31) - (1 << 20)  # one-shot AES-GCM in `cryptography` takes under 2 GiB


class IntegrityError(Exception):
    """A spooled object that is not what was written: tampered, truncated, or not an envelope."""


@dataclass(frozen=True)
class Keyring:
    """Master keys by id; ``active`` wraps every new data key. Old keys stay for reading."""

    active: str
    keys: dict[str, bytes]

    def __post_init__(self) -> None:
        if self.active not in self.keys:
            raise ValueError(f"active key {self.active!r} is not in the keyring")
        for kid, key in self.keys.items():
            if not kid or len(kid.encode()) > KEY_ID_MAX or not kid.isascii() or not kid.isprintable():
                raise ValueError(f"key id {kid!r}: 1 to {KEY_ID_MAX} printable ASCII characters")
            if len(key) != 32:
                raise ValueError(f"key {kid!r}: must be 32 bytes (AES-256), got {len(key)}")

    @classmethod
    def parse(cls, text: str) -> "Keyring":
        """A keyring JSON ``{"active": id, "keys": {id: base64}}``, or one base64 32-byte key."""
        text = text.strip()
        if not text.startswith("{"):
            key = _b64(text, "key")
            kid = key_id_of(key)
            return cls(active=kid, keys={kid: key})
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"keyring is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), dict) or not isinstance(doc.get("active"), str):
            raise ValueError('keyring must be {"active": "<id>", "keys": {"<id>": "<base64 key>"}}')
        return cls(active=doc["active"], keys={str(k): _b64(v, f"keys.{k}") for k, v in doc["keys"].items()})

    def to_json(self) -> str:
        return json.dumps({"active": self.active,
                           "keys": {k: base64.b64encode(v).decode() for k, v in self.keys.items()}}, indent=1)

    def with_new_active(self) -> "Keyring":
        key = AESGCM.generate_key(256)
        return Keyring(active=key_id_of(key), keys={**self.keys, key_id_of(key): key})

    @classmethod
    def new(cls) -> "Keyring":
        key = AESGCM.generate_key(256)
        return cls(active=key_id_of(key), keys={key_id_of(key): key})


def key_id_of(key: bytes) -> str:
    """A key's id from the key itself: two different keys never share an id, so an object sealed
    under a key this keyring lacks says "no key", not "tampered"."""
    return "k" + hashlib.sha256(b"hilum-key-id" + key).hexdigest()[:12]


def _b64(value: object, where: str) -> bytes:
    try:
        key = base64.b64decode(str(value), validate=True)
    except ValueError:
        raise ValueError(f"{where}: not base64") from None
    if len(key) != 32:
        raise ValueError(f"{where}: must decode to 32 bytes (AES-256), got {len(key)}")
    return key


@dataclass(frozen=True)
class Header:
    mode: int
    nonce: bytes
    length: int
    crc: int
    slots: tuple[tuple[str, bytes, bytes] | None, tuple[str, bytes, bytes] | None]  # (key id, nonce, wrapped)

    def key_ids(self) -> set[str]:
        return {s[0] for s in self.slots if s is not None}


class Sealer:
    """Seals and opens envelopes for one spool (its ``salt``) with an optional keyring."""

    def __init__(self, salt: bytes, keyring: Keyring | None) -> None:
        if len(salt) != 16:
            raise ValueError("salt must be 16 bytes")
        self.salt = salt
        self.keyring = keyring

    @property
    def encrypting(self) -> bool:
        return self.keyring is not None

    # -- writing ---------------------------------------------------------------------------
    def sealed_length(self, n: int) -> int:
        return HEADER_SIZE + n + (16 if self.keyring is not None else 0)

    def seal(self, data: bytes | memoryview, context: bytes = b"") -> bytes:
        """Header + payload, ready to be written in one go. ``context`` (where the object lives: a
        log position, a path) is authenticated with it, so an envelope moved elsewhere fails."""
        if len(data) > MAX_PAYLOAD:
            raise ValueError(f"object of {len(data)} bytes exceeds the spool's {MAX_PAYLOAD}-byte limit")
        if self.keyring is None:  # a view is read as it is: one copy of a large object (the sealed one), not two
            header = self._header(MODE_PLAIN, bytes(12), len(data), crc32(data, zlib.crc32(context)), None)
            return header + data
        data = bytes(data) if isinstance(data, memoryview) else data
        dek, nonce = AESGCM.generate_key(256), secrets.token_bytes(12)
        fixed_aad = self._fixed(MODE_AES_GCM, nonce, len(data) + 16, 0) + context
        payload = AESGCM(dek).encrypt(nonce, data, fixed_aad)
        slot = self._wrap(dek, self.keyring.active)
        return self._header(MODE_AES_GCM, nonce, len(payload), 0, slot) + payload

    def seal_parts(self, parts: list[bytes | bytearray | memoryview], context: bytes = b"") -> list:
        """``seal(b"".join(parts), context)`` as a list of buffers to write in order (``os.pwritev``),
        the same bytes on disk: unencrypted, the CRC runs over the parts and nothing is copied (a
        received instance is half a megabyte or more, and ingest used to copy it twice here)."""
        if self.keyring is not None:
            return [self.seal(b"".join(parts), context)]  # AES-GCM wants one buffer (and copies anyway)
        length, crc = 0, zlib.crc32(context)
        for part in parts:
            length += len(part)
            crc = crc32(part, crc)
        if length > MAX_PAYLOAD:
            raise ValueError(f"object of {length} bytes exceeds the spool's {MAX_PAYLOAD}-byte limit")
        return [self._header(MODE_PLAIN, bytes(12), length, crc, None), *parts]

    def _fixed(self, mode: int, nonce: bytes, length: int, crc: int) -> bytes:
        body = _FIXED.pack(MAGIC, self.salt, mode, nonce, length, crc, 0)[:-4]
        return body + struct.pack("<I", zlib.crc32(body))

    def _wrap(self, dek: bytes, kid: str) -> bytes:
        nonce = secrets.token_bytes(12)
        wrapped = AESGCM(self.keyring.keys[kid]).encrypt(nonce, dek, self.salt + kid.encode())
        body = _SLOT.pack(kid.encode(), nonce, wrapped, 0)[:-4]
        return body + struct.pack("<I", zlib.crc32(body))

    def _header(self, mode: int, nonce: bytes, length: int, crc: int, slot_a: bytes | None) -> bytes:
        out = bytearray(HEADER_SIZE)
        fixed = self._fixed(mode, nonce, length, crc)
        out[: len(fixed)] = fixed
        if slot_a is not None:
            out[SECTOR: SECTOR + len(slot_a)] = slot_a
        return bytes(out)

    # -- reading ---------------------------------------------------------------------------
    def header(self, head: bytes) -> Header:
        """Parse and check a header; IntegrityError if it is not one of this spool's."""
        if len(head) < HEADER_SIZE:
            raise IntegrityError("truncated header")
        magic, salt, mode, nonce, length, crc, hcrc = _FIXED.unpack_from(head)
        if magic != MAGIC:
            raise IntegrityError("not a Hilum envelope")
        if zlib.crc32(head[: _FIXED.size - 4]) != hcrc:
            raise IntegrityError("header checksum mismatch")
        if salt != self.salt:
            raise IntegrityError("envelope belongs to another spool")
        if mode not in (MODE_PLAIN, MODE_AES_GCM):
            raise IntegrityError(f"unknown mode {mode}")
        return Header(mode, nonce, length, crc, (_slot(head, SECTOR), _slot(head, 2 * SECTOR)))

    def open(self, blob: bytes | memoryview, context: bytes = b"") -> bytes:
        """The payload of a whole envelope, verified (and decrypted); ``context`` as when sealed."""
        return bytes(self.open_view(blob, context))

    def open_view(self, blob: bytes | memoryview, context: bytes = b"") -> bytes | memoryview:
        """``open``, with a payload stored plain left as a view into ``blob``: a reader that takes
        a part of it (a log record's DICOM after its metadata) copies that part once, not twice."""
        blob = memoryview(blob)
        h = self.header(bytes(blob[:HEADER_SIZE]))
        return self.open_payload(h, blob[HEADER_SIZE:], context)

    def open_payload(self, h: Header, payload: bytes | memoryview, context: bytes = b"") -> bytes | memoryview:
        if len(payload) != h.length:
            raise IntegrityError(f"payload is {len(payload)} bytes, header says {h.length}")
        if h.mode == MODE_PLAIN:
            if self.keyring is not None:
                # A CRC protects against accidents, not against whoever can write the disk: in an
                # encrypted spool an unencrypted envelope is refused, never trusted.
                raise IntegrityError("unencrypted object in an encrypted spool")
            if crc32(payload, zlib.crc32(context)) != h.crc:
                raise IntegrityError("payload checksum mismatch (damaged, or not where it was written)")
            return payload
        dek = self._unwrap(h)
        try:
            return AESGCM(dek).decrypt(h.nonce, bytes(payload),
                                       self._fixed(h.mode, h.nonce, h.length, h.crc) + context)
        except InvalidTag:
            raise IntegrityError("authentication failed (tampered or truncated payload)") from None

    def _unwrap(self, h: Header) -> bytes:
        if self.keyring is None:
            raise IntegrityError("encrypted object but no keyring is configured")
        tried = []
        for slot in h.slots:
            if slot is None:
                continue
            kid, nonce, wrapped = slot
            key = self.keyring.keys.get(kid)
            if key is None:
                tried.append(kid)
                continue
            try:
                return AESGCM(key).decrypt(nonce, wrapped, self.salt + kid.encode())
            except InvalidTag:
                raise IntegrityError(f"data key wrap under {kid!r} fails authentication") from None
        raise IntegrityError(f"no key in the keyring for this object (wrapped under {', '.join(tried) or 'nothing'})")

    # -- rotation --------------------------------------------------------------------------
    def rewrap(self, head: bytes) -> tuple[int, bytes] | None:
        """(offset in the header, sector bytes) that re-wraps this object's data key under the
        active key, or None when it already is. The slot not in use is the one rewritten."""
        h = self.header(head)
        if h.mode == MODE_PLAIN or self.keyring is None:
            return None
        active = self.keyring.active
        if any(s is not None and s[0] == active for s in h.slots):
            return None
        dek = self._unwrap(h)
        # Overwrite the slot that did NOT just unwrap: the good wrap survives a torn write.
        used = next(i for i, s in enumerate(h.slots) if s is not None and s[0] in self.keyring.keys)
        target = 1 - used
        sector = self._wrap(dek, active).ljust(SECTOR, b"\0")
        return SECTOR * (1 + target), sector

    def drop_slot(self, head: bytes, kid: str) -> tuple[int, bytes] | None:
        """The sector write that clears the wrap under ``kid``, once another slot holds the active key."""
        h = self.header(head)
        active_ok = any(s is not None and s[0] == self.keyring.active for s in h.slots) if self.keyring else False
        for i, s in enumerate(h.slots):
            if s is not None and s[0] == kid and kid != (self.keyring.active if self.keyring else None) and active_ok:
                return SECTOR * (1 + i), bytes(SECTOR)
        return None


def _slot(head: bytes, offset: int) -> tuple[str, bytes, bytes] | None:
    kid, nonce, wrapped, crc = _SLOT.unpack_from(head, offset)
    if kid == bytes(32):
        return None
    if zlib.crc32(head[offset: offset + _SLOT.size - 4]) != crc:
        return None  # a torn rewrite: the other slot holds the key
    return kid.rstrip(b"\0").decode("ascii", "replace"), nonce, wrapped


def new_salt() -> bytes:
    return os.urandom(16)
