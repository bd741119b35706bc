"""Nodules of a chest CT: candidates in the closed lungs, each measured, located and categorised.

Candidates come from the built-in multi-scale blob measure (``candidates.py``) or from another
``CandidateSource``, e.g. a site's detection model (``model_candidates.py``); either way each is
measured the same, so the measurement decides what is a nodule and how big it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from node.nodules.candidates import Candidate, find_candidates
from node.nodules.categories import size_category
from node.nodules.measure import NoduleMeasurement, measure_candidate
from node.nodules.region import LungRegion, lung_region
from node.volume import Volume

__all__ = ["Nodule", "Detection", "detect_nodules", "detect_in_region", "spacing_kji", "MIN_STRENGTH_HU",
           "SOLID_STRENGTH_HU", "CandidateSource"]

# (volume in HU, the closed lungs) -> candidates, strongest first
CandidateSource = Callable[[Volume, "LungRegion"], list[Candidate]]

# Blob measure a candidate needs: a ground-glass ball of 350 HU contrast gives about 60, a solid
# one about 150; lung texture and noise stay below 30.
MIN_STRENGTH_HU = 35.0
# Blob measure of a candidate that is almost surely a nodule and not lung texture or a vessel: a
# solid ball gives about 150 (5-9 mm solid nodules at 1-5 mm slices: 72-144), the strongest vessel
# branch points of the phantoms 83. Such a candidate that no measurement kept means the detector saw
# something the measurement could not size (thick slices: 5 solid 5-9 mm nodules at 5 mm gave 4
# candidates of 72-114, none kept), so "no nodule" must not be said without a warning.
SOLID_STRENGTH_HU = 100.0


@dataclass(frozen=True)
class Nodule:
    measurement: NoduleMeasurement
    center_mm: tuple[float, float, float]  # patient LPS
    side: str  # left | right
    zone: str  # upper | middle | lower: third of that lung's cranio-caudal extent
    category: str  # computed size category (see categories.py)

    def __getattr__(self, name):  # the measurement's values read as the nodule's own
        return getattr(self.measurement, name)


@dataclass(frozen=True)
class Detection:
    nodules: list[Nodule]  # largest first
    candidates: int  # blob maxima examined
    region: LungRegion
    # candidates the measurement could not size although they look like a nodule (blob measure >=
    # SOLID_STRENGTH_HU, or any detection of a model source: it fired there)
    unmeasured: int = 0


def _zone(z_mm: float, side: str, region: LungRegion, volume: Volume) -> str:
    """Third of that lung's extent along the patient's z (head up) the point lies in."""
    zs = [volume.geometry.index_to_patient((k, 0, 0))[2] for k in region.slice_range(side)]
    lo, hi = min(zs), max(zs)
    t = (z_mm - lo) / (hi - lo) if hi > lo else 0.5
    return "upper" if t > 2 / 3 else "lower" if t < 1 / 3 else "middle"


def _overlap(m: NoduleMeasurement, box: tuple[slice, ...], mask) -> bool:
    """Whether ``m``'s segmentation meets ``mask`` (bool on ``box``, or True: all of it)."""
    common = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(m.box, box))
    if any(c.stop <= c.start for c in common):
        return False
    mine = m.mask[tuple(slice(c.start - a.start, c.stop - a.start) for c, a in zip(common, m.box))]
    if mask is True:
        return bool(mine.any())
    return bool((mine & mask[tuple(slice(c.start - b.start, c.stop - b.start) for c, b in zip(common, box))]).any())


def spacing_kji(volume: Volume) -> tuple[float, float, float]:
    return tuple(float(s) for s in volume.geometry.spacing[::-1])


def detect_nodules(volume: Volume, anatomy_labels: np.ndarray, *, min_diameter_mm: float = 4.0,
                   max_candidates: int = 200, source: CandidateSource | None = None) -> Detection:
    """Nodules of ``volume`` (HU) within the lungs of ct-anatomy's ``anatomy_labels``, from the
    candidates of ``source`` (default: the blob measure)."""
    return detect_in_region(volume, lung_region(anatomy_labels, spacing_kji(volume)), min_diameter_mm=min_diameter_mm,
                            max_candidates=max_candidates, source=source)


def detect_in_region(volume: Volume, region: LungRegion, *, min_diameter_mm: float = 4.0,
                     max_candidates: int = 200, source: CandidateSource | None = None) -> Detection:
    """``detect_nodules`` in the closed lungs already found: the caller can let the label volume
    (a byte per voxel of the whole CT) go before the candidates' working grids are made."""
    spacing = spacing_kji(volume)
    if source is None:
        candidates = find_candidates(volume.array, spacing, region, MIN_STRENGTH_HU, max_candidates)
    else:
        candidates = source(volume, region)[:max_candidates] if region.closed_found else []
    found: list[Nodule] = []
    taken: list[NoduleMeasurement] = []  # each on its own box: no full-size mask
    unmeasured = 0
    for cand in candidates:
        point = tuple(slice(int(round(v)), int(round(v)) + 1) for v in cand.kji)
        if any(_overlap(t, point, True) for t in taken):
            continue  # inside a nodule already measured (a weaker peak of the same one)
        m = measure_candidate(volume.array, region, spacing, cand)
        if m is None:  # (one measured below min_diameter_mm was sized: "none of 4 mm or more" holds)
            unmeasured += source is not None or cand.strength >= SOLID_STRENGTH_HU
            continue
        if m.mean_diameter_mm < min_diameter_mm:
            continue
        if any(_overlap(t, m.box, m.mask) for t in taken):
            continue
        taken.append(m)
        side = region.side_at(m.center_kji) or region.side_at(cand.kji)
        if side is None:
            continue
        center = tuple(float(v) for v in volume.geometry.index_to_patient(m.center_kji))
        found.append(Nodule(m, center, side, _zone(center[2], side, region, volume), size_category(m)))
    found.sort(key=lambda n: -n.volume_mm3)
    return Detection(found, len(candidates), region, unmeasured)
