"""One axial slice of a label-code image, painted with analytic shapes.

Speed comes from separability: on an axis-aligned grid a (super)ellipse test is the sum of a
per-column and a per-row 1-D term, so each shape costs one add and one compare over its
bounding box only. Coordinates are millimetres on uniform grids; the x and y axes may run in
either direction (a feet-first image has x decreasing along a row).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Region:
    """A boolean mask over the bounding box ``codes[rows, cols]``."""

    rows: slice
    cols: slice
    mask: np.ndarray


def _span(start: float, step: float, n: int, lo: float, hi: float) -> slice:
    """Indices i of the uniform grid start + i*step (step may be negative) with lo <= value <= hi."""
    a, b = (lo - start) / step, (hi - start) / step
    if step < 0:
        a, b = b, a
    return slice(max(0, math.ceil(a - 1e-9)), min(n, math.floor(b + 1e-9) + 1))


class Canvas:
    """Label codes (uint8) of one slice at height ``z`` on the grid ``xs`` (columns) × ``ys`` (rows)."""

    def __init__(self, xs: np.ndarray, ys: np.ndarray) -> None:
        self.xs = np.asarray(xs, dtype=np.float64)
        self.ys = np.asarray(ys, dtype=np.float64)
        for name, v in (("xs", self.xs), ("ys", self.ys)):
            if v.ndim != 1 or len(v) < 1:
                raise ValueError(f"Canvas.{name} must be a non-empty 1-D array")
            step = v[1] - v[0] if len(v) > 1 else 1.0
            if step == 0 or not np.allclose(np.diff(v), step, rtol=0, atol=1e-6 * abs(step)):
                raise ValueError(f"Canvas.{name} must be a uniform grid")
        self._x = (float(self.xs[0]), float(self.xs[1] - self.xs[0]) if len(self.xs) > 1 else 1.0, len(self.xs))
        self._y = (float(self.ys[0]), float(self.ys[1] - self.ys[0]) if len(self.ys) > 1 else 1.0, len(self.ys))
        self.codes = np.zeros((len(self.ys), len(self.xs)), dtype=np.uint8)
        self.z = 0.0

    def start(self, z: float, into: np.ndarray | None = None, clear: bool = True) -> np.ndarray:
        """Begin the slice at height ``z`` in ``into`` (new if None; zeroed unless ``clear`` is False)."""
        self.z = float(z)
        if into is None:
            into = np.zeros((len(self.ys), len(self.xs)), dtype=np.uint8)
        elif clear:
            into.fill(0)
        self.codes = into
        return into

    def box(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
        cols = _span(*self._x, x0, x1)
        rows = _span(*self._y, y0, y1)
        if cols.stop <= cols.start or rows.stop <= rows.start:
            return None
        return rows, cols

    # -- shapes ---------------------------------------------------------------------------------

    def ellipse(self, cx: float, cy: float, a: float, b: float, power: float = 2.0) -> Region | None:
        """Inside of the superellipse (|x-cx|/a)^p + (|y-cy|/b)^p <= 1 on this slice."""
        if a <= 0 or b <= 0:
            return None
        bb = self.box(cx - a, cx + a, cy - b, cy + b)
        if bb is None:
            return None
        rows, cols = bb
        tx = np.abs(self.xs[cols] - cx) / a
        ty = np.abs(self.ys[rows] - cy) / b
        if power == 2.0:
            tx, ty = tx * tx, ty * ty
        else:
            tx, ty = tx**power, ty**power
        return Region(rows, cols, ty[:, None] + tx[None, :] <= 1.0)

    def ellipsoid(self, center: tuple[float, float, float], semi: tuple[float, float, float]) -> Region | None:
        """Cross-section of an axis-aligned ellipsoid with this slice."""
        dz = (self.z - center[2]) / semi[2]
        if abs(dz) >= 1.0:
            return None
        s = float(np.sqrt(1.0 - dz * dz))
        return self.ellipse(center[0], center[1], semi[0] * s, semi[1] * s)

    def sphere(self, center: tuple[float, float, float], radius: float) -> Region | None:
        return self.ellipsoid(center, (radius, radius, radius))

    def capsule_d2(self, a: np.ndarray, b: np.ndarray, radius: float) -> tuple[slice, slice, np.ndarray] | None:
        """Squared distance to the segment a→b over the box where it is within ``radius`` of this slice."""
        z = self.z
        az, bz = float(a[2]), float(b[2])
        if z < min(az, bz) - radius or z > max(az, bz) + radius:
            return None
        a = np.asarray(a, dtype=np.float64)
        u = np.asarray(b, dtype=np.float64) - a
        if abs(u[2]) < 1e-9:
            lo, hi = 0.0, 1.0
        else:
            t0, t1 = sorted(((z - radius - az) / u[2], (z + radius - az) / u[2]))
            lo, hi = max(0.0, t0), min(1.0, t1)
        p0, p1 = a + lo * u, a + hi * u
        bb = self.box(min(p0[0], p1[0]) - radius, max(p0[0], p1[0]) + radius,
                      min(p0[1], p1[1]) - radius, max(p0[1], p1[1]) + radius)
        if bb is None:
            return None
        rows, cols = bb
        dx = self.xs[cols] - a[0]
        dy = self.ys[rows] - a[1]
        dz = z - a[2]
        uu = float(u @ u)
        if uu > 0:
            t = (dy * (u[1] / uu))[:, None] + (dx * (u[0] / uu) + dz * u[2] / uu)[None, :]
            np.clip(t, 0.0, 1.0, out=t)
        else:
            t = np.zeros((len(dy), len(dx)))
        d2 = (dx[None, :] - t * u[0]) ** 2
        d2 += (dy[:, None] - t * u[1]) ** 2
        d2 += (dz - t * u[2]) ** 2
        return rows, cols, d2

    def capsule(self, a, b, radius: float) -> Region | None:
        hit = self.capsule_d2(a, b, radius)
        if hit is None:
            return None
        rows, cols, d2 = hit
        return Region(rows, cols, d2 <= radius * radius)

    # -- painting -------------------------------------------------------------------------------

    def paint(self, code: int, region: Region | None, over: np.ndarray | None = None) -> None:
        """Set ``code`` inside ``region``; with ``over`` (a bool per code), only where it is True."""
        if region is None:
            return
        sub = self.codes[region.rows, region.cols]
        mask = region.mask
        if over is not None:
            mask = mask & over[sub]
        np.copyto(sub, np.uint8(code), where=mask)

    def paint_shell(self, outer_code: int, inner_code: int, hit: tuple[slice, slice, np.ndarray] | None,
                    r_outer: float, r_inner: float) -> None:
        """Bone-like tube from one distance map: cortical shell to ``r_outer``, cancellous core to ``r_inner``."""
        if hit is None:
            return
        rows, cols, d2 = hit
        sub = self.codes[rows, cols]
        np.copyto(sub, np.uint8(outer_code), where=d2 <= r_outer * r_outer)
        np.copyto(sub, np.uint8(inner_code), where=d2 <= r_inner * r_inner)
