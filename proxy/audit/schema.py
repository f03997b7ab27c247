"""The audit database: its SQLite schema (versioned, migrated at open), the rows the
writer inserts in batches, retention, and the event queries of the admin API and the
`events` command. Plain sqlite3, no event loop: used by the writer process, by readers, and
by proxy.audit.store in a worker thread.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

#: Bump when the schema changes, and add a step to `_MIGRATIONS`.
SCHEMA_VERSION = 1

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE IF NOT EXISTS route_plans (
        plan_id TEXT PRIMARY KEY,
        request_id TEXT NOT NULL,
        ts REAL NOT NULL,
        model TEXT,
        requirements TEXT,
        plan TEXT,
        selected TEXT,
        final_instance TEXT,
        outcome TEXT,
        status INTEGER,
        attempts INTEGER,
        ttfb_ms REAL,
        duration_ms REAL
    );
    CREATE INDEX IF NOT EXISTS route_plans_request ON route_plans (request_id);
    CREATE INDEX IF NOT EXISTS route_plans_ts ON route_plans (ts);
    CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        type TEXT NOT NULL,
        request_id TEXT,
        plan_id TEXT,
        instance TEXT,
        reason_code TEXT,
        from_instance TEXT,
        to_instance TEXT,
        detail TEXT
    );
    CREATE INDEX IF NOT EXISTS events_request ON events (request_id);
    CREATE INDEX IF NOT EXISTS events_type_ts ON events (type, ts);
    CREATE INDEX IF NOT EXISTS events_instance_ts ON events (instance, ts);
    CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
    CREATE TABLE IF NOT EXISTS lineage (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        request_id TEXT,
        plan_id TEXT,
        from_instance TEXT,
        to_instance TEXT,
        reason_code TEXT
    );
    CREATE INDEX IF NOT EXISTS lineage_request ON lineage (request_id);
    CREATE INDEX IF NOT EXISTS lineage_ts ON lineage (ts);
    """,
}

EVENT_COLUMNS = ("id", "ts", "type", "request_id", "plan_id", "instance", "reason_code",
                 "from_instance", "to_instance", "detail")

# Row kinds on the queue.
EVENT = 0
PLAN = 1
LINEAGE = 2


class StoreError(Exception):
    """The store URL or file cannot be used."""


def sqlite_path(url: str) -> str:
    """The file path of a `sqlite:///PATH` URL (`sqlite:///:memory:` is in-memory)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise StoreError(f"unsupported store url {url!r}: expected sqlite:///PATH")
    return url[len(prefix):] or ":memory:"


def connect(path: str, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the database, creating or migrating the schema unless read-only."""
    if readonly:
        if path != ":memory:" and not Path(path).exists():
            raise StoreError(f"no audit database at {path}")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 2000")
        return conn
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    # With `--workers N` several processes (each with its writer) open and migrate the same
    # file at once: switching to WAL and migrating take locks the others must wait for
    # rather than fail on ("database is locked"). A migration is written to run again
    # harmlessly (IF NOT EXISTS), as two processes may both have read version 0; BEGIN
    # IMMEDIATE has the second wait for the first rather than fail on its stale read.
    conn.execute("PRAGMA busy_timeout = 10000")
    _wal(conn)
    conn.execute("PRAGMA synchronous = NORMAL")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        conn.close()
        raise StoreError(f"{path} has schema version {version}, newer than this release "
                         f"({SCHEMA_VERSION})")
    for step in range(version + 1, SCHEMA_VERSION + 1):
        conn.executescript("BEGIN IMMEDIATE;" + _MIGRATIONS[step]
                           + f"PRAGMA user_version = {step}; COMMIT;")
    conn.execute("PRAGMA busy_timeout = 2000")
    return conn


def _wal(conn: sqlite3.Connection, tries: int = 200) -> None:
    """Put the file in WAL mode (it stays so). Switching takes an exclusive lock that SQLite
    does not wait for when another connection is switching too (SQLITE_BUSY without the
    busy handler: waiting could deadlock), so it is tried again every 50 ms, 10 s at most."""
    for attempt in range(tries):
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == tries - 1:
                conn.close()
                raise
            time.sleep(0.05)


