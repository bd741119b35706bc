"""Malformed rule files: every error names the file, the line and the field, in plain words."""
from __future__ import annotations

import textwrap

import pytest

from node.rules import RuleErrors, RuleSet
from node.rules.errors import RuleError
from tests.test_rules_support import DESTINATIONS, TEST_HANDLERS, lookup, write_rules

VALID = """\
name: ct-seg
match:
  Modality: CT
handler: test-seg
destinations: [orthanc]
"""


def load(files: dict[str, str]) -> RuleSet:
    return RuleSet.from_files({k: textwrap.dedent(v) for k, v in files.items()},
                              handlers=lookup(TEST_HANDLERS), destinations=DESTINATIONS)


def errors_of(text: str, name: str = "bad.yaml") -> list[RuleError]:
    with pytest.raises(RuleErrors) as exc:
        load({name: text})
    return exc.value.errors


def test_valid_file_loads():
    rs = load({"ok.yaml": VALID})
    assert [r.name for r in rs.rules] == ["ct-seg"]
    assert rs.rules[0].where() == "ok.yaml:1"


# (text, line, field, words the message must contain)
CASES = [
    ("name: a\nmatch: {Modality: CT\nhandler: test-seg\n", 3, None, "not valid YAML"),
    ("name: a\nmatch: {Modality: CT}\nhandler: test-seg\ndestination: [orthanc]\n", 4, "destination",
     "did you mean 'destinations'"),
    ("name: a\nmatch:\n  Modalty: CT\nhandler: test-seg\n", 3, "match.Modalty", "did you mean 'Modality'"),
    ("name: a\nmatch:\n  modality: CT\nhandler: test-seg\n", 3, "match.modality", "did you mean 'Modality'"),
    ("name: a\nmatch:\n  Modality: {equal: CT}\nhandler: test-seg\n", 3, "match.Modality.equal",
     "unknown operator 'equal'"),
    ("name: a\nmatch:\n  all:\n    - Modality: CT\n    - SliceThickness: {le: thin}\nhandler: test-seg\n", 5,
     "match.all[1].SliceThickness.le", "expects a number"),
    ("name: a\nmatch:\n  SliceThickness: thin\nhandler: test-seg\n", 3, "match.SliceThickness.equals",
     "SliceThickness is a number"),
    ("name: a\nmatch:\n  SeriesDescription: {matches: '(chest'}\nhandler: test-seg\n", 3,
     "match.SeriesDescription.matches", "does not compile"),
    ("name: a\nmatch:\n  SeriesDescription: {matches: '" + "a" * 600 + "'}\nhandler: test-seg\n", 3,
     "match.SeriesDescription.matches", "limit is 512"),
    ("name: a\nmatch: {Modality: CT}\nhandler: no-such-handler\n", 3, "handler.name", "unknown handler"),
    ("name: a\nmatch: {Modality: CT}\nhandler:\n  name: test-seg\n  params:\n    threshold: high\n", 6,
     "handler.params.threshold", "must be a number"),
    ("name: a\nmatch: {Modality: CT}\nhandler:\n  name: test-seg\n  params:\n    treshold: 0.3\n", 6,
     "handler.params.treshold", "did you mean 'threshold'"),
    ("name: a\nmatch: {Modality: CT}\nhandler: test-seg\ndestinations:\n  - orthanc\n  - pacs2\n", 6,
     "destinations[1]", "unknown destination 'pacs2'"),
    ("name: a\nmatch: {Modality: CT}\nhandler: test-seg\nhandler: test-overview\n", 4, "handler", "written twice"),
    ("name: a\nlevel: serie\nmatch: {Modality: CT}\nhandler: test-seg\n", 2, "level", "'series' or 'study'"),
    ("name: a\nmatch:\n  any_series: {Modality: CT}\nhandler: test-seg\n", 3, "match.any_series",
     "study-level rules"),
    ("name: a\nhandler: test-seg\n", 1, "match", "'match' is required"),
    ("name: a\nmatch: {Modality: CT}\n", 1, None, "the rule does nothing"),
    ("name: a\nmatch:\n  orientation: axail\nhandler: test-seg\n", 3, "match.orientation.equals",
     "one of axial, coronal, sagittal, oblique"),
    ("name: a\nmatch:\n  arrival_time: {between: [18h, '07:00']}\nhandler: test-seg\n", 3,
     "match.arrival_time.between[0]", "time of day"),
    ("name: a\nmatch:\n  is_volume: 'yes'\nhandler: test-seg\n", 3, "match.is_volume.equals", "true or false"),
    ("name: a\nmatch:\n  Modality: false\nhandler: test-seg\n", 3, "match.Modality.equals", "quote it"),
    ("name: a\nmatch: {Modality: CT}\nhandler: test-seg\nenabled: yes\n", 4, "enabled", "true or false"),
    ("name: a\nmatch:\n  SliceThickness: {between: [3, 1]}\nhandler: test-seg\n", 3,
     "match.SliceThickness.between", "larger than the second"),
    ("name: a\nmatch:\n  PatientName: {exists: yes please}\nhandler: test-seg\n", 3,
     "match.PatientName.exists", "true or false"),
    ("name: a\nmatch:\n  ReferencedImageSequence: {equals: x}\nhandler: test-seg\n", 3,
     "match.ReferencedImageSequence.equals", "is a sequence"),
    ("name: a\nmatch:\n  Modality: {exact: true}\nhandler: test-seg\n", 3, "match.Modality", "no operator given"),
    ("name: a\nmatch:\n  Modality:\nhandler: test-seg\n", 3, "match.Modality", "no value given"),
    ("name: a\nmatch:\n  all: {Modality: CT}\nhandler: test-seg\n", 3, "match.all", "needs a list"),
    ("name: a\nmatch: [Modality, CT]\nhandler: test-seg\n", 2, "match", "must be a mapping"),
    ("name: a b\nmatch: {Modality: CT}\nhandler: test-seg\n", 1, "name", "a rule name is"),
    ("name: a\norder: first\nmatch: {Modality: CT}\nhandler: test-seg\n", 2, "order", "whole number"),
    ("name: a\nmatch: {Modality: CT}\nhandler: test-seg\ntimeout: soon\n", 4, "timeout", "duration like"),
    ("name: a\nmatch: {Modality: CT}\nhandler: test-seg\nenabled: 'no'\n", 4, "enabled", "true or false"),
    ("name: a\nmatch: {Modality: CT}\nhandler: [test-seg]\n", 3, "handler", "a handler name"),
    ("name: a\nmatch: {Modality: CT}\nforward_originals: true\nhandler: test-seg\n", 1, None,
     "forward_originals needs at least one destination"),
    ("just a sentence\n", 1, None, "a rule file holds one rule"),
    ("- name: a\n  match: {Modality: CT}\n  handler: test-seg\n- 42\n", 4, None, "rule #2 must be a mapping"),
]


