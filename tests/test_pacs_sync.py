"""PACS synchronisation, continued: where a study's series came from (the study view), the patient's
issuer in prior matching, priors on remote workers, DICOM TLS to a source. Real peers: a second
Orthanc playing the hospital PACS, the node as a real `hilum up`."""
from __future__ import annotations

import json

import pytest

from tests.nodeproc import NodeProcess, free_port, storescu, wait_for
from tests.pacs_peers import pacs_orthanc, tiny_study


def dimse(port: int, ae: str = "PACS", **kw) -> dict:
    return {"ae_title": ae, "host": "127.0.0.1", "port": port, **kw}


def test_study_view_says_which_rule_user_or_modality_brought_each_series(tmp_path):
    """Study S: its thin axial series retrieved by a pull rule (C-GET), its coronal series pushed by a
    modality; study T retrieved by a user through the API (C-MOVE). The API, `hilum status --study`
    and the console's dashboard say so per series."""
    from playwright.sync_api import sync_playwright

    from tests.web_support import BrowserErrors, add_user, launch, screenshot, sign_in

    s = tiny_study(tmp_path / "s", patient_id="P5", study_date="20240301",
                   series=(("AX THIN", 1.0, 3), ("COR", 3.0, 2)))
    t = tiny_study(tmp_path / "t", patient_id="P6", study_date="20240302", series=(("AX", 1.0, 2),))
    ax = next(u for u, v in s.series.items() if len(v) == 3)
    cor = next(u for u, v in s.series.items() if len(v) == 2)
    cor_files = [f for f in s.files if f.stem in set(s.series[cor])]
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "pull.yaml").write_text("kind: pull\nname: thin\nsource: pacs\nquery: {PatientID: P5}\n"
                                     "series: {SliceThickness: {le: 1.5}}\nschedule: {every: 1h}\n")
    with pacs_orthanc(tmp_path / "pacs") as pacs:
        pacs.upload(s.files + t.files)
        node = NodeProcess(tmp_path / "node", rules, store_originals_in_orthanc=False, sources={
            "pacs": dimse(pacs.dicom_port, retrieve="get"), "pacsmove": dimse(pacs.dicom_port)})
        pacs.set_node("HILUM", node.dicom_port)
        node.start()
        try:
            assert storescu(node.dicom_port, cor_files, calling="MODALITY").returncode == 0
            rid = node.api("POST", "/api/pacs/retrieves", json={"source": "pacsmove", "study_uids": [t.study_uid]}
                           ).json()["ids"][0]

            def settled():
                rs = node.api("GET", "/api/pacs/retrieves").json()["retrieves"]
                return len(rs) == 2 and all(r["status"] in ("done", "failed") for r in rs) and rs

            rs = wait_for(settled, 90, "both retrieves")
            assert all(r["status"] == "done" for r in rs), rs
            rule_rid = next(r["id"] for r in rs if r["id"] != rid)
            view = wait_for(lambda: (v := node.study(s.study_uid)).get("instances_received") == 5 and v, 30, "S")
            by_series = {x["series_uid"]: x["origin"] for x in view["series"]}
            [got] = by_series[ax]["retrieved"]
            assert (got["retrieve"], got["source"], got["method"], got["by"], got["rule"], got["instances"]) == \
                (rule_rid, "pacs", "get", "rule", "thin", 3)
            assert got["at"] and by_series[ax]["pushed"] is None and by_series[ax]["arriving"] == []
            assert by_series[cor]["retrieved"] == []
            pushed = by_series[cor]["pushed"]
            assert (pushed["calling_ae"], pushed["called_ae"], pushed["source_ip"], pushed["instances"]) == \
                ("MODALITY", "HILUM", "127.0.0.1", 2)
            [tser] = node.study(t.study_uid)["series"]
            [got] = tser["origin"]["retrieved"]
            assert (got["retrieve"], got["source"], got["method"], got["by"], got["via"], got["instances"]) == \
                (rid, "pacsmove", "move", "user", "api", 2)
            assert tser["origin"]["pushed"] is None  # C-MOVE's instances arrive at the SCP: not taken as a push
            out = node.hilum("status", "--study", s.study_uid, "--config", str(node.config_path))
            assert out.returncode == 0, out.stderr
            assert f"retrieved from pacs by pull rule thin (retrieve {rule_rid}, C-GET, " in out.stdout
            assert "pushed by MODALITY from 127.0.0.1 to HILUM" in out.stdout and ": 2 instance(s)" in out.stdout
            js = json.loads(node.hilum("status", "--study", t.study_uid, "--json",
                                       "--config", str(node.config_path)).stdout)
            assert js["series"][0]["origin"]["retrieved"][0]["retrieve"] == rid
            missing = node.hilum("status", "--study", "1.2.3.999", "--config", str(node.config_path))
            assert missing.returncode == 1 and "not found" in missing.stderr
            add_user(node, "val", "viewer")
            with sync_playwright() as p:
                browser = launch(p)
                page = browser.new_page()
                errors = BrowserErrors(page)
                sign_in(page, node.web, "val")
                page.wait_for_selector(f"tr.origin[data-study='{s.study_uid}'] .series-origin[data-series='{cor}']")
                row = f"tr.origin[data-study='{s.study_uid}']"
                assert "retrieved from pacs by pull rule thin" in page.inner_text(f"{row} [data-series='{ax}']")
                assert "pushed by MODALITY from 127.0.0.1" in page.inner_text(f"{row} [data-series='{cor}']")
                t_row = page.inner_text(f"tr.origin[data-study='{t.study_uid}']")
                assert f" via api (retrieve {rid}, C-MOVE, " in t_row
                screenshot(page, "dashboard-origin")
                assert errors.errors == []
                browser.close()
        finally:
            node.stop()
            node._kill_orthanc()


