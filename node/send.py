"""`hilum send`: a convenience C-STORE SCU for files and folders (files sent as stored)."""
from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, build_context


def _files(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        out.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    return out


def send_paths(paths: list[Path], host: str, port: int, called_ae: str, calling_ae: str) -> tuple[int, int]:
    """Send every DICOM file under ``paths``; returns (succeeded, failed)."""
    items = []
    failed = 0
    for f in _files(paths):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            items.append((f, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        except (InvalidDicomError, AttributeError, OSError):
            failed += 1
    ok = 0
    pairs = list(dict.fromkeys((sop, ts) for _, sop, ts in items))
    # An association offers at most 128 contexts: send in groups of distinct (class, syntax) pairs.
    for start in range(0, len(pairs), 128):
        group = set(pairs[start:start + 128])
        ae = AE(ae_title=calling_ae)
        ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in group]
        assoc = ae.associate(host, port, ae_title=called_ae)
        batch = [it for it in items if (it[1], it[2]) in group]
        if not assoc.is_established:
            failed += len(batch)
            continue
        try:
            for f, _, _ in batch:
                status = assoc.send_c_store(f)
                if getattr(status, "Status", None) in (0x0000, 0xB000, 0xB006, 0xB007):
                    ok += 1
                else:
                    failed += 1
        finally:
            if assoc.is_established:
                assoc.release()
    return ok, failed
