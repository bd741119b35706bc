"""Chest CT phantom studies: a baseline (``generate_ct``) and its follow-up (``generate_followup``).

Pipeline: paint codes on the study's voxel grid (``grid.render_codes``), lay the table under the
lowest point of the patient, turn codes into HU (intended value, lung texture, averaging across a
thick slice, a slight edge blur, noise), write one DICOM file per slice, then the truth.
"""
from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from node.phantom.chest import (
    CONSOLIDATION_HU,
    BOWEL_GAS,
    CT_LABELS,
    EFFUSION,
    INJECTION_HU,
    LUNG_LEFT,
    LUNG_RIGHT,
    MARKER,
    NODULE_HU,
    VEIN,
    NODULE_LABEL,
    PULMONARY_VESSEL,
    ChestAnatomy,
    ChestPainter,
    CodeBook,
    Sphere,
    consolidation_region,
    effusion_region,
    ct_label_table,
)
from node.phantom.dicom_io import TRANSFER_SYNTAXES, InstanceWriter, SeriesInfo, StudyInfo, set_pixel_format, \
    series_template
from node.phantom.breathing import MODEL as BREATHING_MODEL, deform_codes, moved_to, padded
from node.phantom.checks import choice, fail, float_in, int_in, vector
from node.phantom.ct_pixels import HU_MAX, HU_MIN, Signal, lay_table, padding_bits, stored_values
from node.phantom.grid import Pose, axial_geometry, render_codes
from node.phantom.projection import resample, water_path
from node.phantom.nodules import (
    DIAMETER_RANGE_MM,
    NODULE_TYPES,
    Nodule,
    check_specified,
    evolve,
    lung_room,
    place_nodules,
    place_pleural,
    settle,
)
from node.phantom.study import MANIFEST, PhantomStudy, geometry_json, prepare_out_dir, write_json, write_labels
from node.uids import derived_uid
from node.volume import Geometry

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DEFAULT_NODULES = 3
LOCALIZER_SCALE = 8.0  # stored value per mm of water-equivalent path
PADDING_HU_RANGE = (-4000, -1025)  # below any reconstructed air, and storable in 13 bits with bone


