"""Where a study's voxels lie, and painting the anatomy onto them.

A study is an axial voxel grid (``node.volume.Geometry``, in the order ``load_series`` gives
after sorting by geometry) plus a rigid ``Pose`` that places the anatomical frame in the study's
patient coordinates. An unrotated pose keeps the grid axis-aligned with the anatomy, so slices are
painted directly; a rotated one paints an axis-aligned anatomical grid and resamples it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from node.phantom.canvas import Canvas
from node.volume import Geometry


def rotation_matrix(rotation_deg: tuple[float, float, float]) -> np.ndarray:
    """Rotation about the patient x, then y, then z axis (degrees)."""
    rx, ry, rz = np.radians(rotation_deg)
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


@dataclass(frozen=True)
class Pose:
    """Anatomical frame → patient coordinates: p = R a + t (R: 9 values, row-major)."""

    rotation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def from_degrees(cls, rotation_deg, translation_mm) -> "Pose":
        return cls(tuple(float(v) for v in rotation_matrix(rotation_deg).ravel()),
                   tuple(float(v) for v in translation_mm))

    @classmethod
    def from_matrix(cls, m) -> "Pose":
        m = np.asarray(m, dtype=float)
        return cls(tuple(float(v) for v in m[:3, :3].ravel()), tuple(float(v) for v in m[:3, 3]))

    @property
    def r(self) -> np.ndarray:
        return np.asarray(self.rotation, dtype=float).reshape(3, 3)

    @property
    def rotated(self) -> bool:
        return not np.allclose(self.r, np.eye(3), atol=1e-12)

    def to_patient(self, a) -> np.ndarray:
        return np.asarray(a, float) @ self.r.T + np.asarray(self.translation_mm, float)

    def to_anatomy(self, p) -> np.ndarray:
        return (np.asarray(p, float) - np.asarray(self.translation_mm, float)) @ self.r

    def then(self, move: "Pose") -> "Pose":
        """This pose followed by the rigid ``move`` of the patient (both in patient coordinates)."""
        return Pose.from_matrix(np.asarray(move.matrix()) @ np.asarray(self.matrix()))

    def matrix(self) -> list[list[float]]:
        m = np.eye(4)
        m[:3, :3] = self.r
        m[:3, 3] = self.translation_mm
        return [[float(v) for v in row] for row in m]


def axial_geometry(*, rows: int, cols: int, slices: int, pixel_spacing: float, slice_spacing: float,
                   feet_first: bool = False, center_xy: tuple[float, float] = (0.0, 0.0),
                   center_z: float = 0.0) -> Geometry:
    """Axial grid centred on ``center_xy``/``center_z``.

    Head first: rows toward posterior, columns toward patient left, slices toward the head.
    Feet first, as scanners that keep the gantry's view write it: columns toward patient right
    (ImageOrientationPatient -1\\0\\0\\0\\1\\0), so the slice normal points to the feet.
    """
    sx = -1.0 if feet_first else 1.0
    row_dir, col_dir = np.array([sx, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    normal = np.cross(row_dir, col_dir)
    origin = (np.array([center_xy[0], center_xy[1], center_z])
              - row_dir * pixel_spacing * (cols - 1) / 2
              - col_dir * pixel_spacing * (rows - 1) / 2
              - normal * slice_spacing * (slices - 1) / 2)
    return Geometry(
        shape=(slices, rows, cols),
        origin=tuple(round(float(v), 4) for v in origin),  # as ImagePositionPatient is written
        spacing=(float(pixel_spacing), float(pixel_spacing), float(slice_spacing)),
        direction=tuple(float(v) for v in np.column_stack([row_dir, col_dir, normal]).ravel()),
    )


def sub_slice_offsets(n_sub: int, slice_spacing: float) -> np.ndarray:
    """Positions along the normal, relative to a slice centre, of the samples averaged into it."""
    return ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * slice_spacing


PaintFn = Callable[[float, np.ndarray], None]
PainterFactory = Callable[[Canvas], PaintFn]


def render_codes(painter: PainterFactory, geom: Geometry, pose: Pose, n_sub: int = 1) -> np.ndarray:
    """Paint codes for every sub-slice sample of ``geom``: (slices * n_sub, rows, cols) uint8.

    ``painter(canvas)`` returns ``paint(z, into, clear)`` that fills one anatomical slice.
    """
    n, rows, cols = geom.shape
    dx, dy, dz = geom.spacing
    r, c, nrm = geom.row_direction, geom.column_direction, geom.normal
    if not (np.allclose(np.abs(r), [1, 0, 0]) and np.allclose(c, [0, 1, 0])):
        raise ValueError("render_codes paints axial grids only (rows along ±x, columns along +y)")
    offsets = (np.arange(n)[:, None] * dz + sub_slice_offsets(n_sub, dz)[None, :]).ravel()
    origin = np.asarray(geom.origin)
    out = np.zeros((n * n_sub, rows, cols), np.uint8)
    if not pose.rotated:
        t = np.asarray(pose.translation_mm)
        xs = origin[0] + np.arange(cols) * dx * r[0] - t[0]
        ys = origin[1] + np.arange(rows) * dy - t[1]
        zs = origin[2] + offsets * nrm[2] - t[2]
        paint = painter(Canvas(xs, ys))
        for q, z in enumerate(zs):
            paint(z, out[q], False)
        return out
    # Rotated: paint the anatomical bounding box of the grid, then take the nearest sample.
    corners = np.array([origin + i * dx * r + j * dy * c + s * nrm
                        for i in (0, cols - 1) for j in (0, rows - 1) for s in (offsets[0], offsets[-1])])
    a = pose.to_anatomy(corners)
    step = np.array([dx, dy, dz / n_sub])
    lo = a.min(axis=0) - step
    size = np.ceil((a.max(axis=0) + step - lo) / step).astype(int) + 1
    axes = [lo[d] + np.arange(size[d]) * step[d] for d in range(3)]
    anat = np.zeros((size[2], size[1], size[0]), np.uint8)
    paint = painter(Canvas(axes[0], axes[1]))
    for q, z in enumerate(axes[2]):
        paint(z, anat[q], False)
    flat = anat.ravel()
    rt = pose.r.T
    f_i, f_j = rt @ (dx * r) / step, rt @ (dy * c) / step
    ii, jj = np.arange(cols), np.arange(rows)
    for q, s in enumerate(offsets):
        f0 = (pose.to_anatomy(origin + s * nrm) - lo) / step
        idx = []
        for d in range(3):
            v = (f0[d] + f_i[d] * ii)[None, :] + (f_j[d] * jj)[:, None]
            idx.append(np.clip(np.rint(v).astype(np.intp), 0, size[d] - 1))
        out[q] = flat[(idx[2] * size[1] + idx[1]) * size[0] + idx[0]]
    return out
