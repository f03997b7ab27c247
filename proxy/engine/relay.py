"""A streamed answer, event by event: read up to the commit point (the first model
output), then relayed to the client as it comes, or spliced into the client's stream when
it continues another instance's answer (proxy.engine.splicing).

Every failure before the commit point is still invisible to the client; after it, a
failure is a CommittedFailure, carrying what the client has.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Protocol

from proxy.config import TimeoutsConfig
from proxy.engine.chunks import Chunk, inspect_chunk
from proxy.engine.splicing import Delivered, Splicer
from proxy.failures import (
    ContextTooLong,
    EmptyStream,
    FingerprintMismatch,
    ProcessExited,
    StreamCut,
    StreamStalled,
    UpstreamErrorEvent,
    UpstreamFailure,
    UpstreamTimeout,
)
from proxy.health.fingerprints import Pin
from proxy.providers import overflow
from proxy.providers.sse import DONE, DONE_EVENT, EventSource, event_data
from proxy.secrets import Redactor


class StreamSink(Protocol):
    """Where a committed stream goes: the HTTP layer's response to the client."""

    async def start(self, instance_id: str, attempts: int, first: bytes,
                    upstream_headers: dict[str, str]) -> None:
        """Send the response head and the first events (one write). `upstream_headers`
        are the upstream's headers relayed to the client (its rate-limit headers)."""
        ...

    async def write(self, data: bytes) -> None: ...


class ClientGone(Exception):
    """The client went away while we were writing to it."""


class CommittedFailure(Exception):
    """A stream failed after the client had received part of the answer."""

    def __init__(self, failure: UpstreamFailure, delivered: Delivered, ttfb_s: float) -> None:
        super().__init__(failure.detail)
        self.failure = failure
        self.delivered = delivered
        self.ttfb_s = ttfb_s


class Relay:
    """Reads and relays streamed answers within the configured timeouts; holds no
    per-stream state itself."""

    def __init__(self, timeouts: TimeoutsConfig, redactor: Redactor) -> None:
        self.timeouts = timeouts
        #: In-band error text comes from the upstream: it may quote a key.
        self.redactor = redactor

    async def until_content(self, reader: EventSource, pending: list[tuple[bytes, Chunk | None]],
                             deadline: float, pinned: Pin | None) -> None:
        """Read events before the commit point into `pending` (a `[DONE]` with chunk None).

        Returns at the first chunk with model output (answer text, reasoning, a tool call
        or a refusal: see proxy.engine.chunks) or a finish reason, or at `[DONE]`; so `deadline`
        (first_byte_s) bounds only the wait for the first output, however long the answer
        then takes. Raises a failure (still invisible to the client) on any problem: a
        stream that ends first is EMPTY_STREAM, an in-band error that says the prompt does
        not fit is a ContextTooLong.
        """
        while True:
            remaining = max(deadline - time.perf_counter(), 0.001)
            event = await reader.next(remaining, "first_byte")
            if event is None:
                raise EmptyStream("stream ended before any content")
            payload = event_data(event)
            if payload is None:
                continue  # comment or keep-alive
            if payload == DONE:
                if pending:
                    pending.append((event, None))
                    return
                raise EmptyStream("stream ended before any content")
            chunk = inspect_chunk(payload)  # a MalformedEvent is STREAM_MALFORMED
            if chunk.error is not None:
                overflowed = overflow.of_error(chunk.error)
                if overflowed is not None:  # e.g. llama.cpp builds that say it in-band
                    raise ContextTooLong(dataclasses.replace(
                        overflowed, message=self.redactor.text(overflowed.message)))
                raise UpstreamErrorEvent(self.redactor.text(_error_message(chunk.error)))
            if pinned is not None and chunk.model is not None:
                if pinned.contradicted_by(chunk.model):
                    raise FingerprintMismatch(
                        f"answered as {chunk.model}, pinned {pinned.describe()}")
                pinned = None  # checked once per stream (a chunk claiming nothing has None)
            pending.append((event, chunk))
            if chunk.has_content or chunk.finish_reason is not None:
                return

    async def relay(self, reader: EventSource, sink: StreamSink, delivered: Delivered,
                    splicer: Splicer | None, first_deadline: float, deadline: float) -> None:
        """Relay events until `[DONE]` (or a clean end after a finish reason).

        Without a splicer, events go out as the upstream framed them. With one (a
        continuation or replay), each chunk is rewritten into the client's stream, and
        until it has sent something new its failures are still invisible. Raises a stream
        failure; `delivered` always says what the client has (its usage too).
        """
        idle = self.timeouts.idle_s
        next_event = reader.next
        buffered = reader.buffered
        committed = splicer is None or splicer.committed
        # first_byte_s bounds the wait for a continuation's first output only; once it
        # streams anything (reasoning not relayed, a replay of what the client has), the
        # wait between events is idle_s.
        producing = committed
        out: list[bytes] = []  # what goes to the client in one write
        try:
            while True:
                event = buffered() if out else None
                if event is None:
                    if out:  # nothing more at hand: send what we have before waiting
                        await sink.write(b"".join(out))
                        out.clear()
                    event = await (next_event(idle, "idle") if producing else next_event(
                        max(first_deadline - time.perf_counter(), 0.001), "first_byte"))
                    if event is None:
                        out.append(_ended(delivered, committed))
                        break
                payload = event_data(event)
                if payload is None:
                    continue  # a comment or keep-alive
                if payload == DONE:
                    out.append(DONE_EVENT if splicer is not None else event)
                    break
                chunk = inspect_chunk(payload)  # a MalformedEvent is STREAM_MALFORMED
                if chunk.error is not None:
                    raise UpstreamErrorEvent(self.redactor.text(_error_message(chunk.error)))
                if splicer is None:
                    delivered.note(chunk)
                    out.append(event)
                else:
                    spliced = splicer.feed(chunk.obj)
                    producing = splicer.producing
                    if spliced is not None:
                        out.append(spliced)
                        committed = splicer.committed
                if time.perf_counter() > deadline:
                    raise UpstreamTimeout("total", self.timeouts.total_s)
        except UpstreamFailure as failure:
            # What was accepted before the failure still reaches the client, so that
            # `delivered` stays exactly what it has.
            await _send_rest(sink, out)
            raise _as_committed(failure, committed, idle) from None
        await sink.write(b"".join(out))


async def _send_rest(sink: StreamSink, out: list[bytes]) -> None:
    if out:
        await sink.write(b"".join(out))


def _ended(delivered: Delivered, committed: bool) -> bytes:
    """The last event of a stream whose connection closed cleanly: a `[DONE]` for an
    answer that finished but was not terminated; otherwise it was cut short."""
    if delivered.finished:
        return DONE_EVENT  # complete but unterminated: finish it properly for the client
    if committed:
        raise StreamCut("stream ended without a finish reason")
    raise EmptyStream("continuation ended before anything new")


def _as_committed(failure: UpstreamFailure, committed: bool, idle_s: float) -> UpstreamFailure:
    """A failure to wait for the next event of a stream the client is receiving: a reset
    is a cut (STREAM_CUT), a wait past idle_s a stall (STREAM_STALLED). Before the commit
    point, a failure stays what it was (invisible to the client)."""
    if not committed:
        return failure
    if isinstance(failure, ProcessExited):
        return StreamCut(failure.detail)
    if isinstance(failure, UpstreamTimeout) and failure.phase != "total":
        return StreamStalled(f"no chunk within {idle_s:g}s")
    return failure


def _error_message(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or "upstream reported an error")
    return str(error)

