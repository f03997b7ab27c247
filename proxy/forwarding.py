"""The attempt loop: try the plan's instances in order until one answers, relay its answer.

request -> plan -> attempts -> reply. Every failure before the streaming commit point is
invisible to the client: nothing is sent until an upstream has produced its first content
chunk. The HTTP layer gives a `StreamSink` to write to once committed, and turns the
returned `Reply` into a response; this module knows nothing about the server side.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from typing import Protocol

import orjson
import structlog

from proxy import overflow
from proxy.audit import Recorder
from proxy.circuit import CLOSED
from proxy.config import Config
from proxy.errors import (
    AllAttemptsFailed,
    AllAttemptsTimedOut,
    ProxyError,
    RateLimitedError,
    RouteBlocked,
    error_event,
)
from proxy.failures import (
    CONTEXT_TOO_LONG,
    INSTANCE_BUSY,
    INSTANCE_NOT_READY,
    TIMEOUT,
    UNSUPPORTED_REQUEST,
    ContextTooLong,
    FingerprintMismatch,
    ProcessExited,
    RateLimited,
    StreamCut,
    StreamMalformed,
    StreamStalled,
    UnsupportedByInstance,
    UnusableAnswer,
    UpstreamErrorEvent,
    UpstreamFailure,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from proxy.fingerprints import Pin, models_match, response_model
from proxy.inbound import CHAT, UPSTREAM_PATH, ClientRequest
from proxy.instances import InstanceState, Registry
from proxy.routing import RoutePlan, larger_window
from proxy.scoring import RATE_LIMITED_REASON, hard_filter
from proxy.sse import (
    DONE,
    DONE_EVENT,
    Chunk,
    EventSource,
    MalformedEvent,
    event_data,
    inspect_chunk,
    whole_as_events,
)
from proxy.streaming import PREFILL, REPLAY, Delivered, Diverged, Splicer, continuation_body
from proxy.upstream import PassThrough, Response, Upstream
from proxy.usage import Usage
from proxy.usage import of_body as usage_of_body
from proxy.usage import of_object as usage_of_object

log = structlog.get_logger("proxy.forwarding")

_NO_HEADERS: dict[str, str] = {}  # shared, never written to
#: What every 2xx answer of the OpenAI endpoints starts with (a cheap look, no parse).
_JSON_OBJECT = re.compile(rb"[ \t\r\n]*\{")
_NO_PREFILL = "a text completion whose prompt is not one string cannot be continued by prefill"
_REASONING_ONLY = "only reasoning was delivered: a prefill (answer text) cannot continue a reasoning"

# Outcomes, as recorded per request.
OK = "ok"
PASSED_THROUGH = "passthrough"
STREAM_FAILED = "stream_failed"
CLIENT_GONE = "client_gone"


class StreamSink(Protocol):
    """Where a committed stream goes: the HTTP layer's response to the client."""

    async def start(self, instance_id: str, attempts: int, first: bytes,
                    upstream_headers: dict[str, str]) -> None:
        """Send the response head and the first events (one write). `upstream_headers`
        are the upstream's headers relayed to the client (its rate-limit headers)."""
        ...

    async def write(self, data: bytes) -> None: ...


@dataclass(slots=True)
class Attempt:
    """One try on one instance; `code` is None for the one that answered."""

    instance: str
    code: str | None
    detail: str
    elapsed_ms: float

    def describe(self) -> str:
        return f"{self.instance} {self.code}: {self.detail}" if self.code else f"{self.instance} ok"


@dataclass(slots=True)
class Reply:
    """The result of forwarding. `body` is None when the answer was streamed to the sink."""

    status: int
    body: bytes | None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    instance: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    outcome: str = OK
    ttfb_s: float | None = None
    #: Tokens and cost of the answer, when the upstream reported `usage`.
    usage: Usage | None = None


class ClientGone(Exception):
    """The client went away while we were writing to it."""


class CommittedFailure(Exception):
    """A stream failed after the client had received part of the answer."""

    def __init__(self, failure: UpstreamFailure, delivered: Delivered, ttfb_s: float) -> None:
        super().__init__(failure.detail)
        self.failure = failure
        self.delivered = delivered
        self.ttfb_s = ttfb_s


