"""The randomised chest CT phantom family: anatomy drawn from the seed, recorded in the truth, and
the truth says what each drawn variant promises (touching lungs touch, cut coverage cuts)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from node.phantom import PhantomStudy, cli, generate_family_case
from node.phantom.chest import LUNG_LEFT, LUNG_RIGHT, TABLE
from node.phantom.family import COVERAGE, HABITUS, draw_anatomy
from node.volume import load_series

SEEDS = range(24)


def test_the_family_draws_every_variant():
    cases = [draw_anatomy(seed, 112, 56) for seed in SEEDS]
    assert {c.habitus for c in cases} == set(HABITUS)
    assert {c.junction for c in cases} == {"none", "anterior", "posterior", "both"}
    assert {c.base for c in cases} == {"flat", "domed"}
    assert {c.airway for c in cases} == {"absent", "thin", "normal"}
    assert {c.table for c in cases} == {"none", "gap", "touching"}
    assert {c.arms for c in cases} == {"none", "beside", "touching"}
    assert set(COVERAGE) == {c.coverage for c in cases}
    assert any(c.slice_thickness == 5.0 for c in cases)
    assert any(c.noise_hu >= 45.0 for c in cases) and any(c.noise_hu < 30.0 for c in cases)
    widths = [c.body_half_width for c in cases]
    assert min(widths) < 110 and max(widths) > 190  # child to obese
    hus = [c.lung_hu for c in cases]
    assert min(hus) < -860 and max(hus) > -760


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    made = {}

    def make(seed: int) -> PhantomStudy:
        if seed not in made:
            made[seed] = generate_family_case(tmp_path_factory.mktemp(f"fam{seed}") / "ct", seed, rows=64, slices=40)
        return made[seed]

    return make


def _seed(**want) -> int:
    return next(s for s in range(200) if all(getattr(draw_anatomy(s, 64, 40), k) == v for k, v in want.items()))


def test_a_case_is_deterministic_and_records_its_anatomy(case, tmp_path):
    study = case(3)
    again = generate_family_case(tmp_path / "again", 3, rows=64, slices=40)
    a = {p.name: p.read_bytes() for p in study.dicom_dir.iterdir()}
    b = {p.name: p.read_bytes() for p in again.dicom_dir.iterdir()}
    assert a == b
    family = study.manifest["family"]
    assert family == json.loads(json.dumps(draw_anatomy(3, 64, 40).to_json()))
    series = load_series(study.series_files())
    labels, geom = study.label_volume()
    assert labels.shape == series.volume.geometry.shape
    assert abs(series.volume.geometry.spacing[2] - family["slice_thickness"]) < 1e-3
    lung = np.isin(labels, (LUNG_LEFT, LUNG_RIGHT))
    hu = series.volume.array[lung]
    assert abs(np.median(hu) - family["lung_hu"]) < 40  # the drawn density is what the image shows


def test_touching_lungs_touch_and_separate_ones_do_not(case):
    touching = case(_seed(junction="anterior", coverage="full"))
    apart = case(_seed(junction="none", coverage="full"))

    def gap_voxels(study: PhantomStudy) -> int:
        labels, _ = study.label_volume()
        near_left = ndimage.binary_dilation(labels == LUNG_LEFT, iterations=1)
        return int((near_left & (labels == LUNG_RIGHT)).sum())

    assert gap_voxels(touching) > 0  # the junction line is thinner than a voxel
    assert gap_voxels(apart) == 0


@pytest.mark.parametrize("coverage", ["full", "apex_cut", "base_cut"])
def test_coverage_cuts_the_apex_or_the_base(case, coverage):
    study = case(_seed(coverage=coverage))
    labels, geom = study.label_volume()
    lung = np.isin(labels, (LUNG_LEFT, LUNG_RIGHT)).any(axis=(1, 2))
    z = [geom.slice_position(k)[2] for k in range(geom.shape[0])]
    top, bottom = lung[int(np.argmax(z))], lung[int(np.argmin(z))]
    assert (top, bottom) == {"full": (False, False), "apex_cut": (True, False), "base_cut": (False, True)}[coverage]


def test_a_touching_table_touches_the_body(case):
    study = case(_seed(table="touching"))
    labels, _ = study.label_volume()
    body = ndimage.binary_dilation(np.isin(labels, (0, TABLE), invert=True), iterations=1)
    assert (body & (labels == TABLE)).any()


def test_cli_family(tmp_path, capsys):
    assert cli([str(tmp_path / "f"), "--family", "--seed", "5", "--rows", "48", "--slices", "20"]) == 0
    study = PhantomStudy.open(tmp_path / "f")
    assert study.manifest["family"]["habitus"] in HABITUS
    assert cli([str(tmp_path / "g"), "--family", "--contrast"]) == 2
    assert "does not apply to --family" in capsys.readouterr().err
