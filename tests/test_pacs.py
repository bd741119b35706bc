"""PACS synchronisation (node/pacs) against real peers: a second Orthanc as the hospital PACS
(C-FIND/C-MOVE/C-GET and DICOMweb) and DCMTK dcmqrscp; the node's own SCP and durable ingest."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from node.audit import AuditTrail, ChainedLog
from node.config import ConfigError, load_settings
from node.pacs.retriever import Retriever
from node.receive.ingest import Ingest
from node.receive.scp import StoreSCP
from node.store.index import Index
from node.store.retrieves import RetrieveStore
from node.store.vault import Vault
from tests.nodeproc import REPO, free_port, wait_for
from tests.pacs_peers import dcmqrscp, pacs_orthanc, tiny_study


class Local:
    """A node's receive side in-process: index, vault, durable ingest, SCP; plus the retriever."""

    def __init__(self, root: Path, sources: dict, **kw) -> None:
        self.settings = load_settings(**{"data_dir": root, "dicom_host": "127.0.0.1", "dicom_port": free_port(),
                                         "min_free_disk_mb": 0, "sources": sources, "retrieve_backoff_s": 0.3,
                                         "retrieve_backoff_max_s": 1.0, **kw})
        root.mkdir(parents=True, exist_ok=True)
        self.index = Index(root / "index.db")
        self.ingest = Ingest(self.index, Vault(root, None, writer=True))
        self.scp = StoreSCP(self.settings, self.ingest)
        self.scp.start()
        self.store = RetrieveStore(self.index)
        self.audit = AuditTrail(ChainedLog(root / "audit.jsonl", b"k" * 32), "HILUM")
        self.retriever = Retriever(self.settings, self.store, self.ingest, self.audit)

    def held(self, study_uid: str) -> set[str]:
        assert self.ingest.writer.flush(30)
        return {r["sop_uid"] for r in self.index.instances_of_study(study_uid)}

    def wait(self, rid: int, timeout: float = 60) -> dict:
        return dict(wait_for(lambda: (r := self.store.get(rid))["status"] in ("done", "partial", "failed",
                                                                            "cancelled") and r, timeout,
                             f"retrieve {rid}"))

    def close(self) -> None:
        self.retriever.stop()
        self.scp.stop()
        self.ingest.close()
        self.ingest.vault.close()


@pytest.fixture
def local(tmp_path):
    made: list[Local] = []

    def make(sources: dict, name: str = "node", **kw) -> Local:
        made.append(Local(tmp_path / name, sources, **kw))
        return made[-1]

    yield make
    for n in made:
        n.close()


def dimse(port: int, ae: str = "PACS", **kw) -> dict:
    return {"ae_title": ae, "host": "127.0.0.1", "port": port, **kw}


def test_sources_are_validated_naming_the_field(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"sources\.pacs\.dimse\.port"):
        load_settings(sources={"pacs": dimse(70000)})
    with pytest.raises(ConfigError, match=r"sources\.pacs\.dimse\.retrieve"):
        load_settings(sources={"pacs": dimse(104, retrieve="wado")})
    with pytest.raises(ConfigError, match=r"sources\.web\.dicomweb\.auth\.password: Extra inputs"):
        load_settings(sources={"web": {"qido_url": "http://h/dicom-web", "auth": {"username": "u", "password": "x"}}})
    with pytest.raises(ConfigError, match="environment variable PACS_PW_UNSET is not set"):
        load_settings(sources={"web": {"qido_url": "http://h/dw", "auth": {"username": "u",
                                                                           "password_env": "PACS_PW_UNSET"}}})
    with pytest.raises(ConfigError, match=r"sources\.web\.dicomweb\.qido_url"):
        load_settings(sources={"web": {"qido_url": "ftp://h"}})
    monkeypatch.setenv("PACS_PW", "secret")
    s = load_settings(sources={"pacs": dimse(104, retrieve="get"), "web": {"qido_url": "http://h/dw/", "auth": {
        "username": "u", "password_env": "PACS_PW"}}}, destinations={"pacs": dimse(104)})
    assert s.sources["pacs"].retrieve == "get" and s.sources["web"].wado == "http://h/dw"
    assert s.sources["web"].auth.secret() == "secret"  # read from the variable, never from the YAML


def test_echo_and_query_both_pacs(tmp_path):
    st = tiny_study(tmp_path / "s1", patient_id="P1", accession="ACC1", series=(("AX", 1.0, 3), ("COR", 3.0, 2)))
    other = tiny_study(tmp_path / "s2", patient_id="P2", study_date="20240301", modality="MR")
    with pacs_orthanc(tmp_path / "pacs") as pacs, dcmqrscp(tmp_path / "qr", "HILUM", free_port(),
                                                           st.files + other.files) as qr_port:
        pacs.upload(st.files + other.files)
        s = load_settings(sources={"pacs": dimse(pacs.dicom_port), "qr": dimse(qr_port, "DCMQR"),
                                   "web": {"qido_url": pacs.url + "/dicom-web"}})
        from node.pacs.sources import source_client
        from node.pacs.model import StudyQuery

        for name in ("pacs", "qr", "web"):
            c = source_client(s, name)
            assert c.echo() > 0
            found, bad = c.find_studies(StudyQuery(patient_id="P1"))
            assert [m.study_uid for m in found] == [st.study_uid] and bad == 0, name
            series, _ = c.find_series(st.study_uid)
            assert {x.series_uid for x in series} == set(st.series), name
            assert c.find_studies(StudyQuery(patient_id="NOBODY"))[0] == []  # 0 matches: empty, no error
        orth = source_client(s, "pacs").find_studies(StudyQuery(study_date="20240201-"))[0]
        assert [m.study_uid for m in orth] == [other.study_uid]
        assert orth[0].instances == 4 and orth[0].modalities == ["MR"]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", "pacs", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_cli_echo_query_marks_held_studies_and_queues_retrieves(tmp_path, local):
    st = tiny_study(tmp_path / "s1", patient_id="P1")
    other = tiny_study(tmp_path / "s2", patient_id="P1", study_date="20230101")
    with pacs_orthanc(tmp_path / "pacs") as pacs:
        pacs.upload(st.files + other.files)
        node = local({"pacs": dimse(pacs.dicom_port, retrieve="get")})
        for f in st.files:  # one study is already in Hilum
            assert node.ingest.store(f.read_bytes(), __import__("node.receive.ingest", fromlist=["Origin"]).Origin(
                "MOD", "HILUM", "127.0.0.1"))[0] == 0
        node.ingest.writer.flush(30)
        cfg = tmp_path / "hilum.yaml"
        cfg.write_text(yaml.safe_dump({"data_dir": str(node.settings.data_dir), "sources": {
            "pacs": dimse(pacs.dicom_port, retrieve="get")}}))
        out = _cli("echo", "pacs", "--config", str(cfg))
        assert out.returncode == 0 and "pacs: ok" in out.stdout, out.stderr
        out = _cli("query", "pacs", "--patient-id", "P1", "--config", str(cfg))
        assert out.returncode == 0, out.stderr
        lines = {ln.split()[-1]: ln for ln in out.stdout.splitlines() if "1.2." in ln}
        assert lines[st.study_uid].startswith("*") and not lines[other.study_uid].startswith("*")
        out = _cli("query", "nosuch", "--config", str(cfg))
        assert out.returncode == 2 and "no source named 'nosuch'" in out.stderr
        out = _cli("retrieve", "pacs", other.study_uid, "--config", str(cfg))
        assert out.returncode == 0, out.stderr
        rid = int(out.stdout.split()[0])
        assert node.store.get(rid)["status"] == "queued" and node.store.get(rid)["requested_by"].startswith("cli ")
        node.retriever.start()  # the running node picks up what the CLI queued
        r = node.wait(rid)
        assert r["status"] == "done", r
        assert node.held(other.study_uid) == other.sop_uids
        out = _cli("jobs", "--json", "--config", str(cfg))
        assert json.loads(out.stdout)[0]["status"] == "done"
        out = _cli("provenance", other.study_uid, "--config", str(cfg))
        assert out.returncode == 0 and out.stdout.startswith(f"retrieve {rid} by cli ") and \
            "from pacs (get, done): 4 instance(s)" in out.stdout, out.stdout + out.stderr
        out = _cli("provenance", st.study_uid, "--config", str(cfg))  # pushed, not retrieved
        assert "no instance of" in out.stdout and "brought by a retrieve" in out.stdout
        out = _cli("query", "pacs", "--since", "36500d", "--modality", "CT", "--json", "--config", str(cfg))
        assert {m["study_uid"] for m in json.loads(out.stdout)["matches"]} == {st.study_uid, other.study_uid}
        assert _cli("query", "pacs", "--since", "soon", "--config", str(cfg)).returncode == 2
        node.retriever.stop()  # no runner: the next one stays queued while we cancel and retry it
        rid = int(_cli("retrieve", "pacs", "1.2.3.4", "--config", str(cfg)).stdout.split()[0])
        assert _cli("cancel", str(rid), "--config", str(cfg)).returncode == 0
        assert node.store.get(rid)["status"] == "cancelled"
        assert _cli("cancel", str(rid), "--config", str(cfg)).returncode == 1  # not active any more
        assert _cli("retry", str(rid), "--config", str(cfg)).returncode == 0
        assert node.store.get(rid)["status"] == "queued"
        audit = [json.loads(ln) for ln in (node.settings.data_dir / "audit" / "audit.jsonl").read_text().splitlines()]
        q = [a for a in audit if a["event"] == "pacs-query"]
        assert q and q[0]["detail"]["keys"] == {"PatientID": "P1"} and q[0]["detail"]["matches"] == 2
        retrieved = [json.loads(ln) for ln in (node.settings.data_dir / "audit.jsonl").read_text().splitlines()]
        [e] = [a for a in retrieved if a["event"] == "pacs-retrieve"]
        assert e["user"].startswith("cli ") and e["study_uid"] == other.study_uid and e["objects"] == 4
        assert e["detail"]["completed"] == 4 and e["destination"] == "pacs" and e["outcome"] == 0


