"""Jobs, their streamed items and pending webhook deliveries in SQLite (WAL) under DATA_DIR.

One connection, shared by the server's threads under a lock: every statement is short, and
SQLite allows one writer anyway. A ``JobStore`` is the only place that knows the schema.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handler.service.schema import S3_CONFIG_SECRETS

QUEUED, RUNNING = "IN_QUEUE", "IN_PROGRESS"
COMPLETED, FAILED, CANCELLED, TIMED_OUT = "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"
TERMINAL = (COMPLETED, FAILED, CANCELLED, TIMED_OUT)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,              -- runpod | cpu_sync | cpu_async | gpu (legacy views)
    status TEXT NOT NULL,
    request TEXT NOT NULL,           -- {"input": ..., "s3Config": ...}; never shown to callers
    webhook TEXT,
    base_url TEXT NOT NULL,
    execution_timeout_s REAL NOT NULL,
    progress TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    n_items INTEGER NOT NULL DEFAULT 0,
    stream_read INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE TABLE IF NOT EXISTS items (
    job_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (job_id, n)
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    webhook_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',   -- pending | delivered | gone | failed
    last_code INTEGER,
    last_error TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_at);
"""


@dataclass
class Job:
    id: str
    kind: str
    status: str
    request: dict
    webhook: str | None
    base_url: str
    execution_timeout_s: float
    progress: dict | None
    error: str | None
    attempts: int
    n_items: int
    stream_read: int
    created_at: float
    started_at: float | None
    completed_at: float | None
    expires_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        d.pop("seq", None)
        d["request"] = json.loads(d["request"])
        d["progress"] = json.loads(d["progress"]) if d["progress"] else None
        return cls(**d)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass
class Delivery:
    id: int
    job_id: str
    webhook_id: str
    url: str
    body: str
    attempt: int


REMOVED = "[removed when the job completed]"


def _has_secrets(request: dict) -> bool:
    s3 = request.get("s3Config")
    return isinstance(s3, dict) and any(s3.get(k) not in (None, REMOVED) for k in S3_CONFIG_SECRETS)


def _without_secrets(request: dict) -> dict:
    s3 = {**request["s3Config"], **{k: REMOVED for k in S3_CONFIG_SECRETS}}
    return {**request, "s3Config": s3}


