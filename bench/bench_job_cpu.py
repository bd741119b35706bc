"""CPU outside the handler, every built-in handler (issue #15: load + encode + write at most 1.0x
the handler's own time), those that need a prior study included.

Each case runs its job in a process of its own with ``run_job``, as a worker runs it, twice on the
same input: the first warms what a worker that has run jobs before holds (imports, highdicom's
tables of the standard, VTK), the second is measured. Each run has its own data directory, so no
run reuses another's kept arrays (ct-anatomy's lungs for lung-nodules). The input is a
baseline/follow-up pair of phantom chest CTs (the later one moved and breathing in, its nodules
changed; bench/bench_nodules.py's pair): the later study is the job's, the baseline its prior
where the handler takes one. No node, no Orthanc beside the job (bench_latency measures the jobs
in a node, where the encoders share the machine with Orthanc storing the originals); CPU seconds
per phase are the worker's own figures (the encoders' on their own thread).

    .venv/bin/python bench/bench_job_cpu.py [--slices 300] [--cases ct-anatomy,registration]
    .venv/bin/python bench/bench_job_cpu.py --quick     # a 128x128x40 pair
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import REPO, files_of

sys.path.insert(0, str(REPO))

# (case, handler, params, with the baseline as a prior)
CASES = (
    ("ct-anatomy", "ct-anatomy", {}, False),
    ("lung-nodules", "lung-nodules", {}, False),
    ("lung-nodules follow-up", "lung-nodules", {}, True),
    ("registration rigid", "registration", {}, True),
    ("renders", "renders", {}, False),
    ("model:hilum-ct-chest", "model:hilum-ct-chest", {}, False),
    ("overview", "overview", {}, False),
    ("priors-timeline", "priors-timeline", {}, True),
)
# The model's validated domain refuses the quick pair (3.5 mm pixels); the follow-up's
# registration is the slowest case and says the same as the rigid one at this size.
QUICK_SKIP = ("model:hilum-ct-chest", "lung-nodules follow-up")


def _pair(size: int, slices: int) -> tuple[Path, Path]:
    """The (prior, current) DICOM folders: bench_nodules's phantom pair, generated once."""
    from bench_nodules import phantoms

    base, later = phantoms(size, slices)
    return base.dicom_dir, later.dicom_dir


def _series(dicom_dir: Path) -> tuple[str, dict, str, str]:
    import pydicom

    paths = [str(p) for p in files_of(dicom_dir)]
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return (str(first.StudyInstanceUID), {str(first.SeriesInstanceUID): paths}, str(first.get("StudyDate", "")),
            str(first.get("StudyTime", "")))


def _volume_mb(dicom_dir: Path) -> float:
    """A CT series' volume as a job holds it (int16, one plane per instance)."""
    import pydicom

    paths = files_of(dicom_dir)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return len(paths) * int(first.Rows) * int(first.Columns) * 2 / 2**20


def child(case: str, prior_dir: Path, current_dir: Path) -> dict:
    """The case's job twice in this process; the second run's figures."""
    from node.handler_api import discover
    from node.jobs.worker import JobSpec, run_job
    from node.store.vault import VaultSpec

    discover()
    _, handler, params, with_prior = next(c for c in CASES if c[0] == case)
    study_uid, series, _, _ = _series(current_dir)
    extra = {}
    if with_prior:
        prior_uid, prior_series, date, time_ = _series(prior_dir)
        extra = {"priors": [{"study_uid": prior_uid, "source": "bench", "study_date": date, "study_time": time_,
                             "series": prior_series}], "priors_note": None}
    figures = []
    for run in range(2):
        with tempfile.TemporaryDirectory(prefix="bench-job-cpu-") as d:
            spec = JobSpec(job_id=run + 1, job_key=f"bench-{run}", study_uid=study_uid, rule="bench", handler=handler,
                           params=params, series=series, results_dir=str(Path(d) / "results"),
                           vault=VaultSpec(d, None), extra=extra)
            meta, _, f = run_job(spec, lambda fraction, message: None)
            figures.append({**f, "results": sorted({m["modality"] for m in meta}), "objects": len(meta)})
    inputs = figures[1]["input_volume_mb"] + (_volume_mb(prior_dir) if with_prior else 0.0)
    return {"case": case, "handler": handler, "warm-up": figures[0], **figures[1], "inputs_mb": inputs}


def outside(cpu: dict[str, float]) -> float:
    """CPU seconds of every phase but the handler's."""
    return sum(v for k, v in cpu.items() if k != "handler")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512, help="rows and columns")
    ap.add_argument("--cases", help=f"comma list of: {', '.join(c[0] for c in CASES)}")
    ap.add_argument("--quick", action="store_true", help="a 128x128x40 pair")
    ap.add_argument("--json", type=Path, help="write raw results here")
    ap.add_argument("--child", nargs=3, metavar=("CASE", "PRIOR_DIR", "CURRENT_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return
    if args.quick:
        args.slices, args.size = 40, 128
    names = args.cases.split(",") if args.cases else [c[0] for c in CASES if not (args.quick and c[0] in QUICK_SKIP)]
    unknown = set(names) - {c[0] for c in CASES}
    if unknown:
        ap.error(f"--cases: unknown {', '.join(sorted(unknown))}")
    prior_dir, current_dir = _pair(args.size, args.slices)
    out = []
    for name in names:
        run = subprocess.run([sys.executable, __file__, "--child", name, str(prior_dir), str(current_dir)],
                             capture_output=True, text=True, cwd=REPO)
        if run.returncode != 0:
            raise SystemExit(f"{name}: the job failed\n{run.stderr[-3000:]}")
        out.append(json.loads(run.stdout.strip().splitlines()[-1]))
    print(f"CPU outside the handler, each built-in handler's job in a process of its own (run_job, as a worker "
          f"runs it), the second of two runs on a {args.size}x{args.size}x{args.slices} phantom CT; "
          f"the baseline as the prior where a case takes one")
    print("outside = load + check + encode + write (+ kept arrays); CPU s, each phase on its own thread;")
    print("peak = the job's own (the worker's VmHWM less its RSS at the job's start), x its input volumes (priors too)")
    print(f"{'case':<26}{'load':>6}{'handler':>9}{'encode+write':>14}{'outside':>9}{'ratio':>8}{'peak':>14}  results")
    for r in out:
        cpu = r["cpu_seconds"]
        made = sum(v for k, v in cpu.items() if k.startswith(("encode ", "write ")))
        handler = cpu.get("handler", 0.0)
        ratio = f"{outside(cpu) / handler:.2f}x" if handler >= 0.005 else "-"
        own = r["peak_rss_mb"] - r["start_rss_mb"]
        peak = f"{own:.0f} MB {own / r['inputs_mb']:.1f}x" if r["inputs_mb"] else f"{own:.0f} MB"
        print(f"{r['case']:<26}{cpu.get('load', 0.0):6.2f}{handler:9.2f}{made:14.2f}{outside(cpu):9.2f}{ratio:>8}"
              f"{peak:>14}  {r['objects']} ({', '.join(r['results'])})")
    for r in out:
        print(f"{r['case']:<26}cpu: " + "  ".join(f"{k} {v:.2f}" for k, v in r["cpu_seconds"].items()))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