class Forwarder:
    """Runs the attempt loop for one request at a time; holds no per-request state itself."""

    def __init__(self, config: Config, registry: Registry, upstream: Upstream,
                 recorder: Recorder) -> None:
        self.config = config
        self.registry = registry
        self.upstream = upstream
        self.recorder = recorder

    async def forward(self, req: ClientRequest, plan: RoutePlan, sink: StreamSink | None,
                      client_auth: str | None = None) -> Reply:
        """Try the plan's candidates within the retry budget; return the reply to send.

        Raises a ProxyError when nothing served the request: 429 (with Retry-After) while
        an instance that could serve it is in a rate-limit cooldown, else 503, 502 or 504.
        An instance skipped (not ready, busy, or unable to take this request) is no
        attempt: only what was written upstream counts against the retry budget.
        """
        retry = self.config.retry
        candidates = plan.candidates
        attempts: list[Attempt] = []
        # Instances held back by a rate-limit cooldown -> the rate-limit headers of their
        # 429 in this request (empty when the cooldown predates it).
        limited: dict[str, tuple[InstanceState, dict[str, str]]] = (
            {i.id: (i, _NO_HEADERS) for i in plan.cooling} if plan.cooling else {})
        skipped: dict[str, str] | None = None
        last_failure: UpstreamFailure | None = None
        index = 0
        same_tries = 0
        while len(attempts) < retry.max_attempts:
            if index < len(candidates):
                inst = candidates[index]
                if same_tries == 0:
                    # Verify before send: state may have changed since the plan was made.
                    why = self._not_ready(inst, last_resort=index >= plan.healthy)
                    if why is not None:
                        index += 1
                        if why.startswith(RATE_LIMITED_REASON):
                            limited.setdefault(inst.id, (inst, _NO_HEADERS))
                        else:
                            skipped = _note(skipped, inst.id, why)
                        self.recorder.rerouted(plan, INSTANCE_NOT_READY, why, inst.id,
                                               _next_id(candidates, index))
                        continue
                    cap = inst.config.max_concurrency
                    if cap is not None and inst.inflight >= cap and not await self._slot(
                            inst, cap, last=index + 1 >= len(candidates)):
                        index += 1
                        busy = f"{inst.inflight} in flight (max {cap})"
                        skipped = _note(skipped, inst.id, busy)
                        self.recorder.rerouted(plan, INSTANCE_BUSY, busy, inst.id,
                                               _next_id(candidates, index))
                        continue
                    if index == 0 and plan.healthy:
                        self.recorder.verified(plan, inst.id)
            else:
                waited = await self._wait_out_rate_limit(limited)
                if waited is None:
                    break
                inst = waited
                why = inst.blocked_reason()
                if why is not None:  # its state changed while we waited
                    skipped = _note(skipped, inst.id, why)
                    continue
            started = time.perf_counter()
            try:
                inst.inflight += 1
                try:
                    if req.stream and sink is not None:
                        reply = await self._attempt_stream(req, inst, sink, client_auth,
                                                           len(attempts) + 1)
                    else:
                        reply = await self._attempt_whole(req, inst, client_auth)
                finally:
                    inst.inflight -= 1
                    if inst.circuit.trial_in_flight:
                        self.registry.release_trial(inst)  # no verdict (e.g. cancelled)
            except CommittedFailure as cut:
                attempts.append(Attempt(inst.id, cut.failure.code, cut.failure.detail,
                                        _ms(started)))
                self.registry.record_failure(inst, cut.failure)
                assert sink is not None
                return await self._continue(req, plan, sink, client_auth, inst, cut,
                                            index + 1, attempts)
            except PassThrough as p:
                attempts.append(Attempt(inst.id, None, f"HTTP {p.status}", _ms(started)))
                inst.circuit.on_success()  # it answered: the server works
                return Reply(p.status, p.body, p.content_type, p.headers, inst.id, attempts,
                             PASSED_THROUGH)
            except UnsupportedByInstance as skip:
                # Nothing was sent: not an attempt, and no mark against the instance.
                skipped = _note(skipped, inst.id, skip.detail)
                same_tries = 0
                if index < len(candidates):
                    index += 1
                self.recorder.rerouted(plan, skip.code, skip.detail, inst.id,
                                       _next_id(candidates, index))
                continue
            except UpstreamFailure as failure:
                attempts.append(Attempt(inst.id, failure.code, failure.detail, _ms(started)))
                # A blip gets one more try on the same instance, if the circuit is still
                # closed once this failed attempt has been counted.
                may_retry = (failure.transient and same_tries < retry.same_instance_retries
                             and retry.retries(failure.code))
                self.registry.record_failure(inst, failure, retrying=may_retry)
                last_failure = failure
                if not retry.retries(failure.code):
                    break
                if may_retry and inst.circuit.state == CLOSED:
                    same_tries += 1
                    log.warning("retry_same", request_id=req.request_id, instance=inst.id,
                                reason=failure.code, detail=failure.detail)
                    continue
                if isinstance(failure, RateLimited):
                    limited[inst.id] = (inst, failure.headers)
                same_tries = 0
                if index < len(candidates):
                    index += 1
                if isinstance(failure, ContextTooLong):
                    if failure.overflow.window is not None:
                        self.registry.learn_window(inst, failure.overflow.window)
                    # Only a larger window can help: skip the ones no larger than this
                    # (compared in the config's terms when it declares them).
                    window = inst.ctx
                    while index < len(candidates) and not larger_window(
                            window, candidates[index].ctx):
                        index += 1
                self.recorder.rerouted(plan, failure.code, failure.detail, inst.id,
                                       _next_id(candidates, index))
                continue
            attempts.append(Attempt(inst.id, None, "ok", _ms(started)))
            reply.attempts = attempts
            reply.instance = inst.id
            return reply
        error = _final_error(plan, attempts, skipped, last_failure, limited)
        error.attempts = len(attempts)
        error.tried = attempts
        error.upstream_s = sum(a.elapsed_ms for a in attempts) / 1000.0
        raise error

    def _not_ready(self, inst: InstanceState, last_resort: bool) -> str | None:
        """Why `inst` must be skipped right now, or None (claiming a half-open trial).

        A last-resort candidate (its circuit was open at planning time) is tried even if
        its circuit is still open: every healthy instance has failed by then. An instance
        in a rate-limit cooldown is never tried (`rate_limited(retry_in=...)`).
        """
        blocked = inst.blocked_reason()
        if blocked is not None:
            return blocked
        now = time.monotonic()
        if inst.rate_limited_until > now:  # never sent anything, not even as a last resort
            return inst.rate_limit_reason(now)
        if inst.circuit.acquire(now) or last_resort:
            return None
        return f"circuit {inst.circuit.state}"

    async def _slot(self, inst: InstanceState, cap: int, last: bool) -> bool:
        """Queue briefly for a free slot on a busy instance; False means move on.

        The last candidate is never given up: piling on beats losing the request.
        """
        deadline = time.monotonic() + self.config.retry.queue_wait_s
        while inst.inflight >= cap and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return last or inst.inflight < cap

    async def _wait_out_rate_limit(
            self, limited: dict[str, tuple[InstanceState, dict[str, str]]]
    ) -> InstanceState | None:
        """When only rate-limited instances are left, wait for the soonest end of a cooldown
        (up to retry.max_retry_after_s) and return that instance; None when it is further
        off (the caller answers 429)."""
        while limited:
            inst_id, (inst, _) = min(limited.items(),
                                     key=lambda item: item[1][0].rate_limited_until)
            until = inst.rate_limited_until
            wait = until - time.monotonic()
            if wait > self.config.retry.max_retry_after_s:
                return None
            if wait > 0:
                await asyncio.sleep(wait)
            if inst.rate_limited_until > until:
                continue  # another request met a new 429 meanwhile: wait for that one
            del limited[inst_id]
            return inst
        return None

    async def _attempt_whole(self, req: ClientRequest, inst: InstanceState,
                             client_auth: str | None) -> Reply:
        """A non-streaming attempt: the whole body is read before anything is sent."""
        cfg = inst.config
        t0 = time.perf_counter()
        resp = await self.upstream.open(cfg, UPSTREAM_PATH[req.endpoint],
                                        req.body_for(inst.request_model), client_auth,
                                        req.native)
        try:
            return await self._whole_reply(inst, resp, time.perf_counter() - t0,
                                           req.native is not None)
        except BaseException:
            resp.close()
            raise

    async def _whole_reply(self, inst: InstanceState, resp: Response,
                           ttfb: float, native: bool = False) -> Reply:
        """Read a whole answer, in OpenAI's shape (or, for a `native` request, in the
        instance's own), checked against the pinned fingerprint.

        Used for non-streaming requests and for an upstream that ignored `stream`.
        """
        cfg = inst.config
        body = await self.upstream.read_body(resp, self.config.timeouts.idle_s)
        resp.release()
        body = self.upstream.translate_body(cfg, body, native)
        if _JSON_OBJECT.match(body) is None:
            # A 204, an empty body, a captive portal's HTML page: no answer at all.
            raise UpstreamProtocolError(
                f"HTTP {resp.status} answer is not a JSON object "
                f"({resp.headers.get('Content-Type', 'no Content-Type')}, {len(body)} bytes)")
        pin = inst.pin
        if pin is not None and resp.status == 200:
            seen = response_model(body)
            if pin.contradicted_by(seen):
                raise FingerprintMismatch(f"answered as {seen}, pinned {pin.describe()}")
        self.registry.record_success(inst, ttfb)
        return Reply(resp.status, body, resp.headers.get("Content-Type", "application/json"),
                     self.upstream.relayed(resp.headers), ttfb_s=ttfb,
                     usage=usage_of_body(body, cfg))

    async def _attempt_stream(self, req: ClientRequest, inst: InstanceState, sink: StreamSink,
                              client_auth: str | None, attempt_no: int) -> Reply:
        """A streaming attempt: buffer until the first content chunk, then commit and relay.

        Raises an UpstreamFailure before the commit point (invisible to the client) and
        CommittedFailure after it.
        """
        cfg = inst.config
        timeouts = self.config.timeouts
        t0 = time.perf_counter()
        deadline = t0 + timeouts.first_byte_s
        resp = await self.upstream.open(cfg, UPSTREAM_PATH[req.endpoint],
                                        req.body_for(inst.request_model), client_auth,
                                        req.native)
        done = False
        try:
            if "text/event-stream" not in resp.headers.get("Content-Type", ""):
                # The upstream ignored `stream`: its whole answer, as the stream asked for.
                reply = await self._whole_reply(inst, resp, time.perf_counter() - t0)
                done = True
                assert reply.body is not None
                events = whole_as_events(reply.body, req.include_usage)
                if events is None:
                    raise StreamMalformed("answered a stream with a JSON body that is not "
                                          "a completion")
                try:
                    await sink.start(cfg.id, attempt_no, events, reply.headers)
                except ClientGone:
                    return Reply(200, None, outcome=CLIENT_GONE, ttfb_s=reply.ttfb_s)
                return Reply(200, None, ttfb_s=reply.ttfb_s, usage=reply.usage)
            reader = self.upstream.events(cfg, resp, req.include_usage, req.native is not None)
            pending: list[tuple[bytes, Chunk | None]] = []
            await self._until_content(reader, pending, deadline, inst.pin)
            ttfb = time.perf_counter() - t0
            self.registry.record_success(inst, ttfb)

            # Commit point: from here on the client has seen this instance's answer.
            delivered = Delivered()
            try:
                for _, chunk in pending:
                    if chunk is not None:
                        delivered.note(chunk)
                await sink.start(cfg.id, attempt_no, b"".join(event for event, _ in pending),
                                 self.upstream.relayed(resp.headers))
                if pending[-1][1] is None:  # [DONE] was among the pending events
                    done = True
                    return Reply(200, None, ttfb_s=ttfb,
                                 usage=usage_of_object(delivered.usage, cfg))
                await self._relay(reader, sink, delivered, None, deadline,
                                  t0 + timeouts.total_s)
            except ClientGone:
                return Reply(200, None, outcome=CLIENT_GONE, ttfb_s=ttfb)
            except UpstreamFailure as failure:
                raise CommittedFailure(failure, delivered, ttfb) from failure
            done = True
            return Reply(200, None, ttfb_s=ttfb, usage=usage_of_object(delivered.usage, cfg))
        finally:
            if done:
                resp.release()
            else:
                resp.close()

    async def _until_content(self, reader: EventSource, pending: list[tuple[bytes, Chunk | None]],
                             deadline: float, pinned: Pin | None) -> None:
        """Read events before the commit point into `pending` (a `[DONE]` with chunk None).

        Returns at the first chunk with model output (answer text, reasoning, a tool call
        or a refusal: see sse.Chunk) or a finish reason, or at `[DONE]`; so `deadline`
        (first_byte_s) bounds only the wait for the first output, however long the answer
        then takes. Raises a failure (still invisible to the client) on any problem; an
        in-band error that says the prompt does not fit is a ContextTooLong.
        """
        while True:
            remaining = max(deadline - time.perf_counter(), 0.001)
            event = await reader.next(remaining, "first_byte")
            if event is None:
                raise ProcessExited("stream ended before any content")
            payload = event_data(event)
            if payload is None:
                continue  # comment or keep-alive
            if payload == DONE:
                if pending:
                    pending.append((event, None))
                    return
                raise ProcessExited("stream ended before any content")
            try:
                chunk = inspect_chunk(payload)
            except MalformedEvent as exc:
                raise StreamMalformed(str(exc)) from None
            if chunk.error is not None:
                overflowed = overflow.of_error(chunk.error)
                if overflowed is not None:  # e.g. llama.cpp builds that say it in-band
                    raise ContextTooLong(dataclasses.replace(
                        overflowed, message=self.upstream.redactor.text(overflowed.message)))
                raise UpstreamErrorEvent(self.upstream.redactor.text(_error_message(chunk.error)))
            if pinned is not None and chunk.model is not None:
                if pinned.contradicted_by(chunk.model):
                    raise FingerprintMismatch(
                        f"answered as {chunk.model}, pinned {pinned.describe()}")
                pinned = None  # checked once per stream (a chunk claiming nothing has None)
            pending.append((event, chunk))
            if chunk.has_content or chunk.finish_reason is not None:
                return

    async def _relay(self, reader: EventSource, sink: StreamSink, delivered: Delivered,
                     splicer: Splicer | None, first_deadline: float, deadline: float) -> None:
        """Relay events until `[DONE]` (or a clean end after a finish reason).

        Without a splicer, events go out as the upstream framed them. With one (a
        continuation or replay), each chunk is rewritten into the client's stream, and
        until it has sent something new its failures are still invisible. Raises a stream
        failure; `delivered` always says what the client has.
        """
        idle = self.config.timeouts.idle_s
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
                    try:
                        if producing:
                            event = await next_event(idle, "idle")
                        else:
                            wait = max(first_deadline - time.perf_counter(), 0.001)
                            event = await next_event(wait, "first_byte")
                    except UpstreamTimeout as exc:
                        if committed:
                            raise StreamStalled(f"no chunk within {idle:g}s") from exc
                        raise
                    except ProcessExited as exc:
                        if committed:
                            raise StreamCut(exc.detail) from exc
                        raise
                    if event is None:
                        if delivered.finished:
                            # Complete but unterminated: finish it properly for the client.
                            out.append(DONE_EVENT)
                            break
                        if committed:
                            raise StreamCut("stream ended without a finish reason")
                        raise ProcessExited("continuation ended before anything new")
                payload = event_data(event)
                if payload is None:
                    continue
                if payload == DONE:
                    out.append(DONE_EVENT if splicer is not None else event)
                    break
                try:
                    chunk = inspect_chunk(payload)
                except MalformedEvent as exc:
                    raise StreamMalformed(str(exc)) from None  # never forwarded
                if chunk.error is not None:
                    raise UpstreamErrorEvent(
                        self.upstream.redactor.text(_error_message(chunk.error)))
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
                    raise UpstreamTimeout("total", self.config.timeouts.total_s)
        except UpstreamFailure:
            if out:
                # What was accepted before the failure still reaches the client, so that
                # `delivered` stays exactly what it has.
                await sink.write(b"".join(out))
            raise
        await sink.write(b"".join(out))

    async def _continue(self, req: ClientRequest, plan: RoutePlan, sink: StreamSink,
                        client_auth: str | None, origin: InstanceState, cut: CommittedFailure,
                        start: int, attempts: list[Attempt]) -> Reply:
        """After a mid-stream failure: continue the answer elsewhere, or fail loudly.

        An instance that cannot take the continuation (no prefill and another model, a
        prefill this request cannot be expressed as, not ready now) is skipped with its
        reason, which the error names; its circuit and error rate stay untouched, and the
        failure stays with the instance that failed.
        """
        delivered = cut.delivered
        failure, failed = cut.failure, origin
        retry = self.config.retry
        why_not = None
        if delivered.tool_call:
            why_not = "a tool call was in flight"
        elif delivered.refusal:
            why_not = "a refusal was in flight"
        elif req.body.get("n") not in (None, 1):
            why_not = "several choices (n > 1) cannot be continued"
        elif not retry.retries(failure.code):
            why_not = f"{failure.code} is not retried (retry.on)"
        if why_not is None:
            # Only reasoning delivered: a prefill is answer text and cannot carry on a
            # reasoning; a twin's replay can (see proxy.streaming).
            answer_started = bool(delivered.pieces) or not delivered.reasoning_pieces
            why_not = ("no instance left that can continue it" if answer_started else
                       "only reasoning had been delivered, and no twin is left to replay it")
            skipped: dict[str, str] = {}
            # A prefill is the same request for every instance: ask once whether it exists.
            no_prefill = None if continuation_body(
                req.body, req.endpoint == CHAT, delivered, None) is not None \
                else _NO_PREFILL
            if not answer_started:
                no_prefill = no_prefill or _REASONING_ONLY
            for cand in self._continuation_pool(plan, origin, start):
                if len(attempts) >= retry.max_attempts:
                    why_not = "the retry budget is spent"
                    break
                mode = PREFILL if cand.prefill_ok and no_prefill is None else \
                    REPLAY if _twins(origin, cand) else None
                if mode is None:
                    if cand.prefill_ok and no_prefill:  # able in general, not for this one
                        skipped[cand.id] = no_prefill
                        self.recorder.rerouted(plan, UNSUPPORTED_REQUEST, no_prefill, cand.id,
                                               None)
                    else:
                        skipped[cand.id] = "no prefill capability and another model"
                    continue
                # Mid-answer the client is waiting: an instance whose circuit is open is not
                # worth a try (no last resort here). One the prober last saw down with a
                # closed circuit is: it may be back, and a refusal costs little.
                not_ready = self._not_ready(cand, last_resort=False)
                if not_ready is not None:
                    skipped[cand.id] = not_ready
                    continue
                self.recorder.rerouted(plan, failure.code, failure.detail, failed.id, cand.id)
                splicer = Splicer(delivered, mode)
                started = time.perf_counter()
                try:
                    await self._attempt_splice(req, cand, sink, client_auth, splicer)
                except UnsupportedByInstance as skip:
                    skipped[cand.id] = skip.detail
                    self.recorder.rerouted(plan, skip.code, skip.detail, cand.id, None)
                    continue
                except PassThrough as rejected:
                    # A 4xx to a continuation is about the prefill, never the client's error.
                    attempts.append(Attempt(cand.id, "PREFILL_REJECTED",
                                            f"HTTP {rejected.status}", _ms(started)))
                    if mode == PREFILL:
                        cand.prefill_ok = False
                        log.warning("prefill_rejected", instance=cand.id,
                                    status=rejected.status)
                    continue
                except Diverged as exc:
                    attempts.append(Attempt(cand.id, "REPLAY_DIVERGED", str(exc), _ms(started)))
                    continue
                except ClientGone:
                    return Reply(200, None, instance=cand.id, attempts=attempts,
                                 outcome=CLIENT_GONE, ttfb_s=cut.ttfb_s)
                except UpstreamFailure as again:
                    attempts.append(Attempt(cand.id, again.code, again.detail, _ms(started)))
                    if not again.instance_fault:
                        skipped[cand.id] = again.detail  # the failure stays where it was
                        continue
                    self.registry.record_failure(cand, again)
                    failure, failed = again, cand  # `delivered` already holds what it added
                    continue
                finally:
                    if cand.circuit.trial_in_flight:
                        self.registry.release_trial(cand)
                attempts.append(Attempt(cand.id, None, f"resumed ({mode})", _ms(started)))
                self.recorder.resumed(plan, failed.id, cand.id, len(splicer.prefix), mode)
                return Reply(200, None, instance=cand.id, attempts=attempts, ttfb_s=cut.ttfb_s,
                             usage=usage_of_object(delivered.usage, cand.config))
            if skipped:
                why_not += " (" + "; ".join(f"{i}: {r}" for i, r in skipped.items()) \
                    + ")"
        first = cut.failure
        log.error("stream_failed_after_commit", request_id=req.request_id, instance=origin.id,
                  reason=first.code, detail=first.detail, why=why_not,
                  last_failed=failed.id, last_reason=failure.code)
        message = (f"The stream from {origin.id} failed after the answer had started "
                   f"({first.code}: {first.detail}) and could not be continued: {why_not}.")
        if failed is not origin:
            message += (f" The last try to continue it, on {failed.id}, failed too "
                        f"({failure.code}: {failure.detail}).")
        try:
            await sink.write(error_event(message + " The answer is incomplete.",
                                         "upstream_error", first.code))
        except ClientGone:
            pass
        return Reply(200, None, instance=origin.id, attempts=attempts, outcome=STREAM_FAILED,
                     ttfb_s=cut.ttfb_s)

    def _continuation_pool(self, plan: RoutePlan, origin: InstanceState,
                           start: int) -> list[InstanceState]:
        """Who may continue a cut stream, as things stand now: the plan's later candidates,
        then its earlier ones, then instances the plan rejected that are fit again (a twin
        that came back after planning)."""
        pool = plan.candidates[start:] + [c for c in plan.candidates[:start] if c is not origin]
        seen = {c.id for c in pool} | {origin.id}
        now = time.monotonic()
        for inst_id in plan.rejected:
            inst = self.registry.by_id.get(inst_id)
            if inst is not None and inst.id not in seen and inst.routable(now) \
                    and hard_filter(inst, plan.requirements, now) is None:
                pool.append(inst)
        return pool

    async def _attempt_splice(self, req: ClientRequest, inst: InstanceState, sink: StreamSink,
                              client_auth: str | None, splicer: Splicer) -> None:
        """One continuation (prefill) or replay attempt on `inst`, relayed through `splicer`."""
        cfg = inst.config
        timeouts = self.config.timeouts
        if splicer.mode == PREFILL:
            carried = None
            if cfg.server == "llamacpp":
                # Chunks are not tokens (a character of several tokens comes as one chunk):
                # ask the server, so the continuation keeps the client's token budget.
                carried = await self.upstream.count_tokens(cfg, splicer.prefix,
                                                           timeouts.connect_s + 1.0)
                if carried is not None:
                    splicer.carried_chunks = carried
            body = continuation_body(req.body, req.endpoint == CHAT, splicer.delivered,
                                     inst.request_model, carried)
            if body is None:
                raise UnsupportedByInstance(_NO_PREFILL)
            data = orjson.dumps(body)
        else:
            data = req.body_for(inst.request_model)
        t0 = time.perf_counter()
        resp = await self.upstream.open(cfg, UPSTREAM_PATH[req.endpoint], data, client_auth)
        done = False
        try:
            if "text/event-stream" not in resp.headers.get("Content-Type", ""):
                raise UnusableAnswer("it answered the continuation without streaming it")
            await self._relay(self.upstream.events(cfg, resp, req.include_usage), sink,
                              splicer.delivered, splicer,
                              t0 + timeouts.first_byte_s, t0 + timeouts.total_s)
            done = True
            self.registry.record_success(inst, time.perf_counter() - t0)
        finally:
            if done:
                resp.release()
            else:
                resp.close()


