"""Prediction with uncertainty, measured on hand-built ONNX models whose answer is known exactly, and the
active-learning strategies that turn per-case scores into an annotation queue."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from node.handler_api import HandlerInput, HandlerRefusal
from node.models.handler import ModelParams
from node.models.inference import load_model, onnx_runner, segment
from node.models.registry import model_handler
from node.models.uncertainty import CaseScore, UncertaintyParams, rank_cases, segment_with_uncertainty
from node.volume import Geometry, SeriesData, Volume
from tests.test_models_inference import CENTRE, GRIDS, RADIUS, card_dict, deploy, threshold_model

GEOM = GRIDS["axial"]


def ball(hu: int, geom: Geometry = GEOM) -> SeriesData:
    """A ball of ``hu`` in -800 HU air; the threshold model's logit inside is 0.05 * (hu + 250)."""
    kji = np.indices(geom.shape).reshape(3, -1).T
    dist = np.linalg.norm(geom.index_to_patient(kji) - CENTRE, axis=1).reshape(geom.shape)
    return SeriesData("1.2.826.0.1.3680043.8.498.1", "CT", [], Volume(np.where(dist < RADIUS, hu, -800).astype(np.int16),
                                                                      geom))


def _run(handler_cls, series, params):
    h = handler_cls(params)
    h.run(HandlerInput("1", [series]), lambda f, m: None)
    return h.provenance["uncertainty"]


def test_mean_of_the_passes_is_the_cards_tta_prediction(tmp_path):
    """With the card's own flips and no intensity passes, the labels are those of the plain TTA run."""
    folder = deploy(tmp_path)  # card tta_flips: [[x], [y, z]]
    cls = model_handler("model:ball", tmp_path)
    run = onnx_runner(load_model(folder, cls.card, "cpu"))
    series = ball(300)
    plain = segment([series.volume], cls.card, run)
    labels, record = segment_with_uncertainty([series.volume], cls.card, run, UncertaintyParams(intensity_scales=[]))
    assert (labels == 1).sum() > 1000
    # Source voxels midway between two network voxels sit at p = 0.5 exactly (a 0/1 edge interpolated):
    # float rounding decides those ties either way. Anywhere else the two runs agree voxel for voxel.
    kji = np.indices(GEOM.shape).reshape(3, -1).T
    dist = np.linalg.norm(GEOM.index_to_patient(kji) - CENTRE, axis=1).reshape(GEOM.shape)
    differ = labels != plain
    assert differ.mean() < 0.001 and (np.abs(dist[differ] - RADIUS) < 3.0).all()
    assert record["passes"] == 3 and record["pass_names"] == ["identity", "flip x", "flip yz"]
    # a per-voxel model is flip-equivariant: the passes agree exactly
    assert record["disagreement"] == 0.0


def test_a_hesitant_model_scores_higher_than_a_confident_one(tmp_path):
    deploy(tmp_path)
    cls = model_handler("model:ball", tmp_path)
    clear = _run(cls, ball(300), {"uncertainty": {}})  # logit 27.5 inside: p(ball) ~ 1
    faint = _run(cls, ball(-200), {"uncertainty": {}})  # logit 2.5 inside: p(ball) 0.92
    assert clear["score"] < 0.05 < 0.3 < faint["score"] < 0.5  # binary entropy of 0.92 is 0.40
    assert faint["per_label_entropy"]["Ball"] == pytest.approx(faint["score"])
    assert clear["passes"] == 5  # identity, two card flips, two intensity scalings
    # the intensity passes move the faint ball's edge, never the clear one's interior
    assert faint["disagreement"] > clear["disagreement"]
    assert len(clear["features"]) == 3 and clear["features"][0] > 0  # Ball volume fraction, mean, std


def test_disagreement_finds_what_the_flips_expose(tmp_path):
    """A model that reads its input 2 voxels back along z is not z-flip equivariant: a z-flip pass
    moves its answer by 4 voxels; an x-flip pass leaves it exactly where it was."""
    folder = tmp_path / "probe"
    folder.mkdir()
    threshold_model(folder / "model.onnx", mean=-1000.0, shift=2)
    card = card_dict("probe", inference={"patch_size": [16, 16, 16], "overlap": 0.5})
    card["preprocessing"].update(mean=-1000.0)
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    cls = model_handler("model:probe", tmp_path)
    series = ball(300)
    along_x = _run(cls, series, {"uncertainty": {"flips": [["x"]], "intensity_scales": []}})
    along_z = _run(cls, series, {"uncertainty": {"flips": [["z"]], "intensity_scales": []}})
    assert along_x["disagreement"] == 0.0
    # a 60 mm ball shifted 12 mm (4 voxels of 3 mm) against itself: a large part of it changes hands
    assert 0.15 < along_z["disagreement"] < 0.6


