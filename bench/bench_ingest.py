"""Ingest benchmark: Hilum vs DCMTK storescp vs Orthanc, in the same run, alternating.

One 300-slice 512x512 phantom CT sent by DCMTK storescu (TCP_NODELAY=1) over one association,
over 4 parallel associations, and as an RLE-lossless copy. Every receiver starts fresh for each
run (empty storage), so nothing is cached between runs that real use would not have cached.
Hilum runs as `hilum up` with its durable path (fsync + committed index row before Success).

    .venv/bin/python bench/bench_ingest.py [--runs 5] [--slices 300]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from benchlib import files_of, phantom_ct, send
from tests.nodeproc import free_port, running_node, storescp, wait_for, _port_open


class Receiver(NamedTuple):
    port: int
    called: str  # its AE title


def _scratch(prefix: str):
    return tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True)


@contextmanager
def storescp_receiver():
    with _scratch("bench-scp-") as d, storescp(Path(d), "STORESCP", options=("+xa",)) as port:
        yield Receiver(port, "STORESCP")


@contextmanager
def orthanc_receiver():
    from node.archive.orthanc import ManagedOrthanc
    from node.config import load_settings

    with _scratch("bench-orthanc-") as d:
        port = free_port()
        m = ManagedOrthanc(load_settings(data_dir=Path(d), orthanc_http_port=free_port(), orthanc_dicom_port=port,
                                         orthanc_dicom_enabled=True))
        m.start()
        try:
            wait_for(lambda: _port_open(port), 20, "Orthanc DICOM port")
            yield Receiver(port, "HILUMARCHIVE")
        finally:
            m.stop()


@contextmanager
def hilum_receiver(encrypted: bool = False):
    with _scratch("bench-hilum-") as d:
        rules = Path(d) / "rules"
        rules.mkdir()
        extra = {"spool_encryption": {"key_file": str(Path(d) / "keys" / "spool.json")}} if encrypted else {}
        with running_node(Path(d) / "data", rules, stable_after=3600, log_level="WARNING", **extra) as node:
            yield Receiver(node.dicom_port, "HILUM")


# hilum: the spool sealed with a CRC only; hilum-enc: sealed with AES-256-GCM (spool_encryption).
RECEIVERS = {"storescp": storescp_receiver, "orthanc": orthanc_receiver, "hilum": hilum_receiver,
             "hilum-enc": lambda: hilum_receiver(encrypted=True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--json", type=Path, help="write raw results here")
    ap.add_argument("--cases", default="single,parallel,rle", help="comma list of: single, parallel, rle")
    ap.add_argument("--no-warmup", action="store_true")
    args = ap.parse_args()
    wanted = set(args.cases.split(","))
    cases = {}
    if "single" in wanted:
        cases["1 assoc"] = (files_of(phantom_ct(args.slices, "explicit")), 1, [])
    if "parallel" in wanted:
        cases["4 assocs"] = (files_of(phantom_ct(args.slices, "explicit")), 4, [])
    if "rle" in wanted:
        cases["1 assoc RLE"] = (files_of(phantom_ct(args.slices, "rle")), 1, ["-xr"])
    results: dict[str, dict[str, list[float]]] = {c: {r: [] for r in RECEIVERS} for c in cases}
    for case, (files, assocs, propose) in cases.items():
        mb = sum(f.stat().st_size for f in files) / 1e6
        first = 1 if args.no_warmup else 0
        for run in range(first, args.runs + 1):  # run 0 is the warm-up
            for name, receiver in RECEIVERS.items():
                with receiver() as rx:
                    dt = send(rx.port, files, rx.called, assocs, propose)
                if run:
                    results[case][name].append(dt)
        print(f"\n{case}: {len(files)} instances, {mb:.0f} MB, median of {args.runs}")
        print(f"{'receiver':<10} {'s':>7} {'spread':>13} {'inst/s':>8} {'MB/s':>7}")
        for name, times in results[case].items():
            med = statistics.median(times)
            print(f"{name:<10} {med:7.2f} {min(times):6.2f}-{max(times):<6.2f} {len(files) / med:8.0f} {mb / med:7.0f}")
        h, o, s, e = (statistics.median(results[case][n]) for n in ("hilum", "orthanc", "storescp", "hilum-enc"))
        print(f"hilum/orthanc {h / o:.2f}   hilum/storescp {h / s:.2f}   "
              f"hilum-enc/orthanc {e / o:.2f}   encryption cost {100 * (e / h - 1):+.0f} %")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
