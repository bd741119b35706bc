"""Phantom pairs for registration (node.phantom.pairs): the truth is self-consistent and realistic."""
from __future__ import annotations

import json

import numpy as np
import pytest

from node.phantom import generate_ct
from node.phantom.pairs import REGISTRATION_TRUTH, breathing_displacement, generate_breathing_followup, \
    generate_head_ct_mr
from node.volume import load_series
from tests.iod import assert_valid_iod


@pytest.fixture(scope="module")
def breathing(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    base = generate_ct(root / "base", seed=2, rows=96, cols=96, slices=40, pixel_spacing=4.0, slice_thickness=7.5,
                       nodules=0)
    return base, generate_breathing_followup(base, root / "fu", breathing_mm=12.0)


def test_breathing_followup_truth_is_consistent(breathing):
    base, fu = breathing
    truth = json.loads((fu.root / REGISTRATION_TRUTH).read_text())
    assert len(truth["landmarks"]) >= 20
    fixed = load_series(fu.series_files())
    assert fixed.first.PatientID == load_series(base.series_files()).first.PatientID
    assert fixed.first.FrameOfReferenceUID != base.frame_of_reference_uid
    assert fixed.first.StudyInstanceUID != base.study_uid
    field = np.load(fu.root / "displacement.npz")["displacement_mm"]
    g = fixed.volume.geometry
    for lm in truth["landmarks"]:
        k, j, i = np.rint(g.patient_to_index(lm["fixed_mm"])).astype(int)
        assert np.allclose(field[k, j, i], np.subtract(lm["moving_mm"], lm["fixed_mm"]), atol=1e-3)
    assert_valid_iod(fu.series_files()[0])


def test_breathing_moves_the_lung_bases_most_and_the_spine_least():
    base_of_lung = breathing_displacement([[80.0, 0.0, -85.0]], 15.0)[0]
    spine = breathing_displacement([[0.0, 60.0, -85.0]], 15.0)[0]
    apex = breathing_displacement([[80.0, 0.0, 100.0]], 15.0)[0]
    assert np.linalg.norm(base_of_lung) > 14.0 and np.linalg.norm(spine) < 2.0 and np.linalg.norm(apex) < 0.1
    assert base_of_lung[2] > 0  # the baseline content higher up is found here: the diaphragm descended


def test_head_ct_and_mr_share_patient_and_study_not_frame(tmp_path):
    ct, mr = generate_head_ct_mr(tmp_path / "head")
    c, m = load_series(ct.series_files()), load_series(mr.series_files())
    assert (c.modality, m.modality) == ("CT", "MR")
    assert c.first.PatientID == m.first.PatientID and c.first.StudyInstanceUID == m.first.StudyInstanceUID
    assert c.first.FrameOfReferenceUID != m.first.FrameOfReferenceUID
    truth = json.loads((tmp_path / "head" / REGISTRATION_TRUTH).read_text())
    t = np.array(truth["fixed_to_moving"])
    for lm in truth["landmarks"]:
        assert np.allclose(t[:3, :3] @ lm["fixed_mm"] + t[:3, 3], lm["moving_mm"], atol=1e-3)
    assert_valid_iod(ct.series_files()[0])
    assert_valid_iod(mr.series_files()[0])
