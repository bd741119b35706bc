"""Monte-Carlo dropout: the network's dropout sites, the second ONNX graph that takes the dropout masks
as inputs, MC passes combined with test-time augmentation, and the uncertainty map delivered as a
DICOM Parametric Map (0 dciodvfy errors) that references the source series."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
import pytest
import torch
import yaml

from node.encoders import encode_all
from node.handler_api import HandlerInput, HandlerRefusal
from node.models.card import load_card
from node.models.inference import resample
from node.models.registry import model_handler
from node.models.train import export_mc_onnx, export_onnx, train
from node.models.train_config import TrainConfig
from node.models.unet import UNet3D
from node.models.uncertainty import UncertaintyParams, dropout_masks, passes_for
from node.phantom import generate_ct
from node.results import LabelMap, QuantityMap
from node.volume import load_series
from tests.encoder_sources import context, save_valid
from tests.test_models_train import TINY_PHANTOM, tiny_config


def _exports(tmp_path: Path, rate: float = 0.3) -> tuple[UNet3D, Path, Path]:
    torch.manual_seed(0)
    net = UNet3D(1, 3, base=4, depth=3, dropout=rate).eval()
    export_onnx(net, tmp_path / "model.onnx", 1, (16, 16, 16))
    export_mc_onnx(net, tmp_path / "model_mc.onnx", 1, (16, 16, 16))
    return net, tmp_path / "model.onnx", tmp_path / "model_mc.onnx"


def test_the_dropout_graph_takes_its_masks_and_all_ones_is_the_plain_network(tmp_path):
    net, plain_path, mc_path = _exports(tmp_path)
    assert net.dropout_sites == [16, 8, 4]  # bottleneck, then each decoder stage
    plain = ort.InferenceSession(str(plain_path), providers=["CPUExecutionProvider"])
    mc = ort.InferenceSession(str(mc_path), providers=["CPUExecutionProvider"])
    inputs = mc.get_inputs()
    assert [i.name for i in inputs] == ["image", "mask0", "mask1", "mask2"]
    assert [i.shape[1] for i in inputs[1:]] == [16, 8, 4]
    x = np.random.default_rng(1).normal(size=(2, 1, 16, 24, 32)).astype(np.float32)  # a size never exported
    ones = {i.name: np.ones((1, i.shape[1], 1, 1, 1), np.float32) for i in inputs[1:]}
    ref = plain.run(None, {"image": x})[0]
    np.testing.assert_allclose(mc.run(None, {"image": x, **ones})[0], ref, rtol=1e-4, atol=1e-4)

    # a drawn mask computes what torch computes with that mask at the same sites
    class Model:  # what dropout_masks reads: the session's inputs
        session = mc
    masks = dropout_masks(Model, 0.3, seed=5, sample=0)
    assert set(masks) == {"mask0", "mask1", "mask2"}
    for m in masks.values():  # kept channels scaled by 1 / (1 - p), dropped ones zero
        assert set(np.unique(m)) <= {0.0, np.float32(1 / 0.7)}
    with torch.no_grad():
        want = net(torch.from_numpy(x), [torch.from_numpy(masks[f"mask{i}"]) for i in range(3)]).numpy()
    got = mc.run(None, {"image": x, **masks})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got - ref).max() > 1e-3  # the mask really changed the network
    # seeded: the same (seed, sample) is the same sub-network, another sample another one
    again = dropout_masks(Model, 0.3, seed=5, sample=0)
    other = dropout_masks(Model, 0.3, seed=5, sample=1)
    assert all(np.array_equal(masks[k], again[k]) for k in masks)
    assert any(not np.array_equal(masks[k], other[k]) for k in masks)
    # over many draws the keep rate is the training one
    kept = np.mean([(dropout_masks(Model, 0.3, 5, s)["mask0"] > 0).mean() for s in range(200)])
    assert kept == pytest.approx(0.7, abs=0.03)


def test_mc_passes_follow_the_tta_passes_and_need_a_network_with_dropout(tmp_path):
    from tests.test_models_inference import card_dict

    card = card_dict("ball")  # tta_flips x and yz
    from node.models.card import ModelCard

    with_dropout = ModelCard.model_validate({**card, "mc_dropout": {"rate": 0.2, "samples": 4}})
    plan = passes_for(with_dropout, UncertaintyParams(intensity_scales=[]))
    assert [p.name for p in plan] == ["identity", "flip x", "flip yz", "dropout sample 1", "flip x, dropout sample 2",
                                      "flip yz, dropout sample 3", "dropout sample 4"]
    # only MC passes: the identity plus the samples
    plan = passes_for(with_dropout, UncertaintyParams(flips=[], intensity_scales=[], mc_samples=3))
    assert [p.sample for p in plan] == [None, 0, 1, 2]
    without = ModelCard.model_validate(card)
    assert all(p.sample is None for p in passes_for(without, UncertaintyParams()))
    with pytest.raises(ValueError, match="uncertainty.mc_samples: model ball has no dropout"):
        passes_for(without, UncertaintyParams(mc_samples=4))


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory):
    """A tiny model trained with dropout (three epochs, CPU): its card names the MC graph."""
    tmp = tmp_path_factory.mktemp("mc")
    raw = tiny_config(tmp)
    raw["network"] = {"base_channels": 4, "depth": 2, "dropout": 0.25, "mc_samples": 3}
    raw.update(epochs=3, steps_per_epoch=3)
    out = train(TrainConfig.model_validate(raw), log=lambda line: None)
    series = load_series(sorted(Path(generate_ct(tmp / "ct", seed=77, **TINY_PHANTOM).dicom_dir).iterdir()))
    return tmp, out, series


def test_training_with_dropout_deploys_the_mc_graph(dropout_model):
    tmp, out, _ = dropout_model
    card = load_card(out)
    assert card.mc_dropout is not None and card.mc_dropout.rate == 0.25 and card.mc_dropout.samples == 3
    assert (out / card.mc_dropout.model_file).is_file()
    assert json.loads((out / "metrics.json").read_text())["training"]["epochs_run"] == 3
    # a registered version carries the MC graph too
    from node.models.versions import ModelRegistry

    registry = ModelRegistry(tmp / "registry")
    registry.register(out, by="test")
    version_dir = registry.root / "tiny" / card.version
    assert (version_dir / "model_mc.onnx").is_file()


def test_mc_dropout_uncertainty_and_its_parametric_map(dropout_model, tmp_path):
    tmp, out, series = dropout_model
    cls = model_handler("model:tiny", tmp / "models")
    inp = HandlerInput(series.datasets[0].StudyInstanceUID, [series])

    def run(params: dict):
        h = cls({"uncertainty": params})
        results = h.run(inp, lambda f, m: None)
        return h.provenance["uncertainty"], results

    record, results = run({"parametric_map": True})
    # identity + two intensity passes + three MC samples (the card's default)
    assert record["passes"] == 6 and record["pass_names"][3:] == [
        "dropout sample 1", "intensity x0.9, dropout sample 2", "intensity x1.1, dropout sample 3"]
    mc = record["mc_dropout"]
    assert mc["samples"] == 3 and mc["rate"] == 0.25 and mc["seed"] == 0
    assert 0 <= mc["disagreement"] <= 1 and 0 < record["score"] <= 1 and record["mutual_information"] >= 0
    # reproducible: the same seed draws the same sub-networks; another seed others
    same, _ = run({"parametric_map": True})
    assert same == record
    other, _ = run({"seed": 9})
    assert other["score"] != record["score"]
    # sampling sub-networks adds disagreement a run without them does not have
    plain, plain_results = run({"mc_samples": 0})
    assert "mc_dropout" not in plain and not any(isinstance(r, QuantityMap) for r in plain_results)
    assert record["disagreement"] > plain["disagreement"]

    qmap = next(r for r in results if isinstance(r, QuantityMap))
    label_map = next(r for r in results if isinstance(r, LabelMap))
    assert qmap.source_series_uid == series.series_uid and qmap.values.dtype == np.float32
    assert qmap.geometry.spacing == (8.0, 8.0, 8.0)  # the network grid, not the source's
    assert 0 <= qmap.values.min() and qmap.values.max() <= 1 and qmap.values.max() > 0.1

    datasets = encode_all(results, {series.series_uid: series}, context(model_name="tiny", model_version="0.1"))
    pm = next(ds for ds in datasets if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30")
    path = save_valid(pm, tmp_path / "out")  # 0 dciodvfy errors
    back = pydicom.dcmread(path)
    src = series.datasets[0]
    assert back.StudyInstanceUID == src.StudyInstanceUID and back.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert back.PatientID == src.PatientID
    refs = {s.SeriesInstanceUID for s in back.ReferencedSeriesSequence}
    assert refs == {series.series_uid}
    frames = np.frombuffer(back.FloatPixelData, dtype="<f4").reshape(qmap.values.shape)
    # each frame lies where its plane position says, with the float32 values of that slice as they are
    seen = set()
    for frame, item in zip(frames, back.PerFrameFunctionalGroupsSequence):
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        k, j, i = qmap.geometry.patient_to_index(position)
        assert abs(j) < 1e-3 and abs(i) < 1e-3 and abs(k - round(k)) < 1e-3
        np.testing.assert_array_equal(frame, qmap.values[round(k)])
        seen.add(round(k))
    assert seen == set(range(qmap.values.shape[0]))
    rwvm = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert rwvm.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == "ENTROPY"
    assert back.ContentLabel == "UNCERTAINTY" and "uncertainty" in back.SeriesDescription
    # the SEG of the same run sits in the same study and frame of reference
    seg = next(ds for ds in datasets if ds.Modality == "SEG")
    assert seg.FrameOfReferenceUID == back.FrameOfReferenceUID and label_map.source_series_uid == series.series_uid

    # on the source grid (what OHIF's viewer needs): one frame per source slice, of its rows and columns,
    # holding the network-grid map sampled at the source voxels, 0 dciodvfy errors
    _, on_source = run({"parametric_map": True, "parametric_map_grid": "source"})
    fine = next(r for r in on_source if isinstance(r, QuantityMap))
    assert fine.geometry == series.volume.geometry and fine.values.dtype == np.float32
    np.testing.assert_allclose(fine.values, resample(qmap.values, qmap.geometry, fine.geometry, linear=True),
                               atol=1e-6)
    assert 0 <= fine.values.min() and fine.values.max() <= 1
    (pm,) = [ds for ds in encode_all(on_source, {series.series_uid: series},
                                     context(model_name="tiny", model_version="0.1"))
             if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"]
    back = pydicom.dcmread(save_valid(pm, tmp_path / "out-source"))
    assert (back.Rows, back.Columns, int(back.NumberOfFrames)) == (src.Rows, src.Columns, len(series.datasets))


def test_mc_samples_of_a_model_without_dropout_are_refused(tmp_path):
    from tests.test_models_inference import deploy
    from tests.test_models_uncertainty import ball

    deploy(tmp_path)
    cls = model_handler("model:ball", tmp_path)
    with pytest.raises(HandlerRefusal, match="mc_samples: model ball has no dropout"):
        cls({"uncertainty": {"mc_samples": 4}}).run(HandlerInput("1", [ball(300)]), lambda f, m: None)


def test_a_card_naming_a_missing_mc_graph_fails_naming_the_field(tmp_path):
    from node.models.card import CardError
    from tests.test_models_inference import deploy

    folder = deploy(tmp_path)
    raw = yaml.safe_load((folder / "card.yaml").read_text())
    raw["mc_dropout"] = {"rate": 0.2}
    (folder / "card.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(CardError, match=r"mc_dropout.model_file: .*model_mc.onnx does not exist"):
        load_card(folder)
