"""Routing semantics: order, exclusive, fallback, disabled, levels, and the actions handed to the spine."""
from __future__ import annotations

import textwrap

import pytest

from node.rules import Action, RuleSet
from tests.test_rules_support import (DESTINATIONS, TEST_HANDLERS, ct_header, facts, lookup, mr_header, study)

FILES = {
    "10-ct.yaml": """\
        - name: seg-ct
          order: 10
          match: {Modality: CT}
          handler: {name: test-seg, params: {threshold: 0.7}}
          destinations: [orthanc]
          stable_after: 5m
          timeout: 90
        - name: chest-only
          order: 20
          exclusive: true
          match: {BodyPartExamined: CHEST}
          handler: test-overview
          destinations: [tps]
          priority: urgent
        - name: archive-ct
          order: 30
          match: {Modality: CT}
          destinations: [pacs]
        - name: switched-off
          order: 5
          enabled: false
          match: {Modality: CT}
          handler: test-overview
          destinations: [orthanc]
        """,
    "90-fallback.yaml": """\
        name: anything-else
        order: 100
        fallback: true
        match: {}
        handler: test-overview
        destinations: [orthanc]
        priority: offpeak
        """,
    "50-study.yaml": """\
        name: ct-plus-mr
        level: study
        match:
          all:
            - any_series: {Modality: CT}
            - any_series: {Modality: MR}
        handler: test-seg
        destinations: [tps]
        forward_originals: true
        """,
}


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return RuleSet.from_files({k: textwrap.dedent(v) for k, v in FILES.items()},
                              handlers=lookup(TEST_HANDLERS), destinations=DESTINATIONS)


def names(actions: list[Action]) -> list[str]:
    return [a.rule for a in actions]


def test_exclusive_stops_later_rules_and_disabled_never_runs(rules):
    assert names(rules.match_series(facts(ct_header()))) == ["seg-ct", "chest-only"]


def test_every_matching_rule_contributes_in_order(rules):
    assert names(rules.match_series(facts(ct_header(BodyPartExamined="HEAD")))) == ["seg-ct", "archive-ct"]


def test_fallback_only_when_nothing_else_matched(rules):
    assert names(rules.match_series(facts(mr_header()))) == ["anything-else"]
    assert "anything-else" not in names(rules.match_series(facts(ct_header())))


def test_levels_are_independent(rules):
    ct = facts(ct_header())
    mr = facts(mr_header(study=ct.study_uid))
    assert names(rules.match_study(study(ct, mr))) == ["ct-plus-mr"]
    assert rules.match_study(study(ct)) == []  # no study fallback: the series fallback is not used here
    assert "ct-plus-mr" not in names(rules.match_series(mr))


def test_action_fields(rules):
    seg, chest = rules.match_series(facts(ct_header()))
    assert seg == Action(rule="seg-ct", level="series", handler="test-seg", params={"threshold": 0.7},
                         destinations=("orthanc",), forward_originals=False, priority="normal", timeout=90.0,
                         stable_after=300.0)
    assert (chest.handler, chest.params, chest.priority, chest.timeout, chest.stable_after) == \
        ("test-overview", {}, "urgent", None, None)
    archive = rules.match_series(facts(ct_header(BodyPartExamined="HEAD")))[1]
    assert (archive.handler, archive.forward_originals, archive.destinations) == (None, True, ("pacs",))
    (st,) = rules.match_study(study(facts(ct_header()), facts(mr_header(study="1.2.826.0.1.3680043.10.1.1"))))
    assert (st.level, st.forward_originals, st.destinations) == ("study", True, ("tps",))
    assert hash(seg) == hash(rules.rule("seg-ct").action)  # frozen and hashable although params is a dict


def test_equal_order_runs_in_file_name_order():
    one = "name: {n}\norder: 7\nmatch: {{Modality: CT}}\nhandler: test-overview\ndestinations: [orthanc]\n"
    rs = RuleSet.from_files({"b.yaml": one.format(n="from-b"), "a.yaml": one.format(n="from-a")},
                            handlers=lookup(TEST_HANDLERS), destinations=DESTINATIONS)
    assert names(rs.match_series(facts(ct_header()))) == ["from-a", "from-b"]


def test_explain_agrees_with_match(rules):
    for f in (facts(ct_header()), facts(ct_header(BodyPartExamined="HEAD")), facts(mr_header())):
        assert list(rules.explain_series(f).actions) == rules.match_series(f)


def test_unknown_rule_name(rules):
    with pytest.raises(KeyError, match="no rule named"):
        rules.rule("nope")
