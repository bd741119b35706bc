"""The whole learning loop on phantoms, through a real `hilum up` and its Orthanc, as one test.

A project over 12 chest CT phantoms: 8 normal chests, 2 with a left-lung consolidation and 2 with a
left pleural effusion. The first 4 normal chests arrive, the project's built-in model predicts them,
and an annotator "annotates" them by STOW of their ground truth as SEG through the gateway (as OHIF's
save does) and accepts the labels. Training run 1 makes v1, which is promoted; the other 8 studies then
arrive and v1 predicts them with uncertainty. The variants v1 never saw (consolidation, effusion) must
fill the top of the uncertainty queue; they are annotated in turn and run 2 trains v2 on all 8 labels.
v2 goes into shadow mode: on the next study its result is kept on the node, never delivered, and the
agreement with v1 is shown. v2 is promoted: the study after that is segmented by v2 and its SEG says so.

Is v2 better? Each run's validation Dice is on its own split of its own labels (v1 validates on a normal
chest, v2 also on variants); both are stored and v2's must beat v1's. As that compares different cases,
the comparison is also made on common ground: both registered models on the two held-out variant
studies (neither trained on them), Dice against their truth, where v2 must beat v1 too; a held-out
normal chest shows v2 did not get worse on what v1 knew. The project's training config says
``init_from: previous``: v2 fine-tunes v1 on all eight labels. Trained from scratch with the same 40
steps, v2 did not beat v1 (held-out variants 0.759 against 0.844): the steps spread over harder cases.

Real components throughout (the node, Orthanc, the training subprocess, DICOMweb); the phantoms are tiny
and the runs short (a few epochs on 2 CPU cores), so the figures say the loop works, not how good a model
it makes (bench/bench_learning_loop.py measures that).
"""
from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.sr.codedict import codes

from node.models.card import load_card
from node.models.data import read_phantom
from node.models.inference import load_model, onnx_runner, segment
from node.models.train_config import TrainConfig
from node.phantom import generate_ct
from node.volume import load_series
from tests.nodeproc import running_node, storescu, wait_for
from tests.test_models_inference import threshold_model
from tests.test_models_train import TINY_PHANTOM, tiny_config
from tests.test_models_versions_node import _delivered, _jobs_done, _model_event, _seg_from_orthanc
from tests.test_projects_node import _stow
from tests.web_support import add_user, api_session

pytestmark = pytest.mark.slow

KINDS = {"normal": {}, "consolidation": {"consolidation": "left"}, "effusion": {"effusion": "left"}}
# (kind, seed): the project's 12 cases, then two held-out variant studies (shadow, then after promotion)
CASES = [("normal", 100 + i) for i in range(8)] + [("consolidation", 300), ("consolidation", 301),
                                                     ("effusion", 500), ("effusion", 501)]
HELD_OUT = [("consolidation", 302), ("effusion", 502)]
HELD_OUT_NORMAL = ("normal", 108)  # never sent to the node: the versions compared on a normal chest
FIRST = 4  # normal chests labelled before v1


def truth_seg(study, labels) -> pydicom.Dataset:
    """The phantom's ground truth as a SEG on its CT: what a perfect annotator would save."""
    case = read_phantom(study, labels, name="truth")  # the truth on the series' sorted grid
    series = load_series(sorted(Path(study.dicom_dir).iterdir()))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, Path(study.dicom_dir).iterdir())}
    sources = [by_uid[str(ds.SOPInstanceUID)] for ds in series.datasets]
    named = [("Lungs", codes.SCT.Lung, 1)]
    mask = np.stack([case.truth == value for _, _, value in named], axis=-1)
    assert all(mask[..., i].any() for i in range(len(named)))
    descriptions = [hd.seg.SegmentDescription(i + 1, name, codes.SCT.AnatomicalStructure, prop,
                                              hd.seg.SegmentAlgorithmTypeValues.MANUAL)
                    for i, (name, prop, _) in enumerate(named)]
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=60,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test annotator",
        manufacturer_model_name="truth", software_versions="0", device_serial_number="0")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum()) + int(b.sum()))


