"""The audit writer process: reads batches of rows from stdin, writes them to the audit
database (SQLite or PostgreSQL, proxy.audit.database).

Started by `proxy.audit.store.AuditStore` as `python -m proxy.audit.writer`. The first
stdin line is its settings, `{"url", "retention_s", "max_rows"}` (on stdin, not the command
line, where `ps` would show the URL's password). Each further line is a JSON command:
`["rows", [...]]` (answered `w N` once written, `x N` when the batch could not be written),
`["flush", TOKEN]` (answered `ok TOKEN`: everything before it is done).

When the database cannot be reached (PostgreSQL stopped or refusing), the batch in hand is
kept and tried again with a growing pause (up to `RETRY_MAX_S`) until it is written; the
process says `d REASON` once when the database goes away and `u` once when it is back
(and `u` when it first connects).
Meanwhile it reads no more commands: the proxy counts what it has sent and not had
acknowledged, and drops (and counts) new rows past its bound, so an outage never grows
memory without bound nor blocks a request.

Only the end of stdin ends it (the proxy closed it, or died): signals sent to the proxy's
whole process group (Ctrl-C, a service manager stopping the unit) are ignored, so rows
queued during a graceful shutdown are still written. Retention runs every minute.
Acknowledgements go to the original stdout; anything else this process might print goes
to stderr.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import IO, Any

import orjson

from proxy.audit.database import (
    Database,
    StoreError,
    StoreUnavailable,
    open_database,
    redact_text,
    url_secrets,
)
from proxy.audit.schema import apply_retention, row_count, write_rows

RETENTION_EVERY_S = 60.0
#: Pauses between tries while the database is away: from RETRY_MIN_S, doubling.
RETRY_MIN_S = 0.1
RETRY_MAX_S = 2.0


#: The store URL's password, in every form (set from the settings line).
_secrets: list[str] = []


def _say(text: str) -> None:
    """A log line of our own on stderr (this process has no structlog set up), without
    the store URL's password."""
    text = redact_text(text)
    for secret in _secrets:
        text = text.replace(secret, "***")
    print(f'{{"event": "audit_writer", "level": "error", '
          f'"detail": {orjson.dumps(text).decode()}}}', file=sys.stderr, flush=True)


class Writer:
    """The database connection, (re)opened as needed, and the acknowledgements."""

    def __init__(self, url: str, retention_s: float, max_rows: int, acks: IO[bytes]) -> None:
        self.url = url
        self.retention_s = retention_s
        self.max_rows = max_rows
        self.acks = acks
        self.db: Database | None = None
        #: Whether the database was reachable when last tried (None: not tried yet). The
        #: first connection is always reported: the proxy may have found the database
        #: away at its own start, and must hear that it is back.
        self.reachable: bool | None = None
        self.last_retention = 0.0

    def database(self) -> Database:
        """The open connection, opened (and the schema migrated) until it works."""
        pause = RETRY_MIN_S
        while self.db is None:
            try:
                self.db = open_database(self.url)
            except StoreError as exc:  # away, or refusing us (e.g. a right revoked): wait
                self._went_away(exc)
                time.sleep(pause)
                pause = min(pause * 2, RETRY_MAX_S)
        if self.reachable is not True:
            self.reachable = True
            self.acks.write(b"u\n")
        return self.db

    def _went_away(self, exc: StoreError) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except Exception:  # noqa: BLE001 - a connection already broken
                pass
            self.db = None
        if self.reachable is not False:
            self.reachable = False
            self.acks.write(b"d " + str(exc).replace("\n", " ").encode() + b"\n")

    def rows(self, batch: list[list[Any]]) -> None:
        """Write one batch, waiting for the database as long as it is away; acknowledged
        in rows (a request entry stands for several, schema.row_count), as the proxy
        counts them."""
        count = sum(map(row_count, batch))
        pause = RETRY_MIN_S
        while True:
            db = self.database()
            try:
                write_rows(db, batch)
            except StoreUnavailable as exc:
                self._went_away(exc)
                time.sleep(pause)
                pause = min(pause * 2, RETRY_MAX_S)
                continue
            except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the writer
                _say(f"audit batch of {len(batch)} rows not written: {exc!r}")
                self.acks.write(b"x %d\n" % count)
                return
            self.acks.write(b"w %d\n" % count)
            break
        now = time.monotonic()
        if now - self.last_retention > RETENTION_EVERY_S:
            self.last_retention = now
            try:
                apply_retention(db, self.retention_s, self.max_rows)
            except StoreUnavailable as exc:
                self._went_away(exc)
            except Exception as exc:  # noqa: BLE001
                _say(f"retention failed: {exc!r}")


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    acks = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints must not corrupt the acknowledgements
    stdin = sys.stdin.buffer
    settings = orjson.loads(stdin.readline() or b"{}")
    _secrets.extend(url_secrets(settings["url"]))
    writer = Writer(settings["url"], float(settings["retention_s"]), int(settings["max_rows"]),
                    acks)
    writer.database()
    for line in stdin:
        try:
            command, arg = orjson.loads(line)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            _say(f"unreadable command: {line[:80]!r}")
            continue
        if command == "rows":
            writer.rows(arg)
        elif command == "flush":
            acks.write(b"ok %d\n" % int(arg))
    if writer.db is not None:
        writer.db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
