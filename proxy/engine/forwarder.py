"""The attempt loop: try the plan's instances until one answers, continue a stream cut
mid-answer on another, and write what happened into the request's record.

request -> plan -> attempts -> reply. Every failure before the streaming commit point is
invisible to the client: nothing is sent until an upstream has produced its first model
output. After it, a failure is a cut: the loop goes on over the instances the planner
says may continue the answer (by prefill or replay), or ends the stream with an error
event. One loop does both, so every attempt, fresh or continuing, gets the same rules:
admission (readiness, a half-open trial, a concurrency slot), same-instance retry of a
blip, rerouting by the failure's kind, the retry budget, and its outcome in the registry.

The HTTP layer gives a `StreamSink` to write to once committed, and turns the returned
`Reply` (or a raised ProxyError) into a response; this module knows nothing about the
server side, nor about the audit trail: the recorder reads the record afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.api.errors import (
    error_event,
)
from proxy.api.inbound import CHAT, ClientRequest
from proxy.config import Config
from proxy.engine.attempts import NO_PREFILL, REASONING_ONLY, Exchange, Opened, Reply, whole_usage
from proxy.engine.errors import Limited, final_error, stream_failed
from proxy.engine.record import (
    CLIENT_GONE,
    FRESH,
    PASSED_THROUGH,
    PREFILL,
    STREAM_FAILED,
    Attempt,
    RequestRecord,
)
from proxy.engine.relay import ClientGone, CommittedFailure, StreamSink
from proxy.engine.splicing import Delivered, Splicer, continuation_body
from proxy.failures import (
    Failure,
    InstanceBusy,
    InstanceNotReady,
    UnsupportedRequest,
)
from proxy.health.circuit import CLOSED
from proxy.health.instance import InstanceState
from proxy.health.registry import Registry
from proxy.providers.base import PassThrough
from proxy.providers.transport import Upstream
from proxy.routing.planner import Planner, RoutePlan, larger_window
from proxy.routing.scoring import RATE_LIMITED_REASON
from proxy.tracing import Tracing

_NO_HEADERS: Mapping[str, str] = {}  # shared, never written to


@dataclass(slots=True)
class _Cut:
    """A stream that failed after the client had part of the answer."""

    origin: InstanceState
    first: Failure
    delivered: Delivered
    ttfb_s: float
    #: Where the continuation's entries begin in the record's attempts.
    since: int
    #: The last instance whose failure stands (a continuation that failed too), and its.
    failed: InstanceState
    failure: Failure
    #: The last instance whose output the client has (a continuation that added some
    #: before it failed too): what a continuation continues.
    source: InstanceState
    #: Why a prefill cannot continue this stream, or None.
    no_prefill: str | None = None
    rejected: dict[str, str] = field(default_factory=dict)
    #: Set when it is settled that no continuation will be tried (or tried further).
    why_not: str | None = None


@dataclass(slots=True)
class _Run:
    """One request's way through the loop (per request; the Forwarder keeps none)."""

    req: ClientRequest
    plan: RoutePlan
    sink: StreamSink | None
    client_auth: str | None
    record: RequestRecord
    candidates: list[InstanceState]
    modes: list[str | None] | None = None  # per candidate, once continuing a cut stream
    index: int = 0
    #: Tries on the current instance beyond its first (same-instance retries).
    same: int = 0
    last: Failure | None = None
    limited: Limited = field(default_factory=dict)
    cut: _Cut | None = None
    stop: bool = False


