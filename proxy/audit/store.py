"""The audit store: route plans, events and lineage in SQLite, written off the request path.

Requests hand rows to `AuditStore.submit`, which never blocks and never waits on disk: it
appends to a list. Every `SEND_EVERY_S` the rows gathered so far go, as one JSON line, down
a pipe to a writer *process* (`proxy.audit.writer`) that inserts them in one transaction.
A separate process, not a thread, because a writer thread binding rows for SQLite keeps
taking the interpreter lock back from the event loop: on a busy proxy that cost the loop
more CPU than the rows themselves. The writer acknowledges every batch, so the proxy knows
how many rows are in flight; beyond `queue_size` rows not yet written, new rows are dropped
and counted (`dropped`), never the request. On shutdown everything queued is written before
the writer exits. SQLite runs in WAL mode so readers (the admin API, the `events` command)
never block the writer.
"""


from __future__ import annotations

import asyncio
import itertools
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
import structlog

from proxy.audit.schema import (
    EVENT,
    LINEAGE,
    PLAN,
    EventQuery,
    apply_retention,
    connect,
    query_events,
    sqlite_path,
)

log = structlog.get_logger("proxy.audit.store")
T = TypeVar("T")


class AuditStore:
    """Batched, non-blocking writes to SQLite through a writer process.

    Used from the event loop's thread only. Reads (`query`) use the store's own
    connection in a worker thread, after a flush so that a reader sees its own request.
    """

    #: How often gathered rows go to the writer.
    SEND_EVERY_S = 0.02

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
        self._rows: list[Any] = []
        self._inflight = 0  # rows sent to the writer, not yet written
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._tokens = itertools.count(1)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._last_warning = 0.0
        self._broken = False
        self._closing = False

    @property
    def writer_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    #: Pause before starting a new writer after one died.
    RESTART_AFTER_S = 1.0

    async def start(self) -> None:
        self._conn = await asyncio.to_thread(connect, self.path)  # creates/migrates the schema
        await self._spawn()

    async def _spawn(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.audit.writer", self.path, repr(self.retention_s),
            str(self.max_rows), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            start_new_session=True)  # a signal to the proxy's group does not reach it
        self._broken = False
        self._inflight = 0
        self._reader = asyncio.get_running_loop().create_task(self._read_acks(self._proc))

    def submit(self, row: list[Any]) -> None:
        """Queue a row without waiting; if the writer is behind, drop it and count."""
        if self._proc is None:
            return
        rows = self._rows
        if self._broken or len(rows) + self._inflight >= self.queue_size:
            self._drop(1, "writer behind; queue full" if not self._broken else "writer gone")
            return
        if not rows and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.SEND_EVERY_S, self._send)
        rows.append(row)
        if len(rows) >= self.batch:
            self._send()

    def _drop(self, n: int, reason: str) -> None:
        self.dropped += n
        if self.on_drop is not None:
            self.on_drop(n)
        now = time.monotonic()
        if now - self._last_warning > 5.0:
            self._last_warning = now
            log.warning("audit_events_dropped", dropped_total=self.dropped, reason=reason)

    def event(self, ts: float, type_: str, request_id: str | None, plan_id: str | None,
              instance: str | None, reason_code: str | None = None,
              from_instance: str | None = None, to_instance: str | None = None,
              detail: dict[str, Any] | None = None) -> None:
        self.submit([EVENT, ts, type_, request_id, plan_id, instance, reason_code,
                     from_instance, to_instance, detail])

    def lineage(self, ts: float, request_id: str | None, plan_id: str | None,
                from_instance: str | None, to_instance: str | None, reason_code: str) -> None:
        self.submit([LINEAGE, ts, "route_change", request_id, plan_id, from_instance,
                     to_instance, reason_code])

    def plan(self, plan: Any, row: tuple[Any, ...]) -> None:
        """A route_plans row: `plan` (anything with `as_dict()`, turned into data when the
        batch is sent, off the request path) and (plan_id, request_id, ts, model, selected,
        final_instance, outcome, status, attempts, ttfb_ms, duration_ms)."""
        self.submit([PLAN, plan, *row])

    def _send(self) -> None:
        """Send what has gathered to the writer as one line."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        rows, self._rows = self._rows, []
        proc = self._proc
        if not rows or proc is None or proc.stdin is None:
            return
        try:
            for row in rows:
                if row[0] == PLAN:
                    row[1] = row[1].as_dict()
            line = orjson.dumps(["rows", rows]) + b"\n"
        except (TypeError, ValueError, orjson.JSONEncodeError) as exc:
            log.error("audit_batch_unserialisable", rows=len(rows), error=str(exc))
            self._drop(len(rows), "unserialisable batch")
            return
        if self._broken:
            self._drop(len(rows), "writer gone")
            return
        try:
            proc.stdin.write(line)
        except (ConnectionError, RuntimeError):
            self._drop(len(rows), "writer gone")
            return
        self._inflight += len(rows)

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
        """The writer's answers: `w N` (N rows written), `x N` (N rows it could not write)
        and `ok TOKEN` (command done). When it dies, a new one is started."""
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

    def apply_retention(self) -> None:
        """Run retention now (tests, admin)."""
        with self._lock:
            if self._conn is not None:
                apply_retention(self._conn, self.retention_s, self.max_rows)

    async def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until everything queued so far is written."""
        if self._proc is None:
            return
        try:
            await asyncio.wait_for(self._command("flush"), timeout_s)
        except TimeoutError:
            log.warning("audit_flush_timeout", timeout_s=timeout_s)

    async def query(self, q: EventQuery) -> list[dict[str, Any]]:
        """Read events (after writing what is queued, so a reader sees its own request)."""
        return await self.read(lambda conn: query_events(conn, q))

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read (`query_events`, `query_plans`...) on the store's connection in a
        worker thread, after writing what is queued."""
        await self.flush()

        def run() -> T:
            with self._lock:
                assert self._conn is not None
                return fn(self._conn)

        return await asyncio.to_thread(run)

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
            try:
                await asyncio.wait_for(proc.wait(), 30.0)
            except TimeoutError:
                log.error("audit_writer_stuck", pid=proc.pid)
                proc.kill()
                await proc.wait()
            if self._reader is not None:
                await self._reader
        elif self._reader is not None:  # between a writer's death and its successor
            self._reader.cancel()
        self._proc = None
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

