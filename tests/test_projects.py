"""Learning-loop projects: creation from a card and a training config, case states with label versions,
and the checks that decide whether a saved SEG is a case's label (real SEGs made with highdicom)."""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.sr.codedict import codes

from node.cli import main
from node.models.train_config import TrainConfig
from node.phantom import generate_ct
from node.projects.labels import LabelRefused, check_seg
from node.projects.store import ProjectError, ProjectStore
from node.volume import load_series
from tests.test_models_inference import threshold_model
from tests.test_models_train import TINY_PHANTOM, tiny_config


def _model_and_config(tmp_path: Path) -> tuple[Path, Path]:
    raw = tiny_config(tmp_path)
    cfg = TrainConfig.model_validate(raw)
    card_dir = tmp_path / "model" / "tiny"
    card_dir.mkdir(parents=True)
    threshold_model(card_dir / "model.onnx", channels_out=3)
    (card_dir / "card.yaml").write_text(yaml.safe_dump(cfg.card_draft().model_dump(mode="json", exclude_none=True)))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(raw))
    return card_dir / "card.yaml", tmp_path / "train.yaml"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return generate_ct(tmp_path_factory.mktemp("ct") / "study", seed=5, **TINY_PHANTOM)


def _seg(study, segments: list[tuple[str, object]], series_uid: str | None = None) -> pydicom.Dataset:
    """A SEG on the study's CT, one box-shaped segment per (label, property type)."""
    series = load_series(sorted(Path(study.dicom_dir).iterdir()))
    sources = [pydicom.dcmread(p) for p in sorted(Path(study.dicom_dir).iterdir())]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    ordered = [by_uid[str(ds.SOPInstanceUID)] for ds in series.datasets]
    mask = np.zeros((len(ordered), *series.volume.array.shape[1:], len(segments)), dtype=bool)
    for i in range(len(segments)):
        mask[4:10, 10 + 8 * i:16 + 8 * i, 10:20, i] = True
    descriptions = [hd.seg.SegmentDescription(i + 1, label, codes.SCT.AnatomicalStructure, prop,
                                              hd.seg.SegmentAlgorithmTypeValues.MANUAL)
                    for i, (label, prop) in enumerate(segments)]
    seg = hd.seg.Segmentation(
        source_images=ordered, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=50, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="OHIF", manufacturer_model_name="test", software_versions="0",
        device_serial_number="0")
    if series_uid is not None:
        seg.ReferencedSeriesSequence[0].SeriesInstanceUID = series_uid
    return seg


def test_create_from_card_and_config_and_walk_a_case_through_its_states(tmp_path, study, capsys):
    card, train = _model_and_config(tmp_path)
    data = tmp_path / "data"
    assert main(["project", "create", "lungs", "--model-card", str(card), "--train-config", str(train),
                 "--study", study.study_uid, "--study", "1.2.3.4", "--annotator", "alice",
                 "--data-dir", str(data)]) == 0
    assert "project lungs: model tiny, 2 listed case(s), labels Left lung, Heart" in capsys.readouterr().out
    store = ProjectStore.for_data_dir(data)
    project = store.get("lungs")
    assert project.may_annotate("alice", "annotator") and not project.may_annotate("bob", "annotator")
    assert project.may_annotate("carol", "admin") and not project.may_annotate("alice", "viewer")
    assert store.summary("lungs")["counts"] == {"unlabeled": 2, "predicted": 0, "in_review": 0, "labeled": 0}

    store.record_prediction("lungs", study.study_uid, job_id=7, model_version="built-in", seg_sop_uid="1.9",
                            uncertainty={"score": 0.2})
    first = store.add_label("lungs", study.study_uid, sop_uid="1.10", series_uid="1.11",
                            segments={"lung_left": 1, "Heart": 2}, by="annotator alice")
    assert first["version"] == 1 and first["from_prediction"] == {"job": 7, "model_version": "built-in",
                                                                  "seg_sop_uid": "1.9"}
    assert main(["project", "accept", "lungs", study.study_uid, "--data-dir", str(data)]) == 0
    second = store.add_label("lungs", study.study_uid, sop_uid="1.12", series_uid="1.13",
                             segments={"lung_left": 1, "Heart": 2}, by="annotator alice")
    case = store.cases("lungs")[study.study_uid]
    assert second["version"] == 2 and [v["sop_uid"] for v in case["labels"]] == ["1.10", "1.12"]  # v1 kept
    assert [h["to"] for h in case["history"]] == ["predicted", "in_review", "labeled", "in_review"]
    assert store.summary("lungs")["counts"] == {"unlabeled": 1, "predicted": 0, "in_review": 1, "labeled": 0}
    with pytest.raises(ProjectError, match="is not a case of project 'lungs'"):
        store.add_label("lungs", "1.2.999", sop_uid="1", series_uid="1", segments={}, by="x")
    assert main(["project", "accept", "lungs", "1.2.3.4", "--data-dir", str(data)]) == 1
    assert "is unlabeled, not in_review" in capsys.readouterr().err
    assert main(["project", "show", "lungs", "--data-dir", str(data)]) == 0
    assert json.loads(capsys.readouterr().out)["project"]["annotators"] == ["alice"]


