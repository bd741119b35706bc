"""A breathing-like deformation of the chest phantom: where it lives and how a study is drawn with it.

The displacement ``d`` (anatomical mm → mm) peaks over each lung's base, where the diaphragm
descends, and is a few per cent of that at the spine. A study drawn with it shows at patient point
``p`` the anatomy at ``u + d(u)``, ``u = pose⁻¹ p`` (its rigid place). Registration pairs
(node.phantom.pairs) resample a baseline through this map; nodule follow-ups (node.phantom.ct) draw
the anatomy through it and the nodules as undeformed spheres at the place their tissue moved to,
so each nodule's volume, and the doubling time its truth states, stay exact.
"""
from __future__ import annotations

import math

import numpy as np

from node.phantom.grid import Pose, sub_slice_offsets
from node.volume import Geometry

DIAPHRAGM_Z_MM = -85.0  # where the breathing displacement peaks (the domes and the lower lobes)
_Z_WIDTH_MM, _X_LUNG_MM, _X_WIDTH_MM, _Y_WIDTH_MM = 50.0, 72.0, 45.0, 90.0
MODEL = "node.phantom.breathing.breathing_displacement"


def breathing_displacement(points, amplitude_mm: float) -> np.ndarray:
    """(..., 3) baseline mm → (..., 3) displacement: mostly along z (the diaphragm descends), a
    third of it forward/back; Gaussian bumps over each lung's base, ~6 % of it at the spine."""
    p = np.asarray(points, float)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    w = (np.exp(-(((np.abs(x) - _X_LUNG_MM) / _X_WIDTH_MM) ** 2)) * np.exp(-((y / _Y_WIDTH_MM) ** 2))
         * np.exp(-(((z - DIAPHRAGM_Z_MM) / _Z_WIDTH_MM) ** 2)))
    d = np.zeros_like(p)
    d[..., 1] = -amplitude_mm / 3.0 * w
    d[..., 2] = amplitude_mm * w
    return d


def moved_to(center, amplitude_mm: float) -> np.ndarray:
    """The rigid-frame point ``u`` whose deformed anatomy ``u + d(u)`` is ``center``: where the
    tissue at ``center`` is seen. Fixed-point iteration: d changes by at most ~0.3 mm per mm at
    30 mm amplitude, so it contracts."""
    c = np.asarray(center, float)
    u = c.copy()
    for _ in range(60):
        nxt = c - breathing_displacement(u, amplitude_mm)
        if np.abs(nxt - u).max() < 1e-6:
            return nxt
        u = nxt
    return u


def padded(geom: Geometry, amplitude_mm: float) -> tuple[Geometry, tuple[int, int, int]]:
    """``geom`` grown on every side by the largest displacement (plus a voxel): the rigid drawing
    the deformed one samples from. Returns it and the padding (slices, rows, cols)."""
    reach = amplitude_mm * math.sqrt(1 + 1 / 9) + 1e-6
    pad = tuple(int(math.ceil(reach / s)) + 1 for s in (geom.spacing[2], geom.spacing[1], geom.spacing[0]))
    r, c, n = geom.row_direction, geom.column_direction, geom.normal
    dx, dy, dz = geom.spacing
    origin = np.asarray(geom.origin) - pad[2] * dx * r - pad[1] * dy * c - pad[0] * dz * n
    shape = tuple(v + 2 * p for v, p in zip(geom.shape, pad))
    return Geometry(shape=shape, origin=tuple(float(v) for v in origin), spacing=geom.spacing,
                    direction=geom.direction), pad


def deform_codes(rigid: np.ndarray, big: Geometry, geom: Geometry, pose: Pose, n_sub: int,
                 amplitude_mm: float) -> np.ndarray:
    """Codes of ``geom`` (slices * n_sub, rows, cols) drawn with the breathing deformation, sampled
    (nearest) from ``rigid``: the same anatomy drawn rigidly on the padded grid ``big``."""
    n, rows, cols = geom.shape
    dx, dy, dz = geom.spacing
    r, c, nrm = geom.row_direction, geom.column_direction, geom.normal
    origin, big_origin = np.asarray(geom.origin), np.asarray(big.origin)
    sub = sub_slice_offsets(n_sub, dz)
    step = dz / n_sub
    jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    in_plane = ii[..., None] * dx * r + jj[..., None] * dy * c
    out = np.empty((n * n_sub, rows, cols), np.uint8)
    flat = rigid.reshape(len(rigid), -1)
    for k in range(n):
        for s in range(n_sub):
            p = origin + in_plane + (k * dz + sub[s]) * nrm
            moved = p + breathing_displacement(pose.to_anatomy(p), amplitude_mm) @ pose.r.T - big_origin
            col = np.clip(np.rint(moved @ r / dx).astype(np.intp), 0, big.shape[2] - 1)
            row = np.clip(np.rint(moved @ c / dy).astype(np.intp), 0, big.shape[1] - 1)
            q = np.clip(np.rint((moved @ nrm - sub[0]) / step).astype(np.intp), 0, len(rigid) - 1)
            out[k * n_sub + s] = flat[q, row * big.shape[2] + col]
    return out
