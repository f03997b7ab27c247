"""Recording decisions: the one place where a route decision becomes a log line, metrics and
audit rows (events, lineage, route plans).

The forwarder and the handlers call `Recorder` methods with plain data; the recorder never
awaits anything (store writes are queued), so recording costs the request microseconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from proxy.failures import INSTANCE_NOT_READY
from proxy.instances import DOWN, DRAINED, LOADING, MISMATCH, READY, UNKNOWN, InstanceState
from proxy.metrics import Metrics
from proxy.store import AuditStore

if TYPE_CHECKING:
    from proxy.eventstream import EventHub
    from proxy.forwarding import Attempt
    from proxy.routing import RoutePlan
    from proxy.usage import Usage

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

log = structlog.get_logger("proxy.audit")
request_log = structlog.get_logger("proxy.request")


class Recorder:
    """Turns decisions into logs, metrics and (when a store is configured) audit rows."""

    def __init__(self, metrics: Metrics, store: AuditStore | None = None,
                 hub: EventHub | None = None) -> None:
        self.metrics = metrics
        self.store = store
        #: The live feed (/admin/events/stream, the status page), when there is one.
        self.hub = hub
        #: Model names worth a metrics label; anything else a client sends is "other", so
        #: clients cannot grow the number of series without bound.
        self.known_models: frozenset[str] = frozenset()
        #: Whether the per-request line is logged at all (info level): when it is not, its
        #: arguments are not even assembled.
        self.log_requests = bool(request_log.is_enabled_for(logging.INFO))

    # ------------------------------------------------------------------ routing

    def planned(self, plan: RoutePlan) -> None:
        """A plan was made. If the instance it would have chosen is not ready, say so."""
        store = self.store
        now = time.time()
        if store is not None:
            # The whole plan goes to route_plans (joined by plan_id); the event stays small.
            store.event(now, ROUTE_PLANNED, plan.request_id, plan.plan_id, plan.selected,
                        detail={"fallback": plan.fallback})
        if plan.preferred is not None and plan.selected not in (None, plan.preferred):
            self.rerouted(plan, INSTANCE_NOT_READY, plan.preferred_why or "not ready",
                          plan.preferred, plan.selected)

    def verified(self, plan: RoutePlan, instance: str) -> None:
        """The selected instance was still routable right before sending."""
        if self.store is not None:
            self.store.event(time.time(), ROUTE_VERIFIED, plan.request_id, plan.plan_id,
                             instance)

    def rerouted(self, plan: RoutePlan, reason: str, detail: str, from_instance: str | None,
                 to_instance: str | None) -> None:
        """The request moved (or will move) from one instance to the next."""
        log.warning("rerouted", request_id=plan.request_id, plan_id=plan.plan_id,
                    reason=reason, detail=detail, from_instance=from_instance,
                    to_instance=to_instance)
        self.metrics.reroutes.labels(reason, from_instance or "", to_instance or "").inc()
        now = time.time()
        self._event(now, REROUTED, plan.request_id, plan.plan_id, from_instance, reason,
                    from_instance, to_instance, {"detail": detail})
        if self.store is not None:
            self.store.lineage(now, plan.request_id, plan.plan_id, from_instance, to_instance,
                               reason)

    def blocked(self, plan: RoutePlan, message: str) -> None:
        """Nothing could serve the request."""
        log.warning("route_blocked", request_id=plan.request_id, plan_id=plan.plan_id,
                    model=plan.model, detail=message)
        self.metrics.blocked.inc()
        self._event(time.time(), ROUTE_BLOCKED, plan.request_id, plan.plan_id, None,
                    "ROUTE_BLOCKED", detail={"message": message, "rejected": plan.rejected})

    def resumed(self, plan: RoutePlan, from_instance: str, to_instance: str, chars: int,
                mode: str) -> None:
        """A stream cut mid-answer was continued on another instance."""
        log.warning("stream_resumed", request_id=plan.request_id, plan_id=plan.plan_id,
                    from_instance=from_instance, to_instance=to_instance, chars=chars,
                    mode=mode)
        self.metrics.stream_resumed.labels(from_instance, to_instance).inc()
        self._event(time.time(), STREAM_RESUMED, plan.request_id, plan.plan_id, to_instance,
                    None, from_instance, to_instance, {"chars_carried": chars, "mode": mode})

    def completed(self, plan: RoutePlan | None, request_id: str, model: str | None,
                  status: int, outcome: str, instance: str | None, attempts: int,
                  ttfb_s: float | None, duration_s: float, upstream_s: float,
                  stream: bool, tried: Sequence[Attempt] = (),
                  usage: Usage | None = None) -> None:
        """The request is over: one log line, the metrics, its audit rows (`tried`: every
        attempt, in order, kept in the REQUEST_COMPLETED event for the request view;
        `usage`: the answer's tokens and cost, when the upstream reported them)."""
        duration_ms = round(duration_s * 1000.0, 2)
        if self.log_requests:
            if usage is None:
                request_log.info("request", request_id=request_id, model=model,
                                 instance=instance, attempts=attempts, status=status,
                                 outcome=outcome, stream=stream, latency_ms=duration_ms)
            else:
                request_log.info("request", request_id=request_id, model=model,
                                 instance=instance, attempts=attempts, status=status,
                                 outcome=outcome, stream=stream, latency_ms=duration_ms,
                                 prompt_tokens=usage.prompt,
                                 completion_tokens=usage.completion,
                                 cached_tokens=usage.cached, cost=round(usage.cost, 8))
        m = self.metrics
        label = model if model in self.known_models else ("" if model is None else "other")
        m.requests.labels(label, instance or "", outcome).inc()
        if usage is not None:
            where = (label, instance or "")
            m.tokens.labels(*where, "prompt").inc(usage.prompt)
            m.tokens.labels(*where, "completion").inc(usage.completion)
            if usage.cached:
                m.tokens.labels(*where, "cached").inc(usage.cached)
            if usage.cost:
                m.cost.labels(*where).inc(usage.cost)
        m.duration.labels("true" if stream else "false").observe(duration_s)
        m.overhead.observe(max(0.0, duration_s - upstream_s))
        if ttfb_s is not None and instance is not None:
            m.ttfb.labels(instance).observe(ttfb_s)
        store = self.store
        if store is None or plan is None:
            return
        now = time.time()
        ttfb_ms = None if ttfb_s is None else round(ttfb_s * 1000.0, 2)
        store.event(now, REQUEST_COMPLETED, request_id, plan.plan_id, instance, None,
                    detail={"status": status, "outcome": outcome, "attempts": attempts,
                            "ttfb_ms": ttfb_ms, "duration_ms": duration_ms,
                            # Attempt dataclasses: orjson writes them as objects when
                            # the batch is sent, off the request path
                            "tried": tried,
                            "usage": None if usage is None else usage.as_dict()})
        store.plan(plan, (plan.plan_id, request_id, now, model, plan.selected, instance,
                          outcome, status, attempts, ttfb_ms, duration_ms))

    # ------------------------------------------------------------------ instances

    def state_changed(self, inst: InstanceState, old: str, new: str, reason: str) -> None:
        """Registry listener: an instance changed state."""
        self.metrics.set_state(inst.id, new, STATES)
        self._event(time.time(), INSTANCE_STATE_CHANGED, None, None, inst.id, new,
                    detail={"old": old, "new": new, "reason": reason})

    def _event(self, ts: float, type_: str, request_id: str | None, plan_id: str | None,
               instance: str | None, reason_code: str | None = None,
               from_instance: str | None = None, to_instance: str | None = None,
               detail: dict[str, Any] | None = None) -> None:
        """An event people watch: to the audit trail and to the live feed."""
        if self.store is not None:
            self.store.event(ts, type_, request_id, plan_id, instance, reason_code,
                             from_instance, to_instance, detail)
        if self.hub is not None:
            self.hub.publish(ts, type_, request_id, plan_id, instance, reason_code,
                             from_instance, to_instance, detail)
