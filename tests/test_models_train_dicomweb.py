"""The DICOMweb training source against a real managed Orthanc (and the node's own gateway).

Two tiny phantom CTs are annotated with SEGs made from their ground truth by the project's SEG
encoder, as an OHIF workflow would leave them in the archive, plus one SEG that is not an
annotation for the model (liver only, like another model's output).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from node.archive.orthanc import ManagedOrthanc
from node.config import load_settings
from node.encoders.context import EncodeContext
from node.encoders.seg import encode_seg
from node.models.card import CardError, load_card
from node.models.data import dicom_seg_cases, read_phantom
from node.models.dicomweb_source import dicomweb_cases
from node.models.inference import resample
from node.models.train import build_network, train
from node.models.train_config import DicomwebSource, TrainConfig, load_train_config
from node.phantom.ct import generate_ct
from node.results import Code, LabelMap, Segment
from node.volume import load_series
from tests.iod import assert_valid_iod
from tests.nodeproc import free_port, running_node
from tests.test_models_train import TINY_PHANTOM, tiny_config

ANAT = Code("91723000", "SCT", "Anatomical Structure")
# phantom label value → (segment label as an annotator types it, SNOMED type)
ANNOTATED = {4: ("lung_left", Code("44029006", "SCT", "Left lung")),
             5: ("lung_right", Code("3341006", "SCT", "Right lung")),
             7: ("heart_wall", Code("80891009", "SCT", "Heart")),
             8: ("heart_blood", Code("80891009", "SCT", "Heart"))}
NOT_FOR_THIS_MODEL = {10: ("liver", Code("10200004", "SCT", "Liver"))}
SEEDS = (500, 501)
PASSWORD_ENV = "HILUM_TEST_ARCHIVE_PASSWORD"


@dataclass
class Archive:
    orthanc: ManagedOrthanc
    folder: Path  # the same series + annotation SEGs as files, for the folder source
    studies: dict[int, object]  # seed → PhantomStudy
    seg_uids: dict[int, str]  # seed → SOP Instance UID of its annotation SEG
    distractor_uid: str
    password_file: Path

    @property
    def url(self) -> str:
        return self.orthanc.endpoint.dicomweb_url

    def spec(self, **changes) -> dict:
        return {"url": self.url, "auth": {"username": self.orthanc.endpoint.username,
                                          "password_file": str(self.password_file)}, **changes}


def encode_annotation(study, structures: dict, out: Path, series_number: int) -> tuple[Path, str]:
    """A SEG of ``structures`` drawn from the phantom's truth, written to ``out`` and checked with dciodvfy."""
    series = load_series(study.series_files())
    raw, raw_geometry = study.label_volume()
    truth = resample(raw, raw_geometry, series.volume.geometry, linear=False)
    labels = np.where(np.isin(truth, list(structures)), truth, 0).astype(np.uint8)
    segments = tuple(Segment(v, name, ANAT, code) for v, (name, code) in structures.items())
    labelmap = LabelMap(series.series_uid, series.volume.geometry, labels, segments, description="Annotation")
    ctx = EncodeContext(job_key=f"annotation-{study.study_uid}-{series_number}", rule="ohif", handler="annotator",
                        handler_version="1")
    ds, _ = encode_seg(labelmap, {series.series_uid: series}, ctx, series_number=series_number)
    ds.save_as(out, enforce_file_format=True)
    assert_valid_iod(out)
    return out, str(ds.SOPInstanceUID)


def upload(orthanc: ManagedOrthanc, files) -> None:
    with orthanc.endpoint.client() as c:
        for f in files:
            r = c.post("/instances", content=Path(f).read_bytes(), headers={"Content-Type": "application/dicom"})
            assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicomweb")
    settings = load_settings(data_dir=root / "data", orthanc_http_port=free_port())
    settings.data_dir.mkdir(parents=True)
    orthanc = ManagedOrthanc(settings)
    orthanc.start()
    try:
        folder, extra = root / "annotated", root / "extra"
        extra.mkdir()
        studies, seg_uids = {}, {}
        for seed in SEEDS:
            study = generate_ct(root / f"phantom-{seed}", seed=seed, **TINY_PHANTOM)
            studies[seed] = study
            (folder / str(seed)).mkdir(parents=True)
            for f in study.series_files():
                shutil.copy(f, folder / str(seed) / f.name)
            path, seg_uids[seed] = encode_annotation(study, ANNOTATED, folder / f"{seed}.dcm", 50)
            upload(orthanc, [*study.series_files(), path])
        path, distractor = encode_annotation(studies[SEEDS[0]], NOT_FOR_THIS_MODEL, extra / "liver.dcm", 9001)
        upload(orthanc, [path])
        password_file = root / "archive-password"
        password_file.write_text(orthanc.endpoint.password + "\n")
        password_file.chmod(0o600)
        yield Archive(orthanc, folder, studies, seg_uids, distractor, password_file)
    finally:
        orthanc.stop()


