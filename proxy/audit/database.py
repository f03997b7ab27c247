"""The audit database behind one narrow interface, with two backends chosen by the store
URL's scheme: SQLite (`sqlite:///PATH`, proxy/audit/sqlite.py) and PostgreSQL
(`postgresql://USER:PASS@HOST:PORT/DB`, proxy/audit/postgres.py, through psycopg 3).

The tables, queries, retention and schema versioning (proxy/audit/schema.py) are written
once against `Database`: plain SQL with `?` placeholders that both dialects accept once a
backend has put its own placeholder in. Blocking calls: used by the writer process, by the
`events` command, and by proxy.audit.store in a worker thread, never on the event loop.

A store URL may carry a password: `redact_url` is how any URL is shown (logs, errors,
admin output), and `url_password` gives the password to the log redactor
(proxy.secrets) as a last safety net.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import unquote, urlsplit

SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql", "postgres")

#: `scheme://user:password@` in any text: the password part, for redaction. It runs to
#: the last `@` before a space: a password written with a raw `@`, `/` or `?` in it is
#: hidden whole (at worst, more than the password is).
_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)(\S*)(@)")
#: What RFC 3986 (section 3.2.1) allows in a URL's `user:password` unencoded, and `%XX`.
_USERINFO = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:]|%[0-9A-Fa-f]{2})*")
#: A password as a URL's query parameter (libpq reads `?password=` and `?sslpassword=`,
#: PostgreSQL docs, "Connection URIs").
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)([^&\s#'\"]*)")


class StoreError(Exception):
    """The store URL or database cannot be used (a wrong URL, a schema newer than this
    release, no audit tables)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached now (PostgreSQL stopped, refused, or too slow):
    worth trying again later. The message never holds the URL's password."""


class Database(ABC):
    """One connection to the audit database.

    `execute` and `executemany` take SQL with `?` placeholders; `transaction()` groups
    statements (outside one, every statement commits on its own). Errors of the database
    driver come out as they are, except a lost or refused connection, which is
    StoreUnavailable.
    """

    #: "sqlite" or "postgresql".
    kind: str
    #: The URL as it may be shown (password replaced by ***).
    shown: str

    @abstractmethod
    def execute(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Run one statement; its rows (an empty list for a statement with none)."""

    @abstractmethod
    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        """Run one statement for each row of arguments."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """A transaction: committed when the block ends, rolled back when it raises."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection (idempotent)."""

    @abstractmethod
    def schema_version(self) -> int:
        """The version of the schema the database holds (0: none yet)."""


def is_postgres(url: str) -> bool:
    return urlsplit(url).scheme in POSTGRES_SCHEMES


def redact_url(url: str) -> str:
    """`url` with its password (if any) replaced by `***`:
    `postgresql://audit:***@db:5432/audit`. Everything between the user's `:` and the
    URL's last `@` is hidden, whatever it holds (a raw `@`, `/` or space)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if sep and at and colon:
        url = f"{scheme}://{user}:***@{host}"
    return redact_text(url)


def redact_text(text: str) -> str:
    """`text` with the password of every `scheme://user:password@` (or `?password=`) in it
    replaced by `***` (for error messages of a driver that quotes the URL it was given)."""
    return _QUERY_PASSWORD.sub(r"\1***", _CREDENTIALS.sub(r"\1***\3", text))


def url_password(url: str) -> str | None:
    """The password of a store URL as written (`user:PASSWORD@`), or None."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return password or None


def url_secrets(url: str) -> list[str]:
    """Every form of the URL's passwords a log line could hold: `user:PASSWORD@` and
    `?password=` / `?sslpassword=`, as written in the URL (percent-encoded) and decoded."""
    written = [m.group(2) for m in _QUERY_PASSWORD.finditer(url)]
    password = url_password(url)
    if password is not None:
        written.append(password)
    return sorted({form for value in written if value
                   for form in (value, unquote(value))})


def check_url(url: str) -> str:
    """The reason a store URL cannot be used, or "" when it is well formed:
    `sqlite:///PATH` with a file path, or `postgresql://[USER[:PASS]@]HOST[:PORT]/DB`."""
    if url.startswith(SQLITE_PREFIX):
        if url[len(SQLITE_PREFIX):] in ("", ":memory:"):
            # a file, not memory: the audit writer is another process, with memory of its own
            return "a sqlite:///PATH url with a file path"
        return ""
    scheme, _, rest = url.partition("://")
    if scheme in POSTGRES_SCHEMES and "@" in rest \
            and not _USERINFO.fullmatch(rest[:rest.rindex("@")]):
        # An unencoded `@`, `/`, `?` or `%` in the password: the URL no longer says where
        # it ends, and a driver would take part of it for the host (and print it).
        return ("a postgresql://USER:PASS@HOST:PORT/DB url with '@', '/', '?', '#' and '%' "
                "in USER and PASS percent-encoded (%40, %2F, %3F, %23, %25)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        return "a sqlite:///PATH or postgresql://USER:PASS@HOST:PORT/DB url (bad port)"
    if parts.scheme in POSTGRES_SCHEMES:
        if not parts.hostname or not parts.path.strip("/"):
            return "a postgresql://USER:PASS@HOST:PORT/DB url with a host and a database"
        return ""
    return "a sqlite:///PATH or postgresql://USER:PASS@HOST:PORT/DB url"


def open_database(url: str, *, readonly: bool = False, timeout_s: float = 5.0) -> Database:
    """Connect to the store at `url`, creating or migrating its schema unless `readonly`.

    Raises StoreError for a URL or database that cannot be used, StoreUnavailable when
    the server cannot be reached within `timeout_s` (PostgreSQL).
    """
    problem = check_url(url)
    if problem:
        raise StoreError(f"unsupported store url {redact_url(url)!r}: expected {problem}")
    if is_postgres(url):
        from proxy.audit.postgres import connect_postgres

        return connect_postgres(url, readonly=readonly, timeout_s=timeout_s)
    from proxy.audit.sqlite import connect_sqlite

    return connect_sqlite(url[len(SQLITE_PREFIX):], readonly=readonly)


def split_statements(script: str) -> Iterator[str]:
    """The statements of a migration script (none holds a `;` of its own)."""
    for statement in script.split(";"):
        if statement.strip():
            yield statement.strip()
