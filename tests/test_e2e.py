"""End to end through a real `hilum up`: DCMTK storescu as the modality, managed Orthanc as the
archive, DCMTK storescp as the treatment planning system."""
from __future__ import annotations

import signal
import textwrap
from io import BytesIO
from pathlib import Path

import pydicom
import pytest

from node.archive.orthanc import ManagedOrthanc
from node.config import load_settings
from node.phantom import generate_ct
from tests.iod import assert_valid_iod
from tests.nodeproc import NodeProcess, free_port, running_node, storescp, storescu, wait_for

pytestmark = pytest.mark.slow

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """A small phantom chest CT (fast to send and process)."""
    return generate_ct(tmp_path_factory.mktemp("ct") / "study", seed=3, rows=96, cols=96, slices=24,
                       pixel_spacing=4.0, slice_thickness=5.0)


def write_rules(d: Path, destinations: str = "[orthanc, tps]", extra: str = "") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ct.yaml").write_text(textwrap.dedent(f"""\
        - name: ct-overview
          level: series
          match: {{Modality: CT}}
          handler: overview
          destinations: {destinations}
        {extra}"""))
    return d


def _done(node: NodeProcess, study_uid: str, destinations: tuple[str, ...]):
    st = node.study(study_uid)
    jobs = st.get("jobs", [])
    if not jobs or any(j["status"] != "done" for j in jobs):
        return None
    results = [r for j in jobs for r in j["results"]]
    if results and all(r["deliveries"].get(d) == "delivered" for r in results for d in destinations):
        return st
    return None


def _orthanc_instances(node: NodeProcess, study_uid: str) -> list[dict]:
    with node.orthanc() as c:
        return c.post("/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                                           "Expand": True}).json()


def _in_orthanc(node: NodeProcess, study_uid: str, n: int, timeout: float = 60) -> set[str]:
    """The study's SOP Instance UIDs in Orthanc once there are at least ``n`` of them."""
    def found():
        sops = {i["MainDicomTags"]["SOPInstanceUID"] for i in _orthanc_instances(node, study_uid)}
        return sops if len(sops) >= n else None
    return wait_for(found, timeout, f"{n} instances of the study in Orthanc", interval=0.5)