@pytest.fixture
def local(tmp_path):
    from tests.test_pacs import Local

    made: list = []

    def make(sources: dict, name: str = "node", **kw):
        made.append(Local(tmp_path / name, sources, **kw))
        return made[-1]

    yield make
    for n in made:
        n.close()


def _priors_of(node, study, spec: dict, key: str) -> tuple[list[tuple[str, str]], str | None]:
    """Hold a job of ``study`` for priors and run the coordinator's search: (chosen (study, source), note)."""
    from node.pacs.priors import PriorsCoordinator
    from node.receive.ingest import Origin

    for f in study.files:
        assert node.ingest.store(f.read_bytes(), Origin("MODALITY", "HILUM", "127.0.0.1"))[0] == 0
    assert node.ingest.writer.flush(30)
    job = node.index.add_job(job_key=key, study_uid=study.study_uid, series_uid=next(iter(study.series)),
                             level="study", rule="with-priors", handler="priors-timeline", params={},
                             destinations=[], priority="normal", timeout_s=None, generation=1, note="test")
    coord = PriorsCoordinator(node.settings, node.index, node.store, on_retrieves=lambda: None,
                              on_released=lambda: None, audit=node.audit)
    coord.hold(job, spec)
    [w] = [x for x in node.store.prior_waits() if x["job_id"] == job]
    coord.step(w)
    w = node.index.conn().execute("SELECT * FROM prior_waits WHERE job_id=?", (job,)).fetchone()
    return [(c["study_uid"], c["source"]) for c in json.loads(w["chosen_json"])], w["note"]


