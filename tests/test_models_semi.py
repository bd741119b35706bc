"""Semi-supervised training with pseudo-labels: the loss ignores unconfident voxels, and a tiny run on
labelled + unlabelled phantoms labels the unlabelled ones, trains on them and records it."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from node.models.train import IGNORE, dice_ce_loss, train
from node.models.card import CardError
from node.models.train_config import TrainConfig, load_train_config
from tests.test_models_train import TINY_PHANTOM, tiny_config


def test_ignored_voxels_count_in_neither_loss():
    target = torch.zeros((1, 8, 8, 8), dtype=torch.long)
    target[0, 2:6, 2:6, 2:6] = 1
    logits = torch.nn.functional.one_hot(target, 2).permute(0, 4, 1, 2, 3).float() * 10
    clean = dice_ce_loss(logits, target, 1, 1)
    wrong = logits.clone()
    wrong[0, :, 6:, :, :] = wrong[0, :, 6:, :, :].flip(0)  # wrong answers in slices 6-7 ...
    assert dice_ce_loss(wrong, target, 1, 1) > clean + 0.1
    ignored = target.clone()
    ignored[0, 6:] = IGNORE  # ... cost nothing once those voxels are ignored
    assert dice_ce_loss(wrong, ignored, 1, 1) == pytest.approx(float(dice_ce_loss(logits, ignored, 1, 1)), abs=1e-5)


def test_semi_supervised_config_needs_its_unlabeled_cases(tmp_path):
    raw = tiny_config(tmp_path)
    path = tmp_path / "train.yaml"
    for strategy, text in (({"kind": "semi-supervised"},
                            "strategy: unlabeled: semi-supervised training needs the unlabeled cases"),
                           ({"kind": "semi-supervised", "unlabeled": {"phantom": {"count": 2}}, "confidence": 1.5},
                            "strategy.confidence: Input should be less than 1"),
                           ({"kind": "supervised", "pseudo_labels": True},
                            "strategy.pseudo_labels: Extra inputs are not permitted")):
        path.write_text(yaml.safe_dump({**raw, "strategy": strategy}))
        with pytest.raises(CardError) as err:
            load_train_config(path)
        assert text in str(err.value), str(err.value)


def test_pseudo_labels_are_made_and_recorded(tmp_path):
    raw = tiny_config(tmp_path)
    raw.update(epochs=3, steps_per_epoch=2)
    raw["strategy"] = {"kind": "semi-supervised", "confidence": 0.6, "start_epoch": 1, "refresh_every": 1,
                       "unlabeled": {"phantom": {"count": 2, "seed": 900, **TINY_PHANTOM},
                                     "cache_dir": str(tmp_path / "phantoms")}}
    lines: list[str] = []
    out = train(TrainConfig.model_validate(raw), log=lines.append)
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["strategy"]["pseudo_label_rounds"]
    assert metrics["strategy"]["kind"] == "semi-supervised" and [r["epoch"] for r in rounds] == [1, 2, 3]
    assert all(r["cases"] == 2 and 0 < r["kept_fraction"] <= 1 for r in rounds)
    assert metrics["strategy"]["unlabeled_cases"] == ["phantom-900", "phantom-901"]
    assert any("pseudo-labels kept" in line for line in lines)
    assert set(metrics["validation"]["dice"]) == {"Left lung", "Heart"}
