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
    h = hashlib.sha256(series.series_uid.encode())
    for uid in sorted(str(ds.SOPInstanceUID) for ds in series.datasets):
        h.update(b"\0" + uid.encode())
    return h.hexdigest()


class ArtefactCache:
    def __init__(self, directory: Path, vault: Vault, max_entries: int = 16) -> None:
        self.directory = directory
        self.vault = vault
        self.max_entries = max_entries

    def _path(self, series_key: str, key: ArtefactKey) -> Path:
        name = "\0".join((series_key, key.producer, key.version, key.name, key.variant))
        return self.directory / f"{hashlib.sha256(name.encode()).hexdigest()[:40]}.z"

    def load(self, series_key: str, key: ArtefactKey) -> np.ndarray | None:
        path = self._path(series_key, key)
        if not path.exists():
            return None
        try:
            sealed = self.vault.read_file(path)
            head, _, body = sealed.partition(b"\n")
            meta = json.loads(head)
            array = np.frombuffer(zlib.decompress(body), dtype=np.dtype(meta["dtype"]))
            return array.reshape(meta["shape"])
        except (IntegrityError, OSError, ValueError, KeyError, TypeError, zlib.error) as exc:
            log.warning("artefact %s of %s %s unusable, computed again: %s", key.name, key.producer, key.version, exc)
            return None

    def save(self, series_key: str, key: ArtefactKey, array: np.ndarray, chunk: int = 16) -> None:
        """Compressed a few slices at a time (level 1: a label map is mostly runs of zeros, and a
        higher level costs the producing job time), so keeping a volume costs no copy of it."""
        array = np.asarray(array)
        head = json.dumps({"dtype": array.dtype.str, "shape": list(array.shape)}).encode()
        packer = zlib.compressobj(1)
        parts = [head, b"\n"]
        for k in range(0, max(len(array), 1), chunk):
            parts.append(packer.compress(np.ascontiguousarray(array[k:k + chunk]).tobytes()))
        parts.append(packer.flush())
        self.directory.mkdir(parents=True, exist_ok=True)
        self.vault.write_file(self._path(series_key, key), b"".join(parts))
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