@pytest.mark.parametrize("method", ["get", "move"])
def test_retrieve_from_orthanc_is_durable_and_deduplicated(tmp_path, local, method):
    from node.store.retrieves import retrieved_by

    st = tiny_study(tmp_path / "s", series=(("AX", 1.0, 6), ("COR", 3.0, 3)))
    with pacs_orthanc(tmp_path / "pacs") as pacs:
        pacs.upload(st.files)
        node = local({"pacs": dimse(pacs.dicom_port, retrieve=method)})
        pacs.set_node("HILUM", node.settings.dicom_port)
        node.retriever.start()
        rid, created = node.store.add("pacs", st.study_uid, None, "test")
        assert created and node.store.add("pacs", st.study_uid, None, "test") == (rid, False)  # no double queue
        node.retriever.wake()
        r = node.wait(rid)
        assert (r["status"], r["method"], r["expected"], r["received"], r["completed"], r["failed"]) == \
            ("done", method, 9, 9, 9, 0)
        assert node.held(st.study_uid) == st.sop_uids
        # Again: nothing new stored, the ingest counts duplicates.
        rid2, _ = node.store.add("pacs", st.study_uid, None, "test")
        node.retriever.wake()
        assert node.wait(rid2)["status"] == "done"
        assert len(node.index.instances_of_study(st.study_uid)) == 9 and node.index.stat("duplicates") == 9
        # Provenance: every instance is recorded as brought by the first retrieve (the second brought nothing).
        prov = node.store.provenance(st.study_uid)
        assert [(p["retrieve"], p["requested_by"], p["source"], p["method"], p["instances"]) for p in prov] == \
            [(rid, "test", "pacs", method, 9)]
        assert prov[0]["series"] == {u: len(v) for u, v in st.series.items()}
        assert retrieved_by(node.index, list(st.series)) == {"retrieved_by": {u: ["test"] for u in st.series}}
        ax = next(u for u, v in st.series.items() if len(v) == 6)  # only one series
        other = tiny_study(tmp_path / "s3", series=(("AX", 1.0, 2), ("COR", 3.0, 2)))
        pacs.upload(other.files)
        one = next(iter(other.series))
        rid3, _ = node.store.add("pacs", other.study_uid, [one], "test")
        node.retriever.wake()
        r = node.wait(rid3)
        assert r["status"] == "done" and r["expected"] == 2 and node.held(other.study_uid) == set(other.series[one])
        rid4, _ = node.store.add("pacs", other.study_uid, None, "rule:whole")  # then the rest, by a rule
        node.retriever.wake()
        assert node.wait(rid4)["status"] == "done"
        assert {p["retrieve"]: (p["requested_by"], p["series"]) for p in node.store.provenance(other.study_uid)} == \
            {rid3: ("test", {one: 2}), rid4: ("rule:whole", {u: 2 for u in other.series if u != one})}
        assert ax


def test_unknown_move_destination_names_the_ae_title(tmp_path, local):
    st = tiny_study(tmp_path / "s")
    with pacs_orthanc(tmp_path / "pacs") as pacs, dcmqrscp(tmp_path / "qr", "HILUM", free_port(), st.files) as qr:
        pacs.upload(st.files)
        node = local({"pacs": dimse(pacs.dicom_port, move_destination="HILUMNEW"),
                      "qr": dimse(qr, "DCMQR", move_destination="HILUMNEW")}, retrieve_max_attempts=2)
        node.retriever.start()
        rid, _ = node.store.add("qr", st.study_uid, None, "test")
        node.retriever.wake()
        r = node.wait(rid)
        assert r["status"] == "failed" and r["attempts"] == 1  # 0xA801: not retried, a retry cannot fix it
        assert "0xA801" in r["error"] and "Configure AE title 'HILUMNEW' on the PACS" in r["error"]
        # Orthanc answers an unknown destination with a plain failure: the same advice, retried.
        rid, _ = node.store.add("pacs", st.study_uid, None, "test")
        node.retriever.wake()
        r = node.wait(rid)
        assert r["status"] == "failed" and r["attempts"] == 2
        assert "Configure AE title 'HILUMNEW' on the PACS" in r["error"]
        assert node.held(st.study_uid) == set()


def test_pacs_down_fails_retries_then_completes(tmp_path, local):
    st = tiny_study(tmp_path / "s")
    from tests.pacs_peers import PacsOrthanc

    pacs = PacsOrthanc(tmp_path / "pacs")
    node = local({"pacs": dimse(pacs.dicom_port, retrieve="get", timeout_s=5)}, retrieve_max_attempts=20)
    node.retriever.start()
    rid, _ = node.store.add("pacs", st.study_uid, None, "test")
    node.retriever.wake()
    wait_for(lambda: node.store.get(rid)["attempts"] >= 2, 30, "two failed attempts")
    r = node.store.get(rid)
    errors = [h.get("error", "") for h in json.loads(r["history_json"])]
    assert any("cannot connect to PACS@127.0.0.1" in e and "Connection refused (is the PACS up?)" in e
               for e in errors), errors
    # Hold the next attempt until the study is on the PACS: one between its start and the upload
    # would rightly fail for good (0 matches). Only a queued record is held, never one in flight.
    park = "UPDATE retrieves SET next_at=? WHERE id=? AND status='queued'"
    wait_for(lambda: node.index.conn().execute(park, (time.time() + 3600, rid)).rowcount == 1, 30, "a queued retry")
    pacs.start()
    try:
        pacs.upload(st.files)
        node.index.conn().execute("UPDATE retrieves SET next_at=? WHERE id=?", (time.time(), rid))
        node.retriever.wake()
        r = node.wait(rid, 60)
        assert r["status"] == "done" and r["attempts"] >= 3 and node.held(st.study_uid) == st.sop_uids
    finally:
        pacs.stop()


def test_restart_mid_retrieve_resumes_without_loss_or_duplicates(tmp_path, local):
    st = tiny_study(tmp_path / "s", series=(("AX", 1.0, 8),))
    with pacs_orthanc(tmp_path / "pacs") as pacs:
        pacs.upload(st.files)
        node = local({"pacs": dimse(pacs.dicom_port, retrieve="get")})
        # The state a crash leaves: a retrieve marked running, three of its instances already stored.
        rid, _ = node.store.add("pacs", st.study_uid, None, "test")
        node.store.claim(time.time(), {"pacs": 1})
        node.store.progress(rid, status="retrieving", method="get", expected=8)
        from node.receive.ingest import Origin

        for f in st.files[:3]:
            node.ingest.store(f.read_bytes(), Origin("PACS", "HILUM", "127.0.0.1"))
        node.retriever.start()  # the restarted node: requeue, resume
        r = node.wait(rid)
        assert r["status"] == "done" and r["received"] == 8
        assert node.held(st.study_uid) == st.sop_uids and len(node.index.instances_of_study(st.study_uid)) == 8
        assert any(h["event"] == "requeued after restart" for h in json.loads(r["history_json"]))


def test_dcmqrscp_and_dicomweb_sources(tmp_path, local):
    st = tiny_study(tmp_path / "s", series=(("AX", 1.0, 4), ("COR", 3.0, 2)))
    web_study = tiny_study(tmp_path / "w", series=(("AX", 1.0, 3),))
    node_port = free_port()
    with pacs_orthanc(tmp_path / "pacs") as pacs, dcmqrscp(tmp_path / "qr", "HILUM", node_port, st.files) as qr:
        pacs.upload(web_study.files)
        node = local({"qr": dimse(qr, "DCMQR", retrieve="get"), "qrm": dimse(qr, "DCMQR"),
                      "web": {"qido_url": pacs.url + "/dicom-web"}}, dicom_port=node_port)
        node.retriever.start()
        one = next(u for u, v in st.series.items() if len(v) == 2)
        r1, _ = node.store.add("qr", st.study_uid, [one], "test")  # C-GET, one series
        r2, _ = node.store.add("web", web_study.study_uid, None, "test")  # WADO-RS
        node.retriever.wake()
        assert node.wait(r1)["status"] == "done" and node.held(st.study_uid) == set(st.series[one])
        r = node.wait(r2)
        assert r["status"] == "done" and r["method"] == "wado" and node.held(web_study.study_uid) == web_study.sop_uids
        r3, _ = node.store.add("qrm", st.study_uid, None, "test")  # C-MOVE of the rest from the stricter PACS
        node.retriever.wake()
        assert node.wait(r3)["status"] == "done" and node.held(st.study_uid) == st.sop_uids
        r4, _ = node.store.add("qr", "1.2.3.4.5.6.7.8.9", None, "test")  # not on the PACS: 0 matches
        node.retriever.wake()
        r = node.wait(r4)
        assert r["status"] == "failed" and "not found (0 matches)" in r["error"]