def held_out_dice(version_dir: Path, studies, labels) -> float:
    """Mean Dice (every label, every study) of a registered version against the truth."""
    card = load_card(version_dir)
    run = onnx_runner(load_model(version_dir, card, "cpu"))
    out = []
    for study in studies:
        case = read_phantom(study, labels, name="held-out")
        predicted = segment(case.volumes, card, run)
        out += [dice(predicted == lab.value, case.truth == lab.value) for lab in labels]
    return float(np.mean(out))


def test_the_whole_loop(tmp_path, monkeypatch):
    raw = tiny_config(tmp_path)
    # One label, the lungs: what the variants change (a consolidation fills the lower left lung with
    # soft-tissue density; an effusion presses it up), and what a network this small learns in a few
    # steps (air inside the body; telling left from right needs more context than its patches hold).
    raw["labels"] = [{**raw["labels"][0], "name": "Lungs", "source": ["lung_left", "lung_right"], "tg263": "Lungs",
                      "type": {"value": "39607008", "meaning": "Lung"}}]
    raw["emit"] = ["SEG"]  # the SR template names no "lungs" finding; the loop is about the SEG
    # long enough to learn the lungs' outline, short enough for 2 CPU cores
    raw.update(epochs=10, steps_per_epoch=4, early_stopping={"patience": 10}, optimizer={"lr": 0.01},
               augmentation={"probability": 0.0})
    # each run carries on from the project's previous one (v2 fine-tunes v1 on all eight labels)
    raw["init_from"] = "previous"
    raw["data"]["validation_split"] = 0.25  # v1 validates on 1 of its 4 labels, v2 on 2 of its 8
    cfg = TrainConfig.model_validate(raw)
    builtin = tmp_path / "builtin" / "tiny"
    builtin.mkdir(parents=True)
    threshold_model(builtin / "model.onnx", channels_out=2)  # before any training: "Lungs" = the body
    card = cfg.card_draft().model_dump(mode="json", exclude_none=True)
    card["emit"] = ["SEG"]
    (builtin / "card.yaml").write_text(yaml.safe_dump(card))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("HILUM_MODELS_DIR", str(builtin.parent))
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "tiny.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "level": "series", "match": {"Modality": "CT"}, "destinations": ["orthanc"],
        # an early version's prediction is a draft for the annotator: a failed plausibility check (an early
        # version's volumes may fall outside its card's ranges) is delivered with its warning, not refused
        "on_quality_failure": "deliver_with_warnings",
        "handler": {"name": "model:tiny", "params": {"uncertainty": {"intensity_scales": [0.9, 1.1]}}}}))
    studies = [generate_ct(tmp_path / f"{kind}-{seed}", seed=seed, **TINY_PHANTOM, **KINDS[kind])
               for kind, seed in CASES + HELD_OUT]
    normal = generate_ct(tmp_path / "held-out-normal", seed=HELD_OUT_NORMAL[1], **TINY_PHANTOM)
    kind_of = {s.study_uid: kind for s, (kind, _) in zip(studies, CASES + HELD_OUT)}
    cases, held_out = studies[:len(CASES)], studies[len(CASES):]
    variants = {s.study_uid for s in cases if kind_of[s.study_uid] != "normal"}
    by_uid = {s.study_uid: s for s in studies}
    models = tmp_path / "data" / "models" / "tiny"

    with running_node(tmp_path / "data", rules) as node:
        out = node.hilum("project", "create", "lungs", "--model-card", str(builtin), "--train-config",
                         str(tmp_path / "train.yaml"), *sum((["--study", s.study_uid] for s in cases), []),
                         "--annotator", "alice", "--config", str(node.config_path))
        assert out.returncode == 0, out.stderr
        add_user(node, "alice", "annotator")
        alice, csrf = api_session(node, "alice")

        def send_and_wait_predicted(batch, version):
            for s in batch:
                assert storescu(node.dicom_port, s.dicom_dir).returncode == 0

            def predicted():
                got = node.api("GET", "/api/projects/lungs").json()["cases"]
                preds = [(got[s.study_uid].get("prediction") or {}) for s in batch]
                return got if all(p.get("model_version") == version for p in preds) else None

            got = wait_for(predicted, 180, f"{len(batch)} case(s) predicted by {version}", interval=1)
            # the model's SEGs are in the archive: an annotation is stored beside the CT it was drawn on
            wait_for(lambda: all(_delivered(node, s.study_uid) for s in batch), 60, "results delivered", interval=1)
            return got

        def annotate(batch):
            for s in batch:
                r = _stow(alice, csrf, node.web, truth_seg(s, cfg.labels))
                assert r.status_code == 200, r.text
                r = alice.post(f"/api/projects/lungs/cases/{s.study_uid}/accept", headers={"X-CSRF-Token": csrf})
                assert r.status_code == 200 and r.json()["state"] == "labeled", r.text

        def train(expected_labels: int, version: str) -> dict:
            r = node.api("POST", "/api/projects/lungs/runs")
            assert r.status_code == 200 and r.json()["labeled_cases"] == expected_labels, r.text
            run_id = r.json()["run"]

            def finished():
                run = next(x for x in node.api("GET", "/api/projects/lungs/runs").json()["runs"] if x["run"] == run_id)
                return run if run["state"] != "running" else None

            run = wait_for(finished, 400, f"training run {run_id}", interval=2)
            assert run["state"] == "done" and run["version"] == version, run
            metrics = json.loads((models / version / "metrics.json").read_text())
            used = metrics["training"]["train_cases"] + list(metrics["validation"]["per_case"])
            assert len(used) == expected_labels
            return metrics

        # 1. the first four normal chests: predicted by the built-in model, annotated with their truth
        first = cases[:FIRST]
        send_and_wait_predicted(first, "0.1")
        annotate(first)
        counts = node.api("GET", "/api/projects/lungs").json()["counts"]
        assert counts == {"unlabeled": len(CASES) - FIRST, "predicted": 0, "in_review": 0, "labeled": FIRST}

        # 2. v1 from those four labels, promoted (admin, audited)
        m1 = train(FIRST, "0.1.r1")
        assert node.api("POST", "/api/models/tiny/versions/0.1.r1/promote").status_code == 200
        assert node.api("GET", "/api/models/tiny").json()["active"] == "0.1.r1"

        # 3. the other eight arrive; v1 predicts them with uncertainty; the unseen variants top the queue
        rest = cases[FIRST:]
        got = send_and_wait_predicted(rest, "0.1.r1")
        scores = {uid: got[uid]["prediction"]["uncertainty"]["score"] for uid in (s.study_uid for s in rest)}
        queue = node.api("GET", "/api/projects/lungs/queue?strategy=uncertainty").json()["queue"]
        assert [e["study_uid"] for e in queue] == sorted(scores, key=lambda u: -scores[u])
        top = [e["study_uid"] for e in queue[:len(variants)]]
        print("uncertainty queue:", [(kind_of[u], scores[u]) for u in scores])
        assert set(top) == variants, [(kind_of[e["study_uid"]], e["reason"]) for e in queue]

        # 4. the queue's head annotated; v2 from all eight labels
        annotate([by_uid[u] for u in top])
        m2 = train(FIRST + len(variants), "0.1.r2")
        v1_val, v2_val = m1["validation"]["mean_dice"], m2["validation"]["mean_dice"]
        assert v1_val is not None and v2_val is not None  # each run's own validation, stored with the version
        d1 = held_out_dice(models / "0.1.r1", held_out, cfg.labels)
        d2 = held_out_dice(models / "0.1.r2", held_out, cfg.labels)
        n1 = held_out_dice(models / "0.1.r1", [normal], cfg.labels)
        n2 = held_out_dice(models / "0.1.r2", [normal], cfg.labels)
        print(f"validation mean Dice v1 {v1_val:.3f} ({len(m1['validation']['per_case'])} normal case(s)), "
              f"v2 {v2_val:.3f} ({len(m2['validation']['per_case'])} case(s)); held-out variants v1 {d1:.3f} "
              f"v2 {d2:.3f}; held-out normal v1 {n1:.3f} v2 {n2:.3f}")
        # v2 carried on from v1 (init_from: previous), and its record says so
        assert m1["training"]["init_from"] is None
        assert m2["training"]["init_from"]["checkpoint"].endswith("/work/tiny/best.pt")
        assert json.loads((models / "0.1.r2" / "version.json").read_text())["fine_tuned_from"]["version"] == "0.1.r1"
        # The loop improved the model: v2's validation Dice beats v1's (the words; different cases) ...
        assert v2_val > v1_val, (v1_val, v2_val)
        # ... and on common ground, the variants neither saw (measured: v1 0.844, v2 0.923), without losing
        # the normal chest v1 knew (a margin for the few steps' noise)
        assert d2 > d1 > 0.6, (d1, d2)
        assert n2 > n1 - 0.03, (n1, n2)

        # 5. v2 in shadow: on the next study its result is kept, never delivered, and the agreement shown
        assert node.api("POST", "/api/models/tiny/versions/0.1.r2/shadow").status_code == 200
        shadowed = held_out[0]
        assert storescu(node.dicom_port, shadowed.dicom_dir).returncode == 0
        jobs = wait_for(lambda: _jobs_done(node, shadowed.study_uid, 2), 120, "active and shadow jobs", interval=1)
        assert all(j["status"] == "done" for j in jobs), [j["error"] for j in jobs]
        shadow = next(j for j in jobs if j["shadow"])
        active = next(j for j in jobs if not j["shadow"])
        assert (active["model_version"], shadow["model_version"]) == ("0.1.r1", "0.1.r2")
        assert shadow["results"] and all(r["deliveries"] == {} for r in shadow["results"])
        wait_for(lambda: _delivered(node, shadowed.study_uid), 60, "the active result delivered")
        with node.orthanc() as c:
            archived = {i["MainDicomTags"]["SOPInstanceUID"] for i in c.post("/tools/find", json={
                "Level": "Instance", "Query": {"StudyInstanceUID": shadowed.study_uid}, "Expand": True}).json()}
        assert not {r["sop_instance_uid"] for r in shadow["results"]} & archived

        def agreement():
            summary = node.api("GET", "/api/models/tiny").json()["shadow_agreement"].get("0.1.r2", {})
            return summary if summary.get("cases") == 1 else None

        summary = wait_for(agreement, 30, "the shadow agreement")
        assert set(summary["labels"]) == {"Lungs"}
        assert all(0.0 <= lab["mean_dice"] <= 1.0 for lab in summary["labels"].values())

        # 6. v2 promoted: the next study is segmented by v2, and its SEG says so
        assert node.api("POST", "/api/models/tiny/versions/0.1.r2/promote").status_code == 200
        last = held_out[1]
        assert storescu(node.dicom_port, last.dicom_dir).returncode == 0
        (job,) = wait_for(lambda: _delivered(node, last.study_uid), 120, "the last study delivered", interval=1)
        assert _model_event(job)["version"] == "0.1.r2"
        seg = _seg_from_orthanc(node, next(r["sop_instance_uid"] for r in job["results"] if r["modality"] == "SEG"))
        assert seg.SeriesDescription.startswith("AI: tiny 0.1.r2")
        # the project remembers who labelled what, from which prediction
        final = node.api("GET", "/api/projects/lungs").json()
        assert final["counts"]["labeled"] == FIRST + len(variants)
        for uid in top:
            (label,) = final["cases"][uid]["labels"]
            assert label["by"] == "annotator alice" and label["from_prediction"]["model_version"] == "0.1.r1"
