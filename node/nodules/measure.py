"""One nodule from its candidate: a 3-D segmentation and its measurements.

Volume counts partial volume: each voxel near the nodule contributes the fraction
(HU - lung) / (nodule - lung) of itself, with the lung's HU from around the nodule and the
nodule's from its own core. The sum is exact for any blur that keeps the mean (scanner point
spread, thick slices), so a 6 mm nodule on 1.4 mm pixels still has the right volume, where a
voxel count at any threshold is off by a third. Diameters (Lung-RADS style) come from the axial
slice where that fractional area is largest: the mean diameter is the diameter of a disc of that
area, the long and short axes those of the ellipse with the same area and second moments. The
3-D maximum diameter is the long axis of the ellipsoid with the nodule's volume and moments.

Types by HU: ``solid`` (soft tissue throughout), ``ground_glass`` (no part above SOLID_HU),
``part_solid`` (a solid core with a ground-glass rim of real thickness around it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.nodules.candidates import Candidate, hessian_shape
from node.nodules.region import LungRegion

__all__ = ["NoduleMeasurement", "measure_candidate", "SOLID_HU"]

SOLID_HU = -300.0  # above: solid component (soft tissue, blurred); ground glass lies below it
VISIBLE_HU = 150.0  # the outline: this far above the surrounding lung (half a typical GGN's contrast)
MIN_CONTRAST_HU = 200.0  # a core this little above the lung is texture, not a nodule
MIN_FLATNESS = 0.45  # shortest / longest ellipsoid axis: below is a vessel, fissure or wall sliver
# Hessian shape (l3 / l1 at the candidate's scale) a blob that vessels run out of needs: a nodule on
# a vessel stays ball-like (0.80 and more on the phantoms), a stretch of vessel where branches meet
# (the hilum) or one vessel crosses another does not (0.62 and less); the exit tests below cannot
# tell these apart, as the vessels leave both alike.
MIN_SHAPE_ON_VESSELS = 0.7
_INSIDE_VOXELS = 2  # vessels leave a blob this far inside the closed lungs, not along their border
# A blob that runs on along the wall has the wall cut away (_nodule_core) only where its full ball is
# a nodule's (4 mm across at least): a candidate on the border of the heart or the chest wall, where
# the closed lungs take in a sliver of that tissue, leaves a ball of 1 mm or less (a 4-5 mm false
# positive once cut, with a dense-tissue detector proposing such places).
MIN_BALL_MM = 2.0
# A blob kept whole though something runs out of reach (neither cut nor refused by its exits) must be
# rounder than a blob without exits: a vessel stretch or a wall sliver that passes is elongated.
MIN_FLATNESS_KEPT_WHOLE = 0.7
CUT_MARGIN_MM = 1.5  # beyond the full ball a blob is cut to where no core remains: the blur of its edge
# A nodule vessels leave (or pass along) is opened on its half-way mask (where a vessel has its own
# calibre) by the largest ball, in OPEN_STEP_MM steps, that leaves something at the seed: from
# OPEN_FACTORS[0] times the widest vessel's radius by its exit's area (not beyond the nodule's full
# ball) down to OPEN_FACTORS[1] times its radius by the exit's short semi-axis (where the area
# overstates a vessel crossing the reach ball at a slant). It keeps what of it lies within
# OPEN_MARGIN_MM of what remains and nearer that than the vessels (_own_share). Why the largest
# ball: a smaller one keeps the fillets where vessels meet the nodule, and on voxels of 1 mm an
# opening of a 7 mm ball loses an erratic part of its rim (10-50 %) whatever the ball, so the split
# of the blur by distance is off by as much. Trying only 1.6 and 1.2 times the radius by the area,
# then 1.2 times the short semi-axis, 7 mm nodules touching a 1.8 mm vessel mostly fell through to
# the smallest ball and measured -12..+14 %; now -6..+8 % (tests, 1.1 mm pixels). A 7.6 mm nodule
# at a junction of three vessels +5 % (cut to a ball: +50 %), 9 mm nodules on branch points -5..+5 %.
OPEN_FACTORS = (1.6, 1.2)
OPEN_STEP_MM = 0.1
OPEN_MARGIN_MM = 1.0
# The wall a juxtapleural nodule runs on along is what of the bright tissue holds a ball this many
# times the nodule's full ball (plus 0.5 mm): one the nodule cannot hold and the chest wall or the
# diaphragm can. A 6.3 mm nodule on the diaphragm measured +37 % cut to its ball, +1 % without the wall.
WALL_BALL_FACTOR = 1.3
# Bright voxels this close to the nodule's opened core are its own rim (which the opening shaves off
# where its ball barely fits), not a vessel or wall to share the blur with.
_RIM_VOXELS = 2
# Partial-volume sum / half-way voxel count above which a solid core has a ground-glass rim:
# 1 for a solid nodule, 1 + 0.39 (1/q^3 - 1) for a core of q times the nodule's diameter (q=0.75: 1.6).
PART_SOLID_RATIO = 1.6
MAX_CUT_FRACTION = 0.45  # share of the outline where the bright part crosses the lung's border
MAX_EXIT_RATIO = 0.5  # see _exit_ratio
_SMOOTH_MM = 0.6
NEAR_VOXELS = 1  # partial volume beyond the outline: the scanner's blur, about a voxel


@dataclass(frozen=True)
class NoduleMeasurement:
    mask: np.ndarray  # bool on the box
    box: tuple[slice, slice, slice]
    center_kji: tuple[float, float, float]
    type: str  # solid | part_solid | ground_glass
    volume_mm3: float
    solid_volume_mm3: float
    long_axis_mm: float
    short_axis_mm: float
    key_slice: int  # source slice index of the axial plane of maximal area
    max_diameter_3d_mm: float
    hu_mean: float
    hu_max: float
    lung_hu: float

    @property
    def mean_diameter_mm(self) -> float:
        return (self.long_axis_mm + self.short_axis_mm) / 2

    @property
    def solid_diameter_mm(self) -> float:
        """Mean diameter of the solid part, as the diameter of the sphere of its volume."""
        return 2 * (3 * self.solid_volume_mm3 / (4 * math.pi)) ** (1 / 3)


def _ball(shape, center, radius_vox) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    d2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radius_vox))
    return d2 <= 1.0


def _component_at(mask: np.ndarray, seed: np.ndarray, within_vox: np.ndarray) -> np.ndarray | None:
    """The connected component of ``mask`` nearest ``seed`` (within ``within_vox`` per axis)."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    near = _ball(mask.shape, seed, within_vox) & (labels > 0)
    if not near.any():
        return None
    idx = np.argwhere(near)
    d = (((idx - seed) / within_vox) ** 2).sum(axis=1)
    return labels == labels[tuple(idx[int(np.argmin(d))])]


