"""The SHA-256 of a model file, read in chunks (ONNX files can be hundreds of MB): what the registry
records, inference checks and remote workers verify."""
from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["file_sha256"]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
