"""A small durable cache of per-series arrays one job leaves for the next (``ArtefactKey``).

A lung-nodules job on a series ct-anatomy has just segmented need not segment the lungs again:
after a job whose results were accepted, the worker keeps what its handler offers
(``Handler.artefacts``), and hands a later job what its handler asks for
(``Handler.wants_artefacts``) in ``HandlerInput.artefacts``. The handler never reads the cache
itself, and computes what is missing.

An entry is bound to the series UID *and* its instance set (a series that grew or lost an instance
is another input) and to the producer's name, version and parameters; sealed through the vault
like every other file under the data directory. A damaged or unreadable entry is a miss, never
an error: the handler computes the array as if nothing had been kept. Only the newest
``max_entries`` are kept: a handful of series in flight is all it is for.

A remote worker (``hilum worker``) has no access to this directory: it asks the node for an
entry and hands the node what its job offers (``RemoteArtefacts`` in node/jobs/remote.py,
``/api/worker/jobs/{id}/artefacts``), as the entry's bytes (``pack``); the node serves and takes
only entries of that job's own primary series and instance set.
"""
from __future__ import annotations

import hashlib
import json
import logging
import zlib
from pathlib import Path

import numpy as np

from node.handler_api import ArtefactKey
from node.receive.spool import fsync_dirs
from node.store.vault import IntegrityError, Vault
from node.volume import SeriesData

__all__ = ["ArtefactCache", "instance_set_key"]

log = logging.getLogger(__name__)


def instance_set_key(series: SeriesData) -> str:
    """The series UID and every SOP Instance UID in it, hashed: one instance more or less is another key."""
    return set_key(series.series_uid, (str(ds.SOPInstanceUID) for ds in series.datasets))


def set_key(series_uid: str, sop_uids) -> str:
    """``instance_set_key`` from the UIDs alone: the node computes it from its index (a remote
    worker's artefacts are accepted and served for its job's own series only)."""
    h = hashlib.sha256(series_uid.encode())
    for uid in sorted(sop_uids):
        h.update(b"\0" + uid.encode())
    return h.hexdigest()


def _nonzero_box(array: np.ndarray) -> list[list[int]]:
    """[start, stop) per axis of the box holding every non-zero value (empty: a zero-sized box)."""
    if array.ndim == 0:
        return []
    box = []
    for axis in range(array.ndim):
        others = tuple(a for a in range(array.ndim) if a != axis)
        where = np.flatnonzero(array.any(axis=others) if others else array != 0)
        box.append([int(where[0]), int(where[-1]) + 1] if where.size else [0, 0])
    return box


def pack(array: np.ndarray, chunk: int = 16) -> bytes:
    """An array as an entry's bytes: a JSON head (dtype, shape, and the box that holds its
    non-zero values), a newline, the zlib-compressed values inside the box. Only the box is
    compressed (zlib takes the same time for a run of zeros as for anything else: the lungs'
    box is a third of a CT's volume), a few slices at a time (level 1: a higher level costs the
    producing job time), so keeping a volume costs no copy of it."""
    array = np.asarray(array)
    box = _nonzero_box(array)
    inside = array[tuple(slice(lo, hi) for lo, hi in box)]
    head = json.dumps({"dtype": array.dtype.str, "shape": list(array.shape), "box": box}).encode()
    packer = zlib.compressobj(1)
    parts = [head, b"\n"]
    for k in range(0, max(len(inside), 1), chunk):
        parts.append(packer.compress(np.ascontiguousarray(inside[k:k + chunk]).tobytes()))
    parts.append(packer.flush())
    return b"".join(parts)


