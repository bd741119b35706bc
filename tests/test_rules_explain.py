"""Explain: per rule, matched or not and why (first failing condition with its actual value)."""
from __future__ import annotations

import textwrap

import pytest

from node.rules import RuleSet, render_text
from node.rules.from_files import facts_from_paths
from tests.test_rules_support import DESTINATIONS, TEST_HANDLERS, ct_header, facts, lookup, mr_header, study

RULES = {
    "rules.yaml": """\
        - name: thin-ct
          order: 10
          match:
            Modality: CT
            SliceThickness: {le: 1}
          handler: test-seg
          destinations: [tps]
        - name: chest
          order: 20
          exclusive: true
          match:
            not: {ImageType: {contains: LOCALIZER}}
            any:
              - BodyPartExamined: CHEST
              - StudyDescription: {matches: '.*thorax.*'}
          handler: test-overview
          destinations: [orthanc]
        - name: shadowed
          order: 30
          match: {Modality: CT}
          destinations: [pacs]
        - name: off
          order: 40
          enabled: false
          match: {Modality: MR}
          handler: test-overview
          destinations: [orthanc]
        - name: rest
          order: 99
          fallback: true
          match: {}
          handler: test-overview
          destinations: [orthanc]
        - name: both
          level: study
          match: {all_series: {Modality: CT}}
          handler: test-seg
          destinations: [tps]
        """,
}


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return RuleSet.from_files({k: textwrap.dedent(v) for k, v in RULES.items()},
                              handlers=lookup(TEST_HANDLERS), destinations=DESTINATIONS)


def by_rule(explanation):
    return {o.rule: o for o in explanation.outcomes}


def test_ct_chest_explanation(rules):
    ex = rules.explain_series(facts(ct_header()))
    o = by_rule(ex)
    assert [x.rule for x in ex.outcomes] == ["thin-ct", "chest", "shadowed", "off", "rest"]
    assert o["thin-ct"].status == "not_matched"
    assert o["thin-ct"].failure.path == "match.SliceThickness.le"
    assert o["thin-ct"].failure.condition == "SliceThickness <= 1"
    assert o["thin-ct"].failure.actual == "SliceThickness = 1.6"
    assert o["chest"].status == "matched" and o["chest"].failure is None
    assert "BodyPartExamined = CHEST" in o["chest"].reason
    assert o["shadowed"].status == "skipped" and o["shadowed"].holds  # would match, shadowed by the exclusive rule
    assert "exclusive rule 'chest'" in o["shadowed"].reason
    assert o["off"].status == "disabled" and not o["off"].holds
    assert "Modality = CT" in o["off"].reason
    assert o["rest"].status == "skipped" and "fallback not needed: chest matched" in o["rest"].reason
    assert [a.rule for a in ex.actions] == ["chest"]


def test_not_and_any_failures_show_the_values(rules):
    ex = rules.explain_series(facts(ct_header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])))
    chest = by_rule(ex)["chest"]
    assert chest.failure.path == "match.not"
    assert chest.failure.condition == "not (ImageType contains 'LOCALIZER')"
    assert chest.failure.actual == "ImageType = ORIGINAL\\PRIMARY\\LOCALIZER"

    ex = rules.explain_series(facts(ct_header(BodyPartExamined="HEAD", StudyDescription="CT HEAD")))
    chest = by_rule(ex)["chest"]
    assert chest.failure.path == "match.any"
    assert chest.failure.actual == "none holds: BodyPartExamined = HEAD; StudyDescription = CT HEAD"
    assert by_rule(ex)["shadowed"].status == "matched"


def test_missing_attribute_is_shown_as_missing(rules):
    ex = rules.explain_series(facts(ct_header(SliceThickness=None)))
    assert by_rule(ex)["thin-ct"].failure.actual == "SliceThickness is missing"


def test_fallback_applies_when_nothing_matched(rules):
    ex = rules.explain_series(facts(mr_header()))
    o = by_rule(ex)
    assert o["rest"].status == "matched"
    assert [a.rule for a in ex.actions] == ["rest"]


def test_study_explanation_names_the_failing_series(rules):
    ct = facts(ct_header())
    mr = facts(mr_header(study=ct.study_uid))
    ex = rules.explain_study(study(ct, mr))
    (both,) = ex.outcomes
    assert both.status == "not_matched"
    assert both.failure.actual == f"series {mr.series_uid}: Modality = MR"
    assert ex.uid == ct.study_uid


def test_text_rendering(rules):
    text = render_text([rules.explain_series(facts(ct_header())), rules.explain_study(study(facts(ct_header())))])
    lines = text.splitlines()
    assert lines[0].startswith("Series rules for series 1.2.826.0.1.3680043.10.1.1.1 (CT, Thorax 1.0 B31f, 120")
    assert "  [no match] thin-ct  (rules.yaml:1, order 10)" in lines
    assert "               SliceThickness <= 1 -- actual: SliceThickness = 1.6" in lines
    assert "  [match]    chest  (rules.yaml:8, order 20, exclusive)" in lines
    assert "               -> run test-overview; results to orthanc" in lines
    assert "  => 1 action:" in lines
    assert any(ln.startswith("Study rules for study 1.2.826.0.1.3680043.10.1.1 (1 series)") for ln in lines)
    assert "  [match]    both  (rules.yaml:34, order 100)" in lines
    # A destination limited to some modalities says so: a TPS taking CT and RTSTRUCT gets no SEG.
    limited = render_text([rules.explain_study(study(facts(ct_header())))], only={"tps": ["CT", "RTSTRUCT"]})
    assert "               -> run test-seg; results to tps (CT, RTSTRUCT only)" in limited.splitlines()
    assert "results to tps\n" in render_text([rules.explain_study(study(facts(ct_header())))])


def test_explanation_serialises(rules):
    d = rules.explain_series(facts(ct_header())).to_dict()
    assert d["rules"][0]["failure"] == {"path": "match.SliceThickness.le", "condition": "SliceThickness <= 1",
                                        "actual": "SliceThickness = 1.6"}
    assert d["actions"][0]["destinations"] == ["orthanc"]


def test_explain_dicom_files_on_disk(rules, tmp_path):
    """What ``hilum rules test PATH`` does: read headers from a folder, explain every series and study."""
    for i in range(3):
        ds = ct_header()
        ds.SOPInstanceUID = f"{ds.SeriesInstanceUID}.{i + 1}"
        ds.save_as(tmp_path / f"ct{i}.dcm", enforce_file_format=True)
    (tmp_path / "sub").mkdir()
    mr_header(study="1.2.826.0.1.3680043.10.1.1").save_as(tmp_path / "sub" / "mr.dcm", enforce_file_format=True)
    (tmp_path / "README.txt").write_text("not DICOM")
    read = facts_from_paths([tmp_path], calling_ae="MODALITY")
    assert read.skipped == [str(tmp_path / "README.txt")]
    (st,) = read.studies
    counts = {s.get("Modality")[0]: s.instance_count for s in st.series}
    assert counts == {"CT": 3, "MR": 1}
    assert all(s.get("calling_ae") == ("MODALITY",) for s in st.series)
    text = render_text([rules.explain_series(s) for s in st.series] + [rules.explain_study(st)])
    assert "(CT, Thorax 1.0 B31f, 3 instances)" in text and "(MR, t1_mprage_sag, 1 instance)" in text
    assert "every series: Modality equals 'CT' -- actual: series 1.2.826.0.1.3680043.10.1.2.1: Modality = MR" in text
