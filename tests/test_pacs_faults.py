"""A PACS that answers what the node must not take as it is (pynetdicom as the peer): a prior the node
holds only part of, loose matching of a cohort value, instance counts out of range, more sent than
arrived, StudyDates that are no dates, oversized identifiers, refused C-STOREs without end."""
from __future__ import annotations

import datetime as dt
import fnmatch
import logging
import sqlite3
import time
from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.pacs import scheduler as S
from node.pacs.model import PacsError, RetrieveOutcome, StudyQuery
from node.pacs.retriever import _judge_arrivals
from node.pacs.sources import source_client
from node.receive.ingest import Origin
from tests.pacs_peers import tiny_study
from tests.test_pacs import _pull_rules, _scripted_pacs, dimse
from tests.test_pacs_sync import _priors_of, local  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(120)


def _answer(uid: str, pid: str, date: str, count, modalities: str = "CT") -> Dataset:
    d = Dataset()
    d.QueryRetrieveLevel, d.StudyInstanceUID, d.PatientID, d.StudyDate = "STUDY", uid, pid, date
    d.ModalitiesInStudy, d.NumberOfStudyRelatedInstances = modalities, count
    return d


@pytest.fixture
def pacs():
    """(start(answers), servers): a PACS whose C-FIND answers ``answers()`` whatever the query keys."""
    servers = []

    def start(answers, title: str = "LOOSE") -> int:
        def on_find(event):
            for d in answers(event.identifier):
                yield 0xFF00, d

        port, server = _scripted_pacs(title, on_find)
        servers.append(server)
        return port

    yield start
    for s in servers:
        s.shutdown()


# -- 1. a prior the node holds only part of ----------------------------------------------------
def _sr(study_uid: str, patient_id: str, date: str) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, generate_uid(), "SR"
    ds.PatientID, ds.StudyDate = patient_id, date
    b = BytesIO()
    ds.save_as(b, enforce_file_format=True)
    return b.getvalue()


def test_a_prior_the_node_holds_only_part_of_is_retrieved(tmp_path, local, pacs):
    """The node holds only the prior's SR (a report pushed earlier); the PACS answers the study as CT\\SR
    with 301 instances. It is chosen, and its retrieve queued: the handler would otherwise get a 'CT
    prior' of one SR instance, with no note."""
    cur = tiny_study(tmp_path / "cur", patient_id="P1", study_date="20240301")
    prior = generate_uid()
    port = pacs(lambda q: [_answer(prior, "P1", "20230301", "301", "CT\\SR")])
    node = local({"pacs": dimse(port, "LOOSE", retrieve="get")})
    assert node.ingest.store(_sr(prior, "P1", "20230301"), Origin("MOD", "HILUM", "127.0.0.1"))[0] == 0
    chosen, note = _priors_of(node, cur, {"source": "pacs", "max": 1, "match": {"Modality": "CT"}}, "k1")
    assert chosen == [(prior, "pacs")] and note is None
    [r] = node.store.list()
    assert (r["study_uid"], r["expected"], r["requested_by"].startswith("priors:job")) == (prior, 301, True)


# -- 2. a cohort value the PACS matches loosely, or that is a wildcard -----------------------------
COHORT = [("1.2.3.1", "AB*1"), ("1.2.3.2", "AB-771"), ("1.2.3.3", "ABX91")]


def _cohort_rule(tmp_path, port: int, csv_text: str):
    from node.config import load_settings
    from node.handler_api import get_handler
    from node.rules.ruleset import RuleSet
    from node.store.index import Index
    from node.store.retrieves import RetrieveStore

    rules_dir = tmp_path / "rules"
    rules_dir.mkdir(exist_ok=True)
    (rules_dir / "pull.yaml").write_text("kind: pull\nname: cohort\nsource: pacs\n"
                                         "query: {csv: {file: cohort.csv, column: PatientID}}\n")
    (rules_dir / "cohort.csv").write_text(csv_text)
    settings = load_settings(data_dir=tmp_path / "node", min_free_disk_mb=0, rules_dir=rules_dir,
                             sources={"pacs": dimse(port, "LOOSE")})
    rules = RuleSet.load(rules_dir, handlers=get_handler, destinations={"orthanc"}, sources={"pacs"})
    (tmp_path / "node").mkdir(exist_ok=True)
    store = RetrieveStore(Index(tmp_path / "node" / "index.db"))
    sched = S.PullScheduler(settings, lambda: rules, store, on_queued=lambda: None)
    store.ensure_pull_state("cohort", time.time())
    return sched, rules.pull_rules[0], store, rules_dir