def test_running_node_api_and_cli_retrieve(tmp_path):
    """A real `hilum up`: the API queues a C-MOVE retrieve, the CLI a C-GET one with --wait; viewers read only."""
    from tests.nodeproc import NodeProcess

    a = tiny_study(tmp_path / "a", patient_id="P9", study_date="20240105")
    b = tiny_study(tmp_path / "b", patient_id="P9", study_date="20240210", series=(("AX", 1.0, 3), ("COR", 3.0, 2)))
    with pacs_orthanc(tmp_path / "pacs") as pacs:
        pacs.upload(a.files + b.files)
        srcs = {"pacs": dimse(pacs.dicom_port), "pacsget": dimse(pacs.dicom_port, retrieve="get")}
        node = NodeProcess(tmp_path / "node", tmp_path / "rules", sources=srcs, store_originals_in_orthanc=False)
        (tmp_path / "rules").mkdir()
        # A routing rule for what is pulled: its job's history says which retrieve request brought the input.
        (tmp_path / "rules" / "route.yaml").write_text(
            "name: pulled\nlevel: study\nmatch: {PatientID: P9}\nhandler: priors-timeline\n")
        pacs.set_node("HILUM", node.dicom_port)
        node.start()
        try:
            viewer = node.hilum("token", "create", "--role", "viewer", "--config", str(node.config_path)).stdout.strip()
            vh = {"Authorization": f"Bearer {viewer}"}
            src = node.api("GET", "/api/pacs/sources", headers=vh).json()["sources"]
            assert [(s["name"], s["retrieve"]) for s in src] == [("pacs", "move"), ("pacsget", "get")]
            assert node.api("POST", "/api/pacs/sources/pacs/query", headers=vh, json={}).status_code == 403
            assert node.api("POST", "/api/pacs/sources/pacs/echo").json()["ok"] is True
            m = node.api("POST", "/api/pacs/sources/pacs/query", json={"patient_id": "P9"}).json()["matches"]
            assert {x["study_uid"] for x in m} == {a.study_uid, b.study_uid} and not any(x["in_hilum"] for x in m)
            rid = node.api("POST", "/api/pacs/retrieves", json={"source": "pacs", "study_uids": [a.study_uid]}
                           ).json()["ids"][0]
            r = wait_for(lambda: next((x for x in node.api("GET", "/api/pacs/retrieves", headers=vh).json()[
                "retrieves"] if x["id"] == rid and x["status"] in ("done", "failed")), None), 60, "API retrieve")
            assert r["status"] == "done" and r["progress"] == 1.0 and r["requested_by"].startswith("api ")
            out = node.hilum("pacs", "retrieve", "pacsget", b.study_uid, "--wait", "--timeout", "60",
                             "--config", str(node.config_path))
            assert out.returncode == 0 and " done " in out.stdout, out.stdout + out.stderr
            wait_for(lambda: node.study(b.study_uid).get("instances_received") == 5, 30, "study b indexed")
            assert node.study(a.study_uid)["instances_received"] == 4
            prov = node.api("GET", f"/api/pacs/provenance/{b.study_uid}", headers=vh).json()["retrieves"]
            assert [(p["requested_by"].split()[0], p["source"], p["method"], p["instances"]) for p in prov] == \
                [("cli", "pacsget", "get", 5)]
            [job] = wait_for(lambda: [j for j in node.api("GET", "/api/jobs").json()["jobs"]
                                      if j["study_uid"] == b.study_uid and j["status"] == "done"], 60, "b's job")
            done = next(h for h in job["history"] if h["event"] == "done")
            assert set(done["provenance"]["retrieved_by"]) == set(b.series)
            assert all(who[0].startswith("cli ") for who in done["provenance"]["retrieved_by"].values())
            m = node.api("POST", "/api/pacs/sources/pacs/query", json={"patient_id": "P9"}).json()["matches"]
            assert all(x["in_hilum"] for x in m)
            # A pull rule dropped into the rules directory is picked up (hot reload) and shown with its state.
            (tmp_path / "rules" / "pull.yaml").write_text(
                "kind: pull\nname: p9\nsource: pacs\nquery: {PatientID: P9}\nschedule: {every: 1h}\nwatch: true\n")
            pr = wait_for(lambda: [x for x in node.api("GET", "/api/pacs/pull-rules", headers=vh).json()[
                "pull_rules"] if x["last_run_at"]], 30, "the pull rule's first run")
            assert pr[0]["name"] == "p9" and pr[0]["last_result"]["matches"] == 2 and pr[0]["high_water"]
            assert pr[0]["last_result"]["queued"] == 2  # not yet seen by this rule: queued, the ingest dedupes
            ex = node.api("GET", "/api/pacs/pull-rules/p9/explain", headers=vh).json()
            assert ex["queries"] == [{"PatientID": "P9", "StudyDate": f"{pr[0]['high_water']}-"}]
            assert ex["next_run_from"] == "scheduled by the node" and ex["high_water"] == pr[0]["high_water"]
            assert node.api("GET", "/api/pacs/pull-rules/nope/explain").status_code == 404
            assert node.api("POST", "/api/pacs/pull-rules/p9/run", headers=vh).status_code == 403
            assert node.api("POST", "/api/pacs/pull-rules/p9/run").status_code == 200
            wait_for(lambda: node.api("GET", "/api/pacs/pull-rules").json()["pull_rules"][0]["last_run_at"]
                     > pr[0]["last_run_at"], 15, "the second run")
            again = node.api("GET", "/api/pacs/pull-rules").json()["pull_rules"][0]["last_result"]
            assert again["queued"] == 0 and again["rechecked"] == 0
        finally:
            node.stop()
            node._kill_orthanc()


def _pull_rules(tmp_path, text: str, sources=("pacs",)):
    from node.handler_api import get_handler
    from node.rules.ruleset import RuleSet

    return RuleSet.from_files({"pull.yaml": text}, handlers=get_handler, destinations={"orthanc"}, sources=sources)


def test_pull_rule_series_filter_watch_growth_limits_and_restart(tmp_path, local):
    import datetime as dt

    from node.pacs.scheduler import PullScheduler

    today = dt.date.today().strftime("%Y%m%d")
    old = (dt.date.today() - dt.timedelta(days=30)).strftime("%Y%m%d")
    a = tiny_study(tmp_path / "a", study_date=today, series=(("AX THIN", 1.0, 3), ("COR", 3.0, 2)))
    mr = tiny_study(tmp_path / "mr", study_date=today, modality="MR")
    past = tiny_study(tmp_path / "past", study_date=old)
    with pacs_orthanc(tmp_path / "pacs") as pacs:
        pacs.upload(a.files + mr.files + past.files)
        node = local({"pacs": dimse(pacs.dicom_port, retrieve="get")}, rules_dir=tmp_path / "rules")
        node.retriever.start()
        rules = _pull_rules(tmp_path, """
- kind: pull
  name: thin-ct
  source: pacs
  query: {ModalitiesInStudy: CT, StudyDate: {last: 7d}}
  series: {SliceThickness: {le: 1.5}}
  schedule: {every: 1h}
  watch: true
  limits: {studies_per_run: 2}
""")
        rule = rules.pull_rules[0]
        sched = PullScheduler(node.settings, lambda: rules, node.store, on_queued=node.retriever.wake,
                              audit=node.audit)
        node.store.ensure_pull_state(rule.name, time.time())
        res = sched.run(rule)
        assert (res["matches"], res["queued"], res["skipped_series"], res["error"]) == (1, 1, 1, None)
        [r] = node.store.list()
        assert r["requested_by"] == "rule:thin-ct" and json.loads(r["series_json"]) == \
            [next(u for u, v in a.series.items() if len(v) == 3)]
        assert node.wait(r["id"])["status"] == "done"
        thin = next(v for v in a.series.values() if len(v) == 3)
        assert node.held(a.study_uid) == set(thin)  # only the thin axial series, not the study
        assert node.held(mr.study_uid) == set() and node.held(past.study_uid) == set()
        state = node.store.pull_state("thin-ct")
        hw = (dt.date.today() - dt.timedelta(days=1)).strftime("%Y%m%d")
        assert state["high_water"] == hw and state["next_at"] > time.time() + 3000
        # Second poll: the study did not change: looked at, stable, nothing queued.
        res = sched.run(rule)
        assert (res["queued"], res["rechecked"], res["stable"]) == (0, 0, 1)
        # The study grows on the PACS (a new thin series): re-checked and the new series fetched.
        more = tiny_study(tmp_path / "more", study_uid=a.study_uid, study_date=today, series=(("AX THIN 2", 1.0, 2),))
        pacs.upload(more.files)
        # A restarted node (new scheduler, same index) neither repeats nor misses anything.
        sched = PullScheduler(node.settings, lambda: rules, node.store, on_queued=node.retriever.wake)
        res = sched.run(rule)
        assert (res["queued"], res["rechecked"]) == (0, 1)
        [r2] = [x for x in node.store.list() if x["id"] != r["id"]]
        assert node.wait(r2["id"])["status"] == "done"
        assert node.held(a.study_uid) == set(thin) | more.sop_uids
        # Limits: five new studies, two per run.
        new = [tiny_study(tmp_path / f"n{i}", study_date=today, series=(("AX", 1.0, 1),)) for i in range(5)]
        pacs.upload([f for s in new for f in s.files])
        res = sched.run(rule)
        assert (res["queued"], res["left"]) == (2, 3)
        assert sched.run(rule)["queued"] == 2 and sched.run(rule)["queued"] == 1
        assert sched.run(rule)["queued"] == 0
        assert sorted(x["study_uid"] for x in node.store.list()) == sorted(
            [a.study_uid, a.study_uid] + [s.study_uid for s in new])  # each new study once; the grown one twice
        audit = [json.loads(ln) for ln in (node.settings.data_dir / "audit.jsonl").read_text().splitlines()]
        assert any(e["event"] == "pacs-query" and e["user"] == "rule:thin-ct" for e in audit)
    # The PACS gone: the run records the error and the next run time, nothing crashes.
    res = sched.run(rule)
    assert res["error"] and "connection refused (is the pacs up?)" in res["error"].lower()
    assert node.store.pull_state("thin-ct")["last_error"] == res["error"]


