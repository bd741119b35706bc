"""Anatomy of the chest CT phantom: truth labels, intended HU, and the painter of one axial slice.

Anatomical frame: DICOM LPS of an unmoved patient: x toward the patient's LEFT, y toward
POSTERIOR, z toward the HEAD; millimetres; origin mid-chest (the carina is at z = +40, the lung
apices at about +130, the diaphragm domes at -55 (right) and -70 (left)). A follow-up study places
this frame in its patient coordinates with a rigid pose; a baseline study uses it as is.

Shapes are analytic (superellipses, ellipsoids, capsules along polylines) so any grid can be
painted exactly and quickly; the order of painting decides what lies on top.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from node.phantom.canvas import Canvas, Region

# Truth label values (the label volume's voxel values).
BACKGROUND, TABLE, SOFT_TISSUE, FAT, LUNG_LEFT, LUNG_RIGHT, AIRWAY, HEART_WALL, HEART_BLOOD, AORTA, LIVER, \
    CORTICAL_BONE, CANCELLOUS_BONE, NODULE_SOLID, NODULE_GGO, MARKER, VEIN, EFFUSION, BOWEL_GAS, \
    PULMONARY_VESSEL = range(20)


@dataclass(frozen=True)
class LabelDef:
    value: int
    name: str
    hu: float | None  # intended HU without contrast (None: set per object, e.g. markers)
    hu_contrast: float | None
    patient: bool  # part of the patient (the table and markers are not)
    side: str | None
    description: str


CT_LABELS: tuple[LabelDef, ...] = (
    LabelDef(BACKGROUND, "background", -1000, -1000, False, None, "air outside the body"),
    LabelDef(TABLE, "table", 400, 400, False, None, "patient table: curved plate under the body, not patient"),
    LabelDef(SOFT_TISSUE, "soft_tissue", 40, 40, True, None, "body soft tissue: muscle, mediastinum, abdomen, arms"),
    LabelDef(FAT, "subcutaneous_fat", -100, -100, True, None, "subcutaneous fat layer of the trunk and arms"),
    LabelDef(LUNG_LEFT, "lung_left", -850, -850, True, "left", "left lung (patient left = +x in LPS)"),
    LabelDef(LUNG_RIGHT, "lung_right", -850, -850, True, "right", "right lung (patient right = -x in LPS)"),
    LabelDef(AIRWAY, "airway", -1000, -1000, True, None, "trachea, main and lobar bronchi (air lumen)"),
    LabelDef(HEART_WALL, "heart_wall", 40, 120, True, None, "myocardium (heart = heart_wall + heart_blood)"),
    LabelDef(HEART_BLOOD, "heart_blood", 40, 300, True, None, "ventricular blood pools"),
    LabelDef(AORTA, "aorta", 40, 300, True, None, "aortic lumen: ascending, arch, descending"),
    LabelDef(LIVER, "liver", 60, 110, True, None, "liver under the right hemidiaphragm"),
    LabelDef(CORTICAL_BONE, "cortical_bone", 850, 850, True, None, "cortical bone of spine, ribs, sternum, humeri"),
    LabelDef(CANCELLOUS_BONE, "cancellous_bone", 300, 300, True, None, "cancellous bone / marrow"),
    LabelDef(NODULE_SOLID, "nodule_solid", 40, 40, True, None, "solid lung nodules (see nodules.json)"),
    LabelDef(NODULE_GGO, "nodule_ground_glass", -500, -500, True, None, "ground-glass lung nodules"),
    LabelDef(MARKER, "marker", None, None, False, None, "test markers: bright spheres at requested positions"),
    LabelDef(VEIN, "vein", None, None, True, None, "subclavian, brachiocephalic vein and superior vena cava, "
             "drawn only with an arm injection: undiluted contrast, HU in the manifest's findings"),
    LabelDef(EFFUSION, "effusion", 12, 12, True, None, "free pleural effusion: fluid layering along the posterior "
             "chest wall of one pleural space, where that lung would otherwise be (not lung)"),
    LabelDef(BOWEL_GAS, "bowel_gas", -1000, -1000, True, None, "gas in the splenic flexure of the colon, "
             "under the left hemidiaphragm and within 2 mm of the left lung base (not lung)"),
    LabelDef(PULMONARY_VESSEL, "pulmonary_vessel", 40, 300, True, None, "pulmonary vessel tree inside the lungs, "
             "drawn only with the vessels option: branching tubes whose branch points look like small blobs"),
)

CT_GROUPS: dict[str, list[int]] = {
    "lungs": [LUNG_LEFT, LUNG_RIGHT],
    "heart": [HEART_WALL, HEART_BLOOD],
    "bone": [CORTICAL_BONE, CANCELLOUS_BONE],
    "nodules": [NODULE_SOLID, NODULE_GGO],
    "patient": [d.value for d in CT_LABELS if d.patient],
}

# A part-solid nodule is a ground-glass ball (its HU and label here) around a solid core
# (PART_SOLID_CORE times its diameter, NODULE_HU["solid"], label NODULE_SOLID).
NODULE_HU = {"solid": 40.0, "ground_glass": -500.0, "part_solid": -500.0}
NODULE_LABEL = {"solid": NODULE_SOLID, "ground_glass": NODULE_GGO, "part_solid": NODULE_GGO}
PART_SOLID_CORE = 0.5
CONSOLIDATION_HU = 35.0
# Undiluted contrast from an arm injection: dense in the arm's veins, less so once blood mixes in the SVC.
INJECTION_HU = {"arm_veins": 1500.0, "svc": 900.0}
LUNG_TEXTURE_HU = 25.0  # amplitude of the smooth parenchymal texture


def ct_label_table(contrast: bool) -> dict:
    """The label table JSON: every label with its intended HU for this study, plus groups."""
    return {
        "coordinate_system": "DICOM LPS: +x = patient left, +y = posterior, +z = head",
        "contrast": contrast,
        "labels": [
            {
                "value": d.value,
                "name": d.name,
                "hu": d.hu_contrast if contrast else d.hu,
                "part_of_patient": d.patient,
                "side": d.side,
                "description": d.description,
            }
            for d in CT_LABELS
        ],
        "groups": CT_GROUPS,
        "left_lung": LUNG_LEFT,
        "right_lung": LUNG_RIGHT,
    }


class CodeBook:
    """Paint codes → (truth label, HU, texture amplitude).

    Codes 0..16 are the labels themselves; extra codes mark what the truth volume does not tell
    apart but the image does: each nodule, each marker, consolidated lung.
    """

    def __init__(self, contrast: bool) -> None:
        self.label: list[int] = []
        self.hu: list[float] = []
        self.texture: list[float] = []
        for d in CT_LABELS:
            hu = d.hu_contrast if contrast else d.hu
            self.add(d.value, -1000.0 if hu is None else float(hu),
                     LUNG_TEXTURE_HU if d.value in (LUNG_LEFT, LUNG_RIGHT) else 0.0)

    def add(self, label: int, hu: float, texture: float = 0.0) -> int:
        if len(self.label) >= 256:
            raise ValueError("too many distinct objects (nodules + markers) for one phantom: at most 230")
        self.label.append(label)
        self.hu.append(float(hu))
        self.texture.append(float(texture))
        return len(self.label) - 1

    def luts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lab = np.zeros(256, np.uint8)
        hu = np.full(256, -1000.0, np.float32)
        tex = np.zeros(256, np.float32)
        n = len(self.label)
        lab[:n], hu[:n], tex[:n] = self.label, self.hu, self.texture
        return lab, hu, tex


# --- profiles along z (anatomical mm) -----------------------------------------------------------
# Trunk outline (superellipse) and its centre; neck above the shoulders, a head above that.
_Z_BODY = [-400, -150, -100, -50, 0, 50, 100, 118, 135, 150, 190, 215, 300, 330]
_A_BODY = [152, 158, 160, 160, 160, 160, 158, 150, 85, 62, 62, 75, 75, 0]
_B_BODY = [112, 112, 113, 112, 110, 106, 100, 95, 72, 58, 58, 92, 92, 0]
_CY_BODY = [0, 0, 0, 0, 0, 0, 0, 0, 15, 20, 20, 5, 5, 5]
_P_BODY = [2.4, 2.4, 2.4, 2.4, 2.4, 2.4, 2.4, 2.4, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
# Thoracic cavity that the lungs fill (ribs run just outside it).
_Z_CAGE = [-140, -100, -50, 0, 50, 90, 110, 122, 130]
_A_CAGE = [126, 131, 131, 131, 128, 116, 96, 70, 40]
_B_CAGE = [84, 85, 86, 86, 84, 76, 62, 45, 25]
_Y_CAGE = [0, 0, 0, 0, 2, 5, 8, 12, 15]
_P_CAGE = [2.4, 2.4, 2.4, 2.4, 2.4, 2.2, 2.0, 2.0, 2.0]
LUNG_APEX_Z = 130.0
MEDIASTINUM_HALF_WIDTH = 22.0
DOME_TOP = {"right": -55.0, "left": -70.0}
_DOME_DEPTH = 70.0


def body_outline(z: float) -> tuple[float, float, float, float]:
    """(half width, half depth, centre y, superellipse power) of the skin at height z."""
    return (float(np.interp(z, _Z_BODY, _A_BODY)), float(np.interp(z, _Z_BODY, _B_BODY)),
            float(np.interp(z, _Z_BODY, _CY_BODY)), float(np.interp(z, _Z_BODY, _P_BODY)))


def cage_outline(z: float) -> tuple[float, float, float, float]:
    return (float(np.interp(z, _Z_CAGE, _A_CAGE)), float(np.interp(z, _Z_CAGE, _B_CAGE)),
            float(np.interp(z, _Z_CAGE, _Y_CAGE)), float(np.interp(z, _Z_CAGE, _P_CAGE)))


def spine_offset(z: float) -> float:
    """The spine and trachea come forward in the neck."""
    return float(np.interp(z, [110, 140], [0.0, -25.0]))


def dome(side: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height of the lung base (diaphragm) under the ``side`` lung; lower toward the recesses."""
    s = 1.0 if side == "left" else -1.0
    r2 = ((x - s * 80.0) / 55.0) ** 2 + (y / 80.0) ** 2
    return DOME_TOP[side] - _DOME_DEPTH * r2


