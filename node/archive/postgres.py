"""An embedded PostgreSQL for the managed Orthanc's index (``archive: {index: postgresql}``).

A cluster initialised once in ``<data_dir>/orthanc/pg`` (Debian's PostgreSQL 15 binaries),
listening on a Unix socket in that directory only (no TCP at all), with a generated password
(0600, beside Orthanc's credentials) and SCRAM authentication. Started before Orthanc and stopped
after it, by the node, and dying with it (parent-death signal: SIGINT, a fast shutdown).

PostgreSQL refuses to run as root. A node running as root runs it as the ``postgres`` system user
(Debian's package creates it), and the cluster's directory belongs to that user. The directories
above it need not let that user through (a root-only data dir, or pytest's 0700 temp dirs, which
pytest resets at every session): the node opens the cluster directory itself and hands PostgreSQL
the open descriptor, which it reaches as ``/proc/self/fd/N`` whatever the permissions above it.
"""
from __future__ import annotations

import json
import logging
import os
import pwd
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from node.lifeline import die_with_parent, take_down_stale

log = logging.getLogger("hilum.postgres")

PG_PORT = 5432  # only names the socket file (.s.PGSQL.5432): there is no TCP listener
SUPERUSER = "hilum"
DATABASE = "orthanc"
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # waits before each restart try; reset after 30 s up


def pg_bin(tool: str) -> str:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not versions:
        raise RuntimeError("archive.index: postgresql needs PostgreSQL (Debian package 'postgresql'); run `make run`")
    return str(versions[-1] / tool)


def _run_as() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("archive.index: postgresql: the node runs as root and PostgreSQL refuses root, but there "
                           "is no 'postgres' user to run it as (Debian package 'postgresql' creates it)") from None


def _credentials(path: Path) -> str:
    if path.exists():
        return json.loads(path.read_text())["password"]
    pw = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"username": SUPERUSER, "password": pw, "database": DATABASE}, f)
    return pw


