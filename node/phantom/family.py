"""A randomised family of chest CT phantoms: the anatomy itself is drawn from the seed.

``generate_ct`` paints one fixed anatomy with optional findings; a method tuned on it can still
fail on a chest shaped otherwise. A family case draws its anatomy: body habitus from child to
obese (size, fat), lung size and density, lungs that touch at the anterior or posterior junction
line (a pleura thinner than a pixel), flat or domed lung bases, an absent, thin or normal airway,
no table / a table touching the back, arms beside the chest (touching it or not), low-dose noise,
5 mm slices, and partial coverage (the lung apex or base cut off). The shapes are simple and made
independently of ``chest.py`` (superellipses, an ellipsoid heart, ring ribs, an elliptical
vertebra), so what passes here was not tuned to one painter.

The truth uses the same label values and table as ``generate_ct`` (``labels.json``), and the
manifest's ``family`` holds every drawn parameter, so a test or a report can say which anatomy a
result failed on. Same seed and sizes, same files.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from node.phantom.checks import int_in
from node.phantom.chest import (
    AIRWAY,
    AORTA,
    BACKGROUND,
    CANCELLOUS_BONE,
    CORTICAL_BONE,
    FAT,
    HEART_BLOOD,
    HEART_WALL,
    LUNG_LEFT,
    LUNG_RIGHT,
    SOFT_TISSUE,
    TABLE,
    ct_label_table,
)
from node.phantom.ct import CT_IMAGE_STORAGE, CTOptions, ct_acquisition
from node.phantom.ct_pixels import HU_MIN, Signal, stored_values
from node.phantom.dicom_io import InstanceWriter, SeriesInfo, StudyInfo, series_template, set_pixel_format
from node.phantom.grid import Pose, axial_geometry
from node.phantom.study import MANIFEST, PhantomStudy, geometry_json, prepare_out_dir, write_json, write_labels
from node.uids import derived_uid

GENERATOR = "hilum phantom family"
HABITUS = ("child", "slim", "average", "obese")
COVERAGE = ("full", "apex_cut", "base_cut")
SUB_SAMPLE_MM = 1.5  # thick slices average painted samples at most this far apart along z
DOME_REACH = 1.5  # the dome falls by at most this times its depth, in the recesses


@dataclass(frozen=True)
class FamilyAnatomy:
    """Every drawn parameter of one case (mm, HU; anatomical frame: x patient left, y posterior, z head)."""

    habitus: str
    body_half_width: float
    body_half_depth: float
    fat_mm: float
    lung_scale: float  # lateral size of the lungs relative to the chest cavity
    lung_height: float  # apex to the top of the higher dome
    lung_hu: float
    junction: str  # "none" | "anterior" | "posterior" | "both": lungs touching at that junction line
    base: str  # "flat" | "domed"
    dome_depth: float  # mm the base falls from its top to the recesses (0: flat)
    right_base_higher_mm: float
    airway: str  # "absent" | "thin" | "normal"
    trachea_radius: float
    table: str  # "none" | "gap" | "touching"
    table_hu: float
    arms: str  # "none" | "beside" | "touching"
    noise_hu: float
    slice_thickness: float
    coverage: str  # "full" | "apex_cut" | "base_cut"
    z_top: float  # anatomical z of the first and last slice centres
    z_bottom: float
    pixel_spacing: float

    def to_json(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def draw_anatomy(seed: int, rows: int, slices: int) -> FamilyAnatomy:
    """The anatomy and acquisition of case ``seed``; every case draws the same number of values,
    so cases are independent of each other and of the sizes asked for."""
    rng = np.random.default_rng([seed, 16])
    u = rng.uniform(size=24)
    habitus = HABITUS[int(u[0] * len(HABITUS))]
    size = {"child": (0.55, 0.7), "slim": (0.85, 0.95), "average": (0.95, 1.05), "obese": (1.05, 1.2)}[habitus]
    s = size[0] + (size[1] - size[0]) * u[1]
    fat = {"child": (4, 8), "slim": (4, 10), "average": (8, 20), "obese": (30, 60)}[habitus]
    fat_mm = fat[0] + (fat[1] - fat[0]) * u[2]
    half_width = 135.0 * s + fat_mm
    half_depth = (95.0 + 15.0 * u[3]) * s + 0.8 * fat_mm
    lung_height = (230.0 + 50.0 * u[4]) * (0.7 if habitus == "child" else 1.0) * (0.9 + 0.1 * s)
    junction = ("none", "anterior", "posterior", "both")[int(u[5] * 4)]
    base = "flat" if u[6] < 0.4 else "domed"
    dome_depth = 0.0 if base == "flat" else 35.0 + 50.0 * u[7]
    airway = "absent" if u[8] < 0.2 else ("thin" if u[8] < 0.45 else "normal")
    trachea = {"absent": 0.0, "thin": 3.5 + 1.0 * u[9], "normal": 7.0 + 3.0 * u[9]}[airway] * min(1.0, s)
    table = ("none", "gap", "touching")[int(u[10] * 3)]
    arms = ("none", "beside", "touching")[int(u[11] * 3)]
    thick = u[12] < 0.3
    coverage = "full" if u[13] < 0.6 else ("apex_cut" if u[13] < 0.8 else "base_cut")
    noise = 10.0 + 15.0 * u[14] if u[15] > 0.3 else 45.0 + 25.0 * u[14]  # low dose: 45-70 HU
    apex = 0.6 * lung_height
    lowest_base = apex - lung_height - DOME_REACH * dome_depth
    top, bottom = apex + 15.0, lowest_base - 15.0
    if coverage == "apex_cut":
        top = apex - lung_height * (0.15 + 0.15 * u[16])
    elif coverage == "base_cut":
        bottom = apex - lung_height * (0.75 + 0.15 * u[16])
    thickness = 5.0 if thick else round((top - bottom) / max(slices - 1, 1), 2)
    if thick:  # 5 mm slices over the same range: fewer of them
        top = bottom + 5.0 * min(slices - 1, math.floor((top - bottom) / 5.0))
    else:
        top = bottom + thickness * (slices - 1)
    arm_room = 2 * 45.0 * s if arms != "none" else 0.0
    fov = 2 * (half_width + arm_room) + 30.0
    return FamilyAnatomy(
        habitus=habitus, body_half_width=half_width, body_half_depth=half_depth, fat_mm=fat_mm,
        lung_scale=0.85 + 0.15 * u[17], lung_height=lung_height, lung_hu=-900.0 + 180.0 * u[18],
        junction=junction, base=base, dome_depth=dome_depth, right_base_higher_mm=20.0 * u[19], airway=airway,
        trachea_radius=trachea, table=table, table_hu=100.0 + 300.0 * u[20], arms=arms, noise_hu=noise,
        slice_thickness=thickness, coverage=coverage, z_top=top, z_bottom=bottom,
        pixel_spacing=round(fov / rows, 4),
    )


def _superellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, p: float) -> np.ndarray:
    if a <= 0 or b <= 0:
        return np.zeros(np.broadcast_shapes(x.shape, y.shape), bool)
    return np.abs((x - cx) / a) ** p + np.abs((y - cy) / b) ** p <= 1.0


class FamilyPainter:
    """Truth labels of one axial sample at anatomical height z on the grid (xs, ys)."""

    def __init__(self, anat: FamilyAnatomy, xs: np.ndarray, ys: np.ndarray) -> None:
        self.a = anat
        self.x, self.y = xs[None, :], ys[:, None]
        self.apex = 0.6 * anat.lung_height
        self.base_top = {"left": self.apex - anat.lung_height,
                         "right": self.apex - anat.lung_height + anat.right_base_higher_mm}
        inner_w = anat.body_half_width - anat.fat_mm
        inner_d = anat.body_half_depth - 0.8 * anat.fat_mm
        self.cage = (inner_w - 16.0, inner_d - 14.0)  # muscle and ribs around the thoracic cavity
        self.phi = np.arctan2(self.y, self.x)
        self.table_y = anat.body_half_depth + (0.0 if anat.table == "touching" else 6.0)

    def base(self, side: str) -> np.ndarray:
        sign = 1.0 if side == "left" else -1.0
        cw, cd = self.cage
        r2 = ((self.x - sign * 0.5 * cw) / (0.6 * cw)) ** 2 + (self.y / cd) ** 2
        return self.base_top[side] - self.a.dome_depth * np.minimum(r2, DOME_REACH)

    def paint(self, z: float) -> np.ndarray:
        a, x, y = self.a, self.x, self.y
        out = np.zeros(np.broadcast_shapes(x.shape, y.shape), np.uint8)
        hw, hd = a.body_half_width, a.body_half_depth
        neck = float(np.clip((z - self.apex + 10.0) / 60.0, 0.0, 1.0))  # the trunk narrows to the neck
        bw, bd = hw * (1 - 0.55 * neck), hd * (1 - 0.3 * neck)
        out[_superellipse(x, y, 0.0, 0.0, bw, bd, 2.3)] = FAT
        out[_superellipse(x, y, 0.0, 0.0, bw - a.fat_mm, bd - 0.8 * a.fat_mm, 2.3)] = SOFT_TISSUE
        if a.arms != "none" and neck < 1.0:
            r = 38.0 * min(1.0, bw / 150.0) + 0.3 * a.fat_mm
            cx = bw + r + (1.0 if a.arms == "touching" else 12.0) - (2.0 if a.arms == "touching" else 0.0)
            for sign in (-1.0, 1.0):
                arm = (x - sign * cx) ** 2 + (y - 5.0) ** 2
                out[arm <= r * r] = FAT
                out[arm <= (r - 0.3 * a.fat_mm - 3.0) ** 2] = SOFT_TISSUE
                out[arm <= 11.0 ** 2] = CORTICAL_BONE
                out[arm <= 7.0 ** 2] = CANCELLOUS_BONE
        self._lungs(z, out)
        self._mediastinum(z, out)
        self._bones(z, out)
        if a.table != "none":
            top = self.table_y + 0.002 * x * x  # a shallow curved plate
            out[(y >= top) & (y <= top + 9.0) & (np.abs(x) <= 1.25 * hw) & (out == BACKGROUND)] = TABLE
        return out

    def _lungs(self, z: float, out: np.ndarray) -> None:
        a, x, y = self.a, self.x, self.y
        if z >= self.apex:
            return
        t = (self.apex - z) / a.lung_height  # 0 at the apex, 1 at the higher dome's top
        taper = min(1.0, 0.2 + 0.8 * math.sqrt(min(t / 0.35, 1.0)))
        cw, cd = self.cage
        cavity = _superellipse(x, y, 0.0, 5.0 * (1 - taper), cw * a.lung_scale * taper, cd * taper, 2.2)
        # Mediastinal half-width by depth: anterior (y < -25), middle, posterior (y > 25, before the spine).
        ant = 0.4 if a.junction in ("anterior", "both") else 14.0
        post = 0.4 if a.junction in ("posterior", "both") else 12.0
        half = np.where(y < -25.0, ant, np.where(y > 25.0, post, 20.0 + 0.05 * cw))
        spine = ((y - cd + 10.0) / 38.0) ** 2 + (x / 30.0) ** 2 <= 1.0
        for side, code, sign in (("left", LUNG_LEFT, 1.0), ("right", LUNG_RIGHT, -1.0)):
            m = cavity & (sign * x >= half) & ~spine & (self.base(side) < z)
            out[m] = code

    def _mediastinum(self, z: float, out: np.ndarray) -> None:
        a, x, y = self.a, self.x, self.y
        cw, cd = self.cage
        low = min(self.base_top.values())
        hz = (z - (low + 0.22 * a.lung_height)) / (0.22 * a.lung_height)  # the heart sits on the diaphragm
        if abs(hz) < 1.0:
            f = math.sqrt(1 - hz * hz)
            heart = ((x - 0.12 * cw) / (0.45 * cw * f)) ** 2 + ((y + 0.3 * cd) / (0.5 * cd * f)) ** 2
            out[heart <= 1.0] = HEART_WALL
            out[heart <= 0.6] = HEART_BLOOD
        if low < z < self.apex - 20.0:  # descending aorta, left of the spine
            out[(x - 0.15 * cw) ** 2 + (y - 0.45 * cd) ** 2 <= (0.1 * cw) ** 2] = AORTA
        if a.airway == "absent":
            return
        carina = self.apex - 0.35 * a.lung_height
        r = a.trachea_radius
        if z >= carina:
            out[x * x + (y + 0.1 * cd) ** 2 <= r * r] = AIRWAY
        elif z >= carina - 0.12 * a.lung_height:  # main bronchi run out and down to the hila
            d = (carina - z) / (0.12 * a.lung_height)
            for sign in (-1.0, 1.0):
                cx = sign * (r + d * 0.22 * cw)
                out[(x - cx) ** 2 + (y + 0.1 * cd) ** 2 <= (0.75 * r) ** 2] = AIRWAY

    def _bones(self, z: float, out: np.ndarray) -> None:
        a, x, y = self.a, self.x, self.y
        cw, cd = self.cage
        vy = cd + 8.0
        out[((x / 22.0) ** 2 + ((y - vy) / 17.0) ** 2 <= 1.0)] = CORTICAL_BONE
        out[((x / 18.0) ** 2 + ((y - vy) / 13.0) ** 2 <= 1.0)] = CANCELLOUS_BONE
        out[(x / 7.0) ** 2 + ((y - vy - 24.0) / 7.0) ** 2 <= 1.0] = SOFT_TISSUE  # spinal canal
        if self.apex - 1.1 * a.lung_height < z < self.apex + 10.0:
            # Ribs: rings just outside the cavity, sloping down toward the front (a helix-like phase).
            ring = np.abs((x / (cw + 6.0)) ** 2 + (y / (cd + 6.0)) ** 2 - 1.0) <= 0.07
            phase = (z + 25.0 * np.sin(self.phi)) % 28.0
            out[ring & (phase < 9.0) & (out != BACKGROUND)] = CORTICAL_BONE
            sternum = (x / 14.0) ** 2 + ((y + cd + 4.0) / 6.0) ** 2 <= 1.0
            out[sternum] = CORTICAL_BONE


def _hu_table(anat: FamilyAnatomy):
    """A CodeBook-like object for ``Signal``: codes are the truth labels themselves."""
    from node.phantom.chest import CodeBook

    book = CodeBook(contrast=False)
    book.hu[LUNG_LEFT] = book.hu[LUNG_RIGHT] = anat.lung_hu
    book.hu[TABLE] = anat.table_hu
    book.hu[CORTICAL_BONE] = 700.0
    return book


def generate_family_case(out_dir: str | Path, seed: int, *, rows: int = 128, slices: int = 48,
                         transfer_syntax: str = "explicit") -> PhantomStudy:
    """Write family case ``seed`` (anatomy drawn from the seed) with its truth to the new folder ``out_dir``.

    ``rows`` (= columns) and ``slices`` size the volume; the field of view follows the body, and the
    slice spacing the lung coverage (5 mm cases have fewer slices). The manifest's ``family`` holds
    the drawn anatomy (``FamilyAnatomy``).
    """
    seed = int_in("seed", seed, 0, 2**31 - 1)
    rows = int_in("rows", rows, 32, 1024)
    slices = int_in("slices", slices, 8, 1000)
    anat = draw_anatomy(seed, rows, slices)
    n = int(round((anat.z_top - anat.z_bottom) / anat.slice_thickness)) + 1
    opts = CTOptions(rows=rows, cols=rows, slices=n, pixel_spacing=anat.pixel_spacing,
                     slice_thickness=anat.slice_thickness, nodules=0, noise_hu=anat.noise_hu,
                     z_center_mm=(anat.z_top + anat.z_bottom) / 2, transfer_syntax=transfer_syntax)
    out = prepare_out_dir(out_dir)
    geom = axial_geometry(rows=rows, cols=rows, slices=n, pixel_spacing=anat.pixel_spacing,
                          slice_spacing=anat.slice_thickness, center_z=opts.z_center_mm)
    identity = ("hilum-phantom-family", seed, rows, slices, transfer_syntax)
    study_uid = derived_uid(*identity, "study")
    series_uid, frame_uid = derived_uid(*identity, "series"), derived_uid(*identity, "frame-of-reference")
    study = StudyInfo(patient_name="PHANTOM^FAMILY", patient_id=f"FAMILY-{seed:06d}", study_uid=study_uid,
                      study_date="20250301", study_time="101000",
                      accession="PF" + hashlib.sha256(study_uid.encode()).hexdigest()[:12].upper(),
                      study_id=str(1 + seed % 9999), description="CT CHEST")
    ds = series_template(study, SeriesInfo(
        modality="CT", sop_class_uid=CT_IMAGE_STORAGE, series_uid=series_uid, series_number=2,
        description=f"CHEST {anat.slice_thickness:g}mm", body_part="CHEST", frame_of_reference_uid=frame_uid,
        patient_position="HFS"))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ct_acquisition(ds, opts)
    ds.SliceThickness = ds.SpacingBetweenSlices = anat.slice_thickness
    ds.ReconstructionDiameter = round(anat.pixel_spacing * rows, 3)
    ds.ConvolutionKernel = "STANDARD"
    ds.PixelSpacing = [anat.pixel_spacing, anat.pixel_spacing]
    ds.ImageOrientationPatient = geom.image_orientation
    set_pixel_format(ds, rows, rows, bits_stored=12)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = HU_MIN, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = [40, -600], [400, 1500]
    ds.WindowCenterWidthExplanation = ["SOFT TISSUE", "LUNG"]
    writer = InstanceWriter(ds, out / "dicom", transfer_syntax)

    origin = np.asarray(geom.origin)
    xs = origin[0] + np.arange(rows) * anat.pixel_spacing
    ys = origin[1] + np.arange(rows) * anat.pixel_spacing
    painter = FamilyPainter(anat, xs, ys)
    n_sub = max(1, math.ceil(anat.slice_thickness / SUB_SAMPLE_MM - 1e-9))
    offsets = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * anat.slice_thickness
    signal = Signal(_hu_table(anat), rows, rows, anat.pixel_spacing, anat.noise_hu, True, (seed, 16, 1))
    labels = np.empty(geom.shape, np.uint8)
    names = []
    for k in range(n):
        z = geom.slice_position(k)[2]
        samples = np.stack([painter.paint(z + dz) for dz in offsets])
        labels[k] = painter.paint(z)
        pos = geom.slice_position(k)
        names.append(writer.write(stored_values(signal.hu(samples, k)), derived_uid(series_uid, "instance", k),
                                  InstanceNumber=n - k, ImagePositionPatient=[round(v, 4) for v in pos],
                                  SliceLocation=round(pos[2], 4)).name)
    write_labels(out / "labels.nii.gz", labels, geom)
    write_json(out / "labels.json", ct_label_table(False))
    write_json(out / "nodules.json", [])
    write_json(out / MANIFEST, {
        "generator": GENERATOR, "modality": "CT", "seed": seed,
        "options": opts.to_json(),
        "family": anat.to_json(),
        "patient": {"name": study.patient_name, "id": study.patient_id},
        "study_uid": study_uid, "study_date": study.study_date, "series_uid": series_uid,
        "frame_of_reference_uid": frame_uid, "localizer_series_uid": None, "followup_of": None,
        "geometry": geometry_json(geom),
        "pose": {"matrix": Pose().matrix(), "note": "anatomical frame → this study's patient coordinates: p = M a"},
        "anatomy_nodules": [], "markers": [], "findings": [],
        "table_top_y_mm": round(painter.table_y, 3) if anat.table != "none" else None,
        "series": {series_uid: names},
        "files": {"dicom": "dicom", "labels": "labels.nii.gz", "label_table": "labels.json",
                  "nodules": "nodules.json", "changes": None},
    })
    return PhantomStudy.open(out)
