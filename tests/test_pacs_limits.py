"""A PACS that never finishes: C-FIND pending answers forever (malformed ones, or more than the node
takes), a C-MOVE whose pending responses never make progress. Each ends with a warning or a
PacsError, never a hang (pynetdicom as the peer). And a watch pull rule whose leftovers have no
StudyDate keeps polling the dated ones left behind them."""
from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
from pydicom.dataset import Dataset

from node.config import load_settings
from node.pacs import dimse as D
from node.pacs import scheduler as S
from node.pacs.model import PacsError, StudyMatch, StudyQuery
from node.pacs.sources import source_client
from node.store.index import Index
from node.store.retrieves import RetrieveStore
from tests.nodeproc import free_port
from tests.test_pacs import _scripted_pacs, dimse

pytestmark = pytest.mark.timeout(90)  # without the limits, each of these hangs


def _client(tmp_path, port: int, **kw):
    settings = load_settings(data_dir=tmp_path, dicom_host="127.0.0.1", dicom_port=free_port(), min_free_disk_mb=0,
                             sources={"endless": dimse(port, "ENDLESS", timeout_s=10, **kw)})
    return source_client(settings, "endless")


@pytest.fixture
def endless_pacs():
    """(port, calls): a PACS whose C-FIND answers never end and whose C-MOVE sends pending responses
    with the same counts (5 remaining) until the association goes. The C-FIND's PatientID says how:
    NOUID (study answers without a StudyInstanceUID, as fast as it can), SLOW (the same, 20 a
    second), SERIES (a new valid series each time)."""
    calls: list[str] = []
    stop = threading.Event()

    def on_find(event):
        how = event.identifier.get("PatientID", "") or "SERIES"
        calls.append(how)
        i = 0
        while event.assoc.is_established and not stop.is_set():
            i += 1
            d = Dataset()
            if how == "SERIES":
                d.QueryRetrieveLevel, d.StudyInstanceUID = "SERIES", event.identifier.StudyInstanceUID
                d.SeriesInstanceUID, d.Modality, d.NumberOfSeriesRelatedInstances = f"1.2.9.{i}", "CT", "1"
            else:
                d.QueryRetrieveLevel, d.PatientID, d.StudyDate = "STUDY", how, "20240101"  # no StudyInstanceUID
                if how == "SLOW":
                    time.sleep(0.05)
            yield 0xFF00, d

    def on_move(event):
        # pynetdicom counts sub-operations down itself: the stuck responses are sent by hand.
        from pynetdicom.dimse_primitives import C_MOVE
        calls.append("MOVE")
        rsp = C_MOVE()
        rsp.MessageID = rsp.MessageIDBeingRespondedTo = event.request.MessageID
        rsp.AffectedSOPClassUID = event.request.AffectedSOPClassUID
        rsp.Status = 0xFF00
        rsp.NumberOfRemainingSuboperations, rsp.NumberOfCompletedSuboperations = 5, 0
        rsp.NumberOfFailedSuboperations = rsp.NumberOfWarningSuboperations = 0
        while event.assoc.is_established and not stop.is_set():
            event.assoc.dimse.send_msg(rsp, event.context.context_id)
            time.sleep(0.05)
        yield None, None  # the association is gone: pynetdicom stops here

    port, server = _scripted_pacs("ENDLESS", on_find, on_move=on_move)
    yield port, calls
    stop.set()
    server.shutdown()


def test_malformed_c_find_answers_forever_end_at_a_cap_with_a_warning(tmp_path, endless_pacs, monkeypatch):
    port, _ = endless_pacs
    monkeypatch.setattr(D, "MAX_MATCHES", 40)
    client = _client(tmp_path, port)
    found, bad = client.find_studies(StudyQuery(patient_id="NOUID"))
    assert found == [] and bad == 40
    assert any("40 malformed answers: stopped there" in w for w in client.warnings), client.warnings
    found, bad = client.find_studies(StudyQuery(patient_id="NOUID"), limit=5)  # a caller's limit: capped too
    assert found == [] and bad == 40


def test_a_c_find_past_its_deadline_is_aborted_naming_the_source(tmp_path, endless_pacs):
    port, _ = endless_pacs
    client = _client(tmp_path, port, find_timeout_s=1.5)
    t0 = time.monotonic()
    with pytest.raises(PacsError, match=r"source endless: C-FIND: the PACS sent pending responses for \d+ s "
                                        r"without a final status.*sources\.endless\.find_timeout_s"):
        client.find_studies(StudyQuery(patient_id="SLOW"))
    assert time.monotonic() - t0 < 30


def test_a_series_c_find_that_never_ends_keeps_the_first_max_matches_with_a_warning(tmp_path, endless_pacs,
                                                                                   monkeypatch):
    port, _ = endless_pacs
    monkeypatch.setattr(D, "MAX_MATCHES", 30)
    client = _client(tmp_path, port)
    series, bad = client.find_series("1.2.3.4")
    assert len(series) == 30 and bad == 0 and series[0].study_uid == "1.2.3.4"
    assert client.warnings == ["source endless: C-FIND (series of study 1.2.3.4): 30 matches or more: "
                               "the first 30 kept (narrow the query)"]


