"""Train a segmentation model from a config file and deploy it as ``models/<name>/``.

    python -m node.models.train CONFIG.yaml        (``hilum train CONFIG.yaml``)

Cases are put on the network grid with the same code the handler runs (``inference.prepare_input``),
so training and deployment see identical inputs. The result folder holds model.onnx (dynamic
spatial axes, checked against torch), card.yaml (validated), train.yaml (this config) and
metrics.json (per-label validation Dice measured through the deployed ONNX pipeline on the
held-out cases' own source grids, the number the card reports).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from node.models.card import CardError, InferenceSpec, ModelCard, ValidatedDomain, load_card
from node.models.data import Case, held_out_cases, load_cases
from node.models.domain import domain_from_facts, measure_input
from node.models.inference import load_model, onnx_runner, prepare_input, resample, segment_scored, sliding_window
from node.models.plausibility import plausibility_from_truth
from node.models.train_config import BASELINE_PREFIX, AugmentSpec, TrainConfig, load_train_config
from node.models.unet import MaskedUNet, UNet3D
from node.models.versions import code_version

__all__ = ["train", "describe", "measure_only", "measured_limitations", "main", "dice_per_label", "export_onnx", "export_mc_onnx", "compare_onnx_torch",
           "build_network"]

Log = Callable[[str], None]
IGNORE = 255  # label value the loss ignores: pseudo-label voxels the model was not confident about


# ---------------------------------------------------------------- data on the network grid

class GridCase:
    """A case resampled to the network grid, padded to at least the training patch."""

    def __init__(self, name: str, image: np.ndarray, label: np.ndarray) -> None:
        self.name, self.image = name, image
        self.set_label(label)

    def set_label(self, label: np.ndarray) -> None:
        """The (padded) label and the foreground voxels patches are centred on (``IGNORE`` is none)."""
        self.label = label
        rng = np.random.default_rng(0)
        self.foreground = {}
        for value in np.unique(self.label):
            if value and value != IGNORE:
                idx = np.argwhere(self.label == value)
                self.foreground[int(value)] = idx[rng.choice(len(idx), min(len(idx), 20000), replace=False)]

    @classmethod
    def of(cls, case: Case, cfg: TrainConfig) -> "GridCase":
        image, grid = prepare_input(case.volumes, cfg.input, cfg.preprocessing)
        label = resample(case.truth, case.volumes[0].geometry, grid, linear=False)
        pads = [(0, max(0, p - s)) for s, p in zip(label.shape, cfg.patch_size)]
        floor = image.reshape(image.shape[0], -1).min(axis=1)
        image = np.stack([np.pad(image[c], pads, constant_values=floor[c]) for c in range(image.shape[0])])
        return cls(case.name, image, np.pad(label, pads))


GRID_STEPS = 250


def save_grid(cases: list[GridCase], folder: Path) -> None:
    """The network-grid arrays of a split, so the loop can run where the source data cannot be read
    (a GPU machine without SimpleITK or the phantom cache: ``hilum train --stage fit``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npz"):
        old.unlink()
    for i, c in enumerate(cases):
        # int16 in steps of 1/GRID_STEPS of a normalised unit (2 HU for a std of 500): far below the
        # intensity augmentation, and half the bytes of float16 once compressed, so the set travels
        np.savez_compressed(folder / f"{i:03d}.npz", name=c.name, label=c.label,
                            image=np.rint(np.clip(c.image * GRID_STEPS, -32768, 32767)).astype(np.int16))


def load_grid(folder: Path) -> list[GridCase]:
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise CardError(f"{folder}: no network-grid cases (run hilum train --stage prepare first)")
    out = []
    for f in files:
        with np.load(f) as z:
            out.append(GridCase(str(z["name"]), z["image"].astype(np.float32) / GRID_STEPS, z["label"]))
    return out


def _sample(cases: list[GridCase], patch: tuple[int, int, int], oversample: float, rng: np.random.Generator):
    case = cases[rng.integers(len(cases))]
    shape = np.array(case.label.shape)
    if case.foreground and rng.random() < oversample:
        coords = case.foreground[list(case.foreground)[rng.integers(len(case.foreground))]]
        centre = coords[rng.integers(len(coords))]
    else:
        centre = rng.integers(0, shape)
    start = np.clip(centre - np.array(patch) // 2, 0, shape - np.array(patch))
    sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
    return case.image[(slice(None), *sl)], case.label[sl]


def _batch(cases, cfg: TrainConfig, rng) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [_sample(cases, cfg.patch_size, cfg.foreground_oversample, rng) for _ in range(cfg.batch_size)]
    x = torch.from_numpy(np.stack([p[0] for p in pairs]).astype(np.float32))
    y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
    return x, y


# ---------------------------------------------------------------- augmentation

def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def augment(x: torch.Tensor, y: torch.Tensor, aug: AugmentSpec, rng: np.random.Generator):
    """Small rotations/scaling (physical, not normalised-grid, angles), flips, intensity jitter, noise."""
    b = x.shape[0]
    half = np.array(x.shape[2:][::-1], dtype=float) / 2  # (x, y, z) half-extent in voxels
    thetas = []
    for _ in range(b):
        m = np.eye(3)
        if rng.random() < aug.probability:
            angles = np.radians(rng.uniform(-aug.rotate_deg, aug.rotate_deg, 3))
            m = _rotation(angles) / rng.uniform(*aug.scale)
        # affine_grid works in [-1, 1] per axis: conjugate so a rotation stays a rotation in voxels
        m = np.diag(1 / half) @ m @ np.diag(half)
        thetas.append(np.hstack([m, np.zeros((3, 1))]))
    theta = torch.tensor(np.stack(thetas), dtype=x.dtype, device=x.device)
    if not torch.allclose(theta, torch.eye(3, 4, dtype=x.dtype, device=x.device).expand_as(theta)):
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        y = F.grid_sample(y[:, None].to(x.dtype), grid, mode="nearest", padding_mode="border",
                          align_corners=False)[:, 0].round().long()
    for axis in aug.flip_axes:
        dim = {"z": 2, "y": 3, "x": 4}[axis]
        if rng.random() < 0.5:
            x, y = x.flip(dim), y.flip(dim - 1)
    scale = torch.tensor(rng.uniform(1 - aug.intensity_scale, 1 + aug.intensity_scale, (b, 1, 1, 1, 1)), dtype=x.dtype)
    shift = torch.tensor(rng.uniform(-aug.intensity_shift, aug.intensity_shift, (b, 1, 1, 1, 1)), dtype=x.dtype)
    x = x * scale.to(x.device) + shift.to(x.device)
    if aug.noise_std:
        sigma = torch.tensor(rng.uniform(0, aug.noise_std, (b, 1, 1, 1, 1)), dtype=x.dtype, device=x.device)
        x = x + torch.randn_like(x) * sigma
    return x, y


# ---------------------------------------------------------------- model, loss, metrics

def build_network(cfg: TrainConfig) -> UNet3D:
    n = cfg.network
    return UNet3D(cfg.input.channels, len(cfg.labels) + 1, base=n.base_channels, depth=n.depth, blocks=n.blocks,
                  max_channels=n.max_channels, dropout=n.dropout)


def initial_weights(model: UNet3D, cfg: TrainConfig) -> dict | None:
    """Load ``cfg.init_from``'s weights into ``model`` (fine-tuning); returns what it started from, for the
    training record. The checkpoint must hold the same network for the same labels: a network of another
    shape cannot load, and one trained for other structures would start each output on the wrong one."""
    if cfg.init_from is None:
        return None
    if cfg.init_from == "previous":
        raise CardError("init_from: 'previous' means a project's latest finished run; only a project's training "
                        "run resolves it (give a best.pt path to fine-tune outside a project)")
    path = Path(cfg.init_from)
    try:
        ckpt = torch.load(path, map_location="cpu")
    except (OSError, RuntimeError, EOFError) as exc:
        raise CardError(f"init_from: cannot read the checkpoint {path}: {exc}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CardError(f"init_from: {path} is not a checkpoint written by hilum train (no 'model' weights)")
    theirs = [lab.get("name") for lab in (ckpt.get("config") or {}).get("labels", [])]
    ours = [lab.name for lab in cfg.labels]
    if theirs and theirs != ours:
        raise CardError(f"init_from: {path} was trained for labels {theirs}, this configuration has {ours}")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # missing or unexpected keys, or a tensor of another shape
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CardError(f"init_from: {path} holds another network than this configuration's "
                        f"(network, input.channels, labels): {first}") from None
    return {"checkpoint": str(path), "epoch": ckpt.get("epoch")}


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float, ce_weight: float) -> torch.Tensor:
    """Cross-entropy + (1 - batch soft Dice over the foreground classes); ``IGNORE`` voxels count in neither."""
    valid = target != IGNORE
    loss = ce_weight * F.cross_entropy(logits, target, ignore_index=IGNORE) if ce_weight else logits.new_zeros(())
    if dice_weight:
        p = logits.softmax(1) * valid[:, None]
        onehot = F.one_hot(torch.where(valid, target, 0), logits.shape[1]).permute(0, 4, 1, 2, 3).to(p.dtype)
        onehot = onehot * valid[:, None]
        dims = (0, 2, 3, 4)
        inter = (p * onehot).sum(dims)[1:]
        denom = (p.sum(dims) + onehot.sum(dims))[1:]
        loss = loss + dice_weight * (1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean())
    return loss


def dice_per_label(pred: np.ndarray, truth: np.ndarray, values) -> dict[int, float]:
    """Dice of each label value; NaN where neither prediction nor truth has it."""
    out = {}
    for v in values:
        p, t = pred == v, truth == v
        denom = int(p.sum()) + int(t.sum())
        out[v] = 2.0 * int((p & t).sum()) / denom if denom else float("nan")
    return out


def torch_runner(model: torch.nn.Module, device: torch.device):
    @torch.no_grad()
    def run(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    return run


def _validate(model, cases: list[GridCase], cfg: TrainConfig, device) -> dict[int, float]:
    model.eval()
    spec = InferenceSpec(**{**cfg.inference.model_dump(), "tta_flips": []})  # fast: TTA only at deployment
    run = torch_runner(model, device)
    scores = {lab.value: [] for lab in cfg.labels}
    for case in cases:
        probs = sliding_window(case.image, run, spec, len(cfg.labels) + 1)
        for v, d in dice_per_label(probs.argmax(0), case.label, scores).items():
            if not math.isnan(d):
                scores[v].append(d)
    model.train()
    return {v: float(np.mean(s)) if s else float("nan") for v, s in scores.items()}


def _pseudo_label(model, cases: list[GridCase], cfg: TrainConfig, device) -> float:
    """Label ``cases`` with the current model: argmax where its probability reaches the configured
    confidence, ``IGNORE`` elsewhere. Returns the fraction of voxels kept."""
    model.eval()
    spec = InferenceSpec(**{**cfg.inference.model_dump(), "tta_flips": []})
    run = torch_runner(model, device)
    kept = total = 0
    for case in cases:
        probs = sliding_window(case.image, run, spec, len(cfg.labels) + 1)
        label = probs.argmax(0).astype(np.uint8)
        confident = probs.max(0) >= cfg.strategy.confidence
        label[~confident] = IGNORE
        case.set_label(label)
        kept, total = kept + int(confident.sum()), total + confident.size
    model.train()
    return kept / max(1, total)


# ---------------------------------------------------------------- export and check

def export_onnx(model: torch.nn.Module, path: Path, in_channels: int, patch: tuple[int, int, int]) -> None:
    """ONNX with dynamic batch and spatial axes, written atomically (a running node may be reading)."""
    import onnx

    model = model.eval().cpu()
    tmp = path.with_suffix(".onnx.tmp")
    axes = {0: "batch", 2: "z", 3: "y", 4: "x"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation/instance-norm notes
        torch.onnx.export(model, (torch.zeros(1, in_channels, *patch),), str(tmp), dynamo=False,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": axes, "logits": axes}, opset_version=17)
    onnx.checker.check_model(str(tmp))
    os.replace(tmp, path)


def export_mc_onnx(model: UNet3D, path: Path, in_channels: int, patch: tuple[int, int, int]) -> None:
    """The Monte-Carlo dropout graph: ``image`` then ``mask0..`` (one (1, C, 1, 1, 1) channel mask per
    dropout site), written atomically; with all-ones masks it computes exactly ``model``."""
    import onnx

    net = MaskedUNet(model.eval().cpu())
    masks = tuple(torch.ones(1, c, 1, 1, 1) for c in model.dropout_sites)
    names = [f"mask{i}" for i in range(len(masks))]
    tmp = path.with_suffix(".onnx.tmp")
    axes = {0: "batch", 2: "z", 3: "y", 4: "x"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, in_channels, *patch), *masks), str(tmp), dynamo=False,
                          input_names=["image", *names], output_names=["logits"],
                          dynamic_axes={"image": axes, "logits": axes}, opset_version=17)
    onnx.checker.check_model(str(tmp))
    os.replace(tmp, path)


def compare_onnx_torch(model: torch.nn.Module, onnx_path: Path, image: np.ndarray,
                       sizes: list[tuple[int, int, int]]) -> dict[str, float]:
    """Run torch and ONNX Runtime on crops of ``image`` of each size; worst logit difference and argmax agreement."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model = model.eval().cpu()
    worst, agree = 0.0, 1.0
    for size in sizes:
        crop = np.zeros((1, image.shape[0], *size), dtype=np.float32)
        src = tuple(slice(0, min(a, b)) for a, b in zip(image.shape[1:], size))
        crop[(0, slice(None), *src)] = image[(slice(None), *src)]
        with torch.no_grad():
            ref = model(torch.from_numpy(crop)).numpy()
        out = sess.run(None, {sess.get_inputs()[0].name: crop})[0]
        scale = max(1.0, float(np.abs(ref).max()))
        worst = max(worst, float(np.abs(out - ref).max()) / scale)
        agree = min(agree, float((out.argmax(1) == ref.argmax(1)).mean()))
    return {"max_relative_logit_difference": worst, "argmax_agreement": agree}


# ---------------------------------------------------------------- the loop

def _schedule(cfg: TrainConfig, total_steps: int):
    warm = cfg.schedule.warmup_epochs * cfg.steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        if cfg.schedule.kind == "poly":
            return (1 - t) ** 0.9
        if cfg.schedule.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    return factor


def _optimizer(cfg: TrainConfig, params):
    o = cfg.optimizer
    if o.kind == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=True, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise CardError("device: cuda asked for, but torch sees no GPU")
    return torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")


def _split(cases: list[Case], fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    if len(cases) < 2:
        raise CardError("data: at least two cases are needed (one to train, one to validate)")
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(len(cases) - 1, max(1, round(len(cases) * fraction)))
    return [cases[i] for i in order[n_val:]], [cases[i] for i in order[:n_val]]


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / total)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


STAGES = ("prepare", "fit", "deploy")


def train(cfg: TrainConfig, config_text: str | None = None, log: Log = print, stages=STAGES) -> Path:
    """Train, export, check and deploy; returns the model folder ``output_dir/<name>``.

    ``stages`` splits the run where the data and the accelerator live on different machines:
    ``prepare`` writes the network-grid arrays to ``work_dir/<name>/grid``, ``fit`` trains from them
    (torch only) and leaves best.pt + training.json there, ``deploy`` exports, checks and measures."""
    t0 = time.time()
    work = Path(cfg.work_dir) / cfg.name
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(cfg.output_dir) / cfg.name
    if "fit" in stages and cfg.init_from is not None:
        initial_weights(build_network(cfg), cfg)  # a wrong init_from fails before the data are loaded
    train_cases = val_cases = grid_val = None
    if "prepare" in stages or "deploy" in stages:
        log(f"loading data ({cfg.data.source_name})")
        train_cases, val_cases = _split(load_cases(cfg.data, cfg.labels, work, log), cfg.data.validation_split,
                                        cfg.seed)
        grid_val = [GridCase.of(c, cfg) for c in val_cases]
    if "prepare" in stages:
        grid_train = [GridCase.of(c, cfg) for c in train_cases]
        if stages != STAGES:  # another process (machine) runs the loop
            save_grid(grid_train, work / "grid" / "train")
            save_grid(grid_val, work / "grid" / "val")
            log(f"{len(grid_train)} training, {len(grid_val)} validation cases written to {work / 'grid'}")
    if "fit" in stages:
        if "prepare" not in stages:
            grid_train, grid_val = load_grid(work / "grid" / "train"), load_grid(work / "grid" / "val")
        _fit(cfg, grid_train, grid_val, work, log)
    if "deploy" not in stages:
        return work
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_network(cfg)
    model.load_state_dict(torch.load(work / "best.pt", map_location="cpu")["model"])
    model = model.cpu().eval()
    n_params = sum(p.numel() for p in model.parameters())
    onnx_path = out_dir / "model.onnx"
    export_onnx(model, onnx_path, cfg.input.channels, cfg.inference.patch_size)
    div = model.size_divisor
    check = compare_onnx_torch(model, onnx_path, grid_val[0].image,
                               [cfg.inference.patch_size, tuple(p + div for p in cfg.inference.patch_size)])
    log(f"ONNX vs torch: max relative logit difference {check['max_relative_logit_difference']:.2e}, "
        f"argmax agreement {check['argmax_agreement']:.5f}")
    # float32 instance norm over large patches differs by ~1e-4 between the two runtimes
    if check["max_relative_logit_difference"] > 5e-3 or check["argmax_agreement"] < 0.999:
        raise RuntimeError(f"the ONNX export disagrees with the torch model: {check}")
    if model.dropout_sites:
        export_mc_onnx(model, out_dir / cfg.card_draft().mc_dropout.model_file, cfg.input.channels,
                       cfg.inference.patch_size)
        log(f"Monte-Carlo dropout graph written ({len(model.dropout_sites)} dropout sites, rate {model.dropout_rate})")
    training = json.loads((work / "training.json").read_text())
    if training["train_cases"] != [c.name for c in train_cases]:
        raise CardError("data: best.pt was not trained on these cases (training.json train_cases)")
    extra = {"parameters": n_params, "device": training.pop("device"), "training": training, "onnx_check": check,
             "code_version": code_version(), "strategy": training.pop("strategy")}
    describe(cfg, out_dir, train_cases, val_cases, extra, log)
    (out_dir / "train.yaml").write_text(config_text if config_text is not None else
                                        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    log(f"deployed {out_dir} ({onnx_path.stat().st_size / 1e6:.2f} MB, {n_params} parameters) "
        f"in {time.time() - t0:.0f} s")
    return out_dir


def _fit(cfg: TrainConfig, grid_train: list[GridCase], grid_val: list[GridCase], work: Path, log: Log) -> None:
    """The training loop: best.pt (best validation Dice on the network grid) and training.json in ``work``.

    With ``strategy.compare_supervised`` the supervised baseline runs first on the same labelled and
    validation cases (``work/supervised-baseline``), and training.json's ``comparison`` holds both."""
    t0 = time.time()
    device = _device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log(f"{len(grid_train)} training, {len(grid_val)} validation cases on a {cfg.input.target_spacing} mm grid; "
        f"device {device}")
    s = cfg.strategy
    semi = s.kind == "semi-supervised"
    baseline = None
    if semi and s.compare_supervised:
        log("supervised baseline on the same labelled cases (strategy.compare_supervised)")
        supervised = cfg.model_copy(update={"strategy": type(s)()})
        baseline = _loop(supervised, grid_train, grid_val, [], work / "supervised-baseline", device,
                         lambda line: log(BASELINE_PREFIX + line))
        (work / "supervised-baseline" / "training.json").write_text(json.dumps(baseline, indent=2) + "\n")
        log(f"supervised baseline: best validation Dice {baseline['best_val_mean_dice_network_grid']:.3f} "
            f"@ epoch {baseline['best_epoch']}")
    grid_unlabeled = []
    if semi:
        unlabeled = load_cases(s.unlabeled, cfg.labels, work / "unlabeled", log)
        grid_unlabeled = [GridCase.of(c, cfg) for c in unlabeled]
        log(f"semi-supervised ({s.method}): {len(grid_unlabeled)} unlabeled cases"
            + (f", pseudo-labels from epoch {s.start_epoch} at confidence {s.confidence}" if s.method == "pseudo-label"
               else f", teacher EMA decay {s.ema_decay}, consistency weight {s.weight} ramped up over "
                    f"{s.rampup_epochs} epochs"))
    training = _loop(cfg, grid_train, grid_val, grid_unlabeled, work, device, log)
    if baseline is not None:
        semi_dice, sup_dice = training["best_val_mean_dice_network_grid"], baseline["best_val_mean_dice_network_grid"]
        training["comparison"] = {
            "measure": "best validation mean Dice on the network grid, same validation cases",
            "supervised": {"best_val_mean_dice": sup_dice, "best_epoch": baseline["best_epoch"],
                           "epochs_run": baseline["epochs_run"], "stopped_early": baseline["stopped_early"],
                           "wall_seconds": baseline["wall_seconds"]},
            "semi_supervised": {"method": s.method, "best_val_mean_dice": semi_dice,
                                "best_epoch": training["best_epoch"], "epochs_run": training["epochs_run"],
                                "stopped_early": training["stopped_early"], "wall_seconds": training["wall_seconds"]},
            "difference": semi_dice - sup_dice}
        log(f"semi-supervised {semi_dice:.3f} vs supervised {sup_dice:.3f} validation Dice "
            f"({semi_dice - sup_dice:+.3f})")
    training["wall_seconds"] = round(time.time() - t0, 1)
    (work / "training.json").write_text(json.dumps(training, indent=2) + "\n")


def _consistency_rampup(step: int, rampup_steps: int) -> float:
    """Laine & Aila's sigmoid-shaped ramp-up, exp(-5 (1 - t)^2) for t = step / rampup_steps < 1, then 1."""
    if step >= rampup_steps:
        return 1.0
    t = step / rampup_steps
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def _ema(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
        for t, s in zip(teacher.buffers(), student.buffers()):
            t.copy_(s)


def _loop(cfg: TrainConfig, grid_train: list[GridCase], grid_val: list[GridCase], grid_unlabeled: list[GridCase],
          work: Path, device, log: Log) -> dict:
    """One training run from seed ``cfg.seed``: best.pt and last.pt in ``work``; returns its record."""
    t0 = time.time()
    work.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    s = cfg.strategy
    pseudo = s.kind == "semi-supervised" and s.method == "pseudo-label"
    teacher_mode = s.kind == "semi-supervised" and s.method == "mean-teacher"
    pseudo_rounds: list[dict] = []
    model = build_network(cfg)
    started_from = initial_weights(model, cfg)
    model = model.to(device)
    teacher = None
    if teacher_mode:
        teacher = copy.deepcopy(model)
        for param in teacher.parameters():
            param.requires_grad_(False)
        teacher.eval()  # deterministic targets: the teacher's noise is its input's, not dropout's
        # the consistency pair differs by intensity noise only: a spatial transform would move the answers apart
        noise_only = cfg.augmentation.model_copy(update={"probability": 0.0, "flip_axes": []})
    opt = _optimizer(cfg, model.parameters())
    total = cfg.epochs * cfg.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total))
    names = {lab.value: lab.name for lab in cfg.labels}
    history, best, best_epoch, stale, stopped_early = [], -1.0, 0, 0, False
    tty = sys.stdout.isatty()
    model.train()
    step_no = 0
    for epoch in range(1, cfg.epochs + 1):
        te, losses, consistency = time.time(), [], []
        for step in range(cfg.steps_per_epoch):
            x, y = _batch(grid_train, cfg, rng)
            x, y = augment(x.to(device), y.to(device), cfg.augmentation, rng)
            loss = dice_ce_loss(model(x), y, cfg.loss.dice_weight, cfg.loss.ce_weight)
            if pseudo_rounds:  # pseudo-labels, once the model has labelled the unlabeled cases
                xu, yu = augment(*(t.to(device) for t in _batch(grid_unlabeled, cfg, rng)), cfg.augmentation, rng)
                loss = loss + s.weight * dice_ce_loss(model(xu), yu, cfg.loss.dice_weight, cfg.loss.ce_weight)
            if teacher is not None:
                xu, yu = _batch(grid_unlabeled, cfg, rng)  # yu: whatever truth the cases have, never used
                xs, _ = augment(xu.to(device), yu.to(device), noise_only, rng)
                xt, _ = augment(xu.to(device), yu.to(device), noise_only, rng)
                with torch.no_grad():
                    target = teacher(xt).softmax(1)
                cons = F.mse_loss(model(xs).softmax(1), target)
                ramp = _consistency_rampup(step_no, s.rampup_epochs * cfg.steps_per_epoch)
                loss = loss + s.weight * ramp * cons
                consistency.append(float(cons.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step_no += 1
            if teacher is not None:
                # Tarvainen & Valpola: a lower decay early, so the teacher is not stuck near the random start
                _ema(teacher, model, min(s.ema_decay, 1.0 - 1.0 / (step_no + 1)))
            losses.append(float(loss.detach()))
            if tty:
                print(f"\repoch {epoch}/{cfg.epochs} {_bar(step + 1, cfg.steps_per_epoch)} loss {np.mean(losses):.4f}",
                      end="", flush=True)
        entry = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": float(sched.get_last_lr()[0])}
        if consistency:
            entry["consistency_loss"] = float(np.mean(consistency))
        line = f"epoch {epoch}/{cfg.epochs} {_bar(epoch, cfg.epochs)} loss {entry['loss']:.4f}"
        if epoch % cfg.validate_every == 0 or epoch == cfg.epochs:
            product = teacher if teacher is not None else model  # what would be deployed
            scores = _validate(product, grid_val, cfg, device)
            if teacher is not None:
                teacher.eval()  # _validate leaves its model in train mode
            mean = float(np.nanmean(list(scores.values())))
            entry.update(val_dice={names[v]: s for v, s in scores.items()}, val_mean_dice=mean)
            torch.save({"model": product.state_dict(), "epoch": epoch, "config": cfg.model_dump(mode="json")},
                       work / "last.pt")
            if mean > best + cfg.early_stopping.min_delta:
                best, best_epoch, stale = mean, epoch, 0
                torch.save({"model": product.state_dict(), "epoch": epoch, "config": cfg.model_dump(mode="json")},
                           work / "best.pt")
            else:
                stale += 1
            line += f" val Dice {mean:.3f} (best {best:.3f} @ {best_epoch})"
        if pseudo and epoch >= s.start_epoch and (epoch - s.start_epoch) % s.refresh_every == 0:
            kept = _pseudo_label(model, grid_unlabeled, cfg, device)
            pseudo_rounds.append({"epoch": epoch, "cases": len(grid_unlabeled), "kept_fraction": kept})
            entry["pseudo_label_kept_fraction"] = kept
            line += f" pseudo-labels kept {kept:.1%}"
        history.append(entry)
        log(("\r" if tty else "") + line + f" {time.time() - te:.1f}s")
        if stale >= cfg.early_stopping.patience:
            log(f"early stop: no validation improvement for {stale} validations")
            stopped_early = True
            break

    strategy = {"kind": s.kind, "unlabeled_cases": [c.name for c in grid_unlabeled]}
    if s.kind == "semi-supervised":
        strategy["method"] = s.method
        if pseudo:
            strategy["pseudo_label_rounds"] = pseudo_rounds
        else:
            strategy.update(ema_decay=s.ema_decay, consistency_weight=s.weight, rampup_epochs=s.rampup_epochs,
                            deployed="the teacher (the EMA of the student's weights)")
    return {"epochs_run": len(history), "best_epoch": best_epoch, "stopped_early": stopped_early,
            "init_from": started_from, "best_val_mean_dice_network_grid": best, "wall_seconds": round(time.time() - t0, 1),
            "device": str(device), "train_cases": [c.name for c in grid_train], "history": history,
            "strategy": strategy}


def describe(cfg: TrainConfig, out_dir: Path, train_cases: list[Case], val_cases: list[Case], extra: dict,
             log: Log = print) -> ModelCard:
    """Measure the deployed model in ``out_dir`` and write what it knows about its limits: validation
    Dice and confidence on the held-out cases, every held-out kind, the validated domain of the
    training data, plausibility ranges and the limitations these numbers imply (card.yaml, metrics.json)."""
    names = {lab.value: lab.name for lab in cfg.labels}
    work = Path(cfg.work_dir) / cfg.name
    log("validating the deployed ONNX pipeline on the held-out cases' source grids")
    draft = cfg.card_draft()
    runner = onnx_runner(load_model(out_dir, draft, "cpu"))
    per_case, conf = _measure(val_cases, draft, runner, names)
    dice = {n: float(np.nanmean([pc[n] for pc in per_case.values()])) for n in names.values()}
    mean_dice = float(np.mean(list(dice.values())))
    source = ("phantom and phantom family" if cfg.data.family and cfg.data.phantom else
              "phantom family" if cfg.data.family else "phantom" if cfg.data.phantom else
              "DICOMweb SEG" if cfg.data.dicomweb else "DICOM SEG")
    held_out, held_out_metrics = {}, {}
    for spec in cfg.data.held_out:
        log(f"measuring the held-out kind {spec.name!r} (never trained on)")
        cases = held_out_cases(spec, cfg.data, cfg.labels, Path(cfg.data.cache_dir or work / "phantoms"))
        kind_cases, kind_conf = _measure(cases, draft, runner, names)
        kind_dice = {n: float(np.nanmean([pc[n] for pc in kind_cases.values()])) for n in names.values()}
        held_out[spec.name] = {"cases": len(cases), "mean_dice": round(float(np.mean(list(kind_dice.values()))), 4),
                               "dice": {n: round(d, 4) for n, d in kind_dice.items()},
                               "confidence": round(float(np.mean(list(kind_conf.values()))), 4)}
        held_out_metrics[spec.name] = {"per_case": kind_cases, "confidence": kind_conf, "dice": kind_dice}
    validation = {"dataset": f"{len(val_cases)} held-out {source} cases ({', '.join(per_case)}), Dice on their "
                              "source grids through the deployed ONNX pipeline",
                  "cases": len(val_cases), "mean_dice": round(mean_dice, 4),
                  "dice": {n: round(d, 4) for n, d in dice.items()},
                  "confidence": round(float(np.mean(list(conf.values()))), 4), "held_out_kinds": held_out}
    by_source = _by_source(per_case, conf, names) if cfg.data.family and cfg.data.phantom else {}
    domain = _domain(cfg, train_cases + val_cases, source, held_out)
    # a detector's output is where to look, not a structure with a volume: no plausibility ranges
    plausibility = None if cfg.task == "detection" else plausibility_from_truth(
        names, [(c.truth, float(np.prod(c.volumes[0].geometry.spacing)) / 1000) for c in train_cases + val_cases],
        list(conf.values()))
    card = cfg.card_draft(validation, validated_domain=domain, plausibility=plausibility,
                          limitations=cfg.limitations + measured_limitations(validation, domain, by_source))
    metrics = {"model": cfg.name, "version": cfg.version, "model_bytes": (out_dir / card.model_file).stat().st_size,
               **extra,
               "validation": {"per_case": per_case, "confidence": conf, "dice": dice, "mean_dice": mean_dice,
                              **({"by_source": by_source} if by_source else {})},
               "held_out_kinds": held_out_metrics}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_card(card, out_dir)
    log("validation Dice on source grids: " + ", ".join(f"{n} {d:.3f}" for n, d in dice.items())
        + f"; mean {mean_dice:.3f}")
    return card


def measure_only(cfg: TrainConfig, log: Log = print) -> ModelCard:
    """``describe`` an already trained model again (``hilum train CONFIG --measure-only``): the same data and
    split as its training run, the training record kept, so a card gains its limits without retraining."""
    work = Path(cfg.work_dir) / cfg.name
    out_dir = Path(cfg.output_dir) / cfg.name
    old = json.loads((out_dir / "metrics.json").read_text()) if (out_dir / "metrics.json").is_file() else {}
    log(f"loading data ({cfg.data.source_name})")
    train_cases, val_cases = _split(load_cases(cfg.data, cfg.labels, work, log), cfg.data.validation_split, cfg.seed)
    if old.get("training", {}).get("train_cases") not in (None, [c.name for c in train_cases]):
        raise CardError("data: these are not the cases the model was trained on (metrics.json training.train_cases)")
    extra = {k: old[k] for k in ("parameters", "device", "training", "onnx_check", "code_version", "strategy") if k in old}
    return describe(cfg, out_dir, train_cases, val_cases, extra, log)


def _measure(cases: list[Case], card: ModelCard, runner, names: dict[int, str]):
    """Per-case Dice (by label name) and confidence through the deployed pipeline, on source grids."""
    per_case, conf = {}, {}
    for case in cases:
        pred, score = segment_scored(case.volumes, card, runner)
        per_case[case.name] = {names[v]: d for v, d in dice_per_label(pred, case.truth, names).items()}
        conf[case.name] = score.overall if score.overall is not None else 0.0
    return per_case, conf


_SOURCES = {"family": "phantom family (node.phantom.family)", "phantom": "hilum phantom (generate_ct)"}


def _by_source(per_case: dict, conf: dict, names: dict[int, str]) -> dict[str, dict]:
    """Validation of a mixed data set per source (case names start with it): the family's held-out seeds
    are the figure its goal is stated in, not hidden in a mean with the other painter's cases."""
    out = {}
    for prefix, title in _SOURCES.items():
        cases = [c for c in per_case if c.split("-")[0] == prefix]
        if cases:
            dice = {n: float(np.nanmean([per_case[c][n] for c in cases])) for n in names.values()
                    if not all(math.isnan(per_case[c][n]) for c in cases)}
            out[title] = {"cases": len(cases), "dice": dice, "mean_dice": float(np.mean(list(dice.values()))),
                          "confidence": float(np.mean([conf[c] for c in cases]))}
    return out


def _domain(cfg: TrainConfig, cases: list[Case], source: str, held_out: dict) -> ValidatedDomain:
    grid_mm = max(cfg.input.target_spacing)  # intensities as coarse as the network sees them
    facts = [measure_input(c.volumes[0], c.header, cfg.input.modality, grid_mm=grid_mm) for c in cases]
    excluded = cfg.data.family.exclude if cfg.data.family else {}
    trained = f"{source}: {len(cases)} cases" + (f", without {excluded}" if excluded else "")
    return domain_from_facts(facts, body_region=cfg.input.body_region, tilt_margin_deg=cfg.augmentation.rotate_deg,
                             grid_mm=grid_mm,
                             trained_on=[trained],
                             validated_on=[f"{source}: held-out seeds"] + [f"{k} (never trained on)" for k in held_out])


def measured_limitations(validation: dict, domain: ValidatedDomain, by_source: dict | None = None,
                         good: float = 0.9) -> list[str]:
    """Limitations the card states from what was measured, not written by hand."""
    dice = validation["dice"]
    out = [f"Measured on {validation['cases']} held-out cases: Dice "
           + ", ".join(f"{n} {d:.2f}" for n, d in dice.items()) + "."]
    for title, m in (by_source or {}).items():
        out.append(f"Of these, {m['cases']} held-out seeds of the {title}: Dice "
                   + ", ".join(f"{n} {d:.2f}" for n, d in m["dice"].items()) + ".")
    weak = [f"{n} ({d:.2f})" for n, d in dice.items() if d < good]
    if weak:
        out.append(f"Below Dice {good} on held-out cases: {', '.join(weak)}.")
    for kind, m in validation.get("held_out_kinds", {}).items():
        verdict = ("it carries there" if m["mean_dice"] >= validation["mean_dice"] - 0.05 else
                   "do not rely on it there")
        out.append(f"Never trained on {kind}: Dice there " + ", ".join(f"{n} {d:.2f}" for n, d in m["dice"].items())
                   + f" (mean {m['mean_dice']:.2f} vs {validation['mean_dice']:.2f}): {verdict}.")
    o = domain.orientation
    out.append(f"Validated domain: pixel spacing {domain.pixel_spacing_mm.describe('mm')}, slice thickness "
               f"{domain.slice_thickness_mm.describe('mm')}, coverage {domain.coverage_mm.describe('mm')}, "
               f"{'/'.join(o.planes)} slices tilted at most {o.max_tilt_deg:g} degrees"
               + (f", {'/'.join(o.patient_positions)}" if o.patient_positions else "")
               + "; other inputs are refused or delivered with a warning.")
    return out


class _CardDumper(yaml.SafeDumper):
    """Short scalar lists (spacings, colours, codes) on one line: the card stays readable."""


_CardDumper.add_representer(list, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", v, flow_style=all(isinstance(i, (int, float)) for i in v) or
    all(isinstance(i, str) and len(i) <= 8 for i in v)))


def _write_card(card: ModelCard, out_dir: Path) -> None:
    text = "# Written by node.models.train; validation measured on held-out cases.\n" + yaml.dump(
        card.model_dump(mode="json", exclude_none=True), Dumper=_CardDumper, sort_keys=False, allow_unicode=True)
    tmp = out_dir / "card.yaml.tmp"
    tmp.write_text(text)
    os.replace(tmp, out_dir / "card.yaml")
    load_card(out_dir)  # what was written must validate as a card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hilum train", description="Train a model from a config file and "
                                     "deploy it as models/<name>/")
    parser.add_argument("config", type=Path)
    parser.add_argument("--stage", choices=STAGES, action="append",
                        help="run only this stage (repeatable): prepare the network-grid arrays, fit from them "
                             "(e.g. on a GPU machine), deploy best.pt; default: all three in one process")
    parser.add_argument("--measure-only", action="store_true",
                        help="do not train: measure the deployed model again and rewrite its card's validation, "
                             "validated_domain, plausibility and limitations")
    parser.add_argument("--register", action="store_true",
                        help="register the trained model as a candidate version in the node's model registry")
    parser.add_argument("--node-config", dest="node_config", type=Path, help="the node's config (with --register)")
    parser.add_argument("--data-dir", dest="data_dir", type=Path, help="the node's data directory (with --register)")
    args = parser.parse_args(argv)
    if args.measure_only and args.register:
        print("error: --measure-only trains nothing to register", file=sys.stderr)
        return 2
    if args.register and args.stage and "deploy" not in args.stage:
        print("error: --register needs the deploy stage (it registers the deployed model)", file=sys.stderr)
        return 2
    try:
        cfg = load_train_config(args.config)
        if args.measure_only:
            measure_only(cfg)
            return 0
        out = train(cfg, args.config.read_text(), stages=tuple(s for s in STAGES if s in (args.stage or STAGES)))
    except CardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.register:
        from node.models.cli import register_trained

        return register_trained(out, args.node_config, args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
