"""The phantom generator: conformant files, and ground truth that the images agree with.

Accuracy is measured against the truth the generator writes (label volume, label table, nodules,
changes), in the images as ``node.volume.load_series`` reads them back.
"""
from __future__ import annotations

import hashlib
import json
import time
from datetime import date

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from node.phantom import PhantomStudy, cli, generate_ct, generate_followup
from node.phantom.ct import CTOptions
from node.phantom.dicom_io import TRANSFER_SYNTAXES, InstanceWriter, SeriesInfo, StudyInfo, set_pixel_format, \
    series_template
from node.volume import Volume, load_series
from tests.iod import dciodvfy

SMALL = dict(rows=96, cols=96, pixel_spacing=4.0, slices=50, slice_thickness=6.0, nodules=1)


# --- helpers --------------------------------------------------------------------------------------

def volume(study: PhantomStudy) -> Volume:
    series = load_series(study.series_files())
    assert series.volume is not None, series.volume_error
    return series.volume


def truth(study: PhantomStudy, vol: Volume) -> np.ndarray:
    """The label volume, checked to lie on exactly the grid of the loaded image series."""
    labels, geom = study.label_volume()
    assert labels.shape == vol.geometry.shape
    np.testing.assert_allclose(geom.origin, vol.geometry.origin, atol=1e-3)
    np.testing.assert_allclose(geom.spacing, vol.geometry.spacing, atol=1e-4)
    np.testing.assert_allclose(geom.direction, vol.geometry.direction, atol=1e-6)
    return labels


def intended_hu(study: PhantomStudy) -> dict[int, float]:
    return {e["value"]: e["hu"] for e in study.label_table["labels"] if e["hu"] is not None}


def ball(vol: Volume, center_mm, radius_mm: float) -> tuple[np.ndarray, ...]:
    """Voxel indices (k, j, i) within ``radius_mm`` of a patient point."""
    g = vol.geometry
    c = g.patient_to_index(center_mm)
    step = np.asarray(g.spacing)[::-1]
    lo = np.maximum(np.floor(c - radius_mm / step).astype(int), 0)
    hi = np.minimum(np.ceil(c + radius_mm / step).astype(int) + 1, g.shape)
    kji = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), axis=-1)
    inside = np.linalg.norm(g.index_to_patient(kji) - np.asarray(center_mm), axis=-1) <= radius_mm
    return tuple(kji[inside].T)


def centroid_mm(labels: np.ndarray, values, vol: Volume) -> np.ndarray:
    kji = np.argwhere(np.isin(labels, values))
    return vol.geometry.index_to_patient(kji).mean(axis=0)


def nodule_volume_in_image(vol: Volume, center, search_radius: float, nodule_hu: float) -> float:
    """mm³ of voxels brighter than halfway between lung and nodule, near ``center``."""
    threshold = (nodule_hu + -850.0) / 2
    idx = ball(vol, center, search_radius)
    return float(np.count_nonzero(vol.array[idx] > threshold) * np.prod(vol.geometry.spacing))


def assert_valid(path) -> None:
    errors, warnings = dciodvfy(path)
    assert not errors, f"{path}: " + "\n".join(errors)
    assert not warnings, f"{path}: " + "\n".join(warnings)


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fine(tmp_path_factory) -> PhantomStudy:
    """2 mm voxels from the upper abdomen to the lower neck, 4 nodules of 12-20 mm, with a localizer."""
    return generate_ct(tmp_path_factory.mktemp("fine") / "study", seed=5, rows=192, cols=192, slices=100,
                       pixel_spacing=2.0, slice_thickness=2.0, nodules=4, nodule_diameter_mm=(12.0, 20.0),
                       localizer=True)


@pytest.fixture(scope="module")
def fine_followup(fine, tmp_path_factory) -> PhantomStudy:
    return generate_followup(fine, tmp_path_factory.mktemp("fine_fu") / "study", seed=11, new_nodules=1)


@pytest.fixture(scope="module")
def sharp(tmp_path_factory) -> PhantomStudy:
    """No edge blur and 2 mm slices: every voxel shows exactly its label's HU plus noise."""
    return generate_ct(tmp_path_factory.mktemp("sharp") / "study", seed=2, rows=128, cols=128, slices=150,
                       pixel_spacing=2.8, slice_thickness=2.0, nodules=3, nodule_diameter_mm=(10.0, 16.0),
                       blur=False, contrast=True)


# --- conformance and loading ----------------------------------------------------------------------