def test_a_pacs_matching_a_cohort_value_loosely_gets_only_that_patients_studies_pulled(tmp_path, pacs):
    today = dt.date.today().strftime("%Y%m%d")
    # A PACS that ignores the PatientID key: every patient's study answers every cohort value.
    port = pacs(lambda q: [_answer(uid, pid, today, "3") for uid, pid in COHORT])
    sched, rule, store, _ = _cohort_rule(tmp_path, port, "PatientID\nAB-771\n")
    result = sched.run(rule)
    assert [r["study_uid"] for r in store.list()] == ["1.2.3.2"]
    assert (result["queued"], result["matches"], result["error"]) == (1, 1, None)
    assert result["warnings"] == ["cohort PatientID 'AB-771': the source answered 2 studies with another "
                                  "PatientID, left out: 1.2.3.1, 1.2.3.3"]


@pytest.mark.parametrize("value", ["AB*1", "AB?771", "AB\\771"])
def test_a_cohort_value_dicom_reads_as_a_wildcard_is_refused_naming_its_line(tmp_path, value):
    from node.handler_api import get_handler
    from node.rules.errors import RuleErrors
    from node.rules.ruleset import RuleSet

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "pull.yaml").write_text("kind: pull\nname: cohort\nsource: pacs\n"
                                     "query: {csv: {file: cohort.csv, column: PatientID}}\n")
    (rules / "cohort.csv").write_text(f"PatientID\nP1\n{value}\n")
    with pytest.raises(RuleErrors) as exc:
        RuleSet.load(rules, handlers=get_handler, destinations={"orthanc"}, sources={"pacs"})
    text = exc.value.text()
    assert "query.csv.file" in text and f"cohort.csv line 3: PatientID {value!r} contains" in text, text
    assert "wildcard" in text


def test_a_wildcard_written_into_the_cohort_after_loading_queues_nothing(tmp_path, pacs):
    """The PACS matches * as PS3.4 says: the edited CSV's 'AB*1' would pull 3 patients."""
    today = dt.date.today().strftime("%Y%m%d")

    def matching(q):
        return [_answer(uid, pid, today, "3") for uid, pid in COHORT if fnmatch.fnmatchcase(pid, q.PatientID)]

    sched, rule, store, rules_dir = _cohort_rule(tmp_path, pacs(matching), "PatientID\nAB-771\n")
    (rules_dir / "cohort.csv").write_text("PatientID\nAB*1\n")
    result = sched.run(rule)
    assert store.list() == [] and "line 2: PatientID 'AB*1' contains '*'" in result["error"]


# -- 3. instance counts out of range --------------------------------------------------------------
def test_counts_out_of_range_are_taken_as_not_given_and_the_other_studies_still_queued(tmp_path, pacs, caplog):
    """pydicom reads "99999999999999999999" as IS (1e+20): stored as a retrieve's expected count it
    overflowed SQLite and the rule's every run failed, its good studies included; -5 passed."""
    today = dt.date.today().strftime("%Y%m%d")
    studies = [("1.2.3.1", "P1", "3"), ("1.2.3.2", "P2", "99999999999999999999"), ("1.2.3.3", "P3", "-5")]
    port = pacs(lambda q: [_answer(uid, pid, today, n) for uid, pid, n in studies if pid == q.PatientID])
    sched, rule, store, _ = _cohort_rule(tmp_path, port, "PatientID\nP1\nP2\nP3\n")
    with caplog.at_level(logging.WARNING, "hilum.pacs"):
        result = sched.run(rule)
    assert (result["queued"], result["error"]) == (3, None)
    assert {r["study_uid"]: r["expected"] for r in store.list()} == {"1.2.3.1": 3, "1.2.3.2": None, "1.2.3.3": None}
    for uid in ("1.2.3.2", "1.2.3.3"):
        assert any(m.startswith(f"study {uid}: the PACS answered an instance count of ") and "not given" in m
                   for m in caplog.messages), caplog.messages


def test_one_studys_error_while_queueing_does_not_stop_the_rules_others(tmp_path, pacs, monkeypatch):
    today = dt.date.today().strftime("%Y%m%d")
    port = pacs(lambda q: [_answer(uid, pid, today, "3") for uid, pid in COHORT])
    sched, rule, store, _ = _cohort_rule(tmp_path, port, "PatientID\nAB-771\nABX91\n")
    add = store.add

    def failing_add(source, study_uid, *a, **kw):
        if study_uid == "1.2.3.2":
            raise sqlite3.OperationalError("database or disk is full")
        return add(source, study_uid, *a, **kw)

    monkeypatch.setattr(store, "add", failing_add)
    result = sched.run(rule)
    assert [r["study_uid"] for r in store.list()] == ["1.2.3.3"] and result["error"] is None
    assert "study 1.2.3.2 not queued: OperationalError: database or disk is full" in result["warnings"]
    assert store.seen("cohort", "1.2.3.2") is None  # tried again next run
    monkeypatch.setattr(store, "add", add)
    assert sched.run(rule)["queued"] == 1 and {r["study_uid"] for r in store.list()} == {"1.2.3.2", "1.2.3.3"}


