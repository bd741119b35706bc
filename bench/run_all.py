"""`make bench`: run every benchmark, print one report and write it to docs/benchmarks.md.

Each bench/bench_*.py script prints its own table (medians, spread, ratios against the peers
it measures); this runner adds the machine's description so numbers are never read without it.
    .venv/bin/python bench/run_all.py [--quick] [--only ingest,rules]

A section's run output (its code block and the timing line under it) is replaced by the new run;
whatever else an engineer wrote in the section (quiet-machine runs, analysis) is kept below it, and
with --only the other sections stay as they are - a rerun must not erase the record of earlier ones.
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
    ("job-cpu", "bench_job_cpu.py", [], ["--quick"]),
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


# The block this runner writes for a section: its output in a code block, then "(N s; run ...)".
_RUN_BLOCK = re.compile(r"^```\n(?:(?!```).*\n)*?```\n\n\(\d+ s[^)\n]*\)\n", re.MULTILINE)


def split_report(text: str) -> tuple[str, dict[str, str]]:
    """The report's preamble and its sections (name -> body after the '## name' line), in order."""
    parts = re.split(r"^## (\S+)[ \t]*\n", text, flags=re.MULTILINE)
    return parts[0], dict(zip(parts[1::2], parts[2::2]))


def merge_report(old: str, preamble: str | None, runs: dict[str, str]) -> str:
    """``old`` with each section in ``runs`` given its new run block (the old run block dropped, the
    engineers' notes kept under it); ``preamble`` replaces the old one unless None."""
    old_preamble, sections = split_report(old) if old else ("", {})
    for name, block in runs.items():
        notes = _RUN_BLOCK.sub("", sections.get(name, ""), count=1).strip()
        sections[name] = "\n" + block + ("\n" + notes + "\n" if notes else "") + "\n"
    head = preamble if preamble is not None else old_preamble
    return head.rstrip("\n") + "\n\n" + "".join(f"## {n}\n{b}" for n, b in sections.items()).rstrip("\n") + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes, one run: checks the scripts work")
    ap.add_argument("--only", help="comma-separated names: " + ",".join(n for n, *_ in SUITE))
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = ap.parse_args()
    wanted = set(args.only.split(",")) if args.only else None
    runs, failed = {}, []
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
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        runs[name] = f"```\n{text}\n```\n\n({time.perf_counter() - t0:.0f} s; run {stamp})\n"
    if not args.quick:
        # A full run describes the machine anew; a partial one leaves the preamble to the run it describes.
        preamble = None if wanted else (f"# Benchmarks\n\nRun {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                                        f" by `make bench`.\n\n{machine()}\n")
        old = args.out.read_text() if args.out.exists() else ""
        args.out.write_text(merge_report(old, preamble, runs))
        print(f"written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
