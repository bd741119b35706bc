"""Stability and routing on a real index and rule set, with explicit clocks (no sleeping)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pydicom
import pytest

from node.config import load_settings
from node.handler_api import get_handler
from node.receive.ingest import header_json
from node.route.router import Router
from node.rules.ruleset import RuleSet
from node.store.index import Index, InstanceRow
from node.web.views import study_summary
from tests.nodeproc import REPO

T0 = 1_800_000_000.0


def _instance(study: str, series: str, sop: str, at: float) -> InstanceRow:
    ds = pydicom.Dataset()
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "CT", study, series, sop
    return InstanceRow(sop_uid=sop, series_uid=series, study_uid=study, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                       transfer_syntax="1.2.840.10008.1.2.1", path=f"/x/{sop}", size=1, received_at=at,
                       header_json=header_json(ds), modality="CT", series_description="", series_number="1",
                       patient_id="P", patient_name="N", study_date="", accession="", study_description="",
                       calling_ae="CT1", called_ae="HILUM", source_ip="127.0.0.1")


@pytest.fixture
def router(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "r.yaml").write_text(textwrap.dedent("""\
        - name: quick
          match: {Modality: CT}
          handler: overview
          destinations: [orthanc]
          stable_after: 5s
        - name: patient
          match: {Modality: CT}
          handler: overview
          destinations: [orthanc]
        """))
    settings = load_settings(data_dir=tmp_path, stable_after=30, store_originals_in_orthanc=False)
    index = Index(tmp_path / "index.db")
    rules = RuleSet.load(tmp_path / "rules", handlers=get_handler, destinations={"orthanc"})
    return Router(settings, index, rules=lambda: rules, on_jobs=lambda: None, on_deliveries=lambda: None), index


def _rules_run(index: Index, study: str) -> list[str]:
    return sorted(j["rule"] for j in index.jobs(study_uid=study))


def test_each_rule_waits_for_its_own_quiet_period(router):
    r, index = router
    index.add_instances([_instance("1.2.3", "1.2.3.1", "1.2.3.1.1", T0)])
    assert r.run_once(now=T0 + 3) == 0 and _rules_run(index, "1.2.3") == []
    r.run_once(now=T0 + 6)
    assert _rules_run(index, "1.2.3") == ["quick"]  # its 5 s have passed, the default 30 s have not
    r.run_once(now=T0 + 20)
    assert _rules_run(index, "1.2.3") == ["quick"]
    r.run_once(now=T0 + 31)
    assert _rules_run(index, "1.2.3") == ["patient", "quick"]
    assert r.run_once(now=T0 + 60) == 0  # routed: nothing twice
    assert index.study("1.2.3")["routed_generation"] == 0


def test_restart_between_the_two_periods_loses_nothing(router, tmp_path):
    r, index = router
    index.add_instances([_instance("1.2.4", "1.2.4.1", "1.2.4.1.1", T0)])
    r.run_once(now=T0 + 6)
    fresh = Router(r.settings, Index(tmp_path / "index.db"), rules=r.rules, on_jobs=lambda: None,
                   on_deliveries=lambda: None)  # a new process: only the index remembers
    fresh.run_once(now=T0 + 31)
    assert _rules_run(index, "1.2.4") == ["patient", "quick"]


def test_force_complete_runs_every_rule_at_once(router):
    r, index = router
    index.add_instances([_instance("1.2.5", "1.2.5.1", "1.2.5.1.1", T0)])
    index.force_complete("1.2.5")
    r.run_once(now=T0 + 1)
    assert _rules_run(index, "1.2.5") == ["patient", "quick"]


def test_late_instance_starts_a_new_generation(router):
    r, index = router
    index.add_instances([_instance("1.2.6", "1.2.6.1", "1.2.6.1.1", T0)])
    r.run_once(now=T0 + 31)
    index.add_instances([_instance("1.2.6", "1.2.6.1", "1.2.6.1.2", T0 + 40)])
    r.run_once(now=T0 + 46)
    jobs = index.jobs(study_uid="1.2.6")
    assert sorted((j["rule"], j["generation"]) for j in jobs) == [("patient", 0), ("quick", 0), ("quick", 1)]
    assert "re-run" in jobs[0]["history_json"]


def test_the_study_view_lists_a_rule_still_waiting_and_when_it_fires(router, tmp_path):
    r, index = router
    index.add_instances([_instance("1.2.9", "1.2.9.1", "1.2.9.1.1", T0)])
    assert study_summary(index.study("1.2.9"))["pending_rules"] == []  # still receiving: nothing decided yet
    r.run_once(now=T0 + 6)  # "quick" (5 s) fires; "patient" waits for the node's 30 s
    assert _rules_run(index, "1.2.9") == ["quick"]
    expected = [{"rule": "patient", "handler": "overview", "series_uid": "1.2.9.1", "fires_at": T0 + 30}]
    assert study_summary(index.study("1.2.9"))["pending_rules"] == expected
    # `hilum status --json` shows the same, from the index alone (another process).
    out = subprocess.run([sys.executable, "-m", "node.cli", "status", "--json", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    (study,) = [s for s in json.loads(out.stdout)["studies"] if s["study_uid"] == "1.2.9"]
    assert study["pending_rules"] == expected
    r.run_once(now=T0 + 31)
    assert _rules_run(index, "1.2.9") == ["patient", "quick"]
    assert study_summary(index.study("1.2.9"))["pending_rules"] == []  # done means done


def test_the_router_knows_when_it_next_has_work(router):
    """It sleeps until then (at most its usual pass): a study's jobs are created when its quiet
    period ends, not up to a pass later."""
    r, index = router
    assert index.next_routing_at(5) is None  # nothing received
    index.add_instances([_instance("1.3.1", "1.3.1.1", "1.3.1.1.1", T0)])
    index.add_instances([_instance("1.3.2", "1.3.2.1", "1.3.2.1.1", T0 + 2)])
    assert index.next_routing_at(5) == T0 + 5  # the earlier study's quiet period ends
    r.run_once(now=T0 + 6)  # 1.3.1 complete: "quick" runs, "patient" waits until T0 + 30
    assert index.next_routing_at(5) == T0 + 2 + 5  # 1.3.2 still receiving
    r.run_once(now=T0 + 8)
    assert index.next_routing_at(5) == T0 + 30  # both complete; the slower rule's re-check of 1.3.1
    assert r._until_next() <= min(1.0, 30 / 4)
