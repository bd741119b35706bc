"""Managed children die with the node: kill -9 of `hilum up` leaves no Orthanc (or worker) of it running,
and a start that finds a stale Orthanc of the same data dir stops it first."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from node.archive.orthanc import ManagedOrthanc
from node.config import load_settings
from node.lifeline import write_pid
from tests.nodeproc import NodeProcess, free_port, wait_for


def processes_with(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains ``marker``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            out.append(int(d.name))
    return out


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def test_kill_9_of_the_node_takes_its_orthanc_along(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    node = NodeProcess(tmp_path / "data", rules).start()
    marker = str(node.data_dir / "orthanc" / "orthanc.json")
    try:
        (orthanc_pid,) = processes_with(marker)
        kids = descendants(node.proc.pid)
        assert orthanc_pid in kids
        os.kill(node.proc.pid, signal.SIGKILL)  # the node alone, not its process group
        node.proc.wait(30)
        wait_for(lambda: not processes_with(marker), 30, "the node's Orthanc to exit")
        wait_for(lambda: not [p for p in kids if Path(f"/proc/{p}/cmdline").exists()
                              and Path(f"/proc/{p}/cmdline").read_bytes()], 30, "every child of the node to exit")
    finally:
        node.stop(signal.SIGKILL)


def test_start_takes_down_a_stale_orthanc_of_the_same_data_dir(tmp_path):
    settings = load_settings(data_dir=tmp_path / "d", orthanc_http_port=free_port())
    settings.data_dir.mkdir(parents=True)
    m = ManagedOrthanc(settings)
    m.write_config()
    # An Orthanc left running by an earlier node that could not take it along (no parent-death signal).
    stale = subprocess.Popen([shutil.which("Orthanc") or "/usr/sbin/Orthanc", str(m.config_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        write_pid(m.pid_file, stale.pid)
        wait_for(m.alive, 30, "the stale Orthanc")
        m.start()  # would fail on the taken port if the stale one were left
        try:
            assert stale.wait(5) is not None
            assert m.pid != stale.pid and m.alive()
            assert int(m.pid_file.read_text()) == m.pid
        finally:
            m.stop()
        assert not m.pid_file.exists() and not processes_with(str(m.config_path))
    finally:
        if stale.poll() is None:
            stale.kill()
            stale.wait()


def test_a_recycled_pid_running_something_else_is_left_alone(tmp_path):
    from node.lifeline import take_down_stale

    other = subprocess.Popen(["sleep", "30"])
    try:
        pid_file = tmp_path / "x.pid"
        write_pid(pid_file, other.pid)
        assert take_down_stale(pid_file, str(tmp_path / "orthanc.json")) is None
        assert other.poll() is None and not pid_file.exists()
    finally:
        other.kill()
        other.wait()
