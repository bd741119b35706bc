"""Workers start with the node and warm up while idle, so a fresh node's first study does not wait
for the worker's start, its imports and highdicom's tables (~2 s on the 2-core machines)."""
from __future__ import annotations

import subprocess
import sys
import time

from node.config import load_settings
from node.jobs.executor import LocalProcessExecutor
from node.store.index import Index
from node.store.vault import Vault
from tests.nodeproc import REPO


def test_the_worker_starts_with_the_executor_before_any_job(tmp_path):
    settings = load_settings(data_dir=tmp_path / "d", workers=2)
    (tmp_path / "d").mkdir()
    index = Index(tmp_path / "d" / "index.db")
    vault = Vault(tmp_path / "d", None, writer=True)
    executor = LocalProcessExecutor(settings, index, vault, on_done=lambda: None)
    executor.start()
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not all(w is not None and w.proc.is_alive() for w in executor._workers):
            time.sleep(0.05)
        workers = list(executor._workers)
        assert all(w is not None and w.proc.is_alive() for w in workers), "no worker started with the executor"
        assert index.claim_job() is None  # and no job was there to start them
    finally:
        executor.stop()
        vault.close()
    assert not any(w.proc.is_alive() for w in workers)


def test_warm_up_loads_every_handler_and_highdicoms_tables():
    code = (
        "import pkgutil, sys, handlers\n"
        "from node.jobs.worker import warm_up\n"
        "from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map\n"
        "names = [f'handlers.{m.name}' for m in pkgutil.iter_modules(handlers.__path__)]\n"
        "assert names and not any(n in sys.modules for n in names), 'imported before warm_up'\n"
        "assert get_module_attribute_map.cache_info().currsize == 0\n"
        "warm_up()\n"
        "assert all(n in sys.modules for n in names), [n for n in names if n not in sys.modules]\n"
        "assert all(f.cache_info().currsize == 1 for f in (get_iod_module_map, get_module_attribute_map,"
        " get_sop_class_iod_map))\n"
        "from node.handler_api import get_handler\n"
        "assert get_handler('ct-anatomy').name == 'ct-anatomy'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
