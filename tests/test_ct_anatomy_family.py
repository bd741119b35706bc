"""ct-anatomy on the randomised phantom family (anatomy it was not tuned to), and its plausibility
checks: every case either meets the Dice targets or is refused with a reason about a structure
that missed them; none is delivered below target without a flag.

Truth: External = every patient label (not the table); Lung_L/Lung_R = the family's lung labels.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from handlers.ct_anatomy import CTAnatomy
from node.anatomy import BONE, EXTERNAL, LUNG_L, LUNG_R
from node.anatomy.plausibility import check_anatomy
from node.handler_api import HandlerInput
from node.phantom import generate_family_case
from node.phantom.chest import CT_GROUPS, LUNG_LEFT, LUNG_RIGHT
from node.quality.slices import outline_holes, slice_area_jump, slice_gap
from node.results import LabelMap, QualityFlag
from node.volume import load_series

SEEDS = tuple(range(24))
SIZE = dict(rows=112, slices=56)
TARGETS = {"External": 0.97, "Lung_L": 0.95, "Lung_R": 0.95}
# The structures a flag is about, by check: a refusal must name what went wrong.
CONCERNS = {"Lung_L": {"Lung_L", "Lungs", "Airway"}, "Lung_R": {"Lung_R", "Lungs", "Airway"},
            "External": {"External"}}
NAMES = {EXTERNAL: "External", LUNG_L: "Lung_L", LUNG_R: "Lung_R", 4: "Airway", BONE: "Bone"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


@functools.cache
def _case(root: str, seed: int):
    study = generate_family_case(f"{root}/case{seed}", seed, **SIZE)
    series = load_series(study.series_files())
    handler = CTAnatomy()
    inp = HandlerInput(study.study_uid, [series])
    handler.check(inp)
    results = handler.run(inp, lambda fraction, message: None)
    (label_map,) = [r for r in results if isinstance(r, LabelMap)]
    flags = [r for r in results if isinstance(r, QualityFlag)]
    # Lungs cut off by the coverage ("apex_cut", "base_cut") are flagged lung_truncated, and only those
    # (before that check such cases were delivered unflagged); the other checks are judged as before.
    # A "full" 5 mm case whose range needs more than ``slices`` slices loses some apex too (draw_anatomy:
    # the top is the bottom plus 5 mm x (slices - 1); the apex is at 0.6 x lung_height). A cut of a few
    # percent of the lung's height misses ~1 % of its volume and is accepted (cases 4, 7: 5 % and 1 %);
    # cut cases lose 12 % or more of the height (case 9 12 %, apex_cut 15-30 %, base_cut 10-25 %).
    fam = study.manifest["family"]
    depth = (0.6 * fam["lung_height"] - fam["z_top"]) / fam["lung_height"]
    truncated = any(f.check == "lung_truncated" for f in flags)
    if fam["coverage"] != "full" or depth >= 0.1:
        assert truncated, (seed, fam, depth)
    elif depth <= 0.06:
        assert not truncated, (seed, fam, depth, [f.text for f in flags])
    flags = [f for f in flags if f.check != "lung_truncated"]
    truth, _ = study.label_volume()
    want = {"External": np.isin(truth, CT_GROUPS["patient"]), "Lung_L": truth == LUNG_LEFT,
            "Lung_R": truth == LUNG_RIGHT}
    got = {"External": label_map.labels > 0, "Lung_L": label_map.labels == LUNG_L,
           "Lung_R": label_map.labels == LUNG_R}
    scores = {name: dice(got[name], want[name]) for name in TARGETS}
    return study, series, label_map, flags, scores


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("family"))
    return lambda seed: _case(root, seed)


def test_every_case_meets_its_targets_or_is_refused_for_the_structure_that_missed(family):
    met, refused, false_alarms = [], [], []
    for seed in SEEDS:
        study, _, _, flags, scores = family(seed)
        missed = [name for name, target in TARGETS.items() if scores[name] < target]
        variant = study.manifest["family"]
        if missed:
            assert flags, f"case {seed} delivered below target without a flag: {scores} ({variant})"
            about = {f.structure for f in flags}
            for name in missed:
                assert about & CONCERNS[name], f"case {seed}: {name} missed ({scores}) but the flags say {flags}"
            refused.append(seed)
        elif flags:
            false_alarms.append((seed, [f.text for f in flags]))
        else:
            met.append(seed)
    # The checks are not a blanket refusal: most cases pass, and few correct results are refused.
    assert len(met) >= 0.75 * len(SEEDS), (met, refused, false_alarms)
    assert len(false_alarms) <= 2, false_alarms


def test_touching_lungs_are_split_at_the_junction_line(family):
    """Lungs meeting at a junction thinner than a voxel are one region; each side still scores."""
    touching = [s for s in SEEDS if family(s)[0].manifest["family"]["junction"] != "none"]
    assert len(touching) >= 8
    for seed in touching:
        _, _, _, flags, scores = family(seed)
        if not flags:
            assert min(scores["Lung_L"], scores["Lung_R"]) >= 0.95, (seed, scores)


def test_the_issue_failure_is_refused(family):
    """Lungs found on the upper third only (the rest left as body), as the issue reported: refused."""
    study, series, label_map, flags, _ = family(0)
    assert not flags
    labels = label_map.labels.copy()
    lung_slices = np.nonzero(np.isin(labels, (LUNG_L, LUNG_R)).any(axis=(1, 2)))[0]
    lower = lung_slices[: 2 * len(lung_slices) // 3]
    block = labels[lower]
    block[np.isin(block, (LUNG_L, LUNG_R))] = EXTERNAL
    labels[lower] = block
    found = check_anatomy(labels, series.volume.array, series.volume.geometry, NAMES, EXTERNAL, (LUNG_L, LUNG_R),
                          4, BONE)
    assert "lung_unlabelled" in {f.check for f in found}, found
    reason = next(f.reason for f in found if f.check == "lung_unlabelled")
    assert "in no structure" in reason and "threshold" in reason


def test_each_chest_check_fires_on_its_own_failure(family):
    study, series, label_map, flags, _ = family(0)
    hu, geom = series.volume.array, series.volume.geometry

    def check(labels):
        return {f.check for f in check_anatomy(labels, hu, geom, NAMES, EXTERNAL, (LUNG_L, LUNG_R), 4, BONE)}

    base = label_map.labels
    assert check(base) == set()
    one_side = base.copy()
    one_side[one_side == LUNG_L] = 0  # a lung dropped entirely (and out of the body too)
    assert {"lung_missing"} <= check(one_side)
    lopsided = base.copy()
    thinned = (lopsided == LUNG_L) & (np.arange(lopsided.shape[2])[None, None, :] % 4 != 0)
    lopsided[thinned] = 0  # three quarters of the left lung gone: L/R about 0.25
    assert "lung_ratio" in check(lopsided)
    no_bone = base.copy()
    no_bone[no_bone == BONE] = EXTERNAL
    assert "bone_absent" in check(no_bone)
    gap = base.copy()
    k = int(np.median(np.nonzero((gap == LUNG_R).any(axis=(1, 2)))[0]))
    gap[k][gap[k] == LUNG_R] = EXTERNAL
    assert {"slice_gap"} <= check(gap)


def test_generic_slice_checks():
    mask = np.zeros((10, 20, 20), bool)
    mask[2:8, 5:15, 5:15] = True
    assert slice_gap(mask, "X") == [] and slice_area_jump(mask, "X", 1.0) == []
    gapped = mask.copy()
    gapped[4] = False
    (flag,) = slice_gap(gapped, "X")
    assert flag.check == "slice_gap" and flag.structure == "X" and "(4)" in flag.reason
    jumped = mask.copy()
    jumped[5, 5:15, 5:10] = False
    jumped[5, 5:15, 10:13] = False  # 100 → 20 voxels: a 5x drop at full size
    (flag,) = slice_area_jump(jumped, "X", 1.0)
    assert "between slices 4 and 5" in flag.reason
    tapered = np.zeros((10, 20, 20), bool)
    for k, r in enumerate([1, 2, 4, 6, 8, 9, 9, 9, 8, 6]):  # an apex: fast growth from small areas
        tapered[k, 10 - r:10 + r, 10 - r:10 + r] = True
    assert slice_area_jump(tapered, "X", 1.0) == []
    ring = np.zeros((3, 30, 30), bool)
    ring[:, 5:25, 5:25] = True
    assert outline_holes(ring, "External", 1.0) == []
    ring[1, 10:20, 10:20] = False  # a 100-voxel hole in one slice
    (flag,) = outline_holes(ring, "External", 0.1)
    assert flag.check == "outline_holes" and "1 slice(s) (1;" in flag.reason


@pytest.mark.slow
def test_through_a_node_a_refused_job_delivers_nothing_and_a_warned_one_says_why(tmp_path):
    """A family case ct-anatomy gets wrong (its airway grows into a lung) sent to a real node: the rule
    with the default policy refuses (job failed, the reason names the check, nothing delivered); the rule
    with deliver_with_warnings delivers SEG/RTSTRUCT/SR and the job view lists the warning."""
    import textwrap

    from tests.nodeproc import running_node, storescu, wait_for

    study = generate_family_case(tmp_path / "ct", 17, **SIZE)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "ct.yaml").write_text(textwrap.dedent("""\
        - name: anatomy-strict
          level: series
          match: {Modality: CT, is_volume: true}
          handler: ct-anatomy
          destinations: [orthanc]
        - name: anatomy-warn
          level: series
          match: {Modality: CT, is_volume: true}
          handler: ct-anatomy
          destinations: [orthanc]
          on_quality_failure: deliver_with_warnings
        """))

    def finished(node):
        jobs = node.study(study.study_uid).get("jobs", [])
        if len(jobs) < 2 or any(j["status"] not in ("done", "failed") for j in jobs):
            return None
        done = [j for j in jobs if j["status"] == "done"]
        if any(r["deliveries"].get("orthanc") != "delivered" for j in done for r in j["results"]):
            return None
        return {j["rule"]: j for j in jobs}

    with running_node(tmp_path / "data", rules) as node:
        assert storescu(node.dicom_port, study.dicom_dir).returncode == 0
        jobs = wait_for(lambda: finished(node), 240, "both ct-anatomy jobs finished", interval=0.5)
        strict, warned = jobs["anatomy-strict"], jobs["anatomy-warn"]
        assert strict["status"] == "failed", strict
        assert "airway_too_large" in strict["error"] and "nothing delivered" in strict["error"], strict["error"]
        assert strict["results"] == []
        assert warned["status"] == "done", warned
        # The organs' Label Map SEG and the External's binary SEG (seg_format labelmap, the default).
        assert sorted(r["modality"] for r in warned["results"]) == ["RTSTRUCT", "SEG", "SEG", "SR"]
        assert any("airway_too_large" in w for w in warned["quality_warnings"]), warned["quality_warnings"]
        with node.orthanc() as orthanc:
            found = orthanc.post("/tools/find", json={"Level": "Series", "Expand": True,
                                                      "Query": {"StudyInstanceUID": study.study_uid}}).json()
        descriptions = [s["MainDicomTags"].get("SeriesDescription", "") for s in found
                        if s["MainDicomTags"].get("Modality") in ("SEG", "RTSTRUCT", "SR")]
        assert len(descriptions) == 4 and all(d.startswith("AI WARNING") for d in descriptions), descriptions


def test_min_cut_parts_two_regions_at_their_junction_not_by_size():
    from node.anatomy.junction import min_cut

    region = np.zeros((30, 60), bool)
    region[5:25, 2:20] = True  # a small lung
    region[2:28, 32:58] = True  # a larger one
    region[12:16, 20:32] = True  # a 4-voxel-wide junction between them, 12 voxels long
    hu = np.full(region.shape, -850.0)
    seeds_a, seeds_b = np.zeros_like(region), np.zeros_like(region)
    seeds_a[10:20, 5:12], seeds_b[10:20, 40:50] = True, True  # markers: the cores of each lung
    side_a = min_cut(region, hu, seeds_a, seeds_b, -850.0, -200.0)
    assert side_a[5:25, 2:20].all() and not side_a[2:28, 32:58].any()  # each lung whole, on its own side
    cut_cols = [i for i in range(19, 32) if side_a[12:16, i].any() and not side_a[12:16, i + 1].any()]
    assert len(cut_cols) == 1  # one straight cut across the junction
    hu[12:16, 29] = -300.0  # a visible pleura: the cut follows it
    side_a = min_cut(region, hu, seeds_a, seeds_b, -850.0, -200.0)
    assert side_a[12:16, 28].all() and not side_a[12:16, 30].any()


def test_an_airway_cut_off_from_the_lungs_is_flagged(family):
    from scipy import ndimage

    study, series, label_map, flags, _ = family(7)  # a normal airway, nothing flagged
    assert not flags and study.manifest["family"]["airway"] == "normal"
    labels = label_map.labels.copy()
    assert (labels == 4).any()
    near = ndimage.binary_dilation(labels == 4, iterations=3) & np.isin(labels, (LUNG_L, LUNG_R))
    labels[near] = EXTERNAL
    found = check_anatomy(labels, series.volume.array, series.volume.geometry, NAMES, EXTERNAL, (LUNG_L, LUNG_R),
                          4, BONE)
    assert "airway_disconnected" in {f.check for f in found}, found


def test_the_unlabelled_lung_check_holds_no_volume_sized_copies(family):
    """The check that found the issue's failure labels the candidate regions once (2 bytes a sampled
    voxel while they number under 65 536) and takes sizes and medians from the candidates alone:
    np.bincount and scipy's median over the whole label volume cost several times that again (a
    512x512x300 CT: 244 MB, then 113 MB with 4-byte labels, now 75 MB)."""
    import tracemalloc

    study, series, label_map, flags, _ = family(0)
    labels = label_map.labels.copy()
    lung_slices = np.nonzero(np.isin(labels, (LUNG_L, LUNG_R)).any(axis=(1, 2)))[0]
    block = labels[lung_slices[: 2 * len(lung_slices) // 3]]
    block[np.isin(block, (LUNG_L, LUNG_R))] = EXTERNAL
    labels[lung_slices[: 2 * len(lung_slices) // 3]] = block
    geometry = series.volume.geometry
    step = max(1, int(2.0 // max(geometry.spacing[0], geometry.spacing[1])))
    sampled = labels[:, ::step, ::step].size
    tracemalloc.start()
    try:
        found = check_anatomy(labels, series.volume.array, geometry, NAMES, EXTERNAL, (LUNG_L, LUNG_R), 4, BONE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "lung_unlabelled" in {f.check for f in found}  # the check ran through to its flag
    assert peak < 6 * sampled, f"{peak / sampled:.1f} bytes a sampled voxel"  # 28, then 8 (int32 labels)


def test_region_labels_take_32_bits_when_16_do_not_hold_them():
    from node.anatomy.plausibility import _label

    few = np.zeros((2, 40, 40), dtype=bool)
    few[:, 5:9, 5:9] = few[:, 20:30, 20:30] = True
    regions, n = _label(few)
    assert n == 2 and regions.dtype == np.uint16
    many = np.zeros((2, 400, 400), dtype=bool)
    many[0, ::2, ::2] = many[1, 1::2, 1::2] = True  # 80 000 single voxels, none facing another
    regions, n = _label(many)
    assert n == 80_000 and regions.max() == 80_000 and regions.dtype.itemsize >= 4
