"""The audit store: route plans, events and lineage in SQLite, written off the request path.

Requests hand rows to `AuditStore.submit`, which never blocks and never waits on disk: it
appends to a bounded deque (an append is atomic, no lock is taken on the request path) that
one background writer thread drains in batches. If the writer falls behind, rows are
dropped and counted (`dropped`), never the request. On shutdown the queue is flushed.
SQLite runs in WAL mode so readers (the admin API, the `events` command) never block the
writer.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

log = structlog.get_logger("proxy.store")

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
_EVENT = 0
_PLAN = 1
_LINEAGE = 2
_STOP_KIND = -1  # (kind,): the writer finishes
_FLUSH_KIND = -2  # (kind, threading.Event): set once everything before it is written


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
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA busy_timeout = 2000")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} has schema version {version}, newer than this release "
                         f"({SCHEMA_VERSION})")
    for step in range(version + 1, SCHEMA_VERSION + 1):
        conn.executescript("BEGIN;" + _MIGRATIONS[step] + f"PRAGMA user_version = {step}; COMMIT;")
    return conn


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


class AuditStore:
    """Batched, non-blocking writes to SQLite from one background thread.

    The event loop only appends to a deque; the writer thread takes what has accumulated,
    writes it in one transaction, and sleeps briefly between batches (woken at once for a
    flush or stop) so that rows arrive in batches rather than one wake-up each.
    """

    #: Pause of the writer between batches, letting rows accumulate.
    PAUSE_S = 0.02
    #: Pause when nothing came in the last pause (an idle proxy wakes rarely).
    IDLE_PAUSE_S = 0.25

    def __init__(self, url: str, *, queue_size: int = 50_000, batch: int = 2000,
                 retention_s: float = 7 * 86400.0, max_rows: int = 1_000_000,
                 on_drop: Callable[[int], None] | None = None) -> None:
        self.path = sqlite_path(url)
        self.queue_size = queue_size
        self.batch = batch
        self.retention_s = retention_s
        self.max_rows = max_rows
        self.on_drop = on_drop
        self.dropped = 0
        self.written = 0
        self._queue: deque[tuple[Any, ...]] | None = None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._last_warning = 0.0
        self._last_retention = 0.0

    async def start(self) -> None:
        self._conn = await asyncio.to_thread(connect, self.path)
        self._queue = deque()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def submit(self, row: tuple[Any, ...]) -> None:
        """Queue a row without waiting; if the writer is behind, drop it and count."""
        q = self._queue
        if q is None:
            return
        if len(q) < self.queue_size:
            q.append(row)
        else:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop(1)
            now = time.monotonic()
            if now - self._last_warning > 5.0:
                self._last_warning = now
                log.warning("audit_events_dropped", dropped_total=self.dropped,
                            reason="writer behind; queue full")

    def event(self, ts: float, type_: str, request_id: str | None, plan_id: str | None,
              instance: str | None, reason_code: str | None = None,
              from_instance: str | None = None, to_instance: str | None = None,
              detail: dict[str, Any] | None = None) -> None:
        self.submit((_EVENT, ts, type_, request_id, plan_id, instance, reason_code,
                     from_instance, to_instance, detail))

    def lineage(self, ts: float, request_id: str | None, plan_id: str | None,
                from_instance: str | None, to_instance: str | None, reason_code: str) -> None:
        self.submit((_LINEAGE, ts, "route_change", request_id, plan_id, from_instance,
                     to_instance, reason_code))

    def plan(self, plan: Any, row: tuple[Any, ...]) -> None:
        """A route_plans row: `plan` (anything with `as_dict()`, serialised by the writer,
        off the request path) and (plan_id, request_id, ts, model, selected,
        final_instance, outcome, status, attempts, ttfb_ms, duration_ms)."""
        self.submit((_PLAN, plan, *row))

    def _control(self, marker: tuple[Any, ...]) -> None:
        """Queue a flush or stop marker (never dropped) and wake the writer."""
        q = self._queue
        assert q is not None
        q.append(marker)
        self._wake.set()

    def _run(self) -> None:
        """The writer thread: batch, write, repeat, until told to stop."""
        q = self._queue
        assert q is not None
        pause = self.PAUSE_S
        while True:
            if not q:
                self._wake.wait(pause)
                self._wake.clear()
                if not q:
                    pause = self.IDLE_PAUSE_S
                    continue
            pause = self.PAUSE_S
            rows: list[tuple[Any, ...]] = []
            popleft = q.popleft
            while len(rows) < self.batch:
                try:
                    rows.append(popleft())
                except IndexError:
                    break
            markers = [r for r in rows if r[0] in (_STOP_KIND, _FLUSH_KIND)]
            if markers:
                rows = [r for r in rows if r[0] not in (_STOP_KIND, _FLUSH_KIND)]
            if rows:
                try:
                    self._write(rows)
                except Exception:
                    log.exception("audit_write_failed", rows=len(rows))
            stop = False
            for marker in markers:
                if marker[0] == _FLUSH_KIND:
                    marker[1].set()
                else:
                    stop = True
            if stop:
                return
            if len(rows) < self.batch // 4 and not markers and not self._wake.is_set():
                self._wake.wait(self.PAUSE_S)
                self._wake.clear()

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        events, plans, lineage = [], [], []
        dumps = orjson.dumps
        for row in rows:
            kind = row[0]
            if kind == _EVENT:
                detail = row[9]
                events.append((*row[1:9], dumps(detail).decode() if detail else None))
            elif kind == _PLAN:
                plan = row[1].as_dict()
                plan_id, request_id, ts, model, *rest = row[2:]
                plans.append((plan_id, request_id, ts, model,
                              dumps(plan["requirements"]).decode(), dumps(plan).decode(),
                              *rest))
            else:
                lineage.append(row[1:])
        with self._lock:
            conn = self._conn
            if conn is None:
                return
            conn.execute("BEGIN")
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
            conn.execute("COMMIT")
            self.written += len(rows)
            now = time.monotonic()
            if now - self._last_retention > 60.0:
                self._last_retention = now
                self._apply_retention(conn)

    def _apply_retention(self, conn: sqlite3.Connection) -> None:
        """Delete rows older than the retention period, and beyond the row cap."""
        cutoff = time.time() - self.retention_s
        for table in ("events", "lineage", "route_plans"):
            conn.execute(f"DELETE FROM {table} WHERE ts < ?", (cutoff,))
        for table in ("events", "lineage"):
            conn.execute(f"DELETE FROM {table} WHERE id <= "
                         f"(SELECT MAX(id) FROM {table}) - ?", (self.max_rows,))
        conn.execute("DELETE FROM route_plans WHERE rowid IN (SELECT rowid FROM route_plans"
                     " ORDER BY ts DESC LIMIT -1 OFFSET ?)", (self.max_rows,))

    def apply_retention(self) -> None:
        """Run retention now (tests, admin)."""
        with self._lock:
            if self._conn is not None:
                self._apply_retention(self._conn)

    async def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until everything queued so far is written."""
        q = self._queue
        if q is None or self._thread is None or not self._thread.is_alive():
            return
        done = threading.Event()
        self._control((_FLUSH_KIND, done))
        await asyncio.to_thread(done.wait, timeout_s)

    async def query(self, q: EventQuery) -> list[dict[str, Any]]:
        """Read events (after writing what is queued, so a reader sees its own request)."""
        await self.flush()

        def run() -> list[dict[str, Any]]:
            with self._lock:
                assert self._conn is not None
                return query_events(self._conn, q)

        return await asyncio.to_thread(run)

    async def close(self) -> None:
        """Stop the writer after it has written everything queued, then close the database."""
        q, thread = self._queue, self._thread
        if q is not None and thread is not None and thread.is_alive():
            self._control((_STOP_KIND,))
            await asyncio.to_thread(thread.join, 30.0)
        self._queue = None
        self._thread = None
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
