"""The generic inference pipeline with hand-built ONNX models whose answer is known exactly.

A 1x1x1 convolution turning HU into "above threshold" logits makes the network's output a known
function of the image, so what is measured is the pipeline itself: grids, resampling back onto
oblique and anisotropic sources, blending, post-processing, session caching.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from scipy import ndimage

from node.handler_api import HandlerInput, HandlerRefusal
from node.models.card import InferenceSpec, LabelSpec, load_card
from node.models.inference import (importance_map, load_model, network_grid, postprocess, sliding_window)
from node.models.registry import model_handler
from node.results import LabelMap, MeasurementReport, ResultSet
from node.volume import Geometry, SeriesData, Volume

THRESHOLD_HU = -250.0  # midway between ball (300) and background (-800): blur moves no edge


def threshold_model(path: Path, threshold: float = THRESHOLD_HU, gain: float = 0.05, mean: float = 0.0,
                    std: float = 1000.0, channels_out: int = 2, shift: int = 0) -> None:
    """ONNX: logits = [0, gain*(HU - threshold)] from the normalised input (x*std + mean = HU).

    ``shift`` > 0: channel 1 reads the input ``shift`` voxels back along the first spatial array
    axis, so the answer moves by ``shift`` voxels along that axis (a probe of the axis order).
    """
    k = 2 * shift + 1
    w = np.zeros((channels_out, 1, k, 1, 1), np.float32)
    b = np.zeros(channels_out, np.float32)
    w[1, 0, 0] = gain * std
    b[1] = gain * (mean - threshold)
    node = helper.make_node("Conv", ["image", "w", "b"], ["logits"], pads=[shift, 0, 0, shift, 0, 0])
    dims = ["n", 1, "z", "y", "x"]
    graph = helper.make_graph(
        [node], "threshold",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", channels_out, "z", "y", "x"])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def card_dict(name: str = "ball", **over) -> dict:
    card = {
        "name": name, "version": "1.0", "description": "threshold test model", "intended_use": "tests",
        "limitations": ["not a real model"], "training_data": "none",
        "input": {"modality": "CT", "body_region": "CHEST", "target_spacing": [3.0, 3.0, 3.0]},
        "preprocessing": {"kind": "ct_window", "clip": [-1000, 1000], "mean": 0.0, "std": 1000.0},
        "inference": {"patch_size": [16, 16, 16], "overlap": 0.5, "tta_flips": [["x"], ["y", "z"]]},
        "labels": [{"value": 1, "name": "Ball", "category": {"value": "123037004", "meaning": "Anatomical Structure"},
                    "type": {"value": "10200004", "meaning": "Liver"}, "tg263": "Liver", "color": [220, 120, 60],
                    "postprocess": {"largest_component": True, "fill_holes": True}}],
        "emit": ["SEG", "SR"],
    }
    card.update(over)
    return card


def deploy(root: Path, name: str = "ball", **over) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    threshold_model(folder / "model.onnx")
    (folder / "card.yaml").write_text(yaml.safe_dump(card_dict(name, **over)))
    return folder


def rotation(ax: float, az: float) -> np.ndarray:
    ax, az = np.radians(ax), np.radians(az)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


CENTRE = np.array([12.0, -20.0, 35.0])  # ball centre, LPS mm: off-centre so a flip would show
RADIUS = 30.0


def ball_series(geom: Geometry, with_hole: bool = False) -> SeriesData:
    kji = np.indices(geom.shape).reshape(3, -1).T
    dist = np.linalg.norm(geom.index_to_patient(kji) - CENTRE, axis=1).reshape(geom.shape)
    hu = np.where(dist < RADIUS, 300, -800).astype(np.int16)
    if with_hole:
        hu[dist < 6] = -800  # an enclosed hole the card's fill_holes must close
    return SeriesData("1.2.826.0.1.3680043.8.498.1", "CT", [], Volume(hu, geom))


GRIDS = {
    "axial": Geometry((60, 90, 90), (-60.0, -90.0, -20.0), (1.5, 1.5, 2.0), tuple(np.eye(3).ravel())),
    "anisotropic": Geometry((23, 120, 70), (-50.0, -80.0, -25.0), (1.7, 0.6, 4.5), tuple(np.eye(3).ravel())),
    "oblique": Geometry((50, 80, 75), (-40.0, -70.0, -30.0), (1.3, 1.1, 2.2), tuple(rotation(20, 35).ravel())),
    "coronal": Geometry((70, 50, 90), (-60.0, 60.0, 90.0), (1.4, 2.0, 1.6),
                        tuple(np.column_stack([[1, 0, 0], [0, 0, -1], [0, -1, 0]]).ravel().astype(float))),
}


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_output_lies_exactly_on_the_source_grid(tmp_path, grid):
    geom = GRIDS[grid]
    deploy(tmp_path)
    handler = model_handler("model:ball", tmp_path)({})
    series = ball_series(geom, with_hole=True)
    results = handler.run(HandlerInput("1.2.3", [series]), lambda f, m: None)
    ResultSet(results)
    label_map = next(r for r in results if isinstance(r, LabelMap))
    assert label_map.geometry == geom and label_map.labels.shape == geom.shape
    truth = series.volume.array > THRESHOLD_HU  # the image itself, hole included
    pred = label_map.labels == 1
    # where the 3 mm network grid cannot differ from the source (away from the surface): identical
    kji = np.indices(geom.shape).reshape(3, -1).T
    dist = np.linalg.norm(geom.index_to_patient(kji) - CENTRE, axis=1).reshape(geom.shape)
    far = np.abs(dist - RADIUS) > 4.0
    assert np.array_equal(pred[far], (dist < RADIUS)[far]), "labels off the surface differ: misplaced grid"
    dice = 2 * (pred & (dist < RADIUS)).sum() / (pred.sum() + (dist < RADIUS).sum())
    assert dice > 0.97
    # centroids in patient coordinates (the field of view may cut the ball): a transposed or
    # flipped grid would move the prediction's
    centroid = geom.index_to_patient(np.argwhere(pred).mean(axis=0))
    assert np.linalg.norm(centroid - geom.index_to_patient(np.argwhere(dist < RADIUS).mean(axis=0))) < 0.5
    assert not truth[dist < 5].any() and pred[dist < 5].all(), "fill_holes did not close the enclosed hole"
    report = next(r for r in results if isinstance(r, MeasurementReport))
    volume = report.groups[0].measurements[0]
    assert volume.name == "volume" and volume.unit == "ml"
    assert volume.value == pytest.approx(pred.sum() * np.prod(geom.spacing) / 1000, abs=0.01)
    assert volume.value == pytest.approx((dist < RADIUS).sum() * np.prod(geom.spacing) / 1000, rel=0.03)
    assert handler.provenance["execution_providers"] == ["CPUExecutionProvider"]
    assert "CPU" in label_map.description


def test_network_grid_covers_the_source():
    for geom in GRIDS.values():
        grid = network_grid(geom, (3.0, 3.0, 3.0), "LPS")
        corners = geom.index_to_patient(np.array([(k, j, i) for k in (0, geom.shape[0] - 1)
                                                  for j in (0, geom.shape[1] - 1) for i in (0, geom.shape[2] - 1)]))
        idx = grid.patient_to_index(corners)
        assert (idx > -1e-6).all() and (idx < np.array(grid.shape) - 1 + 1e-6).all()
        assert np.allclose(grid.matrix, np.eye(3))
    ras = network_grid(GRIDS["axial"], (2.0, 2.0, 2.0), "RAS")
    assert np.allclose(ras.matrix, np.diag([-1, -1, 1]))


def test_sliding_window_blending_equals_whole_image_application():
    # A voxel-wise model gives the same answer per patch as on the whole image, so any error in
    # the patch placement or the Gaussian weight normalisation shows as a difference.
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 37, 50, 29)).astype(np.float32)
    w = np.array([0.0, 1.7, -0.4], np.float32)

    def run(batch):
        return batch * w[None, :, None, None, None]

    spec = InferenceSpec(patch_size=(16, 24, 16), overlap=0.5, tta_flips=[["x"], ["z", "y"]])
    probs = sliding_window(image, run, spec, 3)
    logits = image * w[:, None, None, None]
    expected = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    assert probs.shape == (3, 37, 50, 29)
    assert np.allclose(probs, expected, atol=1e-5)
    small = sliding_window(image[:, :10, :12, :9], run, spec, 3)  # smaller than a patch: padded, then cropped
    assert np.allclose(small, expected[:, :10, :12, :9], atol=1e-5)


def test_gaussian_importance_map_peaks_in_the_centre():
    w = importance_map((16, 24, 16), "gaussian", 0.125)
    assert w.min() > 0 and w[8, 12, 8] == pytest.approx(1.0, abs=0.02) and w[0, 0, 0] < 1e-3
    assert np.all(importance_map((8, 8, 8), "constant", 0.125) == 1)


def _spec(**pp) -> LabelSpec:
    return LabelSpec(value=1, name="A", category={"value": "123037004", "meaning": "Anatomical Structure"},
                     type={"value": "10200004", "meaning": "Liver"}, color=(1, 2, 3), postprocess=pp)


def test_postprocess_keeps_largest_component_removes_small_ones_and_fills_holes():
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[5:20, 5:20, 5:20] = 1
    labels[10:13, 10:13, 10:13] = 0  # enclosed hole
    labels[25:28, 25:28, 25:28] = 1  # 27-voxel island
    labels[0:2, 28:30, 0:2] = 2  # another label, untouched
    out = postprocess(labels.copy(), [_spec(largest_component=True, fill_holes=True)], voxel_ml=0.001)
    assert out[25:28, 25:28, 25:28].sum() == 0 and out[10:13, 10:13, 10:13].min() == 1
    assert (out == 2).sum() == 8 and (out == 1).sum() == 15 ** 3
    kept = postprocess(labels.copy(), [_spec(min_size_ml=0.02)], voxel_ml=0.001)  # 20 voxels: island stays
    assert kept[25:28, 25:28, 25:28].min() == 1 and kept[10:13, 10:13, 10:13].max() == 0
    gone = postprocess(labels.copy(), [_spec(min_size_ml=0.03)], voxel_ml=0.001)
    assert gone[25:28, 25:28, 25:28].max() == 0 and (gone == 1).sum() == 15 ** 3 - 27


def test_postprocess_with_more_components_than_a_byte_or_two_can_number():
    """The components are numbered in the smallest integer type their count fits (memory); past
    255 and past 65 535 of them, the answer is still binary_fill_holes' and the largest component."""
    for step in (4, 2):  # 14 x 28 x 28 = 10 976 and 28 x 56 x 56 = 87 808 one-voxel specks
        labels = np.zeros((56, 112, 112), np.uint8)
        labels[::step, ::step, ::step] = 1
        labels[:, 60:100, 60:100] = 1  # the largest component: a slab with a hole in it
        labels[20:30, 70:80, 70:80] = 0
        out = postprocess(labels.copy(), [_spec(largest_component=True, fill_holes=True)], voxel_ml=0.001)
        comp, n = ndimage.label(labels == 1, structure=np.ones((3, 3, 3), bool))
        assert n > 255 * (step == 4) + 65535 * (step == 2)
        largest = comp == 1 + int(np.argmax(np.bincount(comp.ravel())[1:]))
        assert np.array_equal(out == 1, ndimage.binary_fill_holes(largest))
        assert out[25, 75, 75] == 1 and out[::step, ::step, ::step][:, :10, :10].max() == 0
        # Specks kept by size: nothing changes but the hole (enclosed by the slab) being filled.
        kept = postprocess(labels.copy(), [_spec(min_size_ml=0.001, fill_holes=True)], voxel_ml=0.001)
        assert np.array_equal(kept == 1, ndimage.binary_fill_holes(labels == 1))