def effusion_depth(side: str, z: float) -> float:
    """Thickness (mm) of a free pleural effusion at the posterior chest wall at height ``z``: supine,
    the fluid fills the posterior costophrenic recess and thins out up the back of the chest."""
    top = DOME_TOP[side]
    return float(np.interp(z, [top - 80.0, top - 20.0, top + 70.0], [70.0, 32.0, 0.0]))


def effusion_region(side: str) -> dict:
    return {"side": side, "depth_mm_at_z": [[DOME_TOP[side] + dz, effusion_depth(side, DOME_TOP[side] + dz)]
                                            for dz in (-80.0, -20.0, 70.0)],
            "note": "pleural space voxels posterior to the cage outline moved forward by the depth"}


# Splenic flexure of the colon under the left hemidiaphragm: (x, y) of its centre line, lumen radius,
# and how far (mm, along z) its gas stays under the lung base: a diaphragm thinner than a voxel.
_FLEXURE_XY = ((52.0, -38.0), (80.0, -12.0), (104.0, 14.0))
FLEXURE_RADIUS, FLEXURE_GAP_MM = 14.0, 1.5


def flexure_capsules() -> list[tuple[np.ndarray, np.ndarray, float]]:
    """The gas lumen as capsules along the dome, pressed up against it (clipped by ``FLEXURE_GAP_MM``)."""
    pts = [(x, y, float(dome("left", np.float64(x), np.float64(y))) - 0.5 * FLEXURE_RADIUS) for x, y in _FLEXURE_XY]
    return _polyline(pts, FLEXURE_RADIUS)


