"""The audit store: route plans, events and lineage in SQLite or PostgreSQL (by the URL's
scheme, proxy.audit.database), written off the request path.

Requests hand rows to `AuditStore.submit`, which never blocks and never waits on disk: it
appends the row, as JSON, to a list. A request's routine rows travel as one entry
(`AuditStore.request`) from which the writer derives them (proxy.audit.schema). Every
`SEND_EVERY_S` the rows gathered so far go, as one line, down a pipe to a writer
*process* (`proxy.audit.writer`) that inserts them in one transaction.
A separate process, not a thread, because a writer thread binding rows for SQLite keeps
taking the interpreter lock back from the event loop: on a busy proxy that cost the loop
more CPU than the rows themselves. The writer acknowledges every batch, so the proxy knows
how many rows are in flight; beyond `queue_size` rows not yet written, new rows are dropped
and counted (`dropped`; one log line when dropping starts and one when it stops), never
the request. When PostgreSQL is away the writer holds its batch and tries again until it is
written, so rows wait up to that bound and are written once the database is back; the
writer says when the database goes and comes back (`on_available`, one log line each). On
shutdown everything queued is written before the writer exits. SQLite runs in WAL mode so
readers (the admin API, the `events` command) never block the writer.

The URL's password never leaves this module but to the database driver: logs and errors
show `shown` (proxy.audit.database.redact_url), and the writer gets the URL on its stdin,
not its command line.
"""


from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
import structlog

from proxy.audit.database import (
    Database,
    StoreUnavailable,
    open_database,
    redact_url,
)
from proxy.audit.reader import StoreReader
from proxy.audit.schema import (
    EVENT,
    EventQuery,
    apply_retention,
    query_events,
    row_count,
)

log = structlog.get_logger("proxy.audit.store")
T = TypeVar("T")


