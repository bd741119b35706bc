"""Slab projections (MIP, MinIP, average) and MPR reformats, with NumPy on a patient-aligned grid.

Input is a volume from ``align_to_patient_axes`` (identity direction), so the display planes
of ``orientation.PLANES`` are array transposes/flips: no interpolation across slices. Stacks run
from head to feet (axial), front to back (coronal) and right to left (sagittal).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from node.render.aligned import is_patient_aligned
from node.render.orientation import PLANES, PlaneView, edge_labels
from node.volume import Volume

__all__ = ["PlaneStack", "plane_view_array", "slab_stack", "to_square_pixels", "STACK_DIRECTION"]

# Order of images in a stack, as a patient direction (see the module docstring).
STACK_DIRECTION = {"axial": (0.0, 0.0, -1.0), "coronal": (0.0, 1.0, 0.0), "sagittal": (1.0, 0.0, 0.0)}
_REDUCERS = {
    "max": lambda a: a.max(axis=0),
    "min": lambda a: a.min(axis=0),
    "mean": lambda a: a.sum(axis=0, dtype=np.float32) / a.shape[0],  # float32: half the work of np.mean
}


@dataclass(frozen=True, eq=False)
class PlaneStack:
    """Images of one display plane, in the volume's units (HU for CT).

    ``images`` is (n, rows, cols) float32; ``pixel_spacing_mm`` is (row, column);
    ``top_left_mm`` is the LPS position of pixel (0, 0) of image 0; ``positions_mm`` the LPS
    coordinate of each image's slab centre along the plane's normal axis.
    """

    plane: str
    images: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    top_left_mm: tuple[float, float, float]
    positions_mm: np.ndarray
    thickness_mm: float

    @property
    def view(self) -> PlaneView:
        return PLANES[self.plane]

    @property
    def labels(self) -> dict[str, str]:
        return edge_labels(self.view.right, self.view.down)


def _axis_and_sign(vec) -> tuple[int, int]:
    v = np.asarray(vec, float)
    a = int(np.argmax(np.abs(v)))
    return a, (1 if v[a] > 0 else -1)


def plane_view_array(aligned: Volume, plane: str) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """(stack, rows, cols) view of an aligned volume, its (stack, row, col) spacing, and the
    LPS position of element (0, 0, 0)."""
    if plane not in PLANES:
        raise ValueError(f"unknown plane {plane!r}; planes: {', '.join(PLANES)}")
    g = aligned.geometry
    if not is_patient_aligned(g):
        raise ValueError("plane_view_array needs a patient-aligned volume (see align_to_patient_axes)")
    view = PLANES[plane]
    order, flips, spacing = [], [], []
    first = np.asarray(g.origin, float).copy()
    for out, vec in enumerate((STACK_DIRECTION[plane], view.down, view.right)):
        a, s = _axis_and_sign(vec)
        order.append(2 - a)  # patient axis a is array axis 2 - a ([z, y, x])
        spacing.append(g.spacing[a])
        if s < 0:
            flips.append(out)
            first[a] += (g.shape[2 - a] - 1) * g.spacing[a]
    arr = np.transpose(aligned.array, order)
    if flips:
        arr = np.flip(arr, axis=tuple(flips))
    return arr, (spacing[0], spacing[1], spacing[2]), first


def slab_stack(aligned: Volume, plane: str, mode: str, thickness_mm: float,
               spacing_mm: float | None = None) -> PlaneStack:
    """Slabs of ``thickness_mm`` every ``spacing_mm`` (default: contiguous) reduced by ``mode``
    ("max" = MIP, "min" = MinIP, "mean" = average, used for MPR). Slabs cover the whole volume:
    a remainder at the end gets one more slab aligned to the last slice."""
    if mode not in _REDUCERS:
        raise ValueError(f"unknown projection mode {mode!r}; modes: {', '.join(_REDUCERS)}")
    spacing_mm = thickness_mm if spacing_mm is None else spacing_mm
    for name, v in (("thickness_mm", thickness_mm), ("spacing_mm", spacing_mm)):
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive number of millimetres, got {v}")
    arr, (ds, dr, dc), first = plane_view_array(aligned, plane)
    n = arr.shape[0]
    width = min(n, max(1, int(round(thickness_mm / ds))))
    step = max(1, int(round(spacing_mm / ds)))
    starts = list(range(0, n - width + 1, step))
    if starts[-1] + width < n:
        starts.append(n - width)
    reduce = _REDUCERS[mode]
    images = np.empty((len(starts), arr.shape[1], arr.shape[2]), dtype=np.float32)
    for out, s in enumerate(starts):
        images[out] = reduce(arr[s:s + width])
    a, sign = _axis_and_sign(STACK_DIRECTION[plane])
    centres = np.asarray(starts, float) + (width - 1) / 2
    positions = first[a] + sign * centres * ds
    top_left = first.copy()
    top_left[a] = positions[0]
    return PlaneStack(plane, images, (dr, dc), tuple(float(v) for v in top_left), positions, width * ds)


def _resample_axis(images: np.ndarray, axis: int, step: float, n: int) -> np.ndarray:
    """Linear resampling along one axis: output sample i at input index i * step."""
    pos = np.arange(n) * step
    i0 = np.minimum(np.floor(pos).astype(int), images.shape[axis] - 1)
    i1 = np.minimum(i0 + 1, images.shape[axis] - 1)
    shape = [1] * images.ndim
    shape[axis] = n
    w = (pos - i0).astype(np.float32).reshape(shape)
    out = np.take(images, i0, axis=axis)
    delta = np.take(images, i1, axis=axis)
    delta -= out  # in place: these stacks reach hundreds of megabytes
    delta *= w
    out += delta
    return out


def to_square_pixels(stack: PlaneStack, max_side: int = 1024) -> PlaneStack:
    """Resample (linear, separably) to square pixels: the finer of the two spacings, or coarser
    when needed to keep the longer side within ``max_side`` pixels. Pixel (0, 0) stays put."""
    n, rows, cols = stack.images.shape
    dr, dc = stack.pixel_spacing_mm
    ext_r, ext_c = (rows - 1) * dr, (cols - 1) * dc
    target = min(dr, dc)
    if max(ext_r, ext_c) / target + 1 > max_side:  # coarser, rounded up so a DICOM DS holds it exactly
        target = float(np.ceil(max(ext_r, ext_c) / max(1, max_side - 1) * 1e4) / 1e4)
    new_rows = int(np.floor(ext_r / target + 1e-6)) + 1
    new_cols = int(np.floor(ext_c / target + 1e-6)) + 1
    images = stack.images
    if (new_rows, dr) != (rows, target):
        images = _resample_axis(images, 1, target / dr, new_rows)
    if (new_cols, dc) != (cols, target):
        images = _resample_axis(images, 2, target / dc, new_cols)
    if images is stack.images:
        return stack
    return PlaneStack(stack.plane, images, (target, target), stack.top_left_mm, stack.positions_mm,
                      stack.thickness_mm)
