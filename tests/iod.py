"""Independent IOD validation with dicom3tools' ``dciodvfy`` (Debian package dicom3tools).

dciodvfy knows every IOD's modules and attribute types from the standard; Hilum's own code is
not involved, which is the point. Errors fail a test; warnings are returned for inspection.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def dciodvfy(path: str | Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) reported by dciodvfy for one Part 10 file."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        raise RuntimeError("dciodvfy not found: run `make test` (installs Debian package dicom3tools)")
    out = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=120)
    lines = (out.stdout + out.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    return errors, warnings


def assert_valid_iod(path: str | Path) -> list[str]:
    """Fail with dciodvfy's messages if the object has IOD errors; return its warnings."""
    errors, warnings = dciodvfy(path)
    assert not errors, f"{path}: dciodvfy errors:\n" + "\n".join(errors)
    return warnings
