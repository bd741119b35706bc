"""Plausibility of a ct-anatomy result: checks run before anything is delivered.

A classical pipeline is a chain of heuristics (body, airway, gas pockets, junction, dense lung,
lung base); when one of them misfires on anatomy it was not tuned to, the result can be wrong
while looking like any other. These checks look at the result as anatomy, not at how it was
made, and each failure becomes a ``QualityFlag`` naming what was found and the threshold broken.

Generic, per structure (``node.quality.slices``): each lung and the External continuous along the
body (``slice_gap``), no lung area jump beyond what neighbouring slices allow (``slice_area_jump``),
no hole in the External (``outline_holes``). Chest-specific (thresholds below):

- ``lung_unlabelled``: lung-density tissue (a region of at least ``UNLABELLED_REGION_ML`` whose
  median is above ``GAS_MEDIAN_HU``, i.e. parenchyma, not bowel gas or air) inside the body and
  in no structure, more than ``MAX_UNLABELLED_FRACTION`` of the lungs' volume (and more than
  ``MIN_UNLABELLED_ML``): a lung, or part of one, that some heuristic dropped.
- ``lung_missing``: one lung empty while the other holds at least ``MIN_LUNG_ML``.
- ``lung_ratio``: left/right volume ratio outside ``LUNG_RATIO_RANGE`` (the left lung is about
  0.8-0.9 of the right; the range leaves room for disease, partial coverage and habitus).
- ``lung_fraction``: the lungs less than ``MIN_LUNG_FRACTION`` of the body's volume on the slices
  that show them (a chest's lungs fill far more of it, even in an obese patient).
- ``bone_absent``: a chest CT (lungs >= ``MIN_LUNG_ML``) with less than ``MIN_BONE_ML`` of bone.
- ``airway_disconnected``: an airway that runs alongside the lungs for at least
  ``AIRWAY_OVERLAP_MM`` yet touches neither (the trachea and main bronchi end in them).
- ``airway_too_large``: airway volume over ``MAX_AIRWAY_FRACTION`` of the lungs' (it is 1-3 %),
  or a cross-section of it in one slice wider than ``MAX_AIRWAY_SECTION_MM2`` (an adult trachea's
  largest): the airway grew into a lung.
- ``lung_truncated`` (kind ``coverage``: never refuses, always delivered with the warning in every
  object): a lung cut by the scan's coverage or field of view, so its volume is that of the part
  scanned, not the lung's: its area on the first or last slice is at least
  ``TRUNCATED_END_FRACTION`` of its largest axial section, or where it meets the in-plane edge of
  the reconstructed field (image edge or reconstruction circle) the cut surface is at least
  ``TRUNCATED_SIDE_FRACTION`` of that section.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.anatomy.grid import PADDING_HU
from node.quality.slices import continuity, outline_holes, slice_gap
from node.results import QualityFlag
from node.volume import Geometry

CHECK_MM = 2.0  # in-plane sampling of the checks
LUNG_HU_BELOW = -400.0  # aerated lung is darker than this
PARENCHYMA_MEDIAN_HU = (-975.0, -600.0)  # a region's median in here is parenchyma: darker is air or gas,
# brighter the partial volume of tissue edges (thin fat against air)
UNLABELLED_REGION_ML = 2.0
MIN_UNLABELLED_ML = 20.0
MAX_UNLABELLED_FRACTION = 0.05
MIN_LUNG_ML = 100.0
LUNG_RATIO_RANGE = (0.4, 1.6)
MIN_LUNG_FRACTION = 0.05
MIN_BONE_ML = 20.0
AIRWAY_OVERLAP_MM = 40.0
MAX_AIRWAY_FRACTION = 0.04
MAX_AIRWAY_SECTION_MM2 = 1000.0
# A lung ends in a dome (apex) and a thin costophrenic recess: a scan that starts right at the apex
# shows a little of it on its first slice and misses next to nothing. A quarter of the lung's
# largest section on an end slice is cut about 0.13 of a dome's radius deep (missing ~1 % of an
# adult lung); a real truncation is far above (phantom, 3 mm slices: a 300 mm chest 0.03-0.07 at the
# apex and 0 at the bases; 60 mm slabs 0.73-1.0; a 160 mm slab 0.17-0.97).
TRUNCATED_END_FRACTION = 0.25
# The lungs lie inside the chest wall: they never touch the in-plane edge of a field that holds the
# chest. Cut surface there (edge length x slice spacing) against the largest section: a 200 mm field
# 2.0, a 260 mm padded reconstruction circle 0.53-0.55, every field holding the chest 0.
TRUNCATED_SIDE_FRACTION = 0.1


def check_anatomy(labels: np.ndarray, hu: np.ndarray, geometry: Geometry, names: dict[int, str],
                  external_label: int, lungs: tuple[int, int], airway: int | None,
                  bone: int | None) -> list[QualityFlag]:
    """Every check above on a ct-anatomy label volume (``names``: label → structure name);
    ``airway``/``bone``: their labels when they were asked for, else None.

    The checks are about millilitres and whole slices, so they run on every ``step``-th row and
    column (about ``CHECK_MM`` apart): a 512x512 CT costs a tenth of its full grid.
    """
    step = max(1, int(CHECK_MM // max(geometry.spacing[0], geometry.spacing[1])))
    labels, hu = labels[:, ::step, ::step], hu[:, ::step, ::step]
    sx, sy, sz = geometry.spacing[0] * step, geometry.spacing[1] * step, geometry.spacing[2]
    voxel_ml = sx * sy * sz / 1000.0
    left, right = lungs
    flags: list[QualityFlag] = []
    body = labels > 0
    flags += slice_gap(body, "External") + outline_holes(body, "External", voxel_ml)
    for lab in lungs:
        flags += continuity(labels == lab, names[lab], sx * sy)
    ml = {lab: float((labels == lab).sum()) * voxel_ml for lab in (left, right)}
    lungs_ml = ml[left] + ml[right]
    flags += _unlabelled(labels, hu, external_label, voxel_ml, lungs_ml)
    flags += _truncated(labels, hu, lungs, names, (sx, sy, sz), ml)
    for lab, other in ((left, right), (right, left)):
        if ml[lab] == 0 and ml[other] >= MIN_LUNG_ML:
            flags.append(QualityFlag("lung_missing", f"{names[lab]} is empty while {names[other]} holds "
                                     f"{ml[other]:.0f} ml (threshold: {MIN_LUNG_ML:g} ml)", structure=names[lab]))
    if ml[left] > 0 and ml[right] > 0 and lungs_ml >= MIN_LUNG_ML:
        ratio = ml[left] / ml[right]
        lo, hi = LUNG_RATIO_RANGE
        if not lo <= ratio <= hi:
            flags.append(QualityFlag("lung_ratio", f"left/right lung volume ratio {ratio:.2f} "
                                     f"({ml[left]:.0f} / {ml[right]:.0f} ml) is outside {lo:g}-{hi:g}",
                                     structure="Lungs"))
    if lungs_ml >= MIN_LUNG_ML:
        ks = np.nonzero(_either(labels, lungs).any(axis=(1, 2)))[0]
        body_ml = float(body[ks[0]:ks[-1] + 1].sum()) * voxel_ml
        if lungs_ml < MIN_LUNG_FRACTION * body_ml:
            flags.append(QualityFlag("lung_fraction", f"the lungs ({lungs_ml:.0f} ml) are "
                                     f"{lungs_ml / body_ml:.1%} of the body on the slices that show them "
                                     f"(threshold: {MIN_LUNG_FRACTION:.0%})", structure="Lungs"))
        if bone is not None:
            bone_ml = float((labels == bone).sum()) * voxel_ml
            if bone_ml < MIN_BONE_ML:
                flags.append(QualityFlag("bone_absent", f"{bone_ml:.1f} ml of bone in a chest CT with "
                                         f"{lungs_ml:.0f} ml of lung (threshold: {MIN_BONE_ML:g} ml)",
                                         structure=names[bone]))
    if airway is not None and lungs_ml >= MIN_LUNG_ML:
        flags += _airway(labels, airway, lungs, (sx, sy, sz), voxel_ml, lungs_ml, names[airway])
    return flags


def _truncated(labels: np.ndarray, hu: np.ndarray, lungs: tuple[int, int], names: dict[int, str],
               spacing: tuple[float, float, float], ml: dict[int, float]) -> list[QualityFlag]:
    """``lung_truncated`` for each lung the scan cuts (see the module's notes)."""
    sx, sy, sz = spacing
    n = labels.shape[0]
    # The reconstructed field: not padding (on the first, middle and last slice, as node.anatomy.grid
    # finds the reconstruction circle); its edge ring is where data ends in-plane.
    field = ~np.logical_and.reduce([hu[k] < PADDING_HU for k in {0, n // 2, n - 1}])
    ring = field & ~ndimage.binary_erosion(field, border_value=0)
    flags = []
    for lab in lungs:
        if ml[lab] == 0:
            continue
        lung = labels == lab
        largest = float(lung.sum(axis=(1, 2)).max()) * sx * sy  # mm2
        ends = [float(lung[k].sum()) * sx * sy / largest for k in (0, n - 1)]
        side = float(lung[:, ring].sum()) * (sx + sy) / 2 * sz / largest
        cut = []
        if max(ends) >= TRUNCATED_END_FRACTION:
            cut.append(f"{max(ends):.0%} of its largest axial section lies on the "
                       f"{'first' if ends[0] >= ends[1] else 'last'} slice (threshold: {TRUNCATED_END_FRACTION:.0%})")
        if side >= TRUNCATED_SIDE_FRACTION:
            cut.append(f"it meets the edge of the reconstructed field over {side:.2f} times its largest axial "
                       f"section (threshold: {TRUNCATED_SIDE_FRACTION:g})")
        if cut:
            flags.append(QualityFlag("lung_truncated", f"{names[lab]} is cut by the scan: {'; '.join(cut)}; its "
                                     f"volume ({ml[lab]:.0f} ml) is that of the part scanned, not of the whole lung",
                                     kind="coverage", structure=names[lab]))
    return flags


def _either(labels: np.ndarray, values: tuple[int, int]) -> np.ndarray:
    """``np.isin(labels, values)`` for two values, without isin's volume-sized index temporaries."""
    out = labels == values[0]
    out |= labels == values[1]
    return out


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """``ndimage.label`` in 16 bits when the regions fit, else in 32: its default int32 output at
    the checks' grid of a 512x512x300 CT is 79 MB, the largest thing the checks hold (a ct-anatomy
    job's peak memory is reached here)."""
    try:
        return ndimage.label(mask, output=np.uint16)
    except RuntimeError:  # more than 65 535 regions
        return ndimage.label(mask)


def _unlabelled(labels: np.ndarray, hu: np.ndarray, external_label: int, voxel_ml: float,
                lungs_ml: float) -> list[QualityFlag]:
    candidate = (labels == external_label) & (hu < LUNG_HU_BELOW)
    regions, n = _label(candidate)
    if n == 0:
        return []
    # Sizes and medians from the candidate voxels alone (every one of them is in a region): given
    # whole volumes, np.bincount takes the label volume as 8-byte integers and scipy's median
    # copies and sorts every voxel, several times the label volume's size between them.
    members, values = regions[candidate], hu[candidate]
    del candidate
    sizes = np.bincount(members, minlength=n + 1)[1:]
    big = np.nonzero(sizes * voxel_ml >= UNLABELLED_REGION_ML)[0] + 1
    if big.size == 0:
        return []
    medians = np.asarray(ndimage.median(values, members, big))
    lo, hi = PARENCHYMA_MEDIAN_HU
    lung_like = big[(medians > lo) & (medians < hi)]
    found_ml = float(sizes[lung_like - 1].sum()) * voxel_ml
    limit = max(MIN_UNLABELLED_ML, MAX_UNLABELLED_FRACTION * lungs_ml)
    if found_ml <= limit:
        return []
    boxes = ndimage.find_objects(regions)  # a region is connected: its slices are one run
    first = min(boxes[lab - 1][0].start for lab in lung_like)
    last = max(boxes[lab - 1][0].stop for lab in lung_like) - 1
    return [QualityFlag("lung_unlabelled", f"{found_ml:.0f} ml of lung-density tissue inside the body, on "
                        f"slices {first}-{last}, is in no structure (the lungs hold {lungs_ml:.0f} ml; "
                        f"threshold: {MAX_UNLABELLED_FRACTION:.0%} of them, at least {MIN_UNLABELLED_ML:g} ml)",
                        structure="Lungs")]


def _airway(labels: np.ndarray, airway: int, lungs: tuple[int, int], spacing: tuple[float, float, float],
            voxel_ml: float, lungs_ml: float, name: str) -> list[QualityFlag]:
    sx, sy, sz = spacing
    way = labels == airway
    airway_ml = float(way.sum()) * voxel_ml
    if airway_ml == 0:
        return []
    flags = []
    widest, at = 0.0, 0
    for k in np.nonzero(way.any(axis=(1, 2)))[0]:
        regions, n = ndimage.label(way[k])
        section = float(np.bincount(regions.ravel())[1:].max()) * sx * sy
        if section > widest:
            widest, at = section, int(k)
    if airway_ml > MAX_AIRWAY_FRACTION * lungs_ml:
        flags.append(QualityFlag("airway_too_large", f"the airway ({airway_ml:.0f} ml) is "
                                 f"{airway_ml / lungs_ml:.1%} of the lungs' volume (threshold: "
                                 f"{MAX_AIRWAY_FRACTION:.0%}); it has grown into lung", structure=name))
    elif widest > MAX_AIRWAY_SECTION_MM2:
        flags.append(QualityFlag("airway_too_large", f"the airway's cross-section on slice {at} is "
                                 f"{widest:.0f} mm2, wider than a trachea (threshold: {MAX_AIRWAY_SECTION_MM2:g} mm2); "
                                 "it has grown into lung", structure=name))
    lung = _either(labels, lungs)
    overlap = int((way.any(axis=(1, 2)) & lung.any(axis=(1, 2))).sum()) * sz
    if overlap >= AIRWAY_OVERLAP_MM:
        box = ndimage.find_objects(way.astype(np.uint8))[0]
        box = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in box)
        if not (ndimage.binary_dilation(way[box], iterations=2) & lung[box]).any():
            flags.append(QualityFlag("airway_disconnected", f"the airway runs alongside the lungs for "
                                     f"{overlap:.0f} mm but touches neither (threshold: {AIRWAY_OVERLAP_MM:g} mm)",
                                     structure=name))
    return flags
