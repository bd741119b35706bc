"""The archive: a managed Orthanc child process, or an external Orthanc.

Managed: the node writes Orthanc's JSON config into the data dir (storage and index there,
HTTP on loopback only via RemoteAccessAllowed=false, DICOMweb plugin, authentication with
credentials generated once and stored 0600), starts ``Orthanc`` with TCP_NODELAY=1, waits until
it answers and restarts it if it dies.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from node.config import Settings
from node.archive.postgres import ManagedPostgres, external_section
from node.lifeline import die_with_parent, take_down_stale, write_pid

log = logging.getLogger("hilum.orthanc")

DICOMWEB_PLUGIN_DIRS = ["/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins"]

# Orthanc closes an idle keep-alive connection after KeepAliveTimeout (default 1 s); httpx would reuse
# one for 5 s, and a request sent as Orthanc closes it fails ("server disconnected": a 502 in the
# viewer). Idle connections are dropped here first.
ARCHIVE_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=0.5)


@dataclass(frozen=True)
class ArchiveEndpoint:
    url: str  # e.g. http://127.0.0.1:8042
    username: str | None
    password: str | None

    @property
    def auth(self) -> tuple[str, str] | None:
        return (self.username, self.password) if self.username else None

    @property
    def dicomweb_url(self) -> str:
        return self.url.rstrip("/") + "/dicom-web"

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=timeout, limits=ARCHIVE_LIMITS)

    def async_client(self) -> httpx.AsyncClient:
        """The web gateway's client: long reads (a study's frames), a short connect."""
        return httpx.AsyncClient(auth=self.auth, timeout=httpx.Timeout(120, connect=5), limits=ARCHIVE_LIMITS)

    def alive(self) -> bool:
        """Orthanc answers its REST API with these credentials."""
        try:
            with self.client(timeout=2) as c:
                return c.get("/system").status_code == 200
        except httpx.HTTPError:
            return False


def _credentials(path: Path) -> tuple[str, str]:
    if path.exists():
        data = json.loads(path.read_text())
        return data["username"], data["password"]
    user, pw = "hilum", secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"username": user, "password": pw}, f)
    return user, pw


def orthanc_config(settings: Settings, root: Path, user: str, password: str) -> dict:
    plugins = [d for d in DICOMWEB_PLUGIN_DIRS if Path(d).is_dir()]
    return {
        "Name": f"{settings.ae_title}-ARCHIVE",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": settings.orthanc_http_port,
        "RemoteAccessAllowed": False,  # loopback only: the node's gateway is the door
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "HttpDescribeErrors": True,
        "DicomServerEnabled": settings.orthanc_dicom_enabled,
        "DicomPort": settings.orthanc_dicom_port,
        "DicomAet": "HILUMARCHIVE",
        "DicomCheckCalledAet": False,
        "TcpNoDelay": True,
        "OverwriteInstances": True,  # a re-delivered result (same deterministic UID) replaces the old one
        "StableAge": 5,
        "Plugins": plugins,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                     "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        "LimitFindResults": 0,
        "ConcurrentJobs": 2,
    }


class ManagedOrthanc:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.data_dir / "orthanc"
        self.root.mkdir(parents=True, exist_ok=True)
        user, pw = _credentials(settings.data_dir / "orthanc-credentials.json")
        self.endpoint = ArchiveEndpoint(f"http://127.0.0.1:{settings.orthanc_http_port}", user, pw)
        self.config_path = self.root / "orthanc.json"
        self.pid_file = self.root / "orthanc.pid"
        arch = settings.archive
        # The index in PostgreSQL: the node's own cluster, unless the site names one (dsn).
        self.pg = (ManagedPostgres(settings.data_dir, on_restarted=self._reconnect_index)
                   if arch.index == "postgresql" and arch.dsn is None else None)
        self._proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None
        self.restarts = 0

    def write_config(self) -> None:
        cfg = orthanc_config(self.settings, self.root, self.endpoint.username, self.endpoint.password)
        if self.settings.archive.index == "postgresql":
            cfg["PostgreSQL"] = self.pg.orthanc_section() if self.pg else external_section(self.settings.archive.dsn)
        tmp = self.config_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(cfg, f, indent=1)
        os.replace(tmp, self.config_path)

    def _spawn(self) -> None:
        exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(exe).exists():
            raise RuntimeError("Orthanc is not installed (Debian package 'orthanc'); run `make run`")
        env = {**os.environ, "TCP_NODELAY": "1"}
        logf = open(self.root / "orthanc.log", "ab")
        self._proc = subprocess.Popen(
            [exe, str(self.config_path)], stdout=logf, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # a Ctrl-C on the node's terminal is the node's to handle
            preexec_fn=die_with_parent(),  # …but a SIGKILL of the node takes Orthanc with it
        )
        logf.close()
        write_pid(self.pid_file, self._proc.pid)

    def start(self, timeout: float = 60.0) -> None:
        take_down_stale(self.pid_file, str(self.config_path))  # same data dir: same files and ports
        if self.pg:
            self.pg.start()
        self.write_config()
        self._spawn()
        self.wait_ready(timeout)
        self._stop.clear()
        self._watch = threading.Thread(target=self._supervise, name="orthanc-supervisor", daemon=True)
        self._watch.start()
        log.info("managed Orthanc up on %s (pid %d)", self.endpoint.url, self._proc.pid)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                tail = (self.root / "orthanc.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"Orthanc exited with code {self._proc.returncode}:\n{tail}")
            if self.alive():
                return
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer within {timeout:.0f} s ({last})")

    def alive(self) -> bool:
        return self.endpoint.alive()

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            proc = self._proc
            if proc is not None and proc.poll() is not None and not self._stop.is_set():
                log.error("managed Orthanc died (exit %s): restarting", proc.returncode)
                self.restarts += 1
                try:
                    self._spawn()
                    self.wait_ready(60)
                except Exception as exc:  # noqa: BLE001 - keep supervising; deliveries retry meanwhile
                    log.error("Orthanc restart failed: %s", exc)

    def _reconnect_index(self, tries: int = 10) -> None:
        """After its PostgreSQL restarted: Orthanc's one connection to the index died with the old
        postmaster, and Orthanc finds that out on its next index call, which it answers 503 ("the
        database is currently not available") before it reconnects. Make that call this read of
        the statistics (they come from the index), not the next study's store."""
        for _ in range(tries):
            if self._stop.is_set():
                return
            try:
                with self.endpoint.client(timeout=10) as c:
                    if c.get("/statistics").status_code == 200:
                        log.info("Orthanc's index reconnected after the PostgreSQL restart")
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        log.warning("Orthanc's index did not answer after the PostgreSQL restart; deliveries retry meanwhile")

    def stop(self, timeout: float = 20.0) -> None:
        self._stop.set()
        # Orthanc first, its supervisor after: a child the supervisor thread restarted gets its
        # parent-death signal when that thread ends, which must not pre-empt the clean stop.
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._watch is not None:
            self._watch.join(timeout=5)
        proc = self._proc  # restarted by the supervisor meanwhile: its thread has ended, stop it too
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._proc = None
        self.pid_file.unlink(missing_ok=True)
        if self.pg:
            self.pg.stop()  # after Orthanc: its index connections are closed by then

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None


def archive_endpoint(settings: Settings) -> ArchiveEndpoint:
    """Where the archive is, without starting anything (CLI and tests)."""
    if settings.external_orthanc is not None:
        e = settings.external_orthanc
        return ArchiveEndpoint(e.url.rstrip("/"), e.username, e.password)
    user, pw = _credentials(settings.data_dir / "orthanc-credentials.json")
    return ArchiveEndpoint(f"http://127.0.0.1:{settings.orthanc_http_port}", user, pw)