def test_instances_per_hour_holds_studies_back_until_the_hour_has_passed(tmp_path, local):
    """limits.instances_per_hour: 10. Studies of 4, 4, 4 and 12 instances on the PACS: the first run
    queues two (8), the second in the same hour none; an hour later the third, and the study larger
    than the limit goes alone in the hour after that, instead of never."""
    from node.pacs.scheduler import PullScheduler

    studies = [tiny_study(tmp_path / f"s{i}", patient_id="HOUR", study_date=f"2024010{i + 1}",
                          series=(("AX", 1.0, n),)) for i, n in enumerate((4, 4, 4, 12))]
    with pacs_orthanc(tmp_path / "pacs") as pacs:
        pacs.upload([f for s in studies for f in s.files])
        node = local({"pacs": dimse(pacs.dicom_port)})
        rules = _pull_rules(tmp_path, "kind: pull\nname: hourly\nsource: pacs\nquery: {PatientID: HOUR}\n"
                                      "limits: {instances_per_hour: 10}\n")
        sched = PullScheduler(node.settings, lambda: rules, node.store, on_queued=lambda: None)
        rule = rules.pull_rules[0]

        def queued() -> list[str]:
            return sorted(r["study_uid"] for r in node.store.list())

        def an_hour_passes() -> None:  # the rate window looks at when each retrieve was queued
            node.index.conn().execute("UPDATE retrieves SET created_at = created_at - 3601")

        res = sched.run(rule)
        assert (res["matches"], res["queued"], res["left"], res["error"]) == (4, 2, 2, None)
        assert queued() == sorted(s.study_uid for s in studies[:2])  # oldest first
        res = sched.run(rule)
        assert (res["queued"], res["left"]) == (0, 2)
        an_hour_passes()
        assert (sched.run(rule)["queued"], len(queued())) == (1, 3)
        assert sched.run(rule)["queued"] == 0  # 4 used, the 12-instance study does not fit this hour
        an_hour_passes()
        res = sched.run(rule)
        assert (res["queued"], res["left"]) == (1, 0)
        assert queued() == sorted(s.study_uid for s in studies)
        assert [r["expected"] for r in node.store.list() if r["study_uid"] == studies[3].study_uid] == [12]


def test_pull_scheduler_thread_picks_up_a_new_study_within_one_poll(tmp_path, local):
    import datetime as dt

    from node.pacs.scheduler import PullScheduler

    today = dt.date.today().strftime("%Y%m%d")
    cohort = tmp_path / "rules" / "cohort.csv"
    cohort.parent.mkdir()
    cohort.write_text("AccessionNumber,note\nACC-1,x\nACC-3,y\n")
    with pacs_orthanc(tmp_path / "pacs") as pacs:
        node = local({"pacs": dimse(pacs.dicom_port, retrieve="get")}, rules_dir=tmp_path / "rules")
        node.retriever.start()
        rules = _pull_rules(tmp_path, """
- kind: pull
  name: watch-ct
  source: pacs
  query: {ModalitiesInStudy: CT, StudyDate: {last: 24h}}
  schedule: {every: 1s}
  watch: true
- kind: pull
  name: cohort
  source: pacs
  query: {csv: {file: cohort.csv, column: AccessionNumber}, StudyDate: 19000101-}
  schedule: {every: 1s}
""")
        sched = PullScheduler(node.settings, lambda: rules, node.store, on_queued=node.retriever.wake)
        sched.start()
        try:
            wait_for(lambda: (s := node.store.pull_state("watch-ct")) and s["last_run_at"], 15, "a first poll")
            s1 = tiny_study(tmp_path / "s1", study_date=today, accession="ACC-1")
            s2 = tiny_study(tmp_path / "s2", study_date="20200101", accession="ACC-2")
            s3 = tiny_study(tmp_path / "s3", study_date="20200101", accession="ACC-3")
            pacs.upload(s1.files + s2.files + s3.files)
            wait_for(lambda: node.held(s1.study_uid) == s1.sop_uids, 30, "the new study pulled")
            wait_for(lambda: node.held(s3.study_uid) == s3.sop_uids, 30, "the cohort study pulled")
            time.sleep(2.5)  # more polls: nothing repeated
            assert node.held(s2.study_uid) == set()  # neither new nor in the cohort
            rows = node.store.list()
            assert {r["study_uid"] for r in rows} == {s1.study_uid, s3.study_uid}
            assert len(rows) <= 3  # at most once per rule and study, however many polls ran
            assert {r["requested_by"] for r in rows if r["study_uid"] == s3.study_uid} == {"rule:cohort"}
            requesters = {r["requested_by"] for r in rows if r["study_uid"] == s1.study_uid} | {
                h["by"] for r in rows if r["study_uid"] == s1.study_uid for h in json.loads(r["history_json"])
                if h["event"] == "also requested"}
            assert requesters == {"rule:cohort", "rule:watch-ct"}
            assert len(node.index.instances_of_study(s1.study_uid)) == len(s1.sop_uids)  # nothing stored twice
        finally:
            sched.stop()


def test_pull_rules_are_validated_with_the_routing_rules(tmp_path):
    from node.rules.errors import RuleErrors

    with pytest.raises(RuleErrors) as exc:
        _pull_rules(tmp_path, """
- kind: pull
  name: bad
  source: nope
  query: {StudyDate: "2024-01", Modality: CT}
  series: {SliceThicknes: 1}
  schedule: {every: 15m, window: "25:00-05:00"}
""")
    text = exc.value.text()
    for needle in ("unknown source 'nope'; configured: pacs", "query.StudyDate", "query.Modality",
                   "did you mean 'SliceThickness'", "schedule.window"):
        assert needle in text, text
    rs = _pull_rules(tmp_path, "kind: pull\nname: ok\nsource: pacs\nquery: {ModalitiesInStudy: CT}\n"
                               "schedule: {every: 15m, window: '22:00-05:00'}\n")
    sched = rs.pull_rules[0].spec.schedule
    import datetime as dt

    nxt = sched.next_run(dt.datetime(2025, 1, 1, 12, 0))
    assert nxt == dt.datetime(2025, 1, 1, 22, 0)  # outside the window: its next opening
    assert sched.next_run(dt.datetime(2025, 1, 1, 23, 0)) == dt.datetime(2025, 1, 1, 23, 15)
    assert sched.next_run(dt.datetime(2025, 1, 2, 4, 50)) == dt.datetime(2025, 1, 2, 22, 0)


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"),
    ("PatientID,note\nP1,x\n", "has no column 'AccessionNumber' (columns: PatientID, note)"),
    ("AccessionNumber\n\n  \n", "no AccessionNumber values under the header"),
    (b"AccessionNumber\n\xff\xfeACC\n", "is not UTF-8 text"),
])
def test_a_missing_or_malformed_cohort_csv_fails_rule_validation_naming_the_field(tmp_path, content, needle):
    from node.handler_api import get_handler
    from node.rules.errors import RuleErrors
    from node.rules.ruleset import RuleSet

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "pull.yaml").write_text("kind: pull\nname: cohort\nsource: pacs\n"
                                     "query: {csv: {file: cohort.csv, column: AccessionNumber}}\n")
    if content is not None:
        (rules / "cohort.csv").write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(RuleErrors) as exc:
        RuleSet.load(rules, handlers=get_handler, destinations={"orthanc"}, sources={"pacs"})
    text = exc.value.text()
    assert "query.csv.file" in text and needle in text and "cohort.csv" in text, text
    (rules / "cohort.csv").write_text("AccessionNumber\nACC-1\n")  # fixed: the same rule loads
    assert [r.name for r in RuleSet.load(rules, handlers=get_handler, destinations={"orthanc"},
                                         sources={"pacs"}).pull_rules] == ["cohort"]


