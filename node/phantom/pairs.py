"""Phantom pairs with a known spatial relation, for registration: truth is the mapping itself.

``generate_breathing_followup``: a later CT of a baseline's patient, moved rigidly and breathing in
(the diaphragm and the lower lungs move most, the spine and the chest wall hardly). It is made by
resampling the baseline through the true mapping, so the truth is exact at every point:

    baseline_point = q + d(q),  q = M^-1 followup_point

with ``M`` the rigid move (baseline → follow-up patient coordinates) and ``d`` the smooth
breathing displacement (baseline coordinates). Written as truth: ``registration.json`` (M, the
breathing parameters and landmark pairs) and ``displacement.npz`` (followup_point → baseline_point
minus followup_point, on the follow-up grid: what a registration with the follow-up fixed finds).

``generate_head_ct_mr``: a head CT and a T1 MR of one synthetic patient in one study, each in its
own Frame of Reference, the MR rotated and shifted by a known rigid transform; landmark pairs in
``registration.json`` of the pair folder.
"""
from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage

from node.phantom.breathing import DIAPHRAGM_Z_MM, MODEL, breathing_displacement
from node.phantom.checks import float_in, int_in, vector
from node.phantom.ct import CT_IMAGE_STORAGE, ct_acquisition
from node.phantom.ct_pixels import HU_MIN
from node.phantom.dicom_io import InstanceWriter, SeriesInfo, StudyInfo, series_template, set_pixel_format
from node.phantom.grid import Pose, axial_geometry, render_codes
from node.phantom.mr import MR_LABELS, SCALP, SKULL, _head_painter, mr_label_table, mr_series_template
from node.phantom.study import MANIFEST, PhantomStudy, geometry_json, prepare_out_dir, write_json, write_labels
from node.uids import derived_uid
from node.volume import Geometry, load_series

__all__ = ["generate_breathing_followup", "generate_head_ct_mr", "breathing_displacement", "REGISTRATION_TRUTH"]

REGISTRATION_TRUTH = "registration.json"
def _true_map(points, move: np.ndarray, amplitude_mm: float) -> np.ndarray:
    """Follow-up mm → baseline mm (see the module docstring)."""
    q = (np.asarray(points, float) - move[:3, 3]) @ np.linalg.inv(move[:3, :3]).T
    return q + breathing_displacement(q, amplitude_mm)


def _sample(volume: np.ndarray, geom: Geometry, points: np.ndarray, order: int, fill: float) -> np.ndarray:
    kji = geom.patient_to_index(points.reshape(-1, 3)).T
    return ndimage.map_coordinates(volume, kji, order=order, mode="constant", cval=fill).reshape(points.shape[:-1])


