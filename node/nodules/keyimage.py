"""Key images: an axial slab MIP around a nodule in the lung window, the nodule circled.

A slab (the nodule's thickness) shows a nodule apart from vessels crossing it better than one
slice; the crop is square around the nodule and scaled to a fixed size, so a 5 mm nodule is
visible; orientation letters and a caption are burned in (a Secondary Capture has no geometry).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.render.annotate import annotate
from node.render.orientation import edge_labels
from node.volume import Volume

__all__ = ["key_image", "SIZE"]

SIZE = 256  # output pixels per side
LUNG_WINDOW = (-600.0, 1500.0)  # centre, width
_YELLOW = np.array([255, 220, 0], np.uint8)


def key_image(volume: Volume, center_kji, diameter_mm: float, caption: str) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: the slab MIP around ``center_kji`` with a circle of the nodule's size."""
    sz, sy, sx = volume.geometry.spacing[::-1]
    k, j, i = (int(round(v)) for v in center_kji)
    n, rows, cols = volume.array.shape
    half_k = max(1, int(round(diameter_mm / 2 / sz)))
    slab = volume.array[max(0, k - half_k):min(n, k + half_k + 1)].max(axis=0)
    half_mm = max(30.0, 2.5 * diameter_mm)
    hj, hi = int(round(half_mm / sy)), int(round(half_mm / sx))
    crop = np.full((2 * hj + 1, 2 * hi + 1), -1000.0, np.float32)  # air beyond the image edge
    r0, c0 = j - hj, i - hi
    src = slab[max(0, r0):min(rows, j + hj + 1), max(0, c0):min(cols, i + hi + 1)]
    crop[max(0, -r0):max(0, -r0) + src.shape[0], max(0, -c0):max(0, -c0) + src.shape[1]] = src
    centre, width = LUNG_WINDOW
    gray = np.clip((crop - (centre - width / 2)) / width * 255.0, 0, 255)
    gray = ndimage.zoom(gray, (SIZE / crop.shape[0], SIZE / crop.shape[1]), order=1)[:SIZE, :SIZE]
    image = np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)
    mm_per_px = 2 * half_mm / SIZE
    radius = diameter_mm / 2 / mm_per_px + 4  # just outside the nodule
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    ring = np.abs(np.hypot(yy, xx) - radius) <= 1.0
    image[ring] = _YELLOW
    geom = volume.geometry
    return annotate(image, edge_labels(geom.row_direction, geom.column_direction), mm_per_px, caption)
