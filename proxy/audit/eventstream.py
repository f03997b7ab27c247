"""The live event feed: routing events as they happen, for the status page and `status`.

`EventHub` receives the events people watch (REROUTED, ROUTE_BLOCKED, STREAM_RESUMED,
INSTANCE_STATE_CHANGED) from the recorder, keeps the latest `RECENT` of them, and hands
each to every subscriber of `GET /admin/events/stream` (proxy.api.status; server-sent
events, WHATWG HTML "Server-sent events": `id:`, `event:`, `data:` lines, a blank line
between events).

Each subscriber has a bounded queue: a client that reads slower than events arrive loses
the oldest events that do not fit (counted, and announced to it as an `event: missed`
with the count once it catches up), so a slow or stalled reader never grows the proxy's memory.
On shutdown every stream gets `event: shutdown` and ends cleanly, so the server's graceful
shutdown never waits on an open stream. Per process: with `--workers N` a stream sees the
events of the worker that serves it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Iterable
from typing import Any

import orjson

#: Events the hub publishes (the others are per request, for the audit trail only).
LIVE_TYPES = frozenset({"REROUTED", "ROUTE_BLOCKED", "STREAM_RESUMED",
                        "INSTANCE_STATE_CHANGED"})
#: Events kept for a new subscriber, `status` and the status page's first view.
RECENT = 200
#: Events a subscriber may have waiting before the oldest are dropped for it.
QUEUE_SIZE = 256
#: A comment line sent on an idle stream this often: it shows a dead client (the write
#: fails) and keeps intermediaries from closing the connection.
HEARTBEAT_S = 15.0
#: The reconnection delay an EventSource is asked to use (`retry:`, milliseconds).
RETRY_MS = 2000

_CLOSED = b""  # queued last: the hub closed


def encode(event: dict[str, Any]) -> bytes:
    """One event as an SSE message: `id: N`, `event: TYPE`, `data: JSON`, blank line."""
    return (b"id: %d\nevent: %s\ndata: " % (event["id"], event["type"].encode())
            + orjson.dumps(event) + b"\n\n")


class Subscriber:
    """One open stream: a bounded queue of encoded events."""

    __slots__ = ("queue", "missed", "closed")

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(size)
        #: Events dropped since the reader last caught up.
        self.missed = 0
        self.closed = False

    def offer(self, data: bytes) -> None:
        queue = self.queue
        if queue.full():  # the oldest goes: a live view wants the latest
            queue.get_nowait()
            self.missed += 1
        queue.put_nowait(data)

    def close(self) -> None:
        self.closed = True
        if self.queue.full():  # make room for the end mark: the stream is ending anyway
            self.queue.get_nowait()
            self.missed += 1
        self.queue.put_nowait(_CLOSED)

    async def next_chunk(self, timeout_s: float) -> bytes | None:
        """Every event waiting (one write), `b""` on the heartbeat timeout, None when the hub
        has closed and everything before that was returned."""
        queue = self.queue
        if queue.empty():
            try:
                async with asyncio.timeout(timeout_s):
                    first = await queue.get()
            except TimeoutError:
                return b""
        else:
            first = queue.get_nowait()
        parts = [first]
        while not queue.empty():
            parts.append(queue.get_nowait())
        ended = parts[-1] is _CLOSED
        if ended:
            parts.pop()
        if self.missed:
            parts.insert(0, b"event: missed\ndata: {\"missed\": %d}\n\n" % self.missed)
            self.missed = 0
        if ended and not parts:
            return None
        if ended:
            queue.put_nowait(_CLOSED)  # seen again at the next call, which returns None
        return b"".join(parts)


class EventHub:
    """Fans the live events out to the open streams; keeps the latest ones."""

    def __init__(self, recent: int = RECENT, queue_size: int = QUEUE_SIZE) -> None:
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self.subscribers: set[Subscriber] = set()
        self.queue_size = queue_size
        self.closed = False
        #: Events published since start, by (type, reason code): the hourly tallies read it.
        self.counts: dict[tuple[str, str], int] = {}
        self._ids = itertools.count(1)

    def publish(self, ts: float, type_: str, request_id: str | None, plan_id: str | None,
                instance: str | None, reason_code: str | None = None,
                from_instance: str | None = None, to_instance: str | None = None,
                detail: dict[str, Any] | None = None) -> None:
        """An event in the audit trail's row shape (`GET /admin/events`), with the hub's own
        increasing `id`. Types outside LIVE_TYPES are ignored."""
        if type_ not in LIVE_TYPES:
            return
        key = (type_, reason_code or "")
        self.counts[key] = self.counts.get(key, 0) + 1
        event = {"id": next(self._ids), "ts": ts, "type": type_, "request_id": request_id,
                 "plan_id": plan_id, "instance": instance, "reason_code": reason_code,
                 "from_instance": from_instance, "to_instance": to_instance,
                 "detail": detail}
        self.recent.append(event)
        if self.subscribers:
            data = encode(event)  # once for every subscriber
            for sub in self.subscribers:
                sub.offer(data)

    def latest(self, n: int, types: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The newest `n` kept events (of `types`, if given), oldest first."""
        wanted = None if types is None else frozenset(types)
        found = [e for e in reversed(self.recent) if wanted is None or e["type"] in wanted]
        return found[:n][::-1]

    def subscribe(self, after_id: int | None = None) -> Subscriber:
        """A new stream, first given the kept events (those after `after_id`, when a
        reconnecting EventSource says what it saw last)."""
        sub = Subscriber(self.queue_size)
        backlog = [e for e in self.recent if after_id is None or e["id"] > after_id]
        for event in backlog[-self.queue_size:]:
            sub.offer(encode(event))
        if self.closed:
            sub.close()
        else:
            self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def close(self) -> None:
        """Shutdown: every stream ends once it has sent what it had."""
        self.closed = True
        for sub in self.subscribers:
            sub.close()
        self.subscribers.clear()
