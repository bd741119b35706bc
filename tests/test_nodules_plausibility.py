"""Plausibility of lung-nodules and ct-anatomy results that were silently wrong before:

- lung-nodules on thick slices (``thick_slices``), candidates seen but none measured
  (``candidates_unmeasured``), a prior acquired differently (``followup_acquisition_mismatch``: no
  change call, no doubling time), a follow-up interval under a week or negative (``followup_interval``),
  and the same date source for the current study and the prior; with a detector, a prior outside its
  validated domain (``prior_<check>_out_of_domain``: no change call either);
- ct-anatomy lungs cut by the scan's coverage or field of view (``lung_truncated``).

The same phantom patient (5 solid 5-9 mm nodules) at 1, 2.5, 3 and 5 mm slices; small grids so each
test takes seconds. A normal 1 mm pair 120 days apart stays unflagged and keeps its doubling times.
"""
from __future__ import annotations

import copy
import datetime as dt
import functools

import pytest

from handlers.lung_nodules import _acquired
from node.handler_api import HandlerInput, PriorStudy, get_handler
from node.jobs.priors_input import load_priors
from node.nodules.followup import Acquisition, change, comparison_problems, interval_problem
from node.phantom import generate_ct, generate_followup
from node.results import MeasurementReport, ResultSet, TextFinding
from node.volume import SeriesData, load_series

PATIENT = dict(seed=31, rows=192, cols=192, pixel_spacing=1.8, nodules=5, nodule_diameter_mm=(5.0, 9.0),
               ground_glass_fraction=0.0, z_center_mm=0.0)
SLICES = {1.0: 80, 2.5: 32, 3.0: 27, 5.0: 16}  # about 80 mm of chest at each thickness


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    @functools.cache
    def make(thickness: float):
        study = generate_ct(tmp_path_factory.mktemp(f"t{thickness}") / "ct", slices=SLICES[thickness],
                            slice_thickness=thickness, **PATIENT)
        return study, load_series(study.series_files())
    return make


@pytest.fixture(scope="module")
def later(ct, tmp_path_factory):
    """The 1 mm study's follow-up 120 days later (1 mm too), moved a little: a normal pair."""
    base, _ = ct(1.0)
    study = generate_followup(base, tmp_path_factory.mktemp("later") / "ct", interval_days=120, new_nodules=0,
                              rotation_deg=(0.5, -0.5, 1.0), shift_mm=(2.0, -1.0, 1.0))
    return study, load_series(study.series_files())


def _run(series, priors=()):
    return get_handler("lung-nodules")({"registration": "rigid"}).run(
        HandlerInput(series.series_uid, [series], priors=list(priors)), lambda f, m: None)


def _checks(results) -> list[str]:
    return sorted(f.check for f in ResultSet(results).flags)


def _groups(results) -> dict:
    report = next((r for r in results if isinstance(r, MeasurementReport)), None)
    return {} if report is None else {g.tracking_id: g for g in report.groups}


def _values(group) -> dict:
    return {m.name: m.value for m in group.measurements}


@pytest.mark.parametrize("thickness,flagged", [(1.0, False), (3.0, True), (5.0, True)])
def test_thick_slices_are_flagged(ct, thickness, flagged):
    _, series = ct(thickness)
    results = _run(series)
    checks = _checks(results)
    assert ("thick_slices" in checks) == flagged, checks
    if thickness == 1.0:
        assert checks == [] and len(_groups(results)) == 5
    if flagged:
        reason = next(f.reason for f in ResultSet(results).flags if f.check == "thick_slices")
        assert "small nodules may be missed" in reason and f"{thickness:g} mm" in reason


def test_no_nodule_is_never_said_silently_when_candidates_were_seen(ct):
    """At 5 mm the detector sees the nodules (candidates of solid-nodule strength) but none can be
    measured: "no nodule found" comes with a flag saying so (before: no flag at all)."""
    _, series = ct(5.0)
    results = _run(series)
    assert not _groups(results)
    assert any("No lung nodule" in r.text for r in results if isinstance(r, TextFinding))
    flags = {f.check: f for f in ResultSet(results).flags}
    assert "candidates_unmeasured" in flags and "nodules may be present" in flags["candidates_unmeasured"].reason


