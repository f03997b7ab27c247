"""Recording what happened: the one place where a request's record becomes a log line,
metrics and audit rows (events, lineage, route plans), and an instance's change of state
an event.

The engine fills a `RequestRecord` (proxy.engine.record) and the HTTP layer hands it here
once the request is over. The events are derived from it: the plan (ROUTE_PLANNED, and a
REROUTED when the instance the plan would have chosen was not ready), the first attempt
(ROUTE_VERIFIED), every failed attempt or instance passed over (REROUTED, to the instance
tried next), every continuation that finished a cut stream (STREAM_RESUMED), nothing
routable (ROUTE_BLOCKED), and the end (REQUEST_COMPLETED). The recorder never awaits
anything (store writes are queued), so recording costs the request microseconds: the
store gets one entry per request, and the writer process makes the routine events
(ROUTE_PLANNED, ROUTE_VERIFIED, REQUEST_COMPLETED) and the route_plans row of it.
"""

from __future__ import annotations

import logging
import time
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import structlog

from proxy.audit.metrics import Metrics
from proxy.audit.schema import (
    ATTEMPT_FIELDS,
    EVENT,
    LINEAGE,
    REQUEST,
    USAGE_FIELDS,
)
from proxy.audit.store import AuditStore
from proxy.engine.record import FRESH, Attempt, RequestRecord
from proxy.failures import INSTANCE_NOT_READY
from proxy.health.instance import InstanceState
from proxy.health.states import DOWN, DRAINED, LOADING, MISMATCH, READY, UNKNOWN
from proxy.logs import request_logger
from proxy.routing.planner import RoutePlan

if TYPE_CHECKING:
    from proxy.audit.eventstream import EventHub

# Event types (SPEC section 7).
ROUTE_PLANNED = "ROUTE_PLANNED"
ROUTE_VERIFIED = "ROUTE_VERIFIED"
REROUTED = "REROUTED"
ROUTE_BLOCKED = "ROUTE_BLOCKED"
STREAM_RESUMED = "STREAM_RESUMED"
INSTANCE_STATE_CHANGED = "INSTANCE_STATE_CHANGED"
REQUEST_COMPLETED = "REQUEST_COMPLETED"
EVENT_TYPES = (ROUTE_PLANNED, ROUTE_VERIFIED, REROUTED, ROUTE_BLOCKED, STREAM_RESUMED,
               INSTANCE_STATE_CHANGED, REQUEST_COMPLETED)

STATES = (UNKNOWN, READY, LOADING, DOWN, MISMATCH, DRAINED)

# A request entry's dataclasses as tuples of their fields (schema.ATTEMPT_FIELDS...).
_attempt_values = attrgetter(*ATTEMPT_FIELDS)
_usage_values = attrgetter(*USAGE_FIELDS)


log = structlog.get_logger("proxy.audit")


