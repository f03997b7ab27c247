"""Live view of every configured instance: its static profile plus figures from real traffic
and from the background prober.

The registry is the only mutable routing state. It is read by the planner and written by
the forwarder after each attempt and by the prober after each probe; every method is
synchronous and O(1), so the hot path never waits on it and never holds anything across an
upstream await.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import structlog

from proxy.config import HealthConfig, InstanceConfig, instance_ids
from proxy.failures import OPENS, STRIKE, Failure
from proxy.health.circuit import BY_CONNECTION, BY_HTTP, CLOSED, Circuit
from proxy.health.instance import DRAINED, MISMATCH, READY, STALE_STATES, InstanceState

log = structlog.get_logger("proxy.health.registry")

_EWMA_ALPHA = 0.2

StateListener = Callable[["InstanceState", str, str, str], None]


class Registry:
    """All instances in config order, addressable by full id."""

    def __init__(self, instances: Iterable[InstanceConfig],
                 health: HealthConfig | None = None) -> None:
        health = health or HealthConfig()
        self.states: tuple[InstanceState, ...] = tuple(
            InstanceState(cfg, circuit=Circuit(health.cooldown_s, health.max_cooldown_s,
                                               health.failure_threshold))
            for cfg in instances)
        self.by_id: dict[str, InstanceState] = {s.id: s for s in self.states}
        self._names = instance_ids(tuple(s.config for s in self.states))
        self.listeners: list[StateListener] = []
        for inst in self.states:
            if not inst.config.enabled:
                inst.state = DRAINED

    def adopt(self, old: Registry, health: HealthConfig | None = None) -> None:
        """Take over the live instances of a previous registry (a config reload).

        An instance whose id, address, model and server kind are unchanged is the previous
        object from now on, reconfigured in place (InstanceState.reconfigure): requests in
        flight during the reload decrement the in-flight count, free the concurrency slot
        and report their outcome on the object new requests read, so no counter or slot is
        left behind on a copy. The old registry's listeners become this one's for the same
        reason; instances the reload dropped or replaced are retired (silent).
        """
        health = health or HealthConfig()
        states = list(self.states)
        kept: set[int] = set()
        for n, inst in enumerate(states):
            prev = old.by_id.get(inst.id)
            if prev is None or (prev.config.base_url, prev.config.model, prev.config.server) != (
                    inst.config.base_url, inst.config.model, inst.config.server):
                continue
            prev.reconfigure(inst.config, health)
            states[n] = prev
            kept.add(id(prev))
        for prev in old.states:
            if id(prev) not in kept:
                prev.retired = True
        self.states = tuple(states)
        self.by_id = {s.id: s for s in self.states}
        old.listeners = self.listeners

    def get(self, instance_id: str) -> InstanceState | None:
        """The instance with this full id, or a unique short id."""
        full = self._names.get(instance_id)
        return None if full is None else self.by_id[full]

    def set_state(self, inst: InstanceState, new: str, reason: str) -> bool:
        """Move an instance to a new state; logs and notifies listeners when it changes."""
        old = inst.state
        if old == new:
            return False
        inst.state = new
        if new == READY:
            inst.forget_errors()
        if inst.retired:
            return True
        log.warning("instance_state_changed", instance=inst.id, old=old, new=new,
                    reason=reason)
        for listener in self.listeners:
            listener(inst, old, new, reason)
        return True

    def record_success(self, inst: InstanceState, ttfb_s: float) -> None:
        """An attempt got a usable answer; `ttfb_s` is its time to first byte."""
        ms = ttfb_s * 1000.0
        prev = inst.ttfb_ewma_ms
        ewma = ms if prev is None else prev + _EWMA_ALPHA * (ms - prev)
        inst.ttfb_ewma_ms = ewma
        inst.latency_reason = f"latency={ewma:.0f}ms"
        inst.successes += 1
        inst.rate_limit_streak = 0
        inst._remember(True, time.monotonic())
        if inst.state in STALE_STATES:
            self.set_state(inst, READY, "answered a request")
        if inst.circuit.state != CLOSED:
            inst.circuit.on_success()
            log.info("circuit_closed", instance=inst.id, by="successful request")

    def record_failure(self, inst: InstanceState, failure: Failure,
                       retrying: bool = False) -> None:
        """An attempt failed: feed the error rate and the circuit, as the failure's class
        declares (proxy.failures).

        A failure that is no instance fault (a skip, a prompt too long for its window)
        changes nothing. A `mismatch` moves the instance to MISMATCH; a `cooldown` (a 429)
        starts a rate-limit cooldown and leaves the circuit as it is: its Retry-After, or
        with none, health.cooldown_s doubled for each such 429 in a row up to
        health.max_cooldown_s. Otherwise a STRIKE counts toward `failure_threshold`
        (every failed attempt counts), and OPENS opens the circuit at once, unless
        `retrying` (the caller tries the same instance once more): then it is a strike
        too, and the retry's failure decides.
        """
        if not failure.instance_fault:
            return
        now = time.monotonic()
        inst.failures += 1
        inst.last_error = f"{failure.code}: {failure.detail}"
        inst.last_error_at = time.time()
        inst._remember(False, now)
        if failure.mismatch:
            self.set_state(inst, MISMATCH, failure.detail)
            return
        if failure.cooldown:
            self._cool_down(inst, failure.retry_after, now)
            return
        effect = failure.circuit
        if effect == OPENS:
            opened = inst.circuit.on_failure(BY_CONNECTION, now, not retrying)
        elif effect == STRIKE:
            opened = inst.circuit.on_failure(BY_HTTP, now, False)
        else:
            return
        if opened:
            log.warning("circuit_opened", instance=inst.id, reason=failure.code,
                        cooldown_s=round(inst.circuit.remaining(now), 2))

    def learn_window(self, inst: InstanceState, window: int) -> None:
        """The server stated its context window (tokens) in an overflow error: kept for
        later plans when the config declares none (a declared `ctx` is the user's word)."""
        if inst.config.ctx is not None or inst.learned_ctx == window:
            return
        inst.learned_ctx = window
        inst.ctx_reason = f"ctx=learned:{window}"
        log.info("ctx_learned", instance=inst.id, ctx=window)

    @staticmethod
    def _cool_down(inst: InstanceState, retry_after_s: float | None, now: float) -> None:
        if retry_after_s is None:
            circuit = inst.circuit
            wait = min(circuit.base_cooldown_s * (1 << min(inst.rate_limit_streak, 16)),
                       circuit.max_cooldown_s)
            inst.rate_limit_streak += 1
        else:
            wait = retry_after_s
        if now + wait > inst.rate_limited_until:
            inst.rate_limited_until = now + wait
        log.warning("rate_limited", instance=inst.id, retry_in_s=round(wait, 2),
                    given=retry_after_s is not None)

    def release_trial(self, inst: InstanceState) -> None:
        """An acquired half-open trial ended without a verdict (e.g. the client left)."""
        inst.circuit.trial_in_flight = False