def _twins(a: InstanceState, b: InstanceState) -> bool:
    """Whether two instances serve the same model (so a greedy replay gives the same text)."""
    ma = a.fingerprint or a.config.model
    mb = b.fingerprint or b.config.model
    return ma is not None and mb is not None and models_match(ma, mb)


def _next_id(candidates: list[InstanceState], index: int) -> str | None:
    return candidates[index].id if index < len(candidates) else None


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 1)


def _error_message(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or "upstream reported an error")
    return str(error)


def _final_error(plan: RoutePlan, attempts: list[Attempt], skipped: dict[str, str] | None,
                 last: UpstreamFailure | None,
                 limited: dict[str, tuple[InstanceState, dict[str, str]]]) -> ProxyError:
    """The error for a request no attempt could serve.

    While an instance that could serve it is in a rate-limit cooldown, that is the answer:
    429 with `Retry-After` = the soonest end (whole seconds, rounded up, at least 1), and
    the rate-limit headers of that instance's 429 when it answered one in this request.
    """
    listing = "; ".join(a.describe() for a in attempts)
    not_tried = dict(plan.rejected)
    if skipped:
        not_tried.update(skipped)
    if limited:
        now = time.monotonic()
        inst, headers = min(limited.values(), key=lambda entry: entry[0].rate_limited_until)
        wait = max(1, math.ceil(inst.rate_limited_until - now))
        cooling = ", ".join(f"{i.id} for {max(0.0, i.rate_limited_until - now):.1f}s"
                            for i, _ in limited.values())
        message = f"No instance can serve model '{plan.model}' now: rate limited " \
                  f"({cooling}); retry after {wait}s."
        if attempts:
            message += f" Attempts: {listing}."
        return RateLimitedError(message, headers={**headers, "retry-after": str(wait)})
    if not attempts and _only_too_small(not_tried):
        # Every instance is too small for it (no outage): the client's request must change,
        # so a 400 as OpenAI gives it, which SDKs do not retry (a 503 they would).
        why = "; ".join(f"{i}: {r}" for i, r in not_tried.items())
        return ContextError(
            f"This request needs about {plan.requirements.ctx_needed} tokens of context "
            f"(prompt estimate plus max_tokens), more than any instance for model "
            f"'{plan.model}' has ({why}). Shorten the messages or lower max_tokens.")
    if not plan.healthy or not attempts:
        # Nothing was ready (whatever was tried was a last resort), or nothing could be sent.
        why = "; ".join(f"{i}: {r}" for i, r in not_tried.items())
        if attempts:
            why = f"{why}; " * bool(why) + f"last-resort tries failed: {listing}"
        return RouteBlocked(f"No available instances for model '{plan.model}'"
                            + (f" ({why})." if why else "."))
    codes = {a.code for a in attempts}
    n = len(attempts)
    summary = f"All {n} attempt{'s' if n > 1 else ''} failed: {listing}"
    if not_tried:
        summary += ". Not tried: " + "; ".join(f"{i} ({r})" for i, r in not_tried.items())
    if codes == {TIMEOUT}:
        return AllAttemptsTimedOut(summary)
    if codes == {CONTEXT_TOO_LONG} and isinstance(last, ContextTooLong):
        return ContextError(f"{last.overflow.message or last.detail} ({summary})")
    return AllAttemptsFailed(summary)


def _only_too_small(rejected: dict[str, str]) -> bool:
    """Whether every instance left out was left out for its context window (those an
    admin took out aside), so waiting would not help."""
    sizes = [r for r in rejected.values() if r not in ("drained", "disabled")]
    return bool(sizes) and all(r.startswith("ctx=") for r in sizes)


def _note(skipped: dict[str, str] | None, instance: str, why: str) -> dict[str, str]:
    """Remember why an instance was skipped (the dict is made on the first skip only)."""
    if skipped is None:
        skipped = {}
    skipped[instance] = why
    return skipped


class ContextError(ProxyError):
    """400: no instance could fit the prompt. In OpenAI's shape whatever server said it
    (SDKs raise BadRequestError with code `context_length_exceeded`); the message quotes
    the last upstream's own words, then every attempt."""

    status = 400
    type = "invalid_request_error"
    code = "context_length_exceeded"

