"""Projects whose cases are selected by a rule condition, and per-project roles: a user may annotate one
project and only view another; refusals are 403 with the reason, in the audit trail. The store-level
tests run here; the last test goes through a real node (the router selects, the gateway and the API
refuse)."""
from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.sr.codedict import codes

from node.models.train_config import TrainConfig
from node.phantom import generate_ct
from node.projects.store import ProjectError, ProjectStore
from node.rules.from_files import facts_from_paths
from tests.test_models_inference import threshold_model
from tests.test_models_train import TINY_PHANTOM, tiny_config
from tests.test_projects import _model_and_config, _seg


def _facts(study):
    (facts,) = facts_from_paths([study.dicom_dir]).studies
    return facts


def _patient(study) -> str:
    return str(pydicom.dcmread(next(Path(study.dicom_dir).iterdir()), stop_before_pixels=True).PatientID)


def test_a_select_condition_makes_matching_studies_cases(tmp_path):
    card, train = _model_and_config(tmp_path)
    store = ProjectStore(tmp_path / "projects")
    one = generate_ct(tmp_path / "one", seed=11, **TINY_PHANTOM)
    two = generate_ct(tmp_path / "two", seed=12, **TINY_PHANTOM)
    assert _patient(one) != _patient(two)
    store.create("chest", model_card=card, train_config=train, study_uids=[],
                 select={"Modality": "CT", "PatientID": _patient(one)}, annotators=["alice"], by="t")
    store.create("listed", model_card=card, train_config=train, study_uids=[two.study_uid], annotators=[], by="t")
    assert store.cases("chest") == {}
    assert store.select_study(_facts(two)) == []  # another patient: no project selects it
    assert store.select_study(_facts(one)) == ["chest"]
    case = store.cases("chest")[one.study_uid]
    assert case["state"] == "unlabeled" and "PatientID" in case["selected_by"]
    assert case["history"][0]["why"].startswith("matched the project's condition: ")
    assert store.has_case("chest", one.study_uid) and not store.has_case("listed", one.study_uid)
    assert store.select_study(_facts(one)) == []  # a second completion adds nothing twice
    assert len(store.cases("chest")) == 1
    # a selected case is a case like any other: predictions and labels go to it
    store.record_prediction("chest", one.study_uid, job_id=1, model_version="0.1", seg_sop_uid=None, uncertainty=None)
    assert store.cases("chest")[one.study_uid]["state"] == "predicted"


def test_select_and_roles_are_validated_naming_the_field(tmp_path):
    card, train = _model_and_config(tmp_path)
    store = ProjectStore(tmp_path / "projects")
    with pytest.raises(ProjectError, match=r"select: select\.Modalty: .*Modalty"):
        store.create("p", model_card=card, train_config=train, study_uids=[], select={"Modalty": "CT"},
                     annotators=[], by="t")
    with pytest.raises(ProjectError, match="study_uids: give the project's studies, a select condition, or both"):
        store.create("p", model_card=card, train_config=train, study_uids=[], annotators=[], by="t")
    project = store.create("p", model_card=card, train_config=train, study_uids=["1.2"], annotators=["alice"],
                           viewers=["carol"], by="t")
    assert project.may_annotate("alice", "annotator") and project.may_view("alice", "annotator")
    assert project.may_view("carol", "viewer") and not project.may_annotate("carol", "annotator")
    assert not project.may_view("dave", "viewer") and project.may_view("root", "admin")
    assert project.why_not("dave", "viewer", "view") == "viewer dave is not a viewer of project 'p'"
    assert project.why_not("carol", "annotator", "annotate") == "annotator carol is not an annotator of project 'p'"
    assert "the viewer role never annotates" in project.why_not("alice", "viewer", "annotate")
    # no viewers list: every signed-in user may look (as before roles per project existed)
    open_project = store.create("q", model_card=card, train_config=train, study_uids=["1.2"], annotators=[], by="t")
    assert open_project.may_view("dave", "viewer")


