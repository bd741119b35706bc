"""The working grid registration runs on: each volume block-averaged to about 2 mm voxels.

Every stage already worked at 2 mm or coarser (the linear stages' finest level, the demons' 2.5 mm
field), but ITK built its image pyramids, gradients and masks from the full images: on a
512x512x300 CT pair that was most of two minutes, for information the finest level smoothed away.
Averaging the blocks once, up front, gives those stages the same 2 mm images at a tenth of the
voxels. The grid keeps the patient coordinates (the first block's centre is the new origin), so a
transform found on it maps the original volumes' points, and the moving image is still resampled
at its full resolution by ``RegistrationOutcome.resample``.
"""
from __future__ import annotations

import numpy as np

from node.anatomy.grid import block_factors
from node.volume import Geometry, Volume

__all__ = ["WORKING_MM", "working_volume", "working_mask", "working_geometry"]

WORKING_MM = 2.0


def _factors(geom: Geometry, mm: float) -> tuple[int, int, int] | None:
    """(k, j, i) block sizes, or None where the volume is already about ``mm`` (or too small to shrink)."""
    f = block_factors(geom.spacing, mm)
    if f == (1, 1, 1) or any(n // b < 4 for n, b in zip(geom.shape, f)):
        return None
    return f


def _block_mean(array: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Mean over (fk, fj, fi) blocks; the last partial block of each axis is dropped (less than a
    block at the far edge), so every output voxel is a whole block centred where its geometry says.
    Strided adds slab by slab: several times faster than a reshaped mean over three axes."""
    fk, fj, fi = f
    K, J, I = (n // b for n, b in zip(array.shape, f))
    out = np.empty((K, J, I), np.float32)
    for k in range(K):
        s = array[k * fk].astype(np.float32)
        for d in range(1, fk):
            s += array[k * fk + d]
        r = s[0:J * fj:fj].copy()
        for d in range(1, fj):
            r += s[d:J * fj:fj]
        c = r[:, 0:I * fi:fi].copy()
        for d in range(1, fi):
            c += r[:, d:I * fi:fi]
        out[k] = c
    out /= fk * fj * fi
    return out


def working_geometry(geom: Geometry, mm: float = WORKING_MM) -> Geometry:
    """The grid ``working_volume`` puts a volume on ``geom`` onto (``geom`` itself where it is as coarse)."""
    f = _factors(geom, mm)
    if f is None:
        return geom
    shape = tuple(n // b for n, b in zip(geom.shape, f))
    origin = geom.index_to_patient((np.asarray(f, float) - 1) / 2.0)  # the first block's centre (k, j, i)
    spacing = tuple(float(s * b) for s, b in zip(geom.spacing, f[::-1]))
    return Geometry(shape=shape, origin=tuple(float(v) for v in origin), spacing=spacing, direction=geom.direction)


def working_volume(volume: Volume, mm: float = WORKING_MM) -> Volume:
    """``volume`` block-averaged to about ``mm`` voxels (float32), or itself where it is already
    that coarse: working_volume(working_volume(v)) is working_volume(v)."""
    f = _factors(volume.geometry, mm)
    if f is None:
        return volume
    return Volume(_block_mean(volume.array, f), working_geometry(volume.geometry, mm))


def working_mask(mask: np.ndarray, geom: Geometry, mm: float = WORKING_MM,
                 box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
    """A boolean mask on ``geom`` carried onto ``working_volume``'s grid: a block is in when at
    least half of it is. ``box``: ``mask`` covers only that box of ``geom``'s grid (the rest is
    out), so that a caller holding a lung's box need not make a byte per voxel of the whole volume."""
    if box is None:
        box = tuple(slice(0, n) for n in geom.shape)
    mask = np.asarray(mask, bool)
    if mask.shape != tuple(b.stop - b.start for b in box):
        raise ValueError(f"working_mask: mask {mask.shape} does not fill its box {box}")
    f = _factors(geom, mm)
    if f is None:
        out = np.zeros(geom.shape, bool)
        out[box] = mask
        return out
    out = np.zeros(tuple(n // b for n, b in zip(geom.shape, f)), bool)
    # The blocks the box touches (whole ones only: _block_mean drops a partial block at the far edge).
    lo = [b.start // fb for b, fb in zip(box, f)]
    hi = [min(-(-b.stop // fb), n) for b, fb, n in zip(box, f, out.shape)]
    if any(h <= l for l, h in zip(lo, hi)):
        return out
    blocks = np.zeros(tuple((h - l) * fb for l, h, fb in zip(lo, hi, f)), np.uint8)
    src = tuple(slice(0, min(b.stop, h * fb) - b.start) for b, h, fb in zip(box, hi, f))
    dst = tuple(slice(b.start - l * fb, min(b.stop, h * fb) - l * fb) for b, l, h, fb in zip(box, lo, hi, f))
    blocks[dst] = mask[src]
    out[tuple(slice(l, h) for l, h in zip(lo, hi))] = _block_mean(blocks, f) >= 0.5
    return out
