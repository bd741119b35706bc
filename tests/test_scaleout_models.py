"""`model:` jobs on remote workers run the registry version the node resolved, fetched from the node
(card + ONNX, checked by hash, cached by hash), never what the worker's host has in its models/ folder.
A real `hilum up` with a Celery executor on a real redis-server, and a worker in its own empty directory."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import textwrap
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml

from node.jobs.remote_models import ModelIntegrityError, model_folder, served_file
from node.models.versions import ModelRegistry
from node.phantom import generate_ct
from tests.nodeproc import NodeProcess, storescu, wait_for
from tests.redisproc import redis_server
from tests.slow_handler import PRELOAD
from tests.test_models_inference import card_dict, deploy, threshold_model
from tests.test_scaleout import Worker, _data_set, _local_run, _node_results

FAST = {"patch_size": [32, 32, 32], "overlap": 0.25}


def _study(root: Path, seed: int):
    return generate_ct(root, seed=seed, rows=64, cols=64, slices=20, pixel_spacing=6.0, slice_thickness=8.0,
                       nodules=0)


def _job_of(node, study_uid: str):
    jobs = node.study(study_uid).get("jobs", [])
    if len(jobs) != 1 or jobs[0]["status"] not in ("done", "failed"):
        return None
    if jobs[0]["status"] == "done" and not all(d == "delivered" for r in jobs[0]["results"]
                                               for d in r["deliveries"].values()):
        return None
    return jobs[0]


def _model_file_accesses(data_dir: Path) -> list[str]:
    entries = [json.loads(line) for line in (data_dir / "audit" / "audit.jsonl").read_text().splitlines()]
    return [e["detail"]["request"] for e in entries
            if e["event"] == "worker-access" and e["detail"]["request"].startswith("model file")]


@pytest.mark.slow
def test_a_remote_worker_runs_the_registry_version_the_node_resolved(tmp_path, monkeypatch):
    builtin = tmp_path / "builtin"
    deploy(builtin, inference=FAST, emit=["SEG"])  # shipped: card 1.0, threshold -250 HU
    monkeypatch.setenv("HILUM_MODELS_DIR", str(builtin))  # what the node (and its CLI) ship
    decoy = tmp_path / "worker-host-models"  # the worker's host has a model of that name too: never used
    deploy(decoy, inference=FAST, emit=["SEG"], version="9.9")
    v2 = tmp_path / "train" / "ball"
    v2.mkdir(parents=True)
    threshold_model(v2 / "model.onnx", threshold=-100.0)
    (v2 / "card.yaml").write_text(yaml.safe_dump(card_dict("ball", version="2.0", inference=FAST, emit=["SEG"])))
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "ball.yaml").write_text(textwrap.dedent("""\
        name: ball
        level: series
        match: {Modality: CT}
        handler: model:ball
        destinations: [orthanc]
        """))
    studies = [_study(tmp_path / f"ct{i}", 60 + i) for i in range(3)]
    with redis_server(tmp_path / "redis") as redis:
        node = NodeProcess(tmp_path / "data", rules, executor={"kind": "celery", "broker_url": redis.url})
        node.launcher = [sys.executable, "-c", PRELOAD]
        node.tmp = tmp_path  # where Worker puts its work dir and log
        worker = None
        try:
            node.start()
            cfg = ("--config", str(node.config_path))
            for args in (("model", "add", str(v2)), ("model", "promote", "ball", "2.0")):
                out = node.hilum(*args, *cfg)
                assert out.returncode == 0, out.stderr
            token = node.tmp / "worker.token"
            out = node.hilum("token", "create", "--role", "worker", *cfg)
            assert out.returncode == 0, out.stderr
            token.write_text(out.stdout.strip())
            worker = Worker(node, "gpu1", token, env={**os.environ, "HILUM_MODELS_DIR": str(decoy)})
            assert not worker.work_dir.exists() or not any(worker.work_dir.iterdir())

            # 1. The promoted registry version runs on the worker, named in the results.
            assert storescu(node.dicom_port, studies[0].dicom_dir).returncode == 0
            job = wait_for(lambda: _job_of(node, studies[0].study_uid), 180, "study 1 done", interval=0.5)
            assert job["status"] == "done", job["error"]
            assert [(e["name"], e["version"]) for e in job["history"] if e["event"] == "model"] == [("ball", "2.0")]
            assert job["history"][-1]["provenance"]["model_version"] == "2.0"
            assert job["history"][-1]["provenance"]["worker"] == "gpu1"
            (result,) = job["results"]
            with node.orthanc() as c:
                (found,) = c.post("/tools/find", json={"Level": "Instance",
                                                        "Query": {"SOPInstanceUID": result["sop_instance_uid"]}}).json()
                in_orthanc = c.get(f"/instances/{found}/file").content
            seg = pydicom.dcmread(BytesIO(in_orthanc))
            assert seg.SeriesDescription.startswith("AI: ball 2.0 ")
            # ... and it is exactly what the node's own run of that registry folder makes, byte for byte.
            folder = tmp_path / "data" / "models" / "ball" / "2.0"
            local = _local_run(node, job["id"], studies[0], tmp_path / "local",
                               extra={"model_dir": str(folder), "model_version": "2.0"})
            assert _node_results(node, job["id"]) == local
            assert _data_set(in_orthanc) == _data_set(local[result["sop_instance_uid"]])
            # The worker cached the version's files by their hash.
            blobs = worker.work_dir / "models" / "blobs"
            assert sorted(p.name for p in blobs.iterdir()) == sorted(
                hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in ("card.yaml", "model.onnx"))
            assert sorted(_model_file_accesses(tmp_path / "data")) == ["model file card.yaml",
                                                                        "model file model.onnx"]

            # 2. The next job of the same version takes the files from the cache: nothing fetched again.
            assert storescu(node.dicom_port, studies[1].dicom_dir).returncode == 0
            job = wait_for(lambda: _job_of(node, studies[1].study_uid), 180, "study 2 done", interval=0.5)
            assert job["status"] == "done", job["error"]
            assert len(_model_file_accesses(tmp_path / "data")) == 2

            # 3. A worker without this attempt's ticket gets no model file.
            with httpx.Client(base_url=node.web, headers={"Authorization": f"Bearer {token.read_text()}"}) as c:
                assert c.get(f"/api/worker/jobs/{job['id']}/model/model.onnx").status_code == 403
                assert c.get(f"/api/worker/jobs/{job['id']}/model/model.onnx",
                             headers={"x-hilum-ticket": "guessed"}).status_code == 403

            # 4. A registered version whose ONNX changed after registration is refused at the claim.
            onnx = folder / "model.onnx"
            onnx.chmod(0o644)
            onnx.write_bytes(onnx.read_bytes() + b"\0")
            assert storescu(node.dicom_port, studies[2].dicom_dir).returncode == 0
            job = wait_for(lambda: _job_of(node, studies[2].study_uid), 120, "study 3 refused", interval=0.5)
            assert job["status"] == "failed"
            assert "the version folder changed after registration" in job["error"], job["error"]
        finally:
            if worker is not None:
                worker.stop()
            node.stop()
            node._kill_orthanc()


def test_served_files_are_the_recorded_versions_card_and_onnx_only(tmp_path):
    builtin = tmp_path / "builtin"
    deploy(builtin, inference=FAST, emit=["SEG"])
    registry = ModelRegistry(tmp_path / "data" / "models", builtin)
    history = [{"event": "created"}, {"event": "model", "name": "ball", "version": "built-in"}]
    assert served_file(registry, history, "model.onnx") == (builtin / "ball" / "model.onnx").resolve()
    assert served_file(registry, history, "card.yaml") == (builtin / "ball" / "card.yaml").resolve()
    for name in ("../ball/model.onnx", "version.json", "states.json", ""):
        with pytest.raises(KeyError):
            served_file(registry, history, name)
    with pytest.raises(KeyError, match="runs no model"):
        served_file(registry, [{"event": "created"}], "model.onnx")


def test_worker_cache_checks_the_hash_and_fetches_once(tmp_path):
    card, onnx = b"name: x\n", b"\x08\x01onnx-bytes"
    manifest = {"name": "x", "version": "3", "files": [
        {"name": "card.yaml", "sha256": hashlib.sha256(card).hexdigest(), "size": len(card)},
        {"name": "model.onnx", "sha256": hashlib.sha256(onnx).hexdigest(), "size": len(onnx)}]}
    fetched: list[str] = []

    def fetch(name):
        fetched.append(name)
        return iter([{"card.yaml": card, "model.onnx": onnx}[name]])

    folder = model_folder(manifest, tmp_path / "cache", fetch)
    assert folder.name == "x" and (folder / "model.onnx").read_bytes() == onnx
    assert model_folder(manifest, tmp_path / "cache", fetch) == folder
    assert fetched == ["card.yaml", "model.onnx"]  # the second time: from the cache

    tampered = {**manifest, "version": "4", "files": [manifest["files"][0], {**manifest["files"][1], "size": 99,
                                                                             "sha256": "0" * 64}]}
    with pytest.raises(ModelIntegrityError, match="model.onnx: received SHA-256"):
        model_folder(tampered, tmp_path / "cache", fetch)
    assert not (tmp_path / "cache" / "blobs" / ("0" * 64)).exists()
    assert not [p for p in (tmp_path / "cache" / "blobs").iterdir() if p.name.startswith(".part")]
    with pytest.raises(ModelIntegrityError, match="not a name inside"):
        model_folder({**manifest, "files": [{**manifest["files"][0], "name": "../evil"}]}, tmp_path / "c2", fetch)
