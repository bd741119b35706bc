"""Benchmark: the shipped model (``model:<name>``) on a 512x512x300 chest CT phantom.

Each repeat runs in a fresh subprocess that loads the series from DICOM like the node does, then
runs the handler; reported are the handler's wall time (stage by stage) and the process's peak
memory (ru_maxrss, which includes the loaded 157 MB volume and the Python runtime). The phantom is
generated once into var/bench/. Targets (issue 7): under 60 s and under 4 GB on this CPU.

Then Dice per phantom family on small volumes (``--family-cases`` each): held-out seeds of the family
the model was trained on, and every held-out kind of its training config (never trained on), with
the model's confidence and how many results its domain and plausibility checks would flag.

    .venv/bin/python bench/bench_models.py [--model hilum-ct-chest] [--provider auto|cpu|cuda]
                                           [--repeat 3] [--size 512] [--slices 300]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("resampling to the network grid", "patch", "resampling to the source grid", "post-processing")


def phantom(size: int, slices: int) -> Path:
    from node.phantom.ct import generate_ct

    out = ROOT / "var" / "bench" / f"models-ct-{size}x{size}x{slices}"
    if not (out / "phantom.json").is_file():
        t = time.perf_counter()
        generate_ct(out, seed=7, rows=size, cols=size, slices=slices, pixel_spacing=0.7 * 512 / size,
                    slice_thickness=1.0)
        print(f"generated the phantom in {time.perf_counter() - t:.1f} s: {out}", file=sys.stderr)
    return out


def child(study_dir: Path, model: str, provider: str) -> dict:
    from node.handler_api import HandlerInput
    from node.models.registry import model_handler
    from node.phantom.study import PhantomStudy
    from node.volume import load_series

    study = PhantomStudy.open(study_dir)
    t0 = time.perf_counter()
    series = load_series(sorted(Path(study.dicom_dir).iterdir()))
    load_s = time.perf_counter() - t0
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    handler = model_handler(f"model:{model}")({"provider": provider})
    marks: list[tuple[str, float]] = []

    def progress(fraction: float, message: str) -> None:
        stage = "patch" if message.startswith("patch") else message
        if not marks or marks[-1][0] != stage:
            marks.append((stage, time.perf_counter()))

    t1 = time.perf_counter()
    results = handler.run(HandlerInput(study.study_uid, [series]), progress)
    end = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dice = _dice(study, handler, results[0].labels)
    stages = {}
    for (name, start), nxt in zip(marks, [m[1] for m in marks[1:]] + [end]):
        stages[name] = stages.get(name, 0.0) + nxt - start
    return {
        "load_s": load_s, "run_s": end - t1, "stages": stages,
        "peak_rss_mb": peak, "rss_after_load_mb": rss_loaded, "dice": dice,
        "providers": handler.provenance["execution_providers"], "shape": list(series.volume.geometry.shape),
        "segments": [s.name for s in results[0].segments],
    }


def _dice(study, handler, labels) -> dict[str, float]:
    """Dice against the phantom's truth, with the label mapping of the model's training config."""
    from node.models.data import read_phantom
    from node.models.train import dice_per_label
    from node.models.train_config import load_train_config

    config = handler.model_dir / "train.yaml"
    if not config.is_file():
        return {}
    cfg = load_train_config(config)
    truth = read_phantom(study, cfg.labels, "bench").truth
    names = {lab.value: lab.name for lab in cfg.labels}
    return {names[v]: d for v, d in dice_per_label(labels, truth, names).items()}


def family_dice(model: str, n: int) -> list[dict]:
    """Dice, confidence and flags per phantom family (``n`` small cases each), in this process."""
    import numpy as np

    from node.handler_api import HandlerInput
    from node.models.data import family_case, family_seeds, held_out_cases, phantom_cases
    from node.models.registry import model_handler
    from node.models.train import dice_per_label
    from node.models.train_config import load_train_config
    from node.volume import SeriesData

    handler = model_handler(f"model:{model}")({"provider": "cpu"})
    cfg = load_train_config(handler.model_dir / "train.yaml")
    cache = ROOT / "var" / "bench" / "model-families"
    names = {lab.value: lab.name for lab in cfg.labels}
    groups = []
    if cfg.data.phantom is not None:
        ph = cfg.data.phantom
        groups.append(("hilum phantom (its training kind), held-out seeds", phantom_cases(
            ph.model_copy(update={"seed": ph.seed + ph.count + 100, "count": max(2, n)}), cfg.labels, cache)[:n]))
    if cfg.data.family is not None:
        fam = cfg.data.family
        first = fam.seed + 100 * fam.count  # far beyond the training seeds
        groups.append(("phantom family, held-out seeds", [
            family_case(cache, s, r, k, cfg.labels, fam.unpainted)
            for s, r, k in family_seeds(first, n, fam.rows, fam.slices, exclude=fam.exclude)]))
    for spec in cfg.data.held_out:
        groups.append((f"{spec.name} (never trained on)",
                       held_out_cases(spec.model_copy(update={"count": n}), cfg.data, cfg.labels, cache)))
    out = []
    for family, cases in groups:
        dice, conf, flagged = {v: [] for v in names}, [], 0
        for case in cases:
            series = SeriesData("1.2.826.0.1.3680043.8.498.99", "CT", [case.header] if case.header else [],
                                case.volumes[0])
            inp = HandlerInput("1.2.3", [series])
            flags = handler.assess_input(inp)
            results = handler.run(inp, lambda f, m: None)
            flags += [r for r in results if hasattr(r, "check")]
            flagged += bool(flags)
            conf.append(handler.provenance["confidence"] or 0.0)
            for v, d in dice_per_label(results[0].labels, case.truth, names).items():
                dice[v].append(d)
        out.append({"family": family, "cases": len(cases), "flagged": flagged,
                    "confidence": float(np.mean(conf)),
                    # nan: a label neither the truth nor the model has in any case (the family's liver)
                    "dice": {names[v]: float(np.nanmean(d)) if not np.isnan(d).all() else float("nan")
                             for v, d in dice.items()}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="hilum-ct-chest")
    ap.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--family-cases", type=int, default=4, help="small cases per phantom family for Dice (0: skip)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.provider)))
        return
    study = phantom(args.size, args.slices)
    runs = []
    for _ in range(args.repeat):
        cmd = [sys.executable, __file__, "--child", str(study), "--model", args.model, "--provider", args.provider]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ)
        if out.returncode:
            sys.exit(f"benchmark run failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    first = runs[0]
    print(f"model:{args.model} on a {'x'.join(map(str, first['shape'][::-1]))} CT (cols x rows x slices), "
          f"providers {', '.join(first['providers'])}, {os.cpu_count()} CPUs, median of {len(runs)}")
    print(f"{'what':<36}{'median':>12}{'min':>12}{'max':>12}")
    rows = [("load series from DICOM (s)", [r["load_s"] for r in runs])]
    rows += [(f"  {s} (s)", [r["stages"].get(s, 0.0) for r in runs]) for s in STAGES]
    rows += [("handler run, total (s)", [r["run_s"] for r in runs]),
             ("peak memory, whole process (MB)", [r["peak_rss_mb"] for r in runs]),
             ("  of which before the run (MB)", [r["rss_after_load_mb"] for r in runs])]
    for name, values in rows:
        print(f"{name:<36}{statistics.median(values):>12.1f}{min(values):>12.1f}{max(values):>12.1f}")
    if first["dice"]:
        print("Dice vs truth: " + ", ".join(f"{n} {d:.3f}" for n, d in first["dice"].items()))
    verdict = "meets" if med("run_s") < 60 and med("peak_rss_mb") < 4096 else "MISSES"
    print(f"{verdict} the targets (< 60 s, < 4096 MB); segments: {', '.join(first['segments'])}")
    if args.family_cases > 0 and (ROOT / "models" / args.model / "train.yaml").is_file():
        rows = family_dice(args.model, args.family_cases)
        labels = list(rows[0]["dice"])
        print(f"\nDice per phantom family ({args.family_cases} small cases each; flagged: results the domain, "
              "plausibility or confidence checks mark)")
        width = max(len(r["family"]) for r in rows) + 2
        print(f"{'family':<{width}}" + "".join(f"{n:>12}" for n in labels) + f"{'confidence':>12}{'flagged':>9}")
        for r in rows:
            print(f"{r['family']:<{width}}" + "".join(f"{r['dice'][n]:>12.3f}" for n in labels)
                  + f"{r['confidence']:>12.3f}{r['flagged']:>6}/{r['cases']}")


if __name__ == "__main__":
    main()