def test_rules_test_explains_what_a_pull_rule_would_query_and_when_it_runs_next(tmp_path):
    import datetime as dt

    from node.runtime import open_index
    from node.store.retrieves import RetrieveStore

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "cohort.csv").write_text("PatientID\nP7\nP9\nP7\n")
    (rules / "pull.yaml").write_text("""
- kind: pull
  name: chest-watch
  source: pacs
  query: {ModalitiesInStudy: CT, StudyDate: {last: 48h}, StudyDescription: "*CHEST*"}
  series: {SliceThickness: {le: 1.5}}
  schedule: {every: 10m, window: "01:00-05:00"}
  watch: true
  limits: {studies_per_run: 7}
- kind: pull
  name: cohort
  source: pacs
  query: {csv: {file: cohort.csv, column: PatientID}, StudyDate: 20200101-}
""")
    cfg = tmp_path / "hilum.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "rules_dir": str(rules),
                                   "sources": {"pacs": dimse(free_port())}}))

    def explain(name: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "node.cli", "rules", "--config", str(cfg), "test", name,
                              "--json"], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    now = dt.datetime.now()
    e = explain("chest-watch")
    since = (now - dt.timedelta(hours=48)).strftime("%Y%m%d")
    assert e["queries"] == [{"ModalitiesInStudy": "CT", "StudyDate": f"{since}-", "StudyDescription": "*CHEST*"}]
    assert e["series_filter"] == {"SliceThickness": {"le": 1.5}} and e["studies_per_run"] == 7
    nxt = dt.datetime.fromisoformat(e["next_run"])  # never scheduled: the window's next opening, or now inside it
    assert e["next_run_from"].startswith("first run") and (1 <= nxt.hour < 5 or e["window_open_now"])
    assert explain("cohort")["queries"] == [{"PatientID": "P7", "StudyDate": "20200101-"},
                                            {"PatientID": "P9", "StudyDate": "20200101-"}]

    # Once the node has run it: the persisted high-water mark narrows the query, the persisted next run is shown.
    store = RetrieveStore(open_index(load_settings(str(cfg))))
    store.ensure_pull_state("chest-watch", 0)
    hw = (now + dt.timedelta(days=1)).strftime("%Y%m%d")  # later than the rule's own window start
    at = dt.datetime(2030, 1, 2, 3, 4, 5)
    store.pull_ran("chest-watch", next_at=at.timestamp(), result={}, error="PACS down", high_water=hw)
    e = explain("chest-watch")
    assert e["queries"][0]["StudyDate"] == f"{hw}-" and e["high_water"] == hw
    assert e["next_run"] == at.isoformat() and e["next_run_from"] == "scheduled by the node"
    assert e["last_error"] == "PACS down"
    text = subprocess.run([sys.executable, "-m", "node.cli", "rules", "--config", str(cfg), "test", "chest-watch"],
                          capture_output=True, text=True, cwd=REPO, timeout=120).stdout
    for needle in (f"StudyDate={hw}-", "high-water mark " + hw, "next run: 2030-01-02T03:04:05",
                   "only starting within 01:00-05:00", "7 studies per run"):
        assert needle in text, text


def test_priors_are_found_retrieved_and_handed_to_the_handler(tmp_path):
    """A study pushed by a modality: its rule asks for 2 CT CHEST priors; the PACS holds three of them
    (and an MR, an abdomen CT and another patient's CT); the node already holds one of them."""
    from node.store.index import Index
    from tests.nodeproc import NodeProcess, storescu

    def ct(name, date, time_="090000", body="CHEST", patient="P7", modality="CT"):
        return tiny_study(tmp_path / name, patient_id=patient, study_date=date, study_time=time_, body_part=body,
                          modality=modality, series=(("AX", 1.0, 3),))

    current = ct("cur", "20240610", "101500")
    p2023, p2021 = ct("p23", "20230605", "083000"), ct("p21", "20210601")
    noise = [ct("mr", "20231201", modality="MR"), ct("abd", "20231101", body="ABDOMEN"),
             ct("other", "20231115", patient="P8")]
    held = ct("held", "20220601")  # in the node and on the PACS: taken from the node, not fetched again
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "priors.yaml").write_text("""
- name: with-priors
  level: study
  match: {Modality: CT, calling_ae: MODALITY}
  handler: priors-timeline
  priors: {source: pacs, max: 2, within: 5y, match: {Modality: CT, BodyPartExamined: CHEST}, wait: 2m}
- name: mr-priors-pacs-down
  level: study
  match: {Modality: MR, calling_ae: MODALITY}
  handler: priors-timeline
  priors: {source: down, max: 2}
- name: every-other-ct      # matches the priors too: a fetched prior must not run it, a pushed study must
  level: study
  match: {Modality: CT, not: {calling_ae: MODALITY}}
  handler: priors-timeline
""")
    mr_now = ct("mrnow", "20240610", modality="MR", patient="P9")
    with pacs_orthanc(tmp_path / "pacs") as pacs:
        pacs.upload(p2023.files + held.files + p2021.files + [f for s in noise for f in s.files])
        node = NodeProcess(tmp_path / "node", rules, store_originals_in_orthanc=False, sources={
            "pacs": dimse(pacs.dicom_port, retrieve="get"), "down": dimse(free_port(), timeout_s=3)})
        node.start()
        try:
            assert storescu(node.dicom_port, held.files, calling="OLDPACS").returncode == 0
            assert storescu(node.dicom_port, current.files + mr_now.files, calling="MODALITY").returncode == 0

            def finished(study):
                jobs = [j for j in node.api("GET", "/api/jobs").json()["jobs"] if j["study_uid"] == study]
                return jobs and all(j["status"] in ("done", "failed") for j in jobs) and jobs

            [job] = wait_for(lambda: finished(current.study_uid), 120, "the job with priors")
            [mr_job] = wait_for(lambda: finished(mr_now.study_uid), 60, "the MR job")
            # The study the node held because OLDPACS pushed it is ordinary work: the other rule runs on it.
            [held_job] = wait_for(lambda: finished(held.study_uid), 60, "the pushed older study's job")
            assert held_job["rule"] == "every-other-ct"
            # The prior fetched for the job is that job's context: looked at, not routed, and it says why.
            fetched = wait_for(lambda: (lambda s: s if s.get("route_note") else None)(
                node.api("GET", f"/api/studies/{p2023.study_uid}").json()), 30, "the fetched prior's routing")
            assert fetched["jobs"] == [] and fetched["pending_rules"] == []
            assert fetched["route_note"] == (f"not routed: retrieved only as a prior (job {job['id']}); "
                                             "a prior is context for that job, not new work")
            assert [o["origin"]["retrieved"][0]["requested_by"] for o in fetched["series"]] == [f"priors:job {job['id']}"]
            assert node.api("GET", f"/api/studies/{current.study_uid}").json()["route_note"] is None
        finally:
            node.stop()
            node._kill_orthanc()
    index = Index(node.data_dir / "index.db")
    row = index.job(job["id"])
    assert row["status"] == "done", row["error"]
    hist = json.loads(row["history_json"])
    prov = next(h for h in hist if h["event"] == "done")["provenance"]
    # The two most recent CT CHEST priors, most recent first, with their study dates and times.
    assert [(p["study_uid"], p["acquired"], p["source"]) for p in prov["priors"]] == [
        (p2023.study_uid, "2023-06-05T08:30:00", "pacs"), (held.study_uid, "2022-06-01T09:00:00", "node")]
    assert prov["priors_note"] is None
    retrieves = index.conn().execute("SELECT * FROM retrieves WHERE requested_by=?", (f"priors:job {job['id']}",)
                                     ).fetchall()
    assert [r["study_uid"] for r in retrieves] == [p2023.study_uid]
    assert all(r["status"] == "done" for r in retrieves)
    # The MR's source is down: the job ran without priors and says why.
    mr_prov = next(h for h in json.loads(index.job(mr_job["id"])["history_json"]) if h["event"] == "done")["provenance"]
    assert mr_prov["priors"] == [] and "source down not searched" in mr_prov["priors_note"]
    assert "no prior studies found" in mr_prov["priors_note"]


def test_priors_that_do_not_arrive_in_time_release_the_job_without_them_saying_why(tmp_path, local):
    """The PACS holds a prior, its retrieve is queued but not done by the deadline (the retriever is
    busy: here not started): the job is released to run without priors, and its note says why."""
    from node.receive.ingest import Origin
    from node.pacs.priors import PriorsCoordinator
    from node.store.retrieves import priors_of_job

    current = tiny_study(tmp_path / "cur", patient_id="P7", study_date="20240610")
    prior = tiny_study(tmp_path / "old", patient_id="P7", study_date="20230605", series=(("AX", 1.0, 3),))
    with pacs_orthanc(tmp_path / "pacs") as pacs:
        pacs.upload(prior.files)
        node = local({"pacs": dimse(pacs.dicom_port, retrieve="get")})
        for f in current.files:
            assert node.ingest.store(f.read_bytes(), Origin("MODALITY", "HILUM", "127.0.0.1"))[0] == 0
        assert node.ingest.writer.flush(30)
        series = next(iter(current.series))
        job = node.index.add_job(job_key="k1", study_uid=current.study_uid, series_uid=series, level="study",
                                 rule="with-priors", handler="priors-timeline", params={}, destinations=[],
                                 priority="normal", timeout_s=None, generation=1, note="test")
        released = []
        coord = PriorsCoordinator(node.settings, node.index, node.store, on_retrieves=lambda: None,
                                  on_released=lambda: released.append(1))
        coord.hold(job, {"source": "pacs", "max": 2, "wait": 1.0})  # as the router hands it: validated
        [w] = node.store.prior_waits()
        coord.step(w)  # search: the prior is found on the PACS and its retrieve queued
        [w] = node.store.prior_waits()
        chosen = json.loads(w["chosen_json"])
        assert [(c["study_uid"], c["source"]) for c in chosen] == [(prior.study_uid, "pacs")]
        assert node.store.get(chosen[0]["retrieve"])["status"] == "queued"
        coord.step(w)  # before the deadline: still waiting, with progress
        row = node.index.job(job)
        assert row["status"] == "waiting-for-priors" and row["message"].startswith("waiting for priors: 0/")
        time.sleep(1.1)
        coord.step(node.store.prior_waits()[0])  # past the deadline: released without the prior
    assert released and node.store.prior_waits() == []
    row = node.index.job(job)
    assert row["status"] == "pending"  # the executor may take it now
    handed = priors_of_job(node.index, job)
    assert handed["priors"] == []
    assert "ran without some priors: they did not arrive within 1 s (0/3 instances)" in handed["priors_note"]
    assert handed["priors_note"] in row["message"]


