"""Run a real `hilum up` (managed Orthanc included) as a child process, and real DCMTK peers."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # DCMTK stalls ~44 ms per instance without it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class NodeProcess:
    def __init__(self, data_dir: Path, rules_dir: Path, **settings) -> None:
        self.data_dir = data_dir
        self.config = {
            "data_dir": str(data_dir), "rules_dir": str(rules_dir), "ae_title": "HILUM",
            "dicom_host": "127.0.0.1", "dicom_port": free_port(), "web_port": free_port(),
            "orthanc_http_port": free_port(), "orthanc_dicom_port": free_port(),
            "stable_after": 2.0, "min_free_disk_mb": 0, "delivery_backoff_s": 0.5,
            "delivery_backoff_max_s": 2.0, "handler_memory_mb": 6144, **settings,
        }
        data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = data_dir.parent / f"{data_dir.name}-config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.proc: subprocess.Popen | None = None
        self.token: str | None = None
        # How `hilum` is run: a test may preload a module first (e.g. a handler it registers).
        self.launcher: list[str] = [sys.executable, "-m", "node.cli"]

    @property
    def dicom_port(self) -> int:
        return self.config["dicom_port"]

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.config['web_port']}"

    def hilum(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=120)

    def start(self, timeout: float = 90, archive_up: bool = True) -> "NodeProcess":
        log = open(self.data_dir.parent / f"{self.data_dir.name}-node.log", "ab")
        self.proc = subprocess.Popen([*self.launcher, "up", "--config", str(self.config_path)],
                                     cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        def healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(self.web + "/api/health", timeout=2)
                return r.status_code == 200 and (r.json()["orthanc"] == "ok" or not archive_up)
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout, "the node's health endpoint")
        if self.token is None:
            out = self.hilum("token", "create", "--role", "admin", "--config", str(self.config_path))
            assert out.returncode == 0, out.stderr
            self.token = out.stdout.strip()
        return self

    def log_tail(self, n: int = 4000) -> str:
        p = self.data_dir.parent / f"{self.data_dir.name}-node.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        os.killpg(self.proc.pid, sig) if sig == signal.SIGKILL else self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if sig == signal.SIGKILL:
                # SIGKILL to the group also took the managed Orthanc's parent; Orthanc runs in its own
                # session, so stop it too, as a crashed host would lose it.
                self._kill_orthanc()

    def _kill_orthanc(self) -> None:
        subprocess.run(["pkill", "-9", "-f", str(self.data_dir / "orthanc" / "orthanc.json")], check=False)

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}", **kw.pop("headers", {})}
        return httpx.request(method, self.web + path, headers=headers, timeout=60, **kw)

    def study(self, study_uid: str) -> dict:
        r = self.api("GET", f"/api/studies/{study_uid}")
        return r.json() if r.status_code == 200 else {}

    def orthanc(self) -> httpx.Client:
        import json

        cred = json.loads((self.data_dir / "orthanc-credentials.json").read_text())
        return httpx.Client(base_url=f"http://127.0.0.1:{self.config['orthanc_http_port']}",
                            auth=(cred["username"], cred["password"]), timeout=30)


@contextmanager
def running_node(data_dir: Path, rules_dir: Path, archive_up: bool = True, **settings):
    node = NodeProcess(data_dir, rules_dir, **settings).start(archive_up=archive_up)
    try:
        yield node
    finally:
        node.stop()
        node._kill_orthanc()


def storescu(port: int, paths: list[Path] | Path, calling: str = "MODALITY", called: str = "HILUM",
             extra: list[str] | None = None) -> subprocess.CompletedProcess:
    paths = [paths] if isinstance(paths, Path) else paths
    cmd = ["storescu", "-aet", calling, "-aec", called, "+sd", "+r", "-nh", *(extra or []),
           "127.0.0.1", str(port), *map(str, paths)]
    return subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=300)


@contextmanager
def storescp(out_dir: Path, ae_title: str = "TPS", port: int | None = None, options: tuple[str, ...] = ("+B",)):
    """A real DCMTK storescp playing the treatment planning system (on ``port``, or a free one).
    ``options``: its command-line options (the ingest benchmark runs it with ``+xa`` instead)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = subprocess.Popen([shutil.which("storescp"), "-aet", ae_title, "-od", str(out_dir), *options, str(port)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _port_open(port), 10, "storescp")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class FlushedIndex:
    """An in-process SCP's index as a test sees it once every acknowledged instance's row is
    committed (rows follow the C-STORE response by milliseconds: node/receive/ingest.py)."""

    def __init__(self, index, ingest) -> None:
        self._index, self._ingest = index, ingest

    def __getattr__(self, name: str):
        assert self._ingest.writer.flush(30), "index rows not committed within 30 s"
        return getattr(self._index, name)
