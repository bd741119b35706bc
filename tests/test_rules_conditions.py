"""Every operator and combinator, table-driven, including missing and multi-valued attributes."""
from __future__ import annotations

import logging
from datetime import datetime

import pytest

from node.rules.conditions import compile_condition
from node.rules.yamllines import parse_yaml
from tests.test_rules_support import ct_header, facts, mr_header, study

CT = facts(ct_header(ImageComments="contrast late phase"))  # SliceThickness '1.6000', PixelSpacing 0.7\0.8


def holds(condition_yaml: str, subject=CT, level: str = "series") -> bool:
    parsed = parse_yaml(condition_yaml)
    assert not parsed.problems
    cond, problems = compile_condition(parsed.data, level=level)
    assert not problems, problems
    return cond.test(subject)


@pytest.mark.parametrize("cond, expected", [
    # equals: case-insensitive unless exact; numbers compare as numbers
    ("Modality: CT", True),
    ("Modality: ct", True),
    ("Modality: {equals: ct}", True),
    ("Modality: {equals: ct, exact: true}", False),
    ("Modality: {equals: CT, exact: true}", True),
    ("Modality: MR", False),
    ("SliceThickness: 1.6", True),  # DS '1.6000' in the file
    ("SliceThickness: {equals: '1.6'}", True),
    ("SliceThickness: {equals: 1.60000001}", False),
    ("InstanceNumber: 7", True),  # IS
    ("SeriesNumber: '03'", True),  # a numeric attribute compared with numeric text
    ("'0009,1002': 2.5", True),  # private DS '2.50'
    ("'0009,1001': LUNG-PROTOCOL", True),
    ("ImageType: AXIAL", True),  # multi-valued: any value
    ("ImageType: {equals: AXIAL, all: true}", False),
    ("ContrastBolusAgent: IODINE", False),  # missing
    # in
    ("Modality: [MR, CT]", True),
    ("Modality: {in: [mr, ct]}", True),
    ("Modality: {in: [mr, ct], exact: true}", False),
    ("Modality: [MR, PT]", False),
    ("SliceThickness: {in: [1.6, 3]}", True),
    ("ContrastBolusAgent: [A, B]", False),
    # contains: element of a multi-valued attribute, substring of a single-valued one
    ("ImageType: {contains: AXIAL}", True),
    ("ImageType: {contains: axial}", True),
    ("ImageType: {contains: AXI}", False),
    ("ImageType: {contains: LOCALIZER}", False),
    ("SeriesDescription: {contains: thorax}", True),
    ("SeriesDescription: {contains: thorax, exact: true}", False),
    ("StudyDescription: {contains: CHEST}", True),
    ("ImageComments: {contains: LATE}", True),
    ("ContrastBolusAgent: {contains: x}", False),
    # matches: full match, case-insensitive unless exact
    ("SeriesDescription: {matches: 'thorax.*'}", True),
    ("SeriesDescription: {matches: 'Thorax'}", False),  # full match, not search
    ("SeriesDescription: {matches: '.*B31f'}", True),
    ("SeriesDescription: {matches: '.*b31f', exact: true}", False),
    ("ImageType: {matches: 'AX.*'}", True),
    ("ImageType: {matches: '[A-Z]+', all: true}", True),
    ("ImageType: {matches: 'P.*', all: true}", False),
    ("SliceThickness: {matches: '1\\.6'}", True),  # numbers are matched in their plain form
    ("ContrastBolusAgent: {matches: '.*'}", False),
    # numeric comparisons on DS/IS text
    ("SliceThickness: {lt: 2}", True),
    ("SliceThickness: {lt: 1.6}", False),
    ("SliceThickness: {le: 1.6}", True),
    ("SliceThickness: {gt: 1.6}", False),
    ("SliceThickness: {ge: '1.6000'}", True),
    ("SliceThickness: {between: [1, 2]}", True),
    ("SliceThickness: {between: [1.6, 1.6]}", True),
    ("SliceThickness: {between: [2, 3]}", False),
    ("PixelSpacing: {gt: 0.75}", True),  # any value
    ("PixelSpacing: {gt: 0.75, all: true}", False),
    ("PixelSpacing: {between: [0.5, 1], all: true}", True),
    ("Rows: {ge: 512}", True),  # US
    ("'0009,1002': {gt: 2}", True),
    ("SeriesDescription: {gt: 1}", False),  # text that is not a number never compares
    ("ContrastBolusVolume: {lt: 100}", False),  # missing
    ("ContrastBolusVolume: {ge: 0}", False),
    # dates as numbers YYYYMMDD, times of day
    ("StudyDate: {ge: 20250101}", True),
    ("StudyDate: {ge: 2025-04-01}", False),
    ("StudyDate: '20250312'", True),
    ("StudyTime: {between: ['08:00', '17:00']}", True),
    ("StudyTime: {between: [18:00, 07:00]}", False),  # overnight window; unquoted times stay times
    # exists / missing
    ("BodyPartExamined: {exists: true}", True),
    ("BodyPartExamined: {missing: true}", False),
    ("ContrastBolusAgent: {exists: true}", False),
    ("ContrastBolusAgent: {missing: true}", True),
    ("ContrastBolusAgent: {exists: false}", True),
    ("'0009,1001': {exists: true}", True),
    ("'0009,10FF': {missing: true}", True),
    # several operators on one attribute, several attributes in one mapping: all must hold
    ("SliceThickness: {gt: 1, lt: 2}", True),
    ("SliceThickness: {gt: 1, lt: 1.5}", False),
    ("{Modality: CT, BodyPartExamined: CHEST}", True),
    ("{Modality: CT, BodyPartExamined: HEAD}", False),
    # combinators
    ("{}", True),
    ("all: [{Modality: CT}, {SliceThickness: {le: 2}}]", True),
    ("all: [{Modality: CT}, {SliceThickness: {le: 1}}]", False),
    ("any: [{Modality: MR}, {BodyPartExamined: CHEST}]", True),
    ("any: [{Modality: MR}, {BodyPartExamined: HEAD}]", False),
    ("not: {Modality: MR}", True),
    ("not: {Modality: CT}", False),
    ("not: {ContrastBolusAgent: IODINE}", True),  # a missing value is "not equal"
    ("not: {ImageType: {contains: LOCALIZER}}", True),
    ("all: [{Modality: CT}, {any: [{BodyPartExamined: HEAD}, {not: {any: [{Modality: MR}, {Rows: {lt: 256}}]}}]}]", True),
    ("any: [{all: [{Modality: CT}, {Rows: {lt: 256}}]}, {all: [{Modality: MR}]}]", False),
    # derived attributes
    ("instance_count: {ge: 100}", True),
    ("orientation: axial", True),
    ("orientation: [coronal, sagittal]", False),
    ("is_volume: true", True),
    ("is_volume: false", False),
    ("patient_age: {between: [40, 50]}", True),  # from birth date 1980-06-15, study 2025-03-12
    ("patient_age: {lt: 18}", False),
    ("calling_ae: {matches: 'CT_.*'}", True),
    ("called_ae: hilum", True),
    ("source_ip: {matches: '10\\.1\\..*'}", True),
    ("arrival_time: {between: ['14:00', '15:00']}", True),
    ("arrival_time: {ge: '18:00'}", False),
    ("arrival_weekday: [Sat, Sun]", False),
    ("arrival_weekday: wed", True),
])
def test_series_conditions(cond, expected):
    assert holds(cond) is expected


