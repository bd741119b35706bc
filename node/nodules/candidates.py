"""Nodule candidates: a multi-scale Hessian blob measure that answers to spheres, not to tubes or sheets.

At scale s (mm) the scale-normalised Hessian s^2 H of the Gaussian-smoothed image has three
negative eigenvalues of similar size at the centre of a bright ball of radius about s*sqrt(3);
a vessel (a tube) has one eigenvalue near zero, a fissure or the chest wall (a sheet or an edge)
two. The measure is the eigenvalue of smallest magnitude, s^2 |l3|, when all three are negative,
so it is high only where the image curves down in every direction: a nodule, including one on a
vessel or at a vessel branch, where the branch point itself stays weaker than a ball of the same
calibre. Candidates are its local maxima over space and scale inside the (closed) lungs.

The image is clipped to [-1000, 100] HU first, so bone or contrast next to the lung does not
dominate, and resampled to an isotropic working grid per scale (coarser for larger scales), which
keeps a 512x512x300 chest within seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.nodules.region import LungRegion

__all__ = ["Candidate", "find_candidates", "SCALES_MM"]

SCALES_MM = (1.4, 2.0, 2.8, 4.0, 5.6)  # ball radii ~2.4 .. 9.7 mm: nodules of ~4 .. 20 mm and more
HU_RANGE = (-1000.0, 100.0)


@dataclass(frozen=True)
class Candidate:
    kji: tuple[float, float, float]  # source-grid index of the blob centre
    scale_mm: float  # the scale where the measure peaked
    strength: float  # s^2 |l3| in HU (a ball of contrast C gives roughly C/5 at its best scale)

    @property
    def radius_mm(self) -> float:
        return self.scale_mm * 3 ** 0.5


def _eig_min_abs(h: list[np.ndarray]) -> np.ndarray:
    """Per voxel, the largest (least negative) eigenvalue of the symmetric 3x3 Hessians
    (hkk, hjj, hii, hkj, hki, hji), or 0 where any eigenvalue is >= 0."""
    hkk, hjj, hii, hkj, hki, hji = h
    m = np.empty((hkk.size, 3, 3), np.float32)
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = hkk, hjj, hii
    m[:, 0, 1] = m[:, 1, 0] = hkj
    m[:, 0, 2] = m[:, 2, 0] = hki
    m[:, 1, 2] = m[:, 2, 1] = hji
    top = np.linalg.eigvalsh(m)[:, 2]
    return np.where(top < 0, -top, 0.0).astype(np.float32)


def _blob_measure(image: np.ndarray, voxel_mm: float, scale_mm: float, where: np.ndarray,
                  min_strength: float) -> np.ndarray:
    """s^2 |l3| on ``image`` (isotropic ``voxel_mm``), computed only at voxels of ``where``.

    Memory: the Hessian's six components are never held whole. The trace (a sum of three second
    derivatives, one at a time) picks the few voxels that can reach ``min_strength``, and each
    component is kept only there; at most four float32 arrays of the working grid live at once
    (the smoothed image, the trace, a first and a second derivative), where the six components
    and three first derivatives took ten."""
    sigma = scale_mm / voxel_mm
    smooth = ndimage.gaussian_filter(image, sigma, mode="nearest", truncate=3.0, output=np.float32)
    norm = np.float32(sigma ** 2)  # derivatives per voxel: times sigma^2 (in voxels) is scale-normalised

    def second(a: int, b: int) -> np.ndarray:  # d2/da db as np.gradient twice (the same stencil)
        return np.gradient(np.gradient(smooth, axis=a), axis=b)

    trace = second(0, 0)
    trace += second(1, 1)
    trace += second(2, 2)
    # l3 <= trace / 3: a voxel can reach min_strength only where the trace is at least 3 times it.
    sel = np.nonzero(where & (trace <= np.float32(-3 * min_strength / norm)))
    del trace
    out = np.zeros(image.shape, np.float32)
    if len(sel[0]):
        part = {}
        for a in range(3):
            first = np.gradient(smooth, axis=a)
            for b in range(a, 3):
                part[a, b] = np.gradient(first, axis=b)[sel]
            del first
        out[sel] = norm * _eig_min_abs([part[a, b] for a, b in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))])
    return out


def _resample(a: np.ndarray, factors: np.ndarray, order: int) -> np.ndarray:
    out = np.float32 if order else a.dtype  # linear: float32 whatever the source type
    return ndimage.zoom(a, factors, order=order, mode="nearest", grid_mode=True, output=out)


def find_candidates(hu: np.ndarray, spacing_kji: tuple[float, float, float], region: LungRegion,
                    min_strength: float, max_count: int) -> list[Candidate]:
    """Blob centres inside the closed lungs of ``region``, strongest first, at most ``max_count``."""
    inside = region.inside
    if not inside.any():
        return []
    # The image around the region's box, by enough for the largest scale's smoothing.
    pad = [int(np.ceil(2 * SCALES_MM[-1] * 3 ** 0.5 / s)) for s in spacing_kji]
    box = tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(region.box, pad, hu.shape))
    origin = np.array([b.start for b in box], float)
    # Clipped in the source's own type (int16 for most CT: half the bytes of float32); resampling
    # turns it into float32 on each (smaller) working grid.
    image = np.clip(hu[box], *(np.asarray(HU_RANGE).astype(hu.dtype)))
    where_box = np.zeros(image.shape, np.uint8)
    where_box[tuple(slice(r.start - b.start, r.stop - b.start) for r, b in zip(region.box, box))] = inside
    spacing = np.asarray(spacing_kji, float)
    found: list[Candidate] = []
    for scale in SCALES_MM:
        voxel = float(np.clip(scale / 1.2, spacing.min(), 3.0))  # >= 1.2 voxels per sigma
        factors = spacing / voxel
        img = _resample(image, factors, 1)
        where = _resample(where_box, factors, 0).astype(bool)
        b = _blob_measure(img, voxel, scale, where, min_strength)
        del img, where
        peaks = (b >= min_strength)
        peaks &= b == ndimage.maximum_filter(b, size=3)
        for p in np.argwhere(peaks):
            kji = origin + (p + 0.5) / factors - 0.5  # working-grid voxel centre -> source index
            found.append(Candidate(tuple(float(v) for v in kji), scale, float(b[tuple(p)])))
    return _merge(found, spacing, max_count)


def _merge(found: list[Candidate], spacing: np.ndarray, max_count: int) -> list[Candidate]:
    """One candidate per blob: the strongest over scales, dropping weaker ones within its radius."""
    found.sort(key=lambda c: -c.strength)
    kept: list[Candidate] = []
    for c in found:
        p = np.asarray(c.kji) * spacing
        if all(np.linalg.norm(p - np.asarray(o.kji) * spacing) > max(o.radius_mm, c.radius_mm) for o in kept):
            kept.append(c)
            if len(kept) >= max_count:
                break
    return kept
