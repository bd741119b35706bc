"""The shipped model `model:hilum-ct-chest` on phantom CTs it never saw, measured against their truth."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.handler_api import HandlerInput
from node.models.card import load_card
from node.encoders import EncodeContext, encode_all
from node.models.data import read_phantom
from node.models.inference import resample
from node.models.registry import DEFAULT_MODELS_DIR, model_handler
from node.models.train import dice_per_label
from node.models.train_config import load_train_config
from node.results import LabelMap, MeasurementReport, QualityFlag, ResultSet
from node.phantom.ct import generate_ct
from node.volume import Geometry, SeriesData, Volume, load_series
from tests.iod import assert_valid_iod

NAME = "hilum-ct-chest"
GOAL = 0.95  # lungs Dice on held-out seeds of the phantom family it was trained on (issue 22)
FOLDER = DEFAULT_MODELS_DIR / NAME


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    """A phantom drawn like the validation set (same generator options), with a seed never used in training:
    its DICOM series as the node loads it, and its truth mapped onto the model's labels."""
    cfg = load_train_config(FOLDER / "train.yaml")
    seed = cfg.data.phantom.seed + cfg.data.phantom.count + 17
    options = cfg.data.phantom.model_copy(update={"seed": seed}).options(0)
    study = generate_ct(tmp_path_factory.mktemp("unseen") / "study", seed=seed, **options)
    series = load_series(sorted(Path(study.dicom_dir).iterdir()))
    return series, read_phantom(study, cfg.labels, "unseen")


def _run(volume: Volume, series: SeriesData | None = None):
    handler = model_handler(f"model:{NAME}")({})
    series = series or SeriesData("1.2.826.0.1.3680043.8.498.77", "CT", [], volume)
    results = handler.run(HandlerInput("1.2.3", [series]), lambda f, m: None)
    ResultSet(results)
    return results, handler


def test_dice_on_an_unseen_phantom_matches_the_card(unseen):
    series, case = unseen
    card = load_card(FOLDER)
    results, handler = _run(series.volume, series)
    label_map = next(r for r in results if isinstance(r, LabelMap))
    assert label_map.geometry == case.volumes[0].geometry and label_map.labels.shape == case.truth.shape
    names = {lab.value: lab.name for lab in card.labels}
    dice = {names[v]: d for v, d in dice_per_label(label_map.labels, case.truth, names).items()}
    mean = float(np.mean(list(dice.values())))
    assert mean >= card.validation.mean_dice - 0.02, f"Dice {dice} (mean {mean:.3f}) vs card {card.validation}"
    report = next(r for r in results if isinstance(r, MeasurementReport))
    voxel_ml = float(np.prod(case.volumes[0].geometry.spacing)) / 1000
    for group in report.groups:
        truth_ml = (case.truth == group.segment_label).sum() * voxel_ml
        assert group.measurements[0].value == pytest.approx(
            (label_map.labels == group.segment_label).sum() * voxel_ml, abs=0.01)
        # the lungs and the heart within 10 % of the truth; the card states that the liver comes out small
        if group.tracking_id in ("Left lung", "Right lung", "Heart"):
            assert group.measurements[0].value == pytest.approx(truth_ml, rel=0.10), group.tracking_id
    assert handler.provenance["execution_providers"][0] in ("CPUExecutionProvider", "CUDAExecutionProvider")


def _reslice(case, geom: Geometry) -> tuple[Volume, np.ndarray]:
    src = case.volumes[0]
    image = np.rint(resample(src.array, src.geometry, geom, linear=True)).astype(np.int16)
    return Volume(image, geom), resample(case.truth, src.geometry, geom, linear=False)


def _grid(case, spacing, rotation_deg: float) -> Geometry:
    src = case.volumes[0].geometry
    a = np.radians(rotation_deg)
    m = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])  # tilt about x
    m = np.array([[np.cos(a / 2), -np.sin(a / 2), 0], [np.sin(a / 2), np.cos(a / 2), 0], [0, 0, 1]]) @ m
    centre = src.index_to_patient((np.array(src.shape) - 1) / 2)
    extent = (np.array(src.shape[::-1]) - 1) * np.array(src.spacing) * 0.8  # (x, y, z) mm
    shape_xyz = np.maximum(2, np.round(extent / np.array(spacing)).astype(int))
    origin = centre - m @ ((shape_xyz - 1) * np.array(spacing) / 2)
    return Geometry(tuple(int(v) for v in shape_xyz[::-1]), tuple(origin), tuple(float(s) for s in spacing),
                    tuple(m.ravel()))


@pytest.mark.parametrize("spacing,rotation", [((0.9, 1.6, 5.0), 0.0), ((1.8, 1.8, 2.5), 25.0)],
                         ids=["anisotropic", "oblique"])
def test_anisotropic_and_oblique_sources_come_back_on_their_own_grid(unseen, spacing, rotation):
    _, case = unseen
    card = load_card(FOLDER)
    geom = _grid(case, spacing, rotation)
    volume, truth = _reslice(case, geom)
    results, _ = _run(volume)
    label_map = results[0]
    assert label_map.geometry == geom and label_map.labels.shape == geom.shape
    names = {lab.value: lab.name for lab in card.labels}
    dice = dice_per_label(label_map.labels, truth, names)
    for value in (1, 2):  # the lungs stay on their own side whatever the grid
        assert dice[value] > 0.85, (names[value], dice)
    assert np.nanmean(list(dice.values())) >= card.validation.mean_dice - 0.05, dice


