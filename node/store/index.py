"""The node's index: studies, series, instances, jobs, results, deliveries, tokens, users.

SQLite in WAL mode. Every SQL statement of the node lives in this module, behind the ``Index``
methods, so that a PostgreSQL backend for multi-node sites replaces this one file. Each thread
gets its own connection; SQLite serialises writers, ``busy_timeout`` absorbs contention.
Timestamps are persisted epoch seconds: stability decisions survive a restart.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE stats (key TEXT PRIMARY KEY, value INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE studies (
        study_uid TEXT PRIMARY KEY,
        patient_id TEXT, patient_name TEXT, study_date TEXT, accession TEXT, description TEXT,
        first_at REAL NOT NULL, last_at REAL NOT NULL,
        instances INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'receiving',   -- receiving | stable
        generation INTEGER NOT NULL DEFAULT 0,     -- bumped when instances arrive after routing
        stable_at REAL, force_complete INTEGER NOT NULL DEFAULT 0,
        routed_generation INTEGER NOT NULL DEFAULT -1  -- last generation the router has handled
    );
    CREATE INDEX studies_state ON studies(state, last_at);
    CREATE TABLE series (
        series_uid TEXT PRIMARY KEY,
        study_uid TEXT NOT NULL REFERENCES studies(study_uid),
        modality TEXT, description TEXT, number TEXT,
        header_json TEXT NOT NULL,                 -- DICOM JSON of the first instance, no bulk data
        calling_ae TEXT, called_ae TEXT, source_ip TEXT,
        first_at REAL NOT NULL, last_at REAL NOT NULL,
        instances INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'receiving',
        generation INTEGER NOT NULL DEFAULT 0,
        stable_at REAL
    );
    CREATE INDEX series_study ON series(study_uid);
    CREATE INDEX series_state ON series(state, last_at);
    CREATE TABLE instances (
        sop_uid TEXT PRIMARY KEY,
        series_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
        sop_class_uid TEXT, transfer_syntax TEXT,
        path TEXT NOT NULL, size INTEGER NOT NULL, received_at REAL NOT NULL
    );
    CREATE INDEX instances_series ON instances(series_uid);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_key TEXT NOT NULL UNIQUE,
        study_uid TEXT NOT NULL, series_uid TEXT, level TEXT NOT NULL,
        rule TEXT NOT NULL, handler TEXT NOT NULL, params_json TEXT NOT NULL,
        destinations_json TEXT NOT NULL, priority TEXT NOT NULL, timeout_s REAL,
        generation INTEGER NOT NULL,
        status TEXT NOT NULL,                      -- pending | running | done | failed | retrying
        progress REAL NOT NULL DEFAULT 0, message TEXT, error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        history_json TEXT NOT NULL DEFAULT '[]',
        created_at REAL NOT NULL, started_at REAL, finished_at REAL
    );
    CREATE INDEX jobs_status ON jobs(status, id);
    CREATE INDEX jobs_study ON jobs(study_uid);
    CREATE TABLE results (
        sop_uid TEXT PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        sop_class_uid TEXT NOT NULL, series_uid TEXT NOT NULL, modality TEXT NOT NULL,
        path TEXT NOT NULL
    );
    CREATE INDEX results_job ON results(job_id);
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,                        -- result | original
        job_id INTEGER, study_uid TEXT NOT NULL, sop_uid TEXT NOT NULL, path TEXT NOT NULL,
        destination TEXT NOT NULL,
        status TEXT NOT NULL,                      -- pending | delivered | failed
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL, last_error TEXT, delivered_at REAL,
        UNIQUE (kind, sop_uid, destination)
    );
    CREATE INDEX deliveries_due ON deliveries(status, next_at);
    CREATE TABLE tokens (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        token_hash TEXT NOT NULL UNIQUE, role TEXT NOT NULL, label TEXT, created_at REAL NOT NULL
    );
    """,
    # 2: console users (names, argon2 password hashes, roles)
    """
    CREATE TABLE users (
        name TEXT PRIMARY KEY, password_hash TEXT NOT NULL, role TEXT NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL
    );
    """,
    # 3: per-rule quiet periods: when to look at a study again for rules that wait longer
    """
    ALTER TABLE studies ADD COLUMN recheck_at REAL
    """,
    # 4: retention (what was deleted from the spool, when) and maintenance requests (key rotation)
    """
    ALTER TABLE instances ADD COLUMN purged_at REAL;
    ALTER TABLE results ADD COLUMN purged_at REAL;
    CREATE TABLE maintenance (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,                        -- rewrap
        requested_by TEXT NOT NULL, requested_at REAL NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',    -- pending | running | done | failed
        started_at REAL, finished_at REAL, detail TEXT
    )
    """,
    # 5: per-job options taken from the rule (what to do when a quality check fails)
    """
    ALTER TABLE jobs ADD COLUMN options_json TEXT NOT NULL DEFAULT '{}'
    """,
    # 6: rules that matched a study but wait for a longer quiet period (the study view shows them)
    """
    ALTER TABLE studies ADD COLUMN pending_json TEXT
    """,
    # 7: job attempts run by remote workers (Celery executor) and the workers themselves
    """
    CREATE TABLE job_attempts (
        job_id INTEGER NOT NULL REFERENCES jobs(id), attempt INTEGER NOT NULL,
        ticket_hash TEXT NOT NULL,                 -- the attempt's secret ticket (hashed), carried by the task
        task_id TEXT NOT NULL, queue TEXT NOT NULL,
        state TEXT NOT NULL,                       -- queued | claimed | done | failed | timeout | lost
        worker TEXT, dispatched_at REAL NOT NULL, claimed_at REAL, heartbeat_at REAL, ended_at REAL,
        missing INTEGER NOT NULL DEFAULT 0,        -- reconciler passes in a row not finding the task in the broker
        PRIMARY KEY (job_id, attempt)
    );
    CREATE INDEX job_attempts_state ON job_attempts(state);
    CREATE TABLE workers (
        name TEXT PRIMARY KEY, host TEXT NOT NULL, queues TEXT NOT NULL, current_job INTEGER, pid INTEGER,
        started_at REAL NOT NULL, last_seen REAL NOT NULL
    )
    """,
    # 8: why a stable study made no jobs although it was looked at (a prior fetched for another
    # study's job is that job's context, not routed): the study view says so
    """
    ALTER TABLE studies ADD COLUMN route_note TEXT
    """,
    # 9: what a remote worker's claim announced (the instances of its inputs and priors), so that
    # /inputs and /priors stream exactly that, also after a restart of the node
    """
    ALTER TABLE job_attempts ADD COLUMN announced_json TEXT
    """,
]