@pytest.mark.parametrize("text, line, field, words", CASES)
def test_error_names_file_line_field(text, line, field, words):
    errs = errors_of(text)
    assert any(e.file == "bad.yaml" and e.line == line and e.field == field and words in e.message
               for e in errs), "\n".join(str(e) for e in errs)


def test_all_problems_are_reported_at_once():
    text = ("name: a\nmatch:\n  Modalty: CT\n  SliceThickness: {le: thin}\nhandler: nope\n"
            "destinations: [mars]\nprority: urgent\n")
    errs = errors_of(text)
    assert sorted((e.line, e.field) for e in errs) == [
        (3, "match.Modalty"), (4, "match.SliceThickness.le"), (5, "handler.name"), (6, "destinations[0]"),
        (7, "prority")]


def test_error_text_for_an_admin():
    text = "- name: first\n  match: {Modality: CT}\n  handler: test-seg\n" \
           "- name: second\n  match:\n    SliceThickness: {le: thin}\n  handler: test-seg\n"
    (err,) = errors_of(text)
    assert err.rule == "second" and err.line == 6
    assert str(err) == ("bad.yaml:6: rule 'second', field 'match.SliceThickness.le': "
                        "expects a number, got the value 'thin'")
    assert "1 problem in the rules:" in RuleErrors([err]).text()
    assert "Traceback" not in RuleErrors([err]).text()


def test_duplicate_rule_names_across_files_name_both():
    with pytest.raises(RuleErrors) as exc:
        load({"a.yaml": VALID, "b.yaml": "\n\n" + VALID})
    (err,) = exc.value.errors
    assert (err.file, err.line, err.field) == ("b.yaml", 3, "name")
    assert "a.yaml:1" in err.message


def test_empty_file_holds_no_rules_and_comments_are_fine():
    rs = load({"empty.yaml": "# nothing yet\n", "ok.yaml": VALID})
    assert len(rs) == 1


def test_load_from_directory_ignores_non_rule_files(tmp_path):
    write_rules(tmp_path, {"ok.yaml": VALID, "notes.txt": "not yaml: [", ".hidden.yaml": "garbage: ["})
    (tmp_path / "ok.yaml~").write_text("garbage: [")
    rs = RuleSet.load(tmp_path, handlers=lookup(TEST_HANDLERS), destinations=DESTINATIONS)
    assert [r.name for r in rs.rules] == ["ct-seg"] and set(rs.files) == {"ok.yaml"}


def test_missing_directory_and_non_utf8_file(tmp_path):
    with pytest.raises(RuleErrors, match="does not exist"):
        RuleSet.load(tmp_path / "nope", handlers=lookup(TEST_HANDLERS), destinations=DESTINATIONS)
    (tmp_path / "latin.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(RuleErrors) as exc:
        RuleSet.load(tmp_path, handlers=lookup(TEST_HANDLERS), destinations=DESTINATIONS)
    assert exc.value.errors[0].file == "latin.yaml" and "UTF-8" in exc.value.errors[0].message


def test_handler_params_are_validated_and_normalised():
    rs = load({"ok.yaml": "name: a\nmatch: {Modality: CT}\nhandler:\n  name: test-seg\n  params:\n"
                          "    threshold: '0.25'\ndestinations: [tps]\n"})
    assert rs.rules[0].action.params == {"threshold": 0.25}  # validated by the handler's Params, as given
