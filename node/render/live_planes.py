"""The viewer's linked MPR panes: the axial, coronal and sagittal slice through a crosshair point.

Each pane shows the slice of a patient-aligned volume (``align_to_patient_axes``) that contains
the crosshair, in the display convention of ``orientation.PLANES``, scaled to fit the pane with
square millimetres and centred. With the grey image goes the pane's mapping to patient space:
the LPS position of the pane's top-left corner and the LPS step of one pane pixel right and
down, so the browser turns a click into a patient point (the new crosshair) with no knowledge of
the volume, and the crosshair's pixel position to draw its lines.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from node.render.orientation import PLANES, edge_labels
from node.render.projections import STACK_DIRECTION, plane_view_array
from node.render.windows import Window, apply_window
from node.volume import Volume

__all__ = ["PlaneFrame", "plane_frame"]


@dataclass(frozen=True, eq=False)
class PlaneFrame:
    """``image``: (rows, cols) uint8. ``origin_mm``: LPS of the pane's top-left corner;
    ``right_mm``/``down_mm``: LPS step of one pane pixel; ``slice_step_mm``: LPS step to the next
    slice of the stack; ``crosshair_px``: (x, y) of the crosshair in pane pixels."""

    plane: str
    image: np.ndarray
    origin_mm: tuple[float, float, float]
    right_mm: tuple[float, float, float]
    down_mm: tuple[float, float, float]
    slice_step_mm: tuple[float, float, float]
    crosshair_px: tuple[float, float]
    slice_index: int
    slices: int

    def meta(self) -> dict:
        return {"plane": self.plane, "origin_mm": list(self.origin_mm), "right_mm": list(self.right_mm),
                "down_mm": list(self.down_mm), "slice_step_mm": list(self.slice_step_mm),
                "crosshair_px": list(self.crosshair_px), "slice": self.slice_index, "slices": self.slices,
                "labels": edge_labels(PLANES[self.plane].right, PLANES[self.plane].down)}


def plane_frame(aligned: Volume, plane: str, crosshair_mm, window: Window, size: tuple[int, int]) -> PlaneFrame:
    """The ``plane`` pane of ``size`` (rows, cols) through ``crosshair_mm`` (LPS)."""
    c = np.asarray(crosshair_mm, float)
    if c.shape != (3,) or not np.all(np.isfinite(c)):
        raise ValueError(f"crosshair must be three finite LPS coordinates, got {crosshair_mm!r}")
    arr, (ds, dr, dc), first = plane_view_array(aligned, plane)
    view = PLANES[plane]
    stack_dir, right, down = (np.asarray(v, float) for v in (STACK_DIRECTION[plane], view.right, view.down))
    n = arr.shape[0]
    k = int(np.clip(np.floor((c - first) @ stack_dir / ds + 0.5), 0, n - 1))  # not rint: x.5 must not go to even
    grey = apply_window(arr[k], window)

    rows_p, cols_p = int(size[0]), int(size[1])
    height_mm, width_mm = grey.shape[0] * dr, grey.shape[1] * dc
    scale = min(rows_p / height_mm, cols_p / width_mm)  # pane pixels per mm
    out_w, out_h = max(1, round(width_mm * scale)), max(1, round(height_mm * scale))
    off_x, off_y = (cols_p - out_w) // 2, (rows_p - out_h) // 2
    pane = np.zeros((rows_p, cols_p), np.uint8)
    pane[off_y:off_y + out_h, off_x:off_x + out_w] = np.asarray(
        Image.fromarray(grey).resize((out_w, out_h), Image.Resampling.BILINEAR))

    mm_x, mm_y = width_mm / out_w, height_mm / out_h  # mm per pane pixel along each axis
    image_corner = first + k * ds * stack_dir - 0.5 * dc * right - 0.5 * dr * down
    origin = image_corner - off_x * mm_x * right - off_y * mm_y * down
    rel = c - origin
    return PlaneFrame(plane, pane, _t(origin), _t(mm_x * right), _t(mm_y * down), _t(ds * stack_dir),
                      (float(rel @ right / mm_x), float(rel @ down / mm_y)), k, n)


def _t(v: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(x) for x in v)