def test_ct_instances_are_valid_ct_image_iods(phantom_ct):
    files = phantom_ct.series_files()
    series = load_series(files, with_pixels=False)
    uids = [series.datasets[k].SOPInstanceUID for k in (0, len(files) // 2, len(files) - 1)]
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in files}
    for uid in uids:
        assert_valid(by_uid[uid])


def test_ct_loads_as_a_volume_with_the_requested_geometry(phantom_ct):
    vol = volume(phantom_ct)
    assert vol.geometry.shape == (60, 128, 128)
    np.testing.assert_allclose(vol.geometry.spacing, (2.8, 2.8, 5.0))
    np.testing.assert_allclose(vol.geometry.direction, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    # centred on the chest: slices from z = -147.5 (feet) to +147.5 (head), LPS
    np.testing.assert_allclose(vol.geometry.slice_position(0), (-177.8, -177.8, -147.5), atol=1e-3)
    np.testing.assert_allclose(vol.geometry.slice_position(59)[2], 147.5, atol=1e-3)
    assert vol.array.dtype == np.int16 and vol.array.min() >= -1024
    truth(phantom_ct, vol)  # the label volume is on the same grid


def test_default_geometry_is_512_by_512_at_0_7_mm_with_1_mm_slices(tmp_path):
    defaults = CTOptions()
    assert (defaults.rows, defaults.cols, defaults.slices) == (512, 512, 300)
    study = generate_ct(tmp_path / "default", slices=4, nodules=0)  # default matrix, few slices
    vol = volume(study)
    assert vol.geometry.shape == (4, 512, 512)
    np.testing.assert_allclose(vol.geometry.spacing, (0.7, 0.7, 1.0))
    truth(study, vol)
    assert_valid(study.series_files()[0])


def test_file_names_do_not_reveal_slice_order(phantom_ct):
    files = phantom_ct.series_files()
    by_name = sorted(files, key=lambda p: p.name)
    z_by_name = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in by_name]
    assert z_by_name != sorted(z_by_name) and z_by_name != sorted(z_by_name, reverse=True)
    assert all(len(p.stem) == 20 and p.suffix == ".dcm" for p in files)
    series = load_series(files, with_pixels=False)
    z = [float(d.ImagePositionPatient[2]) for d in series.datasets]
    np.testing.assert_allclose(np.diff(z), 5.0)
    assert [int(d.InstanceNumber) for d in series.datasets] == list(range(60, 0, -1))  # 1 = head end


def test_headers_are_synthetic_consistent_and_unique(phantom_ct):
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in phantom_ct.series_files()]
    first = headers[0]
    assert str(first.PatientName) == "PHANTOM^CHEST" and first.PatientID == "PHANTOM-000001"
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "StudyDate", "AccessionNumber"):
        assert len({str(h.get(name)) for h in headers}) == 1, name
    assert first.StudyInstanceUID == phantom_ct.study_uid and first.SeriesInstanceUID == phantom_ct.series_uid
    assert len({h.SOPInstanceUID for h in headers}) == len(headers)
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and first.Modality == "CT"
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert first.BodyPartExamined == "CHEST" and first.PatientPosition == "HFS"
    assert (first.RescaleIntercept, first.RescaleSlope) == (-1024, 1)
    assert (first.BitsAllocated, first.BitsStored, first.PixelRepresentation) == (16, 12, 0)
    assert first.AccessionNumber and first.StudyDate and first.SeriesDescription
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


def test_same_seed_same_bytes_other_seed_other_study(tmp_path):
    opts = dict(rows=48, cols=48, slices=8, pixel_spacing=8.0, slice_thickness=5.0, nodules=1)
    a = generate_ct(tmp_path / "a", seed=7, **opts)
    time.sleep(1.1)  # nothing may depend on the clock (file dates, gzip headers)
    b = generate_ct(tmp_path / "b", seed=7, **opts)
    c = generate_ct(tmp_path / "c", seed=8, **opts)

    def digest(study):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in [*study.dicom_dir.iterdir(), study.labels, study.nodules_path, study.label_table_path]}

    assert digest(a) == digest(b)
    assert a.study_uid == b.study_uid and c.study_uid != a.study_uid
    assert not set(digest(a)) & set(p.name for p in c.dicom_dir.iterdir())


# --- truth against image --------------------------------------------------------------------------

def test_mean_hu_in_every_label_is_its_intended_hu(sharp):
    vol = volume(sharp)
    labels = truth(sharp, vol)
    hu = intended_hu(sharp)
    present = set(np.unique(labels).tolist())
    # drawn only when asked for
    optional = {sharp.label(name) for name in ("marker", "effusion", "bowel_gas", "pulmonary_vessel")}
    assert present >= set(hu) - optional, "every anatomical label appears"
    for value, want in hu.items():
        if value not in present:
            continue
        got = vol.array[labels == value]
        assert abs(got.mean() - want) <= 6.0, (value, got.mean(), want, got.size)
    soft = vol.array[labels == sharp.label("soft_tissue")]
    assert 12.0 <= soft.std() <= 18.0  # sigma 15 HU noise
    lung = vol.array[labels == sharp.label("lung_left")]
    assert soft.std() + 3 < lung.std() < 45.0  # noise plus the mild parenchymal texture
    assert sharp.label_table["contrast"] is True and hu[sharp.label("aorta")] == 300


def test_partial_volume_blur_leaves_label_interiors_at_their_hu(fine):
    vol = volume(fine)
    labels = truth(fine, vol)
    hu = intended_hu(fine)
    for name in ("soft_tissue", "subcutaneous_fat", "lung_left", "lung_right", "heart_blood", "aorta", "liver",
                 "airway"):
        inner = ndimage.binary_erosion(labels == fine.label(name), np.ones((1, 3, 3)))  # the blur's reach
        assert inner.sum() > 100, name
        assert abs(vol.array[inner].mean() - hu[fine.label(name)]) <= 8.0, name
    # ... while edges are mixed: the lung voxels next to soft tissue are brighter than lung
    lung = labels == fine.label("lung_right")
    rim = lung & ndimage.binary_dilation(labels == fine.label("soft_tissue"))
    assert vol.array[rim].mean() > hu[fine.label("lung_right")] + 100


