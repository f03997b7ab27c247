"""The SQLite backend of the audit database (`sqlite:///PATH`): one file in WAL mode, so
readers (the admin API, the `events` command) never block the writer process. The schema
version is `PRAGMA user_version`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from proxy.audit.database import SQLITE_PREFIX, Database, StoreError, split_statements
from proxy.audit.schema import SCHEMA_VERSION, migration


class SqliteDatabase(Database):
    """A sqlite3 connection in autocommit mode (explicit transactions only)."""

    kind = "sqlite"

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self.conn = conn
        self.path = path
        self.shown = SQLITE_PREFIX + path

    def execute(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, args).fetchall()

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self.conn.executemany(sql, rows)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])


def connect_sqlite(path: str, *, readonly: bool = False) -> SqliteDatabase:
    """Open the file, creating or migrating the schema unless read-only. StoreError when
    a read-only open finds no file, the file's schema is newer than this release, or
    SQLite cannot use the file (no permission, not a database)."""
    try:
        return _connect(path, readonly)
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"{path}: {exc}") from None


def _connect(path: str, readonly: bool) -> SqliteDatabase:
    if readonly:
        if path != ":memory:" and not Path(path).exists():
            raise StoreError(f"no audit database at {path}")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 2000")
        db = SqliteDatabase(conn, path)
        _check_version(db)
        return db
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    # With `--workers N` several processes (each with its writer) open and migrate the same
    # file at once: switching to WAL and migrating take locks the others must wait for
    # rather than fail on ("database is locked"). Each step runs under BEGIN IMMEDIATE and
    # reads the version again there, so the second process waits for the first and then
    # finds the step done.
    conn.execute("PRAGMA busy_timeout = 10000")
    _wal(conn)
    conn.execute("PRAGMA synchronous = NORMAL")
    db = SqliteDatabase(conn, path)
    version = _check_version(db)
    for step in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if db.schema_version() < step:
                for statement in split_statements(migration(step, "sqlite")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {step}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    conn.execute("PRAGMA busy_timeout = 2000")
    return db


def _check_version(db: SqliteDatabase) -> int:
    """The file's schema version; StoreError (and the connection closed) when it is newer
    than this release's."""
    version = db.schema_version()
    if version > SCHEMA_VERSION:
        db.close()
        raise StoreError(f"{db.path} has schema version {version}, newer than this release "
                         f"({SCHEMA_VERSION})")
    return version


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