def labels_of(tmp_path):
    return TrainConfig.model_validate(tiny_config(tmp_path)).labels


def test_dicomweb_cases_equal_the_folder_cases_voxel_for_voxel(archive, tmp_path, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, archive.orthanc.endpoint.password)
    spec = DicomwebSource.model_validate({"url": archive.url, "auth": {
        "username": archive.orthanc.endpoint.username, "password_env": PASSWORD_ENV}})
    labels = labels_of(tmp_path)
    lines: list[str] = []
    work = tmp_path / "work"
    web = {c.name: c for c in dicomweb_cases(spec, labels, work, lines.append)}
    folder = {c.name: c for c in dicom_seg_cases(archive.folder, labels)}
    assert set(web) == {f"seg-{archive.seg_uids[s]}" for s in SEEDS}
    assert set(folder) == {f"seg-{s}" for s in SEEDS}
    for seed in SEEDS:
        a, b = web[f"seg-{archive.seg_uids[seed]}"], folder[f"seg-{seed}"]
        assert a.volumes[0].geometry == b.volumes[0].geometry
        assert a.volumes[0].array.dtype == b.volumes[0].array.dtype
        assert np.array_equal(a.volumes[0].array, b.volumes[0].array)
        assert np.array_equal(a.truth, b.truth)
        # and both are the phantom's ground truth, mapped onto the model's labels
        truth = read_phantom(archive.studies[seed], labels, name="truth").truth
        assert np.array_equal(a.truth, truth) and set(np.unique(truth)) == {0, 1, 2}
    # the liver-only SEG is not silently dropped: logged with its reason, and counted
    assert any(archive.distractor_uid in line and "has no segment for ['Left lung', 'Heart']" in line
               for line in lines), lines
    assert "DICOMweb: 2 SEG(s) used, 1 skipped" in lines
    assert not (work / "dicomweb").exists()  # retrieved files are gone once read


