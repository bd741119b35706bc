"""Benchmark: a model's prediction with uncertainty against the plain prediction, same case, same process.

The shipped model on a chest CT phantom (default 512x512x300, 0.7 mm pixels, 1 mm slices): the plain
handler run, then runs with ``params.uncertainty`` of 3 passes (identity + two intensity scalings)
and 4 passes (identity + three). The session is warmed on the case first, so every figure is
compute. Goal (issue 21): 4 passes within 2x a plain prediction; the passes run the network once
each, while resampling to the source grid and post-processing run once.

    .venv/bin/python bench/bench_uncertainty.py [--model hilum-ct-chest] [--size 512] [--slices 300]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="hilum-ct-chest")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--slices", type=int, default=300)
    args = p.parse_args()

    from bench_models import phantom
    from node.handler_api import HandlerInput
    from node.models.registry import model_handler
    from node.phantom.study import PhantomStudy
    from node.volume import load_series

    study = PhantomStudy.open(phantom(args.size, args.slices))
    series = load_series(sorted(Path(study.dicom_dir).iterdir()))
    cls = model_handler(f"model:{args.model}")
    inp = HandlerInput(study.study_uid, [series])

    def run(params: dict) -> tuple[float, dict]:
        h = cls(params)
        t = time.perf_counter()
        h.run(inp, lambda f, m: None)
        return time.perf_counter() - t, h.provenance.get("uncertainty", {})

    run({})  # warm: the ONNX session and the allocator
    plain, _ = run({})
    rows = [("plain prediction", 1, plain, None)]
    for scales in ([0.9, 1.1], [0.9, 0.95, 1.1]):
        seconds, unc = run({"uncertainty": {"intensity_scales": scales}})
        rows.append((f"with uncertainty ({unc['passes']} passes)", unc["passes"], seconds, unc["score"]))
    print(f"## Prediction with uncertainty ({args.model}, {args.size}x{args.size}x{args.slices} CT phantom)\n")
    print("| run | passes | seconds | x plain | case score |")
    print("| --- | --- | --- | --- | --- |")
    for name, passes, seconds, score in rows:
        print(f"| {name} | {passes} | {seconds:.1f} | {seconds / plain:.2f} | "
              f"{'' if score is None else f'{score:.4f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