@dataclass(frozen=True)
class CTOptions:
    """Everything that shapes a CT phantom besides the seed (validated on creation)."""

    rows: int = 512
    cols: int = 512
    slices: int = 300
    pixel_spacing: float = 0.7  # mm; ignored when fov_mm is given
    slice_thickness: float = 1.0  # mm, also the spacing between slices
    nodules: int | None = None  # random nodules (default 3; 0 when nodule_specs are given)
    nodule_specs: tuple | None = None  # [{"center_mm": [x, y, z], "diameter_mm": d, "type": "solid"}]
    nodule_diameter_mm: tuple[float, float] = (6.0, 20.0)
    ground_glass_fraction: float = 0.3
    part_solid_fraction: float = 0.0  # of the random nodules: ground glass around a solid core
    pleural_nodules: int = 0  # solid nodules touching the pleura (juxtapleural), besides the random ones
    vessels: bool = False  # a pulmonary vessel tree whose branch points look blob-like
    contrast: bool = False  # iodinated contrast: blood pools ~300 HU
    arms: str = "up"  # "up": beside the head (above the shoulders only); "down": beside the chest
    consolidation: str | None = None  # "left" | "right": dense (~35 HU) dependent lower lung
    effusion: str | None = None  # "left" | "right": free pleural fluid (~12 HU) layering at the back
    bowel_gas: bool = False  # gas in the colon's splenic flexure, within 2 mm of the left lung base
    patient_position: str = "HFS"  # "FFS": feet first, columns toward patient right, head at k = 0
    fov_mm: float | None = None  # reconstruction diameter; smaller than the body crops it at the border
    fov_center_mm: tuple[float, float] = (0.0, 0.0)
    # Reconstruction circle: pixels outside the circle inscribed in the image hold this HU (-3024,
    # -2048 as scanners write), stored as PixelPaddingValue; None: the whole square is reconstructed.
    padding_hu: int | None = None
    injection: str | None = None  # "left" | "right": undiluted contrast in that arm's veins and the SVC
    z_center_mm: float = 0.0  # patient z of the middle slice (the carina is at +40)
    markers: tuple = ()  # ((x, y, z) patient mm, radius mm, HU): bright spheres for renderer tests
    localizer: bool = False  # also write a CT localizer (topogram) series
    noise_hu: float = 15.0
    blur: bool = True  # slight partial-volume blur at edges
    transfer_syntax: str = "explicit"  # explicit | implicit | rle | j2k

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass normalisation
        set_("rows", int_in("rows", self.rows, 16, 2048))
        set_("cols", int_in("cols", self.cols, 16, 2048))
        set_("slices", int_in("slices", self.slices, 1, 2000))
        set_("pixel_spacing", float_in("pixel_spacing", self.pixel_spacing, 0.0, 10.0, lo_open=True))
        set_("slice_thickness", float_in("slice_thickness", self.slice_thickness, 0.0, 20.0, lo_open=True))
        if self.nodules is not None:
            set_("nodules", int_in("nodules", self.nodules, 0, 50))
        if self.nodule_specs is not None:
            set_("nodule_specs", tuple(_nodule_spec(i, s) for i, s in enumerate(self.nodule_specs)))
        lo, hi = vector("nodule_diameter_mm", self.nodule_diameter_mm, 2)
        if not DIAMETER_RANGE_MM[0] <= lo <= hi <= DIAMETER_RANGE_MM[1]:
            raise fail("nodule_diameter_mm", f"(min, max) within {list(DIAMETER_RANGE_MM)} mm", self.nodule_diameter_mm)
        set_("nodule_diameter_mm", (lo, hi))
        set_("ground_glass_fraction", float_in("ground_glass_fraction", self.ground_glass_fraction, 0.0, 1.0))
        set_("part_solid_fraction", float_in("part_solid_fraction", self.part_solid_fraction, 0.0,
                                             1.0 - self.ground_glass_fraction))
        set_("pleural_nodules", int_in("pleural_nodules", self.pleural_nodules, 0, 20))
        choice("vessels", self.vessels, (True, False))
        choice("contrast", self.contrast, (True, False))
        choice("arms", self.arms, ("up", "down"))
        choice("consolidation", self.consolidation, (None, "left", "right"))
        choice("effusion", self.effusion, (None, "left", "right"))
        choice("bowel_gas", self.bowel_gas, (True, False))
        choice("patient_position", self.patient_position, ("HFS", "FFS"))
        if self.fov_mm is not None:
            set_("fov_mm", float_in("fov_mm", self.fov_mm, 0.0, 1000.0, lo_open=True))
        set_("fov_center_mm", vector("fov_center_mm", self.fov_center_mm, 2))
        if self.padding_hu is not None:
            set_("padding_hu", int_in("padding_hu", self.padding_hu, *PADDING_HU_RANGE))
        choice("injection", self.injection, (None, "left", "right"))
        set_("z_center_mm", float_in("z_center_mm", self.z_center_mm, -2000.0, 2000.0))
        if len(self.markers) > 100:
            raise fail("markers", "at most 100 markers", f"{len(self.markers)} markers")
        set_("markers", tuple(_marker(i, m) for i, m in enumerate(self.markers)))
        choice("localizer", self.localizer, (True, False))
        set_("noise_hu", float_in("noise_hu", self.noise_hu, 0.0, 200.0))
        choice("blur", self.blur, (True, False))
        choice("transfer_syntax", self.transfer_syntax, tuple(TRANSFER_SYNTAXES))

    @property
    def spacing(self) -> float:
        return round(self.fov_mm / self.cols, 6) if self.fov_mm else self.pixel_spacing

    @property
    def nodule_count(self) -> int:
        if self.nodules is not None:
            return self.nodules
        return 0 if self.nodule_specs else DEFAULT_NODULES

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, data: dict) -> "CTOptions":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def identity(self) -> str:
        """What distinguishes the content: every option except how the pixels are encoded."""
        d = self.to_json()
        d.pop("transfer_syntax")
        for name, default in _LATER_DEFAULTS.items():  # options added later: absent, the same studies as before
            if d[name] == default:
                d.pop(name)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_LATER_DEFAULTS = {"part_solid_fraction": 0.0, "pleural_nodules": 0, "vessels": False}


def _nodule_spec(i: int, spec) -> dict:
    name = f"nodule_specs[{i}]"
    if not isinstance(spec, dict):
        raise fail(name, "a dict with center_mm, diameter_mm and optional type", spec)
    unknown = set(spec) - {"center_mm", "diameter_mm", "type"}
    if unknown:
        raise fail(name, "keys center_mm, diameter_mm, type", sorted(unknown))
    center = vector(f"{name}.center_mm", spec.get("center_mm"), 3)
    d = float_in(f"{name}.diameter_mm", spec.get("diameter_mm"), *DIAMETER_RANGE_MM)
    kind = choice(f"{name}.type", spec.get("type", "solid"), NODULE_TYPES)
    return {"center_mm": list(center), "diameter_mm": d, "type": kind}


