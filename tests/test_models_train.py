"""The training pipeline: config validation, data sources, and a two-epoch smoke run to a deployable model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from node.handler_api import HandlerInput
from node.models.card import CardError, load_card
from node.models.data import dicom_seg_cases, phantom_cases
from node.models.registry import model_handler
from node.models.train import augment, build_network, dice_ce_loss, train
from node.models.train_config import AugmentSpec, TrainConfig, load_train_config
from node.results import LabelMap
from node.volume import SeriesData, load_series

ANAT = {"value": "91723000", "meaning": "Anatomical Structure"}
TINY_PHANTOM = {"rows": 48, "cols": 48, "slices": 24, "pixel_spacing": 7.5, "slice_thickness": 10.0, "nodules": 0}


def tiny_config(tmp_path: Path) -> dict:
    return {
        "name": "tiny", "version": "0.1", "description": "smoke test model", "intended_use": "tests",
        "limitations": ["two epochs on tiny phantoms"], "training_data": "synthetic phantoms only",
        "seed": 3,
        "data": {"phantom": {"count": 3, "seed": 500, **TINY_PHANTOM, "vary": {"contrast": [False, True]}},
                 "validation_split": 0.34, "cache_dir": str(tmp_path / "phantoms")},
        "labels": [
            {"value": 1, "name": "Left lung", "source": ["lung_left"], "category": ANAT,
             "type": {"value": "44029006", "meaning": "Left lung"}, "tg263": "Lung_L", "color": [128, 174, 128]},
            {"value": 2, "name": "Heart", "source": ["heart_wall", "heart_blood"], "category": ANAT,
             "type": {"value": "80891009", "meaning": "Heart"}, "tg263": "Heart", "color": [206, 110, 84]},
        ],
        "input": {"modality": "CT", "body_region": "CHEST", "target_spacing": [8.0, 8.0, 8.0]},
        "preprocessing": {"kind": "ct_window", "clip": [-1000, 1000], "mean": -200, "std": 500},
        "network": {"base_channels": 4, "depth": 2},
        "batch_size": 2, "patch_size": [16, 32, 32], "epochs": 2, "steps_per_epoch": 2,
        "inference": {"patch_size": [16, 32, 32], "overlap": 0.25},
        "emit": ["SEG", "SR"],
        "output_dir": str(tmp_path / "models"), "work_dir": str(tmp_path / "work"), "threads": 1,
    }


def test_two_epoch_smoke_run_deploys_a_valid_model(tmp_path):
    cfg = TrainConfig.model_validate(tiny_config(tmp_path))
    lines: list[str] = []
    out = train(cfg, log=lines.append)
    assert out == tmp_path / "models" / "tiny"
    assert sum(line.startswith("epoch ") for line in lines) == 2 and any("val Dice" in line for line in lines)
    card = load_card(out)  # written card validates
    assert card.validation is not None and set(card.validation.dice) == {"Left lung", "Heart"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["validation"]["dice"]) == {"Left lung", "Heart"} and metrics["training"]["epochs_run"] == 2
    assert metrics["onnx_check"]["argmax_agreement"] >= 0.999
    assert TrainConfig.model_validate(yaml.safe_load((out / "train.yaml").read_text())) == cfg
    assert (tmp_path / "work" / "tiny" / "best.pt").is_file() and (tmp_path / "work" / "tiny" / "last.pt").is_file()

    # ONNX and torch agree on a grid size the export never saw (dynamic spatial axes)
    net = build_network(cfg)
    net.load_state_dict(torch.load(tmp_path / "work" / "tiny" / "best.pt")["model"])
    net.eval()
    x = np.random.default_rng(1).normal(size=(1, 1, 18, 26, 40)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert got.shape == (1, 3, 18, 26, 40)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())

    # and the deployed folder is directly a handler
    case = phantom_cases(cfg.data.phantom, cfg.labels, tmp_path / "phantoms")[0]
    series = SeriesData("1.2.3", "CT", [], case.volumes[0])
    results = model_handler("model:tiny", tmp_path / "models")({"emit": ["SEG"]}).run(
        HandlerInput("1", [series]), lambda f, m: None)
    assert isinstance(results[0], LabelMap) and results[0].geometry == case.volumes[0].geometry


def _expect_config_error(tmp_path, change, text):
    cfg = tiny_config(tmp_path)
    change(cfg)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(CardError) as err:
        load_train_config(path)
    assert str(path) in str(err.value) and text in str(err.value)


CONFIG_ERRORS = [
    (lambda c: c.update(patch_size=[15, 32, 32]), "patch_size [15, 32, 32] must be multiples of 2"),
    (lambda c: c["data"].update(dicom_seg="/tmp"), "give exactly one data source"),
    (lambda c: c["labels"][0].pop("source"), "labels.0.source: Field required"),
    (lambda c: c["labels"][1].update(value=5), "as a model card: labels: softmax models need values 1..2"),
    (lambda c: c.update(augmentation={"scale": [1.5, 1.0]}), "augmentation.scale"),
    (lambda c: c["inference"].update(activation="sigmoid"), "training produces softmax models"),
    (lambda c: c["data"]["phantom"].update(vary={"contrast": []}), "data.phantom.vary"),
    (lambda c: c.update(optimiser="adam"), "optimiser: Extra inputs are not permitted"),
]


@pytest.mark.parametrize("change,text", CONFIG_ERRORS, ids=[t for _, t in CONFIG_ERRORS])
def test_bad_training_config_names_the_field(tmp_path, change, text):
    _expect_config_error(tmp_path, change, text)


def test_data_errors_name_the_problem(tmp_path):
    cfg = TrainConfig.model_validate(tiny_config(tmp_path))
    bad_option = cfg.data.phantom.model_copy(update={"vary": {"colour": ["red"]}})
    with pytest.raises(CardError, match=r"data.phantom: .*unknown option\(s\) \['colour'\]"):
        phantom_cases(bad_option, cfg.labels, tmp_path / "p1")
    labels = [cfg.labels[0].model_copy(update={"source": ["spleen"]})]
    with pytest.raises(CardError, match=r"labels: phantom phantom-500 has no data label for \['Left lung'\]"):
        phantom_cases(cfg.data.phantom, labels, tmp_path / "p2")
    with pytest.raises(CardError, match="no DICOM SEG object"):
        dicom_seg_cases(tmp_path, cfg.labels)


def test_dicom_seg_source_reads_the_same_truth_as_the_phantom(tmp_path):
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    cfg = TrainConfig.model_validate(tiny_config(tmp_path))
    case = phantom_cases(cfg.data.phantom, cfg.labels, tmp_path / "phantoms")[0]
    study_dir = next((tmp_path / "phantoms").iterdir())
    folder = tmp_path / "annotated"
    folder.mkdir()
    sources = []
    for p in sorted((study_dir / "dicom").iterdir()):
        (folder / p.name).write_bytes(p.read_bytes())
        sources.append(pydicom.dcmread(str(p)))
    ordered = load_series(sorted(folder.iterdir())).datasets  # geometry order, like the truth array
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    sources = [by_uid[str(ds.SOPInstanceUID)] for ds in ordered]
    # segment labels as an annotator would type them; the heart matched by its SNOMED meaning instead
    descriptions = [
        hd.seg.SegmentDescription(1, "lung_left", codes.SCT.AnatomicalStructure, codes.SCT.Lung,
                                  hd.seg.SegmentAlgorithmTypeValues.MANUAL),
        hd.seg.SegmentDescription(2, "Cardiac", codes.SCT.AnatomicalStructure, codes.SCT.Heart,
                                  hd.seg.SegmentAlgorithmTypeValues.MANUAL),
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=case.truth, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=50,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Hilum", manufacturer_model_name="test",
        software_versions="0", device_serial_number="0")
    seg.save_as(folder / "seg.dcm")
    labels = [cfg.labels[0], cfg.labels[1].model_copy(update={"source": ["heart"]})]
    cases = dicom_seg_cases(folder, labels)
    assert len(cases) == 1
    assert cases[0].volumes[0].geometry == case.volumes[0].geometry
    assert np.array_equal(cases[0].truth, case.truth) and set(np.unique(case.truth)) == {0, 1, 2}
    # OHIF 3.12's SEG export (dcmjs) leaves the Pixel Measures item empty, which highdicom refuses: the
    # annotator's label is still read, the spacing taken from the source series it was drawn on.
    # It also omits SpatialLocationsPreserved: each frame is then checked to lie on the source image it names.
    ohif_like = pydicom.dcmread(folder / "seg.dcm")
    ohif_like.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence = [pydicom.Dataset()]
    for frame in ohif_like.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence[0].SourceImageSequence[0].SpatialLocationsPreserved
    ohif_like.save_as(folder / "seg.dcm")
    with pytest.raises(AttributeError, match="Pixel Measures"):
        hd.seg.Segmentation.from_dataset(pydicom.dcmread(folder / "seg.dcm"))
    (again,) = dicom_seg_cases(folder, labels)
    assert np.array_equal(again.truth, case.truth)
    moved = pydicom.dcmread(folder / "seg.dcm")
    moved.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence[0].ImagePositionPatient[2] += 0.5
    moved.save_as(folder / "moved.dcm")
    (folder / "seg.dcm").rename(tmp_path / "seg.dcm")
    with pytest.raises(CardError, match=r"moved.dcm frame 4 does not lie on its source image"):
        dicom_seg_cases(folder, labels)
    (folder / "moved.dcm").unlink()
    (tmp_path / "seg.dcm").rename(folder / "seg.dcm")
    # without its source series the SEG cannot be repaired, and the message says which object and why
    for p in folder.iterdir():
        if p.name != "seg.dcm":
            p.unlink()
    with pytest.raises(CardError, match="seg.dcm references series .* which is not in"):
        dicom_seg_cases(folder, labels)


def test_augmentation_moves_image_and_labels_together():
    rng = np.random.default_rng(0)
    x = torch.full((2, 1, 32, 48, 48), -1.0)
    y = torch.zeros((2, 32, 48, 48), dtype=torch.long)
    x[:, :, 10:22, 14:34, 20:40] = 1.0
    y[:, 10:22, 14:34, 20:40] = 1
    aug = AugmentSpec(probability=1.0, rotate_deg=20, scale=(0.8, 1.2), intensity_scale=0, intensity_shift=0,
                      noise_std=0)
    xa, ya = augment(x, y, aug, rng)
    assert xa.shape == x.shape and ya.shape == y.shape and ya.dtype == torch.long
    assert not torch.equal(ya, y)  # it did move
    inside = xa[:, 0][ya == 1]
    assert (inside > 0).float().mean() > 0.95  # labelled voxels are still the bright box
    none = AugmentSpec(probability=0.0, intensity_scale=0, intensity_shift=0, noise_std=0)
    xn, yn = augment(x, y, none, rng)
    assert torch.equal(xn, x) and torch.equal(yn, y)


def test_loss_is_lower_for_the_right_answer():
    target = torch.zeros((1, 8, 8, 8), dtype=torch.long)
    target[0, 2:6, 2:6, 2:6] = 1
    right = torch.nn.functional.one_hot(target, 2).permute(0, 4, 1, 2, 3).float() * 10
    wrong = right.flip(1)
    assert dice_ce_loss(right, target, 1, 1) < 0.01 < 1.5 < dice_ce_loss(wrong, target, 1, 1)


def family_config(tmp_path: Path) -> dict:
    cfg = tiny_config(tmp_path)
    cfg["data"] = {"family": {"count": 3, "seed": 40, "rows": [72], "slices": [24], "directions": ["HFS", "FFS"],
                              "exclude": {"habitus": ["child"]}},
                   "validation_split": 0.34, "cache_dir": str(tmp_path / "phantoms"),
                   "held_out": [{"name": "children", "count": 1, "seed": 0, "family": {"habitus": ["child"]}},
                                {"name": "generate_ct", "count": 1, "seed": 900, "phantom": TINY_PHANTOM}]}
    return cfg


def test_family_training_writes_domain_plausibility_held_out_kinds_and_measured_limitations(tmp_path):
    from node.models.data import family_seeds
    from node.phantom.family import draw_anatomy

    cfg = TrainConfig.model_validate(family_config(tmp_path))
    seeds = family_seeds(40, 3, [72], [24], exclude={"habitus": ["child"]})
    assert all(draw_anatomy(s, r, n).habitus != "child" for s, r, n in seeds)
    out = train(cfg, log=lambda line: None)
    card = load_card(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert not set(metrics["training"]["train_cases"]) & {f"family-{s}" for s, _, _ in
                                                          family_seeds(0, 1, [72], [24], only={"habitus": ["child"]})}
    # the held-out kinds are measured and recorded in both places
    assert set(card.validation.held_out_kinds) == {"children", "generate_ct"} == set(metrics["held_out_kinds"])
    for name, kind in card.validation.held_out_kinds.items():
        assert kind.cases == 1 and set(kind.dice) == {"Left lung", "Heart"}
        assert kind.dice["Heart"] == pytest.approx(metrics["held_out_kinds"][name]["dice"]["Heart"], abs=1e-4)
    # the domain spans the training data (measured by the same code the handler runs)
    d = card.validated_domain
    assert d.modality == "CT" and d.body_regions == ["CHEST"] and d.orientation.planes == ["axial"]
    assert set(d.orientation.patient_positions) <= {"HFS", "FFS"} and d.orientation.patient_positions
    assert d.pixel_spacing_mm.min < d.pixel_spacing_mm.max and set(d.intensity.percentiles) == {5, 25, 50, 75, 95}
    assert "children (never trained on)" in d.validated_on
    # plausibility from the truth, confidence floor under the validation cases
    assert set(card.plausibility.labels) == {"Left lung", "Heart"}
    assert card.plausibility.labels["Left lung"].volume_ml.min > 0
    assert card.plausibility.min_confidence <= min(metrics["validation"]["confidence"].values())
    # limitations generated from the measured numbers
    text = " ".join(card.limitations)
    assert f"Heart {card.validation.dice['Heart']:.2f}" in text and "Never trained on children" in text
    assert "Validated domain: pixel spacing" in text


def test_feet_first_case_is_the_same_anatomy_indexed_the_other_way(tmp_path):
    from node.models.data import family_case, feet_first
    from node.models.inference import resample
    from node.models.train_config import TrainLabel

    labels = [TrainLabel(**lab) for lab in tiny_config(tmp_path)["labels"]]
    hfs = family_case(tmp_path, 41, 72, 24, labels)
    ffs = feet_first(hfs)
    assert ffs.header.PatientPosition == "FFS" and hfs.header.PatientPosition == "HFS"
    assert not np.array_equal(ffs.volumes[0].array, hfs.volumes[0].array)
    back = resample(ffs.truth, ffs.volumes[0].geometry, hfs.volumes[0].geometry, linear=False)
    assert np.array_equal(back, hfs.truth)


def test_family_config_errors_name_the_field(tmp_path):
    path = tmp_path / "train.yaml"
    bad = family_config(tmp_path)
    bad["data"]["family"]["exclude"] = {"hair": ["red"]}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(CardError, match=r"data\.family\.exclude: \['hair'\] are not drawn anatomy fields"):
        load_train_config(path)
    bad = family_config(tmp_path)
    bad["data"]["held_out"][0]["phantom"] = {"rows": 32}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(CardError, match=r"data\.held_out\.0: held-out kind 'children': give exactly one of family"):
        load_train_config(path)


def test_measure_only_rewrites_the_limits_of_a_trained_model_and_refuses_other_data(tmp_path):
    from node.models.train import measure_only

    cfg = TrainConfig.model_validate(tiny_config(tmp_path))
    out = train(cfg, log=lambda line: None)
    card = yaml.safe_load((out / "card.yaml").read_text())
    history = json.loads((out / "metrics.json").read_text())["training"]
    for key in ("validated_domain", "plausibility"):
        card.pop(key)
    (out / "card.yaml").write_text(yaml.safe_dump(card))
    assert load_card(out).validated_domain is None
    measured = measure_only(cfg, log=lambda line: None)
    assert measured.validated_domain is not None and load_card(out).plausibility is not None
    assert json.loads((out / "metrics.json").read_text())["training"] == history  # the training record is kept
    other = tiny_config(tmp_path)
    other["data"]["phantom"]["seed"] = 700
    with pytest.raises(CardError, match="not the cases the model was trained on"):
        measure_only(TrainConfig.model_validate(other), log=lambda line: None)


def test_mixed_sources_in_stages_keep_a_label_the_family_does_not_paint(tmp_path):
    """generate_ct phantoms (with a liver) and family cases (none) in one data set, trained in three stages
    as on a GPU machine: the fit stage runs in a process where SimpleITK cannot even be imported."""
    import subprocess
    import sys

    raw = tiny_config(tmp_path)
    raw["labels"][1] = {"value": 2, "name": "Liver", "source": ["liver"], "category": ANAT,
                        "type": {"value": "10200004", "meaning": "Liver"}, "tg263": "Liver", "color": [221, 130, 101]}
    raw["data"] = {"phantom": {"count": 2, "seed": 500, **TINY_PHANTOM},
                   "family": {"count": 2, "seed": 40, "rows": [72], "slices": [24], "exclude": {"habitus": ["child"]},
                              "unpainted": ["Liver"]},
                   "validation_split": 0.5, "cache_dir": str(tmp_path / "phantoms")}
    raw["seed"] = 4  # a split with a case of each source on each side
    cfg = TrainConfig.model_validate(raw)
    config = tmp_path / "mixed.yaml"
    config.write_text(yaml.safe_dump(raw))
    work = train(cfg, log=lambda line: None, stages=("prepare",))
    grid = sorted((work / "grid").glob("*/*.npz"))
    assert len(grid) == 4
    for path in grid:  # the family's cases teach the liver as background; the phantoms' have one
        with np.load(path) as z:
            assert (2 in z["label"]) == str(z["name"]).startswith("phantom"), str(z["name"])
    fit = ("import sys; sys.modules['SimpleITK'] = None; from node.models.train import main; "
           f"sys.exit(main([{str(config)!r}, '--stage', 'fit']))")
    subprocess.run([sys.executable, "-c", fit], check=True, cwd=Path(__file__).parents[1], capture_output=True)
    assert not (tmp_path / "models" / "tiny").exists() and (work / "best.pt").is_file()
    out = train(cfg, log=lambda line: None, stages=("deploy",))
    metrics = json.loads((out / "metrics.json").read_text())
    assert {n.split("-")[0] for n in metrics["training"]["train_cases"]} == {"phantom", "family"}
    assert metrics["device"] in ("cpu", "cuda")  # where the fit stage ran
    card = load_card(out)
    assert [lab.name for lab in card.labels] == ["Left lung", "Liver"] and set(card.validation.dice) == {"Left lung", "Liver"}
    # the validation of each source is reported apart, and the card says it in words
    by_source = metrics["validation"]["by_source"]
    assert set(by_source) == {"phantom family (node.phantom.family)", "hilum phantom (generate_ct)"}
    assert any("held-out seeds of the phantom family" in line for line in card.limitations)


def test_a_mix_is_phantom_and_family_only(tmp_path):
    raw = tiny_config(tmp_path)
    raw["data"]["dicom_seg"] = str(tmp_path)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(CardError, match=r"data: .*give exactly one data source.*\(or phantom and family together\)"):
        load_train_config(path)


def test_fine_tuning_starts_from_the_checkpoint_and_refuses_another_network(tmp_path):
    cfg = TrainConfig.model_validate(tiny_config(tmp_path))
    torch.manual_seed(99)  # not the run's seed: the checkpoint's weights are not what the run would draw
    start = build_network(cfg)
    ckpt = tmp_path / "start.pt"
    torch.save({"model": start.state_dict(), "epoch": 7, "config": cfg.model_dump(mode="json")}, ckpt)
    torch.manual_seed(cfg.seed)
    fresh = build_network(cfg).state_dict()
    assert max(float((fresh[k] - v).abs().max()) for k, v in start.state_dict().items()) > 1e-2
    # a learning rate too small to move anything: what the run saves is where it started
    still = {"epochs": 1, "steps_per_epoch": 1, "optimizer": cfg.optimizer.model_copy(update={"lr": 1e-12,
                                                                                          "weight_decay": 0.0})}
    work = train(cfg.model_copy(update={**still, "init_from": ckpt}), log=lambda line: None, stages=("prepare", "fit"))
    saved = torch.load(work / "best.pt")["model"]
    assert all(torch.allclose(saved[k], v, atol=1e-6) for k, v in start.state_dict().items())
    assert json.loads((work / "training.json").read_text())["init_from"] == {"checkpoint": str(ckpt), "epoch": 7}

    def refused(init_from, text, **update):
        with pytest.raises(CardError) as err:
            train(cfg.model_copy(update={**still, "init_from": init_from, **update}), log=lambda line: None)
        assert str(err.value).startswith("init_from: ") and text in str(err.value), err.value

    refused("previous", "only a project's training run resolves it")
    refused(tmp_path / "missing.pt", "cannot read the checkpoint")
    refused(ckpt, "holds another network", network=cfg.network.model_copy(update={"base_channels": 6}))
    renamed = [lab.model_copy(update={"name": "Right lung"}) if lab.value == 1 else lab for lab in cfg.labels]
    refused(ckpt, "was trained for labels ['Left lung', 'Heart'], this configuration has ['Right lung', 'Heart']",
            labels=renamed)


def test_dicom_seg_source_reads_the_nodes_label_map_seg(tmp_path):
    """The node's own SEGs as training labels: a Label Map SEG (seg_format labelmap, as ct-anatomy
    delivers its organs; JPEG-LS frames, a label per pixel) gives the same truth as the phantom."""
    from node.encoders import EncodeContext
    from node.encoders.seg import encode_seg
    from node.results import Code, LabelMap, Segment

    cfg = TrainConfig.model_validate(tiny_config(tmp_path))
    case = phantom_cases(cfg.data.phantom, cfg.labels, tmp_path / "phantoms")[0]
    study_dir = next((tmp_path / "phantoms").iterdir())
    folder = tmp_path / "node-results"
    folder.mkdir()
    for p in sorted((study_dir / "dicom").iterdir()):
        (folder / p.name).write_bytes(p.read_bytes())
    series = load_series(sorted(folder.iterdir()))
    assert series.volume.geometry == case.volumes[0].geometry
    anatomy = Code("91723000", "SCT", "Anatomical Structure")
    segments = tuple(Segment(lab.value, lab.source[0], anatomy, Code("39607008", "SCT", "Lung")) for lab in cfg.labels)
    lm = LabelMap(series.series_uid, series.volume.geometry, case.truth, segments, seg_format="labelmap")
    ctx = EncodeContext(job_key="train-from-node", rule="r", handler="ct-anatomy", handler_version="1")
    ds, _ = encode_seg(lm, {series.series_uid: series}, ctx, series_number=9000)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    ds.save_as(folder / "seg.dcm", enforce_file_format=True)
    (got,) = dicom_seg_cases(folder, cfg.labels)
    assert np.array_equal(got.truth, case.truth) and set(np.unique(case.truth)) == {0, 1, 2}
