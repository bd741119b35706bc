"""The audit trail: HMAC chain, verify naming the broken entry, search, syslog export, and the node's hooks."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from node.audit import AuditTrail, ChainedLog, open_audit, search, verify
from node.config import load_settings
from node.keyfile import KeyFileError, read_key
from node.rules.service import RulesService
from tests.encoder_sources import write_ct_series
from tests.nodeproc import REPO, running_node, storescu, wait_for

KEY = bytes(range(32))


def _trail(tmp_path: Path, n: int = 6) -> AuditTrail:
    trail = AuditTrail(ChainedLog(tmp_path / "audit" / "audit.jsonl", KEY), "HILUM")
    for i in range(n):
        trail.association(calling_ae=f"MOD{i}", called_ae="HILUM", source_ip="10.0.0.1", accepted=i % 2 == 0,
                          reason=None if i % 2 == 0 else "not allowed")
    return trail


def _lines(trail: AuditTrail) -> list[str]:
    return trail.log.path.read_text().splitlines()


def _write(trail: AuditTrail, lines: list[str]) -> None:
    trail.log.path.write_text("".join(line + "\n" for line in lines))


def test_untouched_log_verifies_and_entries_are_chained(tmp_path):
    trail = _trail(tmp_path)
    verdict = verify(trail.log)
    assert verdict.ok and verdict.entries == 6
    entries = list(trail.log.entries())
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert all(b["prev"] == a["mac"] for a, b in zip(entries, entries[1:]))
    # DICOM audit vocabulary: Security Alert / Node Authentication, outcome 0 or 4.
    assert entries[0]["event_id"] == {"code": "110113", "system": "DCM", "display": "Security Alert"}
    assert entries[0]["event_type"]["code"] == "110126"
    assert [e["outcome"] for e in entries[:2]] == [0, 4] and entries[1]["outcome_description"] == "not allowed"
    assert oct(os.stat(trail.log.path).st_mode & 0o777) == "0o600"


def test_modified_entry_is_named(tmp_path):
    trail = _trail(tmp_path)
    lines = _lines(trail)
    lines[2] = lines[2].replace('"MOD2"', '"MODX"')  # edit the content, leave the MAC
    _write(trail, lines)
    verdict = verify(trail.log)
    assert [(p.line, p.seq) for p in verdict.problems] == [(3, 3)]
    assert "modified" in verdict.problems[0].what


def test_removed_entry_is_named(tmp_path):
    trail = _trail(tmp_path)
    lines = _lines(trail)
    del lines[3]  # entry 4
    _write(trail, lines)
    verdict = verify(trail.log)
    assert [(p.line, p.seq) for p in verdict.problems] == [(4, 5)]
    assert "entry 4 missing" in verdict.problems[0].what and "removed" in verdict.problems[0].what


def test_reordered_entries_are_named(tmp_path):
    trail = _trail(tmp_path)
    lines = _lines(trail)
    lines[1], lines[2] = lines[2], lines[1]
    _write(trail, lines)
    verdict = verify(trail.log)
    assert [(p.line, p.seq) for p in verdict.problems] == [(2, 3), (3, 2)]
    assert all("reordered" in p.what for p in verdict.problems)


def test_removed_last_entries_are_caught_by_the_head(tmp_path):
    trail = _trail(tmp_path)
    _write(trail, _lines(trail)[:4])
    verdict = verify(trail.log)
    assert [str(p) for p in verdict.problems] == ["head (entry 6): entry 5-6 missing at the end of the log (removed)"]


def test_rewritten_chain_without_the_key_fails(tmp_path):
    trail = _trail(tmp_path, 3)
    forged = AuditTrail(ChainedLog(tmp_path / "forged" / "audit.jsonl", b"x" * 32), "HILUM")
    forged.association(calling_ae="EVIL", called_ae="HILUM", source_ip="1.2.3.4", accepted=True)
    _write(trail, _lines(trail) + _lines(forged))  # appended with a guessed key: seq 1 again, bad MAC
    problems = verify(trail.log).problems
    assert (4, 1) in [(p.line, p.seq) for p in problems] and any("modified" in p.what for p in problems)


def test_torn_write_is_reported_and_appending_continues(tmp_path):
    trail = _trail(tmp_path, 2)
    with open(trail.log.path, "ab") as f:
        f.write(b'{"seq": 3, "ti')  # a crash in the middle of a write
    trail.association(calling_ae="MOD9", called_ae="HILUM", source_ip="10.0.0.9", accepted=True)
    verdict = verify(trail.log)
    assert [(p.line, p.seq) for p in verdict.problems] == [(3, None)]
    assert [e["seq"] for e in trail.log.entries()] == [1, 2, 3]


def test_concurrent_appenders_keep_one_chain(tmp_path):
    """The node and a CLI command append to the same log: the flock keeps one unbroken chain."""
    path = tmp_path / "audit" / "audit.jsonl"
    trails = [AuditTrail(ChainedLog(path, KEY), "HILUM") for _ in range(4)]

    def work(t: AuditTrail) -> None:
        for _ in range(25):
            t.token_created("viewer", None, by="test")

    threads = [threading.Thread(target=work, args=(t,)) for t in trails]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    verdict = verify(trails[0].log)
    assert verdict.ok and verdict.entries == 100


def test_key_file_is_created_private_and_a_readable_one_is_refused(tmp_path):
    key_file = tmp_path / "keys" / "audit.key"
    key = read_key(key_file, "audit.key_file", create=True)
    assert len(key) == 32 and oct(os.stat(key_file).st_mode & 0o777) == "0o600"
    assert read_key(key_file, "audit.key_file") == key
    os.chmod(key_file, 0o644)
    with pytest.raises(KeyFileError, match=r"audit\.key_file: .*readable by group or others"):
        read_key(key_file, "audit.key_file")
    with pytest.raises(KeyFileError, match=r"audit\.key_file: .*does not exist"):
        read_key(tmp_path / "nope.key", "audit.key_file")


def test_search_by_user_study_and_time(tmp_path):
    trail = AuditTrail(ChainedLog(tmp_path / "a.jsonl", KEY), "HILUM")
    rows = [{"calling_ae": "CT1", "source_ip": "10.0.0.5"}, {"calling_ae": "MR1", "source_ip": "10.0.0.6"}]
    first = trail.study_received("1.2.3", 40, rows)
    time.sleep(0.002)  # stamps have millisecond resolution; `since` is inclusive, so keep them apart
    trail.login("alice", "10.0.0.7", ok=False, reason="wrong password")
    time.sleep(0.002)
    trail.study_received("1.2.4", 2, rows[:1])
    entries = list(trail.log.entries())
    assert [e["study_uid"] for e in search(entries, user="CT1")] == ["1.2.4", "1.2.3"]  # newest first
    assert [e["seq"] for e in search(entries, user="MR1")] == [1]
    assert [e["event"] for e in search(entries, user="alice")] == ["login"]
    assert [e["objects"] for e in search(entries, study_uid="1.2.3")] == [40]
    assert first["user"] == "CT1,MR1" and first["source_ip"] == "10.0.0.5,10.0.0.6"
    assert search(entries, since=entries[1]["time"], study_uid="1.2.3") == []
    assert [e["seq"] for e in search(entries, until=entries[1]["time"])] == [1]
    assert len(search(entries, limit=2)) == 2


def test_rules_changes_are_recorded_with_before_and_after(tmp_path):
    trail = AuditTrail(ChainedLog(tmp_path / "a.jsonl", KEY), "HILUM")
    rules = RulesService(tmp_path / "rules", tmp_path / "history", handlers=lambda name: None,
                         destinations={"orthanc"}, audit=trail)
    v1 = rules.apply_change({"a.yaml": "[]\n"}, author="admin alice", message="empty rules file")
    v2 = rules.revert(v1, author="admin bob")  # same content: no new version, nothing to record
    assert v2 == v1
    changes = search(trail.log.entries(), event="rules-change")
    assert len(changes) == 2  # the initial (empty) version at start-up, then alice's change
    latest = changes[0]
    assert latest["user"] == "admin alice" and latest["action"] == "U"
    assert latest["detail"]["after"]["version"] == v1 and latest["detail"]["before"]["version"] == v1 - 1
    assert latest["detail"]["message"] == "empty rules file"


def _hilum(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_cli_verify_names_the_edited_entry(tmp_path):
    settings = load_settings(data_dir=tmp_path / "d", audit={"key_file": str(tmp_path / "keys" / "audit.key")})
    trail = open_audit(settings)
    for i in range(3):
        trail.token_created("viewer", f"t{i}", by="test")
    ok = _hilum("audit", "--data-dir", str(tmp_path / "d"), "verify")
    assert ok.returncode == 2 and "audit.key_file" in ok.stderr  # the default key path is not where the key is
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'd'}\naudit: {{key_file: {tmp_path / 'keys' / 'audit.key'}}}\n")
    ok = _hilum("audit", "--config", str(cfg), "verify")
    assert ok.returncode == 0 and "3 entries, chain intact" in ok.stdout
    log_file = tmp_path / "d" / "audit" / "audit.jsonl"
    lines = log_file.read_text().splitlines()
    lines[1] = lines[1].replace('"t1"', '"t7"')
    log_file.write_text("\n".join(lines) + "\n")
    bad = _hilum("audit", "--config", str(cfg), "verify")
    assert bad.returncode == 1 and "line 2 (entry 2): entry modified" in bad.stdout


RFC5424 = re.compile(rb'^<(\d+)>1 (\S+) (\S+) hilum - (\S+) \[meta sequenceId="(\d+)"\] \xef\xbb\xbf(.*)$', re.S)


def _udp_listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(10)
    return s


def test_syslog_export_udp_and_tcp(tmp_path):
    settings = load_settings(data_dir=tmp_path / "d", audit={"key_file": str(tmp_path / "k" / "audit.key")})
    trail = open_audit(settings)
    trail.association(calling_ae="CT1", called_ae="HILUM", source_ip="10.1.1.1", accepted=True)
    trail.association(calling_ae="BAD", called_ae="HILUM", source_ip="10.1.1.2", accepted=False, reason="no")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'd'}\naudit: {{key_file: {tmp_path / 'k' / 'audit.key'}}}\n")

    udp = _udp_listener()
    out = _hilum("audit", "--config", str(cfg), "export", "--syslog", f"127.0.0.1:{udp.getsockname()[1]}")
    assert out.returncode == 0, out.stderr
    got = [udp.recv(65535) for _ in range(2)]
    udp.close()
    parsed = [RFC5424.match(m) for m in got]
    assert all(parsed)
    assert [int(m.group(1)) for m in parsed] == [10 * 8 + 5, 10 * 8 + 4]  # authpriv.notice, authpriv.warning
    assert [int(m.group(5)) for m in parsed] == [1, 2]
    assert [json.loads(m.group(6))["peer_ae"] for m in parsed] == ["CT1", "BAD"]
    assert parsed[0].group(4) == b"association"

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(10)
    received = bytearray()

    def accept():
        conn, _ = srv.accept()
        with conn:
            while chunk := conn.recv(65536):
                received.extend(chunk)

    t = threading.Thread(target=accept)
    t.start()
    out = _hilum("audit", "--config", str(cfg), "export", "--syslog", f"127.0.0.1:{srv.getsockname()[1]}",
                 "--transport", "tcp", "--user", "BAD")
    t.join(10)
    srv.close()
    assert out.returncode == 0, out.stderr
    length, _, rest = bytes(received).partition(b" ")  # RFC 6587 octet counting
    assert int(length) == len(rest)
    m = RFC5424.match(rest)
    assert m and json.loads(m.group(6))["outcome_description"] == "no"
    # Each export is itself an audit event (Audit Log Used), and the chain still verifies.
    reads = search(open_audit(settings).log.entries(), event="audit-read")
    assert len(reads) == 2 and reads[0]["event_id"]["code"] == "110101"
    assert verify(open_audit(settings).log).ok


def test_jsonl_export_with_filters(tmp_path):
    settings = load_settings(data_dir=tmp_path / "d", audit={"key_file": str(tmp_path / "k" / "audit.key")})
    trail = open_audit(settings)
    trail.study_received("1.2.3", 5, [{"calling_ae": "CT1", "source_ip": "10.0.0.1"}])
    trail.study_received("1.2.4", 7, [{"calling_ae": "CT1", "source_ip": "10.0.0.1"}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'd'}\naudit: {{key_file: {tmp_path / 'k' / 'audit.key'}}}\n")
    out_file = tmp_path / "out.jsonl"
    out = _hilum("audit", "--config", str(cfg), "export", "--jsonl", str(out_file), "--study", "1.2.4")
    assert out.returncode == 0, out.stderr
    (entry,) = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert entry["objects"] == 7 and entry["event_id"]["code"] == "110104" and entry["action"] == "C"


@pytest.mark.slow
def test_node_records_associations_studies_jobs_deliveries_and_tokens(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "ct.yaml").write_text(textwrap.dedent("""\
        - name: ct-overview
          level: series
          match: {Modality: CT}
          handler: overview
          destinations: [orthanc]
        """))
    files = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=6, seed="audit")
    study = __import__("pydicom").dcmread(files[0]).StudyInstanceUID
    key_file = tmp_path / "keys" / "audit.key"
    with running_node(tmp_path / "data", rules, allowed_callers=[{"ae_title": "CT1"}],
                      audit={"key_file": str(key_file)}) as node:
        assert storescu(node.dicom_port, files, calling="INTRUDER").returncode != 0
        assert storescu(node.dicom_port, files, calling="CT1").returncode == 0

        def delivered():
            st = node.study(study)
            jobs = st.get("jobs", [])
            return jobs and all(j["status"] == "done" and all(
                r["deliveries"].get("orthanc") == "delivered" for r in j["results"]) for j in jobs) and st

        wait_for(delivered, 120, "overview delivered", interval=0.5)
        chain = ChainedLog(tmp_path / "data" / "audit" / "audit.jsonl", read_key(key_file, "audit.key_file"))

        def originals_delivered():  # a refused attempt is audited too (outcome != 0) and retried
            return [e for e in search(chain.entries(), event="delivery", study_uid=study) if e["outcome"] == 0]

        wait_for(lambda: sum(e["objects"] for e in originals_delivered()) >= 7, 60, "deliveries audited")
    entries = list(chain.entries())
    events = [e["event"] for e in entries]
    assert events[0] == "rules-change" and "node-start" in events and events[-1] == "node-stop"
    assocs = search(entries, event="association")
    assert {(e["peer_ae"], e["outcome"]) for e in assocs} == {("INTRUDER", 4), ("CT1", 0)}
    assert "not allowed" in next(e for e in assocs if e["outcome"] == 4)["outcome_description"]
    (received,) = search(entries, event="study-received")
    assert received["study_uid"] == study and received["objects"] == 6 and received["user"] == "CT1"
    (job,) = search(entries, event="job")
    assert job["outcome"] == 0 and job["detail"]["handler"] == "overview" and job["study_uid"] == study
    deliveries = search(entries, event="delivery", study_uid=study)
    assert deliveries and all(e["destination"] == "orthanc" for e in deliveries)
    kinds = {}
    # What reached Orthanc, once each: a transient refusal (audited with its outcome) is retried.
    for e in (e for e in deliveries if e["outcome"] == 0):
        for k, n in e["detail"]["kinds"].items():
            kinds[k] = kinds.get(k, 0) + n
    assert kinds == {"original": 6, "result": 1}
    (token,) = search(entries, event="token-created")
    assert token["detail"]["role"] == "admin" and token["user"].startswith("cli ")
    out = _hilum("audit", "--config", str(node.config_path), "verify")
    assert out.returncode == 0 and "chain intact" in out.stdout, out.stdout


def test_admin_api_searches_and_records_the_access(tmp_path):
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from node.audit import api
    from node.store.index import Index
    from node.web.auth import create_token
    from node.web.sessions import SessionStore

    index = Index(tmp_path / "index.db")
    trail = AuditTrail(ChainedLog(tmp_path / "a.jsonl", KEY), "HILUM")
    trail.study_received("1.2.3", 40, [{"calling_ae": "CT1", "source_ip": "10.0.0.5"}])
    trail.study_received("1.2.4", 4, [{"calling_ae": "MR1", "source_ip": "10.0.0.6"}])
    app = FastAPI()
    app.state.node = SimpleNamespace(index=index, audit=trail)
    app.state.web = SimpleNamespace(sessions=SessionStore(1800))
    app.include_router(api.router)
    client = TestClient(app)
    admin, viewer = create_token(index, "admin"), create_token(index, "viewer")
    assert client.get("/api/audit").status_code == 401
    assert client.get("/api/audit", headers={"Authorization": f"Bearer {viewer}"}).status_code == 403
    r = client.get("/api/audit", params={"user": "MR1"}, headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200 and [e["study_uid"] for e in r.json()["entries"]] == ["1.2.4"]
    r = client.get("/api/audit", params={"study": "1.2.3", "since": "2000-01-01T00:00:00Z"},
                   headers={"Authorization": f"Bearer {admin}"})
    assert [e["objects"] for e in r.json()["entries"]] == [40]
    reads = search(trail.log.entries(), event="audit-read")
    assert [e["detail"]["query"]["api"] for e in reads] == [{"study": "1.2.3", "since": "2000-01-01T00:00:00+00:00"},
                                                   {"user": "MR1"}]
    assert reads[0]["user"] == "api token"
    assert verify(trail.log).ok


def test_people_and_gateway_events_for_the_web_layer(tmp_path):
    trail = AuditTrail(ChainedLog(tmp_path / "a.jsonl", KEY), "HILUM")
    trail.login("alice", "10.0.0.7", ok=True)
    trail.user_changed("admin alice", "bob", before=None, after={"role": "viewer"})
    trail.user_changed("admin alice", "bob", before={"role": "viewer"}, after={"role": "admin"})
    trail.user_changed("admin alice", "bob", before={"role": "admin"}, after=None)
    trail.archive_access("viewer bob", "10.0.0.8", "1.2.3", "GET /dicom-web/studies/1.2.3/series", objects=2)
    entries = list(trail.log.entries())
    assert [e["event_id"]["code"] for e in entries] == ["110114", "110113", "110113", "110113", "110103"]
    assert [e["action"] for e in entries[1:4]] == ["C", "U", "D"]
    assert entries[2]["detail"] == {"account": "bob", "before": {"role": "viewer"}, "after": {"role": "admin"}}
    assert search(entries, user="viewer bob", study_uid="1.2.3")[0]["detail"]["request"].startswith("GET ")
    assert verify(trail.log).ok