@pytest.mark.slow
def test_selected_cases_and_roles_through_a_node(tmp_path, monkeypatch):
    from tests.nodeproc import running_node, storescu, wait_for
    from tests.test_projects_node import _in_archive, _stow
    from tests.web_support import add_user, api_session

    raw = tiny_config(tmp_path)
    cfg = TrainConfig.model_validate(raw)
    builtin = tmp_path / "builtin" / "tiny"
    builtin.mkdir(parents=True)
    threshold_model(builtin / "model.onnx", channels_out=3)
    card = cfg.card_draft().model_dump(mode="json", exclude_none=True)
    card["emit"] = ["SEG"]
    (builtin / "card.yaml").write_text(yaml.safe_dump(card))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("HILUM_MODELS_DIR", str(builtin.parent))
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "tiny.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "level": "series", "match": {"Modality": "CT"}, "destinations": ["orthanc"],
        "handler": {"name": "model:tiny", "params": {"uncertainty": {}}}}))
    one = generate_ct(tmp_path / "one", seed=21, **TINY_PHANTOM)
    two = generate_ct(tmp_path / "two", seed=22, **TINY_PHANTOM)
    with running_node(tmp_path / "data", rules) as node:
        common = ("--model-card", str(builtin), "--train-config", str(tmp_path / "train.yaml"),
                  "--config", str(node.config_path))
        # project a: cases selected by a condition; alice annotates it, nobody else may look
        out = node.hilum("project", "create", "a", "--select", json.dumps({"PatientID": _patient(one)}),
                         "--annotator", "alice", "--viewer", "nobody", *common)
        assert out.returncode == 0, out.stderr
        # project b: a listed study; bob annotates it, alice may only view it
        out = node.hilum("project", "create", "b", "--study", two.study_uid, "--annotator", "bob",
                         "--viewer", "alice", *common)
        assert out.returncode == 0, out.stderr
        for user in ("alice", "bob", "carol"):
            add_user(node, user, "annotator")
        assert storescu(node.dicom_port, one.dicom_dir).returncode == 0
        assert storescu(node.dicom_port, two.dicom_dir).returncode == 0

        def predicted():
            a = node.api("GET", "/api/projects/a").json()["cases"]
            b = node.api("GET", "/api/projects/b").json()["cases"]
            done = a.get(one.study_uid, {}).get("state") == "predicted" and b[two.study_uid]["state"] == "predicted"
            return (a, b) if done else None

        a_cases, _ = wait_for(predicted, 120, "the selected case predicted", interval=1)
        assert list(a_cases) == [one.study_uid]  # the other study did not match
        assert a_cases[one.study_uid]["prediction"]["uncertainty"]["passes"] == 3

        def ct_archived():
            with node.orthanc() as c:
                return all(c.post("/tools/find", json={"Level": "Series", "Query": {"SeriesInstanceUID": uid}}).json()
                           for uid in (one.series_uid, two.series_uid))

        wait_for(ct_archived, 60, "the CT series in the archive")
        alice, alice_csrf = api_session(node, "alice")
        carol, _ = api_session(node, "carol")
        assert sorted(p["name"] for p in alice.get("/api/projects").json()["projects"]) == ["a", "b"]
        assert carol.get("/api/projects").json()["projects"] == []  # not named to a user who may not see them
        r = carol.get("/api/projects/a")
        assert r.status_code == 403 and "annotator carol is not a viewer of project 'a'" in r.text
        assert carol.get("/api/projects/b/queue").status_code == 403
        assert alice.get("/api/projects/b").status_code == 200  # alice views b ...
        # ... but may not annotate it: refused at the gateway, nothing stored, and may not accept
        seg_b = _seg(two, [("lung_left", codes.SCT.Lung), ("Heart", codes.SCT.Heart)])
        r = _stow(alice, alice_csrf, node.web, seg_b)
        assert r.status_code == 403 and "annotator alice is not an annotator of project 'b'" in r.text
        assert not _in_archive(node, str(seg_b.SOPInstanceUID))
        r = alice.post(f"/api/projects/b/cases/{two.study_uid}/accept", headers={"X-CSRF-Token": alice_csrf})
        assert r.status_code == 403
        # the selected case of a takes alice's label through the gateway
        seg_a = _seg(one, [("lung_left", codes.SCT.Lung), ("Heart", codes.SCT.Heart)])
        r = _stow(alice, alice_csrf, node.web, seg_a)
        assert r.status_code == 200, r.text
        assert node.api("GET", "/api/projects/a").json()["cases"][one.study_uid]["state"] == "in_review"

        audit = [json.loads(line) for line in (node.data_dir / "audit" / "audit.jsonl").read_text().splitlines()]
        refusals = [e for e in audit if e.get("event") == "project-access"]
        assert all(e["outcome"] == 4 for e in refusals)
        reasons = [e["outcome_description"] for e in refusals]
        assert "annotator carol is not a viewer of project 'a'" in reasons
        assert "annotator alice is not an annotator of project 'b'" in reasons
        assert {e["detail"]["request"] for e in refusals} >= {"view", "store a label", "accept a label"}