TERMINAL_JOB = ("done", "failed")


@dataclass(frozen=True)
class InstanceRow:
    sop_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    size: int
    received_at: float
    header_json: str  # stored on the series row when this is its first instance
    modality: str
    series_description: str
    series_number: str
    patient_id: str
    patient_name: str
    study_date: str
    accession: str
    study_description: str
    calling_ae: str
    called_ae: str
    source_ip: str


class Index:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._local = threading.local()
        self.migrate()

    # -- connections -----------------------------------------------------------------------
    def conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            c.row_factory = sqlite3.Row
            c.execute("PRAGMA journal_mode=WAL")
            # FULL for jobs, deliveries, users…; the ingest writer's connection lowers it for instance
            # rows, which the spool log can rebuild (node/receive/ingest.py).
            c.execute("PRAGMA synchronous=FULL")
            c.execute("PRAGMA foreign_keys=ON")
            self._local.conn = c
        return c

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    def tx(self, immediate: bool = False) -> "_Tx":
        return _Tx(self.conn(), immediate)

    @contextmanager
    def relaxed(self) -> Iterator[sqlite3.Connection]:
        """Commits in this block are not synced (WAL, synchronous=NORMAL): they survive the process
        dying, and a power cut may lose them. Only for state that is redone or recounted when lost
        (a running retrieve's claim and progress: a retrieve found running or queued at start-up is
        run again); everything acknowledged to someone stays FULL. Each sync is 4 ms or more here."""
        c = self.conn()
        level = c.execute("PRAGMA synchronous").fetchone()[0]
        c.execute("PRAGMA synchronous=NORMAL")
        try:
            yield c
        finally:
            c.execute(f"PRAGMA synchronous={int(level)}")

    def migrate(self) -> None:
        c = self.conn()
        version = c.execute("PRAGMA user_version").fetchone()[0]
        for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.tx():
                for stmt in script.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                c.execute(f"PRAGMA user_version={i}")

    # -- stats ----------------------------------------------------------------------------
    def bump(self, key: str, n: int = 1) -> None:
        self.conn().execute(
            "INSERT INTO stats(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = value + ?",
            (key, n, n),
        )

    def stat(self, key: str) -> int:
        row = self.conn().execute("SELECT value FROM stats WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    # -- ingest ---------------------------------------------------------------------------
    def has_instance(self, sop_uid: str) -> bool:
        """True if the instance is held (a copy deleted by retention does not count)."""
        return self.conn().execute("SELECT 1 FROM instances WHERE sop_uid=? AND purged_at IS NULL",
                                   (sop_uid,)).fetchone() is not None

    def instance_state(self, sop_uid: str) -> str | None:
        """"held", "purged" (retention deleted our copy) or None (never stored): one query, for
        ingest, which asks this of every instance it receives."""
        row = self.conn().execute("SELECT purged_at IS NULL FROM instances WHERE sop_uid=?", (sop_uid,)).fetchone()
        return None if row is None else ("held" if row[0] else "purged")

    def forget_purged(self, sop_uid: str) -> bool:
        """Drop the row of an instance whose spooled copy retention deleted, so that the same instance
        sent again is stored and routed like a late arrival. False if there was none."""
        c = self.conn()
        purged = "SELECT series_uid, study_uid FROM instances WHERE sop_uid=? AND purged_at IS NOT NULL"
        if c.execute(purged, (sop_uid,)).fetchone() is None:  # the common case: no write lock taken
            return False
        with self.tx(immediate=True):
            row = c.execute(purged, (sop_uid,)).fetchone()
            if row is None:
                return False
            c.execute("DELETE FROM instances WHERE sop_uid=?", (sop_uid,))
            c.execute("UPDATE series SET instances=instances-1 WHERE series_uid=?", (row[0],))
            c.execute("UPDATE studies SET instances=instances-1 WHERE study_uid=?", (row[1],))
        return True

    def add_instances(self, rows: Iterable[InstanceRow]) -> list[bool]:
        """Insert a batch in ONE transaction (group commit). Returns, per row, False for a duplicate."""
        out = []
        c = self.conn()
        with self.tx():
            for r in rows:
                cur = c.execute(
                    "INSERT OR IGNORE INTO instances(sop_uid, series_uid, study_uid, sop_class_uid, transfer_syntax, "
                    "path, size, received_at) VALUES (?,?,?,?,?,?,?,?)",
                    (r.sop_uid, r.series_uid, r.study_uid, r.sop_class_uid, r.transfer_syntax, r.path, r.size,
                     r.received_at),
                )
                if cur.rowcount == 0:
                    out.append(False)
                    c.execute(
                        "INSERT INTO stats(key, value) VALUES ('duplicates', 1) "
                        "ON CONFLICT(key) DO UPDATE SET value = value + 1"
                    )
                    continue
                out.append(True)
                # A late instance re-opens a stable study/series: a new generation will be routed.
                c.execute(
                    """INSERT INTO studies(study_uid, patient_id, patient_name, study_date, accession, description,
                                           first_at, last_at, instances)
                       VALUES (?,?,?,?,?,?,?,?,1)
                       ON CONFLICT(study_uid) DO UPDATE SET last_at=excluded.last_at, instances=instances+1,
                           generation = generation + (state='stable'), state='receiving', force_complete=0""",
                    (r.study_uid, r.patient_id, r.patient_name, r.study_date, r.accession, r.study_description,
                     r.received_at, r.received_at),
                )
                c.execute(
                    """INSERT INTO series(series_uid, study_uid, modality, description, number, header_json,
                                          calling_ae, called_ae, source_ip, first_at, last_at, instances)
                       VALUES (?,?,?,?,?,?,?,?,?,?,?,1)
                       ON CONFLICT(series_uid) DO UPDATE SET last_at=excluded.last_at, instances=instances+1,
                           generation = generation + (state='stable'), state='receiving'""",
                    (r.series_uid, r.study_uid, r.modality, r.series_description, r.series_number, r.header_json,
                     r.calling_ae, r.called_ae, r.source_ip, r.received_at, r.received_at),
                )
        return out

    def instance_paths(self, series_uid: str) -> list[str]:
        """Locators of the series' instances still in the spool."""
        rows = self.conn().execute(
            "SELECT path FROM instances WHERE series_uid=? AND purged_at IS NULL ORDER BY sop_uid", (series_uid,))
        return [r[0] for r in rows]

    def instance_uids(self, series_uid: str) -> list[str]:
        """SOP Instance UIDs of the series' instances still in the spool (those a job on it reads)."""
        rows = self.conn().execute(
            "SELECT sop_uid FROM instances WHERE series_uid=? AND purged_at IS NULL ORDER BY sop_uid", (series_uid,))
        return [r[0] for r in rows]

    def purged_in_series(self, series_uid: str) -> int:
        row = self.conn().execute(
            "SELECT count(*) FROM instances WHERE series_uid=? AND purged_at IS NOT NULL", (series_uid,)).fetchone()
        return int(row[0])

    def log_locators(self) -> set[str]:
        """Every spool-log locator the index references (purged ones included: their records are gone)."""
        return {r[0] for r in self.conn().execute("SELECT path FROM instances WHERE path LIKE 'log:%'")}

    def instances_of_study(self, study_uid: str) -> list[sqlite3.Row]:
        return self.conn().execute("SELECT * FROM instances WHERE study_uid=?", (study_uid,)).fetchall()

    # -- stability ------------------------------------------------------------------------
    def due_studies(self, now: float, stable_after: float) -> list[sqlite3.Row]:
        return self.conn().execute(
            "SELECT * FROM studies WHERE state='receiving' AND (last_at <= ? OR force_complete=1)",
            (now - stable_after,),
        ).fetchall()

    def next_routing_at(self, stable_after: float) -> float | None:
        """When the router next has something to do: the earliest receiving study's quiet period
        ends, or a study's re-check for a slower rule is due (None: nothing waits)."""
        c = self.conn()
        quiet = c.execute("SELECT MIN(last_at) FROM studies WHERE state='receiving'").fetchone()[0]
        recheck = c.execute("SELECT MIN(recheck_at) FROM studies WHERE state='stable' "
                            "AND routed_generation < generation").fetchone()[0]
        due = [t for t in (None if quiet is None else quiet + stable_after, recheck) if t is not None]
        return min(due) if due else None

    def mark_stable(self, study_uid: str, generation: int, now: float) -> bool:
        """Mark a study and its series stable, unless an instance arrived meanwhile (generation changed)."""
        c = self.conn()
        with self.tx():
            cur = c.execute(
                "UPDATE studies SET state='stable', stable_at=? WHERE study_uid=? AND state='receiving' "
                "AND generation=?",
                (now, study_uid, generation),
            )
            if cur.rowcount == 0:
                return False
            c.execute("UPDATE series SET state='stable', stable_at=? WHERE study_uid=? AND state='receiving'",
                      (now, study_uid))
        return True

    def unrouted_studies(self, now: float) -> list[sqlite3.Row]:
        return self.conn().execute(
            "SELECT * FROM studies WHERE state='stable' AND routed_generation < generation "
            "AND (recheck_at IS NULL OR recheck_at <= ? OR force_complete=1)", (now,)
        ).fetchall()

    def recheck_later(self, study_uid: str, at: float, pending: list[dict] = ()) -> None:
        """Route the study again at ``at``; ``pending``: the matched rules still waiting (rule,
        handler, series_uid, stable_after), for the study view."""
        self.conn().execute("UPDATE studies SET recheck_at=?, pending_json=? WHERE study_uid=?",
                            (at, json.dumps(list(pending)) if pending else None, study_uid))

    def mark_routed(self, study_uid: str, generation: int, note: str | None = None) -> None:
        """``note``: why routing made no jobs where one would expect them (the study view shows it)."""
        self.conn().execute("UPDATE studies SET routed_generation=?, recheck_at=NULL, pending_json=NULL, "
                            "route_note=? WHERE study_uid=? AND routed_generation < ?",
                            (generation, note, study_uid, generation))

    def force_complete(self, study_uid: str) -> bool:
        cur = self.conn().execute("UPDATE studies SET force_complete=1 WHERE study_uid=?", (study_uid,))
        return cur.rowcount > 0

    def study(self, study_uid: str) -> sqlite3.Row | None:
        return self.conn().execute("SELECT * FROM studies WHERE study_uid=?", (study_uid,)).fetchone()

    def studies(self, limit: int, offset: int) -> list[sqlite3.Row]:
        return self.conn().execute(
            "SELECT * FROM studies ORDER BY last_at DESC LIMIT ? OFFSET ?", (limit, offset)
        ).fetchall()

    def count_studies(self) -> int:
        return self.conn().execute("SELECT COUNT(*) FROM studies").fetchone()[0]

    def series_of_study(self, study_uid: str) -> list[sqlite3.Row]:
        return self.conn().execute(
            "SELECT * FROM series WHERE study_uid=? ORDER BY first_at", (study_uid,)
        ).fetchall()

    def series_of_complete_studies(self) -> Iterator[sqlite3.Row]:
        """Every series of the studies that have completed (state stable), study by study."""
        yield from self.conn().execute(
            "SELECT s.* FROM series s JOIN studies t ON t.study_uid = s.study_uid WHERE t.state = 'stable' "
            "ORDER BY s.study_uid, s.first_at")

    def all_series(self, since: float = 0.0) -> Iterator[sqlite3.Row]:
        yield from self.conn().execute("SELECT * FROM series WHERE first_at >= ? ORDER BY first_at", (since,))

    # -- jobs -----------------------------------------------------------------------------
    def add_job(self, *, job_key: str, study_uid: str, series_uid: str | None, level: str, rule: str,
                handler: str, params: dict, destinations: list[str], priority: str, timeout_s: float | None,
                generation: int, note: str, options: dict | None = None) -> int | None:
        """Create a job unless one with the same key exists (idempotent routing). Returns its id or None."""
        now = time.time()
        cur = self.conn().execute(
            """INSERT OR IGNORE INTO jobs(job_key, study_uid, series_uid, level, rule, handler, params_json,
                   destinations_json, priority, timeout_s, generation, status, history_json, created_at,
                   options_json)
               VALUES (?,?,?,?,?,?,?,?,?,?,?,'pending',?,?,?)""",
            (job_key, study_uid, series_uid, level, rule, handler, json.dumps(params), json.dumps(destinations),
             priority, timeout_s, generation, json.dumps([{"at": now, "event": "created", "note": note}]), now,
             json.dumps(options or {}, sort_keys=True)),
        )
        return cur.lastrowid if cur.rowcount else None

    def claim_job(self) -> sqlite3.Row | None:
        """Atomically take the next pending job (urgent first, then FIFO)."""
        c = self.conn()
        with self.tx(immediate=True):
            row = c.execute(
                """SELECT * FROM jobs WHERE status IN ('pending', 'retrying')
                   ORDER BY CASE priority WHEN 'urgent' THEN 0 WHEN 'normal' THEN 1 ELSE 2 END, id LIMIT 1"""
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE jobs SET status='running', started_at=?, attempts=attempts+1, progress=0, message=NULL "
                "WHERE id=?",
                (time.time(), row["id"]),
            )
        return self.job(row["id"])

    def job(self, job_id: int) -> sqlite3.Row | None:
        return self.conn().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()

    def jobs(self, status: str | None = None, study_uid: str | None = None, limit: int = 200) -> list[sqlite3.Row]:
        q, args = "SELECT * FROM jobs WHERE 1=1", []
        if status:
            q += " AND status=?"
            args.append(status)
        if study_uid:
            q += " AND study_uid=?"
            args.append(study_uid)
        q += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return self.conn().execute(q, args).fetchall()

    def count_jobs(self, statuses: tuple[str, ...]) -> int:
        marks = ",".join("?" * len(statuses))
        return self.conn().execute(f"SELECT COUNT(*) FROM jobs WHERE status IN ({marks})", statuses).fetchone()[0]

    def job_progress(self, job_id: int, fraction: float, message: str) -> None:
        self.conn().execute("UPDATE jobs SET progress=?, message=? WHERE id=?", (fraction, message[:500], job_id))

    def _history(self, job_id: int, event: dict) -> str:
        row = self.conn().execute("SELECT history_json FROM jobs WHERE id=?", (job_id,)).fetchone()
        hist = json.loads(row[0]) if row else []
        hist.append({"at": time.time(), **event})
        return json.dumps(hist)

    def _insert_results(self, job_id: int, study_uid: str, results: list[dict],
                        deliveries: list[tuple[str, str]], now: float) -> None:
        c = self.conn()
        for r in results:
            c.execute(
                "INSERT OR REPLACE INTO results(sop_uid, job_id, sop_class_uid, series_uid, modality, path) "
                "VALUES (?,?,?,?,?,?)",
                (r["sop_instance_uid"], job_id, r["sop_class_uid"], r["series_instance_uid"], r["modality"],
                 r["path"]),
            )
        paths = {r["sop_instance_uid"]: r["path"] for r in results}
        for sop_uid, dest in deliveries:
            c.execute(
                """INSERT INTO deliveries(kind, job_id, study_uid, sop_uid, path, destination, status, next_at)
                   VALUES ('result', ?, ?, ?, ?, ?, 'pending', ?)
                   ON CONFLICT(kind, sop_uid, destination) DO UPDATE SET status='pending', attempts=0,
                       next_at=excluded.next_at, path=excluded.path, job_id=excluded.job_id""",
                (job_id, study_uid, sop_uid, paths[sop_uid], dest, now),
            )

    def add_results(self, job_id: int, results: list[dict], deliveries: list[tuple[str, str]]) -> None:
        """Record result objects of a running job and their deliveries, due now: a result is
        delivered as soon as it is durable, while the job encodes its next one."""
        with self.tx(immediate=True):
            self._insert_results(job_id, self.job(job_id)["study_uid"], results, deliveries, time.time())

    def finish_job(self, job_id: int, results: list[dict], deliveries: list[tuple[str, str]],
                   provenance: dict | None = None, figures: dict | None = None) -> None:
        """Record results and their deliveries and mark the job done, in one transaction.

        ``deliveries`` is [(sop_uid, destination)] for the results not yet handed to delivery by
        ``add_results`` (recording a result again is harmless; re-queuing its delivery is not).
        ``figures``: the worker's seconds per phase and peak memory, kept in the history.
        """
        c = self.conn()
        now = time.time()
        with self.tx(immediate=True):
            job = self.job(job_id)
            self._insert_results(job_id, job["study_uid"], results, deliveries, now)
            event = {"event": "done", "results": len(results), **({"provenance": provenance} if provenance else {}),
                     **({"figures": figures} if figures else {})}
            c.execute(
                "UPDATE jobs SET status='done', progress=1, finished_at=?, error=NULL, history_json=? WHERE id=?",
                (now, self._history(job_id, event), job_id),
            )

    def note_job(self, job_id: int, event: dict) -> None:
        """Append an event to a job's history (e.g. the model version a worker resolved for it)."""
        c = self.conn()
        with self.tx(immediate=True):
            c.execute("UPDATE jobs SET history_json=? WHERE id=?", (self._history(job_id, event), job_id))

    def fail_job(self, job_id: int, error: str, partial: list[dict] = ()) -> None:
        """``partial``: result objects this run already handed to delivery before it failed; the
        history lists them, so an incomplete set is documented, never silent."""
        c = self.conn()
        event = {"event": "failed", "error": error[:4000]}
        if partial:
            event["partial_results"] = [{"sop_uid": r["sop_instance_uid"], "modality": r["modality"]} for r in partial]
        with self.tx(immediate=True):
            c.execute(
                "UPDATE jobs SET status='failed', finished_at=?, error=?, history_json=? WHERE id=?",
                (time.time(), error[:4000], self._history(job_id, event), job_id),
            )

    def retry_job(self, job_id: int, who: str) -> bool:
        c = self.conn()
        with self.tx(immediate=True):
            row = self.job(job_id)
            if row is None or row["status"] not in TERMINAL_JOB:
                return False
            c.execute(
                "UPDATE jobs SET status='retrying', error=NULL, history_json=? WHERE id=?",
                (self._history(job_id, {"event": "retry", "by": who}), job_id),
            )
        return True

    def requeue_running(self) -> int:
        """Jobs that were running when the node died go back to the queue."""
        c = self.conn()
        with self.tx(immediate=True):
            rows = c.execute("SELECT id FROM jobs WHERE status='running'").fetchall()
            for r in rows:
                c.execute(
                    "UPDATE jobs SET status='retrying', history_json=? WHERE id=?",
                    (self._history(r[0], {"event": "requeued after restart"}), r[0]),
                )
        return len(rows)

    def results_of_job(self, job_id: int) -> list[sqlite3.Row]:
        return self.conn().execute("SELECT * FROM results WHERE job_id=? ORDER BY sop_uid", (job_id,)).fetchall()

    # -- remote attempts (Celery executor) ---------------------------------------------------
    def add_attempt(self, job_id: int, attempt: int, ticket_hash: str, task_id: str, queue: str) -> None:
        """Record a dispatched attempt; a re-published one (its task lost) replaces its ticket."""
        self.conn().execute(
            """INSERT INTO job_attempts(job_id, attempt, ticket_hash, task_id, queue, state, dispatched_at)
               VALUES (?,?,?,?,?,'queued',?)
               ON CONFLICT(job_id, attempt) DO UPDATE SET ticket_hash=excluded.ticket_hash, task_id=excluded.task_id,
                   queue=excluded.queue, dispatched_at=excluded.dispatched_at, missing=0
               WHERE job_attempts.state='queued'""",
            (job_id, attempt, ticket_hash, task_id, queue, time.time()))

    def claim_attempt(self, job_id: int, ticket_hash: str, worker: str) -> str:
        """A worker takes the attempt its task names: 'ok', or why not ('unknown' ticket, 'stale' attempt
        the node has moved past, 'taken' by a worker already)."""
        c = self.conn()
        with self.tx(immediate=True):
            a = c.execute("SELECT * FROM job_attempts WHERE job_id=? AND ticket_hash=?", (job_id, ticket_hash)).fetchone()
            if a is None:
                return "unknown"
            job = self.job(job_id)
            if a["state"] == "claimed":
                return "taken"
            if a["state"] != "queued" or job["status"] != "running" or job["attempts"] != a["attempt"]:
                return "stale"
            now = time.time()
            c.execute("UPDATE job_attempts SET state='claimed', worker=?, claimed_at=?, heartbeat_at=? "
                      "WHERE job_id=? AND attempt=?", (worker, now, now, job_id, a["attempt"]))
            c.execute("UPDATE jobs SET message=?, history_json=? WHERE id=?",
                      (f"running on {worker}"[:500],
                       self._history(job_id, {"event": "started", "attempt": a["attempt"], "worker": worker}), job_id))
        return "ok"

    def live_attempt(self, job_id: int, ticket_hash: str) -> sqlite3.Row | None:
        """The attempt this ticket names, if it is the job's current one and a worker holds it."""
        return self.conn().execute(
            """SELECT a.* FROM job_attempts a JOIN jobs j ON j.id = a.job_id
               WHERE a.job_id=? AND a.ticket_hash=? AND a.state='claimed' AND j.status='running'
                 AND j.attempts = a.attempt""", (job_id, ticket_hash)).fetchone()

    def attempt_heartbeat(self, job_id: int, attempt: int) -> None:
        self.conn().execute("UPDATE job_attempts SET heartbeat_at=? WHERE job_id=? AND attempt=? AND state='claimed'",
                            (time.time(), job_id, attempt))

    def end_attempt(self, job_id: int, attempt: int, state: str) -> bool:
        """Close a claimed attempt (done | failed | timeout); False if it was no longer open (one result set per
        attempt: a second 'done' for it, or one after the node gave it up, is refused)."""
        return self.conn().execute(
            "UPDATE job_attempts SET state=?, ended_at=? WHERE job_id=? AND attempt=? AND state='claimed'",
            (state, time.time(), job_id, attempt)).rowcount == 1

    def announce(self, job_id: int, attempt: int, frames: dict) -> None:
        """Record what an attempt's claim announced: {"inputs": [[pos, locator], ...], "priors": [...]}."""
        self.conn().execute("UPDATE job_attempts SET announced_json=? WHERE job_id=? AND attempt=?",
                            (json.dumps(frames), job_id, attempt))

    def announced(self, job_id: int, attempt: int) -> dict | None:
        row = self.conn().execute("SELECT announced_json FROM job_attempts WHERE job_id=? AND attempt=?",
                                  (job_id, attempt)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def expire_queued_attempt(self, job_id: int, attempt: int) -> bool:
        """Close an attempt no worker claimed (state 'timeout'); False if a worker claimed it meanwhile
        (a claim needs it 'queued', so exactly one of the two wins)."""
        return self.conn().execute(
            "UPDATE job_attempts SET state='timeout', ended_at=? WHERE job_id=? AND attempt=? AND state='queued'",
            (time.time(), job_id, attempt)).rowcount == 1

    def open_attempts(self) -> list[sqlite3.Row]:
        """Current attempts of running jobs still queued or claimed, with their job's timeout."""
        return self.conn().execute(
            """SELECT a.*, j.timeout_s FROM job_attempts a JOIN jobs j ON j.id = a.job_id
               WHERE a.state IN ('queued', 'claimed') AND j.status='running' AND j.attempts = a.attempt""").fetchall()

    def jobs_running_without_attempt(self) -> list[int]:
        """Running jobs whose current attempt was never dispatched (the node stopped in between, or the
        executor changed from local)."""
        return [r[0] for r in self.conn().execute(
            """SELECT j.id FROM jobs j WHERE j.status='running' AND NOT EXISTS (
                   SELECT 1 FROM job_attempts a WHERE a.job_id = j.id AND a.attempt = j.attempts
                   AND a.state IN ('queued', 'claimed'))""")]

    def attempt_missing(self, job_id: int, attempt: int, missing: int) -> None:
        self.conn().execute("UPDATE job_attempts SET missing=? WHERE job_id=? AND attempt=?", (missing, job_id, attempt))

    def job_note(self, job_id: int, event: dict) -> None:
        c = self.conn()
        with self.tx(immediate=True):
            c.execute("UPDATE jobs SET history_json=? WHERE id=?", (self._history(job_id, event), job_id))

    def requeue_job(self, job_id: int, event: dict) -> None:
        """A running job goes back to the queue (a new attempt), with why in its history."""
        c = self.conn()
        with self.tx(immediate=True):
            c.execute("UPDATE jobs SET status='retrying', message=NULL, history_json=? WHERE id=? AND status='running'",
                      (self._history(job_id, event), job_id))

    def lose_attempt(self, job_id: int, attempt: int, reason: str, max_attempts: int) -> str:
        """The worker of a claimed attempt is gone: the job runs again ('requeued'), or fails once
        ``max_attempts`` attempts were lost ('failed')."""
        c = self.conn()
        now = time.time()
        with self.tx(immediate=True):
            a = c.execute("SELECT * FROM job_attempts WHERE job_id=? AND attempt=? AND state IN ('queued','claimed')",
                          (job_id, attempt)).fetchone()
            if a is None:
                return "closed"
            c.execute("UPDATE job_attempts SET state='lost', ended_at=? WHERE job_id=? AND attempt=?",
                      (now, job_id, attempt))
            lost = c.execute("SELECT count(*) FROM job_attempts WHERE job_id=? AND state='lost'", (job_id,)).fetchone()[0]
            event = {"event": "attempt lost", "attempt": attempt, "worker": a["worker"], "reason": reason}
            if lost >= max_attempts:
                error = f"attempts exhausted: {lost} attempt(s) lost with their worker (last: {reason})"
                c.execute("UPDATE jobs SET status='failed', finished_at=?, error=?, history_json=? WHERE id=?",
                          (now, error, self._history(job_id, {**event, "then": "failed"}), job_id))
                return "failed"
            c.execute("UPDATE jobs SET status='retrying', message=NULL, history_json=? WHERE id=? AND status='running'",
                      (self._history(job_id, event), job_id))
        return "requeued"

    def refresh_claimed(self) -> int:
        """At start: running attempts get a fresh heartbeat, so a worker that kept going while the node was
        down is not taken for lost before it can report again."""
        return self.conn().execute("UPDATE job_attempts SET heartbeat_at=? WHERE state='claimed'",
                                   (time.time(),)).rowcount

    def attempts_of_job(self, job_id: int) -> list[sqlite3.Row]:
        return self.conn().execute("SELECT * FROM job_attempts WHERE job_id=? ORDER BY attempt", (job_id,)).fetchall()

    def worker_seen(self, name: str, host: str, queues: list[str], current_job: int | None, pid: int | None) -> None:
        now = time.time()
        self.conn().execute(
            """INSERT INTO workers(name, host, queues, current_job, pid, started_at, last_seen) VALUES (?,?,?,?,?,?,?)
               ON CONFLICT(name) DO UPDATE SET host=excluded.host, queues=excluded.queues,
                   current_job=excluded.current_job, pid=excluded.pid, last_seen=excluded.last_seen""",
            (name, host, json.dumps(queues), current_job, pid, now, now))

    def workers(self) -> list[sqlite3.Row]:
        return self.conn().execute("SELECT * FROM workers ORDER BY name").fetchall()

    # -- deliveries -----------------------------------------------------------------------
    def add_original_deliveries(self, study_uid: str, series_uid: str, destinations: list[str]) -> int:
        now = time.time()
        c = self.conn()
        n = 0
        with self.tx(immediate=True):
            for dest in destinations:
                cur = c.execute(
                    """INSERT OR IGNORE INTO deliveries(kind, study_uid, sop_uid, path, destination, status, next_at)
                       SELECT 'original', study_uid, sop_uid, path, ?, 'pending', ? FROM instances
                       WHERE series_uid=?""",
                    (dest, now, series_uid),
                )
                n += cur.rowcount
        return n

    def due_deliveries(self, now: float, limit: int = 500) -> list[sqlite3.Row]:
        return self.conn().execute(
            # Results first: they are what a radiologist or a TPS is waiting for; originals are a copy.
            "SELECT * FROM deliveries WHERE status='pending' AND next_at <= ? "
            "ORDER BY kind = 'original', next_at, id LIMIT ?",
            (now, limit),
        ).fetchall()

    def next_delivery_at(self, after: float | None = None) -> float | None:
        """When the next pending delivery is due (``after``: the first due later than that)."""
        if after is None:
            return self.conn().execute("SELECT MIN(next_at) FROM deliveries WHERE status='pending'").fetchone()[0]
        return self.conn().execute("SELECT MIN(next_at) FROM deliveries WHERE status='pending' AND next_at > ?",
                                   (after,)).fetchone()[0]

    def delivered(self, ids: list[int]) -> None:
        now = time.time()
        with self.tx():
            self.conn().executemany(
                "UPDATE deliveries SET status='delivered', delivered_at=?, last_error=NULL, attempts=attempts+1 "
                "WHERE id=?",
                [(now, i) for i in ids],
            )

    def delivery_failed(self, ids: list[int], error: str, max_attempts: int, backoff: float, backoff_max: float) -> None:
        """Schedule a retry with exponential backoff, or mark failed after the last attempt."""
        now = time.time()
        c = self.conn()
        with self.tx():
            for i in ids:
                row = c.execute("SELECT attempts FROM deliveries WHERE id=?", (i,)).fetchone()
                attempts = row[0] + 1
                if attempts >= max_attempts:
                    c.execute("UPDATE deliveries SET status='failed', attempts=?, last_error=? WHERE id=?",
                              (attempts, error[:2000], i))
                else:
                    delay = min(backoff_max, backoff * 2 ** (attempts - 1))
                    c.execute("UPDATE deliveries SET attempts=?, last_error=?, next_at=? WHERE id=?",
                              (attempts, error[:2000], now + delay, i))

    def retry_deliveries(self, *, job_id: int | None = None, delivery_id: int | None = None) -> int:
        q = "UPDATE deliveries SET status='pending', attempts=0, next_at=? WHERE status='failed'"
        args: list[Any] = [time.time()]
        if job_id is not None:
            q += " AND job_id=?"
            args.append(job_id)
        if delivery_id is not None:
            q += " AND id=?"
            args.append(delivery_id)
        return self.conn().execute(q, args).rowcount

    def deliveries_of_job(self, job_id: int) -> list[sqlite3.Row]:
        return self.conn().execute("SELECT * FROM deliveries WHERE job_id=?", (job_id,)).fetchall()

    def deliveries(self, status: str | None = None, limit: int = 200) -> list[sqlite3.Row]:
        q, args = "SELECT * FROM deliveries", []
        if status:
            q += " WHERE status=?"
            args.append(status)
        q += " ORDER BY id DESC LIMIT ?"
        return self.conn().execute(q, (*args, limit)).fetchall()

    def delivery(self, delivery_id: int) -> sqlite3.Row | None:
        return self.conn().execute("SELECT * FROM deliveries WHERE id=?", (delivery_id,)).fetchone()

    def throughput(self, since: float) -> dict[str, int]:
        """What the node did since ``since`` (epoch seconds), for the dashboard."""
        c = self.conn()
        one = lambda q: c.execute(q, (since,)).fetchone()[0]  # noqa: E731
        return {
            "instances_received": one("SELECT COUNT(*) FROM instances WHERE received_at >= ?"),
            "jobs_done": one("SELECT COUNT(*) FROM jobs WHERE status='done' AND finished_at >= ?"),
            "jobs_failed": one("SELECT COUNT(*) FROM jobs WHERE status='failed' AND finished_at >= ?"),
            "deliveries_done": one("SELECT COUNT(*) FROM deliveries WHERE status='delivered' AND delivered_at >= ?"),
        }

    def count_deliveries(self, status: str) -> int:
        return self.conn().execute("SELECT COUNT(*) FROM deliveries WHERE status=?", (status,)).fetchone()[0]

    # -- tokens ---------------------------------------------------------------------------
    def add_token(self, token_hash: str, role: str, label: str | None) -> int:
        return self.conn().execute(
            "INSERT INTO tokens(token_hash, role, label, created_at) VALUES (?,?,?,?)",
            (token_hash, role, label, time.time()),
        ).lastrowid

    def token_role(self, token_hash: str) -> str | None:
        row = self.conn().execute("SELECT role FROM tokens WHERE token_hash=?", (token_hash,)).fetchone()
        return row[0] if row else None

    # -- console users --------------------------------------------------------------------
    def set_user(self, name: str, password_hash: str, role: str) -> bool:
        """Create the user or replace its password and role; True when it was created."""
        now = time.time()
        with self.tx(immediate=True):
            existed = self.user(name) is not None
            self.conn().execute(
                """INSERT INTO users(name, password_hash, role, created_at, updated_at) VALUES (?,?,?,?,?)
                   ON CONFLICT(name) DO UPDATE SET password_hash=excluded.password_hash, role=excluded.role,
                       updated_at=excluded.updated_at""",
                (name, password_hash, role, now, now),
            )
        return not existed

    def user(self, name: str) -> sqlite3.Row | None:
        return self.conn().execute("SELECT * FROM users WHERE name=?", (name,)).fetchone()

    def update_password_hash(self, name: str, password_hash: str) -> None:
        self.conn().execute("UPDATE users SET password_hash=?, updated_at=? WHERE name=?",
                            (password_hash, time.time(), name))

    def delete_user(self, name: str) -> bool:
        return self.conn().execute("DELETE FROM users WHERE name=?", (name,)).rowcount > 0

    def users(self) -> list[sqlite3.Row]:
        return self.conn().execute("SELECT name, role, created_at, updated_at FROM users ORDER BY name").fetchall()

    # -- retention ------------------------------------------------------------------------
    @staticmethod
    def _purgeable_sql(require_archive: bool, priors: bool) -> str:
        """1 when an instance's spooled copy may go (see ``purgeable_segments``).

        A study's originals are still needed while any of its jobs is not terminal (pending, running,
        retrying, waiting-for-priors, ...), while a result of its jobs is not delivered (pending, or
        failed: an admin may retry it, and a retried job re-reads the originals), and while it is a
        chosen prior of a non-terminal job of another study (that job reads it when it runs). The
        study-level blocks are one uncorrelated subquery, which SQLite evaluates once per statement
        (not once per instance). Original deliveries are checked per instance below: a segment goes
        only when every one of its instances passes, so that covers the study's originals too."""
        terminal = ",".join(f"'{s}'" for s in TERMINAL_JOB)
        prior_of = (f"""UNION SELECT json_extract(p.value, '$.study_uid') FROM prior_waits w
                        JOIN jobs pj ON pj.id = w.job_id, json_each(w.chosen_json) p
                        WHERE pj.status NOT IN ({terminal}) AND json_extract(p.value, '$.study_uid') IS NOT NULL"""
                    if priors else "")
        return f"""(i.purged_at IS NULL
            AND i.study_uid NOT IN (
                SELECT study_uid FROM jobs WHERE status NOT IN ({terminal})
                UNION SELECT study_uid FROM deliveries WHERE kind='result' AND status != 'delivered'
                {prior_of})
            AND EXISTS (SELECT 1 FROM studies s WHERE s.study_uid = i.study_uid AND s.state = 'stable'
                        AND s.routed_generation >= s.generation AND s.recheck_at IS NULL)
            AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.kind='original' AND d.sop_uid=i.sop_uid
                            AND (d.status != 'delivered' OR d.delivered_at > :cut))
            AND {"EXISTS (SELECT 1 FROM deliveries d WHERE d.kind='original' AND d.sop_uid=i.sop_uid "
                 "AND d.destination='orthanc')" if require_archive else "i.received_at <= :cut"})"""

    def _has_priors_table(self) -> bool:
        """prior_waits is created by RetrieveStore (node/store/retrieves.py), only where PACS is used."""
        return self.conn().execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='prior_waits'").fetchone() is not None

    def purgeable_segments(self, cutoff: float, require_archive: bool) -> dict[int, list[str]]:
        """Log segments every referenced instance of which may go: its study routed and idle (no job
        that is not done or failed, no result undelivered, not a prior another study's job waits for,
        no rule still waiting), every original delivery done at or before ``cutoff`` and the archive
        among them (or, without archive delivery, received before it). Returns {segment: [sop_uid, …]}."""
        rows = self.conn().execute(
            f"SELECT i.sop_uid, i.path, {self._purgeable_sql(require_archive, self._has_priors_table())} AS ok "
            "FROM instances i WHERE i.path LIKE 'log:%' AND i.purged_at IS NULL", {"cut": cutoff}).fetchall()
        by_seg: dict[int, list[str]] = {}
        blocked: set[int] = set()
        for r in rows:
            seg = int(r["path"].split(":")[1])
            if r["ok"]:
                by_seg.setdefault(seg, []).append(r["sop_uid"])
            else:
                blocked.add(seg)
        return {k: v for k, v in by_seg.items() if k not in blocked}

    def study_of_instances(self, sop_uids: list[str]) -> list[str]:
        c = self.conn()
        return [r[0] for u in sop_uids for r in c.execute("SELECT study_uid FROM instances WHERE sop_uid=?", (u,))]

    def instance_locator(self, sop_uid: str) -> str | None:
        """Where the held (not purged) copy of an instance is, or None: retention uses it to tell a
        duplicate record (its instance held elsewhere) from one not yet indexed."""
        row = self.conn().execute("SELECT path FROM instances WHERE sop_uid=? AND purged_at IS NULL",
                                  (sop_uid,)).fetchone()
        return row[0] if row else None

    def mark_instances_purged(self, sop_uids: list[str], now: float, cutoff: float, require_archive: bool) -> bool:
        """Mark them purged if, checked again under the write lock, every one still may go (a job or a
        retry may have come since ``purgeable_segments``); False, and nothing marked, otherwise.
        One statement for all of them: the study-level subquery then runs once, not once per instance."""
        c = self.conn()
        wanted = sorted(set(sop_uids))
        with self.tx(immediate=True):
            q = (f"SELECT count(*) FROM instances i WHERE i.sop_uid IN (SELECT value FROM json_each(:u)) "
                 f"AND {self._purgeable_sql(require_archive, self._has_priors_table())}")
            if c.execute(q, {"u": json.dumps(wanted), "cut": cutoff}).fetchone()[0] != len(wanted):
                return False
            c.executemany("UPDATE instances SET purged_at=? WHERE sop_uid=?", [(now, u) for u in wanted])
        return True

    def fully_purged_segments(self) -> dict[int, list[str]]:
        """Segments with indexed instances all of which are marked purged: {segment: [sop_uid, …]}.
        Retention normally deletes such a segment right after marking it; one still on disk was left
        by a crash in between (retention.py deletes it at the start of its next pass)."""
        rows = self.conn().execute(
            "SELECT sop_uid, path, purged_at IS NOT NULL AS gone FROM instances WHERE path LIKE 'log:%'").fetchall()
        by_seg: dict[int, list[str]] = {}
        held: set[int] = set()
        for r in rows:
            seg = int(r["path"].split(":")[1])
            if r["gone"]:
                by_seg.setdefault(seg, []).append(r["sop_uid"])
            else:
                held.add(seg)
        return {k: v for k, v in by_seg.items() if k not in held}

    def purgeable_results(self, cutoff: float) -> list[sqlite3.Row]:
        """Result files of jobs finished at or before ``cutoff`` every delivery of which succeeded by then."""
        return self.conn().execute(
            """SELECT r.sop_uid, r.path, j.study_uid FROM results r JOIN jobs j ON j.id = r.job_id
               WHERE r.purged_at IS NULL AND j.finished_at <= :cut
                 AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.kind='result' AND d.sop_uid=r.sop_uid
                                 AND (d.status != 'delivered' OR d.delivered_at > :cut))""",
            {"cut": cutoff}).fetchall()

    def last_purged_results(self) -> list[sqlite3.Row]:
        """The result files the latest retention pass marked purged (one ``purged_at`` per pass): where a
        pass was killed between marking and unlinking, their files are still on disk."""
        return self.conn().execute(
            """SELECT r.sop_uid, r.path, r.purged_at, j.study_uid FROM results r JOIN jobs j ON j.id = r.job_id
               WHERE r.purged_at = (SELECT MAX(purged_at) FROM results)""").fetchall()

    def mark_results_purged(self, sop_uids: list[str], now: float) -> None:
        with self.tx(immediate=True):
            self.conn().executemany("UPDATE results SET purged_at=? WHERE sop_uid=?", [(now, u) for u in sop_uids])

    # -- maintenance requests -------------------------------------------------------------
    def request_maintenance(self, kind: str, by: str) -> int:
        cur = self.conn().execute("INSERT INTO maintenance(kind, requested_by, requested_at) VALUES (?,?,?)",
                                  (kind, by, time.time()))
        return int(cur.lastrowid)

    def next_maintenance(self) -> sqlite3.Row | None:
        with self.tx(immediate=True):
            row = self.conn().execute(
                "SELECT * FROM maintenance WHERE status='pending' ORDER BY id LIMIT 1").fetchone()
            if row is not None:
                self.conn().execute("UPDATE maintenance SET status='running', started_at=? WHERE id=?",
                                    (time.time(), row["id"]))
        return row

    def finish_maintenance(self, req_id: int, ok: bool, detail: str) -> None:
        self.conn().execute("UPDATE maintenance SET status=?, finished_at=?, detail=? WHERE id=?",
                            ("done" if ok else "failed", time.time(), detail[:4000], req_id))

    def maintenance(self, limit: int = 20) -> list[sqlite3.Row]:
        return self.conn().execute("SELECT * FROM maintenance ORDER BY id DESC LIMIT ?", (limit,)).fetchall()

    def requeue_maintenance(self) -> None:
        """Requests that were running when the node stopped run again."""
        self.conn().execute("UPDATE maintenance SET status='pending' WHERE status='running'")


class _Tx:
    """BEGIN/COMMIT around a block; ROLLBACK on error. ``immediate`` takes the write lock up front."""

    def __init__(self, conn: sqlite3.Connection, immediate: bool = False) -> None:
        self.c, self.immediate = conn, immediate

    def __enter__(self) -> sqlite3.Connection:
        self.c.execute("BEGIN IMMEDIATE" if self.immediate else "BEGIN")
        return self.c

    def __exit__(self, exc_type, exc, tb) -> None:
        self.c.execute("ROLLBACK" if exc_type else "COMMIT")
