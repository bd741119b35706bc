"""Simulate: replay a proposed rule set over past CT, MR, CR and US series built as real DICOM headers."""
from __future__ import annotations

from pathlib import Path

import pytest

from node.rules import RuleSet, SeriesFacts, simulate
from node.rules.loader import read_rule_files
from tests.test_rules_support import (SHIPPED_HANDLERS, US_IMAGE, ct_header, cr_header, facts, lookup, mr_header,
                                      other_header)

RULES_DIR = Path(__file__).resolve().parent.parent / "rules"
DESTS = {"orthanc", "tps", "pacs"}

CT_STUDY = "1.2.826.0.1.3680043.10.2.1"
CT_VOLUME = CT_STUDY + ".1"
CT_SCOUT = CT_STUDY + ".2"


def past_series() -> list[SeriesFacts]:
    return [
        facts(ct_header(study=CT_STUDY, series=CT_VOLUME), instance_count=240),
        facts(ct_header(study=CT_STUDY, series=CT_SCOUT, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
                        SeriesDescription="Topogram"), instance_count=2),
        facts(mr_header(study="1.2.826.0.1.3680043.10.2.2", series="1.2.826.0.1.3680043.10.2.2.1"), instance_count=176),
        facts(cr_header(study="1.2.826.0.1.3680043.10.2.3", series="1.2.826.0.1.3680043.10.2.3.1"), instance_count=1),
        facts(other_header(US_IMAGE, "US", "1.2.826.0.1.3680043.10.2.4", "1.2.826.0.1.3680043.10.2.4.1"),
              instance_count=12),
    ]


def shipped(files: dict[str, str] | None = None) -> RuleSet:
    return RuleSet.from_files(files if files is not None else read_rule_files(RULES_DIR),
                              handlers=lookup(SHIPPED_HANDLERS), destinations=DESTS)


@pytest.fixture(scope="module")
def proposed() -> RuleSet:
    files = read_rule_files(RULES_DIR)
    files["ct-chest.yaml"] = files["ct-chest.yaml"].replace("destinations: [orthanc, tps]", "destinations: [orthanc]")
    files["mr.yaml"] = files["mr.yaml"].replace("destinations: [orthanc]", "destinations: [orthanc, pacs]")
    files["radiography.yaml"] = files["radiography.yaml"].replace(
        "handler: overview", "handler:\n  name: overview\n  params: {size: 512}")
    files["ct-archive.yaml"] = "name: ct-archive\norder: 50\nmatch: {Modality: CT}\ndestinations: [pacs]\n"
    assert files != read_rule_files(RULES_DIR)
    return shipped(files)


def test_simulation_reports_each_difference(proposed):
    report = simulate(shipped(), proposed, past_series())
    assert (report.studies, report.series) == (4, 5)
    got = sorted((c.kind, c.series_uid, c.job, c.old_destinations, c.new_destinations) for c in report.changes)
    assert got == sorted([
        ("changed_destinations", CT_VOLUME, "ct-anatomy", ("orthanc", "tps"), ("orthanc",)),
        ("new", CT_VOLUME, "forward originals", (), ("pacs",)),
        # the scout went to the fallback before; the new CT rule takes it, so the fallback no longer applies
        ("new", CT_SCOUT, "forward originals", (), ("pacs",)),
        ("lost", CT_SCOUT, "overview", ("orthanc",), ()),
        ("changed_destinations", "1.2.826.0.1.3680043.10.2.2.1", "overview", ("orthanc",), ("orthanc", "pacs")),
        ("lost", "1.2.826.0.1.3680043.10.2.3.1", "overview", ("orthanc",), ()),
        ("new", "1.2.826.0.1.3680043.10.2.3.1", 'overview {"size": 512}', (), ("orthanc",)),
    ])
    assert len(report.new_jobs) == 3 and len(report.lost_jobs) == 2 and len(report.changed_destinations) == 2
    # unchanged: CT renders, CT lung nodules (thin slices), and the US fallback overview
    assert report.unchanged_jobs == 3
    scout_lost = next(c for c in report.lost_jobs if c.series_uid == CT_SCOUT)
    assert scout_lost.old_rules == ("fallback-overview",) and scout_lost.study_uid == CT_STUDY


def test_simulation_replays_persisted_facts(proposed):
    live = simulate(shipped(), proposed, past_series())
    replayed = simulate(shipped(), proposed, [SeriesFacts.from_json(f.to_json()) for f in past_series()])
    assert replayed.to_dict() == live.to_dict()


def test_same_rules_change_nothing():
    report = simulate(shipped(), shipped(), past_series())
    # CT: anatomy + renders + lung nodules; scout, MR, CR, US: 1 each
    assert report.changes == [] and report.unchanged_jobs == 7


def test_report_text(proposed):
    text = simulate(shipped(), proposed, past_series()).text()
    lines = text.splitlines()
    assert lines[0] == ("Simulated 4 studies (5 series): 3 new jobs, 2 lost jobs, "
                        "2 with changed destinations, 3 unchanged")
    assert f"  - lost  overview on series {CT_SCOUT} (CT, Topogram, 2 instances): was to orthanc  " \
           "[rule fallback-overview]" in lines
    assert f"  ~ dest  ct-anatomy on series {CT_VOLUME} (CT, Thorax 1.0 B31f, 240 instances): orthanc, tps -> orthanc" \
        in lines
    # A destination limited to some modalities says so (hilum rules simulate passes the config's).
    limited = simulate(shipped(), proposed, past_series()).text({"tps": ["CT", "RTSTRUCT"]}).splitlines()
    assert f"  ~ dest  ct-anatomy on series {CT_VOLUME} (CT, Thorax 1.0 B31f, 240 instances): orthanc, " \
           "tps (CT, RTSTRUCT only) -> orthanc" in limited
