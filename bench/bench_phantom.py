"""Phantom generation benchmark: a default 512x512x300 chest CT written with its ground truth.

Run: .venv/bin/python bench/bench_phantom.py [--runs 3] [--all]

Target (issue 2): the default CT study (explicit VR, 300 files + label volume + JSON truth) in
well under 10 s on the 2-core build machine. Prints medians of wall-clock and CPU time (CPU time
shows the work when other jobs share the machine). ``--all`` adds the follow-up, the compressed
transfer syntaxes, the MR and the CR.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.phantom import generate_cr, generate_ct, generate_followup, generate_mr  # noqa: E402


def measure(make, runs: int) -> tuple[float, float, str]:
    walls, cpus, what = [], [], ""
    for _ in range(runs):
        work = Path(tempfile.mkdtemp(prefix="bench-phantom-"))
        try:
            wall, cpu = time.perf_counter(), time.process_time()
            study = make(work)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            size = sum(p.stat().st_size for p in study.root.rglob("*") if p.is_file())
            what = f"{len(study.series_files())} files, {size / 1e6:.0f} MB"
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return statistics.median(walls), statistics.median(cpus), what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--all", action="store_true", help="also follow-up, RLE, JPEG 2000, MR and CR")
    args = ap.parse_args()

    items = [("CT 512x512x300 explicit (default)", lambda d: generate_ct(d / "ct", seed=0), "< 10 s")]
    if args.all:
        def followup(d: Path):
            return generate_followup(generate_ct(d / "base", seed=0, rows=256, cols=256, pixel_spacing=1.4,
                                                 slices=150, slice_thickness=2.0), d / "fu")

        items += [
            ("CT 512x512x300 RLE lossless", lambda d: generate_ct(d / "ct", seed=0, transfer_syntax="rle"), ""),
            ("CT 512x512x300 JPEG 2000 lossless", lambda d: generate_ct(d / "ct", seed=0, transfer_syntax="j2k"), ""),
            ("CT 256x256x150 + rotated follow-up", followup, ""),
            ("MR 256x256x60", lambda d: generate_mr(d / "mr", seed=0), ""),
            ("CR 1024x1024", lambda d: generate_cr(d / "cr", seed=0), ""),
        ]
    print(f"{'item':38} {'wall s':>8} {'cpu s':>8}  {'target':8} output   (median of {args.runs})")
    for name, make, target in items:
        wall, cpu, what = measure(make, args.runs)
        print(f"{name:38} {wall:8.2f} {cpu:8.2f}  {target:8} {what}", flush=True)


if __name__ == "__main__":
    main()