class Forwarder:
    """Runs the attempt loop for one request at a time; holds no per-request state itself."""

    def __init__(self, config: Config, registry: Registry, upstream: Upstream,
                 planner: Planner) -> None:
        self.config = config
        self.registry = registry
        self.planner = planner
        self.exchange = Exchange(config, upstream)
        #: Scrubs a failure's detail: an upstream's text (a header, an error message) may
        #: quote the key it was sent, and the detail goes to events, errors, admin output.
        self.redactor = upstream.redactor
        #: OpenTelemetry traces (proxy.tracing), set by the app when on.
        self.tracing: Tracing | None = None

    async def forward(self, req: ClientRequest, plan: RoutePlan, sink: StreamSink | None,
                      client_auth: str | None, record: RequestRecord) -> Reply:
        """Try the plan's candidates within the retry budget; return the reply to send.

        Every attempt and skip goes into `record` (with the outcome, the instance that
        answered, time to first output and usage). Raises a ProxyError when nothing served
        the request: 429 (with Retry-After) while an instance that could serve it is in a
        rate-limit cooldown, else 400 (no window large enough), 503, 502 or 504. A stream
        cut mid-answer that no instance could continue ends with an error event (the
        reply's outcome STREAM_FAILED).
        """
        run = _Run(req, plan, sink, client_auth, record, plan.candidates)
        if plan.cooling:
            run.limited = {i.id: (i, _NO_HEADERS) for i in plan.cooling}
        max_attempts = self.config.retry.max_attempts
        while not run.stop and record.sent < max_attempts:
            # (the waits, for a cooldown's end or a free slot, are the rare ways: the usual
            # next candidate with a slot free costs no await of its own)
            target = self._next_candidate(run)
            if target is None:
                target = await self._wait_out_cooldown(run)
                if target is None:
                    break
            inst, mode = target
            attempt = Attempt(inst.id, mode or PREFILL)
            admitted = self._admit(run, inst, attempt, mode)
            if admitted is None:
                admitted = await self._wait_for_slot(run, inst, attempt)
            if admitted:
                reply = await self._try(run, inst, attempt)
                if reply is not None:
                    return reply
        if run.cut is not None:
            return await self._fail_stream(run)
        raise final_error(plan, record, run.limited, run.last)

    # ------------------------------------------------------------------ choosing

    @staticmethod
    def _next_candidate(run: _Run) -> tuple[InstanceState, str | None] | None:
        """The plan's (or the continuation's) next instance and its mode, or None when
        they are spent."""
        if run.index < len(run.candidates):
            modes = run.modes
            return run.candidates[run.index], FRESH if modes is None else modes[run.index]
        return None

    async def _wait_out_cooldown(self, run: _Run) -> tuple[InstanceState, str | None] | None:
        """Once the candidates are spent, the soonest end of a rate-limit cooldown may be
        waited out (not mid-answer)."""
        if run.cut is not None or not run.limited:
            return None
        inst = await self._wait_out_rate_limit(run.limited)
        return None if inst is None else (inst, FRESH)

    def _admit(self, run: _Run, inst: InstanceState, attempt: Attempt,
               mode: str | None) -> bool | None:
        """Whether `inst` may be tried now and holds a slot (True), is passed over (False:
        the skip is recorded), or may be tried once a slot frees (None: `_wait_for_slot`).

        Verified before send: its state may have changed since the plan was made. A last
        resort (its circuit was open at planning time) is tried through an open circuit
        once every healthy instance has failed; mid-answer there is no last resort. A
        same-instance retry goes on with its turn.
        """
        registry = self.registry
        if run.same:
            return True if registry.take_slot(inst) else None
        if mode is None:
            self._skip(run, attempt, UnsupportedRequest(run.cut.no_prefill or NO_PREFILL)
                       if run.cut is not None else UnsupportedRequest(NO_PREFILL))
            return False
        last_resort = run.cut is None and run.index >= run.plan.healthy
        why = registry.admit(inst, last_resort, attempt)
        if why is not None:
            if why.startswith(RATE_LIMITED_REASON) and run.cut is None:
                run.limited.setdefault(inst.id, (inst, _NO_HEADERS))
            self._skip(run, attempt, InstanceNotReady(why))
            return False
        return True if registry.take_slot(inst) else None

    async def _wait_for_slot(self, run: _Run, inst: InstanceState, attempt: Attempt) -> bool:
        """An admitted instance at its `max_concurrency`: queue up to `retry.queue_wait_s`
        for a slot (a same-instance retry, or the last candidate, takes one anyway), else
        withdraw and record the skip."""
        registry = self.registry
        if run.same:
            await registry.wait_for_slot(inst, 0.0, True)
            return True
        if await registry.wait_for_slot(inst, self.config.retry.queue_wait_s,
                                        run.index + 1 >= len(run.candidates)):
            return True
        registry.withdraw(inst, attempt)
        self._skip(run, attempt, InstanceBusy(
            f"{inst.inflight} in flight (max {inst.config.max_concurrency})"))
        return False

    def _skip(self, run: _Run, attempt: Attempt, skip: Failure) -> None:
        attempt.code, attempt.detail, attempt.sent = skip.code, skip.detail, False
        run.record.add(attempt)
        run.same = 0
        if run.index < len(run.candidates):
            run.index += 1

    async def _wait_out_rate_limit(self, limited: Limited) -> InstanceState | None:
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

    # ------------------------------------------------------------------ trying

    async def _try(self, run: _Run, inst: InstanceState, attempt: Attempt) -> Reply | None:
        """One attempt with the slot `_admit` (or `_wait_for_slot`) took; the reply when it
        served the request, None to go on."""
        started = time.perf_counter()
        tracing = self.tracing
        span = None if tracing is None else tracing.start_attempt(run.record, run.req.endpoint,
                                                                  inst, attempt)
        try:
            if run.cut is not None:
                return await self._continue(run, inst, attempt, started)
            if run.req.stream and run.sink is not None:
                return await self._stream(run, inst, attempt, started)
            reply = await self.exchange.whole(run.req, inst, run.client_auth)
            return self._served(run, inst, attempt, started, reply)
        except PassThrough as answer:
            # The upstream's own client error (its 4xx), relayed as it is: it answered.
            attempt.detail, attempt.elapsed_ms = f"HTTP {answer.status}", _ms(started)
            run.record.add(attempt)
            self.registry.record_answer(inst)
            self._answered(run, inst, None, PASSED_THROUGH)
            return Reply(answer.status, answer.body, answer.content_type, answer.headers)
        except Failure as failure:
            attempt.elapsed_ms = _ms(started)
            self._failed(run, inst, attempt, failure)
            return None
        finally:
            self.registry.end_attempt(inst, attempt)
            if span is not None:
                assert tracing is not None
                tracing.end_attempt(span, run.record, inst, attempt)

    def _served(self, run: _Run, inst: InstanceState, attempt: Attempt, started: float,
                reply: Reply, outcome: str | None = None) -> Reply:
        """A whole answer: the reply to send (for a stream, already sent: body None)."""
        assert reply.ttfb_s is not None
        self.registry.record_success(inst, reply.ttfb_s)
        attempt.elapsed_ms = _ms(started)
        run.record.add(attempt)
        run.record.usage = whole_usage(reply, run.record, inst)
        self._answered(run, inst, reply.ttfb_s, outcome)
        if run.req.stream and run.sink is not None:
            return Reply(200, None, ttfb_s=reply.ttfb_s)
        return reply

    async def _stream(self, run: _Run, inst: InstanceState, attempt: Attempt,
                      started: float) -> Reply | None:
        """A fresh streamed attempt: to the commit point, then relayed to the client."""
        assert run.sink is not None
        opened = await self.exchange.open_stream(run.req, inst, run.client_auth)
        if not isinstance(opened, Opened):  # the upstream ignored `stream`: a whole answer,
            try:  # sent as the stream the client asked for
                await self.exchange.deliver_whole(opened, inst, run.sink, run.req,
                                                  run.record.sent + 1)
            except ClientGone:
                return self._served(run, inst, attempt, started, opened, CLIENT_GONE)
            return self._served(run, inst, attempt, started, opened)
        self.registry.record_success(inst, opened.ttfb_s)
        try:
            await self.exchange.deliver(opened, inst, run.sink, run.record)
        except ClientGone:
            attempt.elapsed_ms = _ms(started)
            run.record.add(attempt)
            self._answered(run, inst, opened.ttfb_s, CLIENT_GONE)
            return Reply(200, None, ttfb_s=opened.ttfb_s)
        except CommittedFailure as cut:
            attempt.elapsed_ms = _ms(started)
            self._cut(run, inst, attempt, cut)
            return None
        attempt.elapsed_ms = _ms(started)
        run.record.add(attempt)
        self._answered(run, inst, opened.ttfb_s)
        return Reply(200, None, ttfb_s=opened.ttfb_s)

    async def _continue(self, run: _Run, inst: InstanceState, attempt: Attempt,
                        started: float) -> Reply | None:
        """A continuation of the cut stream on `inst` (prefill or replay)."""
        cut = run.cut
        assert cut is not None and run.sink is not None
        splicer = Splicer(cut.delivered, attempt.mode)
        try:
            ttfb = await self.exchange.splice(run.req, inst, splicer, run.sink,
                                              run.client_auth, run.record)
        except Failure:
            if splicer.committed:
                cut.source = inst  # it added to the answer before it failed
            raise
        except ClientGone:
            attempt.elapsed_ms = _ms(started)
            run.record.add(attempt)
            self._answered(run, inst, cut.ttfb_s, CLIENT_GONE)
            return Reply(200, None, ttfb_s=cut.ttfb_s)
        self.registry.record_success(inst, ttfb)
        attempt.detail, attempt.after = f"resumed ({attempt.mode})", cut.source.id
        attempt.elapsed_ms, attempt.carried = _ms(started), len(splicer.prefix)
        run.record.add(attempt)
        self._answered(run, inst, cut.ttfb_s)
        return Reply(200, None, ttfb_s=cut.ttfb_s)

    @staticmethod
    def _answered(run: _Run, inst: InstanceState, ttfb_s: float | None,
                  outcome: str | None = None) -> None:
        record = run.record
        record.instance, record.ttfb_s = inst.id, ttfb_s
        if outcome is not None:
            record.outcome = outcome

    # ------------------------------------------------------------------ outcomes

    def _failed(self, run: _Run, inst: InstanceState, attempt: Attempt,
                failure: Failure) -> None:
        """Record a failed attempt (or a skip the attempt turned out to be), and decide:
        the same instance once more (a blip, while its circuit stays closed), the next
        one, or stop (a failure `retry.on` does not reroute)."""
        retry = self.config.retry
        failure.detail = self.redactor.text(failure.detail)
        attempt.code, attempt.detail, attempt.sent = failure.code, failure.detail, \
            failure.attempt
        kind = failure.retry_kind
        reroutes = kind is None or kind in retry.on
        retrying = (failure.same_instance_retry and reroutes
                    and run.same < retry.same_instance_retries)
        self.registry.record_failure(inst, failure, retrying)
        if failure.refuses_prefill and attempt.mode == PREFILL:
            self.registry.refuse_prefill(inst, failure.detail)
        run.record.add(attempt)
        cut = run.cut
        if cut is None:
            run.last = failure
        elif failure.instance_fault:
            cut.failed, cut.failure = inst, failure  # `delivered` holds what it added
        if not reroutes:
            run.stop = True
            if cut is not None:
                cut.why_not = f"{failure.code} is not retried (retry.on)"
            return
        if retrying and inst.circuit.state == CLOSED:
            run.same += 1
            return
        if failure.cooldown and cut is None:
            run.limited[inst.id] = (inst, failure.headers)
        run.same = 0
        if run.index < len(run.candidates):
            run.index += 1
        overflowed = failure.overflow
        if overflowed is not None:
            if overflowed.window is not None:
                self.registry.learn_window(inst, overflowed.window)
            # Only a larger window can help: skip the ones no larger than this (compared
            # in the config's terms when it declares them).
            window, candidates = inst.ctx, run.candidates
            while run.index < len(candidates) and not larger_window(
                    window, candidates[run.index].ctx):
                run.index += 1

    def _cut(self, run: _Run, inst: InstanceState, attempt: Attempt,
             committed: CommittedFailure) -> None:
        """A stream failed after the commit point: from here on the loop tries to continue
        it, over the instances the planner says may (or ends it, with why not)."""
        failure = committed.failure
        failure.detail = self.redactor.text(failure.detail)  # (see __init__)
        attempt.code, attempt.detail = failure.code, failure.detail
        self.registry.record_failure(inst, failure)
        run.record.add(attempt)
        delivered = committed.delivered
        cut = run.cut = _Cut(inst, failure, delivered, committed.ttfb_s,
                             len(run.record.attempts), inst, failure, inst)
        run.same, run.index, run.candidates = 0, 0, []
        req = run.req
        kind = failure.retry_kind
        if delivered.tool_call:
            cut.why_not = "a tool call was in flight"
        elif delivered.refusal:
            cut.why_not = "a refusal was in flight"
        elif req.body.get("n") not in (None, 1):
            cut.why_not = "several choices (n > 1) cannot be continued"
        elif kind is not None and kind not in self.config.retry.on:
            cut.why_not = f"{failure.code} is not retried (retry.on)"
        if cut.why_not is not None:
            return
        # A prefill is the same request for every instance: ask once whether it exists.
        if delivered.reasoning_pieces and not delivered.pieces:
            cut.no_prefill = REASONING_ONLY  # a twin's replay can carry on a reasoning
        elif continuation_body(req.body, req.endpoint == CHAT, delivered, None) is None:
            cut.no_prefill = NO_PREFILL
        continuation = self.planner.continuation(run.plan, inst, cut.no_prefill is None)
        run.candidates, run.modes = continuation.candidates, continuation.modes
        cut.rejected = continuation.rejected

    async def _fail_stream(self, run: _Run) -> Reply:
        """No instance continued the cut stream: it ends with an OpenAI-style error event
        and no `[DONE]`, so SDKs raise: a truncated answer is never presented as complete."""
        cut, record = run.cut, run.record
        assert cut is not None and run.sink is not None
        why_not = cut.why_not
        if why_not is None:
            if record.sent >= self.config.retry.max_attempts and \
                    run.index < len(run.candidates):
                why_not = "the retry budget is spent"
            elif cut.delivered.pieces or not cut.delivered.reasoning_pieces:
                why_not = "no instance left that can continue it"
            else:
                why_not = "only reasoning had been delivered, and no twin is left to replay it"
            passed = dict(cut.rejected)
            passed.update((a.instance, a.detail) for a in record.attempts[cut.since:]
                          if a.code is not None and (not a.sent or a.instance != cut.failed.id))
            if passed:
                why_not += " (" + "; ".join(f"{i}: {r}" for i, r in passed.items()) + ")"
        first, origin = cut.first, cut.origin
        message = stream_failed(origin.id, first, why_not, cut.failed.id, cut.failure)
        record.stream_error = message
        try:
            await run.sink.write(error_event(message + " The answer is incomplete.",
                                             "upstream_error", first.code))
        except ClientGone:
            pass
        self._answered(run, origin, cut.ttfb_s, STREAM_FAILED)
        return Reply(200, None, ttfb_s=cut.ttfb_s)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 1)
