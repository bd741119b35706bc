"""The audit chain keeps the evidence of a removed tail: before, the node's next append re-chained
from the shortened log and rewrote the head, and ``verify`` then called the chain intact; a log
deleted together with its head verified as "0 entries, intact"."""
from __future__ import annotations

import json

from node.audit.chain import ChainedLog
from node.audit.verify import verify

KEY = b"k" * 32


def _log(tmp_path) -> ChainedLog:
    return ChainedLog(tmp_path / "audit" / "audit.jsonl", KEY, marker=tmp_path / "keys" / "audit.key.used")


def _entries(log: ChainedLog) -> list[dict]:
    return list(log.entries())


def test_a_removed_tail_stays_a_gap_and_the_next_append_says_so(tmp_path):
    (tmp_path / "keys").mkdir()
    log = _log(tmp_path)
    for i in range(10):
        log.append({"event": "delivery", "n": i, "source": "HILUM"})
    lines = log.path.read_bytes().splitlines(keepends=True)
    log.path.write_bytes(b"".join(lines[:7]))  # entries 8-10 removed while the node runs
    log.append({"event": "login", "user": "alice", "source": "HILUM"})
    alert, entry = _entries(log)[-2:]
    assert alert["event"] == "audit-log-tampered" and alert["seq"] == 11 and alert["outcome"] == 12
    assert "entry 8-10 removed from the end of the log" in alert["outcome_description"]
    assert entry["event"] == "login" and entry["seq"] == 12 and entry["prev"] == alert["mac"]
    v = verify(log)
    assert not v.ok and [str(p) for p in v.problems] == ["line 8 (entry 11): entry 8-10 missing before this line (removed)"]
    # Later appends do not clear it: the gap is in the chain for good.
    log.append({"event": "login", "user": "bob", "source": "HILUM"})
    assert not verify(log).ok


def test_a_modified_or_removed_head_is_recorded_in_the_chain(tmp_path):
    (tmp_path / "keys").mkdir()
    log = _log(tmp_path)
    log.append({"event": "a"})
    head = json.loads(log.head_path.read_text())
    log.head_path.write_text(json.dumps({**head, "seq": 1000}))
    log.append({"event": "b"})
    assert _entries(log)[-2]["outcome_description"] == "the head file was modified: its MAC does not match"
    log.head_path.unlink()
    log.append({"event": "c"})
    assert "head file is missing" in _entries(log)[-2]["outcome_description"]
    assert verify(log).ok  # the alerts are chained entries; nothing is missing


def test_a_log_deleted_with_its_head_is_reported_by_verify_and_the_next_append(tmp_path):
    (tmp_path / "keys").mkdir()
    log = _log(tmp_path)
    log.append({"event": "a"})
    assert log.marker.exists()
    log.path.unlink()
    log.head_path.unlink()
    v = verify(log)
    assert not v.ok and "gone, although its key wrote to them before" in str(v.problems[0])
    log.append({"event": "b"})
    first = _entries(log)[0]
    assert first["event"] == "audit-log-tampered" and "gone, although this key wrote to them before" in \
        first["outcome_description"]


def test_a_head_one_append_behind_is_a_crash_not_tampering(tmp_path):
    (tmp_path / "keys").mkdir()
    log = _log(tmp_path)
    log.append({"event": "a"})
    behind = log.head_path.read_text()
    log.append({"event": "b"})
    log.head_path.write_text(behind)  # the crash came between the log's fsync and the head's write
    log.append({"event": "c"})
    assert [e["event"] for e in _entries(log)] == ["a", "b", "c"]
    assert verify(log).ok


def test_an_entry_holding_a_lone_surrogate_is_written_verified_and_exported(tmp_path):
    from node.audit.syslog import format_rfc5424
    (tmp_path / "keys").mkdir()
    log = _log(tmp_path)
    log.append({"event": "login", "user": "\ud800x"})
    [entry] = _entries(log)
    assert entry["user"] == "\ud800x" and verify(log).ok
    message = format_rfc5424(entry, "host")
    assert message.endswith(b'"user": "\\ud800x"}') and json.loads(message.split(b"\xef\xbb\xbf", 1)[1]) == entry