def test_creation_errors_name_the_option(tmp_path):
    card, train = _model_and_config(tmp_path)
    store = ProjectStore(tmp_path / "projects")
    other = yaml.safe_load(train.read_text())
    other["name"] = "other"
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ProjectError, match="--train-config: name 'other' differs from the model card's 'tiny'"):
        store.create("p", model_card=card, train_config=tmp_path / "other.yaml", study_uids=["1.2"], annotators=[],
                     by="t")
    other = yaml.safe_load(train.read_text())
    other["epochs"] = 3
    other["patience"] = 2  # belongs under early_stopping
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ProjectError, match="--train-config: .*patience: Extra inputs are not permitted"):
        store.create("p", model_card=card, train_config=tmp_path / "bad.yaml", study_uids=["1.2"], annotators=[],
                     by="t")
    with pytest.raises(ProjectError, match=r"study_uids: .*\['1\.02'\] are not DICOM UIDs"):
        store.create("p", model_card=card, train_config=train, study_uids=["1.02"], annotators=[], by="t")
    store.create("p", model_card=card, train_config=train, study_uids=["1.2"], annotators=[], by="t")
    with pytest.raises(ProjectError, match="exists already"):
        store.create("p", model_card=card, train_config=train, study_uids=["1.2"], annotators=[], by="t")


def test_a_seg_is_a_label_only_for_its_case_series_and_labels(tmp_path, study):
    card, train = _model_and_config(tmp_path)
    store = ProjectStore(tmp_path / "projects")
    project = store.create("lungs", model_card=card, train_config=train, study_uids=[study.study_uid],
                           annotators=["alice"], by="t")
    inputs = [study.series_uid]
    # the annotator typed the data name for one, the heart found by its SNOMED meaning
    good = _seg(study, [("lung_left", codes.SCT.Lung), ("Cardiac", codes.SCT.Heart)])
    assert check_seg(project, good, study.study_uid, inputs) == {"lung_left": 1, "Cardiac": 2}

    def refused(ds, text, study_uid=study.study_uid, series=inputs):
        with pytest.raises(LabelRefused) as err:
            check_seg(project, ds, study_uid, series)
        assert text in str(err.value), str(err.value)

    refused(_seg(study, [("lung_left", codes.SCT.Lung), ("Cardiac", codes.SCT.Heart)], series_uid="1.2.3.99"),
            "drawn on series 1.2.3.99, not on the case's input series")
    refused(_seg(study, [("lung_left", codes.SCT.Lung), ("Tumour", codes.SCT.Neoplasm)]),
            "unknown segment labels ['Tumour']")
    refused(_seg(study, [("lung_left", codes.SCT.Lung)]), "no segment for ['Heart']")
    refused(good, "is not a case of project 'lungs'", study_uid="1.2.3")
    ct = pydicom.dcmread(next(Path(study.dicom_dir).iterdir()))
    refused(ct, "Modality is 'CT', not SEG")


def _wait_status(run: Path, timeout: float = 300) -> dict:
    import time

    from node.projects.trainrun import run_status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run_status(run)
        if status["state"] != "running":
            return status
        time.sleep(1)
    raise AssertionError(f"run {run} still running after {timeout} s")