def test_label_table_names_left_and_right_as_in_the_image(phantom_ct):
    table = phantom_ct.label_table
    by_name = {e["name"]: e for e in table["labels"]}
    assert by_name["lung_left"]["side"] == "left" and by_name["lung_right"]["side"] == "right"
    assert table["left_lung"] == by_name["lung_left"]["value"]
    assert not by_name["table"]["part_of_patient"] and by_name["liver"]["part_of_patient"]
    assert set(table["groups"]["bone"]) == {by_name["cortical_bone"]["value"], by_name["cancellous_bone"]["value"]}
    vol = volume(phantom_ct)
    labels = truth(phantom_ct, vol)
    left = centroid_mm(labels, phantom_ct.label("lung_left"), vol)
    right = centroid_mm(labels, phantom_ct.label("lung_right"), vol)
    liver = centroid_mm(labels, phantom_ct.label("liver"), vol)
    heart = centroid_mm(labels, table["groups"]["heart"], vol)
    assert left[0] > 40 and right[0] < -40  # LPS: +x is the patient's left
    assert liver[0] < 0 and heart[0] > 0  # liver on the right, heart toward the left
    assert heart[1] < 0  # anterior (-y)


def test_table_lies_under_the_patient_without_touching(phantom_ct):
    vol = volume(phantom_ct)
    labels = truth(phantom_ct, vol)
    patient = np.isin(labels, phantom_ct.label_table["groups"]["patient"])
    table = labels == phantom_ct.label("table")
    rows_patient, rows_table = np.nonzero(patient.any(axis=(0, 2)))[0], np.nonzero(table.any(axis=(0, 2)))[0]
    assert rows_table.min() > rows_patient.max()  # below (+y, posterior) every patient voxel
    assert not (ndimage.binary_dilation(table) & patient).any()
    plate = ndimage.binary_erosion(table, np.ones((1, 3, 1)))
    assert abs(vol.array[plate].mean() - intended_hu(phantom_ct)[phantom_ct.label("table")]) < 40


def test_airway_runs_from_the_neck_into_both_lungs(fine):
    vol = volume(fine)
    labels = truth(fine, vol)
    airway = labels == fine.label("airway")
    comps, n = ndimage.label(airway, np.ones((3, 3, 3)))
    assert n == 1  # trachea, main and lobar bronchi: one tree
    assert airway[-1].any()  # reaches the top slice (neck)
    near = ndimage.binary_dilation(airway, np.ones((3, 3, 3)))
    for side in ("lung_left", "lung_right"):
        assert (near & (labels == fine.label(side))).sum() > 20, side
    assert vol.array[ndimage.binary_erosion(airway)].mean() < -950  # air


def test_nodules_are_inside_the_lungs_where_the_image_shows_them(fine):
    vol = volume(fine)
    labels = truth(fine, vol)
    lungs = fine.label_table["groups"]["lungs"]
    assert len(fine.nodules) == 4
    for nod in fine.nodules:
        r = nod["radius_mm"]
        assert 12.0 <= nod["diameter_mm"] <= 20.0 and nod["type"] in ("solid", "ground_glass")
        assert nod["volume_mm3"] == pytest.approx(4 / 3 * np.pi * r**3, rel=1e-3)
        core = ball(vol, nod["center_mm"], r / 2)
        assert abs(vol.array[core].mean() - nod["hu"]) < 25, nod
        assert np.all(labels[core] == nod["label"])
        shell = ball(vol, nod["center_mm"], r + 3.0)
        around = labels[shell][labels[shell] != nod["label"]]
        assert np.isin(around, lungs).all(), f"{nod['id']} touches non-lung"
        side = fine.label(f"lung_{nod['side']}")
        assert (around == side).mean() > 0.99
        np.testing.assert_allclose(vol.geometry.patient_to_index(nod["center_mm"]), nod["center_voxel_kji"], atol=1e-2)
        measured = nodule_volume_in_image(vol, nod["center_mm"], r + 2.5, nod["hu"])
        assert measured == pytest.approx(nod["volume_mm3"], rel=0.2)


# --- follow-up ------------------------------------------------------------------------------------

def test_followup_is_a_later_study_of_the_same_patient(fine, fine_followup):
    a, b = fine.manifest, fine_followup.manifest
    assert fine_followup.patient_id == fine.patient_id
    assert fine_followup.study_uid != fine.study_uid
    assert fine_followup.frame_of_reference_uid != fine.frame_of_reference_uid
    days = (date.fromisoformat(_iso(b["study_date"])) - date.fromisoformat(_iso(a["study_date"]))).days
    assert days == fine_followup.changes["interval_days"] == 180
    assert b["followup_of"] == fine.study_uid
    assert_valid(fine_followup.series_files()[0])


def _iso(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:]}"