def test_priors_match_the_issuer_of_patient_id_and_say_what_they_left_out(tmp_path, local):
    """Two patients share PatientID P7, one from HOSP_A, one from HOSP_B. The PACS (a second Orthanc)
    holds a study of each, the node another of HOSP_B. A HOSP_A study's priors: the query carries
    the issuer, HOSP_B's studies are not taken and the note says why; without an issuer, all are."""
    cur = tiny_study(tmp_path / "cur", patient_id="P7", study_date="20240610", issuer="HOSP_A")
    a1 = tiny_study(tmp_path / "a1", patient_id="P7", study_date="20230605", issuer="HOSP_A")
    b1 = tiny_study(tmp_path / "b1", patient_id="P7", study_date="20231201", issuer="HOSP_B")
    b_node = tiny_study(tmp_path / "bn", patient_id="P7", study_date="20220101", issuer="HOSP_B")
    plain = tiny_study(tmp_path / "plain", patient_id="P7", study_date="20240101")  # no issuer
    with pacs_orthanc(tmp_path / "pacs") as pacs:
        pacs.upload(a1.files + b1.files)
        node = local({"pacs": dimse(pacs.dicom_port, retrieve="get")})
        from node.receive.ingest import Origin

        for f in b_node.files:
            assert node.ingest.store(f.read_bytes(), Origin("OLDPACS", "HILUM", "127.0.0.1"))[0] == 0
        chosen, note = _priors_of(node, cur, {"source": "pacs", "max": 2}, "k1")
        assert chosen == [(a1.study_uid, "pacs")]
        assert note == ("not taken as priors (same PatientID, another patient): "
                        f"study {b_node.study_uid} (node) has IssuerOfPatientID 'HOSP_B', the current study 'HOSP_A'")
        audit = [json.loads(ln) for ln in (node.settings.data_dir / "audit.jsonl").read_text().splitlines()]
        [q] = [e for e in audit if e["event"] == "pacs-query"]
        assert "HOSP_A" in json.dumps(q)  # the issuer went to the PACS: it answered HOSP_A's study only
        # No issuer on the current study: PatientID alone decides, as before (the two most recent).
        chosen, note = _priors_of(node, plain, {"source": "pacs", "max": 2}, "k2")
        assert chosen == [(b1.study_uid, "pacs"), (a1.study_uid, "pacs")] and note is None


