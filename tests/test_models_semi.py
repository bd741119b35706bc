"""Semi-supervised training. Pseudo-labels: the loss ignores unconfident voxels, and a tiny run on
labelled + unlabelled phantoms labels the unlabelled ones, trains on them and records it. Mean
teacher: the EMA teacher and the consistency ramp-up, config errors naming the field, and a tiny run
compared with its supervised baseline (stored), each stopped early at its best epoch."""
from __future__ import annotations

import json
import math

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


# ---------------------------------------------------------------- mean teacher

def test_mean_teacher_config_names_the_field(tmp_path):
    raw = tiny_config(tmp_path)
    path = tmp_path / "train.yaml"
    unlabeled = {"phantom": {"count": 2}}
    for strategy, text in (
            ({"kind": "semi-supervised", "method": "mean-teacher", "unlabeled": unlabeled, "confidence": 0.8},
             "strategy: confidence: only used by method pseudo-label (this strategy's method is mean-teacher)"),
            ({"kind": "semi-supervised", "unlabeled": unlabeled, "ema_decay": 0.9},
             "strategy: ema_decay: only used by method mean-teacher"),
            ({"kind": "semi-supervised", "method": "mean-teacher", "unlabeled": unlabeled, "ema_decay": 1.5},
             "strategy.ema_decay: Input should be less than 1"),
            ({"kind": "semi-supervised", "method": "teacher", "unlabeled": unlabeled},
             "strategy.method: Input should be 'pseudo-label' or 'mean-teacher'"),
            ({"kind": "supervised", "method": "mean-teacher"}, "strategy: method: only used by kind semi-supervised"),
            ({"kind": "supervised", "rampup_epochs": 3}, "strategy: rampup_epochs: only used by kind semi-supervised"),
            ({"kind": "semi-supervised", "method": "mean-teacher", "unlabeled": unlabeled, "ema": 0.9},
             "strategy.ema: Extra inputs are not permitted")):
        path.write_text(yaml.safe_dump({**raw, "strategy": strategy}))
        with pytest.raises(CardError) as err:
            load_train_config(path)
        assert text in str(err.value), str(err.value)
    # a config dumped with every default (train.yaml next to a model) loads again
    cfg = TrainConfig.model_validate({**raw, "strategy": {"kind": "semi-supervised", "method": "mean-teacher",
                                                          "unlabeled": unlabeled, "rampup_epochs": 2}})
    assert TrainConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_teacher_is_the_moving_average_and_the_rampup_reaches_full_weight():
    from node.models.train import _consistency_rampup, _ema

    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in teacher.parameters()]
    _ema(teacher, student, 0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t.detach(), 0.9 * b + 0.1 * s.detach())
    assert _consistency_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert _consistency_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert _consistency_rampup(10, 10) == 1.0 and _consistency_rampup(3, 0) == 1.0


def test_mean_teacher_against_supervised_with_early_stopping(tmp_path):
    """4 labelled + 4 unlabelled tiny phantoms: the semi-supervised and the supervised runs are both
    measured on the same validation case and stored side by side; each stopped at its best epoch."""
    raw = tiny_config(tmp_path)
    raw["data"]["phantom"]["count"] = 5
    raw["data"]["validation_split"] = 0.2
    raw.update(epochs=10, steps_per_epoch=3, early_stopping={"patience": 2, "min_delta": 0.01})
    raw["strategy"] = {"kind": "semi-supervised", "method": "mean-teacher", "ema_decay": 0.9, "weight": 2.0,
                       "rampup_epochs": 2, "compare_supervised": True,
                       "unlabeled": {"phantom": {"count": 4, "seed": 900, **TINY_PHANTOM},
                                     "cache_dir": str(tmp_path / "phantoms")}}
    lines: list[str] = []
    cfg = TrainConfig.model_validate(raw)
    out = train(cfg, log=lines.append)
    metrics = json.loads((out / "metrics.json").read_text())
    training = metrics["training"]
    comparison = training["comparison"]
    sup, semi = comparison["supervised"], comparison["semi_supervised"]
    assert semi["method"] == "mean-teacher"
    assert 0 <= sup["best_val_mean_dice"] <= 1 and 0 <= semi["best_val_mean_dice"] <= 1
    assert comparison["difference"] == pytest.approx(semi["best_val_mean_dice"] - sup["best_val_mean_dice"])
    assert semi["best_val_mean_dice"] == training["best_val_mean_dice_network_grid"]
    assert any(line.startswith("[supervised baseline] epoch 1/10") for line in lines)
    assert metrics["strategy"]["method"] == "mean-teacher" and len(metrics["strategy"]["unlabeled_cases"]) == 4
    assert all(e["consistency_loss"] > 0 for e in training["history"])

    # early stopping: each run's best epoch is its best validation, it stopped `patience` epochs after it
    # (or ran out of epochs), and the checkpoint deployed is that epoch's
    work = tmp_path / "work" / "tiny"
    baseline = json.loads((work / "supervised-baseline" / "training.json").read_text())
    assert baseline["best_epoch"] == sup["best_epoch"] and baseline["strategy"]["kind"] == "supervised"
    for record, folder in ((training, work), (baseline, work / "supervised-baseline")):
        dice = [e["val_mean_dice"] for e in record["history"]]
        # the best epoch: the last that beat every earlier one by min_delta (0.01); none after it did
        best, best_epoch = -1.0, 0
        for epoch, d in enumerate(dice, start=1):
            if d > best + 0.01:
                best, best_epoch = d, epoch
        assert record["best_epoch"] == best_epoch and dice[best_epoch - 1] >= max(dice) - 0.01
        if record["stopped_early"]:
            assert record["epochs_run"] == record["best_epoch"] + 2
        else:
            assert record["epochs_run"] == 10
        assert torch.load(folder / "best.pt")["epoch"] == record["best_epoch"]
    assert training["stopped_early"] or sup["stopped_early"], "neither run stopped early: the test proves less"