# -- 4. more reported sent than arrived, with no count listed -------------------------------------
def test_a_retrieve_with_fewer_arrived_than_the_pacs_reports_sent_is_partial():
    out = RetrieveOutcome(completed=300)
    assert _judge_arrivals("done", None, 150, None, out, None, "move") == \
        ("partial", "150 of 300 instance(s) arrived (the PACS reported 300 sent)")
    assert _judge_arrivals("done", None, 150, 300, out, None, "move") == ("partial", "150 of 300 instance(s) arrived")
    assert _judge_arrivals("done", None, 300, None, out, None, "move") == ("done", None)


def test_a_c_move_reporting_3_sent_of_which_2_arrive_is_partial(tmp_path, local):
    """A PACS (pynetdicom) that lists no instance count, sends 2 instances and reports 3 completed."""
    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_MOVE
    from pynetdicom.sop_class import CTImageStorage

    st = tiny_study(tmp_path / "w", patient_id="ODD", series=(("AX", 1.0, 2),))
    dest: dict[str, int] = {}

    def on_find(event):
        d = Dataset()
        d.QueryRetrieveLevel, d.StudyInstanceUID = "STUDY", st.study_uid
        yield 0xFF00, d

    def on_move(event):
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        sub = ae.associate("127.0.0.1", dest["port"], ae_title="HILUM")
        for f in st.files:
            assert sub.send_c_store(pydicom.dcmread(f), originator_aet=event.assoc.requestor.ae_title,
                                    originator_id=event.request.MessageID).Status == 0
        sub.release()
        rsp = C_MOVE()
        rsp.MessageIDBeingRespondedTo = event.request.MessageID
        rsp.AffectedSOPClassUID = event.request.AffectedSOPClassUID
        rsp.Status, rsp.NumberOfRemainingSuboperations, rsp.NumberOfCompletedSuboperations = 0x0000, 0, 3
        rsp.NumberOfFailedSuboperations = rsp.NumberOfWarningSuboperations = 0
        event.assoc.dimse.send_msg(rsp, event.context.context_id)
        yield None, None  # answered by hand: pynetdicom's own answer finds the association gone

    port, server = _scripted_pacs("HILUM", on_find, on_move=on_move)
    try:
        node = local({"lying": dimse(port, "HILUM", retrieve="move")})
        dest["port"] = node.settings.dicom_port
        node.retriever.start()
        rid, _ = node.store.add("lying", st.study_uid, None, "test")
        node.retriever.wake()
        r = node.wait(rid)
    finally:
        server.shutdown()
    assert node.held(st.study_uid) == st.sop_uids
    assert (r["status"], r["error"]) == ("partial", "2 of 3 instance(s) arrived (the PACS reported 3 sent)"), r


# -- 5. StudyDates that are no dates ----------------------------------------------------------------
def test_priors_take_only_real_study_dates_and_say_which_were_not(tmp_path, local, pacs):
    """'2023.1.5' compared as a string passed the window (20190302-20240229) and sorted as the most
    recent prior; the ACR-NEMA '2021.03.04' is a date, normalised."""
    cur = tiny_study(tmp_path / "cur", patient_id="P9", study_date="20240301")
    good, bad, acr = "1.2.826.0.1.3680043.8.498.71", "1.2.826.0.1.3680043.8.498.72", "1.2.826.0.1.3680043.8.498.73"
    port = pacs(lambda q: [_answer(good, "P9", "20220601", "2"), _answer(bad, "P9", "2023.1.5", "2"),
                           _answer(acr, "P9", "2021.03.04", "2")])
    node = local({"lax": dimse(port, "LOOSE", retrieve="get")})
    chosen, note = _priors_of(node, cur, {"source": "lax", "max": 2, "within": "5y"}, "k1")
    assert chosen == [(good, "lax"), (acr, "lax")]
    assert note == (f"source lax answered 1 study whose StudyDate is not a date (YYYYMMDD), not taken as priors: "
                    f"{bad} ('2023.1.5')")
    assert {r["study_uid"] for r in node.store.list()} == {good, acr}


def test_a_study_whose_own_date_is_no_date_is_released_saying_so_not_as_an_internal_error(tmp_path, local, pacs):
    cur = tiny_study(tmp_path / "cur", patient_id="P9", study_date="2024/03/01")
    port = pacs(lambda q: [])
    node = local({"lax": dimse(port, "LOOSE", retrieve="get")})
    chosen, _ = _priors_of(node, cur, {"source": "lax", "max": 2}, "k1")
    row = node.index.conn().execute("SELECT job_id, state, note FROM prior_waits").fetchone()
    job = node.index.conn().execute("SELECT status FROM jobs WHERE id=?", (row["job_id"],)).fetchone()
    assert chosen == [] and job["status"] == "pending", dict(row)
    from node.store.retrieves import priors_of_job
    assert priors_of_job(node.index, row["job_id"])["priors_note"] == \
        "no priors: the study's StudyDate '2024/03/01' is not a date (YYYYMMDD) to search back from"