@pytest.mark.slow
def test_training_runs_in_its_own_process_and_registers_a_candidate(tmp_path):
    from node.models.versions import ModelRegistry
    from node.projects.trainrun import start_run

    card, train = _model_and_config(tmp_path)
    raw = yaml.safe_load(train.read_text())
    train.write_text(yaml.safe_dump({**raw, "init_from": "previous"}))  # each run carries on from the last one
    store = ProjectStore(tmp_path / "data" / "projects")
    store.create("lungs", model_card=card, train_config=train, study_uids=["1.2.3"], annotators=[], by="t")
    runs = store.root / "lungs" / "runs"
    run_id = start_run(store.root / "lungs", tmp_path / "data", memory_mb=6144, by="admin ada")
    status = _wait_status(runs / run_id)
    assert status["state"] == "done", status
    assert [e["epoch"] for e in status["epochs"]] == [1, 2] and status["epochs"][-1]["val_mean_dice"] is not None
    registry = ModelRegistry.for_data_dir(tmp_path / "data", tmp_path / "none")
    (info,) = registry.versions("tiny")
    assert (info.version, info.state, status["version"]) == ("0.1.r1", "candidate", "0.1.r1")
    assert info.registered_by == f"training run {run_id} (admin ada)"
    # the first run had nothing to carry on from: a fresh start, and its record says so
    assert "init_from" not in yaml.safe_load((runs / run_id / "train.yaml").read_text())
    first = json.loads((registry.root / "tiny" / "0.1.r1" / "metrics.json").read_text())["training"]
    assert first["init_from"] is None

    # a run that outgrows its memory cap fails with the reason; the caller is untouched
    failed = _wait_status(runs / start_run(store.root / "lungs", tmp_path / "data", memory_mb=400, by="admin ada"))
    assert failed["state"] == "failed" and failed["error"].startswith("out of memory (run capped at 400 MB)"), failed

    # the next run starts from the latest *finished* run's best epoch (the failed one has none)
    third = start_run(store.root / "lungs", tmp_path / "data", memory_mb=6144, by="admin ada")
    assert _wait_status(runs / third)["state"] == "done"
    checkpoint = str(runs / run_id / "work" / "tiny" / "best.pt")
    assert yaml.safe_load((runs / third / "train.yaml").read_text())["init_from"] == checkpoint
    v3 = registry.root / "tiny" / "0.1.r3"
    assert json.loads((v3 / "metrics.json").read_text())["training"]["init_from"] == {
        "checkpoint": checkpoint, "epoch": first["best_epoch"]}
    assert json.loads((v3 / "version.json").read_text())["fine_tuned_from"] == {
        "run": run_id, "version": "0.1.r1", "checkpoint": checkpoint}


def _runnable_project(tmp_path: Path) -> Path:
    card, train = _model_and_config(tmp_path)
    store = ProjectStore(tmp_path / "data" / "projects")
    store.create("lungs", model_card=card, train_config=train, study_uids=["1.2.3"], annotators=[], by="t")
    return store.root / "lungs"


def test_a_run_being_started_is_running_not_failed(tmp_path, monkeypatch):
    """run.json is written before the process starts (the process reads it) and gets the pid after: a poll
    in between sees the run running; one whose process never came (the web process died) fails in time."""
    from node.projects import trainrun

    project = _runnable_project(tmp_path)
    seen = []

    def popen(args: list[str], **kwargs) -> SimpleNamespace:
        seen.append(trainrun.run_status(Path(args[-1]))["state"])
        return SimpleNamespace(pid=os.getpid())

    monkeypatch.setattr(trainrun.subprocess, "Popen", popen)
    run = project / "runs" / trainrun.start_run(project, tmp_path / "data", memory_mb=400, by="t")
    assert seen == ["running"]
    assert trainrun.run_status(run)["state"] == "running"
    meta = json.loads((run / "run.json").read_text())
    del meta["pid"]
    meta["started_at"] -= trainrun.STARTING_S + 1
    (run / "run.json").write_text(json.dumps(meta))
    status = trainrun.run_status(run)
    assert status["state"] == "failed" and "ended without a result" in status["error"], status