def test_followup_records_every_kind_of_change(fine, fine_followup):
    changes = fine_followup.changes
    status = {c["id"]: c["status"] for c in changes["nodules"]}
    assert sorted(status.values()) == ["grown", "new", "shrunk", "stable", "vanished"]
    present = {n["id"]: n for n in fine_followup.nodules}
    assert set(present) == {i for i, s in status.items() if s != "vanished"}
    m = np.asarray(changes["transform"]["matrix"])
    for c in changes["nodules"]:
        if c["baseline"] and c["followup"]:
            # same anatomical spot, moved with the patient
            moved = m[:3, :3] @ c["baseline"]["center_mm"] + m[:3, 3]
            np.testing.assert_allclose(moved, c["followup"]["center_mm"], atol=0.01)
            assert c["volume_ratio"] == pytest.approx(c["followup"]["volume_mm3"] / c["baseline"]["volume_mm3"],
                                                      rel=1e-3)
        if c["followup"]:
            assert present[c["id"]]["change"] == c["status"]
            np.testing.assert_allclose(present[c["id"]]["center_mm"], c["followup"]["center_mm"], atol=0.01)


def test_followup_changes_are_present_in_the_images(fine, fine_followup):
    before, after = volume(fine), volume(fine_followup)
    for c in fine_followup.changes["nodules"]:
        b, f = c["baseline"], c["followup"]
        hu = -500.0 if (b or f)["type"] == "ground_glass" else 40.0
        radius = max(x["diameter_mm"] for x in (b, f) if x) / 2 + 2.5
        m = np.asarray(fine_followup.changes["transform"]["matrix"])
        center_b = b["center_mm"] if b else np.linalg.solve(m[:3, :3], np.asarray(f["center_mm"]) - m[:3, 3])
        center_f = f["center_mm"] if f else m[:3, :3] @ b["center_mm"] + m[:3, 3]
        vol_b = nodule_volume_in_image(before, center_b, radius, hu)
        vol_f = nodule_volume_in_image(after, center_f, radius, hu)
        if c["status"] == "vanished":
            assert vol_f < 0.05 * b["volume_mm3"] and vol_b == pytest.approx(b["volume_mm3"], rel=0.2)
        elif c["status"] == "new":
            assert vol_b < 0.05 * f["volume_mm3"] and vol_f == pytest.approx(f["volume_mm3"], rel=0.2)
        else:
            assert vol_f / vol_b == pytest.approx(c["volume_ratio"], rel=0.25), c


def test_followup_transform_moves_the_anatomy(fine, fine_followup):
    before, after = volume(fine), volume(fine_followup)
    lb, lf = truth(fine, before), truth(fine_followup, after)
    m = np.asarray(fine_followup.changes["transform"]["matrix"])
    assert np.abs(m[:3, 3]).max() > 1.0 or not np.allclose(m[:3, :3], np.eye(3))  # it did move
    heart = fine.label_table["groups"]["heart"]  # wholly inside both scans, unlike lungs and liver
    moved = m[:3, :3] @ centroid_mm(lb, heart, before) + m[:3, 3]
    np.testing.assert_allclose(moved, centroid_mm(lf, heart, after), atol=1.0)
    for c in fine_followup.changes["nodules"]:
        if c["status"] == "stable":  # its truth voxels sit where the transform puts them
            idx = ball(after, c["followup"]["center_mm"], c["followup"]["diameter_mm"] / 2 + 2)
            inside = np.isin(lf[idx], fine.label_table["groups"]["nodules"])
            kji = np.column_stack(idx)[inside]
            assert len(kji) > 50
            np.testing.assert_allclose(after.geometry.index_to_patient(kji).mean(axis=0),
                                       m[:3, :3] @ c["baseline"]["center_mm"] + m[:3, 3], atol=1.0)
    hu = intended_hu(fine_followup)
    for name in ("lung_left", "liver", "heart_blood"):
        inner = ndimage.binary_erosion(lf == fine_followup.label(name))
        assert abs(after.array[inner].mean() - hu[fine_followup.label(name)]) <= 8.0, name


# --- variants -------------------------------------------------------------------------------------

@pytest.mark.parametrize("syntax", ["implicit", "rle", "j2k"])
def test_other_transfer_syntaxes_decode_to_the_same_pixels(tmp_path, syntax):
    opts = dict(seed=4, rows=64, cols=64, slices=10, pixel_spacing=6.0, slice_thickness=5.0, nodules=1)
    ref = generate_ct(tmp_path / "explicit", **opts)
    other = generate_ct(tmp_path / syntax, transfer_syntax=syntax, **opts)
    assert other.study_uid == ref.study_uid  # same instances, another encoding
    np.testing.assert_array_equal(volume(other).array, volume(ref).array)
    f = other.series_files()[0]
    uid = {"implicit": "1.2.840.10008.1.2", "rle": "1.2.840.10008.1.2.5", "j2k": "1.2.840.10008.1.2.4.90"}[syntax]
    assert pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID == uid
    assert_valid(f)


