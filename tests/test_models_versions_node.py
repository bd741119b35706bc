"""Model versions through a real `hilum up`: a version put in shadow mode runs beside the active one
(results kept, never delivered, agreement shown), and a version promoted while the node runs is what the
next study gets, named in its SEG, without a restart."""
from __future__ import annotations

import json
import textwrap
from io import BytesIO

import pydicom
import pytest
import yaml

from node.phantom import generate_ct
from tests.nodeproc import running_node, storescu, wait_for
from tests.test_models_inference import card_dict, deploy, threshold_model
from tests.web_support import BrowserErrors, add_user, launch, screenshot, sign_in

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect
pytestmark = pytest.mark.slow

FAST = {"patch_size": [32, 32, 32], "overlap": 0.25}  # no flips: the threshold model needs none


def _jobs_done(node, study_uid: str, n: int):
    jobs = node.study(study_uid).get("jobs", [])
    return jobs if len(jobs) == n and all(j["status"] in ("done", "failed") for j in jobs) else None


def _delivered(node, study_uid: str):
    jobs = node.study(study_uid).get("jobs", [])
    results = [r for j in jobs for r in j["results"] if r["deliveries"]]
    return jobs if results and all(r["deliveries"].get("orthanc") == "delivered" for r in results) else None


def _seg_from_orthanc(node, sop_uid: str) -> pydicom.Dataset:
    with node.orthanc() as c:
        (found,) = c.post("/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}).json()
        return pydicom.dcmread(BytesIO(c.get(f"/instances/{found}/file").content))


def _model_event(job) -> dict:
    return next(e for e in job["history"] if e["event"] == "model")


def test_shadow_then_promote_without_restart(tmp_path, monkeypatch):
    builtin = tmp_path / "builtin"
    deploy(builtin, inference=FAST, emit=["SEG"])  # the shipped model: card version 1.0, threshold -250 HU
    monkeypatch.setenv("HILUM_MODELS_DIR", str(builtin))  # the node and its CLI see it as models/
    v2 = tmp_path / "train" / "ball"
    v2.mkdir(parents=True)
    threshold_model(v2 / "model.onnx", threshold=-100.0)  # a slightly different model
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
    studies = [generate_ct(tmp_path / f"ct{i}", seed=40 + i, rows=64, cols=64, slices=20, pixel_spacing=6.0,
                           slice_thickness=8.0, nodules=0) for i in range(3)]
    with running_node(tmp_path / "data", rules) as node:
        cfg = ("--config", str(node.config_path))
        # 1. the built-in model, as before any registry existed
        assert storescu(node.dicom_port, studies[0].dicom_dir).returncode == 0
        (job,) = wait_for(lambda: _delivered(node, studies[0].study_uid), 120, "study 1 delivered", interval=1)
        assert _model_event(job)["version"] == "built-in"
        seg = _seg_from_orthanc(node, job["results"][0]["sop_instance_uid"])
        assert seg.SeriesDescription.startswith("AI: ball 1.0 ")

        # 2. version 2.0 registered and put in shadow mode from the CLI while the node runs
        out = node.hilum("model", "add", str(v2), *cfg)
        assert out.returncode == 0, out.stderr
        out = node.hilum("model", "shadow", "ball", "2.0", *cfg)
        assert out.returncode == 0 and "candidate -> shadow" in out.stdout, out.stderr
        assert storescu(node.dicom_port, studies[1].dicom_dir).returncode == 0
        jobs = wait_for(lambda: _jobs_done(node, studies[1].study_uid, 2), 120, "active and shadow jobs", interval=1)
        assert all(j["status"] == "done" for j in jobs), [j["error"] for j in jobs]
        shadow = next(j for j in jobs if j["shadow"])
        active = next(j for j in jobs if not j["shadow"])
        assert (active["model_version"], shadow["model_version"]) == ("built-in", "2.0")
        assert (_model_event(active)["version"], _model_event(shadow)["version"]) == ("built-in", "2.0")
        assert shadow["results"] and all(r["deliveries"] == {} for r in shadow["results"])  # kept, never sent
        wait_for(lambda: _delivered(node, studies[1].study_uid), 60, "study 2's active result delivered")
        with node.orthanc() as c:
            in_orthanc = {i["MainDicomTags"]["SOPInstanceUID"] for i in c.post("/tools/find", json={
                "Level": "Instance", "Query": {"StudyInstanceUID": studies[1].study_uid}, "Expand": True}).json()}
        assert {r["sop_instance_uid"] for r in active["results"]} <= in_orthanc
        assert not {r["sop_instance_uid"] for r in shadow["results"]} & in_orthanc

        def agreement():
            view = node.api("GET", "/api/models/ball").json()
            summary = view["shadow_agreement"].get("2.0", {})
            return view if summary.get("cases") == 1 else None

        view = wait_for(agreement, 30, "shadow agreement recorded")
        (ball,) = view["shadow_agreement"]["2.0"]["labels"].values()
        # -250 HU and -100 HU thresholds of the same body outline: close, not identical
        assert 0.8 < ball["mean_dice"] < 1.0 and ball["mean_volume_diff_ml"] < 0
        assert view["active"] == "built-in"

        # 3. promotion: admins only (the API refuses a viewer), from the console's models page, audited;
        #    the next study runs 2.0 and says so
        viewer = node.hilum("token", "create", "--role", "viewer", *cfg).stdout.strip()
        r = node.api("POST", "/api/models/ball/versions/2.0/promote", headers={"Authorization": f"Bearer {viewer}"})
        assert r.status_code == 403
        add_user(node, "ada", "admin")
        with playwright_api.sync_playwright() as pw:
            browser = launch(pw)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                errors = BrowserErrors(page).errors
                sign_in(page, node.web, "ada", next_path="/console/models")
                section = page.locator('section[data-model="ball"]')
                expect(section.locator('tr[data-version="2.0"] .state')).to_have_text("shadow", timeout=20_000)
                expect(section.locator('tr[data-version="built-in"] .state')).to_have_text("active")
                expect(section.locator('div[data-shadow="2.0"] h3')).to_contain_text("1 case(s), mean Dice 0.9")
                expect(section.locator('div[data-shadow="2.0"] tbody tr')).to_contain_text("Ball")
                section.locator('tr[data-version="2.0"] button.promote').click()
                expect(section.locator('tr[data-version="2.0"] .state')).to_have_text("active", timeout=20_000)
                expect(section.locator('tr[data-version="built-in"] .state')).to_have_text("standby")
                screenshot(page, "console-models")
                assert errors == []
            finally:
                browser.close()
        assert node.api("GET", "/api/models/ball").json()["active"] == "2.0"
        assert storescu(node.dicom_port, studies[2].dicom_dir).returncode == 0
        (job,) = wait_for(lambda: _delivered(node, studies[2].study_uid), 120, "study 3 delivered", interval=1)
        assert _model_event(job)["version"] == "2.0"
        seg = _seg_from_orthanc(node, job["results"][0]["sop_instance_uid"])
        assert seg.SeriesDescription.startswith("AI: ball 2.0 ")
        processing = [item for item in seg.ContributingEquipmentSequence
                      if "model ball 2.0" in str(item.get("ContributionDescription", ""))]
        assert processing and "ball 2.0" in list(processing[0].SoftwareVersions)
        assert job["history"][-1]["provenance"]["model_version"] == "2.0"
    audit = [json.loads(line) for line in (tmp_path / "data" / "audit" / "audit.jsonl").read_text().splitlines()]
    changes = [(e["user"], e["detail"]["before"], e["detail"]["after"]) for e in audit if e["event"] == "model-change"]
    assert changes[-1] == ("admin ada", "shadow", "active") and len(changes) == 3
