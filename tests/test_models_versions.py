"""The model registry: versions with states, resolution for new jobs, the CLI and the audit trail,
and the shadow-mode comparison of two versions' label maps (known arrays, known Dice)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from node.cli import main
from node.handler_api import HandlerInput
from node.models.registry import handler_at
from node.models.shadow import agreement_summary, compare_labels, load_labels, record_agreement, save_labels
from node.models.versions import BUILT_IN, ModelRegistry, RegistryError, job_model, registry_handlers
from node.results import Code, LabelMap, Segment
from node.store.index import Index
from node.volume import Geometry
from tests.test_models_inference import GRIDS, ball_series, card_dict, deploy, threshold_model


def _version_folder(root: Path, version: str, threshold: float, emit: tuple = ("SEG",)) -> Path:
    """A trained-model folder as `hilum train` leaves it: card, ONNX, metrics with the training cases."""
    folder = root / f"ball-{version}"
    folder.mkdir(parents=True)
    threshold_model(folder / "model.onnx", threshold=threshold)
    (folder / "card.yaml").write_text(yaml.safe_dump(card_dict("ball", version=version, emit=list(emit))))
    (folder / "metrics.json").write_text(json.dumps({"training": {"train_cases": ["case-a", "case-b"]},
                                                     "code_version": "0.1.0+abc"}))
    return folder


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    deploy(tmp_path / "builtin")  # the shipped model: card version 1.0
    return ModelRegistry(tmp_path / "data" / "models", tmp_path / "builtin")


def test_states_promotion_and_resolution(registry, tmp_path):
    assert registry.resolve("model:ball").version == BUILT_IN
    v2 = registry.register(_version_folder(tmp_path / "train", "2.0", 0.0), by="cli alice")
    assert (v2.state, v2.training_cases, v2.code_version) == ("candidate", ["case-a", "case-b"], "0.1.0+abc")
    assert len(v2.sha256) == 64 and (v2.folder / "metrics.json").is_file() and (v2.folder / "version.json").is_file()
    assert registry.resolve("ball").version == BUILT_IN  # a candidate runs nowhere

    assert registry.set_state("ball", "2.0", "promote", "admin bob") == ("candidate", "active", [])
    assert registry.resolve("ball").version == "2.0"
    states = {i.version: i.state for i in registry.versions("ball")}
    assert states == {BUILT_IN: "standby", "2.0": "active"}

    registry.register(_version_folder(tmp_path / "train", "3.0", 100.0), by="cli alice")
    assert registry.set_state("ball", "3.0", "shadow", "admin bob")[1] == "shadow"
    assert registry.shadows("model:ball") == ["3.0"]
    # a shadow job runs its pinned version, a normal job the active one
    assert job_model(registry, "model:ball", {"model_version": "3.0"}).version == "3.0"
    assert job_model(registry, "model:ball", {}).version == "2.0"
    assert job_model(registry, "overview", {}) is None

    assert registry.set_state("ball", "3.0", "promote", "admin bob") == ("shadow", "active", ["2.0"])
    assert {i.version: i.state for i in registry.versions("ball")} == {BUILT_IN: "standby", "2.0": "retired",
                                                                       "3.0": "active"}
    # roll back to the shipped model
    assert registry.set_state("ball", BUILT_IN, "promote", "admin bob") == ("standby", "active", ["3.0"])
    assert registry.resolve("ball").version == BUILT_IN
    history = json.loads((registry.root / "ball" / "states.json").read_text())["3.0"]["history"]
    assert [h["state"] for h in history] == ["candidate", "shadow", "active", "retired"]


def test_registry_refusals_say_why(registry, tmp_path):
    folder = _version_folder(tmp_path / "train", "2.0", 0.0)
    registry.register(folder, by="t")
    with pytest.raises(RegistryError, match="already has a version '2.0'; versions never change"):
        registry.register(folder, by="t")
    with pytest.raises(RegistryError, match="is the built-in model's version"):
        registry.register(_version_folder(tmp_path / "t2", "1.0", 0.0), by="t")
    with pytest.raises(RegistryError, match="no registered version '9'"):
        registry.set_state("ball", "9", "promote", "t")
    with pytest.raises(RegistryError, match="can only be promoted"):
        registry.set_state("ball", BUILT_IN, "retire", "t")
    broken = _version_folder(tmp_path / "t3", "4.0", 0.0)
    (broken / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="model_file: model.onnx is not a loadable ONNX model"):
        registry.register(broken, by="t")
    assert not (registry.root / "ball" / "4.0").exists()  # nothing half-registered
    with pytest.raises(RegistryError, match=r"SR template 'model' has no findings \['ball'\]"):
        registry.register(_version_folder(tmp_path / "t4", "5.0", 0.0, ("SEG", "SR")), by="t")  # card_dict emits SR

    # without a shipped model behind it, the active version cannot be retired into nothing
    bare = ModelRegistry(tmp_path / "d2", tmp_path / "no-builtin")
    bare.register(folder, by="t")
    with pytest.raises(KeyError, match="no active version"):
        bare.resolve("ball")
    with pytest.raises(KeyError, match="promote one with `hilum model promote ball VERSION`"):
        registry_handlers(bare)("model:ball")  # what rule validation sees
    bare.set_state("ball", "2.0", "promote", "t")
    assert registry_handlers(bare)("model:ball").model_version == "2.0"  # a registry-only model in rules
    assert registry_handlers(bare)("overview").name == "overview"
    with pytest.raises(RegistryError, match="promote another version first"):
        bare.set_state("ball", "2.0", "retire", "t")


def test_a_version_folder_is_a_handler_naming_its_exact_version(registry, tmp_path):
    info = registry.register(_version_folder(tmp_path / "train", "2.0", 0.0), by="t", version="2.0-rc1")
    cls = handler_at(info.folder, info.version)
    assert (cls.name, cls.model_name, cls.model_version) == ("model:ball", "ball", "2.0-rc1")
    builtin = handler_at(registry.builtin_folder("ball"))
    assert builtin.model_version == "1.0"
    handler = cls({})
    out = handler.run(HandlerInput("1", [ball_series(GRIDS["axial"])]), lambda f, m: None)
    assert isinstance(out[0], LabelMap) and out[0].description.startswith("ball 2.0-rc1 ")
    assert handler.provenance["model_version"] == "2.0-rc1"


def _audit_entries(data_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (data_dir / "audit" / "audit.jsonl").read_text().splitlines()]


def test_cli_registers_promotes_and_audits(tmp_path, monkeypatch, capsys):
    deploy(tmp_path / "builtin")
    monkeypatch.setenv("HILUM_MODELS_DIR", str(tmp_path / "builtin"))
    monkeypatch.setattr("node.models.registry.DEFAULT_MODELS_DIR", tmp_path / "builtin")
    data = tmp_path / "data"
    folder = _version_folder(tmp_path / "train", "2.0", 0.0)
    assert main(["model", "add", str(folder), "--data-dir", str(data)]) == 0
    assert main(["model", "shadow", "ball", "2.0", "--data-dir", str(data)]) == 0
    assert main(["model", "promote", "ball", "2.0", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "registered ball 2.0 as candidate" in out and "ball 2.0: shadow -> active; active version now 2.0" in out
    assert main(["model", "list", "--json", "--data-dir", str(data)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["version"], r["state"]) for r in rows if r["name"] == "ball"} == {(BUILT_IN, "standby"),
                                                                                 ("2.0", "active")}
    assert main(["model", "retire", "ball", "7", "--data-dir", str(data)]) == 1
    assert "no registered version '7'" in capsys.readouterr().err
    changes = [e for e in _audit_entries(data) if e["event"] == "model-change"]
    assert [(e["detail"]["version"], e["detail"]["before"], e["detail"]["after"]) for e in changes] == [
        ("2.0", None, "candidate"), ("2.0", "candidate", "shadow"), ("2.0", "shadow", "active")]
    assert all(e["user"].startswith("cli ") for e in changes)


# ---------------------------------------------------------------- shadow comparison

ANAT = Code("91723000", "SCT", "Anatomical Structure")


def _label_map(labels: np.ndarray, names: dict[int, str]) -> LabelMap:
    geom = Geometry(labels.shape, (0.0, 0.0, 0.0), (2.0, 2.0, 2.5), tuple(np.eye(3).ravel()))
    segs = tuple(Segment(v, n, ANAT, Code("10200004", "SCT", n)) for v, n in names.items())
    return LabelMap("1.2.3", geom, labels, segs)


def test_comparison_of_two_label_maps_is_exact(tmp_path):
    a = np.zeros((10, 10, 10), np.uint8)
    s = np.zeros_like(a)
    a[0:4] = 1        # 400 voxels of Liver
    s[0:2] = 2        # the shadow: Liver is value 2 there (matched by name), half as large
    a[8:10, 0:5] = 2  # Heart in the active only (100 voxels)
    wrote = {}
    assert save_labels(tmp_path, [_label_map(a, {1: "Liver", 2: "Heart"})], lambda p, b: wrote.__setitem__(p, b))
    active = load_labels(wrote[tmp_path / "labels.npz"])
    assert np.array_equal(active[0], a) and active[1] == {"Liver": 1, "Heart": 2} and active[2] == 0.01
    shadow = (s, {"Liver": 2}, 0.01)
    cmp = compare_labels(active, shadow)
    assert cmp["Liver"] == {"dice": round(2 * 200 / 600, 4), "active_ml": 4.0, "shadow_ml": 2.0,
                            "volume_diff_ml": -2.0, "volume_diff_pct": -50.0}
    assert cmp["Heart"]["dice"] == 0.0 and cmp["Heart"]["shadow_ml"] == 0.0
    summary = agreement_summary([{"labels": cmp, "at": 1.0}, {"labels": {"Liver": {**cmp["Liver"], "dice": 1.0}},
                                                               "at": 2.0}])
    assert summary["cases"] == 2 and summary["labels"]["Liver"]["mean_dice"] == round((0.6667 + 1.0) / 2, 4)
    assert summary["labels"]["Liver"]["min_dice"] == 0.6667 and summary["labels"]["Heart"]["cases"] == 1


def test_agreement_is_recorded_once_when_both_jobs_are_done(registry, tmp_path):
    index = Index(tmp_path / "index.db")
    results = tmp_path / "results"
    common = dict(study_uid="1.2", series_uid="1.2.1", level="series", rule="r", handler="model:ball", params={},
                  priority="normal", timeout_s=None, generation=0, note="t")
    a_id = index.add_job(job_key="A", destinations=["orthanc"], options={"keep_labels": True}, **common)
    s_id = index.add_job(job_key="S", destinations=[], options={"keep_labels": True, "shadow_of": "A",
                                                                 "model_version": "3.0"}, **common)
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[:3] = 1
    for jid, arr in ((a_id, lab), (s_id, np.roll(lab, 1, axis=0))):
        (results / str(jid)).mkdir(parents=True)
        save_labels(results / str(jid), [_label_map(arr, {1: "Liver"})], lambda p, b: p.write_bytes(b))
    index.note_job(a_id, {"event": "model", "name": "ball", "version": BUILT_IN})
    index.finish_job(a_id, [], [])
    assert record_agreement(index, results, Path.read_bytes, registry, a_id) == []  # the shadow is not done
    index.finish_job(s_id, [], [])
    (rec,) = record_agreement(index, results, Path.read_bytes, registry, s_id)
    assert (rec["active_version"], rec["shadow_version"], rec["active_job"], rec["shadow_job"]) == \
        (BUILT_IN, "3.0", a_id, s_id)
    assert rec["labels"]["Liver"]["dice"] == round(2 * 72 / 216, 4)  # 3 slabs vs 3 slabs shifted by one
    assert record_agreement(index, results, Path.read_bytes, registry, a_id) == []  # once per pair
    assert len(registry.agreements("ball", "3.0")) == 1


def test_early_stopping_exports_the_best_epoch_and_train_registers_a_candidate(tmp_path):
    """patience 1 with an improvement bar no epoch can clear: training stops at epoch 2, the exported
    model is epoch 1's checkpoint, and `hilum train --register` makes it a candidate version."""
    import torch

    from tests.test_models_train import tiny_config

    raw = tiny_config(tmp_path)
    raw.update(epochs=6, early_stopping={"patience": 1, "min_delta": 0.5})
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    data = tmp_path / "data"
    assert main(["train", str(path), "--register", "--data-dir", str(data)]) == 0
    out = tmp_path / "models" / "tiny"
    training = json.loads((out / "metrics.json").read_text())["training"]
    assert (training["epochs_run"], training["best_epoch"], training["stopped_early"]) == (2, 1, True)
    assert torch.load(tmp_path / "work" / "tiny" / "best.pt")["epoch"] == 1
    assert torch.load(tmp_path / "work" / "tiny" / "last.pt")["epoch"] == 2
    (info,) = [i for i in ModelRegistry.for_data_dir(data, tmp_path / "none").versions("tiny")]
    assert (info.version, info.state) == ("0.1", "candidate") and len(info.training_cases) == 2
    assert info.code_version.startswith("0.1.0") and info.validation["cases"] == 1