def _head(data: bytes) -> tuple[np.dtype, list[int], list[list[int]], bytes]:
    """(dtype, shape, box, compressed values) of an entry; an entry without a box holds it all."""
    head, _, body = data.partition(b"\n")
    meta = json.loads(head)
    dtype = np.dtype(meta["dtype"])
    if dtype.kind not in "biuf":
        raise ValueError(f"artefact dtype {dtype} is not numeric")
    shape = [int(n) for n in meta["shape"]]
    box = [[int(lo), int(hi)] for lo, hi in meta.get("box", [[0, n] for n in shape])]
    if len(box) != len(shape) or not all(0 <= lo <= hi <= n for (lo, hi), n in zip(box, shape)):
        raise ValueError(f"artefact box {box} does not fit its shape {shape}")
    return dtype, shape, box, body


def _check_length(raw: int, dtype: np.dtype, box: list[list[int]]) -> None:
    if raw != dtype.itemsize * int(np.prod([hi - lo for lo, hi in box])):
        raise ValueError(f"artefact holds {raw} bytes, not the {box} box of {dtype} its head says")


def unpack(data: bytes) -> np.ndarray:
    """The array of ``pack``'s bytes; ValueError (or zlib.error, KeyError, TypeError) when they are
    not one: numbers only, and exactly as many bytes as the head says."""
    dtype, shape, box, body = _head(data)
    raw = zlib.decompress(body)
    _check_length(len(raw), dtype, box)
    inside = np.frombuffer(raw, dtype=dtype).reshape([hi - lo for lo, hi in box])
    if [hi - lo for lo, hi in box] == shape:
        return inside
    out = np.zeros(shape, dtype=dtype)
    out[tuple(slice(lo, hi) for lo, hi in box)] = inside
    return out


def check_packed(data: bytes, chunk: int = 1 << 22) -> None:
    """``unpack``'s checks without the array: the node takes a worker's entry without holding a
    volume's worth of memory for it."""
    dtype, _, box, body = _head(data)
    inflate, raw = zlib.decompressobj(), 0
    while body:
        raw += len(inflate.decompress(body, chunk))
        body = inflate.unconsumed_tail
    raw += len(inflate.flush())
    if not inflate.eof:
        raise ValueError("artefact data is truncated")
    _check_length(raw, dtype, box)


UNUSABLE = (IntegrityError, OSError, ValueError, KeyError, TypeError, zlib.error)


class ArtefactCache:
    def __init__(self, directory: Path, vault: Vault, max_entries: int = 16) -> None:
        self.directory = directory
        self.vault = vault
        self.max_entries = max_entries

    def _path(self, series_key: str, key: ArtefactKey) -> Path:
        name = "\0".join((series_key, key.producer, key.version, key.name, key.variant))
        return self.directory / f"{hashlib.sha256(name.encode()).hexdigest()[:40]}.z"

    def load(self, series_key: str, key: ArtefactKey) -> np.ndarray | None:
        data = self.load_packed(series_key, key)
        try:
            return None if data is None else unpack(data)
        except UNUSABLE as exc:
            log.warning("artefact %s of %s %s unusable, computed again: %s", key.name, key.producer, key.version, exc)
            return None

    def load_packed(self, series_key: str, key: ArtefactKey) -> bytes | None:
        """The entry's bytes (``pack``), its seal checked; None when there is none or it is damaged."""
        path = self._path(series_key, key)
        if not path.exists():
            return None
        try:
            return self.vault.read_file(path)
        except (IntegrityError, OSError) as exc:
            log.warning("artefact %s of %s %s unusable, computed again: %s", key.name, key.producer, key.version, exc)
            return None

    def save(self, series_key: str, key: ArtefactKey, array: np.ndarray) -> None:
        self.save_packed(series_key, key, pack(array))

    def save_packed(self, series_key: str, key: ArtefactKey, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.vault.write_file(self._path(series_key, key), data)
        fsync_dirs({self.directory})
        self._prune()

    def _prune(self) -> None:
        def age(path: Path) -> float:
            try:
                return path.stat().st_mtime
            except FileNotFoundError:  # pruned by another worker meanwhile
                return 0.0

        entries = sorted(self.directory.glob("*.z"), key=age, reverse=True)
        for old in entries[self.max_entries:]:
            old.unlink(missing_ok=True)
