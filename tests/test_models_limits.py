"""Models that know their limits: the card's validated domain checked before inference, plausibility and
confidence after it, enforced by the node (refused by default, or delivered with the warning in every object).

A hand-built ONNX model keeps the network's answer known: channel 1 ("Left lung") is every voxel below
-500 HU, channel 2 ("Right lung") is never predicted - a model output with a missing lung.
"""
from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import onnx
import pydicom
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from node.handler_api import HandlerInput, HandlerRefusal
from node.jobs.quality import QualityPolicy
from node.jobs.worker import JobSpec, run_job
from node.models import registry
from node.models.card import CardError, load_card
from node.models.domain import PERCENTILES, domain_from_facts, measure_input
from node.models.inference import Confidence, confidence, resample
from node.models.plausibility import output_flags
from node.phantom import generate_ct
from node.quality_checks import slice_gaps
from node.store.vault import Vault
from node.volume import Geometry, SeriesData, Volume, load_series
from tests.iod import assert_valid_iod
from tests.test_models_inference import card_dict

STD = 1000.0


def air_model(path: Path) -> None:
    """logits = [0, 0.05 * (-500 - HU), -10]: label 1 below -500 HU, label 2 never."""
    w = np.zeros((3, 1, 1, 1, 1), np.float32)
    b = np.array([0.0, 0.05 * -500.0, -10.0], np.float32)
    w[1, 0] = -0.05 * STD
    node = helper.make_node("Conv", ["image", "w", "b"], ["logits"])
    graph = helper.make_graph(
        [node], "air", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "z", "y", "x"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3, "z", "y", "x"])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _label(value: int, name: str, sct: str) -> dict:
    return {"value": value, "name": name, "category": {"value": "91723000", "meaning": "Anatomical Structure"},
            "type": {"value": sct, "meaning": name}, "color": [128, 174, 128]}


def lungs_card(**over) -> dict:
    return card_dict("lungs", **{
        "input": {"modality": "CT", "body_region": "CHEST", "target_spacing": [6.0, 6.0, 6.0]},
        "preprocessing": {"kind": "ct_window", "clip": [-1000, 1000], "mean": 0.0, "std": STD},
        "inference": {"patch_size": [16, 16, 16], "overlap": 0.25},
        "labels": [_label(1, "Left lung", "44029006"), _label(2, "Right lung", "3341006")],
        "emit": ["SEG", "RTSTRUCT", "SR"], **over})


def deploy(root: Path, card: dict) -> Path:
    folder = root / "lungs"
    folder.mkdir(parents=True, exist_ok=True)
    air_model(folder / "model.onnx")
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    return folder


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return generate_ct(tmp_path_factory.mktemp("lim") / "a", seed=3, rows=48, cols=48, slices=16,
                       pixel_spacing=7.0, slice_thickness=8.0, nodules=0)


@pytest.fixture(scope="module")
def fine_ct(tmp_path_factory):
    """The same anatomy scanned with 4 mm pixels: a pixel spacing the domain below never saw."""
    return generate_ct(tmp_path_factory.mktemp("lim") / "b", seed=3, rows=84, cols=84, slices=16,
                       pixel_spacing=4.0, slice_thickness=8.0, nodules=0)


def _series(study) -> SeriesData:
    return load_series(sorted(Path(study.dicom_dir).iterdir()))


@pytest.fixture(scope="module")
def domain(ct):
    """The domain a training set made of ``ct`` alone would span (as ``hilum train`` writes it)."""
    s = _series(ct)
    facts = measure_input(s.volume, s.datasets[0], s.modality)
    return domain_from_facts([facts], body_region="CHEST", tilt_margin_deg=5.0, trained_on=["phantom seed 3"],
                             validated_on=["phantom seed 3"]).model_dump(mode="json")


def _handler(folder: Path):
    return registry.model_handler("model:lungs", folder.parent)({})


def _spec(study, tmp_path, options) -> JobSpec:
    vault = Vault(tmp_path / "data", None)
    return JobSpec(job_id=1, job_key="limits-test", study_uid=study.study_uid, rule="r", handler="model:lungs",
                   params={}, series={study.series_uid: [str(p) for p in study.series_files()]},
                   results_dir=str(tmp_path / "data" / "results"), vault=vault.spec(), options=options)


def _checks(flags) -> set[str]:
    return {f.check for f in flags}


# ---------------------------------------------------------------- the card section

