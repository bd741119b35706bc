"""Hot reload, validated changes, versions, diff and revert."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from node.rules import RuleErrors, RulesService
from tests.test_rules_support import DESTINATIONS, TEST_HANDLERS, ct_header, facts, lookup, mr_header

CT_RULE = "name: ct\nmatch: {Modality: CT}\nhandler: test-seg\ndestinations: [orthanc]\n"
MR_RULE = "name: mr\nmatch: {Modality: MR}\nhandler: test-overview\ndestinations: [orthanc]\n"
CT = facts(ct_header())
MR = facts(mr_header())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def env(tmp_path: Path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "ct.yaml").write_text(CT_RULE)
    clock = Clock()
    svc = RulesService(rules, tmp_path / "history", lookup(TEST_HANDLERS), DESTINATIONS, check_interval=2.0,
                       clock=clock)
    return svc, rules, clock


def routed(svc: RulesService, f) -> list[str]:
    return [a.rule for a in svc.current().match_series(f)]


def test_start_records_the_initial_version(env):
    svc, _, _ = env
    (v1,) = svc.history()
    assert (v1.version, v1.author, v1.files) == (1, "rules directory", ("ct.yaml",))
    assert routed(svc, CT) == ["ct"]
    assert "+name: ct" in svc.diff(1)


def test_valid_hand_edit_takes_effect_after_the_check_interval(env):
    svc, rules, clock = env
    (rules / "mr.yaml").write_text(MR_RULE)
    assert routed(svc, MR) == []  # checked less than 2 s ago
    clock.now += 2.0
    assert routed(svc, MR) == ["mr"]
    v2 = svc.history()[-1]
    assert (v2.version, v2.author, v2.files) == (2, "rules directory", ("ct.yaml", "mr.yaml"))
    assert "--- /dev/null\n+++ b/mr.yaml\n" in svc.diff(2)


def test_invalid_hand_edit_keeps_the_previous_rules(env):
    svc, rules, clock = env
    (rules / "ct.yaml").write_text(CT_RULE.replace("Modality: CT", "Modality: {lt: CT}"))
    result = svc.reload()
    assert not result.changed and result.version is None
    (err,) = result.errors
    assert (err.file, err.line, err.field) == ("ct.yaml", 2, "match.Modality.lt")
    assert svc.errors == result.errors
    clock.now += 10
    assert routed(svc, CT) == ["ct"]  # still the previous set
    assert len(svc.history()) == 1
    (rules / "ct.yaml").write_text(CT_RULE.replace("orthanc", "tps"))  # fixed
    result = svc.reload()
    assert result.changed and result.version == 2 and result.errors == () and svc.errors == ()
    assert svc.current().match_series(CT)[0].destinations == ("tps",)


def test_apply_change_validates_writes_and_records(env):
    svc, rules, _ = env
    version = svc.apply_change({"mr.yaml": MR_RULE}, author="alice", message="MR overview")
    assert version == 2
    assert (rules / "mr.yaml").read_text() == MR_RULE
    assert routed(svc, MR) == ["mr"]
    info = svc.history()[-1]
    assert (info.author, info.message) == ("alice", "MR overview")
    assert svc.version_files(2) == {"ct.yaml": CT_RULE, "mr.yaml": MR_RULE}
    assert not [p for p in rules.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert svc.apply_change({"mr.yaml": MR_RULE}, author="bob") == 2  # no change, no new version


def test_propose_builds_the_changed_set_without_writing(env):
    svc, rules, _ = env
    proposed = svc.propose({"mr.yaml": MR_RULE, "ct.yaml": None})
    assert [r.name for r in proposed.rules] == ["mr"]
    assert sorted(p.name for p in rules.iterdir()) == ["ct.yaml"] and len(svc.history()) == 1
    assert [r.name for r in svc.current().rules] == ["ct"]


def test_refused_change_writes_nothing(env):
    svc, rules, _ = env
    bad = MR_RULE.replace("test-overview", "no-such-handler")
    assert [e.field for e in svc.validate({"mr.yaml": bad})] == ["handler.name"]
    with pytest.raises(RuleErrors) as exc:
        svc.apply_change({"mr.yaml": bad}, author="alice")
    assert exc.value.errors[0].file == "mr.yaml" and exc.value.errors[0].line == 3
    assert not (rules / "mr.yaml").exists()
    assert len(svc.history()) == 1 and routed(svc, MR) == []


def test_delete_and_bad_names(env):
    svc, rules, _ = env
    svc.apply_change({"mr.yaml": MR_RULE}, author="alice")
    assert svc.apply_change({"ct.yaml": None}, author="alice") == 3
    assert not (rules / "ct.yaml").exists() and routed(svc, CT) == []
    for name in ("../escape.yaml", ".hidden.yaml", "notes.txt"):
        with pytest.raises(RuleErrors, match="plain name ending in .yaml"):
            svc.apply_change({name: MR_RULE}, author="mallory")
    with pytest.raises(RuleErrors, match="no such rule file"):
        svc.apply_change({"nope.yaml": None}, author="alice")


def test_revert_restores_a_version(env):
    svc, rules, _ = env
    svc.apply_change({"mr.yaml": MR_RULE, "ct.yaml": CT_RULE.replace("orthanc", "tps")}, author="alice")
    new = svc.revert(1, author="bob")
    assert new == 3
    assert sorted(p.name for p in rules.iterdir()) == ["ct.yaml"]
    assert (rules / "ct.yaml").read_text() == CT_RULE
    assert routed(svc, MR) == [] and svc.current().match_series(CT)[0].destinations == ("orthanc",)
    info = svc.history()[-1]
    assert (info.author, info.message) == ("bob", "revert to version 1")
    assert "-name: mr" in svc.diff(3) and "-destinations: [tps]" in svc.diff(3)
    with pytest.raises(KeyError, match="no rules version 9"):
        svc.revert(9, author="bob")


def test_restart_with_invalid_directory_keeps_last_version(env, tmp_path):
    svc, rules, _ = env
    svc.apply_change({"mr.yaml": MR_RULE}, author="alice")
    (rules / "mr.yaml").write_text("name: mr\nmatch: [\n")
    again = RulesService(rules, tmp_path / "history", lookup(TEST_HANDLERS), DESTINATIONS)
    assert again.errors and again.errors[0].file == "mr.yaml"
    assert [a.rule for a in again.current().match_series(MR)] == ["mr"]  # version 2, from the history
    assert len(again.history()) == 2


def test_reload_while_series_arrive(env):
    """Routing goes on in other threads during edits: every decision comes from one whole rule set."""
    svc, rules, clock = env
    svc.check_interval = 0.0
    allowed = {("ct",), ("ct-v2",)}  # never () : no half-written or invalid state is ever active
    seen: list[tuple] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def route() -> None:
        try:
            while not stop.is_set():
                seen.append(tuple(a.rule for a in svc.current().match_series(CT)))
        except BaseException as exc:  # reported below: the test fails on any exception in a router
            failures.append(exc)

    threads = [threading.Thread(target=route) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(5):
            (rules / "ct.yaml").write_text("name: ct\nmatch: [broken\n")  # invalid: refused
            svc.reload()
            svc.apply_change({"ct.yaml": CT_RULE.replace("name: ct", "name: ct-v2")}, author="alice")
            svc.apply_change({"ct.yaml": CT_RULE}, author="alice")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures
    assert seen and set(seen) <= allowed
    assert svc.errors == ()
    assert routed(svc, CT) == ["ct"]