def test_feet_first_flips_rows_and_slice_order_not_anatomy(tmp_path):
    study = generate_ct(tmp_path / "ffs", seed=6, patient_position="FFS", **SMALL)
    first = pydicom.dcmread(study.series_files()[0], stop_before_pixels=True)
    assert first.PatientPosition == "FFS"
    assert [float(v) for v in first.ImageOrientationPatient] == [-1, 0, 0, 0, 1, 0]
    vol = volume(study)
    labels = truth(study, vol)
    assert vol.geometry.slice_position(0)[2] > vol.geometry.slice_position(49)[2]  # head at k = 0
    k_of = lambda name: np.argwhere(labels == study.label(name))[:, 0].mean()  # noqa: E731
    assert k_of("airway") < k_of("liver")
    j, i = np.argwhere(labels == study.label("lung_left"))[:, 1:].mean(axis=0)
    assert i < labels.shape[2] / 2  # columns run toward the patient's right: left lung on the low side
    assert centroid_mm(labels, study.label("lung_left"), vol)[0] > 40  # still patient left in LPS
    hu = intended_hu(study)
    for name in ("lung_left", "liver", "soft_tissue"):
        inner = ndimage.binary_erosion(labels == study.label(name))
        assert abs(vol.array[inner].mean() - hu[study.label(name)]) <= 10.0, name
    assert_valid(study.series_files()[0])


def test_arms_down_beside_the_chest_arms_up_beside_the_head(tmp_path):
    opts = {**SMALL, "pixel_spacing": 5.5}  # 528 mm: wide enough for arms at the sides
    down = generate_ct(tmp_path / "down", seed=6, arms="down", **opts)
    up = generate_ct(tmp_path / "up", seed=6, arms="up", **opts)

    def lateral_bone(study, z_lo, z_hi):
        vol = volume(study)
        labels = truth(study, vol)
        kji = np.argwhere(np.isin(labels, study.label_table["groups"]["bone"]))
        xyz = vol.geometry.index_to_patient(kji)
        sel = (xyz[:, 2] > z_lo) & (xyz[:, 2] < z_hi)
        return np.abs(xyz[sel, 0]).max(initial=0.0)

    assert lateral_bone(down, -60, 60) > 170  # humeri beside the chest
    assert lateral_bone(up, -60, 60) < 150  # only ribs there
    assert lateral_bone(up, 125, 160) > 100  # humeri beside the neck/head
    assert up.manifest["options"]["arms"] == "up"


def test_contrast_fills_blood_pools(tmp_path):
    plain = generate_ct(tmp_path / "plain", seed=6, **SMALL)
    ce = generate_ct(tmp_path / "ce", seed=6, contrast=True, **SMALL)
    for study, want in ((plain, 40), (ce, 300)):
        vol = volume(study)
        labels = truth(study, vol)
        inner = ndimage.binary_erosion(labels == study.label("aorta"), np.ones((1, 3, 3)))
        assert abs(vol.array[inner].mean() - want) < 25
        assert intended_hu(study)[study.label("heart_blood")] == want
    first = pydicom.dcmread(ce.series_files()[0], stop_before_pixels=True)
    assert first.ContrastBolusAgent and "CONTRAST" in first.StudyDescription
    assert_valid(ce.series_files()[0])  # with the Contrast/Bolus module


def test_consolidation_is_dense_but_still_lung(tmp_path):
    study = generate_ct(tmp_path / "cons", seed=6, consolidation="right", **SMALL)
    vol = volume(study)
    labels = truth(study, vol)
    finding = study.manifest["findings"][0]
    region = finding["region_anatomical"]
    kji = np.argwhere(labels == study.label("lung_right"))
    xyz = vol.geometry.index_to_patient(kji)
    dense = (xyz[:, 2] < region["z_below_mm"] - 6) & (xyz[:, 1] > region["y_above_mm"] + 8)
    hu = vol.array[tuple(kji.T)]
    assert dense.sum() > 50
    assert abs(hu[dense].mean() - finding["hu"]) < 40  # ~35 HU, labelled right lung
    assert hu[~dense & (xyz[:, 2] > region["z_below_mm"] + 10)].mean() < -800
    left = ndimage.binary_erosion(labels == study.label("lung_left"))
    assert vol.array[left].mean() < -800  # the other lung is untouched
    for nod in study.nodules:  # never buried in the consolidation: each still shows as a nodule
        core = ball(vol, nod["center_mm"], nod["radius_mm"] / 2)
        assert np.all(labels[core] == nod["label"])


def test_effusion_is_fluid_layering_posteriorly_with_a_label_of_its_own(tmp_path):
    grid = {**SMALL, "pixel_spacing": 3.0, "nodules": 0}
    study = generate_ct(tmp_path / "eff", seed=6, effusion="left", **grid)
    plain = generate_ct(tmp_path / "plain", seed=6, **grid)
    vol = volume(study)
    labels, before = truth(study, vol), truth(plain, volume(plain))
    fluid = labels == study.label("effusion")
    (finding,) = study.manifest["findings"]
    assert finding["type"] == "effusion" and finding["label"] == study.label("effusion")
    xyz = vol.geometry.index_to_patient(np.argwhere(fluid))
    assert (xyz[:, 0] > 0).all() and np.median(xyz[:, 1]) > 40  # left pleural space, at the back
    assert abs(np.median(vol.array[ndimage.binary_erosion(fluid)]) - finding["hu"]) < 10
    # It takes the place of the lung behind it (compressed): where it is, the lung was.
    lung_l = study.label("lung_left")
    assert (before[fluid] == lung_l).mean() > 0.95
    assert (labels == lung_l).sum() < (before == lung_l).sum() - 0.9 * fluid.sum()
    assert (labels == study.label("lung_right")).sum() == (before == plain.label("lung_right")).sum()
    # Thicker toward the base: more fluid in the lower half of the slices it occupies.
    z = xyz[:, 2]
    assert (z < np.median([z.min(), z.max()])).mean() > 0.5