def test_a_run_whose_process_cannot_start_is_failed_at_once(tmp_path, monkeypatch):
    from node.projects import trainrun

    project = _runnable_project(tmp_path)

    def popen(args: list[str], **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(trainrun.subprocess, "Popen", popen)
    with pytest.raises(trainrun.RunNotStarted, match="could not be started: .*Cannot allocate memory"):
        trainrun.start_run(project, tmp_path / "data", memory_mb=400, by="t")
    [run] = (project / "runs").glob("*-1")
    status = trainrun.run_status(run)
    assert status["state"] == "failed" and "could not be started: [Errno 12] Cannot allocate memory" in status["error"]


def test_a_progress_line_being_written_or_torn_by_a_kill_is_not_read(tmp_path, monkeypatch):
    """The run appends progress.jsonl while the node reads it (every dashboard poll): a line half written,
    or cut by a kill, is skipped; before, it made the runs list and the dashboard answer 500."""
    from node.projects import trainrun

    project = _runnable_project(tmp_path)
    monkeypatch.setattr(trainrun.subprocess, "Popen", lambda args, **kwargs: SimpleNamespace(pid=os.getpid()))
    run = project / "runs" / trainrun.start_run(project, tmp_path / "data", memory_mb=400, by="t")
    epoch = json.dumps({"at": 1.0, "msg": "epoch 1/3 loss 0.5000 val Dice 0.700"})
    (run / "progress.jsonl").write_text(epoch + "\n" + '{"at": 2.0, "msg": "epoch 2/3 lo\n' + epoch[:20])
    status = trainrun.run_status(run)
    assert status["state"] == "running"
    assert status["epochs"] == [{"epoch": 1, "of": 3, "loss": 0.5, "val_mean_dice": 0.7}]
    assert status["log_tail"] == ["epoch 1/3 loss 0.5000 val Dice 0.700"]


def test_runs_started_at_once_get_their_own_numbers(tmp_path, monkeypatch):
    """Two starts at once (a double click on Train; the endpoint runs in a thread pool) are two runs with
    their own numbers and model versions, not a FileExistsError or one version twice."""
    from node.projects import trainrun

    project = _runnable_project(tmp_path)
    monkeypatch.setattr(trainrun.subprocess, "Popen", lambda args, **kwargs: SimpleNamespace(pid=os.getpid()))
    load = yaml.safe_load

    def slow_load(text: str) -> dict:  # both starts read the configuration at the same time
        time.sleep(0.5)
        return load(text)

    monkeypatch.setattr(yaml, "safe_load", slow_load)
    with ThreadPoolExecutor(2) as pool:
        ids = list(pool.map(lambda _: trainrun.start_run(project, tmp_path / "data", memory_mb=400, by="t"), range(2)))
    versions = sorted(json.loads((project / "runs" / i / "run.json").read_text())["version"] for i in ids)
    assert versions == ["0.1.r1", "0.1.r2"]


def test_gateway_intake_finds_project_segs_in_a_stow_body_and_passes_the_rest(tmp_path, study):
    from io import BytesIO

    from node.projects.intake import multipart_parts, seg_parts, vet

    card, train = _model_and_config(tmp_path)
    store = ProjectStore(tmp_path / "projects")
    store.create("lungs", model_card=card, train_config=train, study_uids=[study.study_uid], annotators=["alice"],
                 by="t")

    def part(ds) -> bytes:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    seg = _seg(study, [("lung_left", codes.SCT.Lung), ("Heart", codes.SCT.Heart)])
    elsewhere = _seg(study, [("Tumour", codes.SCT.Neoplasm)])
    elsewhere.StudyInstanceUID = "1.2.3.4.5"  # a SEG of a study in no project
    ct = next(Path(study.dicom_dir).iterdir()).read_bytes()
    body = b"".join(b"--b0\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in (ct, part(elsewhere), part(seg))) + b"--b0--\r\n"
    parts = multipart_parts(body, 'multipart/related; type="application/dicom"; boundary=b0')
    assert len(parts) == 3 and parts[0] == ct  # bodies exact: no CRLF of the framing kept
    segs = seg_parts(parts)
    assert [str(ds.SOPInstanceUID) for ds in segs] == [str(elsewhere.SOPInstanceUID), str(seg.SOPInstanceUID)]
    (label,) = vet(store, segs, "alice", "annotator", lambda project, uid: [study.series_uid])
    assert (label.study_uid, label.sop_uid, label.segments) == (study.study_uid, str(seg.SOPInstanceUID),
                                                                {"lung_left": 1, "Heart": 2})
    assert vet(store, segs[:1], "bob", "annotator", lambda project, uid: []) == []  # no project: untouched
    with pytest.raises(PermissionError, match="annotator bob is not an annotator of project 'lungs'"):
        vet(store, segs, "bob", "annotator", lambda project, uid: [study.series_uid])