def test_results_encode_to_valid_seg_and_rtstruct(unseen, tmp_path):
    series, _ = unseen
    results, handler = _run(series.volume, series)
    label_map = results[0]
    ctx = EncodeContext(job_key="models-test", rule="chest-organs", handler=handler.name,
                        handler_version=handler.version, model_name=handler.model_name,
                        model_version=handler.model_version)
    datasets = encode_all([label_map], {series.series_uid: series}, ctx)
    assert sorted(ds.Modality for ds in datasets) == ["RTSTRUCT", "SEG"]
    for ds in datasets:
        path = tmp_path / f"{ds.Modality}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert_valid_iod(path)
    seg = next(ds for ds in datasets if ds.Modality == "SEG")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [s.name for s in label_map.segments]


# ---------------------------------------------------------------- the model's limits (issue 22)

def _flags(case_volume: Volume, header=None) -> tuple[list, list]:
    """(domain flags, plausibility/confidence flags and results) of the shipped model on one volume."""
    series = SeriesData("1.2.826.0.1.3680043.8.498.79", "CT", [header] if header is not None else [], case_volume)
    handler = model_handler(f"model:{NAME}")({})
    domain = handler.assess_input(HandlerInput("1.2.3", [series]))
    results = handler.run(HandlerInput("1.2.3", [series]), lambda f, m: None)
    return domain, results, handler


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Cases of the family's held-out kind (children: a body habitus never trained on)."""
    from node.models.data import family_case, family_seeds

    cfg = load_train_config(FOLDER / "train.yaml")
    spec = next(h for h in cfg.data.held_out if h.family is not None)
    cache = tmp_path_factory.mktemp("family")
    return [family_case(cache, s, r, n, cfg.labels, cfg.data.family.unpainted)
            for s, r, n in family_seeds(spec.seed + 100, 3, [96], [48], only=spec.family)]


@pytest.fixture(scope="module")
def family_seeds_held_out(tmp_path_factory):
    """Small cases of the family it was trained on (children excluded, as in training), from seeds far
    above the ones its training drew from."""
    from node.models.data import family_case, family_seeds

    cfg = load_train_config(FOLDER / "train.yaml")
    fam = cfg.data.family
    cache = tmp_path_factory.mktemp("family-seeds")
    return [family_case(cache, s, r, n, cfg.labels, fam.unpainted)
            for s, r, n in family_seeds(fam.seed + 5000, 3, [96], [48], exclude=fam.exclude)]


def test_held_out_seeds_of_its_training_family_meet_the_goal(family_seeds_held_out):
    """Issue 22's goal for the retrained model: lungs Dice >= 0.95 on held-out seeds of the family."""
    lungs = []
    for case in family_seeds_held_out:
        results, _ = _run(case.volumes[0])
        dice = dice_per_label(results[0].labels, case.truth, (1, 2))
        lungs.append((dice[1], dice[2]))
    left, right = np.mean(lungs, axis=0)
    assert left >= GOAL and right >= GOAL, lungs


def test_an_unseen_phantom_of_its_training_kind_passes_every_check(unseen):
    series, _ = unseen
    domain, results, _ = _flags(series.volume, series.datasets[0])
    assert domain == [] and not [r for r in results if isinstance(r, QualityFlag)], (domain, results[2:])


def test_a_family_it_never_saw_is_never_delivered_as_a_good_result(family):
    """The issue's finding: lung Dice down to 0.00 on independently made phantoms, delivered like a good
    result. Every such case now fails a check (its domain, a label's plausibility or the confidence)."""
    card = load_card(FOLDER)
    names = {lab.value: lab.name for lab in card.labels}
    for case in family:
        domain, results, _ = _flags(case.volumes[0], case.header)
        flags = domain + [r for r in results if isinstance(r, QualityFlag)]
        dice = dice_per_label(results[0].labels, case.truth, names)
        if min(dice[1], dice[2]) < 0.9:
            assert flags, (case.name, dice)


def test_confidence_is_lower_on_a_family_it_never_saw(unseen, family):
    """Measured, asserted as an ordering: the network is less sure on anatomy unlike its training data."""
    series, _ = unseen
    _, _, handler = _flags(series.volume)
    in_family = handler.provenance["confidence"]
    out_of_family = []
    for case in family:
        _, _, handler = _flags(case.volumes[0])
        out_of_family.append(handler.provenance["confidence"])
    assert in_family > float(np.mean(out_of_family)), (in_family, out_of_family)


def test_a_lung_replaced_by_soft_tissue_is_a_plausibility_failure(unseen):
    """The unseen phantom with its right lung filled with fluid-like tissue (a white-out, or the lung
    removed): the model finds no right lung of plausible size, and says so instead of a normal-looking result."""
    series, case = unseen
    card = load_card(FOLDER)
    right = next(lab.value for lab in card.labels if lab.name == "Right lung")
    image = series.volume.array.copy()
    image[case.truth == right] = 40
    results, _ = _run(Volume(image, series.volume.geometry))
    flags = [r for r in results if isinstance(r, QualityFlag)]
    assert ("label_volume", "Right lung") in {(f.check, f.structure) for f in flags}, flags