class JobStore:
    def __init__(self, path: Path, webhook_body: Callable[[JobStore, Job], dict]):
        path.parent.mkdir(parents=True, exist_ok=True)
        # Queued jobs hold callers' s3Config credentials: owner-only (SQLite gives its -wal
        # and -shm files the database file's mode).
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        path.chmod(0o600)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._webhook_body = webhook_body
        self.on_delivery: Callable[[], None] = lambda: None  # wakes the webhook sender
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA secure_delete=ON")  # overwritten credentials leave no residue
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    # --- jobs ------------------------------------------------------------------------------

    def create(self, job_id: str, *, kind: str, request: dict, webhook: str | None,
               base_url: str, execution_timeout_s: float, ttl_s: float) -> Job:
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, kind, status, request, webhook, base_url,"
                " execution_timeout_s, created_at, expires_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (job_id, kind, QUEUED, json.dumps(request), webhook, base_url,
                 execution_timeout_s, now, now + ttl_s))
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(row) if row else None

    def list(self, *, status: str | None = None, ids: list[str] | None = None,
             limit: int = 100, after_seq: int = 0) -> list[tuple[int, Job]]:
        sql, args = "SELECT * FROM jobs WHERE seq > ?", [after_seq]
        if status:
            sql += " AND status = ?"
            args.append(status)
        if ids:
            sql += f" AND id IN ({','.join('?' * len(ids))})"
            args.extend(ids)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [(row["seq"], Job.from_row(row)) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {row[0]: row[1] for row in rows}

    def mean_duration_s(self, default: float = 30.0) -> float:
        row = self._one(
            "SELECT AVG(completed_at - started_at) FROM (SELECT completed_at, started_at FROM"
            " jobs WHERE status = ? ORDER BY seq DESC LIMIT 20)", (COMPLETED,))
        return float(row[0]) if row and row[0] else default

    def claim_next(self) -> Job | None:
        """The oldest queued job, now IN_PROGRESS with one more attempt; expired ones time out."""
        now = time.time()
        with self._lock:
            while True:
                row = self._db.execute(
                    "SELECT * FROM jobs WHERE status = ? ORDER BY seq LIMIT 1", (QUEUED,)
                ).fetchone()
                if row is None:
                    return None
                if row["expires_at"] < now:
                    self.finish(row["id"], TIMED_OUT,
                                "TIMED_OUT: the job's ttl expired in the queue",
                                only_from=(QUEUED,))
                    continue
                self._db.execute(
                    "UPDATE jobs SET status = ?, attempts = attempts + 1, started_at = ?,"
                    " n_items = 0, stream_read = 0, progress = NULL WHERE id = ?",
                    (RUNNING, now, row["id"]))
                self._db.execute("DELETE FROM items WHERE job_id = ?", (row["id"],))
                return self.get(row["id"])

    def add_item(self, job_id: str, item: dict) -> None:
        body = json.dumps(item)
        with self._lock:
            n = self._db.execute("SELECT n_items FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            self._db.execute("INSERT OR REPLACE INTO items VALUES (?,?,?)", (job_id, n, body))
            progress = body if item.get("status") == "progress" else None
            self._db.execute(
                "UPDATE jobs SET n_items = n_items + 1, progress = COALESCE(?, progress)"
                " WHERE id = ?", (progress, job_id))

    def items(self, job_id: str, start: int = 0) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM items WHERE job_id = ? AND n >= ? ORDER BY n", (job_id, start)
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def read_stream(self, job_id: str) -> tuple[Job, list[dict]] | None:
        """RunPod's /stream: the items not yet read, and the cursor moves past them."""
        with self._lock:
            job = self.get(job_id)
            if job is None:
                return None
            fresh = self.items(job_id, job.stream_read)
            self._db.execute("UPDATE jobs SET stream_read = ? WHERE id = ?",
                             (job.stream_read + len(fresh), job_id))
            return job, fresh

    def finish(self, job_id: str, status: str, error: str | None = None, *,
               only_from: tuple[str, ...] = (QUEUED, RUNNING)) -> bool:
        """Move a job to a terminal state (once), queueing its webhook."""
        with self._lock:
            cur = self._db.execute(
                f"UPDATE jobs SET status = ?, error = ?, completed_at = ? WHERE id = ?"
                f" AND status IN ({','.join('?' * len(only_from))})",
                (status, error, time.time(), job_id, *only_from))
            if cur.rowcount == 0:
                return False
            job = self.get(job_id)
            assert job is not None
            if status == COMPLETED and _has_secrets(job.request):
                # Nothing reruns a completed job: its credentials need not outlive it.
                self._db.execute("UPDATE jobs SET request = ? WHERE id = ?",
                                 (json.dumps(_without_secrets(job.request)), job_id))
            if job.webhook:
                self._db.execute(
                    "INSERT INTO deliveries (job_id, webhook_id, url, body, next_at, created_at)"
                    " VALUES (?,?,?,?,?,?)",
                    (job_id, f"msg_{job_id}_completed", job.webhook,
                     json.dumps(self._webhook_body(self, job)), time.time(), time.time()))
        if job.webhook:
            self.on_delivery()
        return True

    def requeue(self, job_id: str, *, from_status: tuple[str, ...], refund: bool = False,
                reset_ttl_s: float | None = None) -> bool:
        with self._lock:
            sets = "status = ?, error = NULL, completed_at = NULL, started_at = NULL"
            args: list[Any] = [QUEUED]
            if refund:
                sets += ", attempts = MAX(0, attempts - 1)"
            if reset_ttl_s is not None:
                sets += ", expires_at = ?, attempts = 0"
                args.append(time.time() + reset_ttl_s)
            cur = self._db.execute(
                f"UPDATE jobs SET {sets} WHERE id = ? AND status IN"
                f" ({','.join('?' * len(from_status))})", (*args, job_id, *from_status))
            return cur.rowcount > 0

    def recover(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """At start: jobs a dead process left IN_PROGRESS are re-queued while attempts remain,
        else failed. Returns (re-queued ids, failed ids)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, attempts FROM jobs WHERE status = ?", (RUNNING,)).fetchall()
        requeued, failed = [], []
        for row in rows:
            if row["attempts"] < max_attempts:
                self.requeue(row["id"], from_status=(RUNNING,))
                requeued.append(row["id"])
            else:
                self.finish(row["id"], FAILED, "INTERNAL: the job was interrupted (server "
                            f"restart) {row['attempts']} time(s)", only_from=(RUNNING,))
                failed.append(row["id"])
        return requeued, failed

    def purge_queue(self) -> int:
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                "SELECT id FROM jobs WHERE status = ?", (QUEUED,)).fetchall()]
            for job_id in ids:
                self.finish(job_id, CANCELLED, only_from=(QUEUED,))
        return len(ids)

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM items WHERE job_id = ?", (job_id,))
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def expired(self, now: float, retention_s: float) -> list[str]:
        """Terminal jobs older than the retention, and queued ones past their ttl (timed out)."""
        with self._lock:
            stale = [r[0] for r in self._db.execute(
                "SELECT id FROM jobs WHERE status = ? AND expires_at < ?", (QUEUED, now))]
            for job_id in stale:
                self.finish(job_id, TIMED_OUT, "TIMED_OUT: the job's ttl expired in the queue",
                            only_from=(QUEUED,))
            done = [r[0] for r in self._db.execute(
                f"SELECT id FROM jobs WHERE status IN ({','.join('?' * len(TERMINAL))})"
                " AND completed_at < ?", (*TERMINAL, now - retention_s))]
            self._db.execute(
                "DELETE FROM deliveries WHERE state != 'pending' AND created_at < ?",
                (now - retention_s,))
        return done

    # --- webhook deliveries ---------------------------------------------------------------

    def due_deliveries(self, now: float) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, job_id, webhook_id, url, body, attempt FROM deliveries WHERE"
                " state = 'pending' AND next_at <= ? ORDER BY next_at LIMIT 20", (now,)).fetchall()
        return [Delivery(**dict(r)) for r in rows]

    def next_delivery_at(self) -> float | None:
        row = self._one("SELECT MIN(next_at) FROM deliveries WHERE state = 'pending'")
        return row[0] if row else None

    def delivery_result(self, delivery_id: int, *, state: str, code: int | None,
                        error: str | None, next_at: float | None = None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE deliveries SET state = ?, attempt = attempt + 1, last_code = ?,"
                " last_error = ?, next_at = COALESCE(?, next_at) WHERE id = ?",
                (state, code, error, next_at, delivery_id))

    def deliveries(self, job_id: str) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT webhook_id, attempt, state, last_code, last_error, next_at FROM"
                " deliveries WHERE job_id = ? ORDER BY id", (job_id,)).fetchall()
        return [dict(r) for r in rows]
