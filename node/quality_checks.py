"""Generic plausibility measurements on label masks, shared by every handler that reports quality flags
(model handlers, ct-anatomy, ...). They measure; the caller decides the threshold and words the flag.
"""
from __future__ import annotations

import numpy as np

__all__ = ["slice_gaps", "present_slices"]


def present_slices(mask: np.ndarray, axis: int = 0) -> np.ndarray:
    """Indices along ``axis`` (slices of a (z, y, x) array by default) where ``mask`` has a voxel."""
    others = tuple(a for a in range(mask.ndim) if a != axis)
    return np.flatnonzero(mask.any(axis=others))


def slice_gaps(mask: np.ndarray, axis: int = 0) -> int:
    """Empty slices between the first and the last slice holding the mask: a solid organ seen on slices
    3..20 must be on all of them, so a gap means a structure broken in two (or a missed slab)."""
    idx = present_slices(mask, axis)
    return int(idx[-1] - idx[0] + 1 - idx.size) if idx.size else 0