def test_stacked_passes_give_what_the_passes_one_by_one_give(tmp_path):
    """The test-time passes run as one batch per patch (the default) or pass after pass (a network with
    a fixed batch size): the same probabilities, the same record. The probe model is not flip-equivariant,
    so a flip undone on the wrong slice of the stacked answer would show."""
    from node.models.uncertainty import predict_with_uncertainty

    folder = tmp_path / "probe"
    folder.mkdir()
    threshold_model(folder / "model.onnx", mean=-1000.0, shift=2)
    card = card_dict("probe", inference={"patch_size": [16, 16, 16], "overlap": 0.5, "batch_size": 3})
    card["preprocessing"].update(mean=-1000.0)
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    cls = model_handler("model:probe", tmp_path)
    run = onnx_runner(load_model(folder, cls.card, "cpu"))
    params = UncertaintyParams(flips=[["z"], ["x", "y"]], intensity_scales=[0.8, 1.25])
    calls = []

    def counted(batch):
        calls.append(len(batch))
        return run(batch)

    volume = ball(-100).volume
    stacked = predict_with_uncertainty([volume], cls.card, counted, params, stack_passes=True)
    n_stacked, calls[:] = list(calls), []
    one_by_one = predict_with_uncertainty([volume], cls.card, counted, params, stack_passes=False)
    assert len(calls) == 5 * len(n_stacked) and max(n_stacked) == 5 * max(calls)  # 5 passes, 1 call per patch
    assert np.allclose(stacked.entropy, one_by_one.entropy, atol=1e-5)
    assert (stacked.labels != one_by_one.labels).mean() < 0.001
    assert stacked.record["pass_names"] == one_by_one.record["pass_names"]
    assert stacked.record["disagreement"] == pytest.approx(one_by_one.record["disagreement"], abs=1e-3)
    assert stacked.record["disagreement"] > 0.1  # the z flip moves the probe's answer: the check has teeth
    assert stacked.record["score"] == pytest.approx(one_by_one.record["score"], abs=1e-4)


def test_no_second_pass_is_refused_and_bad_params_name_the_field(tmp_path):
    folder = tmp_path / "noflip"
    folder.mkdir()
    threshold_model(folder / "model.onnx")
    card = card_dict("noflip")
    card["inference"]["tta_flips"] = []
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    cls = model_handler("model:noflip", tmp_path)
    with pytest.raises(HandlerRefusal, match="at least two passes"):
        cls({"uncertainty": {"intensity_scales": []}}).run(HandlerInput("1", [ball(300)]), lambda f, m: None)
    with pytest.raises(ValidationError, match=r"uncertainty.intensity_scales"):
        ModelParams.model_validate({"uncertainty": {"intensity_scales": [1.0]}})
    with pytest.raises(ValidationError, match=r"uncertainty.passes"):
        ModelParams.model_validate({"uncertainty": {"passes": 4}})


CASES = [CaseScore("a", 0.90, (0.0, 0.0)), CaseScore("a-twin", 0.85, (0.01, 0.0)),
         CaseScore("b", 0.50, (5.0, 5.0)), CaseScore("c", 0.10, (0.0, 5.0))]


def test_strategies_pick_with_a_reason():
    picks = rank_cases(CASES, "uncertainty")
    assert [p.case for p in picks] == ["a", "a-twin", "b", "c"] and picks[0].reason.startswith("uncertainty 0.9000")
    # diverse: the near-duplicate of the first pick waits behind a different, less uncertain case
    diverse = rank_cases(CASES, "diverse", n=3)
    assert [p.case for p in diverse] == ["a", "b", "c"]
    assert "distance" in diverse[1].reason
    r1, r2 = rank_cases(CASES, "random", seed=7), rank_cases(CASES, "random", seed=7)
    assert [p.case for p in r1] == [p.case for p in r2] and sorted(p.case for p in r1) == sorted(c.case for c in CASES)
    assert len(rank_cases(CASES, "uncertainty", n=2)) == 2
    with pytest.raises(ValueError, match="strategy must be one of uncertainty, random, diverse"):
        rank_cases(CASES, "hardest")


@pytest.mark.slow
def test_an_unseen_phantom_variant_tops_the_uncertainty_queue(tmp_path):
    """The shipped model never saw a consolidated lung: that study's score is above the normal ones', and
    the uncertainty strategy queues it first. (An effusion phantom is *not* reliably above the normals
    with the first model: measured 0.1988 against 0.1998, so it is not asserted.) The margin is relative:
    the model retrained on the phantom family (issue 22) is surer everywhere, its scores five times
    lower (measured 0.0400 against 0.0374 for the normals)."""
    from pathlib import Path

    from node.phantom import generate_ct
    from node.volume import load_series

    cls = model_handler("model:hilum-ct-chest")
    cases = []
    for i, opts in enumerate([{}, {}, {"consolidation": "right"}]):
        st = generate_ct(tmp_path / f"ct{i}", seed=60 + i, rows=96, cols=96, slices=40, pixel_spacing=4.0,
                         slice_thickness=5.0, nodules=0, **opts)
        record = _run(cls, load_series(sorted(Path(st.dicom_dir).iterdir())), {"uncertainty": {}})
        cases.append(CaseScore("consolidation" if opts else f"normal-{i}", record["score"], tuple(record["features"])))
    normal = max(c.score for c in cases if c.case.startswith("normal"))
    assert cases[2].score > normal * 1.05, cases
    assert rank_cases(cases, "uncertainty")[0].case == "consolidation"
    assert rank_cases(cases, "diverse")[0].case == "consolidation"
