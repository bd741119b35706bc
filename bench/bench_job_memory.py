"""Peak memory of one job, phase by phase, against the size of its input volume (issue #15: a job's
peak at most 3x the volume).

Each handler's job runs alone in a fresh Python process (``run_job``, as a worker runs it, on a
phantom CT from bench/out/), its libraries imported first, so the RSS it starts from is the
worker's and the rest is the job's own. A thread samples the RSS every 5 ms; each sample is
counted against the phase the job last announced (its progress messages: loading, the handler's
steps, encoding). A handler's lazily loaded libraries (``_WARM``: VTK and the GL driver for
renders) are loaded first, as in a worker that has run it before. The job's own figures (VmHWM,
reset at the job's start) are reported beside them.

    .venv/bin/python bench/bench_job_memory.py [--slices 300] [--handlers ct-anatomy,lung-nodules]
    .venv/bin/python bench/bench_job_memory.py --quick     # a 128x128x40 CT
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import REPO, files_of, phantom_ct

HANDLERS = ("ct-anatomy", "lung-nodules", "renders", "model:hilum-ct-chest")
QUICK_HANDLERS = HANDLERS[:3]  # the model's validated domain refuses the 128x128x40 CT (3.5 mm pixels)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _warm_renderer() -> None:
    """VTK and the OpenGL driver, loaded as in a worker that has rendered before: 77 MB of
    library and ~100 MB of Mesa's llvmpipe, paid once per process, not per job or volume."""
    from node.render.offscreen import offscreen_window

    window = offscreen_window(512, 512)
    window.Render()
    window.Finalize()


# What a worker that has run the handler before already holds (its libraries), loaded before the job.
_WARM = {"renders": _warm_renderer}


def child(handler: str, dicom_dir: Path) -> dict:
    """One job in this (fresh) process; peak RSS above the start per announced phase."""
    import pydicom

    import node.encoders  # noqa: F401 - the worker's libraries, imported before the job as in a worker
    from node.handler_api import discover
    from node.jobs.worker import JobSpec, run_job
    from node.store.vault import VaultSpec

    discover()
    _WARM.get(handler, lambda: None)()
    paths = [str(p) for p in files_of(dicom_dir)]
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    phase, peaks, order = ["start"], {}, []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, now = _rss_mb(), phase[0]
            if now not in peaks:
                order.append(now)
            peaks[now] = max(peaks.get(now, 0.0), rss)
            time.sleep(0.005)

    def progress(fraction: float, message: str) -> None:
        phase[0] = message.split(":")[0][:40]

    with tempfile.TemporaryDirectory(prefix="bench-job-memory-") as d:
        spec = JobSpec(job_id=1, job_key="bench", study_uid=str(first.StudyInstanceUID), rule="bench",
                       handler=handler, params={}, series={str(first.SeriesInstanceUID): paths},
                       results_dir=str(Path(d) / "results"), vault=VaultSpec(d, None))
        sampler = threading.Thread(target=sample, daemon=True)
        start = _rss_mb()
        sampler.start()
        t0 = time.perf_counter()
        _, _, figures = run_job(spec, progress)
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
    return {"handler": handler, "start_mb": start, "seconds": seconds, "figures": figures,
            "phases": [(p, peaks[p] - start) for p in order if p != "start"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512, help="rows and columns")
    ap.add_argument("--handlers", help=f"default: {','.join(HANDLERS)} ({','.join(QUICK_HANDLERS)} with --quick)")
    ap.add_argument("--quick", action="store_true", help="a 128x128x40 CT")
    ap.add_argument("--json", type=Path, help="write raw results here")
    ap.add_argument("--child", nargs=2, metavar=("HANDLER", "DICOM_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return
    if args.quick:
        args.slices, args.size = 40, 128
    args.handlers = args.handlers or ",".join(QUICK_HANDLERS if args.quick else HANDLERS)
    study = phantom_ct(args.slices, size=args.size)
    out = []
    for handler in args.handlers.split(","):
        run = subprocess.run([sys.executable, __file__, "--child", handler, str(study)], capture_output=True,
                             text=True, cwd=REPO, check=True)
        out.append(json.loads(run.stdout.strip().splitlines()[-1]))
    print(f"peak memory of one job, {args.size}x{args.size}x{args.slices} phantom CT, each job alone in a fresh "
          f"process (libraries imported first); MB above the RSS the job started from, and x the input volume"
          + ("; on a CT this small the fixed costs (first use of the encoders) dominate" if args.size < 512 else ""))
    for r in out:
        f = r["figures"]
        volume = f["input_volume_mb"]
        own = f["peak_rss_mb"] - f["start_rss_mb"]
        print(f"{r['handler']:<21}volume {volume:.0f} MB; job's peak {own:.0f} MB = {own / volume:.2f}x the volume "
              f"(VmHWM); {r['seconds']:.1f} s")
        for name, mb in r["phases"]:
            print(f"{'':<23}{name:<42}{mb:7.0f} MB  {mb / volume:5.2f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
