"""A project through a real `hilum up`: the model's job makes the case *predicted* with its uncertainty
and queues it; an annotator's SEG saved through the DICOMweb gateway (as OHIF saves) becomes the case's
label, while a SEG on the wrong series, with an unknown segment, or from a user who does not annotate
the project, is refused with the reason and never reaches the archive."""
from __future__ import annotations

import json
import uuid

import httpx
import pytest
import yaml
from pydicom.sr.codedict import codes

from node.models.train_config import TrainConfig
from node.phantom import generate_ct
from tests.nodeproc import running_node, storescu, wait_for
from tests.test_models_inference import threshold_model
from tests.test_models_train import TINY_PHANTOM, tiny_config
from tests.test_projects import _seg
from tests.web_support import add_user, api_session

pytestmark = pytest.mark.slow


def _stow(client: httpx.Client, csrf: str, web: str, ds) -> httpx.Response:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    boundary = uuid.uuid4().hex
    body = (b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + buf.getvalue() +
            b"\r\n--" + boundary.encode() + b"--\r\n")
    return client.post("/dicom-web/studies", content=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json", "Origin": web, "X-CSRF-Token": csrf})


def _in_archive(node, sop_uid: str) -> bool:
    with node.orthanc() as c:
        return bool(c.post("/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}).json())


def test_predicted_case_labelled_through_the_gateway(tmp_path, monkeypatch):
    raw = tiny_config(tmp_path)
    cfg = TrainConfig.model_validate(raw)
    builtin = tmp_path / "builtin" / "tiny"
    builtin.mkdir(parents=True)
    threshold_model(builtin / "model.onnx", channels_out=3)  # "Left lung" = above -250 HU: the body
    card = cfg.card_draft().model_dump(mode="json", exclude_none=True)
    card["emit"] = ["SEG"]
    (builtin / "card.yaml").write_text(yaml.safe_dump(card))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("HILUM_MODELS_DIR", str(builtin.parent))
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "tiny.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "level": "series", "match": {"Modality": "CT"}, "destinations": ["orthanc"],
        "handler": {"name": "model:tiny", "params": {"uncertainty": {"intensity_scales": [0.9, 1.1]}}}}))
    study = generate_ct(tmp_path / "ct", seed=5, **TINY_PHANTOM)
    other = generate_ct(tmp_path / "ct2", seed=6, **TINY_PHANTOM)
    with running_node(tmp_path / "data", rules) as node:
        cfg_args = ("--config", str(node.config_path))
        out = node.hilum("project", "create", "lungs", "--model-card", str(builtin), "--train-config",
                         str(tmp_path / "train.yaml"), "--study", study.study_uid, "--study", other.study_uid, "--annotator", "alice", *cfg_args)
        assert out.returncode == 0, out.stderr
        add_user(node, "alice", "annotator")
        add_user(node, "bob", "annotator")
        assert storescu(node.dicom_port, study.dicom_dir).returncode == 0
        assert storescu(node.dicom_port, other.dicom_dir).returncode == 0

        def predicted():
            view = node.api("GET", "/api/projects/lungs").json()
            return view if all(c["state"] == "predicted" for c in view["cases"].values()) else None

        view = wait_for(predicted, 120, "the case predicted", interval=1)
        prediction = view["cases"][study.study_uid]["prediction"]
        assert prediction["model_version"] == "0.1" and prediction["seg_sop_uid"]
        assert 0 < prediction["uncertainty"]["score"] < 1 and prediction["uncertainty"]["passes"] == 3
        queue = node.api("GET", "/api/projects/lungs/queue?strategy=uncertainty").json()["queue"]
        assert {e["study_uid"] for e in queue} == {study.study_uid, other.study_uid}
        assert all(e["reason"].startswith("uncertainty ") for e in queue)

        def ct_archived():
            with node.orthanc() as c:
                return all(c.post("/tools/find", json={"Level": "Series", "Query": {"SeriesInstanceUID": uid}}).json()
                           for uid in (study.series_uid, other.series_uid))

        wait_for(ct_archived, 60, "the CT series in the archive")

        alice, alice_csrf = api_session(node, "alice")
        bob, bob_csrf = api_session(node, "bob")
        good = _seg(study, [("lung_left", codes.SCT.Lung), ("Heart", codes.SCT.Heart)])
        r = _stow(bob, bob_csrf, node.web, good)
        assert r.status_code == 403 and "annotator bob is not an annotator of project 'lungs'" in r.text

        wrong = _seg(study, [("lung_left", codes.SCT.Lung), ("Heart", codes.SCT.Heart)], series_uid="1.2.3.99")
        r = _stow(alice, alice_csrf, node.web, wrong)
        assert r.status_code == 409 and "drawn on series 1.2.3.99, not on the case's input series" in r.text
        unknown = _seg(study, [("lung_left", codes.SCT.Lung), ("Tumour", codes.SCT.Neoplasm)])
        r = _stow(alice, alice_csrf, node.web, unknown)
        assert r.status_code == 409 and "unknown segment labels ['Tumour']" in r.text
        assert not _in_archive(node, str(wrong.SOPInstanceUID)) and not _in_archive(node, str(unknown.SOPInstanceUID))

        r = _stow(alice, alice_csrf, node.web, good)
        assert r.status_code == 200, r.text
        assert _in_archive(node, str(good.SOPInstanceUID))
        case = node.api("GET", "/api/projects/lungs").json()["cases"][study.study_uid]
        assert case["state"] == "in_review"
        (label,) = case["labels"]
        assert label["sop_uid"] == str(good.SOPInstanceUID) and label["by"] == "annotator alice"
        assert label["from_prediction"]["seg_sop_uid"] == prediction["seg_sop_uid"]
        queue = node.api("GET", "/api/projects/lungs/queue").json()["queue"]
        assert [e["study_uid"] for e in queue] == [other.study_uid]  # the labelled case no longer waits
        r = alice.post(f"/api/projects/lungs/cases/{study.study_uid}/accept", headers={"X-CSRF-Token": alice_csrf})
        assert r.status_code == 200 and r.json()["state"] == "labeled"

        # the second case labelled too, then a training run on exactly the accepted label versions
        second = _seg(other, [("lung_left", codes.SCT.Lung), ("Heart", codes.SCT.Heart)])
        assert _stow(alice, alice_csrf, node.web, second).status_code == 200
        assert alice.post(f"/api/projects/lungs/cases/{other.study_uid}/accept",
                          headers={"X-CSRF-Token": alice_csrf}).status_code == 200
        r = node.api("POST", "/api/projects/lungs/runs")
        assert r.status_code == 200 and r.json()["labeled_cases"] == 2, r.text
        run_id = r.json()["run"]

        def finished():
            (run,) = node.api("GET", "/api/projects/lungs/runs").json()["runs"]
            return run if run["state"] != "running" else None

        run = wait_for(finished, 300, "the training run", interval=2)
        assert run["state"] == "done", run
        assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        view = node.api("GET", "/api/models/tiny").json()
        candidate = next(v for v in view["versions"] if v["version"] == "0.1.r1")
        assert candidate["state"] == "candidate" and candidate["registered_by"].startswith(f"training run {run_id}")
        trace = json.loads((tmp_path / "data" / "models" / "tiny" / "0.1.r1" / "version.json").read_text())
        assert trace["label_versions"] == {study.study_uid: {"version": 1, "sop_uid": str(good.SOPInstanceUID)},
                                           other.study_uid: {"version": 1, "sop_uid": str(second.SOPInstanceUID)}}
        metrics = json.loads((tmp_path / "data" / "models" / "tiny" / "0.1.r1" / "metrics.json").read_text())
        used = metrics["training"]["train_cases"] + list(metrics["validation"]["per_case"])
        assert sorted(used) == sorted(f"seg-{ds.SOPInstanceUID}" for ds in (good, second))
