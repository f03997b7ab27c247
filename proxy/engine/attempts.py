"""One attempt on one instance: send the request, read the answer up to the commit point,
relay it. The attempt loop (proxy.engine.forwarder) decides who is tried and what an
outcome means; this module only carries one try out, in one of three modes:

- fresh, not streamed: the whole answer is read before anything is sent to the client;
- fresh, streamed: events are buffered until the first model output (the commit point),
  then the client's response starts and the rest is relayed as it comes;
- a continuation of a cut stream (prefill or replay): the instance's stream is spliced
  into the client's (proxy.engine.splicing), and only what is new reaches the client.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson

from proxy.api.inbound import CHAT, ClientRequest
from proxy.audit.usage import Usage
from proxy.audit.usage import estimate as estimate_usage
from proxy.audit.usage import estimate_body as estimate_body_usage
from proxy.audit.usage import of_body as usage_of_body
from proxy.audit.usage import of_object as usage_of_object
from proxy.config import Config
from proxy.engine.chunks import Chunk, whole_as_events
from proxy.engine.record import PREFILL, RequestRecord
from proxy.engine.relay import CommittedFailure, Relay, StreamSink
from proxy.engine.splicing import Delivered, Diverged, Splicer, continuation_body
from proxy.failures import (
    FingerprintMismatch,
    NotStreamed,
    PrefillRejected,
    ReplayDiverged,
    StreamMalformed,
    UnsupportedRequest,
    UpstreamFailure,
    UpstreamProtocolError,
)
from proxy.health.fingerprints import response_model
from proxy.health.instance import InstanceState
from proxy.providers.base import PassThrough
from proxy.providers.sse import EventSource
from proxy.providers.transport import Response, Upstream

#: Why a prefill cannot continue a particular stream (a skip's detail).
NO_PREFILL = "a text completion whose prompt is not one string cannot be continued by prefill"
REASONING_ONLY = "only reasoning was delivered: a prefill (answer text) cannot continue a reasoning"

_EVENT_STREAM = "text/event-stream"
#: What every 2xx answer of the OpenAI endpoints starts with (a cheap look, no parse).
_JSON_OBJECT = re.compile(rb"[ \t\r\n]*\{")


@dataclass(slots=True)
class Reply:
    """What the client gets. `body` is None when the answer was streamed to the sink."""

    status: int
    body: bytes | None
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)
    ttfb_s: float | None = None
    #: Tokens and cost of a whole answer, when the upstream reported `usage`.
    usage: Usage | None = None


@dataclass(slots=True)
class Opened:
    """A stream read up to its commit point: the events so far (a `[DONE]` among them
    with chunk None), not yet sent to the client."""

    resp: Response
    reader: EventSource
    pending: list[tuple[bytes, Chunk | None]]
    started: float
    ttfb_s: float


class Exchange:
    """Carries out attempts over the upstream transport; holds no per-request state."""

    def __init__(self, config: Config, upstream: Upstream) -> None:
        self.timeouts = config.timeouts
        self.upstream = upstream
        self.relay = Relay(config.timeouts, upstream.redactor)

    async def whole(self, req: ClientRequest, inst: InstanceState,
                    client_auth: str | None) -> Reply:
        """A non-streaming attempt: the whole body is read before anything is sent."""
        t0 = time.perf_counter()
        resp = await self.upstream.open(inst.config, inst.provider, req.endpoint,
                                        req.body_for(inst.request_model), client_auth,
                                        req.native)
        try:
            ttfb = time.perf_counter() - t0
            # The usual small answer came whole with its head: taken without an await.
            body = self.upstream.arrived(resp)
            if body is None:
                body = await self.upstream.read_body(resp, self.timeouts.idle_s)
            return self._whole(inst, resp, body, ttfb, req.native is not None)
        except BaseException:
            resp.close()
            raise

    async def _read_whole(self, inst: InstanceState, resp: Response, ttfb: float) -> Reply:
        """The whole answer of an upstream that ignored `stream` (see `_whole`)."""
        return self._whole(inst, resp, await self.upstream.read_body(resp, self.timeouts.idle_s),
                           ttfb)

    def _whole(self, inst: InstanceState, resp: Response, body: bytes, ttfb: float,
               native: bool = False) -> Reply:
        """A whole answer in OpenAI's shape (for a `native` request, in the instance's
        own), checked against the pinned fingerprint (a non-streaming request, or an
        upstream that ignored `stream`). A 2xx that is not a JSON object (a 204, an empty
        body, a captive portal's HTML page) is no answer: UpstreamProtocolError."""
        resp.release()
        body = inst.provider.body(body, native)
        if _JSON_OBJECT.match(body) is None:
            raise UpstreamProtocolError(
                f"HTTP {resp.status} answer is not a JSON object "
                f"({resp.headers.get('Content-Type', 'no Content-Type')}, {len(body)} bytes)")
        pin = inst.pin
        if pin is not None and resp.status == 200:
            seen = response_model(body)
            if pin.contradicted_by(seen):
                raise FingerprintMismatch(f"answered as {seen}, pinned {pin.describe()}")
        return Reply(resp.status, body, resp.headers.get("Content-Type", "application/json"),
                     self.upstream.relayed(resp.headers), ttfb,
                     usage_of_body(body, inst.config))

    async def open_stream(self, req: ClientRequest, inst: InstanceState,
                          client_auth: str | None) -> Opened | Reply:
        """A streaming attempt up to its commit point (its failures are still invisible),
        or the whole answer of an upstream that ignored `stream`."""
        t0 = time.perf_counter()
        resp = await self.upstream.open(inst.config, inst.provider, req.endpoint,
                                        req.body_for(inst.request_model), client_auth,
                                        req.native)
        try:
            if _EVENT_STREAM not in resp.headers.get("Content-Type", ""):
                return await self._read_whole(inst, resp, time.perf_counter() - t0)
            reader = self.upstream.events(inst.provider, resp, req.include_usage,
                                          req.native is not None)
            pending: list[tuple[bytes, Chunk | None]] = []
            await self.relay.until_content(reader, pending, t0 + self.timeouts.first_byte_s,
                                           inst.pin)
        except BaseException:
            resp.close()
            raise
        return Opened(resp, reader, pending, t0, time.perf_counter() - t0)

    async def deliver_whole(self, reply: Reply, inst: InstanceState, sink: StreamSink,
                            req: ClientRequest, attempts: int) -> None:
        """A stream request the upstream answered with its whole answer (it ignored
        `stream`): sent as the stream the client asked for (relayed as it came, an SDK
        iterating the stream would find no event and return an empty answer without
        raising). Raises StreamMalformed when the body is no completion (nothing sent),
        ClientGone when the client went away."""
        assert reply.body is not None
        events = whole_as_events(reply.body, req.include_usage)
        if events is None:
            raise StreamMalformed("answered a stream with a JSON body that is not a completion")
        await sink.start(inst.id, attempts, events, dict(reply.headers))

    async def deliver(self, opened: Opened, inst: InstanceState, sink: StreamSink,
                      record: RequestRecord) -> None:
        """The commit point: the client's response starts with the events so far, and the
        rest is relayed. Raises CommittedFailure when the stream fails from here on (the
        client has part of the answer), ClientGone (proxy.engine.relay) when the client
        went away."""
        resp, pending = opened.resp, opened.pending
        delivered = Delivered()
        done = False
        try:
            for _, chunk in pending:
                if chunk is not None:
                    delivered.note(chunk)
            await sink.start(inst.id, record.sent + 1, b"".join(e for e, _ in pending),
                             self.upstream.relayed(resp.headers))
            if pending[-1][1] is not None:  # else [DONE] was among the pending events
                await self.relay.relay(opened.reader, sink, delivered, None,
                                       opened.started + self.timeouts.first_byte_s,
                                       opened.started + self.timeouts.total_s)
            done = True
            record.usage = stream_usage(delivered, record, inst)
        except UpstreamFailure as failure:
            raise CommittedFailure(failure, delivered, opened.ttfb_s) from failure
        finally:
            if done:
                resp.release()
            else:
                resp.close()

    async def splice(self, req: ClientRequest, inst: InstanceState, splicer: Splicer,
                     sink: StreamSink, client_auth: str | None, record: RequestRecord) -> float:
        """One continuation (prefill) or replay of a cut stream on `inst`, relayed through
        `splicer`; returns the time to its first new output. A 4xx is PrefillRejected (about
        the continuation, never the client's request), a replay that differs from what the
        client has ReplayDiverged, an answer that is not streamed NotStreamed."""
        if splicer.mode == PREFILL:
            data = orjson.dumps(await self._prefill_body(req, inst, splicer))
        else:
            data = req.body_for(inst.request_model)
        t0 = time.perf_counter()
        try:
            resp = await self.upstream.open(inst.config, inst.provider, req.endpoint, data,
                                            client_auth)
        except PassThrough as rejected:
            raise PrefillRejected(f"HTTP {rejected.status}") from None
        done = False
        try:
            if _EVENT_STREAM not in resp.headers.get("Content-Type", ""):
                raise NotStreamed("it answered the continuation without streaming it")
            await self.relay.relay(self.upstream.events(inst.provider, resp, req.include_usage),
                                   sink, splicer.delivered, splicer,
                                   t0 + self.timeouts.first_byte_s, t0 + self.timeouts.total_s)
            done = True
            record.usage = stream_usage(splicer.delivered, record, inst)
        except Diverged as exc:
            raise ReplayDiverged(str(exc)) from None
        finally:
            if done:
                resp.release()
            else:
                resp.close()
        return (splicer.committed_at or time.perf_counter()) - t0

    async def _prefill_body(self, req: ClientRequest, inst: InstanceState,
                            splicer: Splicer) -> dict[str, object]:
        """The request that asks `inst` to continue the delivered text."""
        delivered = splicer.delivered
        if not delivered.pieces and delivered.reasoning_pieces:
            raise UnsupportedRequest(REASONING_ONLY)
        # Chunks are not tokens (a character of several tokens comes as one chunk): a
        # server that can count them is asked, so the continuation keeps the client's
        # token budget.
        carried = await inst.provider.count_tokens(self.upstream, inst.config, splicer.prefix,
                                                   self.timeouts.connect_s + 1.0)
        if carried is not None:
            splicer.carried_chunks = carried
        body = continuation_body(req.body, req.endpoint == CHAT, delivered,
                                 inst.request_model, carried)
        if body is None:
            raise UnsupportedRequest(NO_PREFILL)
        return body


def stream_usage(delivered: Delivered, record: RequestRecord, inst: InstanceState) -> Usage:
    """A finished stream's tokens: as its `usage` stated them, else estimated from what
    the client received (once, at its end)."""
    stated = usage_of_object(delivered.usage, inst.config)
    if stated is not None:
        return stated
    chars = sum(map(len, delivered.pieces)) + sum(map(len, delivered.reasoning_pieces))
    return estimate_usage(prompt_estimate(record), chars, inst.config)


def whole_usage(reply: Reply, record: RequestRecord, inst: InstanceState) -> Usage | None:
    """A whole answer's tokens: as its `usage` stated them, else estimated from its body."""
    if reply.usage is not None or reply.body is None:
        return reply.usage
    return estimate_body_usage(reply.body, prompt_estimate(record), inst.config)


def prompt_estimate(record: RequestRecord) -> int:
    """The planner's estimate of the request's prompt tokens."""
    return record.plan.requirements.prompt_tokens if record.plan is not None else 0

