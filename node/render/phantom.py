"""Synthetic CT phantoms defined in patient coordinates, for tests, benchmarks and demos.

A phantom is a function of LPS position (mm) sampled on any ``Geometry``: the same anatomy
comes out whatever the acquisition orientation (feet-first, sagittal, oblique), which is what
orientation tests need. Values are Hounsfield units.
"""
from __future__ import annotations

import numpy as np

from node.volume import Geometry, Volume

__all__ = ["centred_geometry", "sample_phantom", "sphere_phantom", "chest_phantom", "CHEST"]


def centred_geometry(shape, spacing, row, col, normal=None, centre=(0.0, 0.0, 0.0)) -> Geometry:
    """A grid of ``shape`` (slices, rows, cols) and ``spacing`` (x, y, z of the index axes) whose
    centre lies at ``centre`` (LPS); ``normal`` defaults to row x col (a right-handed grid)."""
    r, c = np.asarray(row, float), np.asarray(col, float)
    n = np.cross(r, c) if normal is None else np.asarray(normal, float)
    m = np.column_stack([r, c, n])
    half = (np.asarray(shape[::-1], float) - 1) * np.asarray(spacing, float) / 2
    origin = np.asarray(centre, float) - m @ half
    return Geometry(tuple(int(v) for v in shape), tuple(float(v) for v in origin), tuple(float(v) for v in spacing),
                    tuple(float(v) for v in m.ravel()))


def _tube(xyz: np.ndarray, a, b, radius: float) -> np.ndarray:
    """Mask of points within ``radius`` of the segment a-b."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ab = b - a
    t = np.clip(((xyz - a) @ ab) / (ab @ ab), 0.0, 1.0)
    nearest = a + t[..., None] * ab
    return np.sum((xyz - nearest) ** 2, axis=-1) <= radius**2


def sample_phantom(geometry: Geometry, hu_at, dtype=np.int16) -> Volume:
    """A Volume whose voxel (k, j, i) holds ``hu_at(LPS position)``; evaluated slice by slice."""
    nk, nj, ni = geometry.shape
    jj, ii = np.meshgrid(np.arange(nj), np.arange(ni), indexing="ij")
    arr = np.empty(geometry.shape, dtype=dtype)
    for k in range(nk):
        kji = np.stack([np.full_like(jj, k), jj, ii], axis=-1)
        arr[k] = hu_at(geometry.index_to_patient(kji))
    return Volume(arr, geometry)


def sphere_phantom(center, radius: float, value: float = 1000.0, background: float = 0.0):
    """``hu_at`` for one bright sphere in a uniform background."""
    c = np.asarray(center, float)

    def hu_at(xyz: np.ndarray) -> np.ndarray:
        return np.where(np.sum((xyz - c) ** 2, axis=-1) <= radius**2, value, background)

    return hu_at


# Landmarks of the chest phantom (LPS mm, origin mid-chest): tests and the viewer refer to them.
CHEST = {
    "trachea": ((0.0, -20.0, 150.0), (0.0, -20.0, 40.0)),
    "bronchus_right": ((0.0, -20.0, 40.0), (-55.0, -10.0, 0.0)),
    "bronchus_left": ((0.0, -20.0, 40.0), (55.0, -10.0, 0.0)),
    "aorta": ((15.0, 30.0, 150.0), (15.0, 30.0, -150.0)),
    "spine": ((0.0, 75.0, 150.0), (0.0, 75.0, -150.0)),
    "nodule": (60.0, -45.0, 60.0),  # a calcified nodule in the left upper lung
}


def chest_phantom(xyz: np.ndarray) -> np.ndarray:
    """Body (soft tissue), two lungs, trachea and main bronchi (air), contrast aorta, spine, nodule."""
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    hu = np.full(x.shape, -1000.0)
    hu[(x / 160) ** 2 + (y / 110) ** 2 <= 1] = 40.0
    for side in (-1, 1):
        lung = ((x - side * 85) / 55) ** 2 + (y / 70) ** 2 + ((z - 10) / 120) ** 2 <= 1
        hu[lung] = -850.0
    for name, radius in (("trachea", 9.0), ("bronchus_right", 6.0), ("bronchus_left", 6.0)):
        hu[_tube(xyz, *CHEST[name], radius)] = -1000.0
    hu[_tube(xyz, *CHEST["aorta"], 12.0)] = 300.0
    hu[_tube(xyz, *CHEST["spine"], 16.0)] = 700.0
    hu[np.sum((xyz - np.asarray(CHEST["nodule"])) ** 2, axis=-1) <= 8.0**2] = 1200.0
    return hu