def test_bowel_gas_lies_just_under_the_left_lung_base(tmp_path):
    study = generate_ct(tmp_path / "gas", seed=6, bowel_gas=True, z_center_mm=-60.0,
                       **{**SMALL, "pixel_spacing": 3.0, "slice_thickness": 2.0, "slices": 60})
    vol = volume(study)
    labels = truth(study, vol)
    gas = labels == study.label("bowel_gas")
    lung = labels == study.label("lung_left")
    assert gas.sum() * np.prod(vol.geometry.spacing) > 20_000  # over 20 ml
    assert np.median(vol.array[ndimage.binary_erosion(gas)]) < -950
    # Within a voxel of the lung base (the diaphragm between them is thinner than one), never in it.
    gap = ndimage.distance_transform_edt(~lung, sampling=vol.geometry.spacing[::-1])[gas]
    assert gap.min() <= max(vol.geometry.spacing) and not (gas & lung).any()
    xyz = vol.geometry.index_to_patient(np.argwhere(gas))
    assert (xyz[:, 0] > 0).all() and xyz[:, 2].max() < -70.0  # left, under the dome


def test_small_field_of_view_crops_the_body_at_the_border(tmp_path):
    study = generate_ct(tmp_path / "fov", seed=6, fov_mm=260.0, **{**SMALL, "pixel_spacing": 0.7})
    vol = volume(study)
    assert vol.geometry.spacing[0] == pytest.approx(260.0 / 96)
    labels = truth(study, vol)
    patient = np.isin(labels, study.label_table["groups"]["patient"])
    assert patient[:, :, 0].any() and patient[:, :, -1].any()  # body crosses left and right borders
    assert vol.array[:, :, 0][patient[:, :, 0]].mean() > -200  # tissue, not air, at the edge
    assert pydicom.dcmread(study.series_files()[0], stop_before_pixels=True).ReconstructionDiameter == 260.0


def test_reconstruction_circle_is_padding_outside_and_no_truth_there(tmp_path):
    study = generate_ct(tmp_path / "circle", seed=6, fov_mm=260.0, padding_hu=-3024, **SMALL)
    vol = volume(study)
    labels = truth(study, vol)
    first = pydicom.dcmread(study.series_files()[0])
    assert (first.PixelPaddingValue, first.RescaleIntercept, first.BitsStored, first.PixelRepresentation) == \
        (0, -3024, 13, 0)
    assert_valid(study.series_files()[0])
    rows, cols = labels.shape[1:]
    j, i = np.mgrid[:rows, :cols]
    outside = (j - (rows - 1) / 2) ** 2 + (i - (cols - 1) / 2) ** 2 > (min(rows, cols) / 2) ** 2
    assert np.all(vol.array[:, outside] == -3024) and np.all(first.pixel_array[outside] == 0)
    assert np.all(labels[:, outside] == 0)  # not imaged: no truth there
    assert vol.array[:, ~outside].min() >= -1024  # everything reconstructed is at least air
    patient = np.isin(labels, study.label_table["groups"]["patient"])
    assert patient[:, ~outside].any() and vol.array[patient].mean() > -600
    (finding,) = study.manifest["findings"]
    assert finding["type"] == "reconstruction_circle" and finding["padding_hu"] == -3024


def test_arm_injection_fills_the_veins_with_dense_contrast(tmp_path):
    study = generate_ct(tmp_path / "inj", seed=6, injection="left", z_center_mm=40.0,
                        **{**SMALL, "slices": 40, "slice_thickness": 4.0})
    vol = volume(study)
    labels = truth(study, vol)
    vein = ndimage.binary_erosion(labels == study.label("vein"), np.ones((1, 3, 3)))
    assert vein.sum() > 20
    xyz = vol.geometry.index_to_patient(np.argwhere(vein))
    hu = vol.array[vein]
    svc = xyz[:, 2] < 95  # below the brachiocephalic vein: the superior vena cava
    assert abs(hu[svc].mean() - 900) < 60 and abs(hu[~svc].mean() - 1500) < 150
    assert xyz[~svc, 0].max() > 60  # the left arm's veins, patient left (+x)
    (finding,) = study.manifest["findings"]
    assert finding["type"] == "dense_contrast" and finding["side"] == "left"
    plain = truth(generate_ct(tmp_path / "plain", seed=6, z_center_mm=40.0,
                              **{**SMALL, "slices": 40, "slice_thickness": 4.0}), vol)
    assert not (plain == study.label("vein")).any()  # no injection, no veins drawn


