"""The working grid: the CT volume averaged in blocks to about 2 mm voxels, and the way back.

Topology (what is connected to what, what is enclosed) is decided on this coarse grid, where
morphology and connected components are cheap and block averaging has already removed most
noise. Boundaries are then placed on the source grid, slab by slab, by thresholding only the
voxels in a thin band around each coarse boundary (``Slab``), so the result keeps the source
resolution without a full-resolution morphological operation or a float copy of the volume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from node.volume import Geometry

AIR_FLOOR_HU = -1024  # padding outside the reconstruction circle (-2048, -3024) counts as air ...
PADDING_HU = -1500  # ... and marks where the image holds no data: nothing reconstructed is darker
SOFT_TISSUE_HU = 40.0  # muscle and organs: what most boundaries separate from air, lung or bone


def block_factors(spacing: tuple[float, float, float], target_mm: float) -> tuple[int, int, int]:
    """(slices, rows, columns) block sizes bringing each axis to about ``target_mm``."""
    sx, sy, sz = spacing
    return tuple(max(1, int(round(target_mm / s))) for s in (sz, sy, sx))


@dataclass(eq=False)
class Coarse:
    """Block means of a volume: ``hu`` (K, J, I) float32 on ``geometry``; ``factors`` (fz, fy, fx);
    ``peak``: the densest source voxel of each block."""

    hu: np.ndarray
    peak: np.ndarray
    geometry: Geometry
    factors: tuple[int, int, int]
    full_shape: tuple[int, int, int]
    field: np.ndarray  # (J, I) bool: reconstructed in-plane, False outside the reconstruction circle

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.geometry.spacing)) / 1000.0

    def radius(self, mm: float) -> tuple[int, int]:
        """In-plane structuring radius (columns, rows) in coarse voxels for ``mm``."""
        sx, sy, _ = self.geometry.spacing
        return max(1, int(round(mm / sx))), max(1, int(round(mm / sy)))

    def slice_z(self) -> np.ndarray:
        """Patient z (mm, head positive) of each coarse slice centre."""
        k = np.arange(self.hu.shape[0], dtype=float)
        return self.geometry.index_to_patient(np.stack([k, np.zeros_like(k), np.zeros_like(k)], axis=1))[:, 2]

    def x_plane(self, k: int) -> np.ndarray:
        """Patient x (mm, patient left positive) of every voxel centre of coarse slice ``k`` (J, I)."""
        return self.patient_plane(k, 0)

    def patient_plane(self, k: int, axis: int) -> np.ndarray:
        """Patient coordinate ``axis`` (0 x, 1 y, 2 z; mm) of every voxel centre of coarse slice ``k`` (J, I)."""
        g = self.geometry
        m = g.matrix
        sx, sy, sz = g.spacing
        j = np.arange(self.hu.shape[1])[:, None]
        i = np.arange(self.hu.shape[2])[None, :]
        return g.origin[axis] + i * sx * m[axis, 0] + j * sy * m[axis, 1] + k * sz * m[axis, 2]


def _block_reduce(plane: np.ndarray, fy: int, fx: int, combine, fill) -> np.ndarray:
    """Combine (rows, cols) over fy x fx blocks with a binary ufunc (np.add, np.maximum),
    padding the last partial blocks with ``fill``; strided slices keep every pass vectorised."""
    rows, cols = plane.shape
    jr, ir = -(-rows // fy), -(-cols // fx)
    if (jr * fy, ir * fx) != plane.shape:
        plane = np.pad(plane, ((0, jr * fy - rows), (0, ir * fx - cols)), constant_values=fill)
    out = plane[:, 0::fx].copy()
    for d in range(1, fx):
        combine(out, plane[:, d::fx], out=out)
    result = out[0::fy].copy()
    for d in range(1, fy):
        combine(result, out[d::fy], out=result)
    return result


def coarsen(array: np.ndarray, geometry: Geometry, target_mm: float = 2.0) -> Coarse:
    """Block-average ``array`` (slices, rows, cols) to about ``target_mm`` voxels, slab by slab."""
    f = block_factors(geometry.spacing, target_mm)
    fz, fy, fx = f
    n, rows, cols = array.shape
    counts = _block_reduce(np.ones((rows, cols), np.float32), fy, fx, np.add, 0)
    out = np.empty((math.ceil(n / fz), *counts.shape), np.float32)
    peak = np.empty_like(out)
    for kc in range(out.shape[0]):
        slab = np.maximum(array[kc * fz:(kc + 1) * fz], AIR_FLOOR_HU)
        total = slab.sum(axis=0, dtype=np.float32)
        out[kc] = _block_reduce(total, fy, fx, np.add, 0) / (counts * len(slab))
        peak[kc] = _block_reduce(slab.max(axis=0), fy, fx, np.maximum, AIR_FLOOR_HU)
    # The reconstruction circle is the same on every slice: padding on the first, middle and last.
    padding = np.logical_and.reduce([array[k] < PADDING_HU for k in {0, n // 2, n - 1}])
    field = _block_reduce(padding.astype(np.float32), fy, fx, np.add, 0) < counts / 2
    centre = geometry.index_to_patient([(fz - 1) / 2, (fy - 1) / 2, (fx - 1) / 2])
    sx, sy, sz = geometry.spacing
    coarse_geometry = Geometry(shape=out.shape, origin=tuple(float(v) for v in centre),
                               spacing=(sx * fx, sy * fy, sz * fz), direction=geometry.direction)
    return Coarse(out, peak, coarse_geometry, f, (n, rows, cols), field)


# Morphology with box footprints, as shifted ORs/ANDs: a few passes over the array per voxel of
# radius, several times faster than a structuring element on these bool volumes.

def _shifted(mask: np.ndarray, radii: tuple[int, int, int], combine, edge: bool) -> np.ndarray:
    out = mask.copy()
    for axis, r in enumerate(radii):
        for _ in range(r):
            src = out.copy()
            hi = [slice(None)] * 3
            lo = [slice(None)] * 3
            hi[axis], lo[axis] = slice(1, None), slice(None, -1)
            combine(out[tuple(hi)], src[tuple(lo)], out=out[tuple(hi)])
            combine(out[tuple(lo)], src[tuple(hi)], out=out[tuple(lo)])
            if not edge and combine is np.logical_and:
                first = [slice(None)] * 3
                last = [slice(None)] * 3
                first[axis], last[axis] = 0, -1
                out[tuple(first)] = False
                out[tuple(last)] = False
    return out


def grow(mask: np.ndarray, rx: int = 1, ry: int = 1, rz: int = 1) -> np.ndarray:
    """Dilation by a box of radii (columns, rows, slices) in voxels."""
    return _shifted(mask, (rz, ry, rx), np.logical_or, False)


def shrink(mask: np.ndarray, rx: int = 1, ry: int = 1, rz: int = 1, edge_inside: bool = False) -> np.ndarray:
    """Erosion by a box; ``edge_inside``: beyond the volume's edge counts as inside the mask."""
    return _shifted(mask, (rz, ry, rx), np.logical_and, edge_inside)


