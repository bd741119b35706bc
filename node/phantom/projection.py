"""Projection (radiograph-like) images of the chest phantom: a CT localizer, a CR.

The anatomy is painted on a coarse grid, turned into attenuation relative to water
(1 + HU/1000) and integrated front to back: the value is the water-equivalent path length (mm),
which is what a log-converted detector reading is proportional to.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.phantom.chest import CT_LABELS, ChestAnatomy, ChestPainter, CodeBook
from node.phantom.ct_pixels import lay_table
from node.phantom.grid import Pose, axial_geometry, render_codes


def water_path(anatomy: ChestAnatomy, codebook: CodeBook, pose: Pose, x_range: tuple[float, float],
               z_range: tuple[float, float], step: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Water-equivalent path length along y (posterior-anterior), with the table.

    Returns (image (nz, nx) with row 0 at the head, xs increasing, zs decreasing).
    """
    nx = int(np.ceil((x_range[1] - x_range[0]) / step)) + 1
    nz = int(np.ceil((z_range[1] - z_range[0]) / step)) + 1
    y_lo, y_hi = -170.0, 190.0
    ny = int((y_hi - y_lo) / step) + 1
    geom = axial_geometry(rows=ny, cols=nx, slices=nz, pixel_spacing=step, slice_spacing=step,
                          center_xy=((x_range[0] + x_range[1]) / 2, (y_lo + y_hi) / 2),
                          center_z=(z_range[0] + z_range[1]) / 2)
    painter = lambda cv: ChestPainter(anatomy, cv).paint  # noqa: E731
    codes = render_codes(painter, geom, pose)
    patient = np.zeros(256, bool)
    patient[: len(codebook.label)] = [CT_LABELS[v].patient for v in codebook.label]
    lay_table(codes, geom, patient, fallback_y=pose.to_patient([0, 113.0, 0])[1])
    _, hu_lut, _ = codebook.luts()
    mu = np.clip(1.0 + hu_lut / 1000.0, 0.0, None).astype(np.float32)
    path = np.take(mu, codes).sum(axis=1) * step  # (nz, nx)
    xs = geom.origin[0] + np.arange(nx) * step
    zs = geom.origin[2] + np.arange(nz) * step
    return path[::-1], xs, zs[::-1]


def resample(image: np.ndarray, xs: np.ndarray, zs: np.ndarray, out_xs: np.ndarray, out_zs: np.ndarray) -> np.ndarray:
    """Bilinear resampling of a (z, x) image onto new sample positions."""
    fz = (out_zs - zs[0]) / (zs[1] - zs[0])
    fx = (out_xs - xs[0]) / (xs[1] - xs[0])
    grid = np.meshgrid(fz, fx, indexing="ij")
    return ndimage.map_coordinates(image, grid, order=1, mode="nearest").astype(np.float32)
