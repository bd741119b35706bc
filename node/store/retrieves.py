"""Durable retrieve jobs (node/pacs): what to fetch from which PACS source, and how far it got.

The tables live in the node's index database but are created here, beside their statements, so
that PACS synchronisation adds to the index without touching its migration list. A retrieve is

    queued → querying → retrieving → done | partial | failed | cancelled

with ``attempts`` and ``next_at`` for exponential backoff: a retrieve that failed for a reason a
retry can fix goes back to ``queued`` with a later ``next_at``; one running when the node died is
queued again at start-up (the ingest's dedupe makes the repeat harmless).
"""
from __future__ import annotations

import json
import sqlite3
import time
from typing import Callable

from node.store.index import Index

SCHEMA = """
CREATE TABLE IF NOT EXISTS retrieves (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL, study_uid TEXT NOT NULL,
    series_json TEXT,                          -- JSON list of series UIDs, NULL for the whole study
    requested_by TEXT NOT NULL,                -- 'cli alice', 'api bob', 'rule:chest-ct', 'priors:job 12'
    status TEXT NOT NULL,                      -- queued|querying|retrieving|done|partial|failed|cancelled
    method TEXT,                               -- move | get | wado
    expected INTEGER, received INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0, warning INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT, detail_json TEXT NOT NULL DEFAULT '{}',
    history_json TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL, started_at REAL, finished_at REAL
);
CREATE INDEX IF NOT EXISTS retrieves_due ON retrieves(status, next_at);
CREATE INDEX IF NOT EXISTS retrieves_study ON retrieves(study_uid);
CREATE TABLE IF NOT EXISTS pull_state (
    rule TEXT PRIMARY KEY,
    next_at REAL NOT NULL,                     -- when the scheduler runs it next (persisted: no timers)
    last_run_at REAL, last_result_json TEXT, last_error TEXT,
    high_water TEXT                            -- watch mode: StudyDate from which the next poll asks
);
CREATE TABLE IF NOT EXISTS pull_seen (
    rule TEXT NOT NULL, study_uid TEXT NOT NULL,
    instances INTEGER,                         -- NumberOfStudyRelatedInstances at the last look
    stable INTEGER NOT NULL DEFAULT 0,         -- 1: the count did not change between two looks
    retrieves INTEGER NOT NULL DEFAULT 0, first_at REAL NOT NULL, last_at REAL NOT NULL,
    PRIMARY KEY (rule, study_uid)
);
CREATE TABLE IF NOT EXISTS retrieve_instances (
    sop_uid TEXT PRIMARY KEY,                  -- provenance: the retrieve that brought this instance in
    retrieve_id INTEGER NOT NULL               -- (filled when the retrieve ends, not on the receive path)
);
CREATE INDEX IF NOT EXISTS retrieve_instances_rid ON retrieve_instances(retrieve_id);
CREATE TABLE IF NOT EXISTS prior_waits (
    job_id INTEGER PRIMARY KEY,                -- a job in status 'waiting-for-priors'
    spec_json TEXT NOT NULL,                   -- the rule's priors: (node/rules/priors.py)
    state TEXT NOT NULL,                       -- searching | retrieving | released
    deadline REAL NOT NULL,                    -- then the job runs with what arrived
    chosen_json TEXT NOT NULL DEFAULT '[]',    -- [{study_uid, source, retrieve, series}]
    note TEXT, created_at REAL NOT NULL
)
"""

ACTIVE = ("queued", "querying", "retrieving")
TERMINAL = ("done", "partial", "failed", "cancelled")


