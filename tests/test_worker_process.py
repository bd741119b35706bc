"""The worker process's memory settings (node/jobs/worker.py): NumPy's huge pages are off in a job
worker unless NumPy's own switch says otherwise."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = ("import node.jobs.worker as w\n"
         "from numpy._core import multiarray\n"
         "w._small_pages_for_arrays()\n"
         "print(multiarray._get_madvise_hugepage())\n")


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**clean, **env}, capture_output=True,
                         text=True, timeout=120, check=True)
    return out.stdout.strip()


def test_numpy_huge_pages_are_off_in_a_job_worker():
    assert _probe() == "False"


def test_numpys_own_switch_is_left_to_decide():
    assert _probe(NUMPY_MADVISE_HUGEPAGE="1") == "True"
    assert _probe(NUMPY_MADVISE_HUGEPAGE="0") == "False"