def test_two_epochs_from_dicomweb_deploy_a_valid_model(archive, tmp_path):
    raw = tiny_config(tmp_path)
    studies = [archive.studies[s].study_uid for s in SEEDS]
    raw["data"] = {"dicomweb": archive.spec(study_uids=studies), "validation_split": 0.5}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_train_config(path)
    lines: list[str] = []
    out = train(cfg, path.read_text(), log=lines.append)
    assert sum(line.startswith("epoch ") for line in lines) == 2
    assert any("1 skipped" in line for line in lines)
    card = load_card(out)
    assert card.validation.cases == 1 and "DICOMweb SEG" in card.validation.dataset
    assert set(card.validation.dice) == {"Left lung", "Heart"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["onnx_check"]["argmax_agreement"] >= 0.999
    assert metrics["onnx_check"]["max_relative_logit_difference"] <= 5e-3
    assert sorted(metrics["training"]["train_cases"] + list(metrics["validation"]["per_case"])) == sorted(
        f"seg-{archive.seg_uids[s]}" for s in SEEDS)
    # ONNX and torch agree on a grid size the export never saw
    net = build_network(cfg)
    net.load_state_dict(torch.load(tmp_path / "work" / "tiny" / "best.pt")["model"])
    net.eval()
    x = np.random.default_rng(2).normal(size=(1, 1, 18, 26, 40)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    # nothing but the model in its folder; in the work folder the checkpoints and the training record the
    # deploy stage reads (hilum train --stage); no secret anywhere
    assert sorted(p.name for p in out.iterdir()) == ["card.yaml", "metrics.json", "model.onnx", "train.yaml"]
    work = tmp_path / "work" / "tiny"
    assert sorted(p.name for p in work.iterdir()) == ["best.pt", "last.pt", "training.json"]
    password = archive.orthanc.endpoint.password.encode()
    assert not any(password in p.read_bytes() for p in [*out.iterdir(), *work.iterdir()])


def test_study_and_query_filters(archive, tmp_path):
    labels = labels_of(tmp_path)
    s500, s501 = (archive.studies[s].study_uid for s in SEEDS)

    def names(**changes) -> tuple[set[str], list[str]]:
        lines: list[str] = []
        cases = dicomweb_cases(DicomwebSource.model_validate(archive.spec(**changes)), labels, tmp_path, lines.append)
        return {c.name for c in cases}, lines

    only_501 = {f"seg-{archive.seg_uids[501]}"}
    both = {f"seg-{archive.seg_uids[s]}" for s in SEEDS}
    assert names(query={"PatientID": "PHANTOM-000501"})[0] == only_501
    assert names(query={"PatientID": "*501"})[0] == only_501  # a wildcard reaches Orthanc unescaped
    assert names(query={"PatientName": "PHANTOM?CHEST", "StudyDescription": "CT?CHEST*"})[0] == both
    found, lines = names(study_uids=[s500])
    assert found == {f"seg-{archive.seg_uids[500]}"} and "DICOMweb: 1 SEG(s) used, 1 skipped" in lines
    assert names(study_uids=[s501], query={"PatientID": "PHANTOM-000501"})[0] == only_501
    with pytest.raises(CardError, match=r"data.dicomweb.study_uids: study 1.2.3.4 is not in the archive"):
        names(study_uids=[s500, "1.2.3.4"])
    with pytest.raises(CardError, match=r"data.dicomweb: no SEG instance at .* matching \{'PatientID': 'NOBODY'\}"):
        names(query={"PatientID": "NOBODY"})
    spleen = [labels[0].model_copy(update={"source": ["spleen"]})]
    with pytest.raises(CardError, match=r"none of the 3 SEG instance\(s\) .* is usable: .*has no segment for "
                                        r"\['Left lung'\]") as err:
        dicomweb_cases(DicomwebSource.model_validate(archive.spec()), spleen, tmp_path, lambda line: None)
    assert all(uid in str(err.value) for uid in [*archive.seg_uids.values(), archive.distractor_uid])


def test_credential_and_connection_errors_name_the_field(archive, tmp_path, monkeypatch):
    labels = labels_of(tmp_path)
    user = archive.orthanc.endpoint.username

    def load(**spec):
        return dicomweb_cases(DicomwebSource.model_validate(spec), labels, tmp_path, lambda line: None)

    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    with pytest.raises(CardError, match=r"data.dicomweb.auth: .* refused the credentials \(HTTP 401\)"):
        load(url=archive.url, auth={"username": user, "password_env": PASSWORD_ENV})
    with pytest.raises(CardError, match=r"data.dicomweb.auth: .* refused the credentials \(HTTP 401\)"):
        load(url=archive.url)  # no auth at all
    with pytest.raises(CardError, match=r"data.dicomweb.auth: .* refused the credentials \(HTTP 401\)"):
        load(url=archive.url, auth={"token_file": str(archive.password_file)})  # Orthanc takes no bearer token
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(CardError, match=rf"data.dicomweb.auth.password_env: environment variable {PASSWORD_ENV} "
                                        "is not set"):
        load(url=archive.url, auth={"username": user, "password_env": PASSWORD_ENV})
    with pytest.raises(CardError, match=r"data.dicomweb.auth.password_file: cannot read .*missing: No such file"):
        load(url=archive.url, auth={"username": user, "password_file": str(tmp_path / "missing")})
    with pytest.raises(CardError, match=r"data.dicomweb.url: cannot reach http://127.0.0.1:\d+/dicom-web"):
        load(url=f"http://127.0.0.1:{free_port()}/dicom-web", timeout_s=5)


def test_a_seg_whose_series_is_missing_is_an_error_naming_it(archive, tmp_path, monkeypatch):
    settings = load_settings(data_dir=tmp_path / "data", orthanc_http_port=free_port())
    settings.data_dir.mkdir(parents=True)
    orthanc = ManagedOrthanc(settings)
    orthanc.start()
    try:
        upload(orthanc, [archive.folder / "500.dcm"])  # the annotation without its CT
        spec = DicomwebSource.model_validate({"url": orthanc.endpoint.dicomweb_url, "auth": {
            "username": orthanc.endpoint.username, "password_env": "ORTHANC_PW"}})
        monkeypatch.setenv("ORTHANC_PW", orthanc.endpoint.password)
        with pytest.raises(CardError) as err:
            dicomweb_cases(spec, labels_of(tmp_path), tmp_path / "work", lambda line: None)
    finally:
        orthanc.stop()
    assert str(err.value).startswith(f"data.dicomweb: SEG {archive.seg_uids[500]} ")
    assert f"references series {archive.studies[500].series_uid}, which the archive" in str(err.value)
    assert not (tmp_path / "work" / "dicomweb").exists()


def test_bearer_token_through_the_nodes_gateway(archive, tmp_path, monkeypatch):
    from tests.web_support import stow

    rules = tmp_path / "rules"
    rules.mkdir()
    with running_node(tmp_path / "node", rules) as node:
        study = archive.studies[501]
        r = stow(node, [*study.series_files(), archive.folder / "501.dcm"])
        assert r.status_code == 200, r.text
        monkeypatch.setenv("HILUM_TOKEN", node.token)
        spec = DicomwebSource.model_validate({"url": node.web + "/dicom-web", "auth": {"token_env": "HILUM_TOKEN"}})
        cases = dicomweb_cases(spec, labels_of(tmp_path), tmp_path / "work", lambda line: None)
        monkeypatch.setenv("HILUM_TOKEN", "hlm_not-a-token")
        with pytest.raises(CardError, match=r"data.dicomweb.auth: .* refused the credentials \(HTTP 401\)"):
            dicomweb_cases(spec, labels_of(tmp_path), tmp_path / "work", lambda line: None)
    assert [c.name for c in cases] == [f"seg-{archive.seg_uids[501]}"]
    truth = read_phantom(study, labels_of(tmp_path), name="truth").truth
    assert np.array_equal(cases[0].truth, truth)


def _config_error(tmp_path, dicomweb: dict, extra: dict | None = None) -> str:
    raw = tiny_config(tmp_path)
    raw["data"] = {"dicomweb": dicomweb, **(extra or {})}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(CardError) as err:
        load_train_config(path)
    assert str(err.value).startswith(f"{path}: ")
    return str(err.value)


URL = "http://127.0.0.1:8042/dicom-web"
CONFIG_ERRORS = [
    ({"url": URL, "auth": {"username": "u", "password": "s3cret"}},
     "data.dicomweb.auth: password: a secret is never written in the config; name the environment variable "
     "(password_env) or the file (password_file) that holds it"),
    ({"url": URL, "auth": {"token": "hlm_abc"}}, "data.dicomweb.auth: token: a secret is never written in the config"),
    ({"url": "http://u:s3cret@127.0.0.1:8042/dicom-web"},
     "data.dicomweb.url: credentials in the URL are a secret written in the config"),
    ({"url": "ftp://archive/dicom-web"}, "data.dicomweb.url: 'ftp://archive/dicom-web' is not an http(s) URL"),
    ({"url": URL + "?PatientID=x"}, "data.dicomweb.url: the DICOMweb root takes no query"),
    ({"auth": {"token_env": "T"}}, "data.dicomweb.url: Field required"),
    ({"url": URL, "auth": {"password_env": "P"}}, "data.dicomweb.auth: username: HTTP basic authentication"),
    ({"url": URL, "auth": {"username": "u"}}, "data.dicomweb.auth: give exactly one of password_env"),
    ({"url": URL, "auth": {"username": "u", "password_env": "P", "token_env": "T"}},
     "got ['password_env', 'token_env']"),
    ({"url": URL, "auth": {"username": "u", "token_file": "t"}}, "username: goes with password_env"),
    ({"url": URL, "query": {"PatientsName": "X*"}}, "data.dicomweb.query: ['PatientsName'] are not DICOM keywords"),
    ({"url": URL, "query": {"Modality": "CT"}}, "data.dicomweb.query: Modality: the source searches Modality=SEG"),
    ({"url": URL, "query": {"StudyInstanceUID": "1.2"}}, "StudyInstanceUID: list studies in study_uids"),
    ({"url": URL, "study_uids": ["1.2.3", "1.02"]}, "data.dicomweb.study_uids: ['1.02'] are not DICOM UIDs"),
    ({"url": URL, "timeout_s": 0}, "data.dicomweb.timeout_s: Input should be greater than 0"),
    ({"url": URL, "cache": True}, "data.dicomweb.cache: Extra inputs are not permitted"),
]


@pytest.mark.parametrize("dicomweb,text", CONFIG_ERRORS, ids=[t[:50] for _, t in CONFIG_ERRORS])
def test_bad_dicomweb_config_names_the_field(tmp_path, dicomweb, text):
    assert text in _config_error(tmp_path, dicomweb)


def test_one_data_source_only(tmp_path):
    both = _config_error(tmp_path, {"url": URL}, {"dicom_seg": str(tmp_path)})
    assert "give exactly one data source: phantom, family, dicom_seg or dicomweb" in both


def test_a_valid_dicomweb_config_round_trips(tmp_path):
    raw = tiny_config(tmp_path)
    raw["data"] = {"dicomweb": {"url": URL + "/", "auth": {"token_file": "/run/secrets/hilum-token"},
                                "study_uids": ["1.2.3"], "query": {"PatientID": "PHANTOM*"}}}
    cfg = TrainConfig.model_validate(raw)
    assert cfg.data.dicomweb.url == URL and cfg.data.source_name == f"DICOMweb {URL}"
    assert TrainConfig.model_validate(cfg.model_dump(mode="json")) == cfg
