"""SR templates: the shipped ones load; a malformed one stops start-up naming file and key."""
from __future__ import annotations

import pytest

from node.encoders.sr_templates import TemplateError, load_template, sctid_is_valid, validate_all

GOOD = """
findings:
  lung: {type: {scheme: SCT, value: "39607008", meaning: Lung}}
measurements:
  volume: {concept: {scheme: SCT, value: "118565006", meaning: Volume}, unit: ml}
"""


def test_shipped_templates_validate():
    templates = validate_all()
    assert "ct-anatomy" in templates
    t = templates["ct-anatomy"]
    assert {"external", "lung_left", "lung_right", "airway", "bone"} <= set(t.findings)
    assert t.measurements["volume"].unit == "ml"
    assert t.measurements["hu_mean"].unit == "[hnsf'U]" and t.measurements["hu_mean"].derivation.value == "373098007"


def test_snomed_check_digit():
    assert sctid_is_valid("39607008") and sctid_is_valid("138875005")  # Lung; SNOMED CT root
    assert not sctid_is_valid("39607009") and not sctid_is_valid("3960700")  # typo; too short...
    assert not sctid_is_valid("0123456")  # ... leading zero


@pytest.mark.parametrize("text, key", [
    (GOOD.replace("39607008", "39607009"), r"findings\.lung\.type\.value '39607009'.*check digit"),
    (GOOD.replace("unit: ml", "unit: milli litre"), r"measurements\.volume\.unit 'milli litre' is not a UCUM code"),
    (GOOD.replace('"39607008"', "39607008"), r"findings\.lung\.type\.value must be a quoted string"),
    (GOOD.replace("meaning: Lung}", "meaning: Lung, colour: red}"),
     r"findings\.lung\.type must be a mapping with exactly"),
    (GOOD + "extra: 1\n", r"top level has unknown keys \['extra'\]"),
    (GOOD.replace("unit: ml", ""), r"measurements\.volume needs 'concept' and 'unit'"),
    (GOOD.replace("scheme: SCT, value: \"118565006\"", "scheme: LN, value: \"118565006\""),
     r"measurements\.volume\.concept\.value '118565006' is not a LN code"),
    ("findings: [1, 2]\n", r"findings must be a mapping"),
    ("findings: {a: {type: 1}\n", r"not valid YAML"),
])
def test_malformed_templates_name_file_and_key(tmp_path, text, key):
    (tmp_path / "broken.yaml").write_text(text)
    (tmp_path / "fine.yaml").write_text(GOOD)
    with pytest.raises(TemplateError, match=r"broken\.yaml: " + key):
        validate_all(tmp_path)


def test_load_template_reloads_a_changed_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(GOOD)
    assert load_template("t", tmp_path).measurements["volume"].unit == "ml"
    path.write_text(GOOD.replace("unit: ml", "unit: mm3"))
    import os

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert load_template("t", tmp_path).measurements["volume"].unit == "mm3"


def test_template_names_are_plain_file_names(tmp_path):
    with pytest.raises(TemplateError, match="not a plain file name"):
        load_template("../etc/passwd", tmp_path)
    with pytest.raises(TemplateError, match="does not exist"):
        load_template("absent", tmp_path)