def test_domain_written_from_data_validates_and_errors_name_the_field(tmp_path, domain):
    folder = deploy(tmp_path, lungs_card(validated_domain=domain))
    card = load_card(folder)
    assert card.validated_domain.orientation.planes == ["axial"]
    assert card.validated_domain.orientation.patient_positions == ["HFS"]
    assert 7.0 in card.validated_domain.pixel_spacing_mm and 4.0 not in card.validated_domain.pixel_spacing_mm
    bad = dict(domain, pixel_spacing_mm={"min": 3.0, "max": 1.0})
    (folder / "card.yaml").write_text(yaml.safe_dump(lungs_card(validated_domain=bad)))
    with pytest.raises(CardError, match=r"validated_domain\.pixel_spacing_mm: min 3.0 is above max 1.0"):
        load_card(folder)
    bad = dict(domain, orientation={"planes": ["diagonal"]})
    (folder / "card.yaml").write_text(yaml.safe_dump(lungs_card(validated_domain=bad)))
    with pytest.raises(CardError, match=r"validated_domain\.orientation\.planes\.0"):
        load_card(folder)
    (folder / "card.yaml").write_text(yaml.safe_dump(lungs_card(plausibility={"labels": {"Lungs": {}}})))
    with pytest.raises(CardError, match=r"plausibility\.labels: \['Lungs'\] are not label names"):
        load_card(folder)


# ---------------------------------------------------------------- domain checks before inference

def test_in_domain_input_raises_no_flag(tmp_path, ct, domain):
    handler = _handler(deploy(tmp_path, lungs_card(validated_domain=domain)))
    assert handler.assess_input(HandlerInput(ct.study_uid, [_series(ct)])) == []


def test_pixel_spacing_outside_the_domain_refuses_the_job(tmp_path, fine_ct, domain, monkeypatch):
    deploy(tmp_path / "models", lungs_card(validated_domain=domain))
    monkeypatch.setattr(registry, "DEFAULT_MODELS_DIR", tmp_path / "models")
    with pytest.raises(HandlerRefusal) as exc:
        run_job(_spec(fine_ct, tmp_path, {}), lambda f, m: None)
    text = str(exc.value)
    assert "the input failed" in text and "pixel_spacing_out_of_domain" in text
    assert "outside the validated domain: pixel spacing 4.00 x 4.00 mm" in text
    assert not (tmp_path / "data" / "results" / "1").exists()  # refused before any compute


def test_orientation_outside_the_domain_is_flagged(tmp_path, ct, domain):
    """Coronal slices of the same patient, and a feet-first scan: neither was in the training data."""
    handler = _handler(deploy(tmp_path, lungs_card(validated_domain=domain)))
    s = _series(ct)
    g = s.volume.geometry
    # coronal: rows run from head to feet (-z), slices step from front to back (+y)
    coronal = Geometry(shape=(g.shape[1], g.shape[0] * 2, g.shape[2]),
                       origin=(g.origin[0], g.origin[1], g.origin[2] + (g.shape[0] - 1) * g.spacing[2]),
                       spacing=(g.spacing[0], g.spacing[2] / 2, g.spacing[1]),
                       direction=(1, 0, 0, 0, 0, 1, 0, -1, 0))
    reslice = Volume(np.rint(resample(s.volume.array, g, coronal, linear=True)).astype(np.int16), coronal)
    flags = handler.assess_input(HandlerInput(ct.study_uid, [SeriesData("1.2.3", "CT", [], reslice)]))
    orient = [f for f in flags if f.check == "orientation_out_of_domain"]
    assert len(orient) == 1 and "coronal slices, validated axial" in orient[0].text
    assert orient[0].kind == "domain"
    with pytest.raises(HandlerRefusal, match="orientation_out_of_domain"):
        QualityPolicy({}).enforce(flags, "the input")  # what the worker does with them
    ffs = s.datasets[0].copy()
    ffs.PatientPosition = "FFS"
    flags = handler.assess_input(HandlerInput(ct.study_uid, [SeriesData(s.series_uid, "CT", [ffs], s.volume)]))
    assert _checks(flags) == {"patient_position_out_of_domain"}
    assert "patient position FFS, validated HFS" in flags[0].text


def test_intensity_profile_outside_the_domain_is_flagged(tmp_path, ct, domain):
    """The same images without their rescale intercept (raw stored values, +1024): only the intensities differ."""
    handler = _handler(deploy(tmp_path, lungs_card(validated_domain=domain)))
    s = _series(ct)
    raw = Volume((s.volume.array.astype(np.int32) + 1024).astype(np.int16), s.volume.geometry)
    flags = handler.assess_input(HandlerInput(ct.study_uid, [SeriesData(s.series_uid, "CT", s.datasets, raw)]))
    assert _checks(flags) == {"intensity_out_of_domain"}
    assert "body intensities above -500" in flags[0].reason and "P50" in flags[0].reason
    with pytest.raises(HandlerRefusal, match="intensity_out_of_domain"):
        QualityPolicy({"on_quality_failure": "refuse"}).enforce(flags, "the input")