def _exit_ratio(comp: np.ndarray, reach: np.ndarray, spacing: np.ndarray) -> float:
    """Cross-section where ``comp`` leaves the reach ball, over the cross-section of a ball of its
    volume: ~0 for a nodule (a thin vessel on it leaves through a small hole), large for the bulb
    where vessels branch, whose trunk and branches all run out of the ball."""
    exits = comp & ~ndimage.binary_erosion(reach)
    if not exits.any():
        return 0.0
    # One voxel layer of the ball's surface: its area is about the voxel count times a voxel's face.
    area = float(exits.sum()) * float(np.prod(spacing)) / float(spacing.min())
    r_eq = (3 * float(comp.sum()) * float(np.prod(spacing)) / (4 * math.pi)) ** (1 / 3)
    return area / (math.pi * r_eq ** 2)


def _tube_radius(patch: np.ndarray, spacing: np.ndarray) -> float:
    """Radius (mm) of a tube from the patch (voxel indices) where it crosses the reach ball's surface:
    the patch's short semi-axis, as a tube crossing at a slant leaves an ellipse whose short semi-axis
    is its radius (the radius of the patch's area overstates it, by 1.6 times for a vessel passing
    along a nodule's side). A uniform ellipse has a variance of a^2/4 along its semi-axis a. Patches
    of a few voxels have no reliable moments: their area's radius."""
    face = float(np.prod(spacing)) / float(spacing.min())
    by_area = math.sqrt(len(patch) * face / math.pi)
    if len(patch) < 8:
        return by_area
    ev = np.linalg.eigvalsh(np.cov((patch * spacing).T))  # ascending: the shell's thickness first
    return min(by_area, 2 * math.sqrt(max(float(ev[1]), 0.0)))