def test_normal_thin_followup_is_unflagged_with_its_doubling_times(ct, later):
    base, base_series = ct(1.0)
    study, series = later
    results = _run(series, [PriorStudy(base.study_uid, None, [base_series])])
    assert _checks(results) == []
    groups = _groups(results)
    persistent = [g for g in groups.values() if dict(g.qualitative)["status"] == "persistent"]
    assert len(persistent) >= 3
    for g in persistent:
        v = _values(g)
        assert v["interval"] == pytest.approx(study.changes["interval_days"])
        assert "volume_change" in v and "change" in dict(g.qualitative)
    assert any("volume_doubling_time" in _values(g) for g in persistent)  # grown/shrunk ones


def test_prior_of_another_slice_thickness_gives_no_change_call(ct):
    """The same anatomy at 2.5 mm (prior) and 1 mm (current): before, a 5.3 mm nodule was called
    shrinking by 64 % with a doubling time of -125 days."""
    _, thin = ct(1.0)
    prior_study, thick = ct(2.5)
    now = _acquired(thin)
    results = _run(thin, [PriorStudy(prior_study.study_uid, now - dt.timedelta(days=200), [thick])])
    flags = {f.check: f for f in ResultSet(results).flags}
    assert set(flags) == {"followup_acquisition_mismatch"}
    assert "slice spacing 2.5 mm (prior) vs 1 mm (current)" in flags["followup_acquisition_mismatch"].reason
    persistent = [g for g in _groups(results).values() if dict(g.qualitative)["status"] == "persistent"]
    assert persistent
    for g in persistent:
        v = _values(g)
        assert "change" not in dict(g.qualitative)
        assert not {"volume_change", "diameter_change", "volume_doubling_time"} & set(v)
        assert {"prior_volume", "prior_mean_diameter", "volume", "interval"} <= set(v)  # measurements stay
    texts = " ".join(r.text for r in results if isinstance(r, TextFinding))
    assert "No volume change, growth call or doubling time" in texts


def test_a_kernel_or_thickness_change_is_a_mismatch_and_alike_scans_are_not():
    same = Acquisition(1.0, 1.0, "STANDARD")
    assert comparison_problems(same, Acquisition(1.2, 1.25, "STANDARD")) == []  # within 25 %
    assert comparison_problems(same, Acquisition(1.0, None, None)) == []  # what is missing is not compared
    assert comparison_problems(same, Acquisition(5.0, 5.0, "STANDARD"))[0].startswith("slice spacing 5 mm")
    (kernel,) = comparison_problems(same, Acquisition(1.0, 1.0, "LUNG"))
    assert "kernel LUNG (prior) vs STANDARD (current)" in kernel


def test_follow_up_interval_is_checked(ct, later):
    """A same-day re-scan gave a doubling time of 0.22 d, and a prior dated after the current study a
    negative interval in the SR: both flagged, neither a change call nor a doubling time."""
    assert change(100.0, 5.8, 130.0, 6.3, 2 / 24).vdt_days is None
    assert change(100.0, 5.8, 200.0, 7.3, -30.0).vdt_days is None
    assert interval_problem(2 / 24) and interval_problem(0.0) and interval_problem(-30.0)
    assert interval_problem(7.0) is None and interval_problem(120.0) is None
    base, base_series = ct(1.0)
    _, series = later
    # one registration run: the prior dated 30 days after the current study (a same-day one is the
    # same code path, covered by interval_problem above)
    results = _run(series, [PriorStudy(base.study_uid, _acquired(series) + dt.timedelta(days=30), [base_series])])
    flags = {f.check: f for f in ResultSet(results).flags}
    assert set(flags) == {"followup_interval"}
    assert "30.0 days after the current study" in flags["followup_interval"].reason
    persistent = [g for g in _groups(results).values() if dict(g.qualitative)["status"] == "persistent"]
    assert persistent
    for g in persistent:
        v = _values(g)
        assert "change" not in dict(g.qualitative) and not {"volume_change", "volume_doubling_time"} & set(v)
        assert "interval" not in v and "prior_volume" in v  # never a negative interval in the SR


