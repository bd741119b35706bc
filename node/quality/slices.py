"""Plausibility checks any handler that returns a ``LabelMap`` can run on one structure's mask.

A mask is (slices, rows, columns) in the order ``load_series`` gives (sorted along the slice
normal), so neighbouring indices are neighbouring slices. Each check returns a list of
``QualityFlag`` (empty when it passes) whose reason names what was found, where, and the
threshold it broke; the node then refuses the job or delivers with the warning (docs/rules.md).

Thresholds:

- ``slice_gap``: an organ is one piece along the body axis, so it is present on every slice
  between its first and its last; any slice without it in between fails (threshold: none).
- ``slice_area_jump``: between two neighbouring slices that both show the structure, its area
  may not change by more than ``MAX_AREA_RATIO`` times while the larger of the two is at least
  ``JUMP_MIN_FRACTION`` of the structure's largest slice (small cross-sections, an apex or a
  dome's last slices, change fast, and are allowed to) and the smaller at least
  ``JUMP_END_FRACTION`` of it (a partial-volume sliver beside a flat end is an end, not a jump).
- ``outline_holes``: a body outline (External) encloses everything inside it; a hole of at least
  ``MAX_HOLE_ML`` (an enclosed region it leaves out, in one slice) fails.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.results import QualityFlag

MAX_AREA_RATIO = 3.0
JUMP_MIN_FRACTION = 0.4
JUMP_END_FRACTION = 0.05
MAX_HOLE_ML = 5.0  # an axilla's air between a touching arm and the chest is smaller


def _ranges(ks: np.ndarray) -> str:
    """'3-7, 12' for [3, 4, 5, 6, 7, 12] (slice indices, counted from 0 in geometric order)."""
    parts, start = [], None
    for n, k in enumerate(ks):
        if start is None:
            start = k
        if n + 1 == len(ks) or ks[n + 1] != k + 1:
            parts.append(f"{start}" if start == k else f"{start}-{k}")
            start = None
    return ", ".join(parts)


def slice_gap(mask: np.ndarray, structure: str) -> list[QualityFlag]:
    present = mask.any(axis=(1, 2))
    ks = np.nonzero(present)[0]
    if ks.size == 0:
        return []
    missing = np.nonzero(~present[ks[0]:ks[-1] + 1])[0] + ks[0]
    if missing.size == 0:
        return []
    return [QualityFlag("slice_gap", f"{structure} is absent on {missing.size} slice(s) ({_ranges(missing)}) "
                        f"between slices where it is present ({ks[0]}-{ks[-1]}); an organ is continuous "
                        "along the body (threshold: no slice missing)", structure=structure)]


def slice_area_jump(mask: np.ndarray, structure: str, pixel_area_mm2: float) -> list[QualityFlag]:
    area = mask.sum(axis=(1, 2)).astype(float)
    if not area.any():
        return []
    big = area.max()
    jumps = []
    for k in range(len(area) - 1):
        a, b = area[k], area[k + 1]
        small, large = min(a, b), max(a, b)
        if small >= JUMP_END_FRACTION * big and large >= JUMP_MIN_FRACTION * big and large / small > MAX_AREA_RATIO:
            jumps.append((k, a, b))
    if not jumps:
        return []
    k, a, b = max(jumps, key=lambda j: max(j[1], j[2]) / min(j[1], j[2]))
    cm2 = pixel_area_mm2 / 100.0
    return [QualityFlag("slice_area_jump", f"{structure}'s area changes from {a * cm2:.1f} to {b * cm2:.1f} cm2 "
                        f"between slices {k} and {k + 1} ({len(jumps)} such step(s)); neighbouring slices may "
                        f"differ at most {MAX_AREA_RATIO:g}x where the area is over {JUMP_MIN_FRACTION:.0%} "
                        "of its largest", structure=structure)]


def _enclosed_pixels(plane: np.ndarray) -> int:
    """How many pixels ``plane`` encloses and leaves out: background not 4-connected to the
    image's edge (what binary_fill_holes would add). One labelling pass of the outline's bounding
    box with a ring of background around it, where everything outside is one piece: a third of
    binary_fill_holes' time, whose repeated dilations were a sixth of the ct-anatomy handler."""
    rows, cols = np.nonzero(plane.any(axis=1))[0], np.nonzero(plane.any(axis=0))[0]
    box = plane[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    background, _ = ndimage.label(np.pad(~box, 1, constant_values=True), structure=_FOUR)
    return int(np.count_nonzero(background) - np.count_nonzero(background == background[0, 0]))


_FOUR = ndimage.generate_binary_structure(2, 1)  # background 4-connected: a diagonal gap keeps a hole closed


def outline_holes(outline: np.ndarray, structure: str, voxel_ml: float) -> list[QualityFlag]:
    """Regions an outline (e.g. External) encloses in a slice but leaves out."""
    holed = []
    for k in np.nonzero(outline.any(axis=(1, 2)))[0]:
        size = _enclosed_pixels(outline[k]) * voxel_ml
        if size >= MAX_HOLE_ML:
            holed.append((k, size))
    if not holed:
        return []
    ks = np.array([k for k, _ in holed])
    return [QualityFlag("outline_holes", f"{structure} leaves out regions it encloses on {len(holed)} slice(s) "
                        f"({_ranges(ks)}; largest {max(v for _, v in holed):.1f} ml); an outline encloses "
                        f"everything inside it (threshold: {MAX_HOLE_ML:g} ml per slice)", structure=structure)]


def continuity(mask: np.ndarray, structure: str, pixel_area_mm2: float) -> list[QualityFlag]:
    """``slice_gap`` and ``slice_area_jump`` together: what any per-slice organ mask should pass."""
    return slice_gap(mask, structure) + slice_area_jump(mask, structure, pixel_area_mm2)