def _widest_tube(comp: np.ndarray, reach: np.ndarray, spacing: np.ndarray, slant: bool = True) -> float:
    """Radius (mm) of the widest tube leaving the reach ball. A nodule on a branch point is clearly
    wider than its vessels; the bulb of a branch point is not. ``slant``: by each exit patch's short
    semi-axis (see _tube_radius), else by its area's radius."""
    exits, n = ndimage.label(comp & ~ndimage.binary_erosion(reach))
    face = float(np.prod(spacing)) / float(spacing.min())
    if not slant:
        return max(math.sqrt(float((exits == i).sum()) * face / math.pi) for i in range(1, n + 1))
    return max(_tube_radius(np.argwhere(exits == i), spacing) for i in range(1, n + 1))


def _filled(comp: np.ndarray, reach: np.ndarray, centre: np.ndarray, spacing: np.ndarray) -> float:
    """Radius (mm) of the full ball of ``comp`` around ``centre``: shells of 0.5 mm out to the first
    one less than 60 % full."""
    dist = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(np.indices(comp.shape), centre, spacing)))
    filled = 0.0
    for r in np.arange(0.5, float(dist[reach].max()), 0.5):
        shell = reach & (dist >= r - 0.5) & (dist < r)
        if shell.any() and comp[shell].mean() < 0.6:
            break
        filled = r
    return filled


