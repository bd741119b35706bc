"""The benchmark scripts run (quick sizes). Timings are never asserted: the numbers are for people."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_quick_benchmarks_run_and_report_every_peer(tmp_path):
    out = subprocess.run([sys.executable, "bench/run_all.py", "--quick", "--only", "ingest,rules"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for peer in ("storescp", "orthanc", "hilum", "hilum/orthanc"):
        assert peer in out.stdout
    assert "match_series" in out.stdout


def _quick(script: str, json_out: Path) -> tuple[str, object]:
    out = subprocess.run([sys.executable, f"bench/{script}", "--quick", "--json", str(json_out)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout, json.loads(json_out.read_text())


def test_run_all_includes_the_latency_and_memory_benchmarks():
    spec = importlib.util.spec_from_file_location("run_all", REPO / "bench" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    suite = {name: (script, quick) for name, script, _, quick in run_all.SUITE}
    assert suite["latency"] == ("bench_latency.py", ["--quick"])
    assert suite["receiver-memory"] == ("bench_receiver_memory.py", ["--quick"])
    assert suite["job-memory"] == ("bench_job_memory.py", ["--quick"])
    assert suite["job-cpu"] == ("bench_job_cpu.py", ["--quick"])


def test_quick_job_cpu_measures_jobs_with_and_without_a_prior(tmp_path):
    """The second of two runs of each job, its CPU outside the handler, a prior handed over where
    the case takes one (registration registers the follow-up onto it, the timeline lists it)."""
    out = subprocess.run([sys.executable, "bench/bench_job_cpu.py", "--quick", "--cases",
                          "ct-anatomy,registration rigid,priors-timeline", "--json", str(tmp_path / "cpu.json")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    report = {r["case"]: r for r in json.loads((tmp_path / "cpu.json").read_text())}
    assert list(report) == ["ct-anatomy", "registration rigid", "priors-timeline"]
    assert set(report["ct-anatomy"]["results"]) == {"SEG", "RTSTRUCT", "SR"}
    assert "REG" in report["registration rigid"]["results"]  # only made with the prior in hand
    assert report["priors-timeline"]["results"] == ["SR"]
    for r in report.values():
        cpu = r["cpu_seconds"]
        assert {"load", "handler"} <= set(cpu) and any(k.startswith("encode ") for k in cpu)
        assert r["warm-up"]["objects"] == r["objects"]  # the same job twice
        assert r["peak_rss_mb"] >= r["start_rss_mb"] > 0 and r["inputs_mb"] > 0
    # the prior's volume counts among a registration's inputs
    assert report["registration rigid"]["inputs_mb"] > report["registration rigid"]["input_volume_mb"]
    row = next(line for line in out.stdout.splitlines() if line.startswith("registration rigid "))
    assert row.split()[6].endswith("x")  # its ratio printed


def test_quick_job_memory_reports_each_phase_against_the_volume(tmp_path):
    stdout, report = _quick("bench_job_memory.py", tmp_path / "memory.json")
    assert [r["handler"] for r in report] == ["ct-anatomy", "lung-nodules", "renders"]
    for r in report:
        f = r["figures"]
        assert f["input_volume_mb"] > 0 and f["peak_rss_mb"] >= f["start_rss_mb"] > 0
        phases = dict(r["phases"])
        assert "loading series" in phases and "encoding DICOM" in phases, phases
        assert all(mb >= 0 for mb in phases.values())
        assert f"{r['handler']:<21}volume" in stdout


def test_quick_latency_follows_each_builtin_handler_to_orthanc(tmp_path):
    stdout, report = _quick("bench_latency.py", tmp_path / "latency.json")
    assert [h["handler"] for h in report] == ["ct-anatomy", "lung-nodules", "renders", "overview",
                                              "model:hilum-ct-chest"]
    for h in report:
        (run,) = h["runs"]
        assert h["cold"] is None  # quick mode: no warm-up study
        phases = [run[k] for k in ("stability_s", "job_s", "deliver_s")]
        assert all(math.isfinite(v) and v >= 0 for v in [*phases, run["send_s"]])
        assert run["total_s"] == pytest.approx(sum(phases))
        assert h["median"]["total_s"] == run["total_s"]
        # The node delivered results and the originals, and Orthanc holds them all.
        n_results = sum(run["results"].values())
        assert n_results >= 1 and run["result_series"] >= 1
        assert run["orthanc_instances"] == run["instances"] + n_results
        assert h["handler"] in stdout
    assert set(report[0]["runs"][0]["results"]) == {"SEG", "RTSTRUCT", "SR"}  # ct-anatomy
    # The worker's own figures, read back from the job history: each phase, each result's arrival.
    ct = report[0]["runs"][0]
    assert {"load", "handler", "encode SEG", "write SEG", "encode RTSTRUCT", "encode SR"} <= set(ct["phases_s"])
    assert set(ct["in_orthanc_s"]) == {"SEG", "RTSTRUCT", "SR"}
    assert max(ct["in_orthanc_s"].values()) == pytest.approx(ct["total_s"])
    assert stdout.count("(run by run ") == len(report)  # each handler's CPU ratio with its spread over runs
    assert ct["peak_rss_mb"] > 0 and ct["input_volume_mb"] > 0
    assert report[3]["runs"][0]["results"] == {"OT": 1}  # overview: one mosaic


def test_quick_receiver_memory_samples_every_study(tmp_path):
    stdout, report = _quick("bench_receiver_memory.py", tmp_path / "memory.json")
    assert set(report) == {"receiver", "workers", "orthanc"}
    for proc, s in report.items():
        assert len(s["samples"]) == 3
        assert s["first"] == s["samples"][0] and s["last"] == s["samples"][-1] and s["max"] == max(s["samples"])
        assert isinstance(s["slope"], float) and isinstance(s["slope_after_first"], float)
        assert proc in stdout
    assert min(report["receiver"]["samples"]) > 0 and report["receiver"]["idle"] > 0
    assert min(report["orthanc"]["samples"]) > 0
    assert min(report["workers"]["samples"]) > 0  # each study ran a job: its worker lives on


def test_quick_ct_anatomy_reports_the_family_table_and_the_model():
    out = subprocess.run([sys.executable, "bench/bench_ct_anatomy.py", "--quick"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ct-anatomy over the phantom family: 4 cases" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) == 4 and all(len(r.split()) >= 14 for r in rows)  # variant, Dice, verdict, model Dice
    assert "model:hilum-ct-chest: both lungs >= 0.95 on" in out.stdout