def test_a_study_dated_with_a_date_time_still_searches_back_from_its_day(tmp_path, local, pacs):
    """A modality that wrote a date-time into StudyDate ('20240301120000') still dates its study."""
    cur = tiny_study(tmp_path / "cur", patient_id="P8", study_date="20240301120000")
    asked = []
    port = pacs(lambda q: asked.append(str(q.StudyDate)) or [])
    node = local({"lax": dimse(port, "LOOSE", retrieve="get")})
    _priors_of(node, cur, {"source": "lax", "max": 2}, "k1")
    assert asked and all(a.endswith("-20240301") or a.endswith("-20240229") for a in asked), asked


def test_a_malformed_study_date_never_moves_the_high_water_mark(tmp_path, pacs):
    """A watch rule (one study per run): the study left for later is dated '2023.1.5'. As a string it
    became the mark (it sorts before yesterday), and the next poll asked the PACS for StudyDate '2023.1.5-'."""
    from node.config import load_settings
    from node.store.index import Index
    from node.store.retrieves import RetrieveStore

    asked: list[str] = []

    def answers(q):
        asked.append(q.StudyDate)
        return [_answer("1.2.3.1", "X", "2023.1.5", "1"), _answer("1.2.3.2", "X", "2023.1.5", "1")]

    port = pacs(answers)
    settings = load_settings(data_dir=tmp_path, min_free_disk_mb=0, sources={"pacs": dimse(port, "LOOSE")})
    rules = _pull_rules(tmp_path, "kind: pull\nname: w\nsource: pacs\nquery: {PatientID: X, StudyDate: '20240101-'}\n"
                                  "watch: true\nlimits: {studies_per_run: 1}\n")
    store = RetrieveStore(Index(tmp_path / "index.db"))
    sched = S.PullScheduler(settings, lambda: rules, store, on_queued=lambda: None)
    store.ensure_pull_state("w", time.time())
    result = sched.run(rules.pull_rules[0])
    assert result["queued"] == 1 and result["left"] == 1
    assert store.pull_state("w")["high_water"] is None  # kept where it was
    assert any("1.2.3.2 (StudyDate '2023.1.5' is not a date)" in w for w in result["warnings"])
    sched.run(rules.pull_rules[0])
    assert asked == ["20240101-", "20240101-"]


# -- 6. identifiers past any sense, refused C-STOREs without end ---------------------------------
def test_a_c_find_answer_over_a_megabyte_is_refused_clearly(tmp_path, pacs):
    from node.config import load_settings

    def answers(q):
        d = _answer("1.2.3.1", "X", "20240101", "1")
        d.PatientComments = "x" * (2 << 20)
        return [d]

    settings = load_settings(data_dir=tmp_path, min_free_disk_mb=0, sources={"pacs": dimse(pacs(answers), "LOOSE")})
    with pytest.raises(PacsError, match=r"the data set of a 0x8020 message \(not a C-STORE: an identifier of a few "
                                        r"short elements\) over 1048576 bytes"):
        source_client(settings, "pacs").find_studies(StudyQuery(patient_id="X"))


def test_a_c_get_that_sends_only_refused_instances_ends_at_the_stall_timeout(tmp_path):
    from node.config import load_settings

    stray = tiny_study(tmp_path / "x", patient_id="ODD", series=(("AX", 1.0, 1),))
    ds = pydicom.dcmread(stray.files[0])

    def on_find(event):
        yield from ()

    def on_get(event):
        yield 60_000  # pynetdicom takes at most 65 535
        while event.assoc.is_established:
            yield 0xFF00, ds  # another study's instance, over and over

    port, server = _scripted_pacs("GETPACS", on_find, on_get=on_get)
    try:
        settings = load_settings(data_dir=tmp_path / "n", min_free_disk_mb=0,
                                 sources={"pacs": dimse(port, "GETPACS", retrieve="get", stall_timeout_s=1.5)})
        client = source_client(settings, "pacs")
        t0 = time.monotonic()
        with pytest.raises(PacsError, match=r"C-GET: the PACS sent \d+ instance\(s\) in \d+ s and none could be "
                                            r"stored .*sources\.pacs\.stall_timeout_s: 1\.5"):
            client.get("1.2.3.4", None, [ds.SOPClassUID], lambda raw, header: (0, ""), lambda out, remaining: True)
        assert time.monotonic() - t0 < 30
    finally:
        server.shutdown()
