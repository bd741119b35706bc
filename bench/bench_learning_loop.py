"""Benchmark: the learning loop's rounds on CPU - training time per round, prediction with uncertainty
against a plain prediction, and the annotation-effort curve (validation Dice against labelled cases)
for the ``uncertainty`` and ``random`` strategies.

A pool of chest CT phantoms (normal chests, and variants the first round never sees: right-lung
consolidation, left pleural effusion) and a fixed validation set holding every kind. Round 1 trains on
``--start`` normal chests; each round then predicts the unlabelled pool with uncertainty (identity +
three intensity passes: 4 passes, stacked into one network call per patch; the table also
gives them one call each, as a comparison), the strategy picks ``--per-round`` cases, their truth is "annotated",
and the next round trains on all labels so far: from scratch, or with ``--fine-tune`` from the previous
round's best epoch (``init_from``, what a project's ``init_from: previous`` does). The network is the shipped model's
(``models/hilum-ct-chest/train.yaml``: base 8, depth 4, 48x64x64 patches at 4 mm, batch 4); the
phantoms are small (default 96x96x48 at 3.5 mm / 5 mm) and the rounds short (``--epochs`` x
``--steps``), so the Dice figures are a small-size curve, not the shipped model's quality. Dice is
measured on the validation cases' network grids.

    .venv/bin/python bench/bench_learning_loop.py [--rounds 3] [--start 4] [--per-round 4] [--epochs 6]
        [--steps 10] [--size 96] [--slices 48] [--fine-tune] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = ROOT / "var" / "bench" / "learning-loop"
KINDS = {"normal": {}, "consolidation": {"consolidation": "right"}, "effusion": {"effusion": "left"}}


def _config(work: Path, args) -> dict:
    import yaml

    shipped = yaml.safe_load((ROOT / "models" / "hilum-ct-chest" / "train.yaml").read_text())
    keep = ("input", "preprocessing", "network", "loss", "optimizer", "schedule", "batch_size", "patch_size",
            "foreground_oversample", "augmentation", "inference")
    cfg = {k: shipped[k] for k in keep if k in shipped}
    lungs_heart = [lab for lab in shipped["labels"] if lab["name"] in ("Left lung", "Right lung", "Heart")]
    for value, lab in enumerate(lungs_heart, start=1):
        lab["value"] = value
    cfg.update(name="loop-bench", version="0.1", description="learning-loop benchmark", intended_use="benchmark",
               limitations=["benchmark only"], training_data="phantoms", seed=3,
               data={"phantom": {"count": 2, "seed": 0}, "cache_dir": str(CACHE)}, labels=lungs_heart,
               epochs=args.epochs, steps_per_epoch=args.steps, early_stopping={"patience": args.epochs},
               emit=["SEG"], output_dir=str(work / "models"), work_dir=str(work / "train"), device="cpu",
               threads=args.threads)
    cfg["inference"] = {**cfg["inference"], "tta_flips": []}
    return cfg


def _cases(kind: str, seeds: range, labels, args):
    from node.models.data import phantom_cases
    from node.models.train_config import PhantomSource

    spec = PhantomSource(count=len(seeds), seed=seeds.start, rows=args.size, cols=args.size, slices=args.slices,
                         pixel_spacing=3.5, slice_thickness=5.0, nodules=0, **KINDS[kind])
    out = phantom_cases(spec, labels, CACHE)
    for case in out:
        case.name = f"{kind}-{case.name.split('-')[-1]}"
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--start", type=int, default=4, help="labelled normal chests in round 1")
    p.add_argument("--per-round", dest="per_round", type=int, default=4)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--slices", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fine-tune", dest="fine_tune", action="store_true",
                   help="each round starts from the previous round's best epoch instead of from scratch")
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 epochs x 3 steps on 64x64x32 phantoms")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.quick:
        args.rounds, args.epochs, args.steps, args.size, args.slices, args.per_round = 2, 2, 3, 64, 32, 2

    import numpy as np
    import torch

    from node.models.inference import load_model, onnx_runner, segment_scored
    from node.models.train import GridCase, _loop, build_network, export_onnx
    from node.models.train_config import TrainConfig
    from node.models.uncertainty import CaseScore, UncertaintyParams, predict_with_uncertainty, rank_cases

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="loop-bench-"))
    cfg = TrainConfig.model_validate(_config(work, args))
    labels = cfg.labels
    n_pool = args.start + args.per_round * args.rounds + 4
    n_variant = max(2, n_pool // 5)
    pool = (_cases("normal", range(100, 100 + n_pool - 2 * n_variant), labels, args)
            + _cases("consolidation", range(300, 300 + n_variant), labels, args)
            + _cases("effusion", range(500, 500 + n_variant), labels, args))
    val = (_cases("normal", range(700, 702), labels, args) + _cases("consolidation", range(800, 802), labels, args)[:1]
           + _cases("effusion", range(900, 902), labels, args)[:1])
    grids = {c.name: GridCase.of(c, cfg) for c in pool + val}
    by_name = {c.name: c for c in pool}
    params = UncertaintyParams(flips=[], intensity_scales=[0.9, 0.95, 1.1])  # 4 passes
    device = torch.device("cpu")
    report: dict = {"size": [args.size, args.size, args.slices], "epochs": args.epochs, "steps": args.steps,
                    "fine_tune": args.fine_tune,
                    "pool": len(pool), "validation": [c.name for c in val], "strategies": {}}
    for strategy in ("uncertainty", "random"):
        labelled = [c.name for c in pool if c.name.startswith("normal")][:args.start]
        rounds = []
        for r in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            start = work / "train" / f"{strategy}-{r - 1}" / "best.pt" if args.fine_tune and r > 1 else None
            record = _loop(cfg.model_copy(update={"init_from": start}), [grids[n] for n in labelled],
                           [grids[c.name] for c in val], [], work / "train" / f"{strategy}-{r}", device,
                           lambda line: None)
            train_s = time.perf_counter() - t0
            net = build_network(cfg)
            net.load_state_dict(torch.load(work / "train" / f"{strategy}-{r}" / "best.pt")["model"])
            folder = work / "models" / f"{strategy}-{r}"
            folder.mkdir(parents=True)
            export_onnx(net, folder / "model.onnx", 1, cfg.inference.patch_size)
            card = cfg.card_draft()
            run = onnx_runner(load_model(folder, card, "cpu"))
            rest = [c for c in pool if c.name not in labelled]
            scored, plain_s, unc_s, seq_s = [], [], [], []
            for case in rest:
                t = time.perf_counter()
                segment_scored(case.volumes, card, run)
                plain_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                out = predict_with_uncertainty(case.volumes, card, run, params)
                unc_s.append(time.perf_counter() - t)
                t = time.perf_counter()  # the passes one call each, as before they were stacked
                predict_with_uncertainty(case.volumes, card, run, params, stack_passes=False)
                seq_s.append(time.perf_counter() - t)
                scored.append(CaseScore(case.name, out.record["score"], tuple(out.record["features"])))
            picks = rank_cases(scored, strategy, args.per_round, seed=r)
            rounds.append({"round": r, "labelled": len(labelled), "train_s": round(train_s, 1),
                           "val_dice": round(record["best_val_mean_dice_network_grid"], 4),
                           "best_epoch": record["best_epoch"],
                           "plain_s_per_case": round(float(np.median(plain_s)), 2),
                           "uncertainty_s_per_case": round(float(np.median(unc_s)), 2),
                           "one_by_one_s_per_case": round(float(np.median(seq_s)), 2),
                           "picked": [pk.case for pk in picks]})
            labelled += [pk.case for pk in picks]
        report["strategies"][strategy] = rounds
    assert all(n in by_name for s in report["strategies"].values() for r in s for n in r["picked"])

    print(f"## Learning loop ({args.size}x{args.size}x{args.slices} CT phantoms, shipped network, "
          f"{args.epochs} epochs x {args.steps} steps per round, "
          f"{'each round fine-tuning the last' if args.fine_tune else 'each round from scratch'}, "
          f"CPU {args.threads} threads)\n")
    print(f"Pool {len(pool)} cases (normal, right consolidation, left effusion); validation "
          f"{', '.join(c.name for c in val)}; uncertainty with 4 passes.\n")
    print("| strategy | round | labelled cases | train s | val Dice | plain s/case | +uncertainty s/case | x plain "
          "| passes one by one: x plain | picked next |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for strategy, rounds in report["strategies"].items():
        for r in rounds:
            plain = max(r["plain_s_per_case"], 1e-9)
            kinds = ", ".join(sorted({n.split("-")[0] for n in r["picked"]}))
            print(f"| {strategy} | {r['round']} | {r['labelled']} | {r['train_s']} | {r['val_dice']:.3f} | "
                  f"{r['plain_s_per_case']} | {r['uncertainty_s_per_case']} | {r['uncertainty_s_per_case'] / plain:.2f} "
                  f"| {r['one_by_one_s_per_case'] / plain:.2f} | {kinds} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
