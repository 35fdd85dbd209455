"""The master's SQLite database: tokens, devices, nodes, jobs and GPU usage.

Every change runs inside ``with store.tx():`` and is committed when the block ends, before the
master replies, so a master killed with SIGKILL restarts with everything it ever acknowledged.
Rows come back as plain dicts with their JSON columns decoded.
"""
from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    token TEXT PRIMARY KEY, user TEXT NOT NULL, created REAL NOT NULL, current_device INTEGER,
    revoked REAL,                       -- when the operator revoked it; the row stays for billing
    max_gpus INTEGER);                  -- the operator's limit on the token's device size; NULL: none
CREATE TABLE IF NOT EXISTS devices (
    id INTEGER PRIMARY KEY AUTOINCREMENT, token TEXT NOT NULL,
    flavor INTEGER NOT NULL,            -- menu number of the flavor: stable if the GPU unit changes
    created REAL NOT NULL, last_used REAL NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, agent_addr TEXT NOT NULL, worker_host TEXT NOT NULL,
    worker_port_base INTEGER NOT NULL, gpus TEXT NOT NULL, telemetry TEXT NOT NULL,
    registered REAL NOT NULL, last_seen REAL NOT NULL, alive INTEGER NOT NULL,
    drained INTEGER NOT NULL DEFAULT 0, -- the operator's: no new job is placed on its GPUs ...
    drained_gpus TEXT NOT NULL DEFAULT '[]');  -- ... or on these of its GPUs
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, token TEXT NOT NULL, device_id INTEGER NOT NULL,
    flavor INTEGER NOT NULL, gpus INTEGER NOT NULL, pid INTEGER, process_name TEXT, hostname TEXT,
    state TEXT NOT NULL, message TEXT NOT NULL, job_secret TEXT NOT NULL, rendezvous TEXT,
    workers TEXT NOT NULL, memory_used INTEGER NOT NULL DEFAULT 0,
    memory_peak INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, started REAL, ended REAL,
    last_heartbeat REAL NOT NULL, exit_code INTEGER);
