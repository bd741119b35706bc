"""Where nodules are looked for: each lung of ``ct-anatomy``, closed so juxtapleural nodules stay in.

A nodule against the chest wall (or the heart, or the mediastinum) indents the aerated lung, so the
lung mask of ``ct-anatomy`` leaves it out. Closing each lung (dilate, then erode, by ``CLOSING_MM``)
fills such bays but not the large concavities around the heart and hilum, which a convex hull would
swallow. The closing runs on a coarse grid (distance transforms), which keeps it cheap on a
512x512x300 volume. On that grid a block that is half lung counts as lung, so a coarse bay can
stop up to a block (3 mm) short of the pleura, and a nodule filling the bay would lose that layer
(a third of a 10 mm nodule) and look like a bulge of the chest wall: ``crop(box, exact=True)``
closes the lungs again at full resolution around one box, which the measurement asks for where a
nodule runs into bright voxels beyond the coarse region.

Everything lives on the lungs' bounding box (a closing stays within it), one byte per voxel of it:
each closed lung and the aerated lungs as bits, not a full-size mask each.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage

from node.anatomy import LUNG_L, LUNG_R

__all__ = ["CLOSING_MM", "LungRegion", "lung_region"]

CLOSING_MM = 9.0  # fills a bay up to ~18 mm across: a juxtapleural nodule of up to ~15 mm
_COARSE_MM = 3.0
_LEFT, _RIGHT, _AERATED = 1, 2, 4  # bits of LungRegion.sides
_SLAB = 16  # slices per step where the whole label volume is scanned (no full-size temporaries)


@dataclass(eq=False)
class LungRegion:
    """The lungs on ``box`` of a ``shape`` grid: ``sides`` (uint8) has bit 1 in the closed left lung,
    2 in the closed right lung (a voxel is in one), 4 in the aerated lungs as ct-anatomy drew them."""

    shape: tuple[int, int, int]
    box: tuple[slice, slice, slice]
    sides: np.ndarray
    spacing: tuple[float, float, float]  # mm per array axis (k, j, i)

    @property
    def origin(self) -> np.ndarray:
        return np.array([b.start for b in self.box])

    @property
    def aerated_found(self) -> bool:
        """ct-anatomy found any lung at all."""
        return self.sides.size > 0

    @property
    def closed_found(self) -> bool:
        """Either closed lung has a voxel (``inside.any()`` without keeping ``inside``)."""
        return bool(np.any(self.sides & (_LEFT | _RIGHT)))

    def closed_at(self, *index: np.ndarray) -> np.ndarray:
        """Either closed lung at the open mesh ``np.ix_(*index)`` of box indices, read from ``sides``
        without making (and keeping) ``inside``, a byte per voxel of the box."""
        return (self.sides[np.ix_(*index)] & (_LEFT | _RIGHT)) != 0

    @cached_property
    def inside(self) -> np.ndarray:
        """Either closed lung, on ``box``."""
        return (self.sides & (_LEFT | _RIGHT)) > 0

    @property
    def both(self) -> np.ndarray:
        """Either closed lung on the whole grid (for the registration's mask, a detection model's
        ``where``): made on each call and not kept, as it is a byte per voxel of the whole volume."""
        out = np.zeros(self.shape, bool)
        out[self.box] = self.inside
        return out

    def _local(self, box) -> tuple[tuple, tuple]:
        """(``box`` met with ``self.box`` relative to ``box``, the same relative to ``self.box``)."""
        lo = [max(b.start, r.start) for b, r in zip(box, self.box)]
        hi = [min(b.stop, r.stop) for b, r in zip(box, self.box)]
        if any(h <= l for l, h in zip(lo, hi)):
            empty = (slice(0, 0),) * 3
            return empty, empty
        return (tuple(slice(l - b.start, h - b.start) for l, h, b in zip(lo, hi, box)),
                tuple(slice(l - r.start, h - r.start) for l, h, r in zip(lo, hi, self.box)))

    def crop(self, box: tuple[slice, slice, slice], exact: bool = False) -> np.ndarray:
        """Either closed lung on ``box`` (any box of the source grid; False beyond the lungs' box).
        ``exact``: each lung closed again at full resolution around the box (see the module's note)."""
        out = np.zeros(tuple(b.stop - b.start for b in box), bool)
        mine, theirs = self._local(box)
        if not exact:
            out[mine] = self.inside[theirs]
            return out
        # The closing at a voxel depends on the lung within 2 * CLOSING_MM of it.
        margin = [int(np.ceil(2 * CLOSING_MM / s)) + 1 for s in self.spacing]
        wide = tuple(slice(max(0, b.start - m), min(n, b.stop + m)) for b, m, n in zip(box, margin, self.shape))
        wide_mine, wide_theirs = self._local(wide)
        sub = self.sides[wide_theirs]
        closed = (sub & (_LEFT | _RIGHT)) > 0
        for side in (_LEFT, _RIGHT):
            aerated = (sub & (side | _AERATED)) == (side | _AERATED)
            if aerated.any():
                closed |= _closing(aerated, self.spacing)
        full = np.zeros(tuple(b.stop - b.start for b in wide), bool)
        full[wide_mine] = closed
        return full[tuple(slice(b.start - w.start, b.stop - w.start) for b, w in zip(box, wide))]

    def side_at(self, kji) -> str | None:
        idx = np.rint(np.asarray(kji, float)).astype(int) - self.origin
        if (idx < 0).any() or (idx >= self.sides.shape).any():
            return None
        return {_LEFT: "left", _RIGHT: "right"}.get(int(self.sides[tuple(idx)]) & (_LEFT | _RIGHT))

    def slice_range(self, side: str) -> tuple[int, int]:
        """First and last source slice (k) of that closed lung."""
        ks = np.nonzero((self.sides & (_LEFT if side == "left" else _RIGHT)).any(axis=(1, 2)))[0]
        return int(ks.min()) + self.box[0].start, int(ks.max()) + self.box[0].start


def _half_full_blocks(mask: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Whether each factors-sized block (the volume padded to whole blocks) is at least half lung.
    Counted in integers on a byte per voxel: a float copy of the lungs' box was the largest thing
    the region made (four bytes a voxel of a 512x512x300 chest's box: ~150 MB)."""
    shape = tuple(-(-n // f) * f for n, f in zip(mask.shape, factors))
    padded = mask if shape == mask.shape else np.zeros(shape, bool)
    if padded is not mask:
        padded[tuple(slice(0, n) for n in mask.shape)] = mask
    (a, b, c), (fa, fb, fc) = (n // f for n, f in zip(shape, factors)), factors
    counts = padded.reshape(a, fa, b, fb, c, fc).sum(axis=(1, 3, 5), dtype=np.int32)
    return 2 * counts >= fa * fb * fc


def _closing(mask: np.ndarray, step) -> np.ndarray:
    """``mask`` closed by a ball of CLOSING_MM (``step``: mm per axis); exact where the mask's
    array reaches at least 2 * CLOSING_MM beyond."""
    dilated = ndimage.distance_transform_edt(~mask, sampling=step) <= CLOSING_MM
    return ndimage.distance_transform_edt(dilated, sampling=step) > CLOSING_MM


def _close(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The lung plus the bays a closing by a ball of CLOSING_MM fills, found on a coarse grid."""
    if not mask.any():
        return mask
    factors = tuple(max(1, round(_COARSE_MM / s)) for s in spacing)
    lung = _half_full_blocks(mask, factors)
    pad = tuple(int(np.ceil(CLOSING_MM / (s * f))) + 1 for s, f in zip(spacing, factors))
    padded = np.pad(lung, [(p, p) for p in pad])
    closed = _closing(padded, tuple(s * f for s, f in zip(spacing, factors)))
    # Only blocks the closing added (bays): along a smooth chest wall it adds nothing, so the
    # coarse grid never moves the lung's own border.
    added = closed[tuple(slice(p, p + n) for p, n in zip(pad, lung.shape))] & ~lung
    out = mask.copy()
    out |= added[np.ix_(*(np.arange(n) // f for n, f in zip(mask.shape, factors)))]
    return out


def _lung_box(labels: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Bounding box of LUNG_L | LUNG_R, a slab at a time."""
    ks, js, is_ = [], [], []
    for k0 in range(0, labels.shape[0], _SLAB):
        slab = labels[k0:k0 + _SLAB]
        lung = (slab == LUNG_L) | (slab == LUNG_R)
        if not lung.any():
            continue
        kk = np.nonzero(lung.any(axis=(1, 2)))[0]
        jj = np.nonzero(lung.any(axis=(0, 2)))[0]
        ii = np.nonzero(lung.any(axis=(0, 1)))[0]
        ks += [k0 + kk[0], k0 + kk[-1]]
        js += [jj[0], jj[-1]]
        is_ += [ii[0], ii[-1]]
    if not ks:
        return None
    return tuple(slice(int(min(a)), int(max(a)) + 1) for a in (ks, js, is_))


def lung_region(labels: np.ndarray, spacing_kji: tuple[float, float, float]) -> LungRegion:
    """The closed lungs of a ct-anatomy label volume; ``spacing_kji`` in mm per array axis."""
    spacing = tuple(float(s) for s in spacing_kji)
    box = _lung_box(labels)
    if box is None:
        return LungRegion(labels.shape, tuple(slice(0, 0) for _ in labels.shape), np.zeros((0, 0, 0), np.uint8),
                          spacing)
    sub = labels[box]
    sides = np.zeros(sub.shape, np.uint8)
    left, right = sub == LUNG_L, sub == LUNG_R
    sides[_close(right, spacing)] = _RIGHT
    sides[_close(left, spacing)] = _LEFT  # a voxel belongs to one side
    sides[left | right] |= _AERATED
    return LungRegion(labels.shape, box, sides, spacing)
