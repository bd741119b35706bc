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

__all__ = ["Candidate", "find_candidates", "hessian_shape", "SCALES_MM"]

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


def _second(smooth: np.ndarray, pts: tuple[np.ndarray, ...], a: int, b: int) -> np.ndarray:
    """d2 smooth / da db at the voxels ``pts``, as np.gradient twice gives it inside the array
    (central differences over two voxels; indices clipped at the border, which the lungs never reach)."""
    def at(da: int, db: int) -> np.ndarray:
        idx = [p.copy() for p in pts]
        idx[a] += da
        idx[b] += db
        return smooth[tuple(np.clip(i, 0, n - 1) for i, n in zip(idx, smooth.shape))]

    return (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1)) / 4


_D2 = np.array([0.25, 0.0, -0.5, 0.0, 0.25], np.float32)  # np.gradient twice along one axis
_SLAB = 16  # working-grid slices per step where a filter along the other two axes runs


def _blob_measure(image: np.ndarray, voxel_mm: float, scale_mm: float, where: np.ndarray,
                  min_strength: float) -> np.ndarray:
    """s^2 |l3| on ``image`` (isotropic ``voxel_mm``; smoothed in place and let go: pass it without
    keeping a reference), computed only at ``where``.

    Memory: two float32 arrays of the working grid at most (the smoothed image, the Hessian's
    trace; the second derivatives a slab at a time), where holding the six Hessian components and
    three first derivatives took ten. The trace picks the voxels that can reach ``min_strength``, and the
    components are computed at those voxels only."""
    sigma = scale_mm / voxel_mm
    smooth = ndimage.gaussian_filter(image, sigma, mode="nearest", truncate=3.0, output=image)
    norm = np.float32(sigma ** 2)  # derivatives per voxel: times sigma^2 (in voxels) is scale-normalised
    trace = ndimage.correlate1d(smooth, _D2, axis=0, mode="nearest", output=np.float32)
    # The other two along axes that each slab holds whole: a slab's worth of temporary, not a grid's.
    part = np.empty((_SLAB, *trace.shape[1:]), np.float32)
    for k0 in range(0, trace.shape[0], _SLAB):
        k1 = min(k0 + _SLAB, trace.shape[0])
        for axis in (1, 2):
            trace[k0:k1] += ndimage.correlate1d(smooth[k0:k1], _D2, axis=axis, mode="nearest", output=part[:k1 - k0])
    del part
    # l3 <= trace / 3: a voxel can reach min_strength only where the trace is at least 3 times it.
    sel = np.nonzero(where & (trace <= np.float32(-3 * min_strength / norm)))
    del trace
    h = [_second(smooth, sel, a, b) for a, b in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))] \
        if len(sel[0]) else None
    shape = image.shape
    del smooth, image  # the caller holds no reference: the grid is freed before the result's is made
    out = np.zeros(shape, np.float32)
    if h is not None:
        out[sel] = norm * _eig_min_abs(h)
    return out


def _zoomed_shape(shape: tuple[int, ...], factors: np.ndarray) -> tuple[int, ...]:
    """The shape ``ndimage.zoom`` gives (its own rounding), known before the array is made."""
    return tuple(int(round(n * f)) for n, f in zip(shape, factors))


