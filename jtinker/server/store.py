"""Durable server state in SQLite: sessions, training runs, samplers, checkpoints and futures.

Everything a client was told (a request id, a checkpoint path, a result) is committed here before the answer
leaves the server, so a restart (even after SIGKILL) keeps it: completed futures still answer, runs and
checkpoints still list. Futures that were pending when the process died are failed at start-up, so no client
waits forever on work that no longer exists. One connection in WAL mode behind a lock: writes are few and small
next to the model work, and SQLite's own durability is all that is needed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL, heartbeat REAL NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0, tags TEXT, user_metadata TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, owner TEXT NOT NULL, session_id TEXT NOT NULL, base_model TEXT NOT NULL,
    rank INTEGER NOT NULL, lora TEXT NOT NULL, created REAL NOT NULL, last_request REAL NOT NULL,
    user_metadata TEXT);
CREATE TABLE IF NOT EXISTS samplers (
    sampler_id TEXT PRIMARY KEY, owner TEXT NOT NULL, session_id TEXT NOT NULL, base_model TEXT NOT NULL,
    model_path TEXT, source TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL, checkpoint_id TEXT NOT NULL, owner TEXT NOT NULL, kind TEXT NOT NULL,
    created REAL NOT NULL, size_bytes INTEGER, public INTEGER NOT NULL DEFAULT 0, expires_at REAL,
    user_metadata TEXT, save_id TEXT, PRIMARY KEY (run_id, checkpoint_id));
CREATE TABLE IF NOT EXISTS futures (
    request_id TEXT PRIMARY KEY, owner TEXT NOT NULL, dedupe TEXT UNIQUE, kind TEXT NOT NULL,
    status TEXT NOT NULL, content_type TEXT, body BLOB, created REAL NOT NULL, done REAL);
"""

RESTART_ERROR = ("the server restarted before this request completed; nothing of it was applied after the last "
                 "completed request: resume from your last saved state")


class Store:
    def __init__(self, path: Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(checkpoints)")}
            if "save_id" not in columns:  # a state directory from before atomic saves
                self._db.execute("ALTER TABLE checkpoints ADD COLUMN save_id TEXT")

    def execute(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def one(self, sql: str, args=()) -> sqlite3.Row | None:
        rows = self.execute(sql, args)
        return rows[0] if rows else None

    # ------------------------------------------------------------------------------------------------ futures

    def fail_interrupted(self) -> int:
        """At start-up: every future still pending belonged to the previous process; fail it (category server)."""
        body = json.dumps({"error": RESTART_ERROR, "category": "server"}).encode()
        with self._lock:
            cursor = self._db.execute(
                "UPDATE futures SET status='failed', content_type='application/json', body=?, done=? "
                "WHERE status='pending'", (body, time.time()))
            return cursor.rowcount

    def add_future(self, request_id: str, owner: str, kind: str, dedupe: str | None) -> str | None:
        """Insert a pending future; if `dedupe` was seen before (a retried POST), return that request id instead."""
        with self._lock:
            if dedupe is not None:
                row = self._db.execute("SELECT request_id FROM futures WHERE dedupe=?", (dedupe,)).fetchone()
                if row is not None:
                    return row["request_id"]
            self._db.execute("INSERT INTO futures (request_id, owner, dedupe, kind, status, created) "
                             "VALUES (?, ?, ?, ?, 'pending', ?)", (request_id, owner, dedupe, kind, time.time()))
        return None

    def finish_future(self, request_id: str, status: str, content_type: str, body: bytes, extra_sql=()) -> None:
        """Store a result (status 'done' or 'failed'), with any other writes it implies in the same transaction."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for sql, args in extra_sql:
                    self._db.execute(sql, args)
                self._db.execute("UPDATE futures SET status=?, content_type=?, body=?, done=? WHERE request_id=?",
                                 (status, content_type, body, time.time(), request_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def future(self, request_id: str) -> sqlite3.Row | None:
        return self.one("SELECT * FROM futures WHERE request_id=?", (request_id,))


def dumps(value) -> str | None:
    return None if value is None else json.dumps(value)


def loads(value):
    return None if value is None else json.loads(value)
