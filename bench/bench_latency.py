"""End-to-end latency per built-in handler: last instance acknowledged → all its results in Orthanc.

For each handler, one `hilum up` (managed Orthanc, rules routing every CT series to that handler
only) receives phantom CTs sent by DCMTK storescu (TCP_NODELAY=1). The first study is a warm-up
(its figure is reported as "cold": a fresh node's first job starts its worker, imports, loads a
model); the next ``--runs`` studies are measured, each a new study (another seed), each one
finished (results and originals delivered) before the next is sent. Times come from the node's
API (job created/finished, delivery timestamps) on the same clock as the sender; the result
objects are then looked up in Orthanc.

    .venv/bin/python bench/bench_latency.py [--runs 5] [--slices 300] [--stable-after 2]
    .venv/bin/python bench/bench_latency.py --quick      # one run, small CT, no warm-up
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from pydicom import dcmread

from benchlib import confirm_in_orthanc, files_of, finished_study, phantom_ct, send, series_rule
from tests.nodeproc import running_node, wait_for

HANDLERS = ("ct-anatomy", "lung-nodules", "renders", "overview", "model:hilum-ct-chest")
PHASES = ("send_s", "stability_s", "job_s", "deliver_s", "total_s")


def measure(node, dicom_dir: Path, timeout: float) -> dict:
    """Send one study and follow it to its last result in Orthanc; seconds per phase."""
    files = files_of(dicom_dir)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    send_s = send(node.dicom_port, files, "HILUM")
    acked = time.time()  # storescu has released the association: every instance is acknowledged
    st = wait_for(lambda: finished_study(node, study_uid, len(files), jobs=1), timeout,
                  f"study {study_uid} processed and delivered", interval=0.5)
    (job,) = st["jobs"]
    results = job["results"]
    if not results:
        raise RuntimeError(f"{job['handler']} made no result for study {study_uid}")
    delivered = {d["sop_instance_uid"]: d["delivered_at"] for d in st["deliveries"]
                 if d["kind"] == "result" and d["job_id"] == job["id"]}
    orthanc_instances = confirm_in_orthanc(node, study_uid, results)
    last = max(delivered.values())
    in_orthanc: dict[str, float] = {}  # modality -> its last object stored in Orthanc, s after the ack
    for r in results:
        at = delivered[r["sop_instance_uid"]] - acked
        in_orthanc[r["modality"]] = max(at, in_orthanc.get(r["modality"], at))
    figures = next(e["figures"] for e in reversed(job["history"]) if e["event"] == "done")
    return {
        # Results are delivered as they are made: all of them may be in Orthanc before the job ends.
        "send_s": send_s, "stability_s": job["created_at"] - acked,
        "job_s": min(job["finished_at"], last) - job["created_at"],
        "deliver_s": max(0.0, last - job["finished_at"]), "total_s": last - acked,
        "first_s": min(delivered.values()) - acked, "in_orthanc_s": in_orthanc,
        "phases_s": figures["seconds"], "phases_cpu_s": figures["cpu_seconds"], "peak_rss_mb": figures["peak_rss_mb"],
        "job_rss_mb": figures["peak_rss_mb"] - figures["start_rss_mb"],
        "input_volume_mb": figures["input_volume_mb"],
        "results": dict(Counter(r["modality"] for r in results)),
        "result_series": len({r["series_instance_uid"] for r in results}),
        "orthanc_instances": orthanc_instances, "instances": len(files),
    }


def _median_of(runs: list[dict], key: str) -> dict[str, float]:
    """Per-name medians of a dict-valued figure (phases, per-modality arrival)."""
    names = dict.fromkeys(n for r in runs for n in r[key])
    return {n: statistics.median(r[key].get(n, 0.0) for r in runs) for n in names}


def _outside_ratio(cpu: dict[str, float]) -> float:
    """One job's CPU seconds outside its handler over the handler's (the machine's speed, which
    swings from run to run, cancels out of each run's ratio)."""
    handler = cpu.get("handler", 0.0)
    return sum(v for k, v in cpu.items() if k != "handler") / handler if handler else float("nan")


def bench_handler(handler: str, studies: list[Path], stable_after: float, warmup: bool, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-latency-", ignore_cleanup_errors=True) as d:
        rules = series_rule(Path(d) / "rules", handler)
        with running_node(Path(d) / "data", rules, stable_after=stable_after, log_level="WARNING") as node:
            runs = [measure(node, s, timeout) for s in studies]
    cold = runs.pop(0) if warmup else None
    return {"handler": handler, "cold": cold, "runs": runs,
            "median": {k: statistics.median(r[k] for r in runs) for k in PHASES + ("first_s", "peak_rss_mb", "job_rss_mb")},
            "phases": _median_of(runs, "phases_s"), "phases_cpu": _median_of(runs, "phases_cpu_s"),
            "in_orthanc": _median_of(runs, "in_orthanc_s")}


def report(out: list[dict], args, instances: int, mb: float) -> None:
    size = f"{args.size}x{args.size}x{args.slices}"
    print(f"end-to-end latency, {size} phantom CT ({instances} instances, {mb:.0f} MB) sent by storescu "
          f"(1 association, TCP_NODELAY=1); stable_after {args.stable_after:g} s; "
          f"median of {args.runs} run(s){'' if args.no_warmup else ' after a warm-up study'}")
    print("seconds from the last instance acknowledged (storescu done); each column its own median:")
    print("  stability = until the job is created (stable_after; the router wakes when a study's quiet period "
          "ends)")
    print("  job       = job created -> finished: queue, load series, handler, encode, durable write")
    print("              (or -> its last result in Orthanc, when that came first: each result is delivered")
    print("              as soon as it is durable)")
    print("  deliver   = job finished -> its last result stored in Orthanc (POST /instances); 0 if already there")
    print("  total     = last instance acknowledged -> last result in Orthanc (all results checked there)")
    print("  cold      = total for a fresh node's first study (worker start, imports, model load)")
    print("  (the originals are forwarded to Orthanc at the same time: store_originals_in_orthanc)")
    print(f"{'handler':<22}{'send':>6}{'stability':>10}{'job':>7}{'deliver':>8}{'total':>7}{'spread':>13}"
          f"{'cold':>7}  results")
    for h in out:
        m, totals = h["median"], [r["total_s"] for r in h["runs"]]
        cold = f"{h['cold']['total_s']:7.1f}" if h["cold"] else f"{'-':>7}"
        objs = ", ".join(f"{n} {mod}" for mod, n in sorted(h["runs"][0]["results"].items()))
        print(f"{h['handler']:<22}{m['send_s']:6.1f}{m['stability_s']:10.1f}{m['job_s']:7.1f}{m['deliver_s']:8.1f}"
              f"{m['total_s']:7.1f}{f'{min(totals):.1f}-{max(totals):.1f}':>13}{cold}  {objs} "
              f"({h['runs'][0]['result_series']} series)")
    print()
    print("inside the job (the worker's own figures from the job history, medians, s): load = read and decode the")
    print("series once; check = the handler's refusals; encode X / write X = each encoder / its sealed durable file;")
    print("wall s, and cpu s (the phase's own thread: a write runs beside the next encoder; steadier")
    print("than wall time on a shared machine);")
    print("in Orthanc = each kind of result stored there, s after the last instance was acknowledged (each result is")
    print("handed to delivery as soon as it is durable); peak = the worker's peak RSS during the job (VmHWM, reset per")
    print("job), and the job's own share: the peak less the RSS the worker started the job with (libraries, models),")
    print("with its ratio to the input volume's size")
    for h in out:
        phases = "  ".join(f"{k} {v:.2f}" for k, v in h["phases"].items())
        cpu = "  ".join(f"{k} {v:.2f}" for k, v in h["phases_cpu"].items())
        arrivals = "  ".join(f"{k} {v:.1f}" for k, v in h["in_orthanc"].items())
        handler_s = h["phases"].get("handler", 0.0)
        outside = sum(v for k, v in h["phases"].items() if k != "handler")
        volume = h["runs"][0]["input_volume_mb"]
        own = h["median"]["job_rss_mb"]
        ratio = f"{own:.0f} MB = {own / volume:.1f}x the {volume:.0f} MB volume" if volume else f"{own:.0f} MB"
        cpu_handler = h["phases_cpu"].get("handler", 0.0)
        cpu_outside = sum(v for k, v in h["phases_cpu"].items() if k != "handler")
        print(f"{h['handler']:<22}wall: {phases}")
        print(f"{'':<22}cpu:  {cpu}")
        per_run = sorted(_outside_ratio(r["phases_cpu_s"]) for r in h["runs"])
        print(f"{'':<22}outside the handler, cpu: {cpu_outside:.2f} s = "
              f"{cpu_outside / cpu_handler if cpu_handler else float('nan'):.2f}x the handler's "
              f"(run by run {per_run[0]:.2f}-{per_run[-1]:.2f}x, median {statistics.median(per_run):.2f}x)")
        print(f"{'':<22}outside the handler, wall (encoders overlap) {outside:.2f} s = "
              f"{outside / handler_s if handler_s else float('nan'):.2f}x "
              f"the handler; in Orthanc: {arrivals}; first result {h['median']['first_s']:.1f}; "
              f"peak {h['median']['peak_rss_mb']:.0f} MB, the job's own {ratio}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # A phase's CPU seconds swing by up to a third from run to run on a shared VM: five give a steadier median.
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512, help="rows and columns")
    ap.add_argument("--stable-after", type=float, default=2.0, help="the node's quiet period, s")
    ap.add_argument("--handlers", default=",".join(HANDLERS), help="comma list of handler names")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--timeout", type=float, default=600, help="per study, s")
    ap.add_argument("--quick", action="store_true", help="1 run on a 128x128x40 CT, no warm-up")
    ap.add_argument("--json", type=Path, help="write raw results here")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.slices, args.size, args.no_warmup = 1, 40, 128, True
    seeds = range(1, args.runs + 1 + (0 if args.no_warmup else 1))
    studies = [phantom_ct(args.slices, seed=s, size=args.size) for s in seeds]
    out = [bench_handler(h, studies, args.stable_after, not args.no_warmup, args.timeout)
           for h in args.handlers.split(",")]
    files = files_of(studies[0])
    report(out, args, len(files), sum(f.stat().st_size for f in files) / 1e6)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
