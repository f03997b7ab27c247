"""The PostgreSQL backend of the audit database (`postgresql://USER:PASS@HOST:PORT/DB`),
through psycopg 3 (the `postgres` extra: `pip install -e '.[postgres]'` in the source
tree, or `pip install 'psycopg[binary]>=3.1'`).

The same tables and schema steps as SQLite (proxy/audit/sqlite.py), in PostgreSQL's
types; the schema version is the row of table `audit_schema`, migrated under an advisory
lock so that replicas starting together take turns. A refused, lost or timed-out
connection is StoreUnavailable, whose message is psycopg's with any password taken out
(psycopg's connection errors name host, port and user, not the password: "connection
failed: connection to server at "127.0.0.1", port 5432 failed: Connection refused",
psycopg 3.2).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from proxy.audit.database import (
    Database,
    StoreError,
    StoreUnavailable,
    redact_text,
    redact_url,
    split_statements,
    url_secrets,
)
from proxy.audit.schema import SCHEMA_VERSION, migration

try:
    import psycopg
except ImportError:  # the extra is not installed
    psycopg = None  # type: ignore[assignment]

#: pg_advisory_xact_lock key held while the schema is checked and migrated ("fpaudit").
MIGRATION_LOCK = 0x6670617564697400

#: A reader's statements give up after this long (the admin API, `events`).
READ_TIMEOUT_MS = 10_000


@functools.lru_cache(maxsize=256)
def _placeholders(sql: str) -> str:
    """`?` placeholders as psycopg's `%s` (the schema's SQL holds no other `?` or `%`)."""
    return sql.replace("?", "%s")


def _without_nul(values: Sequence[object]) -> tuple[object, ...]:
    """`values` with every NUL in a string as U+FFFD (PostgresDatabase.executemany)."""
    return tuple(value.replace("\x00", "\ufffd") if type(value) is str else value
                 for value in values)


class PostgresDatabase(Database):
    """A psycopg connection in autocommit mode (explicit transactions only)."""

    kind = "postgresql"

    def __init__(self, conn: Any, url: str) -> None:
        self.conn = conn
        self.shown = redact_url(url)
        self._secrets = url_secrets(url)

    def unavailable(self, exc: BaseException) -> StoreUnavailable:
        """A driver error as StoreUnavailable, with no password in its message."""
        text = redact_text(str(exc).strip() or type(exc).__name__)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return StoreUnavailable(f"{self.shown}: {text}")

    def execute(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        if any(type(value) is str and "\x00" in value for value in args):
            args = _without_nul(args)  # (a filter as the values were written: see below)
        try:
            with self.conn.cursor() as cur:
                cur.execute(_placeholders(sql), args)
                return list(cur.fetchall()) if cur.description else []
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise self.unavailable(exc) from None

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        """Writes rows as given, except that a NUL in a text value becomes U+FFFD:
        PostgreSQL's text cannot hold one (psycopg 3 refuses it: "PostgreSQL text fields
        cannot contain NUL (0x00) bytes"), and a client's model name or an upstream's
        error text may have one; refused, it would fail the whole batch, every request's
        rows."""
        if any("\x00" in value for row in rows for value in row if type(value) is str):
            rows = [_without_nul(row) for row in rows]
        try:
            with self.conn.cursor() as cur:
                cur.executemany(_placeholders(sql), rows)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise self.unavailable(exc) from None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        try:
            with self.conn.transaction():
                yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise self.unavailable(exc) from None

    def close(self) -> None:
        self.conn.close()

    def schema_version(self) -> int:
        if self.execute("SELECT to_regclass('audit_schema')")[0][0] is None:
            return 0
        rows = self.execute("SELECT MAX(version) FROM audit_schema")
        return int(rows[0][0] or 0)


def connect_postgres(url: str, *, readonly: bool = False,
                     timeout_s: float = 5.0) -> PostgresDatabase:
    """Connect (within `timeout_s`), then create or migrate the schema unless `readonly`.

    StoreUnavailable when the server cannot be reached or refuses the login; StoreError
    when psycopg is not installed, when a read-only connection finds no audit tables, or
    when the schema is newer than this release.
    """
    if psycopg is None:
        raise StoreError("a postgresql:// store needs psycopg 3: pip install -e "
                         "'.[postgres]' in the source tree, or pip install 'psycopg[binary]>=3.1'")
    # keepalives: a server that vanished without closing the connection is noticed
    extra: dict[str, Any] = {"options": f"-c statement_timeout={READ_TIMEOUT_MS}"} \
        if readonly else {}
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=max(1, round(timeout_s)),
                               keepalives=1, keepalives_idle=10, keepalives_interval=5,
                               keepalives_count=3, application_name="failover-proxy audit",
                               **extra)
    except psycopg.Error as exc:
        raise PostgresDatabase(None, url).unavailable(exc) from None
    db = PostgresDatabase(conn, url)
    try:
        if readonly:
            version = db.schema_version()
            if version == 0:
                raise StoreError(f"no audit tables at {db.shown}")
            _check_version(db, version)
        else:
            _migrate(db)
    except psycopg.Error as exc:  # e.g. no right to create tables in that database
        db.close()
        raise StoreError(str(db.unavailable(exc))) from None
    except BaseException:
        db.close()
        raise
    return db


def _check_version(db: PostgresDatabase, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(f"{db.shown} has schema version {version}, newer than this "
                         f"release ({SCHEMA_VERSION})")


def _migrate(db: PostgresDatabase) -> None:
    """Bring the schema to SCHEMA_VERSION in one transaction, one replica at a time."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS audit_schema (version INTEGER NOT NULL)")
        version = db.schema_version()
        _check_version(db, version)
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in split_statements(migration(step, "postgresql")):
                db.execute(statement)
        if version < SCHEMA_VERSION:
            db.execute("DELETE FROM audit_schema")
            db.execute("INSERT INTO audit_schema (version) VALUES (?)", (SCHEMA_VERSION,))
