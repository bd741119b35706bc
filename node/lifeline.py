"""Managed child processes (Orthanc, PostgreSQL) die with the node, and a stale one is taken down.

A node killed with SIGKILL runs no clean-up, so its children must notice by themselves: the
kernel's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) is set in the child between fork and
exec. Linux sends it when the *thread* that forked the child ends, so children are spawned from
threads that live as long as the child is wanted (the caller's job; see ManagedOrthanc.stop).

A pid file per managed child, beside its data, lets the next start find a child that outlived
its node anyway (a node of an older version, a host where prctl is unavailable) and stop it
before starting a new one on the same ports and files.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("hilum.lifeline")

PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved in the parent: nothing to load after fork


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when the forking thread of this process ends."""
    parent = os.getpid()

    def preexec() -> None:
        if _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(126)  # never start a child that could outlive the node unnoticed
        if os.getppid() != parent:  # the node died between fork and prctl: the signal will never come
            os._exit(125)
    return preexec


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _identity(pid: int) -> str:
    """Its command line and its working directory (a server that chdirs into its data dir is known by it)."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = ""
    return f"{_cmdline(pid)} {cwd}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has no command line; it is gone for our purposes.
    return bool(_cmdline(pid))


def take_down_stale(pid_file: Path, marker: str, sig: int = signal.SIGTERM, grace: float = 15.0) -> int | None:
    """Stop the process named by ``pid_file`` if it still runs with ``marker`` (e.g. its config path)
    in its command line or as its working directory; a recycled pid running something else is left
    alone. Returns the pid stopped."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    stopped = None
    if pid > 1 and _alive(pid) and marker in _identity(pid):
        log.warning("a %s left by an earlier node (pid %d) still runs: stopping it", Path(marker).name, pid)
        os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
        stopped = pid
    pid_file.unlink(missing_ok=True)
    return stopped


def write_pid(pid_file: Path, pid: int) -> None:
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, pid_file)
