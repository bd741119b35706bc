"""Curved planar reformation (stretched CPR) along a centreline given in patient coordinates.

Rows follow the centreline at equal arc-length steps (row 0 at the first point); columns run
across it along a lateral direction, from -width/2 on the left to +width/2 on the right. The
lateral direction starts as ``lateral_hint`` made perpendicular to the first tangent and is
carried along the curve by parallel transport, so it does not flip or twist where the
centreline bends; ``angle_deg`` turns it about the centreline, for rotating CPR.
Sampling goes straight from the original voxel grid through its Geometry (linear).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.render.orientation import direction_label
from node.volume import Volume

__all__ = ["CprImage", "curved_planar_reformat", "resample_polyline"]


@dataclass(frozen=True, eq=False)
class CprImage:
    """``image`` (rows, cols) float32 in volume units; ``pixel_spacing_mm`` (along, across);
    ``centerline_mm`` and ``lateral`` the LPS point and unit lateral vector of each row."""

    image: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    centerline_mm: np.ndarray
    lateral: np.ndarray

    @property
    def labels(self) -> dict[str, str]:
        """Approximate edge labels: overall course for top/bottom, mean lateral for left/right."""
        course = self.centerline_mm[-1] - self.centerline_mm[0]
        side = self.lateral.mean(axis=0)
        out = {}
        if np.linalg.norm(course) > 0:
            out.update(top=direction_label(-course), bottom=direction_label(course))
        if np.linalg.norm(side) > 0:
            out.update(left=direction_label(-side), right=direction_label(side))
        return out


def resample_polyline(points: np.ndarray, step_mm: float) -> np.ndarray:
    """Points every ``step_mm`` of arc length along a polyline (first and last point kept)."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(round(arc[-1] / step_mm)) + 1)
    s = np.linspace(0.0, arc[-1], n)
    return np.stack([np.interp(s, arc, points[:, a]) for a in range(3)], axis=1)


def _tangents(path: np.ndarray) -> np.ndarray:
    t = np.gradient(path, axis=0)
    n = np.linalg.norm(t, axis=1, keepdims=True)
    if np.any(n < 1e-9):
        raise ValueError("points turn back on themselves: the centreline has no direction there")
    return t / n


def _transported_frame(tangents: np.ndarray, hint: np.ndarray) -> np.ndarray:
    """Lateral unit vectors, perpendicular to each tangent: each row's vector is the previous
    one with its component along the new tangent removed (parallel transport to first order,
    exact enough at sub-millimetre steps, and free of twist)."""
    u = hint - (hint @ tangents[0]) * tangents[0]
    if np.linalg.norm(u) < 1e-6:
        raise ValueError("lateral_hint is parallel to the centreline's start; choose another direction")
    lat = np.empty_like(tangents)
    lat[0] = u / np.linalg.norm(u)
    for i in range(1, len(tangents)):
        u = lat[i - 1] - (lat[i - 1] @ tangents[i]) * tangents[i]
        if np.linalg.norm(u) < 1e-6:  # a right-angle turn within one step: keep the binormal side
            u = np.cross(np.cross(tangents[i - 1], lat[i - 1]), tangents[i])
        lat[i] = u / np.linalg.norm(u)
    return lat


def curved_planar_reformat(volume: Volume, points, width_mm: float = 60.0, spacing_mm: float | None = None,
                           lateral_hint=(1.0, 0.0, 0.0), angle_deg: float = 0.0) -> CprImage:
    """Stretched CPR of ``volume`` along ``points`` ((n, 3) LPS mm, n >= 2), see module doc."""
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) < 2 or not np.all(np.isfinite(pts)):
        raise ValueError("points must be an (n, 3) array of finite LPS coordinates with n >= 2")
    keep = np.concatenate([[True], np.linalg.norm(np.diff(pts, axis=0), axis=1) > 1e-9])
    pts = pts[keep]
    if len(pts) < 2:
        raise ValueError("points must contain at least two distinct positions")
    g = volume.geometry
    step = float(spacing_mm) if spacing_mm is not None else float(min(g.spacing))
    if not step > 0 or not width_mm > 0:
        raise ValueError(f"spacing_mm and width_mm must be positive, got {spacing_mm}, {width_mm}")
    path = resample_polyline(pts, step)
    tangents = _tangents(path)
    lateral = _transported_frame(tangents, np.asarray(lateral_hint, dtype=float))
    if angle_deg:
        a = np.radians(angle_deg)
        binormal = np.cross(tangents, lateral)
        lateral = np.cos(a) * lateral + np.sin(a) * binormal
    half = int(round(width_mm / 2 / step))
    offsets = np.arange(-half, half + 1) * step
    samples = path[:, None, :] + offsets[None, :, None] * lateral[:, None, :]
    kji = g.patient_to_index(samples)
    image = ndimage.map_coordinates(
        volume.array, np.moveaxis(kji, -1, 0), output=np.float32, order=1, mode="constant",
        cval=float(volume.array.min()),
    )
    return CprImage(image, (step, step), path, lateral)
