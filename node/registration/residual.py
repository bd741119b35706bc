"""Residual distance after registration where no landmarks exist: how far apart the surfaces of two
masks on one grid are (the fixed mask and the moving mask carried onto the fixed grid).

Symmetric surface distance: for every surface voxel of each mask, the distance to the nearest
surface voxel of the other, in mm; reported as the mean and the 95th percentile. Surfaces are
voxel centres, so a perfect match reads 0 and any value carries up to about half a voxel of
quantisation. A KD-tree over surface points (not a distance transform over the whole grid) keeps a
512x512x300 pair to a few hundred MB; each side is subsampled to a fixed number of points, which
changes the statistics by far less than the quantisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from node.volume import Geometry

__all__ = ["SurfaceDistance", "surface_distance"]

_POINTS_PER_SIDE = 20_000
_EDGE_VOXELS = 2


@dataclass(frozen=True)
class SurfaceDistance:
    mean_mm: float
    p95_mm: float


def _surface_mm(mask: np.ndarray, within: np.ndarray, geom: Geometry) -> np.ndarray:
    from scipy import ndimage

    # 6-connected erosion: a voxel is on the surface when one of its face neighbours is outside the
    # mask. The edges of the grid and of ``within`` are where the images end, not where the anatomy
    # does (a body cut by the field of view): there the mask counts as continuing.
    inner = ndimage.binary_erosion(mask | ~within, border_value=1)
    return geom.index_to_patient(np.argwhere(mask & within & ~inner))


def surface_distance(a: np.ndarray, b: np.ndarray, geom: Geometry, within: np.ndarray | None = None,
                     seed: int = 0) -> SurfaceDistance | None:
    """Symmetric surface distance between boolean masks ``a`` and ``b`` on ``geom``, counting only
    surfaces inside ``within`` (where both images have data; default the whole grid), at least
    ``_EDGE_VOXELS`` from its edge; None when either has no surface there (nothing to compare,
    which the caller reports rather than hides)."""
    from scipy.spatial import cKDTree

    a, b = np.asarray(a, bool), np.asarray(b, bool)
    within = np.ones(geom.shape, bool) if within is None else np.asarray(within, bool)
    if a.shape != geom.shape or b.shape != geom.shape or within.shape != geom.shape:
        raise ValueError(f"surface_distance: masks {a.shape}, {b.shape}, {within.shape} are not on the grid "
                         f"{geom.shape}")
    from scipy import ndimage

    # Masks are least reliable in the end slices of a series (a body segmented from a partial slice,
    # a cut organ): the voxels next to where either image ends are left out.
    within = ndimage.binary_erosion(within, iterations=_EDGE_VOXELS, border_value=0)
    sa, sb = _surface_mm(a, within, geom), _surface_mm(b, within, geom)
    if not len(sa) or not len(sb):
        return None
    rng = np.random.default_rng(seed)

    def some(points: np.ndarray) -> np.ndarray:
        if len(points) <= _POINTS_PER_SIDE:
            return points
        return points[rng.choice(len(points), _POINTS_PER_SIDE, replace=False)]

    d = np.concatenate([cKDTree(sb).query(some(sa))[0], cKDTree(sa).query(some(sb))[0]])
    return SurfaceDistance(mean_mm=float(d.mean()), p95_mm=float(np.percentile(d, 95)))
