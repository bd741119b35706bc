"""The rule files shipped in rules/ load and route the phantom series the way their comments say."""
from __future__ import annotations

from pathlib import Path

import pytest

from node.handler_api import get_handler, handler_names
from node.rules import RuleSet
from tests.test_rules_support import (BASIC_SR, SHIPPED_HANDLERS, US_IMAGE, ct_header, cr_header, facts, lookup,
                                      mr_header, other_header)

RULES_DIR = Path(__file__).resolve().parent.parent / "rules"
SHIPPED_NAMES = ("ct-anatomy", "renders", "overview", "registration", "lung-nodules")


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    # Only the two destinations the examples promise: an unknown one would fail the load.
    return RuleSet.load(RULES_DIR, handlers=lookup(SHIPPED_HANDLERS), destinations={"orthanc", "tps"})


def plan(rules: RuleSet, f) -> list[tuple]:
    return [(a.rule, a.handler, a.destinations, a.priority) for a in rules.match_series(f)]


def test_ct_chest_goes_to_anatomy_and_renders(rules):
    assert plan(rules, facts(ct_header())) == [
        ("ct-chest-anatomy", "ct-anatomy", ("orthanc", "tps"), "normal"),
        ("ct-chest-renders", "renders", ("orthanc",), "normal"),
        ("ct-chest-lung-nodules", "lung-nodules", ("orthanc",), "normal"),
    ]
    anatomy = rules.match_series(facts(ct_header()))[0]
    assert (anatomy.stable_after, anatomy.timeout) == (30.0, 600.0)


def test_ct_chest_recognised_by_description_alone(rules):
    f = facts(ct_header(BodyPartExamined=None, StudyDescription="CT", SeriesDescription="LUNG 1.0 B70f"))
    assert [p[0] for p in plan(rules, f)] == ["ct-chest-anatomy", "ct-chest-renders", "ct-chest-lung-nodules"]


def test_thick_ct_chest_gets_renders_only(rules):
    assert [p[0] for p in plan(rules, facts(ct_header(SliceThickness="8")))] == ["ct-chest-renders"]


@pytest.mark.parametrize("f", [
    facts(ct_header(BodyPartExamined="HEAD", StudyDescription="CT HEAD", SeriesDescription="Head 5.0")),
    facts(ct_header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), instance_count=2),
    facts(other_header(US_IMAGE, "US", "1.2.3.4", "1.2.3.4.1")),
])
def test_other_images_fall_back_to_an_offpeak_overview(rules, f):
    assert plan(rules, f) == [("fallback-overview", "overview", ("orthanc",), "offpeak")]


def test_mr_cr_dx_get_an_overview(rules):
    assert plan(rules, facts(mr_header())) == [("mr-overview", "overview", ("orthanc",), "normal")]
    assert plan(rules, facts(cr_header(), instance_count=1)) == [
        ("radiography-overview", "overview", ("orthanc",), "normal")]
    assert plan(rules, facts(cr_header(modality="DX"), instance_count=1)) == [
        ("radiography-overview", "overview", ("orthanc",), "normal")]


def test_reports_and_hilum_results_are_left_alone(rules):
    assert plan(rules, facts(other_header(BASIC_SR, "SR", "1.2.3.5", "1.2.3.5.1"))) == []
    assert plan(rules, facts(ct_header(Manufacturer="Hilum", BodyPartExamined="HEAD", StudyDescription="x",
                                       SeriesDescription="x"))) == []


def test_examples_name_the_handlers_and_destinations_the_node_ships():
    used = {n for n in SHIPPED_NAMES}
    with pytest.raises(Exception, match="unknown destination 'tps'"):
        RuleSet.load(RULES_DIR, handlers=lookup(SHIPPED_HANDLERS), destinations={"orthanc"})
    rules = RuleSet.load(RULES_DIR, handlers=lookup(SHIPPED_HANDLERS), destinations={"orthanc", "tps"})
    assert {r.action.handler for r in rules.rules} == used


def test_examples_validate_against_the_real_handlers():
    """Each handler registered in this tree checks the examples' parameters with its own Params model."""
    real = set(handler_names())

    def handlers(name: str) -> type:
        return get_handler(name) if name in real else SHIPPED_HANDLERS[name]

    rules = RuleSet.load(RULES_DIR, handlers=handlers, destinations={"orthanc", "tps"})
    assert len(rules) == 8


def test_mr_and_ct_in_one_study_are_registered_a_ct_alone_is_not(rules):
    from node.rules.facts import StudyFacts

    both = StudyFacts([facts(ct_header()), facts(mr_header())])
    assert [a.rule for a in rules.match_study(both)] == ["mr-to-ct-registration"]
    assert [a.rule for a in rules.match_study(StudyFacts([facts(ct_header())]))] == []
