"""`make bench`: run every benchmark, print one report and write it to docs/benchmarks.md.

Each bench/bench_*.py script prints its own table (medians, spread, ratios against the peers
it measures); this runner adds the machine's description so numbers are never read without it.
    .venv/bin/python bench/run_all.py [--quick] [--only ingest,rules]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (name, script, full arguments, quick arguments)
SUITE = [
    ("ingest", "bench_ingest.py", ["--runs", "5"], ["--runs", "1", "--slices", "12", "--cases", "single", "--no-warmup"]),
    ("phantom", "bench_phantom.py", [], ["--runs", "1"]),
    ("rules", "bench_rules.py", [], []),
    ("encoders", "bench_encoders.py", [], ["--repeat", "1", "--size", "128", "--slices", "40"]),
    ("seg-formats", "bench_seg_formats.py", [], ["--size", "128", "--slices", "40"]),
    ("ct-anatomy", "bench_ct_anatomy.py", [], ["--quick"]),
    ("lung-nodules", "bench_nodules.py", [], ["--quick"]),
    ("render", "bench_render.py", [], ["--shape", "60", "128", "128", "--size", "128", "--repeat", "1",
                                       "--frames", "3"]),
    ("view3d", "bench_view3d.py", [], None),
    ("security", "bench_security.py", [], ["--instances", "8", "--runs", "1", "--size", "128"]),
    ("models", "bench_models.py", [], ["--repeat", "1", "--size", "128", "--slices", "40"]),
    ("uncertainty", "bench_uncertainty.py", [], ["--size", "128", "--slices", "40"]),
    ("learning-loop", "bench_learning_loop.py", [], ["--quick"]),
    ("latency", "bench_latency.py", [], ["--quick"]),
    ("receiver-memory", "bench_receiver_memory.py", [], ["--quick"]),
    ("job-memory", "bench_job_memory.py", [], ["--quick"]),
    ("retrieve", "bench_retrieve.py", ["--runs", "3"], ["--quick"]),
    ("scaleout", "bench_scaleout.py", [], ["--quick"]),
    ("registration", "bench_registration.py", [], ["--quick", "--no-elastix", "--cases", "rigid"]),
]


def _cmd(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not found"


def machine() -> str:
    cpu = "unknown"
    try:
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1) if m else cpu
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    disk = subprocess.run(["df", "-hT", str(REPO)], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    versions = []
    for pkg in ("pynetdicom", "pydicom", "highdicom", "numpy", "SimpleITK", "vtk", "onnxruntime"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{pkg} -")
    return "\n".join([
        f"- CPU: {cpu}, {os.cpu_count()} cores; memory {mem:.1f} GiB",
        f"- disk: `{disk}`",
        f"- Python {platform.python_version()}; " + ", ".join(versions),
        f"- Orthanc: {_cmd(['Orthanc', '--version'])}; DCMTK: {_cmd(['storescu', '--version'])}",
    ])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes, one run: checks the scripts work")
    ap.add_argument("--only", help="comma-separated names: " + ",".join(n for n, *_ in SUITE))
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = ap.parse_args()
    wanted = set(args.only.split(",")) if args.only else None
    sections, failed = [], []
    for name, script, full, quick in SUITE:
        if wanted and name not in wanted:
            continue
        path = REPO / "bench" / script
        if not path.exists() or (args.quick and quick is None):  # None: too slow for a quick run
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, str(path), *(quick if args.quick else full)], cwd=REPO,
                             capture_output=True, text=True)
        text = out.stdout.strip()
        print(text, flush=True)
        if out.returncode != 0:
            failed.append(name)
            text += "\n\nFAILED:\n" + out.stderr[-3000:]
            print(out.stderr[-3000:], file=sys.stderr)
        sections.append(f"## {name}\n\n```\n{text}\n```\n\n({time.perf_counter() - t0:.0f} s)\n")
    report = (f"# Benchmarks\n\nRun {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `make bench`"
              f"{' --quick' if args.quick else ''}.\n\n{machine()}\n\n" + "\n".join(sections))
    if not args.quick:
        args.out.write_text(report)
        print(f"written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