def _landmarks(labels: np.ndarray, geom: Geometry, mapping, moving_amount, n: int, rng) -> list[dict]:
    """Half in the lung bases where the breathing moves most, half anywhere in the patient."""
    lungs = np.isin(labels, (4, 5))  # lung_left, lung_right (node.phantom.chest)
    body = labels > 1  # not background, not the table
    kji_all = np.argwhere(body)
    pts_all = geom.index_to_patient(kji_all)
    amount = moving_amount(pts_all)
    strong = np.flatnonzero(lungs[tuple(kji_all.T)] & (amount > 0.5 * amount.max())) if amount.max() > 0 else []
    picks = list(rng.choice(strong, size=min(len(strong), n // 2), replace=False)) if len(strong) else []
    rest = np.setdiff1d(np.arange(len(kji_all)), picks)
    picks += list(rng.choice(rest, size=n - len(picks), replace=False))
    strong_set = {int(i) for i in strong}
    out = []
    for i in picks:
        f = pts_all[i]
        out.append({"fixed_mm": [round(float(v), 4) for v in f],
                    "moving_mm": [round(float(v), 4) for v in mapping(f[None])[0]],
                    "region": "lung_base" if int(i) in strong_set else "body"})
    return out


def generate_breathing_followup(baseline: PhantomStudy | str | Path, out_dir: str | Path, *, seed: int = 0,
                                rotation_deg=(1.0, -1.0, 3.0), shift_mm=(6.0, -4.0, 10.0),
                                breathing_mm: float = 15.0, noise_hu: float = 8.0, interval_days: int = 90,
                                landmarks: int = 24) -> PhantomStudy:
    """A follow-up CT of ``baseline`` (a ``generate_ct`` study with the identity pose) with truth."""
    base = baseline if isinstance(baseline, PhantomStudy) else PhantomStudy.open(baseline)
    m = base.manifest
    if m["modality"] != "CT" or not np.allclose(m["pose"]["matrix"], np.eye(4)):
        raise ValueError(f"baseline must be a CT phantom with the identity pose, {base.root} is not")
    seed = int_in("seed", seed, 0, 2**31 - 1)
    rotation_deg = vector("rotation_deg", rotation_deg, 3)
    shift_mm = vector("shift_mm", shift_mm, 3)
    breathing_mm = float_in("breathing_mm", breathing_mm, 0.0, 30.0)
    noise_hu = float_in("noise_hu", noise_hu, 0.0, 100.0)
    landmarks = int_in("landmarks", landmarks, 20, 500)
    out = prepare_out_dir(out_dir)
    move = np.asarray(Pose.from_degrees(rotation_deg, shift_mm).matrix())
    series = load_series(base.series_files())
    geom = series.volume.geometry
    base_hu = series.volume.array.astype(np.float32)
    base_labels, _ = base.label_volume()
    hu = np.empty(geom.shape, np.float32)
    labels = np.empty(geom.shape, np.uint8)
    # The truth field on every ``step``-th voxel in-plane (a 512x512x300 field would be ~1 GB).
    step = max(1, geom.shape[1] // 128)
    field = np.empty((geom.shape[0], len(range(0, geom.shape[1], step)), len(range(0, geom.shape[2], step)), 3),
                     np.float32)
    jj, ii = np.meshgrid(np.arange(geom.shape[1]), np.arange(geom.shape[2]), indexing="ij")
    noise = np.random.default_rng([seed, 7])
    for k in range(geom.shape[0]):  # slice by slice: the whole grid's points would not fit in memory
        pts = geom.index_to_patient(np.stack([np.full_like(jj, k), jj, ii], -1))
        source = _true_map(pts, move, breathing_mm)
        hu[k] = _sample(base_hu, geom, source, 1, float(HU_MIN))
        hu[k] += noise.normal(0.0, noise_hu, hu[k].shape).astype(np.float32)
        labels[k] = _sample(base_labels, geom, source, 0, 0.0)
        field[k] = (source - pts)[::step, ::step]

    identity = ("hilum-phantom", "breathing", base.study_uid, seed, rotation_deg, shift_mm, breathing_mm, noise_hu)
    study_uid, series_uid, frame_uid = (derived_uid(*identity, what) for what in ("study", "series", "frame"))
    when = date.fromisoformat(f"{m['study_date'][:4]}-{m['study_date'][4:6]}-{m['study_date'][6:]}") \
        + timedelta(days=int_in("interval_days", interval_days, 1, 10000))
    template = pydicom.dcmread(base.series_files()[0])
    for keyword in ("PixelData", "SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "SliceLocation"):
        delattr(template, keyword)
    template.StudyInstanceUID, template.SeriesInstanceUID, template.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    template.StudyDate = template.SeriesDate = template.AcquisitionDate = template.ContentDate = \
        template.InstanceCreationDate = when.strftime("%Y%m%d")
    template.AccessionNumber = "PB" + str(int(study_uid.replace(".", "")[-12:]))
    template.StudyID = str(2 + seed % 9000)
    template.SeriesDescription = "CHEST BREATHING FOLLOW-UP"
    writer = InstanceWriter(template, out / "dicom", "explicit")
    intercept = int(template.RescaleIntercept)
    names = []
    for k in range(geom.shape[0]):
        stored = np.clip(np.rint(hu[k]) - intercept, 0, (1 << int(template.BitsStored)) - 1).astype(np.uint16)
        pos = geom.slice_position(k)
        names.append(writer.write(stored, derived_uid(series_uid, "instance", k), InstanceNumber=geom.shape[0] - k,
                                  ImagePositionPatient=[round(v, 4) for v in pos], SliceLocation=round(pos[2], 4)).name)
    write_labels(out / "labels.nii.gz", labels, geom)
    (out / "labels.json").write_text(base.label_table_path.read_text())
    np.savez_compressed(out / "displacement.npz", displacement_mm=field, step=np.array([1, step, step]))

    def amount(p):
        return np.linalg.norm(breathing_displacement(_true_map(p, move, 0.0), breathing_mm), axis=-1)

    pairs = _landmarks(labels, geom, lambda p: _true_map(p, move, breathing_mm), amount, landmarks,
                       np.random.default_rng([seed, 8]))
    write_json(out / REGISTRATION_TRUTH, {
        "note": "fixed = this follow-up, moving = the baseline; moving_mm = q + d(q), q = M^-1 fixed_mm",
        "moving": {"study_uid": base.study_uid, "series_uid": base.series_uid,
                   "frame_of_reference_uid": base.frame_of_reference_uid},
        "rigid_moving_to_fixed": move.tolist(),
        "rotation_deg": list(rotation_deg), "translation_mm": list(shift_mm),
        "breathing": {"amplitude_mm": breathing_mm, "diaphragm_z_mm": DIAPHRAGM_Z_MM,
                      "model": MODEL},
        "displacement_file": "displacement.npz: displacement_mm = moving_mm - fixed_mm at the fixed grid's voxels "
                             "(slices, rows, cols, 3), every step-th voxel per axis (step = (k, j, i))",
        "landmarks": pairs,
    })
    write_json(out / MANIFEST, {
        "generator": "hilum phantom", "modality": "CT", "seed": seed, "options": m["options"],
        "patient": m["patient"], "study_uid": study_uid, "study_date": when.strftime("%Y%m%d"),
        "series_uid": series_uid, "frame_of_reference_uid": frame_uid, "followup_of": base.study_uid,
        "geometry": geometry_json(geom), "pose": {"matrix": move.tolist(), "note": "rigid part only; see "
                                                  + REGISTRATION_TRUTH},
        "series": {series_uid: names},
        "files": {"dicom": "dicom", "labels": "labels.nii.gz", "label_table": "labels.json",
                  "registration": REGISTRATION_TRUTH},
    })
    return PhantomStudy.open(out)


# --- head CT + MR -----------------------------------------------------------------------------------

def _head_and_neck(canvas):
    """The brain phantom's head on a neck, with a cervical spine and a nose: a real head is not a
    set of concentric ellipsoids, and without them a tilt (pitch) of the head would be invisible."""
    head = _head_painter(canvas)
    spine_top, spine_bottom = np.array([0.0, 25.0, -55.0]), np.array([0.0, 30.0, -200.0])

    def paint(z: float, into: np.ndarray, clear: bool = True) -> None:
        canvas.start(z, into, clear)
        if z < -40.0:
            canvas.paint(SCALP, canvas.ellipse(0.0, 12.0, 48.0, 52.0))
        head(z, into, False)
        canvas.paint(SKULL, canvas.capsule(spine_top, spine_bottom, 11.0))
        canvas.paint(SCALP, canvas.capsule(np.array([0.0, -90.0, -20.0]), np.array([0.0, -104.0, -42.0]), 9.0))

    return paint


def _rendered(geom: Geometry, pose: Pose, lut: np.ndarray, factor: int = 3) -> np.ndarray:
    """Signal of each voxel averaged over factor^3 sub-voxels: partial volume as a scanner sees it,
    and no staircase when the head is rotated against the grid (which would bias the truth)."""
    half = (np.asarray(geom.spacing) / 2) * (1 - 1 / factor)
    fine = Geometry(shape=tuple(n * factor for n in geom.shape),
                    origin=tuple(np.asarray(geom.origin) - geom.matrix @ half),
                    spacing=tuple(s / factor for s in geom.spacing), direction=geom.direction)
    values = lut[render_codes(_head_and_neck, fine, pose)]
    n, r, c = geom.shape
    return values.reshape(n, factor, r, factor, c, factor).mean(axis=(1, 3, 5))


_HEAD_HU = {0: -1000.0, 1: -60.0, 2: 1300.0, 3: 8.0, 4: 40.0, 5: 28.0, 6: 8.0, 7: 15.0}
MARKER_HU, MARKER_MR = 3000.0, 3000.0  # far above bone (1300 HU) and the brightest MR tissue


def _add_marker(values: np.ndarray, geom: Geometry, centre, radius_mm: float, value: float) -> None:
    """A bright sphere at ``centre`` (this series' patient mm): something both modalities show at
    one known point, so a viewer's alignment of the two can be judged by eye or by pixel."""
    kji = np.indices(geom.shape).reshape(3, -1).T
    inside = np.linalg.norm(geom.index_to_patient(kji) - np.asarray(centre, float), axis=1) <= radius_mm
    values.reshape(-1)[inside] = value


def _head_ct(out: Path, study: StudyInfo, series_uid: str, frame_uid: str, geom: Geometry, rng,
             marker=None) -> list[str]:
    codes = render_codes(_head_and_neck, geom, Pose())
    hu = _rendered(geom, Pose(), np.array([_HEAD_HU[v] for v in range(len(MR_LABELS))], np.float32))
    if marker is not None:
        _add_marker(hu, geom, marker[0], marker[1], MARKER_HU)
    hu += rng.normal(0.0, 4.0, hu.shape).astype(np.float32)
    ds = series_template(study, SeriesInfo(modality="CT", sop_class_uid=CT_IMAGE_STORAGE, series_uid=series_uid,
                                           series_number=2, description="HEAD 3mm", body_part="HEAD",
                                           frame_of_reference_uid=frame_uid, patient_position="HFS"))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]

    class _Opts:  # ct_acquisition reads only ``contrast``
        contrast = False

    ct_acquisition(ds, _Opts)
    ds.SliceThickness = ds.SpacingBetweenSlices = geom.spacing[2]
    ds.PixelSpacing = [geom.spacing[1], geom.spacing[0]]
    ds.ImageOrientationPatient = geom.image_orientation
    ds.ConvolutionKernel = "STANDARD"
    set_pixel_format(ds, geom.shape[1], geom.shape[2], bits_stored=12)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = HU_MIN, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 80
    writer = InstanceWriter(ds, out / "dicom", "explicit")
    names = []
    for k in range(geom.shape[0]):
        pos = geom.slice_position(k)
        stored = np.clip(np.rint(hu[k]) - HU_MIN, 0, 4095).astype(np.uint16)
        names.append(writer.write(stored, derived_uid(series_uid, "instance", k), InstanceNumber=k + 1,
                                  ImagePositionPatient=[round(v, 4) for v in pos], SliceLocation=round(pos[2], 4)).name)
    write_labels(out / "labels.nii.gz", codes, geom)
    return names


def _head_mr(out: Path, study: StudyInfo, series_uid: str, frame_uid: str, geom: Geometry, pose: Pose,
             rng, marker=None) -> list[str]:
    codes = render_codes(_head_and_neck, geom, pose)
    clean = _rendered(geom, pose, np.array([s for _, _, s, _ in MR_LABELS], np.float32))
    if marker is not None:
        _add_marker(clean, geom, pose.to_patient(np.asarray(marker[0], float)[None])[0], marker[1], MARKER_MR)
    ds = mr_series_template(study, series_uid, frame_uid, geom)
    writer = InstanceWriter(ds, out / "dicom", "explicit")
    names = []
    for k in range(geom.shape[0]):
        re = clean[k] + rng.normal(0.0, 10.0, clean[k].shape).astype(np.float32)
        im = rng.normal(0.0, 10.0, clean[k].shape).astype(np.float32)
        pos = geom.slice_position(k)
        names.append(writer.write(np.clip(np.rint(np.hypot(re, im)), 0, 4095).astype(np.uint16),
                                  derived_uid(series_uid, "instance", k), InstanceNumber=k + 1,
                                  ImagePositionPatient=[round(v, 4) for v in pos], SliceLocation=round(pos[2], 4)).name)
    write_labels(out / "labels.nii.gz", codes, geom)
    return names


def generate_head_ct_mr(out_dir: str | Path, *, seed: int = 0, rotation_deg=(4.0, -3.0, 6.0),
                        shift_mm=(7.0, -9.0, 12.0), landmarks: int = 24, ct_pixel_mm: float = 2.0,
                        mr_pixel_mm: float = 2.5, marker_mm=None,
                        marker_radius_mm: float = 5.0) -> tuple[PhantomStudy, PhantomStudy]:
    """One study, two series: ``out_dir/ct`` (fixed, identity pose) and ``out_dir/mr`` (the head
    placed by ``rotation_deg``/``shift_mm``: mr_point = R ct_point + t); truth in ``out_dir/registration.json``.
    ``marker_mm``: a bright sphere at that point of the head (CT patient mm), shown by both series."""
    seed = int_in("seed", seed, 0, 2**31 - 1)
    marker = None if marker_mm is None else (vector("marker_mm", marker_mm, 3),
                                             float_in("marker_radius_mm", marker_radius_mm, 1.0, 30.0))
    pose = Pose.from_degrees(vector("rotation_deg", rotation_deg, 3), vector("shift_mm", shift_mm, 3))
    landmarks = int_in("landmarks", landmarks, 20, 500)
    root = Path(out_dir)
    identity = ("hilum-phantom", "head-ct-mr", seed, tuple(rotation_deg), tuple(shift_mm), ct_pixel_mm, mr_pixel_mm,
                *(() if marker is None else (tuple(marker[0]), marker[1])))
    study = StudyInfo(patient_name="PHANTOM^HEAD", patient_id=f"PHANTOM-HEAD-{seed:06d}",
                      study_uid=derived_uid(*identity, "study"), study_date="20240412", study_time="101000",
                      accession=f"PHH{seed % 10**8:08d}", study_id="1", description="CT AND MR HEAD")
    rng = np.random.default_rng([seed, 9])
    ct_n = int(round(240 / ct_pixel_mm))
    mr_n = int(round(230 / mr_pixel_mm))
    ct_geom = axial_geometry(rows=ct_n, cols=ct_n, slices=int(round(210 / 3.0)), pixel_spacing=ct_pixel_mm,
                             slice_spacing=3.0)
    mr_geom = axial_geometry(rows=mr_n, cols=mr_n, slices=int(round(200 / 4.0)), pixel_spacing=mr_pixel_mm,
                             slice_spacing=4.0, center_z=10.0)
    studies = []
    for kind, geom in (("ct", ct_geom), ("mr", mr_geom)):
        out = prepare_out_dir(root / kind)
        series_uid, frame_uid = derived_uid(*identity, kind, "series"), derived_uid(*identity, kind, "frame")
        names = (_head_ct(out, study, series_uid, frame_uid, geom, rng, marker) if kind == "ct"
                 else _head_mr(out, study, series_uid, frame_uid, geom, pose, rng, marker))
        write_json(out / "labels.json", mr_label_table())
        write_json(out / MANIFEST, {
            "generator": "hilum phantom", "modality": kind.upper(), "seed": seed, "options": {},
            "patient": {"name": study.patient_name, "id": study.patient_id}, "study_uid": study.study_uid,
            "study_date": study.study_date, "series_uid": series_uid, "frame_of_reference_uid": frame_uid,
            "geometry": geometry_json(geom),
            "pose": {"matrix": (pose if kind == "mr" else Pose()).matrix(),
                     "note": "anatomical frame (= the CT's patient coordinates) → this series' patient coordinates"},
            "series": {series_uid: names},
            "files": {"dicom": "dicom", "labels": "labels.nii.gz", "label_table": "labels.json"},
        })
        studies.append(PhantomStudy.open(out))
    # Landmarks inside the brain and skull, where both images show structure.
    lm_rng = np.random.default_rng([seed, 10])
    a = lm_rng.uniform(-1, 1, (landmarks * 4, 3)) * (60.0, 80.0, 80.0)
    a = a[((a / (66.0, 86.0, 89.0)) ** 2).sum(axis=1) < 1.0][:landmarks]
    move = np.asarray(pose.matrix())
    write_json(root / REGISTRATION_TRUTH, {
        "note": "fixed = the CT, moving = the MR: moving_mm = R fixed_mm + t",
        "fixed_to_moving": move.tolist(),
        "rigid_moving_to_fixed": np.linalg.inv(move).tolist(),
        **({} if marker is None else {"marker": {"fixed_mm": list(marker[0]), "radius_mm": marker[1],
                                                 "moving_mm": [round(float(v), 4) for v in pose.to_patient(
                                                     np.asarray(marker[0], float)[None])[0]]}}),
        "landmarks": [{"fixed_mm": [round(float(v), 4) for v in p],
                       "moving_mm": [round(float(v), 4) for v in pose.to_patient(p)]} for p in a],
    })
    return studies[0], studies[1]