def test_localizer_is_a_single_frontal_ct_localizer(fine):
    (path,) = fine.series_files(fine.localizer_series_uid)
    assert_valid(path)
    ds = pydicom.dcmread(path)
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"] and ds.Modality == "CT"
    assert ds.StudyInstanceUID == fine.study_uid and ds.SeriesInstanceUID != fine.series_uid
    assert ds.FrameOfReferenceUID == fine.frame_of_reference_uid
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]  # coronal, head at the top
    img = ds.pixel_array.astype(float)
    x0, z0 = float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[2])

    def at(x, z):  # mean in a 5x5 mm patch around patient (x, z)
        i, j = int(round(x - x0)), int(round(z0 - z))
        return img[j - 2:j + 3, i - 2:i + 3].mean()

    lung, spine, outside = at(-90, 20), at(0, 20), at(-240, 20)
    assert outside < lung < spine  # air < aerated lung < mediastinum + spine
    assert at(-90, -120) > lung  # liver below the right dome


def test_markers_are_bright_spheres_at_their_patient_positions(tmp_path):
    markers = [((30.0, -40.0, 20.0), 8.0, 2000.0), ((-100.0, -120.0, -60.0), 10.0, 1000.0)]  # in and outside
    study = generate_ct(tmp_path / "m", seed=6, markers=markers, **{**SMALL, "slice_thickness": 2.0,
                                                                      "slices": 100, "pixel_spacing": 3.0})
    vol = volume(study)
    labels = truth(study, vol)
    for center, radius, hu in markers:
        core = ball(vol, center, radius / 2)
        assert abs(vol.array[core].mean() - hu) < 30
        assert np.all(labels[core] == study.label("marker"))
    assert study.manifest["markers"][1]["hu"] == 1000.0


def test_thick_slices_average_through_the_slice(tmp_path):
    thin = generate_ct(tmp_path / "thin", seed=6, **{**SMALL, "slice_thickness": 1.0, "slices": 30})
    thick = generate_ct(tmp_path / "thick", seed=6, **{**SMALL, "slice_thickness": 5.0, "slices": 6})
    # Same z range: slices of 5 mm show the mean of the 1 mm anatomy within them (partial volume in z).
    a, b = volume(thin).array.astype(float), volume(thick).array.astype(float)
    thin_mean = a.reshape(6, 5, 96, 96).mean(axis=1)
    z_edges = np.abs(np.diff(a.reshape(6, 5, 96, 96), axis=1)).max(axis=1) > 400
    assert np.abs(thin_mean - b)[z_edges].mean() < np.abs(a[2::5] - b)[z_edges].mean()


# --- MR and CR ------------------------------------------------------------------------------------

def test_mr_is_a_valid_brain_like_volume(phantom_mr):
    files = phantom_mr.series_files()
    assert_valid(files[0])
    vol = volume(phantom_mr)
    assert vol.geometry.shape == (60, 256, 256)
    np.testing.assert_allclose(vol.geometry.spacing, (0.9375, 0.9375, 2.5))
    labels = truth(phantom_mr, vol)
    table = {e["name"]: e for e in phantom_mr.label_table["labels"]}
    for name in ("scalp", "skull", "csf", "grey_matter", "white_matter", "ventricles", "eyes"):
        inner = ndimage.binary_erosion(labels == table[name]["value"], np.ones((1, 3, 3)))
        assert inner.sum() > 20, name
        assert abs(vol.array[inner].mean() - table[name]["signal"]) < 20, name
    assert table["white_matter"]["signal"] > table["grey_matter"]["signal"] > table["csf"]["signal"]  # T1
    eyes = centroid_mm(labels, table["eyes"]["value"], vol)
    assert eyes[1] < -60  # anterior
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.Modality == "MR" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"


def test_cr_is_a_valid_pa_chest_radiograph(phantom_cr):
    (path,) = phantom_cr.series_files()
    assert_valid(path)
    ds = pydicom.dcmread(path)
    assert ds.Modality == "CR" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
    assert ds.ViewPosition == "PA" and list(ds.PatientOrientation) == ["L", "F"]
    img = ds.pixel_array.astype(float)
    assert img.shape == (1024, 1024)
    spacing = float(ds.ImagerPixelSpacing[0])
    top, x0 = phantom_cr.manifest["image"]["top_row_z_mm"], phantom_cr.manifest["image"]["first_column_x_mm"]

    def at(x, z):
        i, j = int(round((x - x0) / spacing)), int(round((top - z) / spacing))
        return img[j - 5:j + 6, i - 5:i + 6].mean()

    assert at(-250 + 60, 20) < at(-90, 20) < at(0, 20)  # air < lung < mediastinum/spine
    assert load_series([path]).volume is None  # one image, not a volume


# --- CLI and bad input ----------------------------------------------------------------------------

