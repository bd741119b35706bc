"""Prediction with an uncertainty estimate, and the strategies that pick the next cases to annotate.

Several *passes* of the same model over the same input, each under a perturbation the model is
expected to be indifferent to: the identity, the flips of the card's ``tta_flips`` (what it was
trained with) and small intensity scalings of the normalised input (the training augmentation's
``intensity_scale``). Where the network has dropout (the card's ``mc_dropout``), Monte-Carlo
dropout passes follow: each runs the card's second graph with one seeded draw of the dropout masks
(the same sub-network for every patch of that pass), under the test-time perturbations in turn, so
model uncertainty and input sensitivity are sampled together. The passes' mean is the prediction;
per case:

- ``score``: mean normalised entropy (0..1) of the mean class probabilities inside the predicted
  foreground: high where the model hesitates between classes;
- ``disagreement``: the fraction of voxels, among those any pass calls foreground, on which the
  passes' answers differ: high where the answer depends on the perturbation or the sub-network;
- ``mutual_information``: inside the predicted foreground, the entropy of the mean minus the mean
  of the passes' entropies (0 when every pass says the same thing, however unsure);
- per label, the mean entropy inside it; and ``features`` (label volume fractions and intensity
  statistics) for the ``diverse`` strategy; with MC passes, ``mc_dropout`` (their count, rate,
  seed and the disagreement among them alone).

Everything is computed on the network grid (the model's own resolution), so the cost is the
passes themselves; the entropy map stays on that grid too (``Uncertain.entropy``), which is what a
Parametric Map of it shows.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from node.models.card import InferenceSpec, ModelCard
from node.models.inference import LoadedModel, PatchRunner, Progress, confidence, postprocess, prepare_input, \
    probabilities_to_labels, sliding_window
from node.volume import Geometry, Volume

__all__ = ["UncertaintyParams", "Pass", "passes_for", "perturbed_runner", "stacked_runner", "scores",
           "segment_with_uncertainty", "predict_with_uncertainty", "Uncertain", "dropout_masks", "masked_runner",
           "CaseScore", "Pick", "rank_cases", "STRATEGIES"]

_AXIS = {"z": 2, "y": 3, "x": 4}  # flip axes of a (B, C, z, y, x) batch
STRATEGIES = ("uncertainty", "random", "diverse")


class UncertaintyParams(BaseModel):
    """A rule's ``params.uncertainty`` for a ``model:`` handler."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    flips: list[list[Literal["x", "y", "z"]]] | None = None  # default: the card's tta_flips
    intensity_scales: list[float] = Field(default_factory=lambda: [0.9, 1.1])  # normalised input × s
    # Monte-Carlo dropout passes; default: the card's mc_dropout.samples (none when the network has no dropout)
    mc_samples: int | None = Field(None, ge=0, le=32)
    seed: int = Field(0, ge=0)  # the dropout masks' draw: the same seed gives the same passes
    parametric_map: bool = False  # also deliver the entropy map as a DICOM Parametric Map
    # its grid: the network's (small), or the source series' (one frame per source slice, of its rows and
    # columns: what OHIF's parametric-map viewer needs, at 4 bytes per source voxel)
    parametric_map_grid: Literal["network", "source"] = "network"

    @field_validator("intensity_scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        bad = [s for s in v if not 0.5 <= s <= 2.0 or s == 1.0]
        if bad:
            raise ValueError(f"{bad} must lie in 0.5..2.0 and differ from 1 (the identity pass)")
        return v


@dataclass(frozen=True)
class Pass:
    flip: tuple[str, ...] = ()
    scale: float = 1.0
    sample: int | None = None  # Monte-Carlo dropout draw; None: the plain graph (dropout off)

    @property
    def name(self) -> str:
        parts = ([f"flip {''.join(self.flip)}"] if self.flip else []) + \
            ([f"intensity x{self.scale:g}"] if self.scale != 1.0 else []) + \
            ([f"dropout sample {self.sample + 1}"] if self.sample is not None else [])
        return ", ".join(parts) or "identity"


def passes_for(card: ModelCard, params: UncertaintyParams) -> list[Pass]:
    """The identity pass, one per flip, one per intensity scale, then the Monte-Carlo dropout
    passes (each under the test-time perturbations in turn); at least two, or ValueError."""
    flips = card.inference.tta_flips if params.flips is None else params.flips
    tta = [Pass()] + [Pass(flip=tuple(f)) for f in flips] + [Pass(scale=s) for s in params.intensity_scales]
    mc = params.mc_samples if params.mc_samples is not None else (card.mc_dropout.samples if card.mc_dropout else 0)
    if mc and card.mc_dropout is None:
        raise ValueError(f"uncertainty.mc_samples: model {card.name} has no dropout (its card has no mc_dropout), "
                         "so there is nothing to sample")
    out = tta + [Pass(tta[j % len(tta)].flip, tta[j % len(tta)].scale, sample=j) for j in range(mc)]
    if len(out) < 2:
        raise ValueError("uncertainty needs at least two passes: the card has no tta_flips and no "
                         "intensity_scales or mc_samples were given")
    return out


def dropout_masks(model: LoadedModel, rate: float, seed: int, sample: int) -> dict[str, np.ndarray]:
    """One channel mask per dropout input of the Monte-Carlo graph, drawn like ``Dropout3d`` in
    training (keep with probability 1 - rate, kept channels scaled by 1 / (1 - rate)), seeded by
    (seed, sample, site) so a pass is reproducible whatever ran before it."""
    out = {}
    for site, spec in enumerate(model.session.get_inputs()[1:]):
        channels = int(spec.shape[1])
        keep = np.random.default_rng([seed, sample, site]).random(channels) >= rate
        out[spec.name] = (keep / (1.0 - rate)).astype(np.float32).reshape(1, channels, 1, 1, 1)
    return out


def masked_runner(model: LoadedModel, masks: dict[str, np.ndarray]) -> PatchRunner:
    """The Monte-Carlo graph with fixed ``masks``: one sub-network, the same for every patch."""
    def run(batch: np.ndarray) -> np.ndarray:
        return model.session.run(None, {model.input_name: batch, **masks})[0]

    return run


def perturbed_runner(run: PatchRunner, p: Pass) -> PatchRunner:
    """``run`` on the perturbed batch, with the flip undone on its output (logits, voxel by voxel)."""
    return lambda batch: _unflip(run(_perturb(batch, p)), p)


def _perturb(batch: np.ndarray, p: Pass) -> np.ndarray:
    x = batch * np.float32(p.scale) if p.scale != 1.0 else batch
    axes = tuple(_AXIS[a] for a in p.flip)
    return np.ascontiguousarray(np.flip(x, axes)) if axes else x


def _unflip(out: np.ndarray, p: Pass) -> np.ndarray:
    axes = tuple(_AXIS[a] for a in p.flip)
    return np.flip(out, axes) if axes else out


def stacked_runner(run: PatchRunner, passes: Sequence[Pass]) -> PatchRunner:
    """``run`` once on every pass's perturbation of the batch stacked together: a (B, ...) batch gives
    (len(passes) * B, ...) logits, pass after pass, each with its flip undone. One call per patch
    instead of one per pass, each patch cut out once. On CPU this saves little (ONNX Runtime runs a
    batch of 4 in about the time of 4 batches of 1: docs/models.md); a bigger batch is what keeps an
    accelerator busy (not measured here). The call needs len(passes) times the memory."""
    def runner(batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        out = run(np.concatenate([_perturb(batch, p) for p in passes]))
        return np.concatenate([_unflip(out[i * n:(i + 1) * n], p) for i, p in enumerate(passes)])

    return runner


def _entropy(probs: np.ndarray) -> np.ndarray:
    """Normalised Shannon entropy (0..1) per voxel of (K, ...) class probabilities."""
    p = np.clip(probs, 1e-7, 1.0)
    return -(p * np.log(p)).sum(axis=0) / np.log(probs.shape[0])


def _answers(probs: np.ndarray, activation: str, threshold: float) -> np.ndarray:
    if activation == "softmax":
        return np.argmax(probs, axis=0)
    # sigmoid: one binary question per label; the answer is the most probable label above threshold
    return np.where(probs.max(axis=0) >= threshold, probs.argmax(axis=0) + 1, 0)


def _voxel_entropy(probs: np.ndarray, activation: str) -> np.ndarray:
    if activation == "softmax":
        return _entropy(probs)
    return np.mean([_entropy(np.stack([1 - m, m])) for m in probs], axis=0)


def _disagreement(answers: Sequence[np.ndarray]) -> float:
    """Among voxels any of ``answers`` calls foreground, the fraction on which two of them differ."""
    union = np.logical_or.reduce([a > 0 for a in answers])
    differ = np.zeros(union.shape, bool)
    for a, b in combinations(answers, 2):
        differ |= a != b
    return round(float((differ & union).sum()) / max(1, int(union.sum())), 5)


def scores(pass_probs: Sequence[np.ndarray], image: np.ndarray, label_names: dict[int, str],
           activation: str = "softmax", threshold: float = 0.5,
           mc: Sequence[bool] = ()) -> tuple[np.ndarray, dict, np.ndarray]:
    """(mean probabilities, the case's uncertainty record, the voxel entropy of the mean) from each
    pass's (K, z, y, x) probabilities; ``mc`` marks the Monte-Carlo dropout passes."""
    mean = np.mean(pass_probs, axis=0)
    answers = [_answers(p, activation, threshold) for p in pass_probs]
    winner = _answers(mean, activation, threshold)
    entropy = _voxel_entropy(mean, activation).astype(np.float32)
    fg = winner > 0
    # mutual information (BALD): what the passes disagree on, beyond what each is unsure of
    mean_pass_entropy = np.mean([_voxel_entropy(p, activation)[fg] for p in pass_probs], axis=0) if fg.any() else 0
    per_label = {name: round(float(entropy[winner == v].mean()), 5) if (winner == v).any() else None
                 for v, name in label_names.items()}
    total = winner.size
    features = [round(float((winner == v).sum()) / total, 6) for v in label_names] + \
        [round(float(image.mean()), 4), round(float(image.std()), 4)]
    record = {
        "score": round(float(entropy[fg].mean()), 5) if fg.any() else 0.0,
        "disagreement": _disagreement(answers),
        "mutual_information": round(max(0.0, float(np.mean(entropy[fg] - mean_pass_entropy))), 5) if fg.any() else 0.0,
        "passes": len(pass_probs), "per_label_entropy": per_label, "features": features,
        "method": "entropy of the mean over test-time passes" + (" and Monte-Carlo dropout samples" if any(mc) else "")
                  + ", inside the predicted foreground",
    }
    if any(mc):
        record["mc_dropout"] = {"samples": int(sum(mc)),
                                "disagreement": _disagreement([a for a, m in zip(answers, mc) if m])}
    return mean, record, entropy


@dataclass(frozen=True, eq=False)
class Uncertain:
    """A prediction with its uncertainty: labels on the source grid, the case's record (``scores``),
    and the voxel entropy of the mean (float32, 0..1) on the network ``grid``."""

    labels: np.ndarray
    record: dict
    entropy: np.ndarray
    grid: Geometry


SampleRunners = Callable[[int], PatchRunner]  # MC dropout draw -> the runner of that sub-network


def predict_with_uncertainty(volumes: Sequence[Volume], card: ModelCard, run_patch: PatchRunner,
                             params: UncertaintyParams, progress: Progress | None = None,
                             sample_runner: SampleRunners | None = None, stack_passes: bool = True) -> Uncertain:
    """Like ``inference.segment`` (labels on the first volume's exact grid), over several passes,
    with the case's uncertainty record (``scores``) and the passes named in it. ``sample_runner``
    gives the Monte-Carlo dropout passes' runners (needed when the plan has such passes).

    ``stack_passes``: run the test-time passes as one batch per patch (``stacked_runner``); False
    for a network whose batch size is fixed (then pass after pass, as many calls)."""
    report = progress or (lambda f, m: None)
    plan = passes_for(card, params)
    mc = [p.sample is not None for p in plan]
    if any(mc) and sample_runner is None:
        raise ValueError("Monte-Carlo dropout passes need the dropout graph's runner (sample_runner)")
    report(0.0, "resampling to the network grid")
    image, grid = prepare_input(volumes, card.input, card.preprocessing)
    xyz = card.input.array_axes == "xyz"
    if xyz:
        image = np.ascontiguousarray(image.transpose(0, 3, 2, 1))
    single = InferenceSpec(**{**card.inference.model_dump(), "tta_flips": []})
    probs = []
    tta = [p for p in plan if p.sample is None]  # the plan's first passes; the dropout samples follow
    if stack_passes and len(tta) > 1:
        def stacked(f, m):
            report(0.1 + 0.7 * f * len(tta) / len(plan), f"passes 1-{len(tta)}/{len(plan)} "
                                                         f"({', '.join(p.name for p in tta)}): {m}")
        probs.extend(sliding_window(image, stacked_runner(run_patch, tta), single, card.output_channels, stacked,
                                    passes=len(tta)))
    for i, p in enumerate(plan[len(probs):], start=len(probs)):
        def step(f, m, i=i, p=p):
            report(0.1 + 0.7 * (i + f) / len(plan), f"pass {i + 1}/{len(plan)} ({p.name}): {m}")
        base = run_patch if p.sample is None else sample_runner(p.sample)
        probs.append(sliding_window(image, perturbed_runner(base, p), single, card.output_channels, step))
    names = {lab.value: lab.name for lab in card.labels}
    mean, record, entropy = scores(probs, image, names, card.inference.activation, card.inference.threshold, mc)
    record["pass_names"] = [p.name for p in plan]
    if any(mc):
        record["mc_dropout"].update(rate=card.mc_dropout.rate, seed=params.seed)
    # The same confidence a plain run reports (the card's floor applies to it), from the mean of the passes.
    overall = confidence(mean, card.inference.activation, card.inference.threshold).overall
    record["confidence"] = None if overall is None else round(overall, 5)
    del probs, image
    if xyz:
        mean = np.ascontiguousarray(mean.transpose(0, 3, 2, 1))
        entropy = np.ascontiguousarray(entropy.transpose(2, 1, 0))
    report(0.8, "resampling to the source grid")
    source = volumes[0].geometry
    labels = probabilities_to_labels(mean, grid, source, card.labels, card.inference.activation,
                                     card.inference.threshold)
    report(0.95, "post-processing")
    labels = postprocess(labels, card.labels, float(np.prod(source.spacing)) / 1000.0)
    return Uncertain(labels, record, entropy, grid)


def segment_with_uncertainty(volumes: Sequence[Volume], card: ModelCard, run_patch: PatchRunner,
                             params: UncertaintyParams, progress: Progress | None = None,
                             sample_runner: SampleRunners | None = None,
                             stack_passes: bool = True) -> tuple[np.ndarray, dict]:
    """``predict_with_uncertainty``'s labels and record."""
    out = predict_with_uncertainty(volumes, card, run_patch, params, progress, sample_runner, stack_passes)
    return out.labels, out.record


# ---------------------------------------------------------------- active learning

@dataclass(frozen=True)
class CaseScore:
    case: str  # e.g. a study UID
    score: float  # the uncertainty score
    features: tuple[float, ...] = ()


@dataclass(frozen=True)
class Pick:
    case: str
    rank: int
    reason: str


def rank_cases(cases: Sequence[CaseScore], strategy: str, n: int | None = None, seed: int = 0) -> list[Pick]:
    """The next ``n`` cases to annotate (all by default), each with the reason it was picked.

    ``uncertainty``: highest score first. ``random``: a seeded draw (the baseline an effort curve is
    compared with). ``diverse``: greedy, each pick maximising its score times its distance (in
    standardised feature space) from the cases already picked, so near-duplicates of a picked
    uncertain case wait.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    n = len(cases) if n is None else min(n, len(cases))
    if strategy == "uncertainty":
        order = sorted(cases, key=lambda c: (-c.score, c.case))[:n]
        return [Pick(c.case, i + 1, f"uncertainty {c.score:.4f}, the highest left") for i, c in enumerate(order)]
    if strategy == "random":
        order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))[:n]]
        return [Pick(c.case, i + 1, f"random draw (seed {seed})") for i, c in enumerate(order)]
    feats = np.array([c.features for c in cases], dtype=float)
    if feats.ndim != 2 or feats.shape[1] == 0:
        raise ValueError("strategy diverse needs the cases' features")
    feats = (feats - feats.mean(axis=0)) / np.where(feats.std(axis=0) > 0, feats.std(axis=0), 1.0)
    left = list(range(len(cases)))
    picked: list[int] = []
    out = []
    for rank in range(1, n + 1):
        if not picked:
            best = max(left, key=lambda i: (cases[i].score, cases[i].case))
            reason = f"uncertainty {cases[best].score:.4f}, the highest"
        else:
            dist = {i: float(np.min(np.linalg.norm(feats[picked] - feats[i], axis=1))) for i in left}
            best = max(left, key=lambda i: (cases[i].score * dist[i], cases[i].case))
            reason = f"uncertainty {cases[best].score:.4f} at distance {dist[best]:.2f} from the cases picked before"
        left.remove(best)
        picked.append(best)
        out.append(Pick(cases[best].case, rank, reason))
    return out
