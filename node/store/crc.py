"""CRC-32 of the spool's seals (zlib's CRC-32: the same polynomial and values), computed by the
system's libdeflate where it is installed, else by zlib.

Every received instance is checksummed when it is sealed and again whenever it is read back; with
the system zlib (1.2.13, no carry-less multiply) that is 0.2-0.75 ms per 512x512 slice, the largest
part of storing one, while libdeflate's is about a tenth of that. libdeflate is only used if it gives
zlib's values on a probe at import (a library that did not would make every record unreadable), and
a buffer it cannot be handed without a copy (not contiguous) goes to zlib. Either way the bytes on disk are the same.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import zlib

_MIN = 4096  # below this the ctypes call costs more than it saves


def _libdeflate():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("deflate") or "libdeflate.so.0")
        fn = lib.libdeflate_crc32
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_uint32, [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
    probe = bytes(range(256)) * 40 + b"hilum"
    if fn(0, probe, len(probe)) != zlib.crc32(probe) or fn(0x1234567, probe, 7) != zlib.crc32(probe[:7], 0x1234567):
        return None
    return fn


_fn = _libdeflate()


def crc32(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """``zlib.crc32(data, value)``."""
    if _fn is None or len(data) < _MIN:
        return zlib.crc32(data, value)
    if isinstance(data, bytes):
        return _fn(value, data, len(data))
    view = memoryview(data)
    if not view.c_contiguous:
        return zlib.crc32(data, value)  # no pointer without a copy
    if view.readonly:  # a view into bytes (a record read back): NumPy gives its address, ctypes will not
        import numpy as np

        return _fn(value, np.frombuffer(view, dtype=np.uint8).ctypes.data, view.nbytes)
    return _fn(value, ctypes.addressof(ctypes.c_char.from_buffer(view)), view.nbytes)