def consolidation_region(side: str) -> dict:
    """The dependent lower part of one lung that the consolidation option makes dense."""
    return {"side": side, "z_below_mm": DOME_TOP[side] + 50.0, "y_above_mm": 10.0}


def _polyline(points, radius: float) -> list[tuple[np.ndarray, np.ndarray, float]]:
    pts = [np.asarray(p, dtype=float) for p in points]
    return [(pts[i], pts[i + 1], radius) for i in range(len(pts) - 1)]


_AIRWAY = (
    _polyline([(0, -20, 190), (0, -20, 140), (0, 0, 100), (0, 2, 40)], 9.0)
    + _polyline([(0, 2, 40), (-30, 10, 22), (-55, 14, 8)], 7.0)
    + _polyline([(0, 2, 40), (35, 10, 20), (58, 16, 2)], 6.0)
    + _polyline([(-55, 14, 8), (-75, 0, 40)], 4.0)
    + _polyline([(-55, 14, 8), (-80, 25, -30)], 5.0)
    + _polyline([(-55, 14, 8), (-75, -30, -10)], 4.0)
    + _polyline([(58, 16, 2), (80, 0, 35)], 4.0)
    + _polyline([(58, 16, 2), (80, 28, -35)], 4.5)
)
_AORTA = (
    _polyline([(-12, -30, 0), (-12, -32, 55)], 14.0)
    + _polyline([(-12, -32, 55), (-4, -28, 74), (16, -18, 84), (26, 2, 80), (34, 14, 66)], 12.0)
    + _polyline([(34, 14, 66), (34, 18, -60), (22, 10, -140), (10, 5, -400)], 12.0)
)
HEART_CENTER = (20.0, -28.0, -30.0)
_HEART_SEMI = (60.0, 50.0, 50.0)
_HEART_WALL = 10.0
_SEPTUM = np.array([0.8, 0.6])  # normal of the interventricular septum in the axial plane