def _resample(a: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Linear, to float32 whatever the source type."""
    return ndimage.zoom(a, factors, order=1, mode="nearest", grid_mode=True, output=np.float32)


def _nearest(region: LungRegion, at: tuple[slice, ...], shape: tuple[int, ...], grid: tuple[int, ...]) -> np.ndarray:
    """The closed lungs (``region``, on the box ``at`` of a ``shape`` array) on ``grid``, the whole array resampled
    to that many voxels per axis: what ndimage.zoom(order=0, grid_mode=True) gives, without the
    whole array's copy."""
    idx = [np.minimum(np.floor((np.arange(m) + 0.5) * n / m).astype(np.intp), n - 1) - b.start
           for n, m, b in zip(shape, grid, at)]
    keep = [(i >= 0) & (i < b.stop - b.start) for i, b in zip(idx, at)]
    out = np.zeros(grid, bool)
    out[np.ix_(*keep)] = region.closed_at(*(i[k] for i, k in zip(idx, keep)))
    return out


def find_candidates(hu: np.ndarray, spacing_kji: tuple[float, float, float], region: LungRegion,
                    min_strength: float, max_count: int) -> list[Candidate]:
    """Blob centres inside the closed lungs of ``region``, strongest first, at most ``max_count``."""
    # Read from the region's sides, not its ``inside``: a byte per voxel of the box held through the
    # finest scale's working grids, the largest moment of a nodule job (issue #15).
    if not region.closed_found:
        return []
    # The image around the region's box, by enough for the largest scale's smoothing.
    pad = [int(np.ceil(2 * SCALES_MM[-1] * 3 ** 0.5 / s)) for s in spacing_kji]
    box = tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(region.box, pad, hu.shape))
    origin = np.array([b.start for b in box], float)
    # Clipped in the source's own type (int16 for most CT: half the bytes of float32); resampling
    # turns it into float32 on each (smaller) working grid.
    image = np.clip(hu[box], *(np.asarray(HU_RANGE).astype(hu.dtype)))
    at = tuple(slice(r.start - b.start, r.stop - b.start) for r, b in zip(region.box, box))
    spacing = np.asarray(spacing_kji, float)
    found: list[Candidate] = []
    for scale in SCALES_MM:
        voxel = float(np.clip(scale / 1.2, spacing.min(), 3.0))  # >= 1.2 voxels per sigma
        factors = spacing / voxel
        grid = _zoomed_shape(image.shape, factors)
        where = _nearest(region, at, image.shape, grid)
        b = _blob_measure(_resample(image, factors), voxel, scale, where, min_strength)  # handed over, not kept
        del where
        peaks = b >= min_strength
        peaks &= b == ndimage.maximum_filter(b, size=3)
        for p in np.argwhere(peaks):
            kji = origin + (p + 0.5) / factors - 0.5  # working-grid voxel centre -> source index
            found.append(Candidate(tuple(float(v) for v in kji), scale, float(b[tuple(p)])))
    return _merge(found, spacing, max_count)


def hessian_shape(hu: np.ndarray, kji, scale_mm: float, spacing_kji) -> float:
    """l3 / l1 of the Hessian at ``kji`` at scale ``scale_mm`` (eigenvalues l1 <= l2 <= l3, HU clipped
    as for the blob measure): about 1 at the centre of a ball, near 0 on a tube, and in between
    (0.5 and less on the phantoms) where vessels meet or cross; 0 where the image does not curve
    down in every direction. Gaussian derivatives evaluated at that one point."""
    spacing = np.asarray(spacing_kji, float)
    centre = np.rint(np.asarray(kji, float)).astype(int)
    reach = np.ceil(4 * scale_mm / spacing).astype(int)
    offsets = [np.arange(-r, r + 1) for r in reach]
    idx = [np.clip(c + o, 0, n - 1) for c, o, n in zip(centre, offsets, hu.shape)]
    sub = np.clip(hu[np.ix_(*idx)], *HU_RANGE).astype(np.float64)
    kernels = []
    for o, s in zip(offsets, spacing):
        x = o * s  # mm
        g = np.exp(-0.5 * (x / scale_mm) ** 2)
        g /= g.sum()
        kernels.append((g, -x / scale_mm ** 2 * g, (x ** 2 / scale_mm ** 4 - 1 / scale_mm ** 2) * g))
    h = np.empty((3, 3))
    for a in range(3):
        for b in range(a, 3):
            order = [0, 0, 0]
            order[a] += 1
            order[b] += 1
            k0, k1, k2 = (kernels[axis][n] for axis, n in enumerate(order))
            h[a, b] = h[b, a] = np.einsum("kji,k,j,i->", sub, k0, k1, k2)
    ev = np.linalg.eigvalsh(h)
    return float(ev[2] / ev[0]) if ev[2] < 0 else 0.0


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
