"""Rule files written to hurt (or by mistake) are refused when they load, with the field named,
instead of hanging the node, silently never matching, or killing the pull scheduler."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import types
from datetime import datetime

import pytest

from node.rules.errors import RuleErrors
from node.rules.loader import load_rules
from node.rules.priors import PriorsSpec
from node.rules.yamllines import MAX_NODES, parse_yaml
from tests.test_rules_support import ct_header, facts


def load(text: str, **kw):
    kw.setdefault("handlers", lambda n: type("H", (), {}))
    kw.setdefault("destinations", ["pacs"])
    kw.setdefault("sources", ["pacs"])
    return load_rules({"x.yaml": text}, **kw)


def refused(text: str, **kw) -> list[str]:
    """The problems of a refused rule file, each as 'file:line: rule ..., field ...: message'."""
    with pytest.raises(RuleErrors) as exc:
        load(text, **kw)
    return [str(e) for e in exc.value.errors]


def route(match: str) -> str:
    return f"name: r\nmatch: {match}\ndestinations: [pacs]\n"


# -- 1. YAML alias bomb --------------------------------------------------------------------------

def _bomb(levels: int) -> str:
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: r\nmatch: {{Modality: CT}}\ndestinations: [pacs]\ndescription: *a{levels - 1}\n"


def test_nested_aliases_are_refused_quickly_not_expanded():
    text = _bomb(9)  # ~500 bytes that expand to 10^9 values
    t0 = time.monotonic()
    parsed = parse_yaml(text)
    assert time.monotonic() - t0 < 10
    assert parsed.data is None and len(parsed.lines) == 0
    [p] = parsed.problems
    assert p.line is not None and f"more than {MAX_NODES}" in p.message and "alias" in p.message
    [err] = refused(text)
    assert err.startswith("x.yaml:1: ") and "alias" in err


def test_ordinary_aliases_still_work():
    text = "- &base\n  name: a\n  match: {Modality: CT}\n  destinations: [pacs]\n" \
           "- name: b\n  match: *base_match\n  destinations: [pacs]\n".replace("*base_match", "{Modality: MR}")
    text += "- name: c\n  match: &m {Modality: PT}\n  destinations: [pacs]\n- name: d\n  match: *m\n  destinations: [pacs]\n"
    assert [r.name for r in load(text)] == ["a", "b", "c", "d"]
    assert parse_yaml(_bomb(3)).problems == []  # 1 110 values: fine


# -- 2. numbers and text ---------------------------------------------------------------------------

@pytest.mark.parametrize("written, value", [
    ("0123", "0123"), ("-0123", "-0123"), ("0x1F", "0x1F"), ("0b101", "0b101"), ("0o17", "0o17"),
    ("1_000", "1_000"), ("012.5", "012.5"), ("1_000.5", "1_000.5"), ("18:00", "18:00"),
    ("0", 0), ("42", 42), ("-7", -7), ("1.5", 1.5), ("0.5", 0.5),
])
def test_yaml_1_1_only_numbers_stay_the_text_written(written, value):
    got = parse_yaml(f"v: {written}").data["v"]
    assert got == value and type(got) is type(value)


def test_leading_zero_patient_id_matches_as_written_not_as_octal():
    [r] = load(route("{PatientID: 0123}"))
    assert r.condition.test(facts(ct_header(PatientID="0123")))
    assert not r.condition.test(facts(ct_header(PatientID="83")))  # 0123 octal


@pytest.mark.parametrize("match, field, quoted", [
    ("{AccessionNumber: 12345}", "match.AccessionNumber.equals", "'12345'"),
    ("{AccessionNumber: [12345, '777']}", "match.AccessionNumber.in[0]", "'12345'"),
    ("{PatientID: {contains: 12}}", "match.PatientID.contains", "'12'"),
    ("{SeriesDescription: 2.5}", "match.SeriesDescription.equals", "'2.5'"),
    ("{calling_ae: 104}", "match.calling_ae.equals", "'104'"),  # derived text
])
def test_a_number_against_a_text_attribute_is_refused(match, field, quoted):
    [err] = refused(route(match))
    assert f"field '{field}'" in err and f"quote it: {quoted}" in err


def test_text_attributes_quoted_compare_as_text_and_numbers_stay_numeric():
    [r] = load(route("{AccessionNumber: '12345'}"))
    assert r.condition.test(facts(ct_header(AccessionNumber="12345")))
    assert not r.condition.test(facts(ct_header(AccessionNumber="012345")))
    assert not r.condition.test(facts(ct_header(AccessionNumber="12345.0")))
    # Numeric VRs, dates (documented as YYYYMMDD numbers) and private tags keep numbers.
    load(route("{SliceThickness: 1.6, InstanceNumber: 7, StudyDate: 20250312, '0009,1002': 2.5}"))


def test_time_of_day_equals_compares_with_the_dicom_tm_form():
    [r] = load(route("{StudyTime: '18:00'}"))
    assert r.condition.test(facts(ct_header(StudyTime="180000")))
    assert r.condition.test(facts(ct_header(StudyTime="180000.000")))
    assert not r.condition.test(facts(ct_header(StudyTime="180001")))
    [r] = load(route("{StudyTime: ['07:30', '18:00']}"))
    assert r.condition.test(facts(ct_header(StudyTime="073000")))
    for bad, field in (("180000", "equals"), ("'6pm'", "equals"), ("[1800]", "in[0]")):
        [err] = refused(route(f"{{StudyTime: {bad}}}"))
        assert f"field 'match.StudyTime.{field}'" in err and "'HH:MM'" in err


# -- 3. durations, spans and the pull scheduler ----------------------------------------------------

@pytest.mark.parametrize("field", ["stable_after", "timeout"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "169h", "604801"])
def test_durations_must_be_finite_and_at_most_a_week(field, value):
    [err] = refused(f"name: r\nmatch: {{Modality: CT}}\nhandler: h\n{field}: {value}\n")
    assert f"x.yaml:4: rule 'r', field '{field}'" in err


def test_a_week_is_still_a_duration():
    [r] = load("name: r\nmatch: {Modality: CT}\nhandler: h\nstable_after: 168h\ntimeout: 604800\n")
    assert (r.action.stable_after, r.action.timeout) == (604800.0, 604800.0)


@pytest.mark.parametrize("priors, field", [
    ("{within: .inf}", "priors.within"), ("{within: .nan}", "priors.within"), ("{within: 51y}", "priors.within"),
    ("{wait: .inf}", "priors.wait"), ("{within: 1e400}", "priors.within"),
])
def test_spans_must_be_finite_and_at_most_50_years(priors, field):
    [err] = refused(f"name: r\nmatch: {{Modality: CT}}\nhandler: h\npriors: {priors}\n")
    assert f"field '{field}'" in err
    assert PriorsSpec.model_validate({"within": "50y"}).within == 50 * 365 * 86400


def pull(schedule: str = "{}", query: str = "{ModalitiesInStudy: CT}") -> str:
    return f"kind: pull\nname: p\nsource: pacs\nquery: {query}\nschedule: {schedule}\n"


@pytest.mark.parametrize("schedule", ["{every: .nan}", "{every: .inf}", "{every: 745h}"])
def test_pull_every_must_be_finite_and_at_most_31_days(schedule):
    [err] = refused(pull(schedule))
    assert "field 'schedule.every'" in err


def test_pull_relative_date_must_be_finite():
    errs = refused(pull(query="{StudyDate: {last: .inf}}"))  # pydantic also reports the union's text branch
    assert any("field 'query.StudyDate.RelativeDate.last'" in e and "50 years" in e for e in errs)


class _Store:
    """What PullScheduler needs of a RetrieveStore, in memory."""

    def __init__(self) -> None:
        self.state: dict[str, dict] = {}
        self.lock = threading.Lock()

    def ensure_pull_state(self, name, next_at):
        with self.lock:
            return self.state.setdefault(name, {"next_at": next_at, "high_water": None, "last_error": None,
                                                "runs": 0})

    def pull_state(self, name):
        return self.state.get(name)

    def pull_ran(self, name, *, next_at, result, error, high_water):
        with self.lock:
            self.state[name].update(next_at=next_at, last_error=error, runs=self.state[name]["runs"] + 1)

    def expected_since(self, *a, **k):
        return 0


def test_one_bad_pull_rule_does_not_stop_the_scheduler(monkeypatch, caplog):
    """A rule that cannot be scheduled (here: a NaN interval that got past validation) is logged and
    recorded; the thread lives on and the next rule still runs."""
    from node.pacs import scheduler as sch

    good = load(pull("{every: 1h}"))[0]
    bad_spec = good.spec.model_copy(update={"schedule": good.spec.schedule.model_copy(update={"every": float("nan")})})
    bad = dataclasses.replace(good, name="bad", spec=bad_spec)
    client = types.SimpleNamespace(warnings=[], find_studies=lambda q: ([], 0))
    monkeypatch.setattr(sch, "source_client", lambda settings, name: client)
    store = _Store()
    ps = sch.PullScheduler(types.SimpleNamespace(rules_dir="/nonexistent"),
                           lambda: types.SimpleNamespace(pull_rules=[bad, good]), store, on_queued=lambda: None)
    with caplog.at_level(logging.ERROR, logger="hilum.pacs"):
        ps.start()
        try:
            deadline = time.monotonic() + 10
            while store.state.get("p", {}).get("runs", 0) < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert ps._thread.is_alive()
        finally:
            ps.stop()
    assert store.state["p"]["runs"] == 1 and store.state["p"]["last_error"] is None
    assert "scheduling failed" in (store.state["bad"]["last_error"] or "")
    assert store.state["bad"]["next_at"] > time.time() + 60  # pushed back, not retried in a tight loop
    assert any("pull rule bad" in r.getMessage() and r.exc_info for r in caplog.records)


# -- 4. several values joined by a backslash -----------------------------------------------------

@pytest.mark.parametrize("match, field", [
    ('{ImageType: "ORIGINAL\\\\PRIMARY\\\\AXIAL"}', "match.ImageType.equals"),
    ('{ImageType: {in: [AXIAL, "ORIGINAL\\\\PRIMARY"]}}', "match.ImageType.in[1]"),
    ('{ImageType: {contains: "PRIMARY\\\\AXIAL"}}', "match.ImageType.contains"),
])
def test_a_backslash_joined_operand_is_refused_with_what_to_write(match, field):
    [err] = refused(route(match))
    assert f"field '{field}'" in err
    assert "{ImageType: {contains: " in err and "ImageType: [" in err


def test_free_text_may_contain_a_backslash():
    [r] = load(route("{ImageComments: {contains: 'C:\\scans'}}"))  # YAML text C:\scans
    assert r.condition.test(facts(ct_header(ImageComments="from C:\\scans\\today")))


# -- 5. a pull window that never opens, priors.match keys ---------------------------------------

def test_a_pull_window_with_equal_ends_is_refused():
    [err] = refused(pull("{window: '05:00-05:00'}"))
    assert "field 'schedule.window'" in err and "never opens" in err
    load(pull("{window: '05:00-05:01'}"))
    load(pull("{window: '23:00-05:00'}"))


@pytest.mark.parametrize("match, words", [
    ("{Modallity: CT}", ["'Modallity'", "did you mean 'Modality'"]),
    ("{Modality: CT, BodyPart: CHEST}", ["'BodyPart'"]),
    ("{orientation: axial}", ["'orientation'", "DICOM keywords"]),
    ("{'0018,0015': CHEST}", ["'0018,0015'", "DICOM keywords"]),
    ("{ReferencedImageSequence: x}", ["sequence"]),
])
def test_priors_match_keys_must_be_dicom_keywords(match, words):
    [err] = refused(f"name: r\nmatch: {{Modality: CT}}\nhandler: h\npriors: {{match: {match}}}\n")
    assert "field 'priors.match'" in err
    for w in words:
        assert w in err


def test_priors_match_with_real_keywords_loads():
    [r] = load("name: r\nmatch: {Modality: CT}\nhandler: h\n"
               "priors: {match: {Modality: CT, BodyPartExamined: CHEST, SeriesDescription: LUNG, StudyDescription: X}}\n")
    assert r.action.priors["match"]["BodyPartExamined"] == "CHEST"


def test_facts_helper_sanity():
    # The facts() helper the tests above use carries the attributes they set.
    f = facts(ct_header(PatientID="0123", StudyTime="180000"), arrived_at=datetime(2025, 1, 1))
    assert f.get("PatientID") == ("0123",) and f.get("StudyTime") == ("180000",)