def _sorted_set(value: Any) -> Any:
    """orjson's `default`: a set (a plan's requirements hold frozensets) as a sorted list,
    as RoutePlan.as_dict writes it."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class AuditStore:
    """Batched, non-blocking writes to the audit database through a writer process.

    Used from the event loop's thread only. Reads (`query`, `read`) go through a
    StoreReader (proxy.audit.reader), after a flush so that a reader sees its own request;
    they raise StoreUnavailable while the database cannot be reached or does not answer.
    """

    #: How often gathered rows go to the writer.
    SEND_EVERY_S = 0.02

    def __init__(self, url: str, *, queue_size: int = 50_000, batch: int = 2000,
                 retention_s: float = 7 * 86400.0, max_rows: int = 1_000_000,
                 on_drop: Callable[[int], None] | None = None,
                 on_available: Callable[[bool], None] | None = None) -> None:
        self.url = url
        #: The URL as logs and admin output may show it (no password).
        self.shown = redact_url(url)
        self.queue_size = queue_size
        self.batch = batch
        self.retention_s = retention_s
        self.max_rows = max_rows
        self.on_drop = on_drop
        self.on_available = on_available
        #: Whether the writer can reach the database (False while PostgreSQL is away).
        self.available = True
        self.dropped = 0
        self._dropping = 0  # rows dropped since dropping last started (0: not dropping)
        self.written = 0
        #: Rows queued, each already JSON: bytes are no work for the garbage collector,
        #: while rows kept as lists for SEND_EVERY_S would outlive a young collection
        #: and make the older ones run more often.
        self._rows: list[bytes] = []
        self._queued = 0  # rows in _rows (a request entry stands for several)
        self._inflight = 0  # rows sent to the writer, not yet written
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._tokens = itertools.count(1)
        self.reader = StoreReader(url)
        self._broken = False
        self._closing = False

    @property
    def writer_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    #: Pause before starting a new writer after one died.
    RESTART_AFTER_S = 1.0

    async def start(self) -> None:
        """Open the database (creating or migrating the schema) and start the writer.
        StoreError when the store cannot be used at all (psycopg missing, a schema newer
        than this release); a PostgreSQL that cannot be reached now is logged, and the
        writer waits for it."""
        try:
            await asyncio.to_thread(lambda: open_database(self.url).close())
        except StoreUnavailable as exc:
            self._set_available(False, str(exc))
        await self._spawn()

    async def _spawn(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.audit.writer", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True)  # a signal to the proxy's group does not reach it
        assert self._proc.stdin is not None
        self._proc.stdin.write(orjson.dumps({"url": self.url, "retention_s": self.retention_s,
                                             "max_rows": self.max_rows}) + b"\n")
        self._broken = False
        self._inflight = 0
        self._reader = asyncio.get_running_loop().create_task(self._read_acks(self._proc))

    def submit(self, row: list[Any], count: int = 1) -> None:
        """Queue a row (`count`: the rows it stands for, schema.row_count) without waiting;
        if the writer is behind, drop it and count."""
        if self._proc is None:
            return
        rows = self._rows
        if self._broken or self._queued + self._inflight >= self.queue_size:
            self._drop(count, self._why_full())
            return
        try:
            data = orjson.dumps(row, default=_sorted_set)
        except (TypeError, ValueError, orjson.JSONEncodeError) as exc:
            log.error("audit_row_unserialisable", kind=row[0], error=str(exc))
            self._drop(count, "unserialisable row")
            return
        if self._dropping:
            self._accepting_again()
        if not rows and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.SEND_EVERY_S, self._send)
        rows.append(data)
        self._queued += count
        if self._queued >= self.batch:
            self._send()

    def _why_full(self) -> str:
        if self._broken:
            return "writer gone"
        return "writer behind; queue full" if self.available else "database away; queue full"

    def _drop(self, n: int, reason: str) -> None:
        """Count rows that will not be written; one log line when dropping starts."""
        self.dropped += n
        if self.on_drop is not None:
            self.on_drop(n)
        if not self._dropping:
            log.warning("audit_rows_dropping", reason=reason, queue_size=self.queue_size,
                        dropped_total=self.dropped, store=self.shown)
        self._dropping += n

    def _accepting_again(self) -> None:
        """The first row queued after some were dropped: one log line saying how many."""
        log.warning("audit_rows_queued_again", dropped=self._dropping,
                    dropped_total=self.dropped, store=self.shown)
        self._dropping = 0

    def _set_available(self, available: bool, reason: str = "") -> None:
        """The writer reached, or lost, the database: one log line per change."""
        if available == self.available:
            return
        self.available = available
        if available:
            log.warning("audit_store_available", store=self.shown)
        else:
            log.error("audit_store_unavailable", store=self.shown, reason=reason,
                      queue_size=self.queue_size)
        if self.on_available is not None:
            self.on_available(available)

    def event(self, ts: float, type_: str, request_id: str | None, plan_id: str | None,
              instance: str | None, reason_code: str | None = None,
              from_instance: str | None = None, to_instance: str | None = None,
              detail: dict[str, Any] | None = None) -> None:
        self.submit([EVENT, ts, type_, request_id, plan_id, instance, reason_code,
                     from_instance, to_instance, detail])

    def request(self, entry: list[Any]) -> None:
        """One request's entry, `[REQUEST, ...]` as schema.request_rows reads it: the
        writer process derives its routine rows (ROUTE_PLANNED, ROUTE_VERIFIED,
        REQUEST_COMPLETED, the route_plans row) from it, so the request path builds one
        list instead of four rows. Its values are whatever orjson writes (sets as sorted
        lists)."""
        self.submit(entry, row_count(entry))

    def _send(self) -> None:
        """Send what has gathered to the writer as one line."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        rows, self._rows = self._rows, []
        count, self._queued = self._queued, 0
        proc = self._proc
        if not rows or proc is None or proc.stdin is None:
            return
        line = b'["rows",[' + b",".join(rows) + b"]]\n"
        if self._broken:
            self._drop(count, "writer gone")
            return
        try:
            proc.stdin.write(line)
        except (ConnectionError, RuntimeError):
            self._drop(count, "writer gone")
            return
        self._inflight += count

    def _command(self, name: str) -> asyncio.Future[None]:
        """Send a command the writer acknowledges once everything before it is done."""
        self._send()
        future = asyncio.get_running_loop().create_future()
        proc = self._proc
        if proc is None or proc.stdin is None or self._broken:
            future.set_result(None)
            return future
        token = next(self._tokens)
        self._waiters[token] = future
        try:
            proc.stdin.write(orjson.dumps([name, token]) + b"\n")
        except (ConnectionError, RuntimeError):
            self._writer_gone()
        return future

    async def _read_acks(self, proc: asyncio.subprocess.Process) -> None:
        """The writer's answers: `w N` (N rows written), `x N` (N rows it could not write),
        `ok TOKEN` (command done), `d REASON` (the database went away) and `u` (it is back).
        When it dies, a new one is started."""
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                break
            kind, _, value = line.strip().partition(b" ")
            if kind in (b"w", b"x"):
                n = int(value)
                self._inflight = max(0, self._inflight - n)
                if kind == b"w":
                    self.written += n
                else:
                    self._drop(n, "the writer could not write a batch")
            elif kind == b"ok":
                future = self._waiters.pop(int(value), None)
                if future is not None and not future.done():
                    future.set_result(None)
            elif kind == b"d":
                self._set_available(False, value.decode(errors="replace"))
            elif kind == b"u":
                self._set_available(True)
        self._writer_gone()
        if not self._closing:
            await asyncio.sleep(self.RESTART_AFTER_S)
            if not self._closing:
                log.warning("audit_writer_restarting")
                await self._spawn()

    def _writer_gone(self) -> None:
        """The writer exited: what it had not acknowledged is lost; say so once."""
        if not self._broken and not self._closing:
            code = self._proc.returncode if self._proc is not None else None
            log.error("audit_writer_gone", exit_code=code, rows_lost=self._inflight)
            if self._inflight:
                self._drop(self._inflight, "writer gone")
        self._inflight = 0
        self._broken = True
        for future in self._waiters.values():
            if not future.done():
                future.set_result(None)
        self._waiters.clear()

    async def apply_retention(self) -> None:
        """Run retention now (tests), on a connection of its own."""
        def run() -> None:
            db = open_database(self.url)
            try:
                apply_retention(db, self.retention_s, self.max_rows)
            finally:
                db.close()

        await asyncio.to_thread(run)

    async def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until everything queued so far is written (not at all while the database
        is away: what is queued then waits for it)."""
        if self._proc is None or not self.available:
            return
        try:
            await asyncio.wait_for(self._command("flush"), timeout_s)
        except TimeoutError:
            log.warning("audit_flush_timeout", timeout_s=timeout_s)

    async def query(self, q: EventQuery) -> list[dict[str, Any]]:
        """Read events (after writing what is queued, so a reader sees its own request)."""
        return await self.read(lambda conn: query_events(conn, q))

    async def read(self, fn: Callable[[Database], T]) -> T:
        """Run a read (`query_events`, `query_plans`...) on the reader's connection, after
        writing what is queued (waiting 5 s at most for that). StoreUnavailable while the
        database cannot be reached or does not answer in time."""
        await self.flush(5.0)
        return await self.reader.read(fn)

    async def close(self) -> None:
        """Stop the writer after it has written everything queued, then close the database."""
        proc = self._proc
        if proc is not None:
            self._closing = True
            if self._timer is not None:
                self._timer.cancel()
            self._send()
            if proc.stdin is not None:
                try:
                    proc.stdin.close()  # the writer finishes what it has, then exits
                except (ConnectionError, RuntimeError):
                    pass
            try:  # (while the database is away, what is queued is not waited for long)
                await asyncio.wait_for(proc.wait(), 30.0 if self.available else 2.0)
            except TimeoutError:
                log.error("audit_writer_stuck", pid=proc.pid, rows_lost=self._inflight,
                          database_available=self.available)
                proc.kill()
                await proc.wait()
                if self._inflight:
                    self._drop(self._inflight, "shut down before the database came back")
                    self._inflight = 0
            if self._reader is not None:
                await self._reader
        elif self._reader is not None:  # between a writer's death and its successor
            self._reader.cancel()
        self._proc = None
        await self.reader.close()