# The veins an arm injection fills, per arm: subclavian and brachiocephalic vein, then the superior
# vena cava, anterior to the ascending aorta, down to the heart; (a, b, radius) in the anatomical frame.
_SVC = ((np.array([-12.0, -55.0, 100.0]), np.array([-12.0, -55.0, 5.0]), 8.0),)


def injected_veins(side: str) -> tuple[tuple, tuple]:
    """(arm veins, SVC) capsules filled by an injection into the ``side`` arm."""
    s = 1.0 if side == "left" else -1.0
    arm = ((np.array([s * 125.0, -15.0, 122.0]), np.array([s * 40.0, -45.0, 112.0]), 6.0),
           (np.array([s * 40.0, -45.0, 112.0]), np.array([-12.0, -55.0, 100.0]), 7.0))
    return arm, _SVC


_RIB_R, _RIB_CORE = 5.0, 3.2
_VERT_PERIOD, _VERT_BODY = 30.0, 24.0


def _rib_segments() -> tuple[np.ndarray, np.ndarray]:
    """Twelve pairs of ribs: from the transverse process around the cage, sloping down anteriorly."""
    ends = [-72] * 7 + [-50] * 3 + [-10, 20]
    drops = [25, 35, 45, 50, 55, 55, 55, 50, 45, 40, 25, 15]
    a_list, b_list = [], []
    for i in range(12):
        z0 = 112.0 - 20.0 * i
        for s in (-1.0, 1.0):
            pts = [(s * 30.0, 68.0 + spine_offset(z0), z0)]
            for phi in np.linspace(72.0, ends[i], 9):
                z = z0 - drops[i] * (72.0 - phi) / (72.0 - ends[i])
                a, b, yc, p = cage_outline(z)
                c, sn = np.cos(np.radians(phi)), np.sin(np.radians(phi))
                x = (a + 7.0) * abs(c) ** (2.0 / p)
                y = yc + np.sign(sn) * (b + 7.0) * abs(sn) ** (2.0 / p)
                pts.append((s * x, y, z))
            for p0, p1 in zip(pts[:-1], pts[1:]):
                a_list.append(p0)
                b_list.append(p1)
    return np.asarray(a_list), np.asarray(b_list)


_RIB_A, _RIB_B = _rib_segments()
_RIB_ZLO = np.minimum(_RIB_A[:, 2], _RIB_B[:, 2]) - _RIB_R
_RIB_ZHI = np.maximum(_RIB_A[:, 2], _RIB_B[:, 2]) + _RIB_R


def _arms(position: str) -> tuple[list, list]:
    """(soft-tissue capsules, humerus capsules) per side: (a, b, fat radius, tissue radius) and (a, b)."""
    soft, bone = [], []
    for s in (-1.0, 1.0):
        if position == "down":  # hanging beside the chest, just touching it
            soft.append((np.array([s * 206, 8, -450.0]), np.array([s * 196, 8, 116.0]), 42.0, 35.0))
            bone.append((np.array([s * 204, 12, -300.0]), np.array([s * 188, 12, 110.0])))
        else:  # raised beside the head: present only above the shoulders
            soft.append((np.array([s * 140, 10, 112.0]), np.array([s * 110, 0, 450.0]), 38.0, 31.0))
            bone.append((np.array([s * 140, 12, 118.0]), np.array([s * 112, 4, 420.0])))
    return soft, bone


