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

__all__ = ["Nodule", "Detection", "detect_nodules", "MIN_STRENGTH_HU", "CandidateSource"]

# (volume in HU, the closed lungs) -> candidates, strongest first
CandidateSource = Callable[[Volume, "LungRegion"], list[Candidate]]

# Blob measure a candidate needs: a ground-glass ball of 350 HU contrast gives about 60, a solid
# one about 150; lung texture and noise stay below 30.
MIN_STRENGTH_HU = 35.0


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


def _zone(z_mm: float, lung: np.ndarray, volume: Volume) -> str:
    """Third of the lung's extent along the patient's z (head up) the point lies in."""
    ks = np.nonzero(lung.any(axis=(1, 2)))[0]
    zs = [volume.geometry.index_to_patient((k, 0, 0))[2] for k in (ks.min(), ks.max())]
    lo, hi = min(zs), max(zs)
    t = (z_mm - lo) / (hi - lo) if hi > lo else 0.5
    return "upper" if t > 2 / 3 else "lower" if t < 1 / 3 else "middle"


def detect_nodules(volume: Volume, anatomy_labels: np.ndarray, *, min_diameter_mm: float = 4.0,
                   max_candidates: int = 200, source: CandidateSource | None = None) -> Detection:
    """Nodules of ``volume`` (HU) within the lungs of ct-anatomy's ``anatomy_labels``, from the
    candidates of ``source`` (default: the blob measure)."""
    spacing = tuple(float(s) for s in volume.geometry.spacing[::-1])  # (k, j, i)
    region = lung_region(anatomy_labels, spacing)
    if source is None:
        candidates = find_candidates(volume.array, spacing, region.both, MIN_STRENGTH_HU, max_candidates)
    else:
        candidates = source(volume, region)[:max_candidates] if region.both.any() else []
    found: list[Nodule] = []
    taken = np.zeros(volume.array.shape, bool)
    for cand in candidates:
        if taken[tuple(int(round(v)) for v in cand.kji)]:
            continue  # inside a nodule already measured (a weaker peak of the same one)
        m = measure_candidate(volume.array, region.both, spacing, cand)
        if m is None or m.mean_diameter_mm < min_diameter_mm:
            continue
        if (taken[m.box] & m.mask).any():
            continue
        taken[m.box] |= m.mask
        side = region.side_at(m.center_kji) or region.side_at(cand.kji)
        if side is None:
            continue
        center = tuple(float(v) for v in volume.geometry.index_to_patient(m.center_kji))
        lung = region.left if side == "left" else region.right
        found.append(Nodule(m, center, side, _zone(center[2], lung, volume), size_category(m)))
    found.sort(key=lambda n: -n.volume_mm3)
    return Detection(found, len(candidates), region)