class Recorder:
    """Turns records into logs, metrics and (when a store is configured) audit rows."""

    def __init__(self, metrics: Metrics, store: AuditStore | None = None,
                 hub: EventHub | None = None) -> None:
        self.metrics = metrics
        self.store = store
        #: The live feed (/admin/events/stream, the status page), when there is one.
        self.hub = hub
        #: Model names worth a metrics label; anything else a client sends is "other", so
        #: clients cannot grow the number of series without bound.
        self.known_models: frozenset[str] = frozenset()
        #: The per-request line's logger (proxy.logs.request_logger), as logging is
        #: configured when the recorder is made (at start-up, after the configuration).
        self.request_log = request_logger("proxy.request")
        #: Whether the per-request line is logged at all (info level): when it is not, its
        #: arguments are not even assembled.
        self.log_requests = bool(self.request_log.is_enabled_for(logging.INFO))

    def completed(self, record: RequestRecord) -> None:
        """The request is over: its events, one log line, the metrics, its audit rows
        (and the end of its trace span, when tracing is on)."""
        if record.trace is not None:
            record.trace.end(record)
        plan = record.plan
        # The request's audit rows other than its routine ones (REROUTED and its lineage,
        # STREAM_RESUMED, ROUTE_BLOCKED), in order: they go into its entry, below.
        trail: list[list[Any]] = []
        verified: int | None = None
        if plan is not None:
            verified = self._planned(record, plan, trail)
            self._attempts(record, plan, trail)
            if record.blocked is not None:
                self._blocked(plan, record.blocked, trail)
        if record.stream_error is not None:
            log.error("stream_failed_after_commit", request_id=record.request_id,
                      instance=record.instance, detail=record.stream_error)
        duration_s = record.duration_s
        duration_ms = 0.0
        if self.log_requests or self.store is not None:  # (round() takes a while)
            duration_ms = round(duration_s * 1000.0, 2)
        instance, outcome, status = record.instance, record.outcome, record.status
        usage = record.usage
        if self.log_requests:
            self.request_log.info(
                "request", request_id=record.request_id, model=record.model,
                instance=instance, attempts=record.sent, status=status, outcome=outcome,
                stream=record.stream, latency_ms=duration_ms,
                **({} if usage is None else usage.as_dict()))
        m = self.metrics
        model = record.model
        label = model if model in self.known_models else ("" if model is None else "other")
        series = m.request_series(label, instance, outcome, record.stream)
        series.requests.inc()
        if usage is not None:
            # estimated figures in series of their own, never mixed with stated ones
            series.tokens(usage.estimated).add(usage.prompt, usage.completion, usage.cached,
                                               usage.cost)
        series.duration.observe(duration_s)
        m.overhead.observe(max(0.0, duration_s - record.upstream_s))
        ttfb_s = record.ttfb_s
        if ttfb_s is not None and instance is not None:
            series.ttfb(instance).observe(ttfb_s)
        store = self.store
        if store is None or plan is None:
            return
        # One entry; the writer process makes ROUTE_PLANNED, ROUTE_VERIFIED,
        # REQUEST_COMPLETED and the route_plans row of it (schema.request_rows).
        store.request([REQUEST, record.request_id, plan.plan_id, record.planned_at,
                       time.time(), model, plan.selected, verified, instance, outcome, status,
                       record.sent, None if ttfb_s is None else round(ttfb_s * 1000.0, 2),
                       duration_ms, [_attempt_values(a) for a in record.attempts if a.sent],
                       None if usage is None else _usage_values(usage),
                       (plan.model, plan.strategy, plan.requirements.values(),
                        plan.fallback, plan.rejected, plan.reasons, plan.scores), trail])

    # ------------------------------------------------------------------ routing

    def _planned(self, record: RequestRecord, plan: RoutePlan,
                 trail: list[list[Any]]) -> int | None:
        """A REROUTED when the instance the plan would have chosen was not ready. Returns
        where in `trail` ROUTE_VERIFIED goes when the selected instance was tried first, as
        planned, else None. (ROUTE_PLANNED, always first, is the writer's: the whole plan
        goes to route_plans, joined by plan_id; the event stays small.)"""
        if plan.preferred is not None and plan.selected not in (None, plan.preferred):
            self.rerouted(plan, INSTANCE_NOT_READY, plan.preferred_why or "not ready",
                          plan.preferred, plan.selected, record.planned_at, trail)
        first = record.attempts[0] if record.attempts else None
        if first is not None and first.sent and plan.healthy \
                and first.instance == plan.selected and first.mode == FRESH:
            return len(trail)
        return None

    def _attempts(self, record: RequestRecord, plan: RoutePlan,
                  trail: list[list[Any]]) -> None:
        """A REROUTED for each failed attempt or instance passed over (to the instance
        tried next; none when it was the last), except a same-instance retry; a
        STREAM_RESUMED for a continuation that finished the answer."""
        attempts = record.attempts
        for n, attempt in enumerate(attempts):
            if attempt.code is None:
                if attempt.after is not None:
                    self._resumed(plan, attempt, trail)
                continue
            to = _tried_after(attempts, n)
            if to == attempt.instance and attempt.sent and attempts[n + 1].sent:
                log.warning("retry_same", request_id=plan.request_id,
                            instance=attempt.instance, reason=attempt.code,
                            detail=attempt.detail)
                continue
            self.rerouted(plan, attempt.code, attempt.detail, attempt.instance, to, attempt.at,
                          trail)

    def rerouted(self, plan: RoutePlan, reason: str, detail: str, from_instance: str | None,
                 to_instance: str | None, at: float, trail: list[list[Any]]) -> None:
        """The request moved (or would have moved) from one instance to the next; its rows
        go to `trail`."""
        log.warning("rerouted", request_id=plan.request_id, plan_id=plan.plan_id,
                    reason=reason, detail=detail, from_instance=from_instance,
                    to_instance=to_instance)
        self.metrics.reroutes.labels(reason, from_instance or "", to_instance or "").inc()
        self._event(at, REROUTED, plan.request_id, plan.plan_id, from_instance, reason,
                    from_instance, to_instance, {"detail": detail}, trail)
        if self.store is not None:
            trail.append([LINEAGE, at, "route_change", plan.request_id, plan.plan_id,
                          from_instance, to_instance, reason])

    def _resumed(self, plan: RoutePlan, attempt: Attempt, trail: list[list[Any]]) -> None:
        """A stream cut mid-answer was continued on another instance."""
        log.warning("stream_resumed", request_id=plan.request_id, plan_id=plan.plan_id,
                    from_instance=attempt.after, to_instance=attempt.instance,
                    chars=attempt.carried, mode=attempt.mode)
        self.metrics.stream_resumed.labels(attempt.after or "", attempt.instance).inc()
        self._event(attempt.at, STREAM_RESUMED, plan.request_id, plan.plan_id,
                    attempt.instance, None, attempt.after, attempt.instance,
                    {"chars_carried": attempt.carried, "mode": attempt.mode}, trail)

    def _blocked(self, plan: RoutePlan, message: str, trail: list[list[Any]]) -> None:
        """Nothing could serve the request."""
        log.warning("route_blocked", request_id=plan.request_id, plan_id=plan.plan_id,
                    model=plan.model, detail=message)
        self.metrics.blocked.inc()
        self._event(time.time(), ROUTE_BLOCKED, plan.request_id, plan.plan_id, None,
                    "ROUTE_BLOCKED", detail={"message": message, "rejected": plan.rejected},
                    trail=trail)

    # ------------------------------------------------------------------ instances

    def state_changed(self, inst: InstanceState, old: str, new: str, reason: str) -> None:
        """Registry listener: an instance changed state."""
        self.metrics.set_state(inst.id, new, STATES)
        self._event(time.time(), INSTANCE_STATE_CHANGED, None, None, inst.id, new,
                    detail={"old": old, "new": new, "reason": reason})

    def _event(self, ts: float, type_: str, request_id: str | None, plan_id: str | None,
               instance: str | None, reason_code: str | None = None,
               from_instance: str | None = None, to_instance: str | None = None,
               detail: dict[str, Any] | None = None,
               trail: list[list[Any]] | None = None) -> None:
        """An event people watch: to the audit trail (in a request's `trail`, when it has
        one) and to the live feed."""
        store = self.store
        if store is not None:
            row = [EVENT, ts, type_, request_id, plan_id, instance, reason_code, from_instance,
                   to_instance, detail]
            if trail is None:
                store.submit(row)
            else:
                trail.append(row)
        if self.hub is not None:
            self.hub.publish(ts, type_, request_id, plan_id, instance, reason_code,
                             from_instance, to_instance, detail)


def _tried_after(attempts: list[Attempt], n: int) -> str | None:
    """The instance of the next attempt sent after entry `n`, or None."""
    for later in attempts[n + 1:]:
        if later.sent:
            return later.instance
    return None