def _cut_to_ball(comp: np.ndarray, reach: np.ndarray, seed: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """``comp`` cut to the full ball it has around ``seed``, plus CUT_MARGIN_MM for the blur at its edge."""
    return comp & _ball(comp.shape, seed, (_filled(comp, reach, seed, spacing) + CUT_MARGIN_MM) / spacing)


def _inner_distance(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) from each voxel of ``mask`` to the nearest voxel outside it, the box's edge
    counted as outside (as a binary erosion has it)."""
    return ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[(slice(1, -1),) * 3]


def _opened(mask: np.ndarray, radius_mm: float, spacing: np.ndarray, inner: np.ndarray | None = None) -> np.ndarray:
    """``mask`` opened by a ball of ``radius_mm``, by distance transforms: the voxels within the
    radius of one whose nearest outside voxel lies beyond it (the same as a binary opening by the
    ball, at a cost that does not grow with it). ``inner``: _inner_distance of ``mask``, when known."""
    eroded = (_inner_distance(mask, spacing) if inner is None else inner) > radius_mm
    if not eroded.any():
        return eroded
    return ndimage.distance_transform_edt(~eroded, sampling=spacing) <= radius_mm


def _wall(bright: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """What of ``bright`` holds a ball of ``radius_mm``: its opening, by distance transforms (cheap
    for a ball of 10 mm) on the box padded by its edge values, as the wall goes on beyond the box."""
    pad = [(p, p) for p in np.ceil(radius_mm / spacing).astype(int) + 1]
    eroded = ndimage.distance_transform_edt(np.pad(bright, pad, mode="edge"), sampling=spacing) > radius_mm
    wall = ndimage.distance_transform_edt(~eroded, sampling=spacing) <= radius_mm
    return wall[tuple(slice(a, a + n) for (a, _), n in zip(pad, bright.shape))]


def _wall_of(bright: np.ndarray, filled_mm: float, spacing: np.ndarray) -> np.ndarray:
    """The wall a blob with a full ball of ``filled_mm`` runs on along: what of ``bright`` (the
    half-way mask of the whole box, beyond the lungs too) holds a ball WALL_BALL_FACTOR times that
    full ball (plus 0.5 mm), which the nodule cannot hold and the chest wall, the diaphragm or the
    mediastinum can; a vessel cannot either."""
    return _wall(bright, WALL_BALL_FACTOR * filled_mm + 0.5, spacing)


def _nodule_core(dense: np.ndarray, wall: np.ndarray, reach: np.ndarray, seed: np.ndarray,
                 filled_mm: float, tubes: bool, spacing: np.ndarray) -> tuple[np.ndarray | None, bool]:
    """The nodule's own part of ``dense`` (its half-way mask in the closed lungs, where a vessel has its
    own calibre, not widened by the blur), or None where nothing of it remains at the seed; and
    whether tubes were opened away from it.

    - The ``wall`` (chest wall, diaphragm, mediastinum: see _wall_of) is wider than the nodule and
      is taken away. A ball cut around the candidate instead kept the sliver of diaphragm inside
      the closed lungs under it (+37 % for a 6.3 mm nodule).
    - Tubes (``tubes``: vessels leave the blob) are narrower: opened away by the largest ball that
      leaves something at the seed (see OPEN_FACTORS; a ball wider than a tube survives an opening
      whole). Without tubes, what a sliver of wall left is opened away at half the nodule's full
      ball."""
    shell = ~ndimage.binary_erosion(reach)
    if tubes and not (dense & shell).any():
        return None, False  # the vessels leave its outline only (a ground-glass rim): cut to its ball
    own = dense & ~wall
    if tubes and (own & shell).any():
        area, short = _widest_tube(own, reach, spacing, slant=False), _widest_tube(own, reach, spacing)
        smallest = OPEN_FACTORS[1] * short
        top = max(min(OPEN_FACTORS[0] * area, filled_mm), smallest)
        inner = _inner_distance(own, spacing)
        for radius in [*np.arange(top, smallest, -OPEN_STEP_MM), smallest]:
            core = _component_at(_opened(own, radius, spacing, inner), seed, np.maximum(0.5 * short / spacing, 1.0))
            if core is not None:
                return core, True
        return None, True
    # No tubes, or what left like one was the wall (along a curving pleura, deep in the closed lungs)
    core = _component_at(_opened(own, 0.5 * filled_mm, spacing), seed, np.maximum(0.5 * filled_mm / spacing, 1.0))
    return core, False


def _own_share(core: np.ndarray, bright: np.ndarray, reach: np.ndarray, inreg: np.ndarray,
               spacing: np.ndarray) -> np.ndarray:
    """Where a voxel lies nearer the nodule's ``core`` than the vessels or wall cut away from it: the
    parts of ``bright`` (half-way mask of the box) more than _RIM_VOXELS from the core (not the rim an
    opening shaves off the nodule) that run on out of reach or beyond the closed lungs. The
    blur between the nodule and them is shared out by distance, so a vessel along the nodule's side or
    the wall under it adds neither its own voxels nor its blur to the nodule (a 1 mm margin around the
    core took in +24..+36 % for a 7 mm nodule touching a 1.8 mm vessel)."""
    labels, n = ndimage.label(bright & ~ndimage.binary_dilation(core, iterations=_RIM_VOXELS))
    if n == 0:
        return np.ones(core.shape, bool)
    far = ~ndimage.binary_erosion(reach) | ~inreg
    keep = np.unique(labels[far & (labels > 0)])
    other = np.isin(labels, keep[keep > 0])
    if not other.any():
        return np.ones(core.shape, bool)
    return (ndimage.distance_transform_edt(~core, sampling=spacing)
            < ndimage.distance_transform_edt(~other, sampling=spacing))


def _cut_fraction(comp: np.ndarray, inreg: np.ndarray, bright: np.ndarray) -> float:
    """Share of ``comp``'s border voxels next to bright voxels outside the lung region: a juxtapleural
    nodule touches the wall on a small patch, a bulge of heart or mediastinum all along one side."""
    border = comp & ~ndimage.binary_erosion(comp)
    outside = ndimage.binary_dilation(bright & ~inreg)
    return float((border & outside).sum()) / max(int(border.sum()), 1)


def _fraction_sum(hu: np.ndarray, where: np.ndarray, low: float, high: float) -> np.ndarray:
    """Per-voxel fraction of the high material: clipped to [-1, 1] so noise in the lung averages out."""
    f = np.zeros(hu.shape, np.float32)
    f[where] = np.clip((hu[where] - low) / (high - low), -1.0, 1.0)
    return f


def _axes_2d(f: np.ndarray, pixel_mm: tuple[float, float]) -> tuple[float, float]:
    """(long, short) axis (mm) of the ellipse with ``f``'s area and second moments (f >= 0)."""
    w = np.clip(f, 0, 1)
    area = float(w.sum()) * pixel_mm[0] * pixel_mm[1]
    jj, ii = np.nonzero(w)
    if area <= 0 or len(jj) < 3:
        return 0.0, 0.0
    pts = np.column_stack([jj * pixel_mm[0], ii * pixel_mm[1]])
    cov = np.cov(pts.T, aweights=w[jj, ii])
    lo, hi = np.clip(np.linalg.eigvalsh(cov), 1e-6, None)
    ratio = math.sqrt(hi / lo)  # long / short
    d2 = 4 * area / math.pi
    return math.sqrt(d2 * ratio), math.sqrt(d2 / ratio)