def test_session_is_cached_and_reloaded_when_the_model_changes(tmp_path):
    folder = deploy(tmp_path)
    card = load_card(folder)
    first = load_model(folder, card, "cpu")
    assert load_model(folder, card, "cpu") is first
    os.utime(folder / "model.onnx", ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same bytes
    assert load_model(folder, card, "cpu") is first
    threshold_model(folder / "model.onnx", threshold=100.0)  # a new version of the model
    second = load_model(folder, card, "cpu")
    assert second is not first and second.sha256 != first.sha256
    image = np.full((1, 1, 16, 16, 16), 0.05, np.float32)  # 50 HU: above the old threshold, below the new
    assert (first.session.run(None, {"image": image})[0][0, 1] > 0).all()
    assert (second.session.run(None, {"image": image})[0][0, 1] < 0).all()


def test_new_model_version_reaches_the_handler_without_restart(tmp_path):
    folder = deploy(tmp_path)
    series = ball_series(GRIDS["axial"])

    def run():
        return model_handler("model:ball", tmp_path)({}).run(HandlerInput("1", [series]), lambda f, m: None)

    before = (run()[0].labels == 1).sum()
    threshold_model(folder / "model.onnx", threshold=500.0)  # the ball (300 HU) is no longer found
    with pytest.raises(HandlerRefusal, match="found none"):
        run()
    card = card_dict(version="2.0")
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    assert model_handler("model:ball", tmp_path).version == "2.0"
    assert before > 0


def test_handler_refuses_other_modalities_and_non_volumes(tmp_path):
    deploy(tmp_path)
    cls = model_handler("model:ball", tmp_path)
    mr = SeriesData("1.2", "MR", [], ball_series(GRIDS["axial"]).volume)
    with pytest.raises(HandlerRefusal, match="accepts CT"):
        cls({}).check(HandlerInput("1", [mr]))
    scout = SeriesData("1.3", "CT", [], None, volume_error="fewer than two slices: not a volume")
    with pytest.raises(HandlerRefusal, match="not a volume"):
        cls({}).check(HandlerInput("1", [scout]))
    with pytest.raises(HandlerRefusal, match="not offered"):
        cls({"emit": ["RTSTRUCT"]}).run(HandlerInput("1", [ball_series(GRIDS["axial"])]), lambda f, m: None)
    with pytest.raises(HandlerRefusal, match="SR needs SEG or RTSTRUCT"):
        cls({"emit": ["SR"]}).run(HandlerInput("1", [ball_series(GRIDS["axial"])]), lambda f, m: None)
    with pytest.raises(Exception, match="provider"):
        cls({"provider": "tpu"})


def test_emit_narrowed_by_rule_params(tmp_path):
    deploy(tmp_path)
    out = model_handler("model:ball", tmp_path)({"emit": ["SEG"]}).run(
        HandlerInput("1", [ball_series(GRIDS["axial"])]), lambda f, m: None)
    assert [type(r) for r in out] == [LabelMap] and out[0].encodings == ("SEG",)


@pytest.mark.parametrize("array_axes,moved", [("zyx", 2), ("xyz", 0)])
def test_array_axes_order_reaches_the_network(tmp_path, array_axes, moved):
    # The probe model shifts its answer 2 voxels (6 mm) along the first array axis: z for
    # DICOM-ordered (z, y, x) arrays, x for NIfTI/MONAI-ordered (x, y, z) ones.
    folder = tmp_path / "probe"
    folder.mkdir()
    threshold_model(folder / "model.onnx", mean=-1000.0, shift=2)  # padding (0) reads as air
    card = card_dict("probe")
    card["input"]["array_axes"] = array_axes
    card["preprocessing"].update(mean=-1000.0)
    card["inference"]["tta_flips"] = []
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    geom = GRIDS["axial"]
    out = model_handler("model:probe", tmp_path)({}).run(HandlerInput("1", [ball_series(geom)]), lambda f, m: None)
    centroid = geom.index_to_patient(np.argwhere(out[0].labels == 1).mean(axis=0))
    expected = CENTRE.copy()
    expected[moved] += 6.0
    assert np.linalg.norm(centroid - expected) < 0.6


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_boxed_resampling_equals_resampling_every_class_everywhere(activation):
    # probabilities_to_labels resamples each class only where it can win; the reference below
    # resamples every class over the whole source grid and takes the argmax there.
    from scipy import ndimage

    from node.models.inference import probabilities_to_labels, resample

    rng = np.random.default_rng(5)
    source = GRIDS["oblique"]
    grid = network_grid(source, (4.0, 4.0, 4.0), "LPS")
    logits = ndimage.gaussian_filter(rng.normal(size=(4, *grid.shape)), (0, 2, 2, 2)) * 40
    if activation == "softmax":
        e = np.exp(logits - logits.max(0))
        probs = (e / e.sum(0)).astype(np.float32)
    else:
        probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    labels = [_spec().model_copy(update={"value": v, "name": f"L{v}"}) for v in (3, 5, 7, 9)]
    got = probabilities_to_labels(probs, grid, source, labels, activation, threshold=0.6)
    full = np.stack([resample(p, grid, source, linear=True) for p in probs])
    if activation == "softmax":
        expected = full.argmax(0).astype(np.uint8)
    else:
        expected = np.where(full.max(0) >= 0.6, np.array([3, 5, 7, 9], np.uint8)[full.argmax(0)], 0)
    assert len(np.unique(expected)) == (4 if activation == "softmax" else 5)
    assert (got == expected).mean() > 0.99999


def test_asking_for_cuda_without_onnxruntime_gpu_says_so(tmp_path):
    import onnxruntime as ort

    folder = deploy(tmp_path)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(RuntimeError, match="no CUDAExecutionProvider .* install onnxruntime-gpu"):
        load_model(folder, load_card(folder), "cuda")
    assert load_model(folder, load_card(folder), "auto").providers == ("CPUExecutionProvider",)