def test_a_c_move_without_progress_fails_after_the_stall_timeout(tmp_path, endless_pacs):
    port, calls = endless_pacs
    client = _client(tmp_path, port, stall_timeout_s=1.5)
    seen: list[int] = []
    with pytest.raises(PacsError, match=r"source endless: C-MOVE: the PACS sent pending responses for \d+ s "
                                        r"without progress \(0 completed, 0 failed, 5 remaining\).*"
                                        r"sources\.endless\.stall_timeout_s"):
        client.move("1.2.3.4", None, lambda out, remaining: seen.append(remaining) or True)
    assert calls == ["MOVE"] and len(seen) > 5 and set(seen) == {5}


def test_an_error_in_the_progress_callback_aborts_rather_than_waiting_behind_endless_responses(tmp_path,
                                                                                            endless_pacs):
    port, _ = endless_pacs
    client = _client(tmp_path, port)

    def progress(out, remaining):
        raise RuntimeError("the index is gone")

    with pytest.raises(RuntimeError, match="the index is gone"):  # an A-RELEASE would wait for ever
        client.move("1.2.3.4", None, progress)


def test_the_limits_are_typed_settings_with_defaults(tmp_path):
    client = _client(tmp_path, 104)
    assert (client.cfg.find_timeout_s, client.cfg.stall_timeout_s) == (600.0, 600.0)
    with pytest.raises(Exception, match="stall_timeout_s"):
        _client(tmp_path, 104, stall_timeout_s=0)


# -- a watch rule whose leftovers have no StudyDate ----------------------------------------------
def _watch_rule(tmp_path, answers: list[StudyMatch], monkeypatch):
    from node.handler_api import get_handler
    from node.rules.ruleset import RuleSet

    settings = load_settings(data_dir=tmp_path, dicom_host="127.0.0.1", dicom_port=free_port(), min_free_disk_mb=0,
                             sources={"p": dimse(104)})
    store = RetrieveStore(Index(tmp_path / "index.db"))
    rules = RuleSet.from_files({"pull.yaml": "kind: pull\nname: w\nsource: p\n"
                                "query: {PatientID: X, StudyDate: '20240101-'}\nwatch: true\n"
                                "limits: {studies_per_run: 2}\n"},
                               handlers=get_handler, destinations={"orthanc"}, sources=("p",))
    queries: list[str] = []

    class Fake:
        def __init__(self) -> None:
            self.warnings: list[str] = []

        def find_studies(self, q, limit=0):
            queries.append(q.study_date)
            return list(answers), 0

    monkeypatch.setattr(S, "source_client", lambda settings, name: Fake())
    sched = S.PullScheduler(settings, lambda: rules, store, on_queued=lambda: None)
    store.ensure_pull_state("w", time.time())
    return sched, rules.pull_rules[0], store, queries


def test_undated_leftovers_do_not_move_the_high_water_mark_past_dated_ones(tmp_path, monkeypatch):
    answers = [StudyMatch(f"1.{i}", patient_id="X", instances=1) for i in range(3)] + \
              [StudyMatch("2.1", patient_id="X", study_date="20240205", instances=1),
               StudyMatch("2.2", patient_id="X", study_date="20240210", instances=1)]
    sched, rule, store, queries = _watch_rule(tmp_path, answers, monkeypatch)
    result = sched.run(rule)
    assert result["queued"] == 2 and result["left"] == 3 and result["error"] is None
    [warning] = result["warnings"]
    assert "no StudyDate (1.2)" in warning and "held at 20240205" in warning
    assert store.pull_state("w")["high_water"] == "20240205"
    assert S.poll_date(rule, dt.datetime.now(), store.pull_state("w")) == "20240205-"
    # the next run still sees and queues the dated leftovers
    result = sched.run(rule)
    assert queries == ["20240101-", "20240205-"] and result["queued"] == 2 and result["left"] == 1
    assert "warnings" not in result and store.pull_state("w")["high_water"] <= "20240210"


def test_only_undated_leftovers_keep_the_high_water_mark_where_it_was(tmp_path, monkeypatch):
    answers = [StudyMatch(f"1.{i}", patient_id="X", instances=1) for i in range(3)]
    sched, rule, store, _ = _watch_rule(tmp_path, answers, monkeypatch)
    result = sched.run(rule)
    assert result["queued"] == 2 and result["left"] == 1
    assert any("no StudyDate (1.2)" in w and "kept where it was" in w for w in result["warnings"])
    assert store.pull_state("w")["high_water"] is None
    assert S.poll_date(rule, dt.datetime.now(), store.pull_state("w")) == "20240101-"