def test_cli_writes_studies_and_follow_ups(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli([str(out), "--seed", "3", "--rows", "48", "--cols", "48", "--slices", "10", "--spacing", "8",
                "--thickness", "5", "--nodules", "1", "--contrast", "--arms", "down",
                "--marker", "0,0,0,6,1500", "--transfer-syntax", "rle"]) == 0
    study = PhantomStudy.open(out)
    opts = study.manifest["options"]
    assert (opts["rows"], opts["slices"], opts["contrast"], opts["arms"]) == (48, 10, True, "down")
    assert opts["markers"] == [[[0.0, 0.0, 0.0], 6.0, 1500.0]]
    assert len(study.series_files()) == 10 and study.study_uid in capsys.readouterr().out
    fu = tmp_path / "fu"
    assert cli([str(fu), "--followup-of", str(out), "--shift", "2,0,-4", "--rotation", "0,0,1"]) == 0
    assert PhantomStudy.open(fu).changes["transform"]["translation_mm"] == [2.0, 0.0, -4.0]
    assert cli([str(tmp_path / "mr"), "--modality", "MR", "--rows", "64", "--cols", "64", "--slices", "8"]) == 0
    assert PhantomStudy.open(tmp_path / "mr").modality == "MR"


@pytest.mark.parametrize("args, message", [
    (["--rows", "5"], "rows must be an integer in [16, 2048]"),
    (["--thickness", "0"], "slice_thickness must be a number in (0.0, 20.0]"),
    (["--modality", "MR", "--nodules", "2"], "--nodules applies to CT only"),
    (["--shift", "1,2,3"], "--shift needs --followup-of"),
    (["--followup-of", "/nonexistent/phantom"], "holds no phantom study"),
])
def test_cli_reports_bad_input_and_fails(tmp_path, capsys, args, message):
    assert cli([str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    ({"rows": 5}, "rows must be"),
    ({"pixel_spacing": -1}, "pixel_spacing must be"),
    ({"arms": "sideways"}, "arms must be one of"),
    ({"contrast": 1}, "contrast must be one of"),
    ({"nodule_diameter_mm": (2, 40)}, "nodule_diameter_mm must be"),
    ({"markers": [((0, 0), 5, 100)]}, "markers[0].center must be 3 finite numbers"),
    ({"markers": [((0, 0, 0), 5, 9999)]}, "markers[0].hu must be"),
    ({"nodule_specs": [{"center_mm": [0, 0, 0], "diameter_mm": 10}]}, "nodule_specs[0]: a 10.0 mm nodule"),
    ({"nodule_specs": [{"center_mm": [80, 0, 0], "diameter_mm": 10, "kind": "x"}]}, "nodule_specs[0] must be"),
    ({"transfer_syntax": "jpeg"}, "transfer_syntax must be one of"),
    ({"padding_hu": -1000}, "padding_hu must be an integer in [-4000, -1025]"),
    ({"injection": "both"}, "injection must be one of"),
    ({"colour": "red"}, "unknown option(s) ['colour']"),
])
def test_bad_options_raise_naming_the_field(tmp_path, options, message):
    with pytest.raises(ValueError) as err:
        generate_ct(tmp_path / "x", seed=0, **{**SMALL, **options})
    assert message in str(err.value)


def test_existing_output_and_followup_misuse_are_refused(tmp_path, phantom_ct):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_ct(tmp_path / "busy", **SMALL)
    assert (tmp_path / "busy" / "file.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="nodules cannot change"):
        generate_followup(phantom_ct, tmp_path / "fu", nodules=5)
    with pytest.raises(ValueError, match="rotation_deg must be small"):
        generate_followup(phantom_ct, tmp_path / "fu2", rotation_deg=(0, 0, 45))


def test_specified_nodules_are_placed_exactly(tmp_path):
    spec = [{"center_mm": [85.0, 0.0, 10.0], "diameter_mm": 16.0, "type": "ground_glass"}]
    study = generate_ct(tmp_path / "spec", seed=6, nodule_specs=spec, **{**SMALL, "nodules": 1})
    (given, extra) = study.nodules
    assert given["center_mm"] == [85.0, 0.0, 10.0] and given["type"] == "ground_glass" and given["side"] == "left"
    assert extra["id"] == "N2"
    assert CTOptions(nodule_specs=spec).nodule_count == 0  # specs alone: no random ones
    assert json.loads(study.nodules_path.read_text()) == study.nodules


@pytest.mark.parametrize("syntax", ["explicit", "implicit", "rle", "j2k"])
def test_instance_writer_writes_what_pydicom_save_as_writes(tmp_path, syntax):
    study = StudyInfo("PHANTOM^TEST", "P1", "1.2.3", "20240101", "090000", "A1", "1", "test")
    template = series_template(study, SeriesInfo("CT", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 2, "x", "CHEST",
                                                 "1.2.3.5", "HFS"))
    set_pixel_format(template, 40, 32, bits_stored=12)
    template.PixelSpacing = [0.5, 0.5]
    reference = pydicom.Dataset()
    reference.update(template)
    reference.file_meta = pydicom.dataset.FileMetaDataset(template.file_meta)
    pixels = (np.arange(40 * 32).reshape(40, 32) * 7 % 4096).astype(np.uint16)
    path = InstanceWriter(template, tmp_path, syntax).write(
        pixels, "1.2.3.4.5.6", InstanceNumber=3, ImagePositionPatient=[1.5, 2.0, -3.25], SliceLocation=-3.25)

    reference.SOPInstanceUID = reference.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6"
    reference.InstanceNumber, reference.ImagePositionPatient, reference.SliceLocation = 3, [1.5, 2.0, -3.25], -3.25
    uid = TRANSFER_SYNTAXES[syntax]
    reference.file_meta.TransferSyntaxUID = uid
    if uid.is_compressed:
        reference.compress(uid, pixels, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    else:
        reference.PixelData = pixels.tobytes()
        reference["PixelData"].VR = "OW"
    reference.save_as(tmp_path / "reference.dcm", enforce_file_format=True)
    assert path.read_bytes() == (tmp_path / "reference.dcm").read_bytes()
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, pixels)
