"""The benchmark scripts run (quick sizes). Timings are never asserted: the numbers are for people."""
from __future__ import annotations

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