CREATE TABLE IF NOT EXISTS events (    -- what an operator looks back on: faults, lost nodes, actions
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, kind TEXT NOT NULL,
    subject TEXT NOT NULL, message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS usage (
    job_id INTEGER PRIMARY KEY, token TEXT NOT NULL, device_id INTEGER NOT NULL,
    gpus INTEGER NOT NULL, gpu_seconds REAL NOT NULL, started REAL NOT NULL, ended REAL NOT NULL);
"""

# Columns added after the first release, with their definitions: a database made before them gets
# them at open (ALTER TABLE), so an upgraded master keeps its records.
ADDED_COLUMNS = {("tokens", "revoked"): "REAL", ("tokens", "max_gpus"): "INTEGER",
                 ("nodes", "drained"): "INTEGER NOT NULL DEFAULT 0",
                 ("nodes", "drained_gpus"): "TEXT NOT NULL DEFAULT '[]'"}
MAX_EVENTS = 10000                      # the newest are kept
JSON_COLUMNS = {"gpus": "nodes", "telemetry": "nodes", "drained_gpus": "nodes", "workers": "jobs"}
ACTIVE_STATES = ("queued", "starting", "running")
JOB_COLUMNS = {"state", "message", "rendezvous", "workers", "memory_used", "memory_peak", "started",
               "ended", "last_heartbeat", "exit_code"}


class Store:
    def __init__(self, path: str | Path):
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are opened explicitly by tx(), never implicitly.
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # One fsync per commit: control-plane writes are few and small, and an acknowledged
        # change then survives a power cut too, not only a killed process.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._add_missing_columns()
        self._depth = 0

    def _add_missing_columns(self):
        for (table, column), definition in ADDED_COLUMNS.items():
            present = {row["name"] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def close(self):
        self.db.close()

    def backup(self, path: Path):
        """A consistent copy of the whole database at ``path``, taken while the master serves
        (SQLite's online backup): a copy of the files could catch a write half done."""
        copy = sqlite3.connect(str(path))
        try:
            self.db.backup(copy)
        finally:
            copy.close()

    @contextmanager
    def tx(self):
        """One atomic change; nested blocks join the outermost one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth = 1
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._depth = 0

    def _rows(self, table: str, sql: str, args=()) -> list[dict]:
        rows = [dict(r) for r in self.db.execute(sql, args)]
        for row in rows:
            for col, tab in JSON_COLUMNS.items():
                if tab == table and col in row:
                    row[col] = json.loads(row[col])
        return rows

    def _row(self, table: str, sql: str, args=()) -> dict | None:
        rows = self._rows(table, sql, args)
        return rows[0] if rows else None

    # --- tokens -------------------------------------------------------------------------------
    def add_token(self, token: str, user: str, now: float):
        self.db.execute("INSERT INTO tokens (token, user, created) VALUES (?, ?, ?)", (token, user, now))

    def token(self, token: str) -> dict | None:
        return self._row("tokens", "SELECT * FROM tokens WHERE token = ?", (token,))

    def tokens(self) -> list[dict]:
        return self._rows("tokens", "SELECT * FROM tokens ORDER BY created")

    def revoke_token(self, token: str, now: float):
        self.db.execute("UPDATE tokens SET revoked = ? WHERE token = ? AND revoked IS NULL", (now, token))

    def set_token_max_gpus(self, token: str, max_gpus: int | None):
        self.db.execute("UPDATE tokens SET max_gpus = ? WHERE token = ?", (max_gpus, token))

    def set_current_device(self, token: str, device_id: int | None):
        self.db.execute("UPDATE tokens SET current_device = ? WHERE token = ?", (device_id, token))

    # --- devices ------------------------------------------------------------------------------
    def add_device(self, token: str, flavor: int, now: float) -> int:
        cur = self.db.execute("INSERT INTO devices (token, flavor, created, last_used) VALUES (?, ?, ?, ?)",
                              (token, flavor, now, now))
        return cur.lastrowid

    def devices(self, token: str) -> list[dict]:
        return self._rows("devices", "SELECT * FROM devices WHERE token = ? ORDER BY id", (token,))

    def device(self, token: str, device_id: int) -> dict | None:
        return self._row("devices", "SELECT * FROM devices WHERE token = ? AND id = ?", (token, device_id))

    def remove_device(self, device_id: int):
        self.db.execute("DELETE FROM devices WHERE id = ?", (device_id,))

    def set_device_flavor(self, device_id: int, flavor: int):
        self.db.execute("UPDATE devices SET flavor = ? WHERE id = ?", (flavor, device_id))

    def touch_device(self, device_id: int, now: float):
        self.db.execute("UPDATE devices SET last_used = ? WHERE id = ?", (now, device_id))

    # --- nodes --------------------------------------------------------------------------------
    def upsert_node(self, name: str, agent_addr: str, worker_host: str, worker_port_base: int,
                    gpus: list, now: float):
        self.db.execute(
            "INSERT INTO nodes (name, agent_addr, worker_host, worker_port_base, gpus, telemetry,"
            " registered, last_seen, alive) VALUES (?, ?, ?, ?, ?, '[]', ?, ?, 1)"
            " ON CONFLICT(name) DO UPDATE SET agent_addr = excluded.agent_addr,"
            " worker_host = excluded.worker_host, worker_port_base = excluded.worker_port_base,"
            " gpus = excluded.gpus, last_seen = excluded.last_seen, alive = 1",
            (name, agent_addr, worker_host, worker_port_base, json.dumps(gpus), now, now))

    def node(self, name: str) -> dict | None:
        return self._row("nodes", "SELECT * FROM nodes WHERE name = ?", (name,))

    def nodes(self) -> list[dict]:
        return self._rows("nodes", "SELECT * FROM nodes ORDER BY name")

    def node_seen(self, name: str, telemetry: list, now: float):
        self.db.execute("UPDATE nodes SET telemetry = ?, last_seen = ?, alive = 1 WHERE name = ?",
                        (json.dumps(telemetry), now, name))

    def set_node_drained(self, name: str, drained: bool):
        self.db.execute("UPDATE nodes SET drained = ? WHERE name = ?", (int(drained), name))

    def set_drained_gpus(self, name: str, gpus: list[int]):
        self.db.execute("UPDATE nodes SET drained_gpus = ? WHERE name = ?", (json.dumps(gpus), name))

    def set_node_lost(self, name: str):
        self.db.execute("UPDATE nodes SET alive = 0 WHERE name = ?", (name,))

    def refresh_liveness(self, now: float):
        """Restart grace: heartbeats missed while the master was down are not the senders' fault."""
        self.db.execute("UPDATE nodes SET last_seen = ? WHERE alive = 1", (now,))
        self.db.execute("UPDATE jobs SET last_heartbeat = ? WHERE state IN ('queued', 'starting', 'running')",
                        (now,))

    # --- jobs ---------------------------------------------------------------------------------
    def add_job(self, token: str, device_id: int, flavor: int, gpus: int, pid: int, process_name: str,
                hostname: str, job_secret: str, now: float) -> int:
        cur = self.db.execute(
            "INSERT INTO jobs (token, device_id, flavor, gpus, pid, process_name, hostname, state,"
            " message, job_secret, workers, created, last_heartbeat)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', '', ?, '[]', ?, ?)",
            (token, device_id, flavor, gpus, pid, process_name, hostname, job_secret, now, now))
        return cur.lastrowid

    def update_job(self, job_id: int, **fields):
        unknown = set(fields) - JOB_COLUMNS
        if unknown:
            raise ValueError(f"not updatable job columns: {sorted(unknown)}")
        values = [json.dumps(v) if k == "workers" else v for k, v in fields.items()]
        assignments = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values, job_id))

    def job(self, job_id: int) -> dict | None:
        return self._row("jobs", "SELECT * FROM jobs WHERE id = ?", (job_id,))

    def jobs(self, states=ACTIVE_STATES, token: str | None = None) -> list[dict]:
        marks = ", ".join("?" * len(states))
        sql = f"SELECT * FROM jobs WHERE state IN ({marks})"
        args = list(states)
        if token is not None:
            sql += " AND token = ?"
            args.append(token)
        return self._rows("jobs", sql + " ORDER BY id", args)

    def job_counts(self, states) -> dict[str, int]:
        """How many jobs are in each of ``states`` (0 included)."""
        marks = ", ".join("?" * len(states))
        counts = dict(self.db.execute(f"SELECT state, COUNT(*) FROM jobs WHERE state IN ({marks}) GROUP BY state",
                                      list(states)).fetchall())
        return {s: counts.get(s, 0) for s in states}

    def all_jobs(self) -> list[dict]:
        return self._rows("jobs", "SELECT * FROM jobs ORDER BY id")

    # --- events -------------------------------------------------------------------------------
    def add_event(self, now: float, kind: str, subject: str, message: str):
        cur = self.db.execute("INSERT INTO events (time, kind, subject, message) VALUES (?, ?, ?, ?)",
                              (now, kind, subject, message))
        # Bounded: a GPU whose temperature hovers at its threshold adds two events a heartbeat.
        self.db.execute("DELETE FROM events WHERE id <= ?", (cur.lastrowid - MAX_EVENTS,))

    def events(self, limit: int, about: str | None = None) -> list[dict]:
        """The newest ``limit`` events, oldest first; with ``about``, only those of that subject (a
        user, ``job N``, a node, or ``node:gpu``), a node's including its GPUs'."""
        where, args = "", [limit]
        if about is not None:
            # instr, not LIKE: a node name may hold LIKE's wildcards.
            where, args = "WHERE subject = ? OR instr(subject, ?) = 1", [about, about + ":", limit]
        return self._rows("events", f"SELECT * FROM (SELECT * FROM events {where} ORDER BY id DESC LIMIT ?)"
                                    " ORDER BY id", args)

    # --- usage --------------------------------------------------------------------------------
    def add_usage(self, job_id: int, token: str, device_id: int, gpus: int, gpu_seconds: float,
                  started: float, ended: float):
        self.db.execute("INSERT OR IGNORE INTO usage VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (job_id, token, device_id, gpus, gpu_seconds, started, ended))

    def usage(self, token: str) -> list[dict]:
        return self._rows("usage", "SELECT * FROM usage WHERE token = ? ORDER BY job_id", (token,))

    def usage_job(self, job_id: int) -> dict | None:
        return self._row("usage", "SELECT * FROM usage WHERE job_id = ?", (job_id,))

    def usage_by_token(self) -> list[dict]:
        return self._rows("usage", "SELECT t.user, t.token, COUNT(u.job_id) AS jobs,"
                                   " COALESCE(SUM(u.gpu_seconds), 0) AS gpu_seconds"
                                   " FROM tokens t LEFT JOIN usage u ON u.token = t.token"
                                   " GROUP BY t.token ORDER BY t.created")