def test_study_in_results_out_to_orthanc_and_tps(ct, tmp_path):
    tps_dir = tmp_path / "tps"
    with storescp(tps_dir) as tps_port:
        dests = {"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}}
        with running_node(tmp_path / "data", write_rules(tmp_path / "rules"), destinations=dests) as node:
            out = storescu(node.dicom_port, ct.dicom_dir)
            assert out.returncode == 0, out.stderr
            st = wait_for(lambda: _done(node, ct.study_uid, ("orthanc", "tps")), 120, "overview delivered",
                          interval=0.5)
            assert st["instances_received"] == 24 and st["stable"] is True
            (job,) = st["jobs"]
            assert job["handler"] == "overview" and job["rule"] == "ct-overview"
            (result,) = job["results"]
            assert result["sop_class_uid"] == SC_CLASS and result["modality"] == "OT"
            # Orthanc holds the originals and the result, in the same study (the originals are a
            # delivery batch of their own: they may land a moment after the result).
            sops = _in_orthanc(node, ct.study_uid, 25)
            assert result["sop_instance_uid"] in sops and len(sops) == 25
            # The gateway serves the archive to token holders only.
            qido = node.api("GET", f"/dicom-web/studies/{ct.study_uid}/series")
            assert qido.status_code == 200
            assert {s["0020000E"]["Value"][0] for s in qido.json()} >= {ct.series_uid, result["series_instance_uid"]}
            import httpx

            assert httpx.get(node.web + f"/dicom-web/studies/{ct.study_uid}/series").status_code == 401
    received = [pydicom.dcmread(p) for p in tps_dir.iterdir()]
    assert [str(d.SOPInstanceUID) for d in received] == [result["sop_instance_uid"]]
    sc = received[0]
    assert sc.StudyInstanceUID == ct.study_uid and sc.PatientID == ct.patient_id
    tmp = tmp_path / "sc.dcm"
    sc.save_as(tmp, enforce_file_format=True)
    assert_valid_iod(tmp)


def test_sigkill_mid_study_loses_nothing_and_delivers_once(ct, tmp_path):
    rules = write_rules(tmp_path / "rules", destinations="[orthanc]")
    # A quiet period longer than the restart: the study must not complete half-received.
    node = NodeProcess(tmp_path / "data", rules, stable_after=60.0).start()
    try:
        import os
        import subprocess

        files = sorted(ct.dicom_dir.iterdir())
        # Without TCP_NODELAY storescu stalls ~40 ms per instance (Nagle + delayed ACK): slow enough
        # that the kill lands in the middle of the study.
        slow = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
        sender = subprocess.Popen(["storescu", "-aet", "MOD", "-aec", "HILUM", "127.0.0.1", str(node.dicom_port),
                                   *map(str, files)], env=slow, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        from node.store.index import Index

        index = Index(node.data_dir / "index.db")
        wait_for(lambda: len(index.instances_of_study(ct.study_uid)) >= 6, 60, "some instances stored",
                 interval=0.05)
        node.stop(signal.SIGKILL)
        sender.wait(30)
        before = {r["sop_uid"]: r["path"] for r in index.instances_of_study(ct.study_uid)}
        assert 6 <= len(before) < len(files)
        from node.store.vault import Vault

        vault = Vault(node.data_dir, None)
        for locator in before.values():  # every acknowledged instance is complete on disk
            assert pydicom.dcmread(BytesIO(vault.read(locator))).pixel_array.shape == (96, 96)
        vault.close()
        index.close()
        node.start()
        out = storescu(node.dicom_port, ct.dicom_dir)  # the modality re-sends the whole study
        assert out.returncode == 0, out.stderr
        assert node.api("POST", f"/api/studies/{ct.study_uid}/complete").status_code == 200
        st = wait_for(lambda: _done(node, ct.study_uid, ("orthanc",)), 120, "results delivered", interval=0.5)
        assert st["instances_received"] == len(files)
        (job,) = st["jobs"]
        _in_orthanc(node, ct.study_uid, len(files) + 1)
        sops = [i["MainDicomTags"]["SOPInstanceUID"] for i in _orthanc_instances(node, ct.study_uid)]
        assert len(sops) == len(set(sops)) == len(files) + 1
        assert job["results"][0]["sop_instance_uid"] in sops
    finally:
        node.stop()
        node._kill_orthanc()


def test_results_wait_for_a_stopped_archive(ct, tmp_path):
    """External Orthanc down while the job finishes: deliveries retry and land once it is back."""
    settings = load_settings(data_dir=tmp_path / "archive", orthanc_http_port=free_port())
    settings.data_dir.mkdir(parents=True)
    archive = ManagedOrthanc(settings)
    external = {"url": archive.endpoint.url, "username": archive.endpoint.username,
                "password": archive.endpoint.password}
    with running_node(tmp_path / "data", write_rules(tmp_path / "rules", destinations="[orthanc]"),
                      archive_up=False, external_orthanc=external, delivery_max_attempts=50) as node:
        assert node.api("GET", "/api/health").json()["orthanc"] == "down"
        assert storescu(node.dicom_port, ct.dicom_dir).returncode == 0

        def waiting():
            st = node.study(ct.study_uid)
            jobs = st.get("jobs", [])
            return jobs and jobs[0]["status"] == "done" and jobs[0]["results"] and \
                jobs[0]["results"][0]["deliveries"]["orthanc"] == "pending"

        wait_for(waiting, 90, "job done with delivery pending", interval=0.5)
        archive.start()
        try:
            wait_for(lambda: _done(node, ct.study_uid, ("orthanc",)), 90, "delivery after archive came back",
                     interval=0.5)

            def in_archive():  # the originals are a delivery batch of their own: they may land a moment later
                with archive.endpoint.client() as c:
                    return c.post("/tools/find", json={"Level": "Instance",
                                                       "Query": {"StudyInstanceUID": ct.study_uid}}).json()

            assert len(wait_for(lambda: len(in_archive()) == 25 and in_archive(), 60, "originals and result")) == 25
        finally:
            archive.stop()


def test_failed_delivery_is_retried_by_an_admin(ct, tmp_path):
    tps_port = free_port()
    dests = {"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}}
    with running_node(tmp_path / "data", write_rules(tmp_path / "rules"), destinations=dests,
                      delivery_max_attempts=2) as node:
        assert storescu(node.dicom_port, ct.dicom_dir).returncode == 0

        def tps_failed():
            jobs = node.study(ct.study_uid).get("jobs", [])
            deliveries = jobs[0]["results"][0]["deliveries"] if jobs and jobs[0]["results"] else {}
            # The archive's delivery is a lane of its own: waited for too, not assumed ahead.
            return deliveries.get("tps") == "failed" and deliveries.get("orthanc") == "delivered" and jobs[0]
        job = wait_for(tps_failed, 90, "TPS delivery to fail", interval=0.5)
        assert job["results"][0]["deliveries"]["orthanc"] == "delivered"
        viewer = node.hilum("token", "create", "--role", "viewer", "--config", str(node.config_path)).stdout.strip()
        import httpx

        denied = httpx.post(f"{node.web}/api/jobs/{job['id']}/retry", headers={"Authorization": f"Bearer {viewer}"})
        assert denied.status_code == 403
        with storescp(tmp_path / "tps2", port=tps_port):  # the TPS comes back on its configured port
            r = node.api("POST", f"/api/jobs/{job['id']}/retry")
            assert r.status_code == 200 and "re-queued" in r.json()["action"]
            wait_for(lambda: _done(node, ct.study_uid, ("orthanc", "tps")), 60, "TPS delivery after retry",
                     interval=0.5)
        assert len(list((tmp_path / "tps2").iterdir())) == 1


def test_handler_timeout_fails_the_job_and_the_node_keeps_serving(ct, tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "slow.yaml").write_text(textwrap.dedent("""\
        name: too-slow
        match: {Modality: CT}
        handler: overview
        destinations: [orthanc]
        timeout: 0.01s
        """))
    with running_node(tmp_path / "data", rules) as node:
        assert storescu(node.dicom_port, ct.dicom_dir).returncode == 0

        def failed():
            jobs = node.study(ct.study_uid).get("jobs", [])
            return jobs and jobs[0]["status"] == "failed" and jobs[0]
        job = wait_for(failed, 90, "job to time out", interval=0.5)
        assert "timed out" in job["error"]
        assert node.api("GET", "/api/health").json()["node"] == "ok"
        other = generate_ct(tmp_path / "other", seed=4, rows=32, cols=32, slices=4, pixel_spacing=10.0,
                            slice_thickness=10.0)
        assert storescu(node.dicom_port, other.dicom_dir).returncode == 0
        assert node.study(other.study_uid)["instances_received"] == 4


def test_late_instances_rerun_the_rules_and_force_complete(ct, tmp_path):
    files = sorted(ct.dicom_dir.iterdir())
    with running_node(tmp_path / "data", write_rules(tmp_path / "rules", destinations="[orthanc]"),
                      stable_after=600) as node:
        assert storescu(node.dicom_port, files[:12]).returncode == 0
        assert node.study(ct.study_uid)["stable"] is False  # 600 s quiet period: not complete yet
        assert node.api("POST", f"/api/studies/{ct.study_uid}/complete").status_code == 200
        wait_for(lambda: _done(node, ct.study_uid, ("orthanc",)), 90, "first run", interval=0.5)
        assert storescu(node.dicom_port, files[12:]).returncode == 0
        st = node.study(ct.study_uid)
        assert st["stable"] is False and st["instances_received"] == 24
        assert node.api("POST", f"/api/studies/{ct.study_uid}/complete").status_code == 200

        def rerun():
            s = _done(node, ct.study_uid, ("orthanc",))
            return s if s and len(s["jobs"]) == 2 else None
        st = wait_for(rerun, 90, "re-run after late instances", interval=0.5)
        first, second = st["jobs"]
        assert "re-run" in second["history"][0]["note"]
        # The re-run saw all 24 slices: its overview is a new object, the first one stays.
        assert first["results"][0]["sop_instance_uid"] != second["results"][0]["sop_instance_uid"]


def test_token_create_before_first_start_and_roles(tmp_path):
    node = NodeProcess(tmp_path / "data", write_rules(tmp_path / "rules", destinations="[orthanc]"))
    out = node.hilum("token", "create", "--role", "viewer", "--config", str(node.config_path))
    assert out.returncode == 0 and out.stdout.startswith("hlm_")
    bad = node.hilum("token", "create", "--role", "root", "--config", str(node.config_path))
    assert bad.returncode != 0


def test_model_handler_results_land_in_orthanc(tmp_path):
    """A rule routes a phantom CT to the shipped model: its SEG and SR arrive in the study, and the
    job history records which model (by hash) and which execution provider produced them. The phantom
    is drawn like the model's training data (a seed it never saw): inside its validated domain."""
    ct = generate_ct(tmp_path / "ct", seed=11, rows=160, cols=160, slices=100, pixel_spacing=2.2,
                     slice_thickness=2.5, nodules=0)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "model.yaml").write_text(textwrap.dedent("""\
        name: chest-model
        match: {Modality: CT}
        handler: model:hilum-ct-chest
        destinations: [orthanc]
        """))
    with running_node(tmp_path / "data", rules) as node:
        assert storescu(node.dicom_port, ct.dicom_dir).returncode == 0
        st = wait_for(lambda: _done(node, ct.study_uid, ("orthanc",)), 240, "model results delivered", interval=1)
        (job,) = st["jobs"]
        from node.models.registry import model_handler

        emitted = {r["modality"] for r in job["results"]}
        assert emitted == set(model_handler("hilum-ct-chest").card.emit) and {"SEG", "SR"} <= emitted
        prov = job["history"][-1]["provenance"]
        assert prov["model"] == "hilum-ct-chest" and len(prov["model_sha256"]) == 64
        assert "quality_warnings" not in prov and 0 < prov["confidence"] <= 1
        assert "CPUExecutionProvider" in str(prov)
        in_orthanc = {i["MainDicomTags"]["SOPInstanceUID"] for i in _orthanc_instances(node, ct.study_uid)}
        assert {r["sop_instance_uid"] for r in job["results"]} <= in_orthanc