def _marker(i: int, marker) -> tuple:
    name = f"markers[{i}]"
    try:
        center, radius, hu = marker
    except (TypeError, ValueError):
        raise fail(name, "(center_xyz_mm, radius_mm, hu)", marker) from None
    return (vector(f"{name}.center", center, 3), float_in(f"{name}.radius", radius, 0.0, 200.0, lo_open=True),
            float_in(f"{name}.hu", hu, HU_MIN, HU_MAX))


def _options(where: str, options: dict) -> CTOptions:
    known = {f.name for f in fields(CTOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; known options: {sorted(known)}")
    return CTOptions(**options)


# --- study identity --------------------------------------------------------------------------------

def _study_info(patient_id: str, study_uid: str, study_date: date, study_time: str, contrast: bool,
                study_number: int) -> StudyInfo:
    acc = "PH" + str(int(hashlib.sha256(study_uid.encode()).hexdigest(), 16))[:12]
    return StudyInfo(
        patient_name="PHANTOM^CHEST", patient_id=patient_id, study_uid=study_uid,
        study_date=study_date.strftime("%Y%m%d"), study_time=study_time, accession=acc,
        study_id=str(study_number), description="CT CHEST WITH CONTRAST" if contrast else "CT CHEST",
    )


def _baseline_date(seed: int) -> date:
    return date(2024, 1, 8) + timedelta(days=seed % 365)


# --- the study -------------------------------------------------------------------------------------

@dataclass
class _Plan:
    opts: CTOptions
    seed: int
    geom: Geometry
    pose: Pose
    nodules: list[Nodule]
    study: StudyInfo
    series_uid: str
    frame_uid: str
    localizer_uid: str | None
    changes: dict | None = None  # follow-up truth, written as changes.json
    nodule_status: dict | None = None  # nodule id → change status (follow-up)
    followup_of: str | None = None
    breathing_mm: float = 0.0  # > 0: the anatomy drawn breathing (node.phantom.breathing), nodules as spheres


def _geometry(opts: CTOptions) -> Geometry:
    return axial_geometry(rows=opts.rows, cols=opts.cols, slices=opts.slices, pixel_spacing=opts.spacing,
                          slice_spacing=opts.slice_thickness, feet_first=opts.patient_position == "FFS",
                          center_xy=opts.fov_center_mm, center_z=opts.z_center_mm)


def _anatomy_z_range(geom: Geometry, pose: Pose) -> tuple[float, float]:
    n, rows, cols = geom.shape
    corners = np.array([[k, j, i] for k in (-0.5, n - 0.5) for j in (0, rows - 1) for i in (0, cols - 1)])
    z = pose.to_anatomy(geom.index_to_patient(corners))[:, 2]
    return float(z.min()), float(z.max())


def _bare_anatomy(opts: CTOptions, codebook: CodeBook) -> ChestAnatomy:
    lung = {"left": LUNG_LEFT, "right": LUNG_RIGHT}
    code = codebook.add(lung[opts.consolidation], CONSOLIDATION_HU) if opts.consolidation else 0
    veins = (codebook.add(VEIN, INJECTION_HU["arm_veins"]), codebook.add(VEIN, INJECTION_HU["svc"])) \
        if opts.injection else (0, 0)
    return ChestAnatomy(arms=opts.arms, consolidation=opts.consolidation, consolidation_code=code,
                        injection=opts.injection, injection_codes=veins, effusion=opts.effusion,
                        bowel_gas=opts.bowel_gas)


def outside_circle(rows: int, cols: int) -> np.ndarray:
    """(rows, cols) True outside the reconstruction circle: the circle inscribed in the image."""
    j = np.arange(rows)[:, None] - (rows - 1) / 2
    i = np.arange(cols)[None, :] - (cols - 1) / 2
    return j * j + i * i > (min(rows, cols) / 2) ** 2


def _n_sub(thickness: float) -> int:
    """Samples averaged through a slice: thick slices show partial volume along z too."""
    return max(1, math.ceil(thickness / 2.0 - 1e-9))


def _write_study(out: Path, plan: _Plan) -> PhantomStudy:
    opts, geom, pose = plan.opts, plan.geom, plan.pose
    codebook = CodeBook(opts.contrast)
    anatomy = _bare_anatomy(opts, codebook)
    if opts.vessels:
        anatomy.vessel_code = codebook.add(PULMONARY_VESSEL, CT_LABELS[PULMONARY_VESSEL].hu_contrast
                                           if opts.contrast else CT_LABELS[PULMONARY_VESSEL].hu)
    for nod in plan.nodules:
        code = codebook.add(NODULE_LABEL[nod.type], NODULE_HU[nod.type])
        anatomy.spheres.append(Sphere(nod.center, nod.radius, code))
        if nod.type == "part_solid":
            core = codebook.add(NODULE_LABEL["solid"], NODULE_HU["solid"])
            anatomy.spheres.append(Sphere(nod.center, nod.solid_diameter_mm / 2, core))
    for center, radius, hu in opts.markers:
        code = codebook.add(MARKER, hu)
        anatomy.spheres.append(Sphere(tuple(pose.to_anatomy(center)), radius, code))
    n_sub = _n_sub(opts.slice_thickness)
    if plan.breathing_mm > 0:
        codes = _breathing_codes(anatomy, geom, pose, n_sub, plan.breathing_mm)
    else:
        codes = render_codes(lambda cv: ChestPainter(anatomy, cv).paint, geom, pose, n_sub)
    label_lut, _, _ = codebook.luts()
    patient = np.zeros(256, bool)
    patient[: len(codebook.label)] = [CT_LABELS[v].patient for v in codebook.label]
    table_y = lay_table(codes, geom, patient, fallback_y=pose.to_patient([0, 113.0, 0])[1])

    dicom = out / "dicom"
    template = _ct_template(plan)
    writer = InstanceWriter(template, dicom, opts.transfer_syntax)
    signal = Signal(codebook, opts.rows, opts.cols, opts.spacing, opts.noise_hu, opts.blur, (plan.seed, 1))
    n = opts.slices
    labels = np.empty(geom.shape, np.uint8)
    outside = outside_circle(opts.rows, opts.cols) if opts.padding_hu is not None else None
    for k in range(n):
        np.take(label_lut, codes[k * n_sub + n_sub // 2], out=labels[k])
        if outside is not None:
            labels[k][outside] = 0  # not reconstructed: not imaged, so no truth there either

    def write_slice(k: int) -> str:
        pixels = stored_values(signal.hu(codes[k * n_sub:(k + 1) * n_sub], k), opts.padding_hu, outside)
        pos = geom.slice_position(k)
        return writer.write(
            pixels, derived_uid(plan.series_uid, "instance", k),
            InstanceNumber=n - k, ImagePositionPatient=[round(v, 4) for v in pos], SliceLocation=round(pos[2], 4),
        ).name

    # numpy and file writes release the GIL: slices and the truth's compression share the cores.
    with ThreadPoolExecutor(3) as pool:
        truth = pool.submit(write_labels, out / "labels.nii.gz", labels, geom)
        names = list(pool.map(write_slice, range(n)))
        truth.result()
    del codes, labels

    series = {plan.series_uid: names}
    if plan.localizer_uid:
        series[plan.localizer_uid] = [_write_localizer(dicom, plan, anatomy, codebook)]
    return _write_truth(out, plan, series, table_y)


def _breathing_codes(anatomy: ChestAnatomy, geom: Geometry, pose: Pose, n_sub: int, amplitude_mm: float):
    """The anatomy drawn breathing, its spheres (nodules, markers) drawn afterwards undeformed where
    the plan put them: a warp would stretch a nodule by the deformation's local volume change."""
    spheres, anatomy.spheres = anatomy.spheres, []
    try:
        big, _ = padded(geom, amplitude_mm)
        rigid = render_codes(lambda cv: ChestPainter(anatomy, cv).paint, big, pose, n_sub)
        codes = deform_codes(rigid, big, geom, pose, n_sub, amplitude_mm)
    finally:
        anatomy.spheres = spheres
    del rigid

    def spheres_only(cv):
        def paint(z, into, clear=True):
            cv.start(z, into, clear)
            for sp in spheres:
                cv.paint(sp.code, cv.sphere(sp.center, sp.radius))
        return paint

    drawn = render_codes(spheres_only, geom, pose, n_sub)
    np.copyto(codes, drawn, where=drawn > 0)
    return codes


def _ct_template(plan: _Plan):
    opts, geom = plan.opts, plan.geom
    desc = f"CHEST {opts.slice_thickness:g}mm{' CE' if opts.contrast else ''}"
    ds = series_template(plan.study, SeriesInfo(
        modality="CT", sop_class_uid=CT_IMAGE_STORAGE, series_uid=plan.series_uid, series_number=2,
        description=desc, body_part="CHEST", frame_of_reference_uid=plan.frame_uid,
        patient_position=opts.patient_position,
    ))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ct_acquisition(ds, opts)
    ds.SliceThickness = opts.slice_thickness
    ds.SpacingBetweenSlices = opts.slice_thickness
    ds.ReconstructionDiameter = round(opts.spacing * max(opts.rows, opts.cols), 3)
    ds.ConvolutionKernel = "STANDARD"
    ds.PixelSpacing = [opts.spacing, opts.spacing]
    ds.ImageOrientationPatient = geom.image_orientation
    if opts.padding_hu is None:
        set_pixel_format(ds, opts.rows, opts.cols, bits_stored=12)
        ds.RescaleIntercept = HU_MIN
    else:  # stored 0 is the padding; everything reconstructed lies above it
        set_pixel_format(ds, opts.rows, opts.cols, bits_stored=padding_bits(opts.padding_hu))
        ds.RescaleIntercept = int(opts.padding_hu)
        ds.add_new(0x00280120, "US", 0)  # PixelPaddingValue: US, the pixels being unsigned
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = [40, -600]
    ds.WindowWidth = [400, 1500]
    ds.WindowCenterWidthExplanation = ["SOFT TISSUE", "LUNG"]
    return ds


def _write_localizer(dicom: Path, plan: _Plan, anatomy: ChestAnatomy, codebook: CodeBook) -> str:
    """A frontal topogram covering the axial range plus 60 mm each way, 1 mm pixels, head at the top."""
    opts, geom = plan.opts, plan.geom
    z_ends = [geom.slice_position(0)[2], geom.slice_position(opts.slices - 1)[2]]
    z_lo, z_hi = min(z_ends) - 60.0, max(z_ends) + 60.0
    path, xs, zs = water_path(anatomy, codebook, plan.pose, (-250.0, 250.0), (z_lo, z_hi))
    out_xs = np.arange(-250.0, 250.0, 1.0)
    out_zs = np.arange(z_hi, z_lo, -1.0)
    image = resample(path, xs, zs, out_xs, out_zs) * LOCALIZER_SCALE
    image += np.random.default_rng([plan.seed, 3]).normal(0.0, 3.0, image.shape).astype(np.float32)
    pixels = np.clip(np.rint(image), 0, 4095).astype(np.uint16)
    ds = series_template(plan.study, SeriesInfo(
        modality="CT", sop_class_uid=CT_IMAGE_STORAGE, series_uid=plan.localizer_uid, series_number=1,
        description="TOPOGRAM AP", body_part="CHEST", frame_of_reference_uid=plan.frame_uid,
        patient_position=opts.patient_position,
    ))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ct_acquisition(ds, opts)
    ds.SliceThickness = ""
    ds.PixelSpacing = [1.0, 1.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    set_pixel_format(ds, len(out_zs), len(out_xs), bits_stored=12)
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.WindowCenter = 1200
    ds.WindowWidth = 2400
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [float(out_xs[0]), 0.0, float(out_zs[0])]
    writer = InstanceWriter(ds, dicom, opts.transfer_syntax, per_instance=("SOPInstanceUID",))
    return writer.write(pixels, derived_uid(plan.localizer_uid, "instance", 0)).name


def ct_acquisition(ds, opts: CTOptions) -> None:
    """CT Image and Contrast/Bolus attributes shared by the axial series and the localizer."""
    ds.KVP = 120
    ds.DataCollectionDiameter = 500
    ds.GantryDetectorTilt = 0
    ds.TableHeight = 150
    ds.RotationDirection = "CW"
    ds.ExposureTime = 500
    ds.XRayTubeCurrent = 200
    if opts.contrast:
        ds.ContrastBolusAgent = "IODINATED CONTRAST"
        ds.ContrastBolusRoute = "IV"


def _nodule_json(nod: Nodule, pose: Pose, geom: Geometry, status: str | None) -> dict:
    center = pose.to_patient(nod.center)
    d = {
        "id": nod.id,
        "center_mm": [round(float(v), 3) for v in center],
        "center_voxel_kji": [round(float(v), 3) for v in geom.patient_to_index(center)],
        "diameter_mm": nod.diameter_mm,
        "radius_mm": nod.radius,
        "type": nod.type,
        "hu": NODULE_HU[nod.type],
        "label": NODULE_LABEL[nod.type],
        "volume_mm3": round(nod.volume_mm3, 2),
        "solid_diameter_mm": round(nod.solid_diameter_mm, 3),
        "side": nod.side,
        "pleural": nod.pleural,
    }
    if status is not None:
        d["change"] = status
    return d


def _write_truth(out: Path, plan: _Plan, series: dict, table_y: float) -> PhantomStudy:
    opts, geom, pose = plan.opts, plan.geom, plan.pose
    write_json(out / "labels.json", ct_label_table(opts.contrast))
    status = plan.nodule_status or {}
    write_json(out / "nodules.json", [_nodule_json(n, pose, geom, status.get(n.id) if plan.changes else None)
                                      for n in plan.nodules])
    if plan.changes is not None:
        write_json(out / "changes.json", plan.changes)
    findings = []
    if opts.injection:
        findings.append({"type": "dense_contrast", "label_stays": "vein", "side": opts.injection,
                         "hu": INJECTION_HU,
                         "note": "undiluted contrast injected into one arm: its subclavian and brachiocephalic "
                                 "vein and the superior vena cava; not bone"})
    if opts.padding_hu is not None:
        findings.append({"type": "reconstruction_circle", "padding_hu": opts.padding_hu, "pixel_padding_value": 0,
                         "note": "pixels outside the circle inscribed in the image are padding; "
                                 "their truth label is 0 (background: not imaged)"})
    if opts.consolidation:
        findings.append({"type": "consolidation", "hu": CONSOLIDATION_HU,
                         "label_stays": f"lung_{opts.consolidation}",
                         "region_anatomical": consolidation_region(opts.consolidation),
                         "note": "lung voxels with anatomical z < z_below_mm and y > y_above_mm"})
    if opts.effusion:
        findings.append({"type": "effusion", "hu": CT_LABELS[EFFUSION].hu, "label": EFFUSION,
                         "region_anatomical": effusion_region(opts.effusion),
                         "note": f"free pleural fluid in the {opts.effusion} pleural space, layering posteriorly; "
                                 f"its own label, not lung_{opts.effusion}"})
    if opts.bowel_gas:
        findings.append({"type": "bowel_gas", "label": BOWEL_GAS, "hu": CT_LABELS[BOWEL_GAS].hu,
                         "note": "gas in the splenic flexure of the colon pressed against the left hemidiaphragm, "
                                 "within 2 mm of the left lung base; not lung"})
    manifest = {
        "generator": "hilum phantom",
        "modality": "CT",
        "seed": plan.seed,
        "options": opts.to_json(),
        "patient": {"name": plan.study.patient_name, "id": plan.study.patient_id},
        "study_uid": plan.study.study_uid,
        "study_date": plan.study.study_date,
        "series_uid": plan.series_uid,
        "frame_of_reference_uid": plan.frame_uid,
        "localizer_series_uid": plan.localizer_uid,
        "followup_of": plan.followup_of,
        "geometry": geometry_json(geom),
        "pose": {"matrix": pose.matrix(),
                 "note": "anatomical frame → this study's patient coordinates: p = M a"},
        "anatomy_nodules": [{"id": n.id, "center": list(n.center), "diameter_mm": n.diameter_mm, "type": n.type,
                             "pleural": n.pleural}
                            for n in plan.nodules],
        "markers": [{"center_mm": list(c), "radius_mm": r, "hu": hu} for c, r, hu in opts.markers],
        "findings": findings,
        "table_top_y_mm": round(table_y, 3),
        "series": series,
        "files": {"dicom": "dicom", "labels": "labels.nii.gz", "label_table": "labels.json",
                  "nodules": "nodules.json", "changes": "changes.json" if plan.changes is not None else None},
    }
    write_json(out / MANIFEST, manifest)
    return PhantomStudy.open(out)


def generate_ct(out_dir: str | Path, *, seed: int = 0, rows: int = 512, cols: int = 512, slices: int = 300,
                pixel_spacing: float = 0.7, slice_thickness: float = 1.0, **options) -> PhantomStudy:
    """Write a chest CT phantom study with its ground truth to the new folder ``out_dir``.

    ``options`` are the other fields of ``CTOptions`` (nodules, nodule_specs, nodule_diameter_mm,
    contrast, arms, consolidation, effusion, bowel_gas, patient_position, fov_mm, markers, localizer, noise_hu, blur,
    transfer_syntax, ...). The same seed and options give the same files, byte for byte.
    """
    seed = int_in("seed", seed, 0, 2**31 - 1)
    opts = _options("generate_ct", {"rows": rows, "cols": cols, "slices": slices, "pixel_spacing": pixel_spacing,
                                    "slice_thickness": slice_thickness, **options})
    out = prepare_out_dir(out_dir)
    geom, pose = _geometry(opts), Pose()
    room = lung_room(opts.arms, opts.consolidation, _anatomy_z_range(geom, pose), opts.effusion)
    if opts.nodule_specs:
        specified = [Nodule(f"N{i + 1}", tuple(pose.to_anatomy(s["center_mm"])), s["diameter_mm"], s["type"])
                     for i, s in enumerate(opts.nodule_specs)]
        check_specified(specified, room)
    else:
        specified = []
    rng = np.random.default_rng([seed, 0])
    nodules = specified + place_nodules(rng, room, opts.nodule_count, opts.nodule_diameter_mm,
                                        opts.ground_glass_fraction, specified, len(specified) + 1,
                                        opts.part_solid_fraction)
    if opts.pleural_nodules:
        nodules += place_pleural(np.random.default_rng([seed, 4]), room, opts.pleural_nodules,
                                 opts.nodule_diameter_mm, nodules, len(nodules) + 1)
    identity = ("hilum-phantom", "ct", seed, opts.identity())
    plan = _Plan(
        opts=opts, seed=seed, geom=geom, pose=pose, nodules=nodules,
        study=_study_info(f"PHANTOM-{seed:06d}", derived_uid(*identity, "study"), _baseline_date(seed), "093000",
                          opts.contrast, 1 + seed % 9999),
        series_uid=derived_uid(*identity, "series"), frame_uid=derived_uid(*identity, "frame-of-reference"),
        localizer_uid=derived_uid(*identity, "localizer") if opts.localizer else None,
    )
    return _write_study(out, plan)


def _vdt(c, interval_days: int) -> float | None:
    """Expected volume doubling time (days) of a nodule seen at both times whose volume changed;
    negative for a shrinking one (its halving time)."""
    if not (c.baseline and c.followup) or c.followup.volume_mm3 == c.baseline.volume_mm3:
        return None
    return round(math.log(2) * interval_days / math.log(c.followup.volume_mm3 / c.baseline.volume_mm3), 2)


def generate_followup(baseline: PhantomStudy | str | Path, out_dir: str | Path, *, seed: int | None = None,
                      interval_days: int = 180, shift_mm=None, rotation_deg=None, new_nodules: int = 1,
                      growth: float = 1.35, shrinkage: float = 0.7, breathing_mm: float = 0.0,
                      **overrides) -> PhantomStudy:
    """A later CT study of the baseline's patient: moved a little, nodules changed, truth of each change.

    The patient is moved rigidly by ``rotation_deg`` (about x, y, z) and ``shift_mm`` (defaults:
    small, drawn from the seed); every baseline nodule is grown, shrunk, vanished or stable (each
    status used before any repeats) and ``new_nodules`` appear. ``breathing_mm`` > 0 also deforms
    the anatomy as breathing in does (node.phantom.breathing, the registration pairs' model): the
    lower lungs move most; each nodule moves with its tissue but stays a sphere of its stated size,
    so its truth (centre, volume, doubling time) stays exact. ``overrides`` change CTOptions of the
    baseline (e.g. slice_thickness, contrast, transfer_syntax); nodule options cannot.
    """
    base = baseline if isinstance(baseline, PhantomStudy) else PhantomStudy.open(baseline)
    m = base.manifest
    if m["modality"] != "CT":
        raise ValueError(f"baseline must be a CT phantom study, {base.root} is {m['modality']}")
    for name in ("nodules", "nodule_specs"):
        if name in overrides:
            raise ValueError(f"generate_followup: {name} cannot change; the follow-up evolves the baseline's nodules")
    base_opts = CTOptions.from_json(m["options"])
    opts = _options("generate_followup", {**base_opts.to_json(), **overrides})
    seed = m["seed"] + 1000 if seed is None else int_in("seed", seed, 0, 2**31 - 1)
    interval_days = int_in("interval_days", interval_days, 1, 10000)
    new_nodules = int_in("new_nodules", new_nodules, 0, 20)
    growth = float_in("growth", growth, 1.1, 1.4)
    shrinkage = float_in("shrinkage", shrinkage, 0.3, 0.9)
    rng = np.random.default_rng([seed, 2])
    drawn_rot = rng.uniform([-1.0, -1.0, -3.0], [1.0, 1.0, 3.0])
    drawn_shift = rng.uniform([-6.0, -3.0, -12.0], [6.0, 3.0, 12.0])
    rotation_deg = vector("rotation_deg", drawn_rot.round(2) if rotation_deg is None else rotation_deg, 3)
    shift_mm = vector("shift_mm", drawn_shift.round(2) if shift_mm is None else shift_mm, 3)
    if max(abs(v) for v in rotation_deg) > 10:
        raise fail("rotation_deg", "small angles (at most 10 degrees each)", rotation_deg)
    if max(abs(v) for v in shift_mm) > 100:
        raise fail("shift_mm", "at most 100 mm per axis", shift_mm)
    out = prepare_out_dir(out_dir)

    base_pose = Pose.from_matrix(m["pose"]["matrix"])
    move = Pose.from_degrees(rotation_deg, shift_mm)
    pose = base_pose.then(move)
    geom = _geometry(opts)
    room = lung_room(opts.arms, opts.consolidation, _anatomy_z_range(geom, pose), opts.effusion)
    before = [Nodule(n["id"], tuple(n["center"]), n["diameter_mm"], n["type"], n.get("pleural", False))
              for n in m["anatomy_nodules"]]
    changes = evolve(rng, before, room, new_nodules, opts.nodule_diameter_mm, opts.ground_glass_fraction,
                     growth, shrinkage)
    breathing_mm = float_in("breathing_mm", breathing_mm, 0.0, 30.0)
    if breathing_mm > 0:  # each follow-up nodule drawn where breathing moved its tissue
        changes = [replace(c, followup=c.followup and replace(
            c.followup, center=tuple(float(round(v, 3)) for v in moved_to(c.followup.center, breathing_mm))))
            for c in changes]

    def in_scan(points: np.ndarray) -> np.ndarray:
        kji = geom.patient_to_index(pose.to_patient(points))
        return np.all((kji > -0.5) & (kji < np.asarray(geom.shape) - 0.5), axis=-1)

    # The truth must describe the image: each follow-up nodule inside the lungs and the slab as drawn,
    # a juxtapleural one on the pleura (grown into the lung, not into the wall; see settle()).
    changes = [replace(c, followup=c.followup and settle(c.followup, room, breathing_mm, in_scan)) for c in changes]

    def where(nod: Nodule | None, p: Pose) -> dict | None:
        if nod is None:
            return None
        return {"center_mm": [round(float(v), 3) for v in p.to_patient(nod.center)],
                "diameter_mm": nod.diameter_mm, "volume_mm3": round(nod.volume_mm3, 2), "type": nod.type}

    change_json = {
        "baseline": {"study_uid": base.study_uid, "series_uid": base.series_uid,
                     "frame_of_reference_uid": base.frame_of_reference_uid, "study_date": m["study_date"]},
        "interval_days": interval_days,
        "transform": {
            "note": "baseline patient coordinates → follow-up patient coordinates: p_followup = M p_baseline",
            "matrix": move.matrix(),
            "rotation_deg": list(rotation_deg),
            "rotation_order": "about x, then y, then z (patient axes)",
            "translation_mm": list(shift_mm),
            **({"breathing": {"amplitude_mm": breathing_mm, "model": BREATHING_MODEL,
                              "note": "besides M, the anatomy is deformed: the follow-up shows at p the anatomy at "
                                      "u + d(u), u = M^-1 p; nodules stay spheres, centred where their tissue "
                                      "moved to (followup.center_mm)"}} if breathing_mm > 0 else {}),
        },
        "nodules": [
            {"id": c.id, "status": c.status, "baseline": where(c.baseline, base_pose), "followup": where(c.followup, pose),
             "volume_ratio": round(c.followup.volume_mm3 / c.baseline.volume_mm3, 4)
             if c.baseline and c.followup else None,
             "vdt_days": _vdt(c, interval_days)}
            for c in changes
        ],
    }
    identity = ("hilum-phantom", "followup", base.study_uid, seed, opts.identity(), interval_days,
                rotation_deg, shift_mm, new_nodules, growth, shrinkage, *((breathing_mm,) if breathing_mm else ()))
    when = date.fromisoformat(f"{m['study_date'][:4]}-{m['study_date'][4:6]}-{m['study_date'][6:]}")
    plan = _Plan(
        opts=opts, seed=seed, geom=geom, pose=pose, nodules=[c.followup for c in changes if c.followup],
        study=_study_info(base.patient_id, derived_uid(*identity, "study"), when + timedelta(days=interval_days),
                          "101500", opts.contrast, 1 + seed % 9999),
        series_uid=derived_uid(*identity, "series"), frame_uid=derived_uid(*identity, "frame-of-reference"),
        localizer_uid=derived_uid(*identity, "localizer") if opts.localizer else None,
        changes=change_json, nodule_status={c.id: c.status for c in changes}, followup_of=base.study_uid,
        breathing_mm=breathing_mm,
    )
    return _write_study(out, plan)