def local_max(values: np.ndarray) -> np.ndarray:
    """Maximum over each voxel's 3x3x3 neighbourhood."""
    return _shifted(values, (1, 1, 1), np.maximum, True)


def component_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Voxel count of labels 1..n."""
    return np.bincount(labels.ravel(), minlength=n + 1)[1:]


class Slab:
    """Coarse masks brought to the source grid one coarse slice (``fz`` source slices) at a time."""

    def __init__(self, coarse: Coarse) -> None:
        self.fz, self.fy, self.fx = coarse.factors
        _, self.rows, self.cols = coarse.full_shape

    def extent(self, plane: np.ndarray) -> tuple[slice, slice] | tuple[None, None]:
        """Source (rows, cols) slices covering the True coarse voxels of ``plane``."""
        j = np.nonzero(plane.any(axis=1))[0]
        if j.size == 0:
            return None, None
        i = np.nonzero(plane.any(axis=0))[0]
        return (slice(j[0] * self.fy, min((j[-1] + 1) * self.fy, self.rows)),
                slice(i[0] * self.fx, min((i[-1] + 1) * self.fx, self.cols)))

    def up(self, plane: np.ndarray) -> np.ndarray:
        """One coarse slice (J, I) on the source rows and columns (nearest neighbour)."""
        if self.fy == 1 and self.fx == 1:
            return plane
        return np.repeat(np.repeat(plane, self.fy, axis=0), self.fx, axis=1)[:self.rows, :self.cols]
