"""Model cards: the shipped one validates; broken ones are refused with the file and the field named."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml

from node.models.card import CardError, load_card, orientation_matrix
from node.models.inference import load_model
from node.models.registry import DEFAULT_MODELS_DIR, model_handler, model_names, validate_models

SHIPPED = "hilum-ct-chest"


def _good(tmp_path: Path) -> tuple[Path, dict]:
    from tests.test_models_inference import card_dict, deploy

    folder = deploy(tmp_path, "good")
    return folder, card_dict("good")


def _write(folder: Path, card: dict) -> Path:
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    return folder / "card.yaml"


def test_shipped_card_validates_and_resolves_as_a_handler():
    assert f"model:{SHIPPED}" in model_names()
    card = load_card(DEFAULT_MODELS_DIR / SHIPPED)
    assert "synthetic" in card.training_data.lower()
    assert card.validation is not None and 0.5 < card.validation.mean_dice <= 1
    assert {lab.tg263 for lab in card.labels} >= {"Lung_L", "Lung_R", "Heart", "Liver"}
    # it knows its limits: a domain from its training data, plausibility, a family it never saw, measured
    assert card.validated_domain.modality == "CT" and card.validated_domain.intensity is not None
    assert set(card.validated_domain.orientation.patient_positions) == {"HFS", "FFS"}
    assert card.plausibility.labels["Left lung"].volume_ml.min > 0 and card.plausibility.min_confidence
    assert card.validation.held_out_kinds
    assert all(f"Never trained on {k}" in " ".join(card.limitations) for k in card.validation.held_out_kinds)
    cls = model_handler(f"model:{SHIPPED}")
    assert cls.name == f"model:{SHIPPED}" and cls.model_version == card.version and cls.modalities == {"CT"}
    assert validate_models() == model_names()
    assert (DEFAULT_MODELS_DIR / SHIPPED / "model.onnx").stat().st_size < 8_000_000


BROKEN = [
    # (change to the card, text the error must contain)
    (lambda c: c["labels"][0].update(color=[300, 0, 0]), "labels.0.color"),
    (lambda c: c["labels"][0]["type"].update(value="liver"), "labels.0.type"),
    (lambda c: c.pop("labels"), "labels: Field required"),
    (lambda c: c.update(labels=[]), "labels: List should have at least 1 item"),
    (lambda c: c["labels"][0].update(value=3), "labels: softmax models need values 1..1"),
    (lambda c: c["input"].update(target_spacing=[3, 0, 3]), "input.target_spacing"),
    (lambda c: c["input"].update(orientation="LLS"), "input.orientation"),
    (lambda c: c["inference"].update(overlap=1.0), "inference.overlap"),
    (lambda c: c["inference"].update(tta_flips=[["x", "x"]]), "inference.tta_flips"),
    (lambda c: c["preprocessing"].update(kind="window"), "preprocessing"),
    (lambda c: c["preprocessing"].update(clip=[100, -100]), "preprocessing.ct_window"),
    (lambda c: c.update(emit=["SR"]), "emit"),
    (lambda c: c.update(emit=["NIFTI"]), "emit.0"),
    (lambda c: c.update(colour="red"), "colour: Extra inputs are not permitted"),
    (lambda c: c.update(name="Bad Name"), "name"),
    (lambda c: c["labels"][0].update(tg263="Much_Too_Long_Name_X"), "labels.0.tg263"),
    (lambda c: c["labels"][0].update(rt_roi_type="TUMOUR"), "labels.0.rt_roi_type"),
    (lambda c: c.update(model_file="missing.onnx"), "model_file"),
    # Written as Segment Label / ROI Name / SR tracking id and Code Meaning (LO): refused when the card
    # loads (before, only each job that built results failed on them).
    (lambda c: c["labels"][0].update(name="Lung\\left"), "labels.0.name: the value holds a backslash"),
    (lambda c: c["labels"][0].update(name="Lung\nleft"), "labels.0.name: the value holds control characters"),
    (lambda c: c["labels"][0].update(name="肺" * 30), "labels.0.name: the value is 90 bytes in UTF-8"),
    (lambda c: c["labels"][0]["category"].update(meaning="Organ\\Tissue"), "labels.0.category.meaning"),
]


@pytest.mark.parametrize("change,expected", BROKEN, ids=[e for _, e in BROKEN])
def test_broken_card_is_refused_naming_file_and_field(tmp_path, change, expected):
    folder, card = _good(tmp_path)
    bad = copy.deepcopy(card)
    change(bad)
    path = _write(folder, bad)
    with pytest.raises(CardError) as err:
        load_card(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_not_yaml_and_not_a_mapping(tmp_path):
    folder, _ = _good(tmp_path)
    (folder / "card.yaml").write_text("name: [unclosed")
    with pytest.raises(CardError, match="not valid YAML"):
        load_card(folder)
    (folder / "card.yaml").write_text("- a list\n")
    with pytest.raises(CardError, match="YAML mapping"):
        load_card(folder)


def test_model_that_disagrees_with_its_card_is_refused(tmp_path):
    from tests.test_models_inference import threshold_model

    folder, card = _good(tmp_path)
    threshold_model(folder / "model.onnx", channels_out=3)  # 3 channels, card has 1 label + background
    with pytest.raises(CardError, match=r"card.yaml: labels: the model outputs 3 channels"):
        load_model(folder, load_card(folder))
    (folder / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(CardError, match="model_file: model.onnx is not a loadable ONNX model"):
        load_model(folder, load_card(folder))


def test_registry_names_unknown_and_invalid_models(tmp_path):
    folder, card = _good(tmp_path)
    with pytest.raises(KeyError, match="no model named 'nope'.*known: model:good"):
        model_handler("model:nope", tmp_path)
    card["name"] = "other"
    _write(folder, card)
    with pytest.raises(CardError, match="differs from its folder name"):
        model_handler("model:good", tmp_path)
    card["name"] = "good"
    card["labels"][0]["color"] = [1, 2]
    _write(folder, card)
    with pytest.raises(CardError, match=r"invalid model cards:\n.*good/card.yaml: labels.0.color"):
        validate_models(tmp_path)


def test_orientation_codes():
    assert np.array_equal(orientation_matrix("LPS"), np.eye(3))
    assert np.array_equal(orientation_matrix("RAS"), np.diag([-1.0, -1.0, 1.0]))
    assert np.array_equal(orientation_matrix("SLP")[:, 0], [0, 0, 1])
    for bad in ("LP", "LPX", "LRS"):
        with pytest.raises(ValueError):
            orientation_matrix(bad)
