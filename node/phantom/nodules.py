"""Lung nodules: placing them inside the lungs, and what happens to them by the follow-up.

Placement uses the painted anatomy itself (a coarse grid), so a nodule is inside the lung by
construction: its centre is farther from any non-lung voxel than its radius plus a margin, with
room to grow, and it keeps clear of the other nodules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable

import numpy as np
from scipy import ndimage

from node.phantom.breathing import breathing_displacement
from node.phantom.canvas import Canvas
from node.phantom.chest import LUNG_LEFT, LUNG_RIGHT, PART_SOLID_CORE, ChestAnatomy, ChestPainter

NODULE_TYPES = ("solid", "ground_glass", "part_solid")
DIAMETER_RANGE_MM = (3.0, 30.0)
ROOM_TO_GROW = 1.4  # placed nodules can grow by this diameter factor and stay inside the lung
_STEP = 3.0  # mm, coarse grid for the room map
_MARGIN = 2.0 + _STEP / 2  # mm beyond the radius, covering the coarse grid's error


@dataclass(frozen=True)
class Nodule:
    id: str
    center: tuple[float, float, float]  # anatomical frame, mm
    diameter_mm: float
    type: str  # "solid" | "ground_glass" | "part_solid"
    pleural: bool = False  # placed touching the pleura

    @property
    def solid_diameter_mm(self) -> float:
        """Diameter of the solid part: all of a solid nodule, the core of a part-solid one."""
        return {"solid": self.diameter_mm, "part_solid": PART_SOLID_CORE * self.diameter_mm}.get(self.type, 0.0)

    @property
    def radius(self) -> float:
        return self.diameter_mm / 2

    @property
    def volume_mm3(self) -> float:
        return 4.0 / 3.0 * math.pi * self.radius**3

    @property
    def side(self) -> str:
        return "left" if self.center[0] > 0 else "right"  # +x is the patient's left (LPS)


class LungRoom:
    """Distance (mm) from each point of a coarse anatomical grid to the nearest non-lung point."""

    def __init__(self, arms: str, consolidation: str | None, z_range: tuple[float, float],
                 effusion: str | None = None) -> None:
        z0, z1 = max(z_range[0], -150.0), min(z_range[1], 135.0)
        self.xs = np.arange(-150.0, 150.0 + 1e-6, _STEP)
        self.ys = np.arange(-110.0, 110.0 + 1e-6, _STEP)
        self.zs = np.arange(z0, z1 + 1e-6, _STEP) if z1 > z0 else np.array([z0])
        # Consolidated lung gets a code of its own, so it counts as no room; so does effusion.
        bare = ChestAnatomy(arms=arms, consolidation=consolidation, consolidation_code=255, effusion=effusion)
        painter = ChestPainter(bare, Canvas(self.xs, self.ys))
        codes = np.zeros((len(self.zs), len(self.ys), len(self.xs)), np.uint8)
        for k, z in enumerate(self.zs):
            painter.paint(z, codes[k], False)
        lung = (codes == LUNG_LEFT) | (codes == LUNG_RIGHT)
        lung[0], lung[-1] = False, False  # the scanned range ends here: no room beyond it
        self.dist = ndimage.distance_transform_edt(lung, sampling=_STEP) if lung.any() else np.zeros(lung.shape)
        self.bare = bare

    def fine_distance(self, center: np.ndarray, half_mm: float, step: float = 0.5):
        """(distance map, xs, ys, zs) to the nearest non-lung point of the anatomy on a fine grid
        around ``center``. Unlike the coarse grid, the end of the scanned range is no wall here: a
        nodule one radius from it touches nothing (see place_pleural)."""
        xs, ys, zs = (np.arange(c - half_mm, c + half_mm + 1e-6, step) for c in center)
        painter = ChestPainter(self.bare, Canvas(xs, ys))
        codes = np.zeros((len(zs), len(ys), len(xs)), np.uint8)
        for k, z in enumerate(zs):
            painter.paint(z, codes[k], False)
        lung = (codes == LUNG_LEFT) | (codes == LUNG_RIGHT)
        return ndimage.distance_transform_edt(lung, sampling=step), xs, ys, zs

    def at(self, point) -> float:
        """Distance at the grid point nearest ``point`` (0 outside the grid)."""
        idx = []
        for v, ax in zip((point[2], point[1], point[0]), (self.zs, self.ys, self.xs)):
            i = int(round((v - ax[0]) / _STEP)) if len(ax) > 1 else 0
            if not 0 <= i < len(ax):
                return 0.0
            idx.append(i)
        return float(self.dist[tuple(idx)])

    def candidates(self, need: float) -> np.ndarray:
        """(N, 3) anatomical points with at least ``need`` mm of lung around them."""
        k, j, i = np.nonzero(self.dist >= need)
        return np.column_stack([self.xs[i], self.ys[j], self.zs[k]])


@lru_cache(maxsize=8)
def _cached_room(arms: str, consolidation: str | None, z0: float, z1: float, effusion: str | None) -> LungRoom:
    return LungRoom(arms, consolidation, (z0, z1), effusion)


def lung_room(arms: str, consolidation: str | None, z_range: tuple[float, float],
              effusion: str | None = None) -> LungRoom:
    """The room map for this anatomy and scanned range (cached: studies of one run share it)."""
    return _cached_room(arms, consolidation, round(z_range[0], 1), round(z_range[1], 1), effusion)


def _clear_of(point: np.ndarray, radius: float, others: list[Nodule]) -> bool:
    return all(np.linalg.norm(point - np.asarray(o.center)) > ROOM_TO_GROW * (radius + o.radius) + 4.0
               for o in others)


def place_nodules(rng: np.random.Generator, room: LungRoom, count: int, diameter_range: tuple[float, float],
                  ground_glass_fraction: float, existing: list[Nodule] = (), first_id: int = 1,
                  part_solid_fraction: float = 0.0) -> list[Nodule]:
    """``count`` random nodules inside the lungs, clear of each other and of ``existing``."""
    diameters = sorted((float(rng.uniform(*diameter_range)) for _ in range(count)), reverse=True)
    placed: list[Nodule] = []
    for n, d in enumerate(diameters):
        r = d / 2
        pts = room.candidates(ROOM_TO_GROW * r + _MARGIN)
        order = rng.permutation(len(pts))
        chosen = next((pts[i] for i in order if _clear_of(pts[i], r, [*existing, *placed])), None)
        if chosen is None:
            raise ValueError(
                f"nodules: no room for a {d:.1f} mm nodule in the scanned lungs (after placing {len(placed)}); "
                "use fewer or smaller nodules, or scan more of the chest"
            )
        u = rng.random()
        kind = "ground_glass" if u < ground_glass_fraction else \
            "part_solid" if u < ground_glass_fraction + part_solid_fraction else "solid"
        center = tuple(float(round(v, 2)) for v in chosen + rng.uniform(-1.0, 1.0, 3))
        placed.append(Nodule(f"N{first_id + n}", center, round(d, 2), kind))
    return placed


def place_pleural(rng: np.random.Generator, room: LungRoom, count: int, diameter_range: tuple[float, float],
                  existing: list[Nodule], first_id: int) -> list[Nodule]:
    """``count`` solid nodules touching the pleura: each centre one radius (within 0.25 mm, on a
    0.5 mm grid) from the nearest non-lung point, found on a fine local painting of the anatomy."""
    placed: list[Nodule] = []
    for n in range(count):
        d = float(rng.uniform(*diameter_range))
        r = d / 2
        near_wall = (room.dist >= r + _STEP) & (room.dist <= r + 2 * _STEP)
        k, j, i = np.nonzero(near_wall)
        pts = np.column_stack([room.xs[i], room.ys[j], room.zs[k]])
        for idx in rng.permutation(len(pts)):
            p = pts[idx]
            if not _clear_of(p, r, [*existing, *placed]):
                continue
            dist, xs, ys, zs = room.fine_distance(p, r + 3 * _STEP)
            # One radius from the pleura, and the whole sphere within the scanned range. Until session 9
            # the range's end counted as the pleura: a "pleural" nodule could touch nothing but it.
            in_range = ((zs - r > room.zs[0]) & (zs + r < room.zs[-1]))[:, None, None]
            kk, jj, ii = np.nonzero((np.abs(dist - r) <= 0.25) & in_range)
            if len(kk) == 0:
                continue
            cand = np.column_stack([xs[ii], ys[jj], zs[kk]])
            best = cand[np.argmin(np.linalg.norm(cand - p, axis=1))]
            if _clear_of(best, r, [*existing, *placed]):
                placed.append(Nodule(f"N{first_id + n}", tuple(float(round(v, 3)) for v in best), round(d, 2),
                                     "solid", pleural=True))
                break
        else:
            raise ValueError(f"pleural_nodules: no place against the pleura for a {d:.1f} mm nodule; "
                             "use fewer or smaller nodules, or scan more of the chest")
    return placed


def check_specified(nodules: list[Nodule], room: LungRoom) -> None:
    """Explicitly requested nodules must lie inside a lung with their whole sphere."""
    for n, nod in enumerate(nodules):
        if room.at(nod.center) < nod.radius + _MARGIN:
            raise ValueError(
                f"nodule_specs[{n}]: a {nod.diameter_mm} mm nodule at {list(nod.center)} (anatomical mm) "
                "does not fit inside a lung in the scanned range"
            )


@dataclass(frozen=True)
class NoduleChange:
    id: str
    status: str  # "grown" | "shrunk" | "stable" | "vanished" | "new"
    baseline: Nodule | None
    followup: Nodule | None


STATUSES = ("grown", "shrunk", "vanished", "stable")


def evolve(rng: np.random.Generator, baseline: list[Nodule], room: LungRoom, new_count: int,
           diameter_range: tuple[float, float], ground_glass_fraction: float,
           growth: float, shrinkage: float) -> list[NoduleChange]:
    """Follow-up fate of each baseline nodule (every status used once before any repeats) plus new ones."""
    statuses = [STATUSES[i % len(STATUSES)] for i in range(len(baseline))]
    statuses = [statuses[i] for i in rng.permutation(len(statuses))]
    changes = []
    for nod, status in zip(baseline, statuses):
        if status == "vanished":
            after = None
        else:
            factor = {"grown": growth, "shrunk": shrinkage, "stable": 1.0}[status]
            after = replace(nod, diameter_mm=round(max(DIAMETER_RANGE_MM[0], nod.diameter_mm * factor), 2))
        changes.append(NoduleChange(nod.id, status, nod, after))
    first = 1 + max((int(n.id[1:]) for n in baseline), default=0)
    for nod in place_nodules(rng, room, new_count, diameter_range, ground_glass_fraction, baseline, first):
        changes.append(NoduleChange(nod.id, "new", None, nod))
    return changes


_SETTLE_STEP = 0.25  # mm, the local grid a follow-up nodule is settled on
_SETTLE_TOL = 0.35  # mm: a nodule this close to its goal stays where it is (its truth unchanged)
_SETTLE_REACH = 12.0  # mm, the local grid's half width beyond the radius: a nodule moves up to 1 mm less


def drawn_clearance(room: LungRoom, center, half_mm: float, amplitude_mm: float,
                    in_scan: Callable[[np.ndarray], np.ndarray], step: float = _SETTLE_STEP):
    """Distances (mm) from each point of a local grid around ``center`` (anatomical mm, the frame the
    follow-up draws its spheres in) to the nearest point that is not lung *as the study draws it*
    (the anatomy deformed by breathing: at u the anatomy of u + d(u)), and to the nearest point
    beyond the scanned slab (``in_scan``: (..., 3) anatomical points -> bool). Each runs to the
    nearest such sample's centre, less half a step: about the distance to the boundary itself
    (inf: none on the grid). Returns (to the pleura, to the slab's end, points (z, y, x, 3))."""
    n = int(round(half_mm / step))
    axes = [c + step * np.arange(-n, n + 1) for c in center]  # the middle sample is ``center`` itself
    zz, yy, xx = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    pts = np.stack([xx, yy, zz], axis=-1)
    seen = pts + breathing_displacement(pts, amplitude_mm) if amplitude_mm > 0 else pts
    lo, hi = seen.reshape(-1, 3).min(axis=0) - step, seen.reshape(-1, 3).max(axis=0) + step
    xs, ys, zs = (np.arange(a, b + 1e-6, step) for a, b in zip(lo, hi))
    painter = ChestPainter(room.bare, Canvas(xs, ys))
    codes = np.zeros((len(zs), len(ys), len(xs)), np.uint8)
    for k, z in enumerate(zs):
        painter.paint(z, codes[k], False)
    idx = np.rint((seen - lo) / step).astype(np.intp)
    drawn = codes[idx[..., 2], idx[..., 1], idx[..., 0]]  # nearest sample, as the study's drawing does

    def clearance(inside: np.ndarray) -> np.ndarray:
        if inside.all():
            return np.full(inside.shape, np.inf)
        return np.where(inside, ndimage.distance_transform_edt(inside, sampling=step) - step / 2, 0.0)

    return clearance((drawn == LUNG_LEFT) | (drawn == LUNG_RIGHT)), clearance(in_scan(pts)), pts


def settle(nod: Nodule, room: LungRoom, amplitude_mm: float, in_scan: Callable[[np.ndarray], np.ndarray]) -> Nodule:
    """``nod`` (a follow-up nodule, centred where its tissue moved to) placed so that the truth
    describes the image: its sphere inside the lungs as drawn (breathing included) and inside the
    scanned slab, and a juxtapleural nodule touching the pleura, neither sunk into it nor off it.

    Spheres are painted over the anatomy, so the part of one that sinks into the chest wall or
    diaphragm (a pleural nodule grown about its centre, or one that breathing moved against the
    wall) is wall-coloured and not seen, and a part beyond the slab is not imaged. A nodule already
    within ``_SETTLE_TOL`` of its goal is left where it is; otherwise it moves to the nearest place
    that meets it: a pleural one that grew, into the lung; one that shrank, back onto the pleura;
    one that breathing carried partly out of the slab, back into it."""
    r = nod.radius

    def meets(pleura: np.ndarray, slab: np.ndarray, tol: float) -> np.ndarray:
        return (np.abs(pleura - r) <= tol if nod.pleural else pleura >= r - tol) & (slab >= r - tol)

    pleura, slab, _ = drawn_clearance(room, nod.center, r + 2 * _SETTLE_TOL, amplitude_mm, in_scan)  # a small grid
    m = pleura.shape[0] // 2
    if meets(pleura[m, m, m], slab[m, m, m], _SETTLE_TOL):
        return nod
    pleura, slab, pts = drawn_clearance(room, nod.center, r + _SETTLE_REACH, amplitude_mm, in_scan)
    # Only points whose clearance the local grid can tell (their sphere and its reach inside it).
    inner = np.zeros(pleura.shape, bool)
    b = int(np.ceil((r + 1.0) / _SETTLE_STEP))
    inner[b:-b, b:-b, b:-b] = True
    fits = inner & meets(pleura, slab - _SETTLE_STEP, _SETTLE_STEP)  # wholly in the slab
    if not fits.any():
        where = "against the pleura" if nod.pleural else "inside the lungs"
        raise ValueError(f"generate_followup: nodule {nod.id} ({nod.diameter_mm} mm) has no place {where} and in the "
                         f"scanned slab within {_SETTLE_REACH - 1:g} mm of where its tissue is drawn (breathing or the "
                         "slab carried it off); use less breathing_mm or scan more of the chest")
    cand = pts[fits]
    best = cand[np.argmin(np.linalg.norm(cand - np.asarray(nod.center), axis=1))]
    return replace(nod, center=tuple(float(round(v, 3)) for v in best))
