"""Server-sent events off the wire: an upstream byte stream split into events, each event's
`data:` payload, within a size limit and the waits the caller sets.

The relay forwards events as the upstream framed them; what a chunk carries is read in
proxy.engine.chunks, once per event.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

import aiohttp

from proxy.failures import (
    UpstreamFailure,
    UpstreamProtocolError,
    UpstreamTimeout,
    failure_from,
)

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"


class EventSource(Protocol):
    """Anything that yields complete SSE events (an EventReader, or a translating one)."""

    async def next(self, timeout_s: float | None = None, phase: str = "idle") -> bytes | None:
        ...

    def buffered(self) -> bytes | None:
        """The next event if one is already at hand, else None (never waits)."""
        ...


class EventReader:
    """Yields raw events, each ending in its blank-line terminator (line ends normalised
    to LF), from an aiohttp response body (`resp.content`).

    An event longer than `max_event_bytes` fails with UpstreamProtocolError instead of
    being buffered on. A wait longer than its `timeout_s` fails with UpstreamTimeout(phase);
    a cut or reset body with ProcessExited (see proxy.failures.failure_from).

    Waits share one lazy timer per stream rather than one timer per wait: each wait only
    moves the deadline, and the timer, when it fires early, re-arms itself for what is
    left (so a stream of frequent events costs about one timer per timeout period). It
    ends the wait by failing the body reader, the way aiohttp's own sock_read does.
    """

    __slots__ = ("_content", "_max", "_buffer", "_events", "_eof", "_cr", "_loop",
                 "_timer", "_deadline", "_phase", "_timeout_s")

    def __init__(self, content: aiohttp.StreamReader, max_event_bytes: int) -> None:
        self._content = content
        self._max = max_event_bytes
        self._buffer = bytearray()  # an unfinished event (LF-normalised)
        self._events: deque[bytes] = deque()
        self._eof = False
        self._cr = False  # the last chunk ended in CR: maybe half of a CRLF
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None  # of the wait in progress
        self._phase = "idle"
        self._timeout_s = 0.0
        content.on_eof(self._drop_timer)

    async def next(self, timeout_s: float | None = None, phase: str = "idle") -> bytes | None:
        """The next event, or None when the stream has ended; an event already at hand is
        returned without waiting, else the whole wait is bounded by `timeout_s`."""
        events = self._events
        if events:
            return events.popleft()
        if timeout_s is not None:
            self._arm(timeout_s, phase)
        try:
            while not events:
                if self._eof:
                    return None
                try:
                    chunk = await self._content.readany()
                except UpstreamFailure:
                    raise
                except Exception as exc:
                    raise failure_from(exc, phase, timeout_s) from exc
                if chunk:
                    self._feed(chunk)
                else:
                    self._end()
        finally:
            self._deadline = None
        return events.popleft()

    def buffered(self) -> bytes | None:
        """The next event if one is already at hand (no waiting), else None."""
        events = self._events
        return events.popleft() if events else None

    def _feed(self, chunk: bytes) -> None:
        if self._cr or b"\r" in chunk:
            chunk = self._normalise(chunk)
        buf = self._buffer
        if buf:
            # Search only where a terminator can be new: one byte back, for a LF that
            # ended the previous chunk.
            scan = len(buf) - 1
            buf += chunk
            if buf.find(b"\n\n", scan) < 0:
                self._check_size(buf)
                return
            data = bytes(buf)
            buf.clear()
        else:
            data = chunk
        start = 0
        find = data.find
        append = self._events.append
        while True:
            end = find(b"\n\n", start)
            if end < 0:
                break
            if end > start:
                append(data[start:end + 2])
            start = end + 2
        if start < len(data):
            buf += data[start:] if start else data
            self._check_size(buf)

    def _normalise(self, chunk: bytes) -> bytes:
        """CRLF and CR line ends as LF; a CR at the end of a chunk waits for the next one
        (it may be the first half of a CRLF)."""
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._cr = True
        return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

    def _check_size(self, buf: bytearray) -> None:
        if len(buf) > self._max:
            raise UpstreamProtocolError(f"a server-sent event longer than {self._max} bytes "
                                        "(upstream.max_event_bytes)")

    def _end(self) -> None:
        self._eof = True
        if self._cr:
            self._buffer += b"\n"
            self._cr = False
        tail = bytes(self._buffer).strip()
        self._buffer.clear()
        if tail:
            # An unterminated last event is still an event; the caller judges it.
            self._events.append(tail + b"\n\n")

    # -- the stream's timer -----------------------------------------------------------

    def _arm(self, timeout_s: float, phase: str) -> None:
        deadline = self._loop.time() + timeout_s
        self._deadline = deadline
        self._phase = phase
        self._timeout_s = timeout_s
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return  # no wait in progress
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._expire)
            return
        self._content.set_exception(UpstreamTimeout(self._phase, self._timeout_s))

    def _drop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def event_data(event: bytes) -> bytes | None:
    """The `data:` payload of an event (several data lines joined), or None if it has none."""
    if event.startswith(b"data: ") and event.find(b"\n") == len(event) - 2:
        return event[6:-2]  # the common case: one `data: ...` line
    lines = []
    for line in event.rstrip(b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            payload = line[5:]
            lines.append(payload[1:] if payload.startswith(b" ") else payload)
    return b"\n".join(lines) if lines else None