@dataclass
class Sphere:
    center: tuple[float, float, float]  # anatomical frame
    radius: float
    code: int


@dataclass
class ChestAnatomy:
    """What varies between chest phantoms; everything else is the fixed anatomy above."""

    arms: str = "up"
    consolidation: str | None = None  # "left" | "right"
    consolidation_code: int = 0
    injection: str | None = None  # "left" | "right": the arm contrast was injected into
    injection_codes: tuple[int, int] = (0, 0)  # (arm veins, SVC)
    effusion: str | None = None  # "left" | "right": free pleural fluid in that pleural space
    bowel_gas: bool = False  # gas in the splenic flexure touching the left lung base
    spheres: list[Sphere] = field(default_factory=list)  # nodules and markers, painted last
    vessel_code: int = 0  # > 0: paint the pulmonary vessel tree (vessel_tree()) with this code


_OVER_AIR_OR_FAT = np.zeros(256, bool)
_OVER_AIR_OR_FAT[[BACKGROUND, FAT]] = True
_OVER_AIR = np.zeros(256, bool)
_OVER_AIR[BACKGROUND] = True
_OVER_SOFT = np.zeros(256, bool)  # veins run through soft tissue and fat, never through lung or bone
_OVER_SOFT[[SOFT_TISSUE, FAT]] = True


_IN_LUNG = np.zeros(256, bool)  # vessels run inside the lungs only
_IN_LUNG[[LUNG_LEFT, LUNG_RIGHT]] = True


def _branches(start: np.ndarray, direction: np.ndarray, length: float, radius: float, depth: int,
              spread: np.ndarray, out: list) -> None:
    end = start + direction * length
    out.append((start, end, radius))
    if depth == 0:
        return
    for sign in (-1.0, 1.0):  # two children, turned 35 degrees either way about ``spread``
        turned = np.cos(0.61) * direction + sign * np.sin(0.61) * spread
        turned /= np.linalg.norm(turned)
        _branches(end, turned, 0.75 * length, 0.72 * radius, depth - 1, np.cross(turned, spread), out)