@pytest.mark.parametrize("hour, minute, weekday_expected, after_hours", [
    (22, 0, "Wed", True),
    (6, 30, "Wed", True),
    (7, 0, "Wed", True),  # bounds are inclusive
    (12, 0, "Wed", False),
    (18, 0, "Wed", True),
])
def test_after_hours_window_wraps_midnight(hour, minute, weekday_expected, after_hours):
    f = facts(ct_header(), arrived_at=datetime(2025, 3, 12, hour, minute))
    assert holds("arrival_time: {between: ['18:00', '07:00']}", f) is after_hours
    assert holds(f"arrival_weekday: {weekday_expected}", f)


def test_missing_value_table():
    """The documented result of every operator on a missing attribute (docs/rules.md)."""
    expected = {"equals: x": False, "in: [x]": False, "contains: x": False, "matches: '.*'": False,
                "lt: 1": False, "le: 1": False, "gt: 1": False, "ge: 1": False, "between: [0, 1]": False,
                "exists: true": False, "missing: true": True}
    for op, result in expected.items():
        assert holds(f"ContrastBolusAgent: {{{op}}}") is result, op
        if not op.startswith(("exists", "missing")):  # `all: true` never makes a missing value match
            assert holds(f"ContrastBolusAgent: {{{op}, all: true}}") is False, op


def test_empty_value_counts_as_missing():
    f = facts(ct_header(BodyPartExamined=""))
    assert holds("BodyPartExamined: {missing: true}", f)
    assert not holds("BodyPartExamined: {contains: ''}", f)


@pytest.mark.parametrize("cond, expected", [
    ("any_series: {Modality: MR}", True),
    ("any_series: {Modality: PT}", False),
    ("all_series: {Modality: CT}", False),
    ("all_series: {PatientName: 'PHANTOM^CHEST'}", True),
    ("all: [{any_series: {Modality: CT, is_volume: true}}, {any_series: {Modality: MR}}]", True),
    ("Modality: MR", True),  # a study's attribute is the union of its series' values
    ("Modality: {in: [CT, MR], all: true}", True),
    ("Modality: {equals: CT, all: true}", False),
    ("series_count: 2", True),
    ("instance_count: {gt: 200}", True),  # 120 + 176
    ("not: {any_series: {orientation: coronal}}", True),
])
def test_study_conditions(cond, expected):
    st = study(CT, facts(mr_header(study=CT.study_uid), instance_count=176))
    assert holds(cond, st, level="study") is expected


def test_empty_study_matches_no_series_condition():
    empty = study()
    assert not holds("all_series: {Modality: CT}", empty, level="study")
    assert not holds("any_series: {Modality: CT}", empty, level="study")
    assert holds("series_count: 0", empty, level="study")


def test_catastrophic_regex_gives_up_and_counts_as_no_match(caplog):
    f = facts(ct_header(SeriesDescription="ab" * 30))
    with caplog.at_level(logging.WARNING, logger="node.rules.conditions"):
        assert holds("SeriesDescription: {matches: '(?:(?:a|b)*?a){20}z'}", f) is False
    assert "gave up" in caplog.text


def test_overlong_value_never_matches():
    assert holds("ImageComments: {matches: 'a*'}", facts(ct_header(ImageComments="a" * 100)))
    assert not holds("ImageComments: {matches: 'a*'}", facts(ct_header(ImageComments="a" * 5000)))


def test_private_multi_valued_contains_uses_elements():
    ds = ct_header()
    ds.add_new(0x00111001, "UN", b"ALPHA\\BETA")
    ds.add_new(0x00111002, "UN", b"ALPHABET")
    f = facts(ds)
    assert holds("'0011,1001': {contains: BETA}", f)
    assert not holds("'0011,1001': {contains: BET}", f)  # several values: element, not substring
    assert holds("'0011,1002': {contains: BET}", f)  # one value: substring