class ManagedPostgres:
    def __init__(self, data_dir: Path, on_restarted: Callable[[], None] | None = None) -> None:
        self.on_restarted = on_restarted  # the index's client, told that its connection died with the old one
        self.root = data_dir / "orthanc" / "pg"
        self.data = self.root / "data"
        self.socket_dir = self.root / "run"
        self.password = _credentials(data_dir / "orthanc-pg-credentials.json")
        self.user = _run_as()
        self._proc: subprocess.Popen | None = None
        self._dirfd: int | None = None  # the cluster directory, open: PostgreSQL's way in (see above)
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None
        self._since = time.monotonic()  # when the running postmaster came up
        self.restarts = 0

    def _pg_path(self, *parts: str) -> str:
        """A path inside the cluster directory as PostgreSQL's processes reach it."""
        return "/".join([f"/proc/self/fd/{self._dirfd}", *parts])

    def _as_user(self, pdeathsig: int | None = None):
        uid, gid, name = self.user.pw_uid, self.user.pw_gid, self.user.pw_name
        deathsig = die_with_parent(pdeathsig) if pdeathsig is not None else None

        def preexec() -> None:
            if os.geteuid() == 0 and uid != 0:
                os.initgroups(name, gid)
                os.setgid(gid)
                os.setuid(uid)
            if deathsig is not None:
                deathsig()  # after setuid: a change of credentials clears the parent-death signal
        return preexec

    def _env(self) -> dict:
        return {**os.environ, "PGPASSWORD": self.password, "HOME": self.user.pw_dir or "/"}

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
        if os.geteuid() == 0:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.password + "\n")
        if os.geteuid() == 0:
            os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
        try:
            out = subprocess.run([pg_bin("initdb"), "-D", self._pg_path("data"), "-U", SUPERUSER,
                                  "--pwfile", self._pg_path("pwfile"), "--auth", "scram-sha-256", "-E", "UTF8",
                                  "--locale", "C.UTF-8"],
                                 preexec_fn=self._as_user(), env=self._env(), capture_output=True, text=True,
                                 cwd="/", pass_fds=[self._dirfd])
        finally:
            pwfile.unlink(missing_ok=True)
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed: {out.stderr.strip() or out.stdout.strip()}")

    def start(self, timeout: float = 60.0) -> None:
        # A postmaster chdirs into its data directory: that is how a stale one of this cluster is known.
        take_down_stale(self.data / "postmaster.pid", str(self.data.resolve()), sig=signal.SIGINT)
        self._own(self.root)
        self._own(self.socket_dir)
        if self._dirfd is None:
            self._dirfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        self._spawn()
        self._wait_ready(timeout)
        self._create_database()
        log.info("managed PostgreSQL up on %s (pid %d)", self.socket_dir, self._proc.pid)
        self._since = time.monotonic()
        self._stop.clear()
        self._watch = threading.Thread(target=self._supervise, name="postgres-supervisor", daemon=True)
        self._watch.start()

    def _spawn(self) -> None:
        logf = open(self.root / "postgres.log", "ab")
        self._proc = subprocess.Popen(
            [pg_bin("postgres"), "-D", self._pg_path("data"), "-c", "listen_addresses=", "-c", f"port={PG_PORT}",
             "-c", f"unix_socket_directories={self._pg_path('run')}", "-c", "unix_socket_permissions=0700"],
            stdout=logf, stderr=subprocess.STDOUT, env=self._env(), cwd="/", start_new_session=True,
            pass_fds=[self._dirfd], preexec_fn=self._as_user(pdeathsig=signal.SIGINT))
        logf.close()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self._proc.poll() is not None:
                tail = (self.root / "postgres.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"PostgreSQL exited with code {self._proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not answer within {timeout:.0f} s")
            time.sleep(0.2)

    def _supervise(self) -> None:
        """Start the postmaster again when it dies (killed, out of memory), waiting longer after each
        death that follows a short life: a freshly killed postmaster's backends may hold its shared
        memory for a moment, so a first try can fail. Orthanc's index calls fail meanwhile; the
        node's deliveries retry them."""
        delay = 0.0
        while not self._stop.wait(1.0):
            proc = self._proc
            if proc is None or proc.poll() is None:
                continue
            up = time.monotonic() - self._since
            if delay == 0.0 or up > RESTART_BACKOFF_S[-1]:
                delay = RESTART_BACKOFF_S[0]
            else:
                delay = next((d for d in RESTART_BACKOFF_S if d > delay), RESTART_BACKOFF_S[-1])
            log.error("managed PostgreSQL died (exit %s) after %.0f s up: restarting in %.0f s",
                      proc.returncode, up, delay)
            if self._stop.wait(delay):
                return
            self.restarts += 1
            self._since = time.monotonic()
            try:
                self._spawn()
                self._wait_ready(60)
                log.warning("managed PostgreSQL restarted (pid %d, restart %d)", self._proc.pid, self.restarts)
            except Exception as exc:  # noqa: BLE001 - keep supervising: the next try waits longer
                log.error("PostgreSQL restart %d failed: %s", self.restarts, (str(exc).splitlines() or [exc])[0])
                continue
            if self.on_restarted is not None:
                try:
                    self.on_restarted()
                except Exception:  # noqa: BLE001 - the supervisor outlives its listener
                    log.exception("after the PostgreSQL restart")

    def _ready(self) -> bool:
        return subprocess.run([pg_bin("pg_isready"), "-q", "-h", str(self.socket_dir), "-p", str(PG_PORT)],
                              env=self._env()).returncode == 0

    def _psql(self, sql: str) -> str:
        out = subprocess.run([pg_bin("psql"), "-h", str(self.socket_dir), "-p", str(PG_PORT), "-U", SUPERUSER,
                              "-d", "postgres", "-tAc", sql], env=self._env(), capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"psql: {out.stderr.strip()}")
        return out.stdout.strip()

    def _create_database(self) -> None:
        if self._psql(f"SELECT 1 FROM pg_database WHERE datname='{DATABASE}'") != "1":
            self._psql(f"CREATE DATABASE {DATABASE}")

    def orthanc_section(self) -> dict:
        """Orthanc's ``PostgreSQL`` configuration for this cluster: index only, files stay on disk."""
        return {"EnableIndex": True, "EnableStorage": False, "Host": str(self.socket_dir), "Port": PG_PORT,
                "Database": DATABASE, "Username": SUPERUSER, "Password": self.password, "EnableSsl": False,
                "Lock": True}

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        # The postmaster first, its supervisor after: one the supervisor thread restarted gets its
        # parent-death signal when that thread ends, which must not pre-empt the clean shutdown.
        self._shutdown(self._proc, timeout)
        if self._watch is not None:
            self._watch.join(timeout=65)
            self._watch = None
        self._shutdown(self._proc, timeout)  # restarted by the supervisor meanwhile
        self._proc = None
        if self._dirfd is not None:
            os.close(self._dirfd)
            self._dirfd = None

    @staticmethod
    def _shutdown(proc: subprocess.Popen | None, timeout: float) -> None:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown: clients disconnected, data checkpointed
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None


def external_section(dsn: str) -> dict:
    return {"EnableIndex": True, "EnableStorage": False, "ConnectionUri": dsn, "Lock": True}
