"""Where nodules are looked for: each lung of ``ct-anatomy``, closed so juxtapleural nodules stay in.

A nodule against the chest wall indents the aerated lung, so the lung mask of ``ct-anatomy``
leaves it out. Closing each lung (dilate, then erode, by ``CLOSING_MM``) fills such bays but not
the large concavities around the heart and hilum, which a convex hull would swallow. The closing
runs on a coarse grid (distance transforms), which keeps it cheap on a 512x512x300 volume.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.anatomy import LUNG_L, LUNG_R

__all__ = ["CLOSING_MM", "LungRegion", "lung_region"]

CLOSING_MM = 9.0  # fills a bay up to ~18 mm across: a juxtapleural nodule of up to ~15 mm
_COARSE_MM = 3.0


@dataclass(eq=False)
class LungRegion:
    """Boolean masks on the source grid: each closed lung, and the aerated lungs as segmented."""

    left: np.ndarray
    right: np.ndarray
    aerated: np.ndarray  # LUNG_L | LUNG_R of ct-anatomy

    @property
    def both(self) -> np.ndarray:
        return self.left | self.right

    def side_at(self, kji) -> str | None:
        idx = tuple(int(round(v)) for v in kji)
        if self.left[idx]:
            return "left"
        if self.right[idx]:
            return "right"
        return None


def _blocks(mask: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Fraction of lung in each factors-sized block (the volume padded to whole blocks)."""
    shape = tuple(-(-n // f) * f for n, f in zip(mask.shape, factors))
    padded = np.zeros(shape, np.float32)
    padded[tuple(slice(0, n) for n in mask.shape)] = mask
    (a, b, c), (fa, fb, fc) = (n // f for n, f in zip(shape, factors)), factors
    return padded.reshape(a, fa, b, fb, c, fc).mean(axis=(1, 3, 5))


def _close(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The lung plus the bays a closing by a ball of CLOSING_MM fills, found on a coarse grid."""
    if not mask.any():
        return mask
    factors = tuple(max(1, round(_COARSE_MM / s)) for s in spacing)
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    sub = mask[box]
    lung = _blocks(sub, factors) >= 0.5
    pad = tuple(int(np.ceil(CLOSING_MM / (s * f))) + 1 for s, f in zip(spacing, factors))
    padded = np.pad(lung, [(p, p) for p in pad])
    step = tuple(s * f for s, f in zip(spacing, factors))
    dilated = ndimage.distance_transform_edt(~padded, sampling=step) <= CLOSING_MM
    closed = ndimage.distance_transform_edt(dilated, sampling=step) > CLOSING_MM
    # Only blocks the closing added (bays): along a smooth chest wall it adds nothing, so the
    # coarse grid never moves the lung's own border.
    added = closed[tuple(slice(p, p + n) for p, n in zip(pad, lung.shape))] & ~lung
    out = mask.copy()
    out[box] |= added[np.ix_(*(np.arange(n) // f for n, f in zip(sub.shape, factors)))]
    return out


def lung_region(labels: np.ndarray, spacing_kji: tuple[float, float, float]) -> LungRegion:
    """The closed lungs of a ct-anatomy label volume; ``spacing_kji`` in mm per array axis."""
    left, right = labels == LUNG_L, labels == LUNG_R
    closed_left, closed_right = _close(left, spacing_kji), _close(right, spacing_kji)
    closed_right &= ~closed_left  # a voxel belongs to one side
    return LungRegion(closed_left, closed_right, left | right)