def test_deliver_with_warnings_marks_every_object(tmp_path, fine_ct, domain, monkeypatch):
    deploy(tmp_path / "models", lungs_card(validated_domain=domain))
    monkeypatch.setattr(registry, "DEFAULT_MODELS_DIR", tmp_path / "models")
    meta, provenance, _ = run_job(_spec(fine_ct, tmp_path, {"on_quality_failure": "deliver_with_warnings"}),
                               lambda f, m: None)
    assert any("outside the validated domain: pixel spacing" in w for w in provenance["quality_warnings"])
    vault = Vault(tmp_path / "data", None)
    objs = [pydicom.dcmread(BytesIO(vault.read_file(Path(m["path"])))) for m in meta]
    assert {o.Modality for o in objs} == {"SEG", "RTSTRUCT", "SR"}
    for o in objs:
        assert o.SeriesDescription.startswith("AI WARNING:"), o.SeriesDescription
        assert_valid_iod(o)
    rt = next(o for o in objs if o.Modality == "RTSTRUCT")
    assert "pixel_spacing_out_of_domain" in rt.StructureSetDescription


# ---------------------------------------------------------------- plausibility and confidence after inference

PLAUSIBLE = {"labels": {"Left lung": {"volume_ml": {"min": 1, "max": 1e7}, "continuous": True},
                        "Right lung": {"volume_ml": {"min": 100, "max": 5000}, "continuous": True}}}


def test_a_missing_lung_refuses_the_result(tmp_path, ct, monkeypatch):
    deploy(tmp_path / "models", lungs_card(plausibility=PLAUSIBLE))
    monkeypatch.setattr(registry, "DEFAULT_MODELS_DIR", tmp_path / "models")
    results = _handler(tmp_path / "models" / "lungs").run(HandlerInput(ct.study_uid, [_series(ct)]),
                                                          lambda f, m: None)
    flags = [r for r in results if hasattr(r, "check")]
    assert [(f.check, f.structure) for f in flags] == [("label_volume", "Right lung")]
    assert "not found, expected 100-5000 ml" in flags[0].text
    with pytest.raises(HandlerRefusal) as exc:
        run_job(_spec(ct, tmp_path, {}), lambda f, m: None)
    assert "the result failed 1 quality check" in str(exc.value) and "Right lung" in str(exc.value)


def test_slice_continuity_and_confidence_floor(tmp_path):
    card = load_card(deploy(tmp_path, lungs_card(plausibility={**PLAUSIBLE, "min_confidence": 0.9})))
    labels = np.zeros((12, 20, 20), np.uint8)
    labels[1:5, 5:15, 2:8] = 1
    labels[8:11, 5:15, 2:8] = 1  # slices 5..7 missing between present ones
    labels[1:11, 5:15, 12:18] = 2
    assert slice_gaps(labels == 1) == 3 and slice_gaps(labels == 2) == 0 and slice_gaps(labels == 3) == 0
    flags = output_flags(card, labels, voxel_ml=1.0, score=Confidence(0.72, {1: 0.7, 2: 0.75}))
    assert [(f.check, f.kind, f.structure) for f in flags] == [
        ("label_slice_gap", "plausibility", "Left lung"), ("model_confidence", "confidence", None)]
    assert "absent on 3 slice(s)" in flags[0].reason and "0.720, below the card's 0.900" in flags[1].reason
    assert output_flags(card, labels, 1.0, Confidence(0.95, {})) == flags[:1]


def test_confidence_is_the_mean_max_softmax_inside_the_predicted_labels():
    probs = np.zeros((3, 20, 2, 2), np.float32)
    probs[0] = 1.0  # background everywhere ...
    probs[:, :10, 0, 0] = np.array([0.1, 0.9, 0.0])[:, None]  # ... but label 1 at 0.9 on 10 voxels
    probs[:, 18:, 1, 1] = np.array([0.2, 0.2, 0.6])[:, None]  # label 2 at 0.6 on 2 voxels (two slabs)
    score = confidence(probs, "softmax")
    assert score.per_label == pytest.approx({1: 0.9, 2: 0.6})
    assert score.overall == pytest.approx((10 * 0.9 + 2 * 0.6) / 12)
    assert confidence(probs[:1] * 0, "sigmoid").overall is None


def test_the_intensity_profile_does_not_depend_on_the_resolution(tmp_path):
    """Body percentiles are measured on a common 4 mm grid: the same body at 1.4 mm and 2 mm pixels
    agrees within a few HU (raw voxels differ by their partial volume at the body's edge)."""
    facts = []
    for rows, spacing in ((240, 1.4), (168, 2.0)):
        study = generate_ct(tmp_path / str(rows), seed=3, rows=rows, cols=rows, slices=16, pixel_spacing=spacing,
                            slice_thickness=8.0, nodules=0)
        facts.append(measure_input(_series(study).volume, None, "CT"))
    for p in PERCENTILES:
        assert abs(facts[0].body_percentiles[p] - facts[1].body_percentiles[p]) < 30, (p, facts)