def test_current_and_prior_are_dated_from_the_same_tags(ct):
    """The prior is dated by StudyDate first (node.jobs.priors_input); the current study was dated by
    AcquisitionDate first: a study acquired over midnight, or an AcquisitionDate of reconstruction,
    shifted the interval."""
    _, series = ct(1.0)
    first = copy.deepcopy(series.first)
    first.StudyDate, first.StudyTime = "20240101", "080000"
    first.AcquisitionDate, first.AcquisitionTime = "20240105", "120000"
    odd = SeriesData(series.series_uid, "CT", [first, *series.datasets[1:]], series.volume)
    (prior,) = load_priors({"priors": [{"study_uid": "1.2", "source": "node", "series": {"s": ["x"]},
                                         "study_date": "", "study_time": ""}]}, lambda paths: odd)
    assert _acquired(odd) == prior.acquired == dt.datetime(2024, 1, 1, 8, 0, 0)


# --- ct-anatomy: lungs cut by coverage or field of view -------------------------------------------

CHEST = dict(rows=128, cols=128, pixel_spacing=3.0, nodules=0, seed=21)
COVERAGE = {
    "full chest 300 mm": dict(slices=60, slice_thickness=5.0, z_center_mm=0.0),
    "slab 60 mm, bases": dict(slices=12, slice_thickness=5.0, z_center_mm=-45.0),
    "slab 60 mm, middle": dict(slices=12, slice_thickness=5.0, z_center_mm=10.0),
    "field of view 200 mm": dict(slices=60, slice_thickness=5.0, z_center_mm=0.0, fov_mm=200.0),
    "reconstruction circle 260 mm": dict(slices=60, slice_thickness=5.0, z_center_mm=0.0, fov_mm=260.0,
                                         padding_hu=-3024),
}


@pytest.mark.parametrize("case", list(COVERAGE))
def test_lungs_cut_by_the_scan_are_flagged(case, tmp_path):
    study = generate_ct(tmp_path / "ct", **CHEST, **COVERAGE[case])
    series = load_series(study.series_files())
    results = get_handler("ct-anatomy")().run(HandlerInput(study.study_uid, [series]), lambda f, m: None)
    flags = ResultSet(results).flags
    print(case, [f.text for f in flags])
    truncated = sorted(f.structure for f in flags if f.check == "lung_truncated")
    if case.startswith("full chest"):
        assert flags == []  # its apex on the first slice is not a cut lung
    else:
        assert truncated == ["Lung_L", "Lung_R"]
        assert all("is that of the part scanned" in f.reason for f in flags if f.check == "lung_truncated")


def test_a_prior_outside_the_detectors_domain_gives_no_change_call(ct, later, tmp_path):
    """With a detector (a model card), the prior's nodules come from that model too: a prior outside
    its validated domain (here another body part) is flagged ``prior_body_region_out_of_domain`` and
    gets no change call or doubling time; the same prior inside the domain is not flagged."""
    from dataclasses import replace

    from node.handler_api import ModelRef
    from tests.test_nodule_detector import _dense

    folder = _dense(tmp_path, validated_domain={"modality": "CT", "body_regions": ["CHEST"]})
    ref = ModelRef("dense", "7", str(folder))
    base, base_series = ct(1.0)
    _, series = later
    header = copy.deepcopy(base_series.datasets[0])
    header.BodyPartExamined = "ABDOMEN"
    abdomen = replace(base_series, datasets=[header, *base_series.datasets[1:]])

    def run(prior_series):
        handler = get_handler("lung-nodules")({"registration": "rigid", "detector": "dense"})
        inp = HandlerInput(series.series_uid, [series], priors=[PriorStudy(base.study_uid, None, [prior_series])],
                           models={"detector": ref})
        assert handler.assess_input(inp) == []  # the current scan is inside the domain
        return handler.run(inp, lambda f, m: None)

    inside = run(base_series)
    assert _checks(inside) == []
    assert any("volume_change" in _values(g) for g in _groups(inside).values())
    outside = run(abdomen)
    flags = {f.check: f for f in ResultSet(outside).flags}
    assert set(flags) == {"prior_body_region_out_of_domain"}
    reason = flags["prior_body_region_out_of_domain"].reason
    assert f"prior study {base.study_uid}" in reason and "body part ABDOMEN" in reason and "detector dense 7" in reason
    assert flags["prior_body_region_out_of_domain"].kind == "domain"
    persistent = [g for g in _groups(outside).values() if dict(g.qualitative)["status"] == "persistent"]
    assert persistent
    for g in persistent:
        assert not {"volume_change", "diameter_change", "volume_doubling_time"} & set(_values(g))
    texts = " ".join(r.text for r in outside if isinstance(r, TextFinding))
    assert "outside the detector's validated domain" in texts