@pytest.fixture
def issuer_blind_pacs(tmp_path):
    """A PACS that ignores IssuerOfPatientID as a matching key but answers it (pynetdicom as the
    peer): both patients' studies come back, each with its own issuer."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    studies = [("1.2.826.0.1.3680043.10.1.1", "20230605", "HOSP_A"), ("1.2.826.0.1.3680043.10.1.2", "20231201",
                                                                        "HOSP_B"), ("1.2.826.0.1.3680043.10.1.3",
                                                                                    "20221201", "")]
    asked: list[Dataset] = []

    def on_find(event):
        asked.append(event.identifier)
        for uid, date, issuer in studies:
            d = Dataset()
            d.QueryRetrieveLevel, d.StudyInstanceUID, d.PatientID, d.StudyDate = "STUDY", uid, "P7", date
            d.IssuerOfPatientID, d.NumberOfStudyRelatedInstances, d.StudyTime = issuer, "3", "090000"
            yield 0xFF00, d

    ae = AE(ae_title="BLIND")
    ae.add_supported_context(FIND)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    yield port, studies, asked
    server.shutdown()


def test_a_pacs_ignoring_the_issuer_key_still_gets_its_other_patient_left_out(tmp_path, local, issuer_blind_pacs):
    port, (a, b, unknown), asked = issuer_blind_pacs
    cur = tiny_study(tmp_path / "cur", patient_id="P7", study_date="20240610", issuer="HOSP_A")
    node = local({"blind": dimse(port, "BLIND", retrieve="get")})
    chosen, note = _priors_of(node, cur, {"source": "blind", "max": 3}, "k1")
    assert asked[0].IssuerOfPatientID == "HOSP_A"
    # HOSP_A's study, and the one whose issuer the PACS does not know (both must be present to differ).
    assert chosen == [(a[0], "blind"), (unknown[0], "blind")]
    assert note == ("not taken as priors (same PatientID, another patient): "
                    f"study {b[0]} (blind) has IssuerOfPatientID 'HOSP_B', the current study 'HOSP_A'")


def test_a_remote_worker_gets_the_priors_a_local_job_would(tmp_path):
    """`executor.kind: celery`, real Redis, a `hilum worker` in an empty directory. The current study
    is retrieved from the PACS (a second Orthanc) by a user; its rule asks for two priors: one the node
    holds, one it retrieves from the PACS. The worker gets them streamed through the worker API
    (worker token + the attempt's ticket), its handler sees the same typed, dated priors as on the
    node, and the job's provenance says which retrieve brought its input, as for a local job."""
    import httpx

    from tests.redisproc import redis_server
    from tests.test_scaleout import ClusterNode, Worker, _audit

    cur = tiny_study(tmp_path / "cur", patient_id="P7", study_date="20240610", study_time="101500")
    p23 = tiny_study(tmp_path / "p23", patient_id="P7", study_date="20230605", study_time="083000",
                     series=(("AX", 1.0, 3), ("COR", 3.0, 2)))
    p21 = tiny_study(tmp_path / "p21", patient_id="P7", study_date="20210601", study_time="090000")  # on the PACS
    p19 = tiny_study(tmp_path / "p19", patient_id="P7", study_date="20190601")  # in the node, beyond max 2
    started: list = []
    with redis_server(tmp_path / "redis") as redis, pacs_orthanc(tmp_path / "pacs") as pacs:
        pacs.upload(cur.files + p21.files)
        try:
            node = ClusterNode(tmp_path, redis.url, 0.0, worker_lost_s=60.0, store_originals_in_orthanc=False,
                               sources={"pacs": dimse(pacs.dicom_port, retrieve="get")})
            (tmp_path / "rules" / "ct.yaml").write_text(
                "name: with-priors\nlevel: study\nmatch: {Modality: CT, calling_ae: PACS}\n"
                "handler: priors-timeline\npriors: {source: pacs, max: 2, within: 10y}\nqueue: cpu\n")
            started.append(node.start())
            for s in (p23, p19):
                assert storescu(node.dicom_port, s.files, calling="OLDPACS").returncode == 0
            wait_for(lambda: node.study(p19.study_uid).get("stable"), 60, "the node's priors stable")
            rid = node.api("POST", "/api/pacs/retrieves", json={"source": "pacs", "study_uids": [cur.study_uid]}
                           ).json()["ids"][0]
            token = node.worker_token()
            started.append(Worker(node, "w1", token))
            # The retrieved prior matches the rule too and gets a job of its own, which may end first.
            [job] = wait_for(lambda: [j for j in node.api("GET", "/api/jobs").json()["jobs"]
                                      if j["study_uid"] == cur.study_uid and j["status"] in ("done", "failed")],
                             180, "the job")
            assert job["status"] == "done", job["error"]
            done = next(h for h in job["history"] if h["event"] == "done")
            assert done["provenance"]["worker"] == "w1"
            assert done["provenance"]["priors"] == [
                {"study_uid": p23.study_uid, "acquired": "2023-06-05T08:30:00", "source": "node", "series": 2},
                {"study_uid": p21.study_uid, "acquired": "2021-06-01T09:00:00", "source": "pacs", "series": 1}]
            assert done["provenance"]["priors_note"] is None
            [who] = done["provenance"]["retrieved_by"].values()
            assert who[0].startswith("api ")
            retrieves = node.api("GET", "/api/pacs/retrieves").json()["retrieves"]
            assert {(r["study_uid"], r["requested_by"].split()[0]) for r in retrieves if r["id"] != rid} == \
                {(p21.study_uid, "priors:job")}
            granted = [(e["detail"]["request"], e["objects"]) for e in _audit(node)
                       if e["outcome"] == 0 and e["detail"].get("job") == job["id"]]
            assert ("priors", 5 + 4) in granted and ("inputs", 4) in granted
            # Without the attempt's ticket the priors stay closed, even to a worker token.
            r = httpx.get(f"{node.web}/api/worker/jobs/{job['id']}/priors", timeout=30,
                          headers={"Authorization": f"Bearer {token.read_text().strip()}", "X-Hilum-Worker": "probe"})
            assert r.status_code == 403
        finally:
            for thing in reversed(started):
                thing.stop()
                if isinstance(thing, NodeProcess):
                    thing._kill_orthanc()


def _pki(root, name: str) -> dict:
    import subprocess
    import sys

    from tests.nodeproc import REPO

    d = root / name
    out = subprocess.run([sys.executable, "-m", "node.cli", "cert", "self-signed", str(d), "--cn", "localhost",
                          "--client-cn", "hilum"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    return {"ca": d / "ca.pem", "server": d / "server.pem", "server_key": d / "server.key",
            "client": d / "client.pem", "client_key": d / "client.key"}


def test_a_tls_source_echoes_queries_and_retrieves_and_a_wrong_ca_says_so(tmp_path, local):
    """The PACS Orthanc speaks DICOM TLS only, requiring a client certificate from the site CA. A
    source with `tls:` (the destination TLS settings) echoes, queries, and retrieves by C-GET (the
    instances come back on the TLS association) and by C-MOVE (the control association over TLS).
    A wrong CA, a client certificate the PACS does not trust, and no TLS fail with errors saying which."""
    from node.pacs.model import PacsError, StudyQuery
    from node.pacs.sources import source_client

    site, other = _pki(tmp_path, "site"), _pki(tmp_path, "other")
    good = {"ca": str(site["ca"]), "cert": str(site["client"]), "key": str(site["client_key"])}
    a = tiny_study(tmp_path / "a", patient_id="T1", study_date="20240101")
    b = tiny_study(tmp_path / "b", patient_id="T1", study_date="20240201", series=(("AX", 1.0, 2),))
    tls = {"cert": site["server"], "key": site["server_key"], "trusted": site["ca"]}
    with pacs_orthanc(tmp_path / "pacs", tls=tls) as pacs:
        pacs.upload(a.files + b.files)
        port = pacs.dicom_port
        node = local({
            "get": dimse(port, host="localhost", retrieve="get", tls=good),
            "move": dimse(port, host="localhost", tls=good),
            "wrongca": dimse(port, host="localhost", timeout_s=5, tls={**good, "ca": str(other["ca"])}),
            "strange": dimse(port, host="localhost", timeout_s=5, tls={
                "ca": str(site["ca"]), "cert": str(other["client"]), "key": str(other["client_key"])}),
            "plain": dimse(port, host="localhost", timeout_s=5)})
        pacs.set_node("HILUM", node.settings.dicom_port)
        assert source_client(node.settings, "get").echo() > 0
        found, bad = source_client(node.settings, "move").find_studies(StudyQuery(patient_id="T1"))
        assert {m.study_uid for m in found} == {a.study_uid, b.study_uid} and bad == 0
        node.retriever.start()
        r1, _ = node.store.add("get", a.study_uid, None, "test")
        r2, _ = node.store.add("move", b.study_uid, None, "test")
        node.retriever.wake()
        assert node.wait(r1)["status"] == "done" and node.held(a.study_uid) == a.sop_uids
        r = node.wait(r2)
        assert (r["status"], r["method"], r["completed"]) == ("done", "move", 2)
        assert node.held(b.study_uid) == b.sop_uids
        with pytest.raises(PacsError) as wrong:
            source_client(node.settings, "wrongca").echo()
        assert str(wrong.value).startswith(f"source wrongca: DICOM TLS with PACS@localhost:{port} failed: the peer's "
                                           "certificate was not accepted: self-signed certificate in certificate chain")
        assert "(is tls.ca the CA that signed it?) (sources.wrongca.tls)" in str(wrong.value)
        with pytest.raises(PacsError, match="the peer refused our client certificate .*check tls.cert and tls.key"):
            source_client(node.settings, "strange").find_studies(StudyQuery(patient_id="T1"))
        with pytest.raises(PacsError, match="not established"):  # the PACS speaks TLS only
            source_client(node.settings, "plain").echo()
        # A retrieve from the source with the wrong CA, or with a client certificate the PACS refuses:
        # a certificate that does not verify is not transient, so each fails at its first attempt
        # (no backoff, no retries) with the error naming the source and the cause.
        r3, _ = node.store.add("wrongca", a.study_uid, None, "test")
        r4, _ = node.store.add("strange", a.study_uid, None, "test")
        node.retriever.wake()
        for rid, source, cause in ((r3, "wrongca", "the peer's certificate was not accepted"),
                                   (r4, "strange", "the peer refused our client certificate")):
            r = node.wait(rid)
            assert (r["status"], r["attempts"]) == ("failed", 1), r
            assert r["error"].startswith(f"source {source}: DICOM TLS with PACS@localhost:{port} failed: {cause}")
            assert r["error"].endswith(f"(sources.{source}.tls)")
            assert [e["event"] for e in json.loads(r["history_json"])].count("started") == 1


def test_instances_arriving_while_a_retrieve_runs_are_not_called_pushed(tmp_path, local):
    """Two instances pushed by a modality, then a retrieve of the study is queued and a third instance
    arrives: until the retrieve ends the third is 'not yet attributed' (the running retrieve named),
    never counted as pushed; when it ends, it is the retrieve's."""
    from node.receive.ingest import Origin
    from node.store.retrieves import series_origins
    from node.web.views import origin_lines

    st = tiny_study(tmp_path / "s", patient_id="P1", series=(("AX", 1.0, 3),))
    [series] = st.series
    node = local({"pacs": dimse(free_port())})
    files = sorted(st.files)
    for f in files[:2]:
        assert node.ingest.store(f.read_bytes(), Origin("MODALITY", "HILUM", "10.0.0.7"))[0] == 0
    assert node.ingest.writer.flush(30)
    rid, _ = node.store.add("pacs", st.study_uid, None, "rule:nightly")
    assert node.ingest.store(files[2].read_bytes(), Origin("PACS", "HILUM", "10.0.0.9"))[0] == 0
    assert node.ingest.writer.flush(30)
    o = series_origins(node.index, st.study_uid)[series]
    assert o["pushed"]["instances"] == 2 and o["pushed"]["calling_ae"] == "MODALITY" and o["unattributed"] == 1
    assert [(r["retrieve"], r["status"], r["by"], r["rule"]) for r in o["arriving"]] == \
        [(rid, "queued", "rule", "nightly")]
    assert origin_lines(o)[-1] == f"retrieve {rid} from pacs by pull rule nightly still queued: " \
                                  "1 instance(s) not yet attributed"
    # Ended with its counts: attributed and counted in the same transaction (the node holds 3 of the study).
    assert node.store.finish(rid, "done", counts=(1, 0, 0)) == (3, "done", None)
    assert node.store.get(rid)["received"] == 3 and node.store.get(rid)["completed"] == 1
    o = series_origins(node.index, st.study_uid)[series]
    assert o["pushed"]["instances"] == 2 and o["unattributed"] == 0 and o["arriving"] == []
    assert [(r["retrieve"], r["instances"], r["by"]) for r in o["retrieved"]] == [(rid, 1, "rule")]


def test_priors_from_a_pacs_that_ignores_the_date_and_modality_keys_are_the_ones_asked_for(tmp_path, local):
    """A PACS (pynetdicom) that answers the patient's every study whatever the query: a later MR, a
    study of the same day, one older than ``within``, one without a date, and the one real CT prior.
    Only the real prior is chosen (a later study handed over as 'the most recent prior' would be a
    wrong comparison, and it would push the real one out of ``max``); the note names the rest."""
    from pydicom.dataset import Dataset

    from tests.test_pacs import _scripted_pacs

    cur = tiny_study(tmp_path / "cur", patient_id="P9", study_date="20240301")
    answers = [("1.2.826.0.1.3680043.8.498.91", "20250601", "MR"), ("1.2.826.0.1.3680043.8.498.92", "20240301", "CT"),
               ("1.2.826.0.1.3680043.8.498.93", "20150101", "CT"), ("1.2.826.0.1.3680043.8.498.94", "", "CT"),
               ("1.2.826.0.1.3680043.8.498.95", "20230101", "CT"), ("1.2.826.0.1.3680043.8.498.96", "20230601", "MR")]

    def on_find(event):
        for uid, date, modality in answers:
            d = Dataset()
            d.QueryRetrieveLevel, d.StudyInstanceUID, d.PatientID = "STUDY", uid, "P9"
            d.StudyDate, d.ModalitiesInStudy, d.NumberOfStudyRelatedInstances = date, modality, "2"
            yield 0xFF00, d

    port, server = _scripted_pacs("LAXPACS", on_find)
    try:
        node = local({"lax": dimse(port, "LAXPACS", retrieve="move")})
        chosen, note = _priors_of(node, cur, {"source": "lax", "max": 2, "within": "5y", "match": {"Modality": "CT"}},
                                  "k1")
    finally:
        server.shutdown()
    assert chosen == [("1.2.826.0.1.3680043.8.498.95", "lax")]
    assert note.startswith("source lax answered 5 studies outside what was asked (")
    for uid in ("91", "92", "93", "94", "96"):
        assert f"1.2.826.0.1.3680043.8.498.{uid} (" in note
    assert "(MR, not CT)" in note and "(dated nothing)" in note