def test_priors_timeline_sr_lists_priors_with_intervals_and_is_a_valid_iod(tmp_path):
    """The priors-timeline handler's SR (as the node encodes it) passes dciodvfy, with the priors and a note."""
    import datetime as dt

    import pydicom

    from handlers.priors_timeline import PriorsTimeline
    from node.encoders import encode_all
    from node.handler_api import HandlerInput, PriorStudy
    from node.volume import SeriesData
    from tests.encoder_sources import context, save_valid

    def series_of(st) -> list[SeriesData]:
        return [SeriesData(uid, "CT", [pydicom.dcmread(f, stop_before_pixels=True) for f in files])
                for uid, files in ((u, sorted(f for f in st.files if pydicom.dcmread(
                    f, stop_before_pixels=True).SeriesInstanceUID == u)) for u in st.series)]

    current = tiny_study(tmp_path / "cur", patient_id="P7", study_date="20240610", study_time="101500")
    p23 = tiny_study(tmp_path / "p23", patient_id="P7", study_date="20230605", study_time="083000")
    p21 = tiny_study(tmp_path / "p21", patient_id="P7", study_date="20210601")
    priors = [PriorStudy(p23.study_uid, dt.datetime(2023, 6, 5, 8, 30), series_of(p23), "pacs"),
              PriorStudy(p21.study_uid, dt.datetime(2021, 6, 1, 10, 15), series_of(p21), "node")]
    cur = series_of(current)
    inp = HandlerInput(current.study_uid, cur, priors=priors, priors_note="1 prior not retrieved: PACS down")
    results = PriorsTimeline().run(inp, lambda f, m: None)
    [sr] = encode_all(results, {s.series_uid: s for s in cur}, context(handler="priors-timeline"))
    path = save_valid(sr, tmp_path / "out")
    text = " ".join(str(e.value) for e in pydicom.dcmread(path).iterall() if e.keyword == "TextValue")
    for needle in ("2023-06-05 08:30, 371 days earlier: 1 series from pacs (4 instances)",
                   "2021-06-01 10:15, 1105 days earlier: 1 series from node", "Note: 1 prior not retrieved: PACS down"):
        assert needle in text, text
    assert pydicom.dcmread(path).StudyInstanceUID == current.study_uid


