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
    """s^2 |l3| on ``image`` (isotropic ``voxel_mm``), computed only at voxels of ``where``."""
    sigma = scale_mm / voxel_mm
    smooth = ndimage.gaussian_filter(image, sigma, mode="nearest", truncate=3.0)
    out = np.zeros(image.shape, np.float32)
    dk, dj, di = np.gradient(smooth)
    hkk, hkj, hki = np.gradient(dk)
    hjj, hji = np.gradient(dj)[1:]
    hii = np.gradient(di, axis=2)
    norm = sigma ** 2  # derivatives per voxel: times sigma^2 (in voxels) is scale-normalised
    # l3 <= trace / 3: a voxel can reach min_strength only where the trace is at least 3 times it.
    sel = where & (norm * (hkk + hjj + hii) <= -3 * min_strength)
    if sel.any():
        out[sel] = norm * _eig_min_abs([a[sel] for a in (hkk, hjj, hii, hkj, hki, hji)])
    return out


def _resample(a: np.ndarray, factors: np.ndarray, order: int) -> np.ndarray:
    return ndimage.zoom(a, factors, order=order, mode="nearest", grid_mode=True)


def find_candidates(hu: np.ndarray, spacing_kji: tuple[float, float, float], region: np.ndarray,
                    min_strength: float, max_count: int) -> list[Candidate]:
    """Blob centres inside ``region`` (bool, source grid), strongest first, at most ``max_count``."""
    if not region.any():
        return []
    box = ndimage.find_objects(region.astype(np.uint8))[0]
    pad = [int(np.ceil(2 * SCALES_MM[-1] * 3 ** 0.5 / s)) for s in spacing_kji]
    box = tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(box, pad, hu.shape))
    origin = np.array([b.start for b in box], float)
    image = np.clip(hu[box], *HU_RANGE).astype(np.float32)
    inside = region[box]
    spacing = np.asarray(spacing_kji, float)
    found: list[Candidate] = []
    for scale in SCALES_MM:
        voxel = float(np.clip(scale / 1.2, spacing.min(), 3.0))  # >= 1.2 voxels per sigma
        factors = spacing / voxel
        img = _resample(image, factors, 1)
        where = _resample(inside.astype(np.uint8), factors, 0).astype(bool)
        b = _blob_measure(img, voxel, scale, where, min_strength)
        peaks = (b == ndimage.maximum_filter(b, size=3)) & (b >= min_strength)
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
