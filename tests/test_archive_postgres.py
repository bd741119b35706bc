"""The managed archive with its index in PostgreSQL (``archive: {index: postgresql}``): the node's own
cluster (Debian's PostgreSQL 15 and orthanc-postgresql), the core path through it, and nothing of it
left running after kill -9 of the node."""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from node.archive.postgres import PG_PORT, SUPERUSER, pg_bin
from node.phantom import generate_ct
from tests.nodeproc import NodeProcess, storescu, wait_for
from tests.test_e2e import _done, _in_orthanc, write_rules
from tests.test_lifeline import processes_with

pytestmark = pytest.mark.slow


def processes_in(directory) -> list[int]:
    """Live processes whose working directory is ``directory`` (a postmaster and its backends chdir into
    their data directory)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.readlink(f"/proc/{d}/cwd") == str(directory) and open(f"/proc/{d}/cmdline", "rb").read():
                    out.append(int(d))
            except OSError:
                continue
    return out


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return generate_ct(tmp_path_factory.mktemp("ct-pg") / "study", seed=5, rows=64, cols=64, slices=12,
                       pixel_spacing=6.0, slice_thickness=8.0)


def psql(data_dir, sql: str) -> str:
    pw = json.loads((data_dir / "orthanc-pg-credentials.json").read_text())["password"]
    out = subprocess.run([pg_bin("psql"), "-h", str(data_dir / "orthanc" / "pg" / "run"), "-p", str(PG_PORT),
                          "-U", SUPERUSER, "-d", "orthanc", "-tAc", sql], env={**os.environ, "PGPASSWORD": pw},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_core_path_with_the_archive_index_in_postgresql(tmp_path, ct):
    tmp = tmp_path  # 0700 and root's: PostgreSQL (user postgres) gets in through an open descriptor
    node = NodeProcess(tmp / "data", write_rules(tmp / "rules", destinations="[orthanc]"),
                       archive={"index": "postgresql"}).start()
    pg_data = (node.data_dir / "orthanc" / "pg" / "data").resolve()
    orthanc_marker = str(node.data_dir / "orthanc" / "orthanc.json")
    try:
        assert storescu(node.dicom_port, ct.dicom_dir).returncode == 0
        st = wait_for(lambda: _done(node, ct.study_uid, ("orthanc",)), 120, "overview delivered", interval=0.5)
        (result,) = st["jobs"][0]["results"]
        with node.orthanc() as c:
            assert "PostgreSQL" in c.get("/system").json()["DatabaseBackendPlugin"]
        sops = _in_orthanc(node, ct.study_uid, 13)  # the originals' batch may land after the result
        assert result["sop_instance_uid"] in sops and len(sops) == 13
        # The index really is in PostgreSQL: Orthanc's resources table holds the 13 instances (type 3).
        assert psql(node.data_dir, "SELECT count(*) FROM resources WHERE resourcetype = 3") == "13"
        # …and the files stay on disk, in Orthanc's storage directory.
        assert sum(1 for p in (node.data_dir / "orthanc" / "storage").rglob("*") if p.is_file()) >= 13
        qido = node.api("GET", f"/dicom-web/studies/{ct.study_uid}/series")
        assert qido.status_code == 200
        assert {s["0020000E"]["Value"][0] for s in qido.json()} == {ct.series_uid, result["series_instance_uid"]}
        meta = node.api("GET", f"/dicom-web/studies/{ct.study_uid}/series/{result['series_instance_uid']}/metadata")
        assert meta.status_code == 200 and meta.json()[0]["00080018"]["Value"] == [result["sop_instance_uid"]]
        # PostgreSQL listens on its socket only, and it is not root.
        assert psql(node.data_dir, "SHOW listen_addresses") == ""
        pg_pids = processes_in(pg_data)
        assert pg_pids and all(os.stat(f"/proc/{p}").st_uid != 0 for p in pg_pids)
        # kill -9 of the node: neither its Orthanc nor its PostgreSQL outlives it.
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(30)
        # 120 s: PostgreSQL's shutdown checkpoint took over 60 s once on a machine busy with benches.
        wait_for(lambda: not processes_with(orthanc_marker) and not processes_in(pg_data), 120,
                 "the node's Orthanc and PostgreSQL to exit")
        # Started again: same cluster, same index, nothing lost.
        node.start()
        with node.orthanc() as c:
            assert len(c.get("/instances").json()) == 13
    finally:
        node.stop()
        node._kill_orthanc()
        for pid in processes_in(pg_data):
            os.kill(pid, signal.SIGKILL)


def test_external_postgresql_by_dsn(tmp_path):
    """`archive: {index: postgresql, dsn: …}`: Orthanc's index in a PostgreSQL the node does not run
    (played here by a cluster started on its own)."""
    from urllib.parse import quote

    from node.archive.orthanc import ManagedOrthanc
    from node.archive.postgres import ManagedPostgres
    from node.config import load_settings
    from tests.nodeproc import free_port
    from tests.test_receive import make_ct

    (tmp_path / "db-server").mkdir()
    external = ManagedPostgres(tmp_path / "db-server")
    external.start()
    try:
        dsn = f"postgresql://{SUPERUSER}:{quote(external.password)}@/orthanc?host={quote(str(external.socket_dir))}"
        settings = load_settings(data_dir=tmp_path / "d", orthanc_http_port=free_port(),
                                 archive={"index": "postgresql", "dsn": dsn})
        settings.data_dir.mkdir(parents=True)
        m = ManagedOrthanc(settings)
        assert m.pg is None  # nothing of its own to run
        m.start()
        try:
            f = tmp_path / "x.dcm"
            make_ct(f)
            with m.endpoint.client() as c:
                assert "PostgreSQL" in c.get("/system").json()["DatabaseBackendPlugin"]
                assert c.post("/instances", content=f.read_bytes()).status_code == 200
        finally:
            m.stop()
        assert psql(tmp_path / "db-server", "SELECT count(*) FROM resources WHERE resourcetype = 3") == "1"
    finally:
        external.stop()


def _postmaster(data_dir) -> int | None:
    """The live postmaster of the node's cluster (first line of its postmaster.pid), if any."""
    try:
        pid = int((data_dir / "orthanc" / "pg" / "data" / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def test_a_killed_postgresql_is_restarted_and_the_archive_takes_a_new_study(tmp_path, ct):
    node = NodeProcess(tmp_path / "data", write_rules(tmp_path / "rules", destinations="[orthanc]"),
                       archive={"index": "postgresql"}).start()
    pg_data = (node.data_dir / "orthanc" / "pg" / "data").resolve()
    try:
        first = _postmaster(node.data_dir)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        second = wait_for(lambda: (p := _postmaster(node.data_dir)) not in (None, first) and p, 90,
                          "the postmaster started again", interval=0.5)
        assert second != first
        log = node.log_tail(20000)
        assert "managed PostgreSQL died (exit -9)" in log and "restarting in 1 s" in log
        wait_for(lambda: "managed PostgreSQL restarted" in node.log_tail(20000), 60, "the restart logged")
        # Orthanc's connection to the index died with the old postmaster: the node has Orthanc find
        # that out (its one 503) on a read of its own, not on the next study's store.
        wait_for(lambda: "index reconnected after the PostgreSQL restart" in node.log_tail(20000), 60,
                 "Orthanc's index reconnected")
        # The archive, its index in the restarted cluster, takes a new study end to end.
        assert storescu(node.dicom_port, ct.dicom_dir).returncode == 0
        st = wait_for(lambda: _done(node, ct.study_uid, ("orthanc",)), 180, "overview delivered", interval=0.5)
        (result,) = st["jobs"][0]["results"]
        # The originals are a delivery batch of their own: they may land a moment after the result.
        sops = _in_orthanc(node, ct.study_uid, 13)
        assert result["sop_instance_uid"] in sops and len(sops) == 13
        assert "delivery to orthanc failed" not in node.log_tail(50000)  # not one store refused
        assert psql(node.data_dir, "SELECT count(*) FROM resources WHERE resourcetype = 3") == "13"
        assert _postmaster(node.data_dir) == second  # one restart, no restart loop
    finally:
        node.stop()
        node._kill_orthanc()
        for pid in processes_in(pg_data):
            os.kill(pid, signal.SIGKILL)