@dataclass(frozen=True, slots=True)
class EventQuery:
    """Filters for reading events; all optional."""

    request_id: str | None = None
    type: str | None = None
    instance: str | None = None
    since: float | None = None  # unix time
    limit: int = 100


def query_events(conn: sqlite3.Connection, q: EventQuery) -> list[dict[str, Any]]:
    """Events matching `q`, newest first."""
    where: list[str] = []
    args: list[object] = []
    if q.request_id:
        where.append("request_id = ?")
        args.append(q.request_id)
    if q.type:
        where.append("type = ?")
        args.append(q.type)
    if q.instance:
        where.append("(instance = ? OR from_instance = ? OR to_instance = ?)")
        args += [q.instance] * 3
    if q.since is not None:
        where.append("ts >= ?")
        args.append(q.since)
    sql = f"SELECT {', '.join(EVENT_COLUMNS)} FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(max(1, min(q.limit, 10_000)))
    rows = []
    for row in conn.execute(sql, args):
        item = dict(zip(EVENT_COLUMNS, row, strict=True))
        item["detail"] = orjson.loads(item["detail"]) if item["detail"] else None
        rows.append(item)
    return rows


PLAN_COLUMNS = ("plan_id", "request_id", "ts", "model", "plan", "selected", "final_instance",
                "outcome", "status", "attempts", "ttfb_ms", "duration_ms")


def query_plans(conn: sqlite3.Connection, request_id: str, limit: int = 20) -> list[dict[str, Any]]:
    """The route_plans rows of a request id (newest first; a client may reuse its
    x-request-id), `plan` decoded (RoutePlan.as_dict)."""
    sql = (f"SELECT {', '.join(PLAN_COLUMNS)} FROM route_plans WHERE request_id = ?"
           " ORDER BY ts DESC LIMIT ?")
    rows = []
    for row in conn.execute(sql, (request_id, limit)):
        item = dict(zip(PLAN_COLUMNS, row, strict=True))
        item["plan"] = orjson.loads(item["plan"]) if item["plan"] else None
        rows.append(item)
    return rows


def write_rows(conn: sqlite3.Connection, rows: list[list[Any]]) -> None:
    """Insert a batch of queued rows (events, plans, lineage) in one transaction."""
    events, plans, lineage = [], [], []
    dumps = orjson.dumps
    for row in rows:
        kind = row[0]
        if kind == EVENT:
            detail = row[9]
            events.append((*row[1:9], dumps(detail).decode() if detail else None))
        elif kind == PLAN:
            plan = row[1]
            plan_id, request_id, ts, model, *rest = row[2:]
            plans.append((plan_id, request_id, ts, model,
                          dumps(plan["requirements"]).decode(), dumps(plan).decode(), *rest))
        else:
            lineage.append(row[1:])
    conn.execute("BEGIN")
    try:
        if events:
            conn.executemany(
                "INSERT INTO events (ts, type, request_id, plan_id, instance, reason_code,"
                " from_instance, to_instance, detail) VALUES (?,?,?,?,?,?,?,?,?)", events)
        if plans:
            conn.executemany(
                "INSERT OR REPLACE INTO route_plans (plan_id, request_id, ts, model,"
                " requirements, plan, selected, final_instance, outcome, status, attempts,"
                " ttfb_ms, duration_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", plans)
        if lineage:
            conn.executemany(
                "INSERT INTO lineage (ts, kind, request_id, plan_id, from_instance,"
                " to_instance, reason_code) VALUES (?,?,?,?,?,?,?)", lineage)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def apply_retention(conn: sqlite3.Connection, retention_s: float, max_rows: int) -> None:
    """Delete rows older than the retention period, and beyond the row cap."""
    cutoff = time.time() - retention_s
    for table in ("events", "lineage", "route_plans"):
        conn.execute(f"DELETE FROM {table} WHERE ts < ?", (cutoff,))
    for table in ("events", "lineage"):
        conn.execute(f"DELETE FROM {table} WHERE id <= "
                     f"(SELECT MAX(id) FROM {table}) - ?", (max_rows,))
    conn.execute("DELETE FROM route_plans WHERE rowid IN (SELECT rowid FROM route_plans"
                 " ORDER BY ts DESC LIMIT -1 OFFSET ?)", (max_rows,))

