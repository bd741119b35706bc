"""Receiver memory over studies in a row: does the node's RSS stay flat from one study to the next?

One `hilum up` (managed Orthanc) receives ``--studies`` distinct phantom CTs (one seed each),
sent one after another by DCMTK storescu (TCP_NODELAY=1). Each study is let finish before the
next is sent: stable, its job done (rule: every CT series → ``--handler`` → Orthanc; ``none``
routes nothing), and every copy delivered (its results and its originals in Orthanc). Then the
RSS is sampled of the receiving process (the `hilum up` parent: SCP, index, router, delivery),
of the job workers together, and of the managed Orthanc (for information: it keeps every study).

    .venv/bin/python bench/bench_receiver_memory.py [--studies 10] [--slices 100] [--handler overview]
    .venv/bin/python bench/bench_receiver_memory.py --quick      # 3 small studies
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from pydicom import dcmread

from benchlib import files_of, finished_study, node_memory, phantom_ct, send, series_rule
from tests.nodeproc import running_node, wait_for

PROCESSES = ("receiver", "workers", "orthanc")


def slope(ys: list[float]) -> float | None:
    """Least-squares growth per study (MB/study); None for fewer than two samples."""
    n = len(ys)
    if n < 2:
        return None
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in enumerate(ys)) / sum((x - mx) ** 2 for x in range(n))


def summary(idle: float, ys: list[float]) -> dict:
    return {"idle": idle, "first": ys[0], "last": ys[-1], "max": max(ys), "slope": slope(ys),
            "slope_after_first": slope(ys[1:]), "samples": ys}


def run(studies: list[Path], handler: str | None, stable_after: float, timeout: float) -> tuple[dict, list[dict]]:
    """Memory when idle after start, and after each study."""
    with tempfile.TemporaryDirectory(prefix="bench-memory-", ignore_cleanup_errors=True) as d:
        rules = series_rule(Path(d) / "rules", handler)
        with running_node(Path(d) / "data", rules, stable_after=stable_after, log_level="WARNING") as node:
            idle = node_memory(node)
            samples = []
            for dicom_dir in studies:
                files = files_of(dicom_dir)
                study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                send(node.dicom_port, files, "HILUM")
                wait_for(lambda: finished_study(node, study_uid, len(files), jobs=1 if handler else 0), timeout,
                         f"study {study_uid} finished", interval=0.5)
                samples.append(node_memory(node))
    return idle, samples


def fmt(v: float | None, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:{width}.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=10)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--size", type=int, default=512, help="rows and columns")
    ap.add_argument("--handler", default="overview", help="handler each CT series is routed to, or 'none'")
    ap.add_argument("--stable-after", type=float, default=2.0, help="the node's quiet period, s")
    ap.add_argument("--timeout", type=float, default=600, help="per study, s")
    ap.add_argument("--quick", action="store_true", help="3 studies of 128x128x12")
    ap.add_argument("--json", type=Path, help="write raw results here")
    args = ap.parse_args()
    if args.quick:
        args.studies, args.slices, args.size = 3, 12, 128
    handler = None if args.handler == "none" else args.handler
    studies = [phantom_ct(args.slices, seed=s, size=args.size) for s in range(1, args.studies + 1)]
    idle, samples = run(studies, handler, args.stable_after, args.timeout)
    out = {p: summary(idle[p], [s[p] for s in samples]) for p in PROCESSES}
    files = files_of(studies[0])
    mb = sum(f.stat().st_size for f in files) / 1e6
    route = f"each routed to {handler} -> orthanc" if handler else "no rule matching (receive, index, archive only)"
    print(f"node memory over {args.studies} studies in a row: {args.size}x{args.size}x{args.slices} phantom CTs "
          f"({len(files)} instances, {mb:.1f} MB each), one node, {route};")
    print("RSS sampled after each study is stable, its job done and every result and original delivered to Orthanc")
    print("receiver = the `hilum up` process (SCP, index, router, delivery); workers = job worker processes; "
          "orthanc = the managed archive (holds every study)")
    print(f"{'RSS MB':<10}{'idle':>8}{'first':>8}{'last':>8}{'max':>8}{'slope MB/study':>16}{'after the first':>17}")
    for p, s in out.items():
        print(f"{p:<10}{s['idle']:8.1f}{s['first']:8.1f}{s['last']:8.1f}{s['max']:8.1f}{fmt(s['slope'], 16)}"
              f"{fmt(s['slope_after_first'], 17)}")
    print("receiver per study (MB): " + " ".join(f"{v:.0f}" for v in out["receiver"]["samples"]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