@lru_cache(maxsize=1)
def vessel_tree() -> tuple[tuple[np.ndarray, np.ndarray, float], ...]:
    """Pulmonary vessels: from each hilum, four trunks (up, down, front, back) branching three times
    (radius 2.5 mm down to 0.9 mm). Where two branches leave a trunk's end the capsules' union is
    a bulb: a vessel branch point that a blob detector must not take for a nodule."""
    out: list = []
    for hilum, s in (((-50.0, 10.0, 5.0), -1.0), ((52.0, 12.0, 0.0), 1.0)):
        h = np.array(hilum)
        for d in ((0.3 * s, 0.0, 1.0), (0.4 * s, 0.1, -1.0), (0.8 * s, -0.6, 0.1), (0.8 * s, 0.6, -0.1)):
            u = np.array(d) / np.linalg.norm(d)
            spread = np.cross(u, (0.0, 0.0, 1.0)) if abs(u[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
            _branches(h, u, 30.0, 2.5, 3, spread / np.linalg.norm(spread), out)
    return tuple(out)


def _expand(inner: Region, outer: Region) -> np.ndarray:
    """``inner``'s mask on ``outer``'s box (``inner``'s box lies within ``outer``'s)."""
    out = np.zeros_like(outer.mask)
    out[inner.rows.start - outer.rows.start:inner.rows.stop - outer.rows.start,
        inner.cols.start - outer.cols.start:inner.cols.stop - outer.cols.start] = inner.mask
    return out


class ChestPainter:
    """Paints the anatomy on one canvas, slice by slice (maps that depend only on x, y are cached)."""

    def __init__(self, anatomy: ChestAnatomy, canvas: Canvas) -> None:
        self.anat = anatomy
        self.cv = canvas
        X, Y = canvas.xs[None, :], canvas.ys[:, None]
        self.dome = {side: dome(side, X, Y).astype(np.float32) for side in ("left", "right")}
        self.liver_top = (np.maximum(self.dome["right"], -85.0) - 4.0).astype(np.float32)
        self.arm_soft, self.arm_bone = _arms(anatomy.arms)

    def paint(self, z: float, into: np.ndarray | None = None, clear: bool = True) -> np.ndarray:
        codes = self.cv.start(z, into, clear)
        self._body(z)
        self._arms()
        self._liver(z)
        self._lungs(z)
        if self.anat.bowel_gas:
            self._flexure(z)
        self._heart()
        for a, b, r in _AORTA:
            self.cv.paint(AORTA, self.cv.capsule(a, b, r))
        for a, b, r in _AIRWAY:
            self.cv.paint(AIRWAY, self.cv.capsule(a, b, r))
        if self.anat.injection:
            for capsules, code in zip(injected_veins(self.anat.injection), self.anat.injection_codes):
                for a, b, r in capsules:
                    self.cv.paint(code, self.cv.capsule(a, b, r), over=_OVER_SOFT)
        self._sternum(z)
        self._spine(z)
        self._ribs(z)
        if self.anat.vessel_code:
            for a, b, r in vessel_tree():
                self.cv.paint(self.anat.vessel_code, self.cv.capsule(a, b, r), over=_IN_LUNG)
        for sp in self.anat.spheres:
            self.cv.paint(sp.code, self.cv.sphere(sp.center, sp.radius))
        return codes

    def _body(self, z: float) -> None:
        a, b, cy, p = body_outline(z)
        if a <= 0:
            return
        self.cv.paint(FAT, self.cv.ellipse(0.0, cy, a, b, p))
        fat_x, fat_y = max(4.0, 0.1 * a), max(4.0, 0.115 * b)
        self.cv.paint(SOFT_TISSUE, self.cv.ellipse(0.0, cy, a - fat_x, b - fat_y, p))

    def _arms(self) -> None:
        for a, b, r_fat, r_soft in self.arm_soft:
            hit = self.cv.capsule_d2(a, b, r_fat)
            if hit is None:
                continue
            rows, cols, d2 = hit
            self.cv.paint(FAT, Region(rows, cols, d2 <= r_fat * r_fat), over=_OVER_AIR)
            self.cv.paint(SOFT_TISSUE, Region(rows, cols, d2 <= r_soft * r_soft), over=_OVER_AIR_OR_FAT)
        for a, b in self.arm_bone:
            self.cv.paint_shell(CORTICAL_BONE, CANCELLOUS_BONE, self.cv.capsule_d2(a, b, 11.0), 11.0, 7.5)

    def _liver(self, z: float) -> None:
        if z > -55.0:
            return
        reg = self.cv.ellipse(-50.0, -5.0, 90.0, 78.0)
        if reg is not None:
            reg.mask &= self.liver_top[reg.rows, reg.cols] > z
            self.cv.paint(LIVER, reg)

    def _lungs(self, z: float) -> None:
        if z >= LUNG_APEX_Z:
            return
        a, b, yc, p = cage_outline(z)
        reg = self.cv.ellipse(0.0, yc, a, b, p)
        if reg is None:
            return
        xs, ys = self.cv.xs[reg.cols], self.cv.ys[reg.rows]
        off = spine_offset(z)
        # Spine, paraspinal muscles and posterior mediastinum keep the lungs off the midline at the back.
        paraspinal = ((ys - 75.0 - off) / 35.0)[:, None] ** 2 + (xs / 45.0)[None, :] ** 2 <= 1.0
        cavity = reg.mask & ~paraspinal
        for side, code, sign in (("left", LUNG_LEFT, 1.0), ("right", LUNG_RIGHT, -1.0)):
            m = cavity & (sign * xs >= MEDIASTINUM_HALF_WIDTH)[None, :]
            if z < DOME_TOP[side]:
                m &= self.dome[side][reg.rows, reg.cols] < z
            self.cv.paint(code, Region(reg.rows, reg.cols, m))
            if self.anat.consolidation == side:
                box = consolidation_region(side)
                if z < box["z_below_mm"]:
                    cons = m & (ys > box["y_above_mm"])[:, None]
                    self.cv.paint(self.anat.consolidation_code, Region(reg.rows, reg.cols, cons))
            if self.anat.effusion == side:
                # The lung floats on the fluid: what lies behind the cage outline moved forward by the
                # depth is fluid, a crescent thickest at the back and thinning out to the sides.
                t = effusion_depth(side, z)
                if t > 0:
                    kept = self.cv.ellipse(0.0, yc - t / 2, a, b - t / 2, p)
                    fluid = m & (ys > yc)[:, None]
                    if kept is not None:
                        fluid &= ~_expand(kept, reg)
                    self.cv.paint(EFFUSION, Region(reg.rows, reg.cols, fluid))

    def _flexure(self, z: float) -> None:
        for a, b, r in flexure_capsules():
            reg = self.cv.capsule(a, b, r)
            if reg is not None:
                reg.mask &= self.dome["left"][reg.rows, reg.cols] - FLEXURE_GAP_MM > z
                self.cv.paint(BOWEL_GAS, reg, over=_OVER_SOFT)

    def _heart(self) -> None:
        self.cv.paint(HEART_WALL, self.cv.ellipsoid(HEART_CENTER, _HEART_SEMI))
        inner = tuple(s - _HEART_WALL for s in _HEART_SEMI)
        reg = self.cv.ellipsoid(HEART_CENTER, inner)
        if reg is not None:
            proj = ((self.cv.ys[reg.rows] - HEART_CENTER[1]) * _SEPTUM[1])[:, None] \
                + ((self.cv.xs[reg.cols] - HEART_CENTER[0]) * _SEPTUM[0])[None, :]
            reg.mask &= np.abs(proj) > 4.0
            self.cv.paint(HEART_BLOOD, reg)

    def _sternum(self, z: float) -> None:
        if not -75.0 <= z <= 105.0:
            return
        a, b, cy, p = body_outline(z)
        y = cy - (b - 0.115 * b) + 8.0
        self.cv.paint(CORTICAL_BONE, self.cv.ellipse(0.0, y, 14.0, 6.0))
        self.cv.paint(CANCELLOUS_BONE, self.cv.ellipse(0.0, y, 11.0, 3.5))

    def _spine(self, z: float) -> None:
        if z > 200.0:
            return
        off = spine_offset(z)
        phase = (z - 7.0) % _VERT_PERIOD
        if phase < _VERT_BODY:
            self.cv.paint(CORTICAL_BONE, self.cv.ellipse(0.0, 38.0 + off, 21.0, 16.0))
            self.cv.paint(CANCELLOUS_BONE, self.cv.ellipse(0.0, 38.0 + off, 18.5, 13.5))
        else:  # intervertebral disc
            self.cv.paint(SOFT_TISSUE, self.cv.ellipse(0.0, 38.0 + off, 21.0, 16.0))
        if 3.0 <= phase <= 21.0:  # pedicles, transverse processes, laminae, spinous process
            for x0, y0, x1, y1, r in ((14, 48, 14, 60, 4.5), (14, 60, 30, 68, 4.0), (14, 66, 0, 76, 4.0)):
                for s in (-1.0, 1.0):
                    hit = self.cv.capsule_d2((s * x0, y0 + off, z), (s * x1, y1 + off, z), r)
                    self.cv.paint_shell(CORTICAL_BONE, CANCELLOUS_BONE, hit, r, r - 1.5)
            hit = self.cv.capsule_d2((0.0, 76.0 + off, z), (0.0, 90.0 + off, z), 4.0)
            self.cv.paint_shell(CORTICAL_BONE, CANCELLOUS_BONE, hit, 4.0, 2.5)
        self.cv.paint(SOFT_TISSUE, self.cv.ellipse(0.0, 62.0 + off, 9.0, 9.0))  # spinal canal

    def _ribs(self, z: float) -> None:
        for i in np.nonzero((_RIB_ZLO <= z) & (_RIB_ZHI >= z))[0]:
            hit = self.cv.capsule_d2(_RIB_A[i], _RIB_B[i], _RIB_R)
            self.cv.paint_shell(CORTICAL_BONE, CANCELLOUS_BONE, hit, _RIB_R, _RIB_CORE)