def test_a_select_condition_takes_the_matching_studies_already_in_the_node(tmp_path):
    card, train = _model_and_config(tmp_path)
    store = ProjectStore(tmp_path / "projects")
    one = generate_ct(tmp_path / "one", seed=13, **TINY_PHANTOM)
    two = generate_ct(tmp_path / "two", seed=14, **TINY_PHANTOM)
    store.create("chest", model_card=card, train_config=train, study_uids=[], annotators=[], by="t",
                 select={"PatientID": _patient(one)}, existing=[_facts(one), _facts(two)])
    cases = store.cases("chest")
    assert list(cases) == [one.study_uid]  # the other patient's study does not match
    assert cases[one.study_uid]["history"][0]["why"].endswith("(in the node before the project was created)")
    assert store.select_study(_facts(one)) == []  # completing again later adds nothing twice
    # without a condition, the studies in the node are not looked at: the project has its listed cases only
    store.create("listed", model_card=card, train_config=train, study_uids=[two.study_uid], annotators=[], by="t",
                 existing=[_facts(one)])
    assert list(store.cases("listed")) == [two.study_uid]


@pytest.mark.slow
def test_project_create_selects_the_complete_studies_of_a_running_node(tmp_path, monkeypatch):
    """`hilum project create --select` against a node that already holds studies: the matching complete
    ones become cases at once (the output says how many); `--new-only` leaves them out."""
    from tests.nodeproc import running_node, storescu, wait_for

    card, train = _model_and_config(tmp_path)
    rules = tmp_path / "rules"
    rules.mkdir()
    one = generate_ct(tmp_path / "one", seed=31, **TINY_PHANTOM)
    two = generate_ct(tmp_path / "two", seed=32, **TINY_PHANTOM)
    with running_node(tmp_path / "data", rules) as node:
        for s in (one, two):
            assert storescu(node.dicom_port, s.dicom_dir).returncode == 0
        wait_for(lambda: all(node.study(s.study_uid).get("stable") for s in (one, two)), 60,
                 "both studies complete", interval=0.5)
        common = ("--model-card", str(card.parent), "--train-config", str(train), "--config", str(node.config_path))
        select = json.dumps({"Modality": "CT", "PatientID": _patient(one)})
        out = node.hilum("project", "create", "now", "--select", select, *common)
        assert out.returncode == 0, out.stderr
        assert "1 of the 2 complete studies in the node match" in out.stdout, out.stdout
        later = node.hilum("project", "create", "later", "--select", select, "--new-only", *common)
        assert later.returncode == 0 and "completing from now on" in later.stdout, later.stderr
        bad = node.hilum("project", "create", "bad", "--study", one.study_uid, "--new-only", *common)
        assert bad.returncode == 1 and "--new-only: goes with --select" in bad.stderr
        now = node.api("GET", "/api/projects/now").json()
        assert list(now["cases"]) == [one.study_uid] and now["counts"]["unlabeled"] == 1
        assert node.api("GET", "/api/projects/later").json()["cases"] == {}