def _scripted_pacs(title: str, on_find, *, on_get=None, on_move=None):
    """A pynetdicom PACS answering C-FIND and either C-GET (CT storage in the SCP role) or C-MOVE with the
    test's own generators: (port, server)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    ae = AE(ae_title=title)
    ae.add_supported_context(FIND)
    handlers = [(evt.EVT_C_FIND, on_find)]
    if on_get is not None:
        ae.add_supported_context(GET)
        ae.add_supported_context(CTImageStorage, scu_role=True, scp_role=True)
        handlers.append((evt.EVT_C_GET, on_get))
    if on_move is not None:
        ae.add_supported_context(MOVE)
        ae.add_requested_context(CTImageStorage)
        handlers.append((evt.EVT_C_MOVE, on_move))
    port = free_port()
    return port, ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)


@pytest.fixture
def odd_pacs(tmp_path):
    """A PACS that misbehaves (pynetdicom as the peer): malformed C-FIND answers, 5 000 matches,
    and a C-GET that also pushes an instance of a study nobody asked for."""
    from pydicom.dataset import Dataset

    wanted = tiny_study(tmp_path / "w", patient_id="ODD", series=(("AX", 1.0, 2),))
    stray = tiny_study(tmp_path / "x", patient_id="ODD")
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    def on_find(event):
        q = event.identifier
        if q.get("PatientID") == "MANY":
            for i in range(5000):
                d = Dataset()
                d.QueryRetrieveLevel, d.StudyInstanceUID, d.PatientID = "STUDY", f"1.2.3.{i + 1}", "MANY"
                d.StudyDate, d.NumberOfStudyRelatedInstances = "20240101", "1"
                yield 0xFF00, d
            return
        good = Dataset()
        good.QueryRetrieveLevel, good.StudyInstanceUID, good.PatientID = "STUDY", wanted.study_uid, "ODD"
        good.NumberOfStudyRelatedInstances, good.StudyDate = "2", "20240101"
        no_uid = Dataset()
        no_uid.QueryRetrieveLevel, no_uid.PatientID = "STUDY", "ODD"
        bad_number = Dataset()
        bad_number.QueryRetrieveLevel, bad_number.StudyInstanceUID = "STUDY", "1.2.3.999"
        # NumberOfStudyRelatedInstances that is no number, as raw bytes (pydicom would refuse to write it)
        bad_number[0x00201208] = RawDataElement(Tag(0x00201208), "IS", 4, b"many", 0, False, True)
        for d in (good, no_uid, bad_number):
            yield 0xFF00, d

    def on_get(event):
        files = [pydicom.dcmread(f) for f in wanted.files] + [pydicom.dcmread(stray.files[0])]
        yield len(files)
        for ds in files:
            yield 0xFF00, ds

    port, server = _scripted_pacs("ODDPACS", on_find, on_get=on_get)
    yield port, wanted, stray
    server.shutdown()


def test_misbehaving_pacs_gives_clear_outcomes(tmp_path, local, odd_pacs, monkeypatch):
    from node.pacs.scheduler import PullScheduler
    from node.pacs.sources import source_client
    from node.pacs.model import StudyQuery

    port, wanted, stray = odd_pacs
    node = local({"odd": dimse(port, "ODDPACS", retrieve="get")})
    found, bad = source_client(node.settings, "odd").find_studies(StudyQuery(patient_id="ODD"))
    assert [m.study_uid for m in found] == [wanted.study_uid] and bad == 2  # malformed answers counted, skipped
    node.retriever.start()
    rid, _ = node.store.add("odd", wanted.study_uid, None, "test")
    node.retriever.wake()
    r = node.wait(rid)
    # The stray instance was refused (not stored); the retrieve says so.
    assert r["status"] == "partial" and (r["completed"], r["failed"]) == (2, 1)
    assert "of other studies refused (not asked for)" in r["error"]
    assert node.held(wanted.study_uid) == wanted.sop_uids and node.held(stray.study_uid) == set()
    # 5 000 matches: the rule's limit applies, the rest waits for later runs.
    rules = _pull_rules(tmp_path, "kind: pull\nname: many\nsource: odd\nquery: {PatientID: MANY}\n"
                                  "limits: {studies_per_run: 10}\n", sources=("odd",))
    sched = PullScheduler(node.settings, lambda: rules, node.store, on_queued=lambda: None)
    res = sched.run(rules.pull_rules[0])
    assert (res["matches"], res["queued"], res["left"], res["error"]) == (5000, 10, 4990, None)
    assert "warnings" not in res
    # Past the node's own cap on matches (lowered here from 10 000): the first ones are kept, the
    # C-FIND is ended there (the association released: the next query works) with a warning.
    monkeypatch.setattr("node.pacs.dimse.MAX_MATCHES", 3000)
    client = source_client(node.settings, "odd")
    assert len(client.find_studies(StudyQuery(patient_id="MANY"))[0]) == 3000
    assert client.warnings == ["source odd: C-FIND: 3000 matches or more: the first 3000 kept (narrow the query)"]
    assert [m.study_uid for m in client.find_studies(StudyQuery(patient_id="ODD"))[0]] == [wanted.study_uid]


def test_a_c_move_that_also_sends_another_study_stores_only_what_was_asked_for(tmp_path, local):
    """A PACS (pynetdicom) whose C-MOVE sends, besides the study, an instance of a study nobody asked
    for to the node's SCP. The sub-operations are answered before they are read; the stray instance is
    then not stored, and the retrieve is partial, saying why. pynetdicom names its own AE title as
    the sub-operations' Move Originator (the standard says: the C-MOVE's requestor), so this PACS is
    called HILUM, the node's calling AE, for the node to know them as its retrieve's."""
    import pydicom
    from pydicom.dataset import Dataset

    wanted = tiny_study(tmp_path / "w", patient_id="ODD", series=(("AX", 1.0, 2),))
    stray = tiny_study(tmp_path / "x", patient_id="ODD")
    dest: dict[str, int] = {}

    def on_find(event):
        d = Dataset()
        d.QueryRetrieveLevel, d.StudyInstanceUID, d.NumberOfStudyRelatedInstances = "STUDY", wanted.study_uid, "2"
        yield 0xFF00, d

    def on_move(event):
        yield "127.0.0.1", dest["port"]
        files = [pydicom.dcmread(f) for f in wanted.files] + [pydicom.dcmread(stray.files[0])]
        yield len(files)
        for ds in files:
            yield 0xFF00, ds

    port, server = _scripted_pacs("HILUM", on_find, on_move=on_move)
    try:
        node = local({"odd": dimse(port, "HILUM", retrieve="move")})
        dest["port"] = node.settings.dicom_port
        node.retriever.start()
        rid, _ = node.store.add("odd", wanted.study_uid, None, "test")
        node.retriever.wake()
        r = node.wait(rid)
    finally:
        server.shutdown()
    assert r["status"] == "partial" and (r["completed"], r["failed"]) == (2, 1), r
    assert "1 received but not stored: instance of another study, not asked for" in r["error"]
    assert json.loads(r["detail_json"])["failed_uids"] == [pydicom.dcmread(stray.files[0]).SOPInstanceUID]
    assert node.held(wanted.study_uid) == wanted.sop_uids and node.held(stray.study_uid) == set()


def test_a_retrieve_the_pacs_calls_a_success_is_judged_by_what_arrived(tmp_path, local):
    """A PACS (pynetdicom) that lists 3 instances, answers the C-MOVE with success and sends nothing
    (its entry for the node's AE title names another host, say): the retrieve fails, saying so,
    rather than 'done' with nothing held (a job would get no prior and no word why). A C-GET that
    brings 2 of the 3 listed is partial, naming the count."""
    import pydicom
    from pydicom.dataset import Dataset

    st = tiny_study(tmp_path / "w", patient_id="ODD", series=(("AX", 1.0, 2),))

    def on_find(event):
        d = Dataset()
        d.QueryRetrieveLevel, d.StudyInstanceUID, d.NumberOfStudyRelatedInstances = "STUDY", st.study_uid, "3"
        yield 0xFF00, d

    def on_move(event):
        yield "127.0.0.1", free_port()  # not the node: nothing reaches it
        yield 0

    def on_get(event):
        files = [pydicom.dcmread(f) for f in st.files]
        yield len(files)
        for ds in files:
            yield 0xFF00, ds

    move_port, move_server = _scripted_pacs("HILUM", on_find, on_move=on_move)
    get_port, get_server = _scripted_pacs("GETPACS", on_find, on_get=on_get)
    try:
        node = local({"moving": dimse(move_port, "HILUM", retrieve="move"),
                      "getting": dimse(get_port, "GETPACS", retrieve="get")})
        node.retriever.start()
        moved, _ = node.store.add("moving", st.study_uid, None, "test")
        node.retriever.wake()
        r = node.wait(moved)
        assert r["status"] == "failed" and r["received"] == 0, r
        assert "none of the 3 instance(s) the PACS listed arrived" in r["error"]
        assert "C-MOVE" in r["error"] and "'HILUM'" in r["error"]
        got, _ = node.store.add("getting", st.study_uid, None, "test")
        node.retriever.wake()
        r = node.wait(got)
    finally:
        move_server.shutdown()
        get_server.shutdown()
    assert r["status"] == "partial" and r["received"] == 2 and r["error"] == "2 of 3 instance(s) arrived", r
    assert node.held(st.study_uid) == st.sop_uids


@pytest.fixture
def broken_dicomweb(tmp_path):
    """A DICOMweb archive (a real HTTP server) whose WADO-RS multipart answer holds one instance of
    the study and then a part that is not DICOM; QIDO answers HTML for patient HTML."""
    import http.server

    st = tiny_study(tmp_path / "w", patient_id="WEB", series=(("AX", 1.0, 2),))
    good = st.files[0].read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, ctype: str, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.startswith("/studies?") and "PatientID=HTML" in self.path:
                self._send("text/html", b"<html>Service temporarily unavailable</html>")
            elif self.path.startswith("/studies?") and "offset=" in self.path and "offset=0" not in self.path:
                self._send("application/dicom+json", b"[]")  # the next page (dicomweb-client asks for it)
            elif self.path.startswith("/studies?"):
                self._send("application/dicom+json", json.dumps([{
                    "0020000D": {"vr": "UI", "Value": [st.study_uid]}, "00100020": {"vr": "LO", "Value": ["WEB"]},
                    "00201208": {"vr": "IS", "Value": [2]}}]).encode())
            elif self.path.startswith(f"/studies/{st.study_uid}"):
                b = b"hilumboundary"
                body = b"".join(b"--" + b + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
                                for part in (good, b"this is not a DICOM file at all" * 8)) + b"--" + b + b"--"
                self._send(f'multipart/related; type="application/dicom"; boundary={b.decode()}', body)
            else:
                self.send_error(404)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", st
    srv.shutdown()


def test_a_broken_dicomweb_answer_fails_the_retrieve_clearly_keeping_what_came_before(tmp_path, local,
                                                                                       broken_dicomweb):
    from node.pacs.model import StudyQuery
    from node.pacs.sources import source_client

    url, st = broken_dicomweb
    node = local({"web": {"qido_url": url}}, retrieve_max_attempts=2)
    with pytest.raises(Exception, match="QIDO-RS study search: malformed answer") as exc:
        source_client(node.settings, "web").find_studies(StudyQuery(patient_id="HTML"))
    assert type(exc.value).__name__ == "PacsError"
    node.retriever.start()
    rid, _ = node.store.add("web", st.study_uid, None, "test")
    node.retriever.wake()
    r = node.wait(rid)
    assert r["status"] == "failed" and r["attempts"] == 2, r
    assert "WADO-RS retrieve: malformed answer" in r["error"] and "internal error" not in r["error"]
    import pydicom

    assert node.held(st.study_uid) == {pydicom.dcmread(st.files[0]).SOPInstanceUID}  # the good part is kept


@pytest.fixture
def paging_dicomweb(tmp_path):
    """A DICOMweb archive (a real HTTP server) with 1 500 studies, the first a real one (WADO-RS serves
    it). It ignores every search key. ``mode``: ``ignore-offset`` answers the first ``limit`` studies
    whatever the offset (dicomweb-client's ``get_remaining`` asks again for ever); ``capped`` answers
    at most 300 per request with PS3.18's Warning header while more remain, and honours offset."""
    import http.server
    from urllib.parse import parse_qs, urlparse

    st = tiny_study(tmp_path / "w", patient_id="PAGE", series=(("AX", 1.0, 2),))
    uids = [st.study_uid] + [f"1.2.826.0.1.3680043.10.1{i:05d}" for i in range(1, 1500)]
    state = {"mode": "ignore-offset", "requests": []}

    def answer(uid: str) -> dict:
        return {"0020000D": {"vr": "UI", "Value": [uid]}, "00100020": {"vr": "LO", "Value": ["PAGE"]},
                "00080020": {"vr": "DA", "Value": ["20240101"]},
                "00201208": {"vr": "IS", "Value": [2 if uid == st.study_uid else 1]}}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            url = urlparse(self.path)
            if url.path == "/studies":
                q = {k: int(v[0]) for k, v in parse_qs(url.query).items() if k in ("limit", "offset")}
                state["requests"].append(q)
                limit = q.get("limit", len(uids))
                if state["mode"] == "ignore-offset":
                    page, more = uids[:limit], False
                else:
                    start = q.get("offset", 0)
                    page = uids[start:start + min(limit, 300)]
                    more = start + len(page) < len(uids) and len(page) < limit
                body = json.dumps([answer(u) for u in page]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                if more:
                    self.send_header("Warning", "299 archive: The number of results exceeded the maximum "
                                                "supported by the server. Additional results can be requested.")
            elif url.path.startswith(f"/studies/{st.study_uid}"):
                b = b"hilumboundary"
                body = b"".join(b"--" + b + b"\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes()
                                + b"\r\n" for f in st.files) + b"--" + b + b"--"
                self.send_response(200)
                self.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={b.decode()}')
            else:
                return self.send_error(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", st, uids, state
    srv.shutdown()


def test_a_dicomweb_archive_ignoring_offset_gives_what_it_sent_and_a_warning_never_a_hang(tmp_path, local,
                                                                                       paging_dicomweb):
    from node.pacs.model import StudyQuery
    from node.pacs.scheduler import PullScheduler
    from node.pacs.sources import source_client

    url, st, uids, state = paging_dicomweb
    node = local({"web": {"qido_url": url}})
    client = source_client(node.settings, "web")
    t0 = time.monotonic()
    found, bad = client.find_studies(StudyQuery(patient_id="PAGE"))
    # The first page (1 000 asked for), then the same page again: the search stops there.
    assert [m.study_uid for m in found] == uids[:1000] and bad == 0 and time.monotonic() - t0 < 30
    assert [q.get("offset") for q in state["requests"]] == [0, 1000]
    [warning] = client.warnings
    assert "ignores 'offset'" in warning and "1000 result(s) kept, more may exist" in warning
    # A caller's own limit is a limit, not a warning; a short page is the last one.
    client = source_client(node.settings, "web")
    assert len(client.find_studies(StudyQuery(patient_id="PAGE"), 10)[0]) == 10 and client.warnings == []

    # A pull rule's run keeps what came, says so in its record, and leaves its high-water mark alone.
    rules = _pull_rules(tmp_path, "kind: pull\nname: web\nsource: web\nquery: {PatientID: PAGE}\nwatch: true\n"
                                  "limits: {studies_per_run: 2}\n", sources=("web",))
    sched = PullScheduler(node.settings, lambda: rules, node.store, on_queued=lambda: None, audit=node.audit)
    node.store.ensure_pull_state("web", time.time())
    res = sched.run(rules.pull_rules[0])
    assert (res["matches"], res["queued"], res["error"]) == (1000, 2, None)
    assert "ignores 'offset'" in res["warnings"][0]
    row = node.store.pull_state("web")
    assert "ignores 'offset'" in json.loads(row["last_result_json"])["warnings"][0] and row["high_water"] is None

    # A retrieve whose study search met the same archive (it ignores the StudyInstanceUID key too):
    # done, with the warning in its record.
    other = local({"web": {"qido_url": url}}, name="other")
    other.retriever.start()
    rid, _ = other.store.add("web", st.study_uid, None, "test")
    other.retriever.wake()
    r = other.wait(rid)
    assert r["status"] == "done" and other.held(st.study_uid) == st.sop_uids
    assert "ignores 'offset'" in json.loads(r["detail_json"])["warnings"][0]

    # An archive that pages itself (300 a request, Warning header while more remain): every study, no warning.
    state["mode"], state["requests"] = "capped", []
    client = source_client(node.settings, "web")
    found, _ = client.find_studies(StudyQuery(patient_id="PAGE"))
    assert [m.study_uid for m in found] == uids[:1500] and client.warnings == []
    assert [q["offset"] for q in state["requests"]] == [0, 300, 600, 900, 1200]


def test_console_pacs_page_query_retrieve_selected_and_viewer_sees_no_buttons(tmp_path):
    from playwright.sync_api import sync_playwright

    from tests.nodeproc import NodeProcess
    from tests.web_support import BrowserErrors, add_user, launch, screenshot, sign_in

    s1 = tiny_study(tmp_path / "s1", patient_id="WEB1", study_date="20240301", description="CT CHEST WEB")
    with pacs_orthanc(tmp_path / "pacs") as pacs:
        pacs.upload(s1.files)
        (tmp_path / "rules").mkdir()
        (tmp_path / "rules" / "pull.yaml").write_text(
            "kind: pull\nname: web-watch\nsource: pacs\nquery: {PatientID: NOBODY}\nschedule: {every: 1h}\n")
        node = NodeProcess(tmp_path / "node", tmp_path / "rules", store_originals_in_orthanc=False,
                           sources={"pacs": dimse(pacs.dicom_port, retrieve="get")}).start()
        try:
            add_user(node, "ada", "admin")
            add_user(node, "val", "viewer")
            with sync_playwright() as p:
                browser = launch(p)
                page = browser.new_page()
                errors = BrowserErrors(page)
                sign_in(page, node.web, "ada", next_path="/console/pacs")
                page.click("tr[data-source=pacs] button.echo")
                # not the "…" shown while it waits, which has the same class
                page.wait_for_selector("tr[data-source=pacs] .echo-result .ok:has-text('ok (')", timeout=30_000)
                page.fill("#query input[name=patient_id]", "WEB1")
                page.click("#query button[type=submit]")
                page.wait_for_selector(f"#matches tr[data-study='{s1.study_uid}']")
                page.check(f"#matches tr[data-study='{s1.study_uid}'] input[type=checkbox]")
                page.click("#retrieve-selected")
                page.wait_for_selector("#retrieves tr.status-done", timeout=60000)
                row = page.inner_text("#retrieves tr.status-done")
                assert "4/4 (100 %)" in row and "ok 4" in row and "ada" in row
                page.wait_for_selector("#pull-rules tr[data-rule=web-watch]")
                screenshot(page, "pacs-admin")
                assert errors.errors == []
                viewer = browser.new_page()
                sign_in(viewer, node.web, "val", next_path="/console/pacs")
                viewer.wait_for_selector("#retrieves tr.status-done")
                viewer.wait_for_selector("tr[data-source=pacs]")  # the rows are there, their buttons hidden
                assert not viewer.is_visible("tr[data-source=pacs] button.echo")
                assert not viewer.is_visible("#query")  # viewers read; querying the PACS is an admin's act
                browser.close()
            assert node.study(s1.study_uid)["instances_received"] == 4
        finally:
            node.stop()
            node._kill_orthanc()


@pytest.fixture
def paused_pacs(tmp_path):
    """A PACS (pynetdicom as the peer) whose first C-GET stops after ``PAUSE_AFTER`` instances until
    ``resume`` is set; later C-GETs send everything. Orthanc sends a study faster than a test can
    reliably catch it in the middle (the node's C-GET takes well under a second for 50 MB)."""
    import pydicom
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import CTImageStorage
    import threading

    st = tiny_study(tmp_path / "big", rows=64, series=(("AX", 1.0, 60),))
    paused, resume, gets = threading.Event(), threading.Event(), []

    def on_find(event):
        if event.identifier.get("StudyInstanceUID") in ("", None, st.study_uid):
            d = Dataset()
            d.QueryRetrieveLevel, d.StudyInstanceUID, d.PatientID = "STUDY", st.study_uid, "P1"
            d.NumberOfStudyRelatedInstances, d.SOPClassesInStudy = str(len(st.files)), CTImageStorage
            yield 0xFF00, d

    def on_get(event):
        gets.append(event.assoc.requestor.ae_title)
        first = len(gets) == 1
        yield len(st.files)
        for i, f in enumerate(st.files):
            if first and i == PAUSE_AFTER:  # every earlier C-STORE has been answered by the node
                paused.set()
                resume.wait(60)  # the node is killed meanwhile
            yield 0xFF00, pydicom.dcmread(f)

    port, server = _scripted_pacs("PAUSED", on_find, on_get=on_get)
    yield port, st, paused, resume, gets
    resume.set()
    server.shutdown()


PAUSE_AFTER = 20


def test_node_killed_mid_retrieve_resumes_with_nothing_lost_or_duplicated(tmp_path, paused_pacs):
    """The host dies (SIGKILL) while a C-GET is under way: 20 instances received and answered, some
    perhaps durable and indexed (a progress report), the rest written to the spool log without their
    sync. After the restart the retrieve runs again and every instance is in the index exactly once."""
    import signal

    from tests.nodeproc import NodeProcess

    port, st, paused, resume, gets = paused_pacs
    (tmp_path / "rules").mkdir()
    node = NodeProcess(tmp_path / "node", tmp_path / "rules", store_originals_in_orthanc=False,
                       sources={"pacs": dimse(port, "PAUSED", retrieve="get")}).start()
    try:
        rid = node.api("POST", "/api/pacs/retrieves", json={"source": "pacs", "study_uids": [st.study_uid]}
                       ).json()["ids"][0]
        assert paused.wait(60), "the C-GET did not start"
        r = next(x for x in node.api("GET", "/api/pacs/retrieves").json()["retrieves"] if x["id"] == rid)
        assert r["status"] == "retrieving" and r["received"] <= PAUSE_AFTER
        node.stop(signal.SIGKILL)  # the host dies mid-retrieve
        resume.set()
        node.start()
        r = wait_for(lambda: next((x for x in node.api("GET", "/api/pacs/retrieves").json()["retrieves"]
                                   if x["id"] == rid and x["status"] in ("done", "failed", "partial")), None),
                     90, "the resumed retrieve")
        assert r["status"] == "done" and r["received"] == len(st.files) and len(gets) == 2
        assert any(h["event"] == "requeued after restart" for h in r["history"])
        wait_for(lambda: node.study(st.study_uid).get("instances_received") == len(st.files), 30, "all indexed")
    finally:
        node.stop()
        node._kill_orthanc()
    from node.store.index import Index

    rows = Index(node.data_dir / "index.db").instances_of_study(st.study_uid)
    assert sorted(r["sop_uid"] for r in rows) == sorted(st.sop_uids)  # each instance once, none missing


def test_dicomweb_source_with_credentials_from_a_file_and_a_variable(tmp_path, local, monkeypatch):
    st = tiny_study(tmp_path / "s", patient_id="AUTH1")
    pw = tmp_path / "pacs.pw"
    pw.write_text("s3cret\n")
    monkeypatch.setenv("PACS_WRONG_PW", "nope")
    with pacs_orthanc(tmp_path / "pacs", users={"hilum": "s3cret"}) as pacs:
        pacs.upload(st.files)
        web = pacs.url + "/dicom-web"
        node = local({"web": {"qido_url": web, "auth": {"username": "hilum", "password_file": str(pw)}},
                      "bad": {"qido_url": web, "auth": {"username": "hilum", "password_env": "PACS_WRONG_PW"}}})
        from node.pacs.model import PacsError, StudyQuery
        from node.pacs.sources import source_client

        assert source_client(node.settings, "web").echo() > 0
        with pytest.raises(PacsError, match="source bad: QIDO-RS ping failed: 401"):
            source_client(node.settings, "bad").echo()
        assert [m.study_uid for m in source_client(node.settings, "web").find_studies(
            StudyQuery(patient_id="AUTH1"))[0]] == [st.study_uid]
        node.retriever.start()
        rid, _ = node.store.add("web", st.study_uid, None, "test")
        node.retriever.wake()
        assert node.wait(rid)["status"] == "done" and node.held(st.study_uid) == st.sop_uids
