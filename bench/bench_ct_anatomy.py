"""Benchmark: the `ct-anatomy` handler on a 512x512x300 chest CT phantom (generate_ct defaults).

Each run is a fresh subprocess: it loads the series (not timed), resets the process's peak
resident set (Linux clear_refs), then runs the handler (check + run, encoding excluded) and reads
the peak (VmHWM): the peak counts the input volume and headers already in memory, as a worker
holds them. Targets (issue 6): under 10 s and under 2 GB. The first run also scores the result
against the phantom's truth (Dice, volume error). Prints medians over --repeat runs.

    .venv/bin/python bench/bench_ct_anatomy.py [--repeat 3] [--size 512] [--slices 300]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def phantom(size: int, slices: int):
    from node.phantom import PhantomStudy, generate_ct

    where = Path(tempfile.gettempdir()) / f"hilum-bench-ct-anatomy-{size}x{slices}"
    if (where / "phantom.json").is_file():
        return PhantomStudy.open(where)
    return generate_ct(where, seed=0, rows=size, cols=size, slices=slices)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def score(study, label_map) -> str:
    import numpy as np

    from tests.test_ct_anatomy import TARGET_DICE, dice, predicted, truth

    want = truth(study, label_map.geometry)
    parts = []
    for name in TARGET_DICE:
        got = predicted(label_map, name)
        parts.append(f"{name} {dice(got, want[name]):.3f} ({got.sum() / max(want[name].sum(), 1) - 1:+.1%})")
    return "Dice (volume error): " + ", ".join(parts) + f"; labels {np.unique(label_map.labels).tolist()}"


def run_one(size: int, slices: int, with_score: bool) -> dict:
    from handlers.ct_anatomy import CTAnatomy
    from node.handler_api import HandlerInput
    from node.volume import load_series

    study = phantom(size, slices)
    series = load_series(study.series_files())
    Path("/proc/self/clear_refs").write_text("5")
    input_mb = _status_mb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    handler = CTAnatomy()
    inp = HandlerInput(study.study_uid, [series])
    handler.check(inp)
    label_map, report, *flags = handler.run(inp, lambda fraction, message: None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"wall_s": wall, "cpu_s": cpu, "peak_mb": _status_mb("VmHWM"), "input_mb": input_mb,
           "volumes": {g.tracking_id: g.measurements[0].value for g in report.groups}}
    if with_score:
        out["score"] = score(study, label_map)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--score", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.size, args.slices, args.score)))
        return
    phantom(args.size, args.slices)  # generated once, outside the timed runs
    runs = []
    for i in range(args.repeat):
        cmd = [sys.executable, __file__, "--one", "--size", str(args.size), "--slices", str(args.slices)]
        cmd += ["--score"] if i == 0 else []
        runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_s", "peak_mb", "input_mb")}
    print(f"ct-anatomy on a {args.size}x{args.size}x{args.slices} CT phantom, {args.repeat} runs (medians)")
    print("wall s / cpu s: check + run (encoding excluded; cpu s is less sensitive to a busy machine);")
    print("peak MB: peak RSS during the handler, input volume and headers included; input MB: RSS before")
    print(f"{'wall s':>8}{'cpu s':>8}{'peak MB':>9}{'input MB':>10}   targets: < 10 s, < 2048 MB")
    print(f"{med['wall_s']:>8.2f}{med['cpu_s']:>8.2f}{med['peak_mb']:>9.0f}{med['input_mb']:>10.0f}")
    print("runs (wall s): " + ", ".join(f"{r['wall_s']:.2f}" for r in runs))
    print("volumes (ml): " + ", ".join(f"{k} {v:.1f}" for k, v in runs[0]["volumes"].items()))
    print(runs[0]["score"])


if __name__ == "__main__":
    main()