def _axes_3d(f: np.ndarray, spacing: np.ndarray, volume: float) -> tuple[float, float]:
    """(longest axis, shortest/longest) of the ellipsoid with the volume and second moments of f."""
    w = np.clip(f, 0, 1)
    idx = np.argwhere(w > 0)
    if len(idx) < 4 or volume <= 0:
        return 0.0, 0.0
    cov = np.cov((idx * spacing).T, aweights=w[tuple(idx.T)])
    ev = np.clip(np.linalg.eigvalsh(cov), 1e-6, None)  # proportional to the squared semi-axes
    semi = np.sqrt(ev)
    a = (3 * volume / (4 * math.pi) * semi[2] ** 2 / (semi[0] * semi[1])) ** (1 / 3)
    return 2 * a, float(semi[0] / semi[2])


def measure_candidate(hu: np.ndarray, region: LungRegion, spacing_kji: tuple[float, float, float],
                      cand: Candidate) -> NoduleMeasurement | None:
    """The nodule at ``cand``, or None where the blob is not one (too faint, a sliver, a tube, no lung around)."""
    spacing = np.asarray(spacing_kji, float)
    r = cand.radius_mm
    half = np.ceil((2.5 * r + 4.0) / spacing).astype(int)
    center = np.asarray(cand.kji)
    c = np.rint(center).astype(int)
    box = tuple(slice(max(0, ci - h), min(n, ci + h + 1)) for ci, h, n in zip(c, half, hu.shape))
    sub = hu[box].astype(np.float32)
    seed = center - np.array([b.start for b in box])
    sm = ndimage.gaussian_filter(sub, _SMOOTH_MM / spacing, mode="nearest")
    reach = _ball(sub.shape, seed, (2.0 * r + 2.0) / spacing)
    inreg = region.crop(box)
    for exact in (False, True):
        if not inreg[tuple(np.clip(np.rint(seed).astype(int), 0, np.array(sub.shape) - 1))]:
            return None
        lung_vox = inreg & (sm < -650)
        if lung_vox.sum() < 20:
            return None
        bg = float(np.median(sub[lung_vox]))
        core = _ball(sub.shape, seed, np.maximum(0.5 * r / spacing, 1.0)) & inreg
        peak = float(sm[core].max()) if core.any() else bg
        if peak - bg < MIN_CONTRAST_HU:
            return None
        t_outer = bg + min(0.5 * (peak - bg), VISIBLE_HU)
        comp = _component_at((sm > t_outer) & inreg & reach, seed, np.maximum(0.5 * r / spacing, 1.0))
        if exact or comp is None or not (ndimage.binary_dilation(comp) & ~inreg & (sm > t_outer)).any():
            break
        # The blob runs into bright voxels outside the closed lungs: against the pleura, where the
        # coarse closing may stop short of it. Measure it again in the lungs closed at full resolution.
        inreg = region.crop(box, exact=True)
    if comp is None or comp.sum() > 0.85 * reach.sum():
        return None  # nothing there, or no edge within reach: not a blob
    exits = comp & ~ndimage.binary_erosion(reach)
    cut = False  # vessels or wall cut away (or, failing that, cut to the ball they leave from)
    core = None  # the nodule's own half-way mask, where vessels or wall were cut away from it
    bright = sm > (bg + peak) / 2  # the half-way mask of the whole box: nodule, vessels, wall
    if exits.any():
        # Something bright runs on out of reach: vessels, through the lung, or along the chest wall
        # or diaphragm, where the lungs' border meets it (not counted as vessels). Vessels leave a
        # nodule ball-like (the Hessian shape) and clearly wider than themselves, and the nodule is
        # what remains with the vessels opened away; a vessel branch point's bulb is hardly wider
        # than its tubes. Along the wall, the nodule is the ball the sliver of wall leaves from.
        deep = exits & ndimage.binary_erosion(inreg, iterations=_INSIDE_VOXELS)
        if deep.any() and hessian_shape(hu, cand.kji, cand.scale_mm, spacing) < MIN_SHAPE_ON_VESSELS:
            return None
        # Where the pleura curves, the closed lungs take in a sliver of the wall, and the blob leaves
        # the reach ball along it deep inside them: what leaves through the wall (see _wall_of) is
        # not a vessel. Taken for vessels, such exits were wider than the nodule and refused it
        # (a 13.0 mm nodule on the back wall and an 8.7 mm one at 1.4 mm pixels). The Hessian shape
        # above still applies: a bulge of the aorta or the heart into the closed lungs leaves through
        # the wall too.
        filled = _filled(comp, reach, seed, spacing)
        wall = _wall_of(bright, filled, spacing)
        tubes = comp & ~ndimage.binary_dilation(wall)
        vessels = bool((deep & tubes).any())
        widest = _widest_tube(tubes if vessels else comp, reach, spacing)
        if filled >= 1.3 * widest or (not vessels and filled >= MIN_BALL_MM):
            cut = True
            core, opened = _nodule_core(comp & bright, wall, reach, seed, filled, vessels, spacing)
            if core is None:
                comp = _cut_to_ball(comp, reach, seed, spacing)
            else:  # nearer the core than the vessels or wall; with vessels, within the blur of its edge
                own = _own_share(core, bright, reach, inreg, spacing)
                comp &= own
                if opened:
                    comp &= ndimage.distance_transform_edt(~core, sampling=spacing) <= OPEN_MARGIN_MM
                comp = _component_at(comp, seed, np.maximum(0.5 * r / spacing, 1.0))
                if comp is None:
                    return None
        elif _exit_ratio(comp, reach, spacing) > MAX_EXIT_RATIO:
            return None
    solid = comp & (sm > SOLID_HU)
    near = ndimage.binary_dilation(comp, iterations=NEAR_VOXELS) & inreg
    if core is not None:
        near &= own
    # The lung's HU right around the nodule: lung texture makes it vary across the box, and each
    # HU of error in it is a 1/900 error over every voxel of the sum.
    shell = ndimage.binary_dilation(near, iterations=2) & ~near & inreg & (sm < t_outer)
    if shell.sum() >= 20:
        bg = float(np.median(sub[shell]))
    vox = float(np.prod(spacing))
    if _cut_fraction(comp, inreg, sm > t_outer) > MAX_CUT_FRACTION:
        return None  # the bright part goes on beyond the lung: mediastinum, heart or wall, not a nodule
    if solid.sum() >= 2:
        inner = ndimage.binary_erosion(solid)
        ref_s = float(np.median(sub[inner])) if inner.sum() >= 5 else float(np.percentile(sub[solid], 90))
        # A solid nodule's partial-volume sum equals its voxel count at the half-way threshold (blur
        # keeps the mean); a ground-glass rim adds to the sum but not to that count.
        as_solid = float(_fraction_sum(sub, near, bg, ref_s).sum())
        half_count = int((near & (sub > (bg + ref_s) / 2)).sum())
        kind = "part_solid" if as_solid > PART_SOLID_RATIO * max(half_count, 1) else "solid"
        rim = comp & ~ndimage.binary_dilation(solid, iterations=max(1, int(round(1.5 / spacing[1:].min()))))
        if kind == "part_solid" and not rim.any():
            kind = "solid"
    else:
        kind, ref_s, rim = "ground_glass", None, comp
    if kind == "solid":
        f = _fraction_sum(sub, near, bg, ref_s)
        solid_f = f
        mask = comp & (sm > (bg + ref_s) / 2)
        if not mask.any():
            mask = comp
    else:
        inner = ndimage.binary_erosion(rim)
        ref_g = float(np.median(sub[inner])) if inner.sum() >= 5 else float(np.median(sub[rim]))
        if ref_g - bg < MIN_CONTRAST_HU / 2:
            return None
        f = _fraction_sum(sub, near, bg, ref_g)
        solid_f = (_fraction_sum(sub, ndimage.binary_dilation(solid) & near, ref_g, ref_s).clip(0, 1)
                   if kind == "part_solid" else np.zeros_like(f))
        mask = comp
    # Where the nodule touches the wall, heart or mediastinum (beyond the closed lungs), the blur of
    # that tissue reads as partial volume of the nodule: there each voxel counts whole or not at all,
    # by the half-way threshold, as a voxel count would.
    contact = near & ndimage.binary_dilation((sm > t_outer) & ~inreg, iterations=2)
    if contact.any():
        ref = ref_s if kind == "solid" else ref_g
        f[contact] = sub[contact] > (bg + ref) / 2
    volume = float(f.sum()) * vox
    solid_volume = float(solid_f.sum()) * vox
    if volume <= 0:
        return None
    w = np.clip(f, 0, 1)
    areas = w.sum(axis=(1, 2))
    k = int(np.argmax(areas))
    long_ax, short_ax = _axes_2d(f[k], (spacing[1], spacing[2]))
    max_3d, flatness = _axes_3d(f, spacing, volume)
    if flatness < (MIN_FLATNESS_KEPT_WHOLE if exits.any() and not cut else MIN_FLATNESS):
        return None
    centroid = np.array([np.average(g, weights=w) for g in np.indices(w.shape)]) + np.array([b.start for b in box])
    values = sub[mask]
    return NoduleMeasurement(
        mask=mask, box=box, center_kji=tuple(float(v) for v in centroid), type=kind, volume_mm3=volume,
        solid_volume_mm3=solid_volume if kind != "ground_glass" else 0.0,
        long_axis_mm=long_ax, short_axis_mm=short_ax, key_slice=k + box[0].start, max_diameter_3d_mm=max_3d,
        hu_mean=float(values.mean()), hu_max=float(values.max()), lung_hu=bg)
