"""Follow-up: prior nodules matched to current ones after registration, and the change of each.

Matching is a Hungarian assignment on the distance between each prior nodule's centre and each
current nodule's centre registered into the prior (by the deformable registration and by its rigid
stage: the lesser distance counts, see ``match``); a pair further apart than its gate (GATE_MM plus the larger
radius, so big nodules whose centre moves as they grow still match) is no match. A matched pair is
``persistent``, an unmatched current nodule ``new``, an unmatched prior one ``resolved``.

Change: volume change (%) and the volume doubling time VDT = ln 2 * dt / ln(V2 / V1) where the
volume changed by at least STABLE_PCT (repeat-scan variability of volumetry is about that large, so
a VDT from a smaller change says nothing; the nodule is reported ``stable`` instead). The growth
call follows the mean-diameter rule (an increase of more than 1.5 mm, Lung-RADS): ``growing`` or
``shrinking``; a volume change >= 25 % whose diameter change stays within 1.5 mm is ``indeterminate``.

A change is only computed where it can mean something (``comparison_problems``): both scans acquired
alike (slice spacing and thickness within ACQUISITION_RATIO, the same reconstruction kernel) and an
interval of at least MIN_INTERVAL_DAYS. Otherwise the handler reports each scan's measurements and
says why there is no comparison.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["Change", "Acquisition", "match", "change", "comparison_problems", "interval_problem", "GATE_MM",
           "STABLE_PCT", "GROWTH_MM", "ACQUISITION_RATIO", "MIN_INTERVAL_DAYS"]

GATE_MM = 8.0  # registration error allowed beyond the nodules' own size
STABLE_PCT = 25.0
GROWTH_MM = 1.5
# Volumetry depends on the slice spacing/thickness and the kernel: the same 5.3 mm nodule measured
# at 2.5 mm and at 1 mm slices came out -63.8 % (a "shrinking" call, a doubling time of -125 d),
# and at 5 mm not at all (every nodule then "new"). Lung-RADS v2022 and Fleischner 2017 ask for
# follow-up scans acquired and reconstructed like the baseline; a spacing ratio beyond 1.25 changes
# the partial volume of a 5 mm nodule by more than the 25 % the change call treats as real.
ACQUISITION_RATIO = 1.25
# The shortest follow-up either guideline schedules is a month (Lung-RADS 4B short-term, 1 month);
# within a week a real nodule changes far less than repeat-scan variability (a 100-day doubling
# time is +5 % in a week), so a change or a doubling time from such a pair is measurement noise
# (a same-day re-scan gave a doubling time of 0.22 d), and an interval of 0 or less is a date error.
MIN_INTERVAL_DAYS = 7.0


@dataclass(frozen=True)
class Acquisition:
    """How a scan was acquired, as far as volumetry depends on it (None: not in the header)."""
    spacing_mm: float
    thickness_mm: float | None
    kernel: str | None


def comparison_problems(current: Acquisition, prior: Acquisition) -> list[str]:
    """Why nodule volumes of ``prior`` and ``current`` cannot be compared (empty: they can)."""
    out = []
    for what, a, b in (("slice spacing", current.spacing_mm, prior.spacing_mm),
                       ("slice thickness", current.thickness_mm, prior.thickness_mm)):
        if a and b and max(a, b) / min(a, b) > ACQUISITION_RATIO:
            out.append(f"{what} {b:g} mm (prior) vs {a:g} mm (current), more than "
                       f"{ACQUISITION_RATIO - 1:.0%} apart")
    if current.kernel and prior.kernel and current.kernel != prior.kernel:
        out.append(f"convolution kernel {prior.kernel} (prior) vs {current.kernel} (current)")
    return out


def interval_problem(interval_days: float) -> str | None:
    """Why a change over ``interval_days`` says nothing (None: it can)."""
    if interval_days <= 0:
        return (f"the prior is dated {-interval_days:.1f} days after the current study" if interval_days < 0
                else "the prior is dated the same moment as the current study")
    if interval_days < MIN_INTERVAL_DAYS:
        return (f"the studies are {interval_days:.2f} days apart, less than {MIN_INTERVAL_DAYS:g} days "
                "(no real change exceeds repeat-scan variability that soon)")
    return None


@dataclass(frozen=True)
class Change:
    interval_days: float
    volume_change_pct: float
    diameter_change_mm: float
    vdt_days: float | None  # None when stable (|change| < STABLE_PCT); negative: halving time
    call: str  # growing | shrinking | stable | indeterminate


def match(prior_mm: np.ndarray, prior_diam: np.ndarray, current_mm: np.ndarray,
          current_diam: np.ndarray) -> list[tuple[int, int]]:
    """(prior index, current index) pairs; ``prior_mm`` (n, 3) and ``current_mm`` in one frame (the
    handler maps the current nodules into the prior). ``current_mm`` is (m, 3), or (k, m, 3): the
    current nodules under k mappings (the deformable registration and its rigid stage), a pair's
    distance then the least of its k. Why both: a deformation that goes wrong somewhere misplaced a
    shrunk nodule by 12 mm where the rigid stage was within 1 mm (upper lungs, 4 degrees of
    rotation), and at the lung bases a breathing follow-up is 3-8 mm off rigidly and 1-3 mm
    deformably."""
    current = np.asarray(current_mm, float)
    if len(prior_mm) == 0 or current.size == 0:
        return []
    current = current.reshape(-1, *current.shape[-2:])
    dist = np.linalg.norm(np.asarray(prior_mm)[None, :, None, :] - current[:, None, :, :], axis=3).min(axis=0)
    gate = GATE_MM + np.maximum(np.asarray(prior_diam)[:, None], np.asarray(current_diam)[None, :]) / 2
    cost = np.where(dist <= gate, dist, 1e6)  # gated pairs cost more than any admissible assignment
    rows, cols = linear_sum_assignment(cost)
    return [(int(i), int(j)) for i, j in zip(rows, cols) if dist[i, j] <= gate[i, j]]


def change(v1: float, d1: float, v2: float, d2: float, interval_days: float) -> Change:
    """The change from a prior (volume v1 mm3, mean diameter d1 mm) to now (v2, d2) over the interval."""
    pct = 100.0 * (v2 / v1 - 1.0)
    dd = d2 - d1
    if abs(pct) < STABLE_PCT:
        return Change(interval_days, pct, dd, None, "stable")
    # no doubling time from an interval too short to show growth (see MIN_INTERVAL_DAYS)
    vdt = math.log(2) * interval_days / math.log(v2 / v1) if interval_days >= MIN_INTERVAL_DAYS else None
    call = "growing" if dd > GROWTH_MM else "shrinking" if dd < -GROWTH_MM else "indeterminate"
    return Change(interval_days, pct, dd, vdt, call)