class RetrieveStore:
    def __init__(self, index: Index) -> None:
        self.index = index
        c = index.conn()
        with index.tx(immediate=True):
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)

    def _c(self) -> sqlite3.Connection:
        return self.index.conn()

    @staticmethod
    def _hist(row: sqlite3.Row | None, event: dict) -> str:
        hist = json.loads(row["history_json"]) if row else []
        hist.append({"at": time.time(), **event})
        return json.dumps(hist[-50:])

    def add(self, source: str, study_uid: str, series: list[str] | None, requested_by: str,
            expected: int | None = None) -> tuple[int, bool]:
        """Queue a retrieve; an active one for the same study and series is reused. (id, created)."""
        key = json.dumps(sorted(series)) if series else None
        c = self._c()
        with self.index.tx(immediate=True):
            row = c.execute(f"SELECT id FROM retrieves WHERE source=? AND study_uid=? AND series_json IS ? "
                            f"AND status IN ({','.join('?' * len(ACTIVE))})", (source, study_uid, key, *ACTIVE)
                            ).fetchone()
            if row is not None:  # the same transfer is already under way: one retrieve serves both
                c.execute("UPDATE retrieves SET history_json=? WHERE id=?",
                          (self._hist(self.get(row[0]), {"event": "also requested", "by": requested_by}), row[0]))
                return row[0], False
            now = time.time()
            cur = c.execute("INSERT INTO retrieves(source, study_uid, series_json, requested_by, status, next_at, "
                            "created_at, expected, history_json) VALUES (?,?,?,?, 'queued', ?, ?, ?, ?)",
                            (source, study_uid, key, requested_by, now, now, expected,
                             json.dumps([{"at": now, "event": "queued", "by": requested_by}])))
            return cur.lastrowid, True

    def get(self, rid: int) -> sqlite3.Row | None:
        return self._c().execute("SELECT * FROM retrieves WHERE id=?", (rid,)).fetchone()

    def list(self, status: str | None = None, study_uid: str | None = None, limit: int = 200) -> list[sqlite3.Row]:
        q, args = "SELECT * FROM retrieves WHERE 1=1", []
        if status:
            q += " AND status=?"
            args.append(status)
        if study_uid:
            q += " AND study_uid=?"
            args.append(study_uid)
        return self._c().execute(q + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()

    def claim(self, now: float, capacity: dict[str, int]) -> sqlite3.Row | None:
        """Take the oldest due queued retrieve whose source has a free slot (``capacity``: the
        per-source limit); it becomes ``querying``. Not synced: a claim lost to a power cut leaves the
        retrieve queued, and one found running at start-up is queued again either way."""
        c = self._c()
        with self.index.relaxed(), self.index.tx(immediate=True):
            running = dict(c.execute("SELECT source, COUNT(*) FROM retrieves WHERE status IN ('querying', "
                                     "'retrieving') GROUP BY source").fetchall())
            for row in c.execute("SELECT * FROM retrieves WHERE status='queued' AND next_at<=? ORDER BY next_at, id",
                                 (now,)).fetchall():
                if running.get(row["source"], 0) < capacity.get(row["source"], 0):
                    c.execute("UPDATE retrieves SET status='querying', attempts=attempts+1, started_at=?, "
                              "history_json=? WHERE id=?",
                              (now, self._hist(row, {"event": "started", "attempt": row["attempts"] + 1}), row["id"]))
                    return self.get(row["id"])
        return None

    def next_due(self) -> float | None:
        row = self._c().execute("SELECT MIN(next_at) FROM retrieves WHERE status='queued'").fetchone()
        return row[0] if row else None

    def progress(self, rid: int, *, status: str | None = None, method: str | None = None,
                 expected: int | None = None, received: int | None = None, completed: int | None = None,
                 failed: int | None = None, warning: int | None = None, detail: dict | None = None) -> bool:
        """Update what is given; False when a cancel was asked for (the caller stops). Not synced (a
        running retrieve's state and counts: redone or recounted if a power cut loses them)."""
        sets, args = [], []
        for col, val in (("status", status), ("method", method), ("expected", expected), ("received", received),
                         ("completed", completed), ("failed", failed), ("warning", warning)):
            if val is not None:
                sets.append(f"{col}=?")
                args.append(val)
        if detail is not None:
            sets.append("detail_json=?")
            args.append(json.dumps(detail))
        c = self._c()
        if sets:
            with self.index.relaxed():
                c.execute(f"UPDATE retrieves SET {', '.join(sets)} WHERE id=?", (*args, rid))
        row = c.execute("SELECT cancel_requested FROM retrieves WHERE id=?", (rid,)).fetchone()
        return not (row and row[0])

    def finish(self, rid: int, status: str, error: str | None = None, detail: dict | None = None,
               counts: tuple[int, int, int] | None = None,
               judge: Callable[[int], tuple[str, str | None]] | None = None) -> tuple[int | None, str, str | None]:
        """End a retrieve. With ``counts`` (its completed, failed and warning sub-operations) it ran to
        its end: in the same transaction (one sync, not three) its instances are attributed to it
        (``attribute``) and what the node holds of what it asked for is counted. ``judge`` may then
        change the status from that count (a PACS that reports success and sends nothing). Returns
        (held, status, error) as recorded."""
        c = self._c()
        held = None
        with self.index.tx(immediate=True):
            row = self.get(rid)
            if counts is not None:
                self._attribute(row)
                held = self._held(row)
                if judge is not None:
                    status, error = judge(held)
                c.execute("UPDATE retrieves SET received=?, completed=?, failed=?, warning=? WHERE id=?",
                          (held, *counts, rid))
            c.execute("UPDATE retrieves SET status=?, error=?, finished_at=?, detail_json=?, history_json=? "
                      "WHERE id=?",
                      (status, error, time.time(), json.dumps(detail if detail is not None else
                                                               json.loads(row["detail_json"])),
                       self._hist(row, {"event": status, **({"error": error[:500]} if error else {})}), rid))
        return held, status, error

    def backoff(self, rid: int, error: str, max_attempts: int, base: float, cap: float) -> str:
        """A failure a retry may fix: queued again after base·2^(n-1) s, or failed after max_attempts."""
        c = self._c()
        with self.index.tx(immediate=True):
            row = self.get(rid)
            if row["attempts"] >= max_attempts:
                status, next_at = "failed", row["next_at"]
            else:
                status, next_at = "queued", time.time() + min(cap, base * 2 ** (row["attempts"] - 1))
            c.execute("UPDATE retrieves SET status=?, error=?, next_at=?, finished_at=?, history_json=? WHERE id=?",
                      (status, error, next_at, time.time() if status == "failed" else None,
                       self._hist(row, {"event": "failed" if status == "failed" else "retry later",
                                        "error": error[:500], "next_at": next_at}), rid))
        return status

    def cancel(self, rid: int, who: str) -> bool:
        """Queued: cancelled at once. Running: asked to stop (the runner aborts at its next response)."""
        c = self._c()
        with self.index.tx(immediate=True):
            row = self.get(rid)
            if row is None or row["status"] not in ACTIVE:
                return False
            if row["status"] == "queued":
                c.execute("UPDATE retrieves SET status='cancelled', finished_at=?, history_json=? WHERE id=?",
                          (time.time(), self._hist(row, {"event": "cancelled", "by": who}), rid))
            else:
                c.execute("UPDATE retrieves SET cancel_requested=1, history_json=? WHERE id=?",
                          (self._hist(row, {"event": "cancel requested", "by": who}), rid))
        return True

    def retry(self, rid: int, who: str) -> bool:
        c = self._c()
        with self.index.tx(immediate=True):
            row = self.get(rid)
            if row is None or row["status"] not in ("failed", "partial", "cancelled"):
                return False
            c.execute("UPDATE retrieves SET status='queued', attempts=0, next_at=?, cancel_requested=0, error=NULL, "
                      "finished_at=NULL, history_json=? WHERE id=?",
                      (time.time(), self._hist(row, {"event": "retry", "by": who}), rid))
        return True

    def requeue_running(self) -> int:
        """Retrieves running when the node stopped go back to the queue (restart resumes them)."""
        c = self._c()
        with self.index.tx(immediate=True):
            rows = c.execute("SELECT * FROM retrieves WHERE status IN ('querying', 'retrieving')").fetchall()
            for r in rows:
                c.execute("UPDATE retrieves SET status='queued', next_at=?, history_json=? WHERE id=?",
                          (time.time(), self._hist(r, {"event": "requeued after restart"}), r["id"]))
        return len(rows)

    def held_instances(self, study_uid: str, series: list[str] | None) -> int:
        """Instances of the study (or of these series) the node holds: a retrieve's progress."""
        c = self._c()
        if series:
            marks = ",".join("?" * len(series))
            return c.execute(f"SELECT COUNT(*) FROM instances WHERE series_uid IN ({marks}) AND purged_at IS NULL",
                             series).fetchone()[0]
        return c.execute("SELECT COUNT(*) FROM instances WHERE study_uid=? AND purged_at IS NULL",
                         (study_uid,)).fetchone()[0]

    def _held(self, row: sqlite3.Row) -> int:
        return self.held_instances(row["study_uid"], json.loads(row["series_json"]) if row["series_json"] else None)

    def _attribute(self, row: sqlite3.Row) -> int:
        """Record this retrieve as the provenance of the instances of its study (or series) that arrived
        since it was queued and that no earlier retrieve brought: done once when it ends (``finish``), so
        the receive path pays nothing. An instance the node already held is not attributed (the retrieve
        did not bring it); one pushed by a modality into the same study while the retrieve ran would be."""
        series = json.loads(row["series_json"]) if row["series_json"] else None
        q = ("INSERT OR IGNORE INTO retrieve_instances(sop_uid, retrieve_id) SELECT sop_uid, ? FROM instances "
             "WHERE study_uid=? AND received_at>=?")
        args: list = [row["id"], row["study_uid"], row["created_at"]]
        if series:
            q += f" AND series_uid IN ({','.join('?' * len(series))})"
            args += series
        return self._c().execute(q, args).rowcount

    def provenance(self, study_uid: str) -> list[dict]:
        """Per retrieve that brought instances of this study in: who asked (user, ``rule:NAME``,
        ``priors:job N``), from which source, how, when, and how many instances of which series."""
        rows = self._c().execute(
            "SELECT r.id, r.requested_by, r.source, r.method, r.status, r.finished_at, i.series_uid, COUNT(*) AS n "
            "FROM retrieve_instances ri JOIN instances i ON i.sop_uid=ri.sop_uid JOIN retrieves r ON r.id=ri.retrieve_id "
            "WHERE i.study_uid=? AND i.purged_at IS NULL GROUP BY r.id, i.series_uid ORDER BY r.id, i.series_uid",
            (study_uid,)).fetchall()
        out: dict[int, dict] = {}
        for r in rows:
            e = out.setdefault(r["id"], {"retrieve": r["id"], "requested_by": r["requested_by"], "source": r["source"],
                                         "method": r["method"], "status": r["status"],
                                         "finished_at": r["finished_at"], "instances": 0, "series": {}})
            e["series"][r["series_uid"]] = r["n"]
            e["instances"] += r["n"]
        return list(out.values())

    def held_studies(self, study_uids: list[str]) -> set[str]:
        if not study_uids:
            return set()
        marks = ",".join("?" * len(study_uids))
        return {r[0] for r in self._c().execute(f"SELECT study_uid FROM studies WHERE study_uid IN ({marks}) "
                                                 "AND instances > 0", study_uids)}

    # -- pull rules (node/pacs/scheduler.py) ----------------------------------------------------
    def pull_state(self, rule: str) -> sqlite3.Row | None:
        return self._c().execute("SELECT * FROM pull_state WHERE rule=?", (rule,)).fetchone()

    def pull_states(self) -> list[sqlite3.Row]:
        return self._c().execute("SELECT * FROM pull_state ORDER BY rule").fetchall()

    def ensure_pull_state(self, rule: str, next_at: float) -> sqlite3.Row:
        self._c().execute("INSERT OR IGNORE INTO pull_state(rule, next_at) VALUES (?, ?)", (rule, next_at))
        return self.pull_state(rule)

    def pull_ran(self, rule: str, *, next_at: float, result: dict, error: str | None,
                 high_water: str | None) -> None:
        self._c().execute("UPDATE pull_state SET next_at=?, last_run_at=?, last_result_json=?, last_error=?, "
                          "high_water=COALESCE(?, high_water) WHERE rule=?",
                          (next_at, time.time(), json.dumps(result), error, high_water, rule))

    def run_pull_now(self, rule: str) -> bool:
        return self._c().execute("UPDATE pull_state SET next_at=? WHERE rule=?", (time.time(), rule)).rowcount > 0

    def seen(self, rule: str, study_uid: str) -> sqlite3.Row | None:
        return self._c().execute("SELECT * FROM pull_seen WHERE rule=? AND study_uid=?", (rule, study_uid)).fetchone()

    def mark_seen(self, rule: str, study_uid: str, instances: int | None, stable: bool, retrieved: bool) -> None:
        now = time.time()
        self._c().execute(
            """INSERT INTO pull_seen(rule, study_uid, instances, stable, retrieves, first_at, last_at)
               VALUES (?,?,?,?,?,?,?) ON CONFLICT(rule, study_uid) DO UPDATE SET instances=excluded.instances,
               stable=excluded.stable, retrieves=retrieves+excluded.retrieves, last_at=excluded.last_at""",
            (rule, study_uid, instances, int(stable), int(retrieved), now, now))

    def unstable_dates(self, rule: str) -> list[str]:
        """Study UIDs this rule still re-checks (their instance count was still changing)."""
        return [r[0] for r in self._c().execute("SELECT study_uid FROM pull_seen WHERE rule=? AND stable=0",
                                                (rule,))]

    def expected_since(self, requested_by: str, since: float) -> int:
        """Instances the retrieves of one requester created since ``since`` expect (a rate limit)."""
        row = self._c().execute("SELECT COALESCE(SUM(COALESCE(expected, 0)), 0) FROM retrieves WHERE requested_by=? "
                                "AND created_at>=?", (requested_by, since)).fetchone()
        return int(row[0])

    # -- priors (node/pacs/priors.py) ----------------------------------------------------------
    def hold_for_priors(self, job_id: int, spec: dict, deadline: float) -> None:
        """Park a just-created job until its priors are in (call inside the transaction that made it)."""
        c = self._c()
        c.execute("UPDATE jobs SET status='waiting-for-priors', message='looking for priors' WHERE id=? "
                  "AND status='pending'", (job_id,))
        c.execute("INSERT OR IGNORE INTO prior_waits(job_id, spec_json, state, deadline, created_at) "
                  "VALUES (?,?, 'searching', ?, ?)", (job_id, json.dumps(spec), deadline, time.time()))

    def prior_waits(self) -> list[sqlite3.Row]:
        return self._c().execute("SELECT w.*, j.study_uid FROM prior_waits w JOIN jobs j ON j.id=w.job_id "
                                 "WHERE w.state != 'released' ORDER BY w.job_id").fetchall()

    def priors_chosen(self, job_id: int, chosen: list[dict], note: str | None) -> None:
        self._c().execute("UPDATE prior_waits SET state='retrieving', chosen_json=?, note=? WHERE job_id=?",
                          (json.dumps(chosen), note, job_id))

    def release_priors(self, job_id: int, note: str | None) -> None:
        """The job may run now, with the priors that arrived."""
        c = self._c()
        with self.index.tx(immediate=True):
            c.execute("UPDATE prior_waits SET state='released', note=? WHERE job_id=?", (note, job_id))
            c.execute("UPDATE jobs SET status='pending', message=? WHERE id=? AND status='waiting-for-priors'",
                      ((note or "priors ready")[:500], job_id))

    def prior_studies(self, patient_id: str, before_date: str, since_date: str, exclude: str) -> list[sqlite3.Row]:
        """The node's own studies of a patient dated in [since_date, before_date)."""
        return self._c().execute("SELECT * FROM studies WHERE patient_id=? AND study_uid != ? AND study_date < ? "
                                 "AND study_date >= ? AND instances > 0 ORDER BY study_date DESC",
                                 (patient_id, exclude, before_date, since_date)).fetchall()


def retrieved_by(index: Index, series_uids: list[str]) -> dict:
    """A job's input provenance: {"retrieved_by": {series_uid: [who asked for the retrieves that
    brought its instances: 'rule:NAME', 'api alice', 'priors:job 12']}} for the series a retrieve
    brought, or {} (all pushed to the node). Recorded in the job's history by the worker."""
    c = index.conn()
    out: dict[str, list[str]] = {}
    try:
        for uid in series_uids:
            who = [r[0] for r in c.execute(
                "SELECT DISTINCT r.requested_by FROM retrieve_instances ri JOIN instances i ON i.sop_uid=ri.sop_uid "
                "JOIN retrieves r ON r.id=ri.retrieve_id WHERE i.series_uid=? ORDER BY r.id", (uid,))]
            if who:
                out[uid] = who
    except sqlite3.OperationalError:  # no PACS tables in this index yet: nothing was retrieved
        return {}
    return {"retrieved_by": out} if out else {}


def priors_of_job(index: Index, job_id: int) -> dict:
    """What a job's JobSpec carries about priors: {"priors": [...], "priors_note": ...}, or {}."""
    c = index.conn()
    try:
        row = c.execute("SELECT * FROM prior_waits WHERE job_id=?", (job_id,)).fetchone()
    except sqlite3.OperationalError:  # no PACS tables in this index yet: no priors
        return {}
    if row is None:
        return {}
    priors = []
    for p in json.loads(row["chosen_json"]):
        series = p.get("series")
        rows = index.series_of_study(p["study_uid"])
        uids = [r["series_uid"] for r in rows if not series or r["series_uid"] in series]
        paths = {u: index.instance_paths(u) for u in uids}
        paths = {u: v for u, v in paths.items() if v}
        if not paths:
            continue  # not (yet) in the node: the note says so
        st = index.study(p["study_uid"])
        priors.append({"study_uid": p["study_uid"], "source": p["source"], "study_date": st["study_date"] or "",
                       "study_time": p.get("study_time", ""), "series": paths})
    return {"priors": priors, "priors_note": row["note"]}


PRIORS_ARRIVING = "priors still arriving"


def prior_context(index: Index, study_uid: str) -> str | None:
    """Whether a study is only another job's prior: every instance of it came in by retrieves that
    fetched priors (``priors:job N``). Such a study is that job's context, not new work: routing it
    would run handlers on an old study and deliver their results (to the archive, to a planning
    system) that nobody asked for. Returns why it is not routed, ``PRIORS_ARRIVING`` while a priors
    retrieve of it still runs (its instances are attributed only when it ends), or None: route it."""
    c = index.conn()
    try:
        active = c.execute(f"SELECT requested_by FROM retrieves WHERE study_uid=? AND status IN "
                           f"({','.join('?' * len(ACTIVE))})", (study_uid, *ACTIVE)).fetchall()
        if any(r["requested_by"].startswith("priors:") for r in active):
            return PRIORS_ARRIVING
        total = c.execute("SELECT COUNT(*) FROM instances WHERE study_uid=? AND purged_at IS NULL",
                          (study_uid,)).fetchone()[0]
        askers = c.execute(
            "SELECT r.requested_by, COUNT(*) AS n FROM instances i JOIN retrieve_instances ri ON ri.sop_uid=i.sop_uid "
            "JOIN retrieves r ON r.id=ri.retrieve_id WHERE i.study_uid=? AND i.purged_at IS NULL "
            "GROUP BY r.requested_by", (study_uid,)).fetchall()
    except sqlite3.OperationalError:  # no PACS tables in this index: nothing was ever retrieved
        return None
    if not total or any(not r["requested_by"].startswith("priors:") for r in askers) \
            or sum(r["n"] for r in askers) < total:
        return None  # pushed, pulled by a rule or a user, or empty: ordinary routing
    jobs = ", ".join(sorted({r["requested_by"][len("priors:"):] for r in askers}))
    return f"not routed: retrieved only as a prior ({jobs}); a prior is context for that job, not new work"


def who_asked(requested_by: str) -> dict:
    """A retrieve's requester split into what a reader wants: a pull rule (``rule:NAME``), the
    priors of a job (``priors:job N``) or a user through the CLI or the API (``cli alice``)."""
    if requested_by.startswith("rule:"):
        return {"by": "rule", "rule": requested_by[5:]}
    if requested_by.startswith("priors:job "):
        job = requested_by[len("priors:job "):]
        return {"by": "priors", "job": int(job) if job.isdigit() else job}
    via, _, user = requested_by.partition(" ")
    return {"by": "user", "via": via, "user": user or None}


def _pushed(series, instances: int, first_pushed: bool) -> dict:
    """The pushed part of a series: the sender is known when its first instance was pushed (the
    series row keeps the first instance's calling AE and address)."""
    return {"instances": instances, "calling_ae": series["calling_ae"] if first_pushed else None,
            "called_ae": series["called_ae"], "source_ip": series["source_ip"] if first_pushed else None,
            "first_at": series["first_at"], "last_at": series["last_at"]}


def series_origins(index: Index, study_uid: str) -> dict[str, dict]:
    """Where each series of a study came from, for the study view: {series_uid: {"retrieved": [per
    retrieve that brought instances of it: id, source, method, who asked, when it ended, how many],
    "pushed": {instances, calling AE, called AE, source IP, first/last arrival} or None, "arriving":
    [retrieves still running that may be bringing it]}}.

    Instances are attributed to a retrieve when it ends (RetrieveStore.finish), so while one runs
    the instances that arrived since it was queued are counted under ``unattributed`` with the
    running retrieve named, never shown as pushed. The calling AE is kept per series (from its first
    instance), not per instance: a series whose first instance was retrieved and that also holds
    pushed instances shows no calling AE."""
    c = index.conn()
    series = index.series_of_study(study_uid)
    # Per series, through the series index: the dashboard asks this for every study it shows.
    out = {s["series_uid"]: {"retrieved": [], "pushed": None, "arriving": [], "unattributed": 0} for s in series}
    try:
        active = c.execute(f"SELECT * FROM retrieves WHERE study_uid=? AND status IN ({','.join('?' * len(ACTIVE))}) "
                           "ORDER BY id", (study_uid, *ACTIVE)).fetchall()
    except sqlite3.OperationalError:  # no PACS tables in this index: everything was pushed
        return {s["series_uid"]: {**out[s["series_uid"]], "pushed": _pushed(s, s["instances"], True)} for s in series}
    for s in series:
        uid, o = s["series_uid"], out[s["series_uid"]]
        for r in c.execute(
                "SELECT r.id, r.requested_by, r.source, r.method, r.status, r.finished_at, COUNT(*) AS n "
                "FROM instances i JOIN retrieve_instances ri ON ri.sop_uid=i.sop_uid JOIN retrieves r "
                "ON r.id=ri.retrieve_id WHERE i.series_uid=? GROUP BY r.id ORDER BY r.id", (uid,)):
            o["retrieved"].append({"retrieve": r["id"], "source": r["source"], "method": r["method"],
                                   "status": r["status"], "requested_by": r["requested_by"],
                                   **who_asked(r["requested_by"]), "at": r["finished_at"], "instances": r["n"]})
        since = None
        for r in active:
            wanted = json.loads(r["series_json"]) if r["series_json"] else None
            if wanted is None or uid in wanted:
                o["arriving"].append({"retrieve": r["id"], "source": r["source"], "status": r["status"],
                                      "requested_by": r["requested_by"], **who_asked(r["requested_by"])})
                since = r["created_at"] if since is None else min(since, r["created_at"])
        if since is not None:  # what arrived since a running retrieve was queued may be its: said so
            o["unattributed"] = c.execute(
                "SELECT COUNT(*) FROM instances i WHERE i.series_uid=? AND i.received_at>=? AND NOT EXISTS "
                "(SELECT 1 FROM retrieve_instances ri WHERE ri.sop_uid=i.sop_uid)", (uid, since)).fetchone()[0]
        rest = s["instances"] - sum(r["instances"] for r in o["retrieved"]) - o["unattributed"]
        if rest > 0:
            # SQLite takes the bare column from the row holding the MIN: the series' first instance.
            first = c.execute("SELECT sop_uid, MIN(received_at) FROM instances WHERE series_uid=?", (uid,)).fetchone()
            first_pushed = first is None or c.execute("SELECT 1 FROM retrieve_instances WHERE sop_uid=?",
                                                      (first[0],)).fetchone() is None
            o["pushed"] = _pushed(s, rest, first_pushed)
    return out
