"""The instance registry: every configured instance's live state, and the one writer of it.

The planner and the attempt loop read instances (proxy.health.instance); what changes them
goes through a method here: an attempt's admission, slot and outcome (from the attempt
loop), a probe's findings (from the prober), an admin's drain or enable, a config reload.
Every method is synchronous and O(1) except the wait for a free slot, so the hot path
never waits on the registry and nothing is held across an upstream await.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import structlog

from proxy.config import HealthConfig, InstanceConfig, instance_ids
from proxy.failures import OPENS, STRIKE, Failure
from proxy.health.changes import (
    BY_ADMIN,
    BY_PROBE,
    BY_REQUEST,
    CIRCUIT,
    COOLDOWN,
    EWMA_ALPHA,
    FAILURE,
    PIN,
    SHARED_STATES,
    STATE,
    ChangeSink,
    SharedWrites,
)
from proxy.health.circuit import BY_CONNECTION, BY_HTTP, CLOSED, Circuit
from proxy.health.fingerprints import CONFIGURED, LEARNED, Pin, changes, configured
from proxy.health.instance import InstanceState
from proxy.health.states import (
    DISABLED_REASON,
    DRAINED,
    MISMATCH,
    READY,
    STALE_STATES,
    UNKNOWN,
)
from proxy.providers.load import ServerLoad

log = structlog.get_logger("proxy.health.registry")
_NO_LOAD = ServerLoad()

#: Longest rate-limit cooldown taken from an upstream's headers (Retry-After, resets).
MAX_RATE_LIMIT_COOLDOWN_S = 3600.0

StateListener = Callable[[InstanceState, str, str, str], None]


class Registry(SharedWrites):
    """All instances in config order, addressable by full id.

    `changes`, when set (proxy.state: replicas sharing state), hears of every change
    other replicas should know of; `SharedWrites` takes in theirs."""

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
        self.changes: ChangeSink | None = None

    def get(self, instance_id: str) -> InstanceState | None:
        """The instance with this full id, or a unique short id."""
        full = self._names.get(instance_id)
        return None if full is None else self.by_id[full]

    # ------------------------------------------------------------------ reload

    def adopt(self, old: Registry, health: HealthConfig | None = None) -> None:
        """Take over the live instances of a previous registry (a config reload).

        An instance whose id, address, model and server kind are unchanged is the previous
        object from now on, reconfigured in place (`_reconfigure`): requests in flight
        during the reload release their slot and report their outcome on the object new
        requests read, so no counter or slot is left behind on a copy. The old registry's
        listeners become this one's for the same reason; instances the reload dropped or
        replaced are retired (silent).
        """
        health = health or HealthConfig()
        states = list(self.states)
        kept: set[int] = set()
        for n, inst in enumerate(states):
            prev = old.by_id.get(inst.id)
            if prev is None or (prev.config.base_url, prev.config.model, prev.config.server) != (
                    inst.config.base_url, inst.config.model, inst.config.server):
                continue
            self._reconfigure(prev, inst.config, health)
            states[n] = prev
            kept.add(id(prev))
        for prev in old.states:
            if id(prev) not in kept:
                prev.retired = True
        self.states = tuple(states)
        self.by_id = {s.id: s for s in self.states}
        old.listeners = self.listeners
        self.changes = old.changes

    @staticmethod
    def _reconfigure(inst: InstanceState, config: InstanceConfig, health: HealthConfig) -> None:
        """Give a kept instance its reloaded config. Every live figure stays (state,
        circuit, in-flight count, latency, error history, rate-limit cooldown, a learned
        fingerprint or context window, a refused prefill); `max_concurrency` takes effect
        for waiting and new requests at once."""
        old = inst.config
        inst.config = config
        inst.derive()
        inst.slots.resize(config.max_concurrency)
        circuit = inst.circuit
        circuit.base_cooldown_s = health.cooldown_s
        circuit.max_cooldown_s = health.max_cooldown_s
        circuit.threshold = health.failure_threshold
        pin = inst.pin
        if config.fingerprint is not None and config.fingerprint != "auto":
            if pin is None or pin.source != CONFIGURED or pin.name != config.fingerprint:
                inst.pin = configured(config.fingerprint, config.model)
        elif config.fingerprint is None or (pin is not None and pin.source == CONFIGURED):
            inst.pin = None  # off, or back to auto: learn again at the next probe
        if config.ctx is not None:
            inst.learned_ctx = None  # the user's word now
            inst.ctx_reason = "ctx=unknown"
        # A refusal learned from traffic stands; a newly declared prefill is believed.
        inst.prefill_ok = "prefill" in config.capabilities and (
            inst.prefill_ok or "prefill" not in old.capabilities)
        if not config.enabled:
            inst.state, inst.state_reason = DRAINED, DISABLED_REASON
        elif inst.state == DRAINED and not old.enabled:
            inst.state, inst.state_reason = UNKNOWN, "enabled in the config"

    # ------------------------------------------------------------------ state

    def set_state(self, inst: InstanceState, new: str, reason: str) -> bool:
        """Move an instance to a new state; logs and notifies listeners when it changes."""
        old = inst.state
        inst.state_reason = reason  # the latest word, even when the state stays
        if old == new:
            return False
        inst.state = new
        if new == READY:
            self._forget_errors(inst)
        if inst.retired:
            return True
        if self.changes is not None and (new in SHARED_STATES or old in SHARED_STATES):
            self.changes.changed(inst, STATE)
        log.warning("instance_state_changed", instance=inst.id, old=old, new=new,
                    reason=reason)
        for listener in self.listeners:
            listener(inst, old, new, reason)
        return True

    def drain(self, inst: InstanceState) -> None:
        """No new requests (an admin's word); in-flight ones finish."""
        self.set_state(inst, DRAINED, "drained by admin")

    def enable(self, inst: InstanceState) -> None:
        """Back in rotation (an admin's word): out of DRAINED or MISMATCH, circuit closed,
        a rate-limit cooldown ended (the admin's word beats an upstream's Retry-After)."""
        if inst.state == DRAINED or inst.state == MISMATCH:
            self.set_state(inst, UNKNOWN, "enabled by admin")
        inst.circuit.on_success()
        inst.rate_limited_until = 0.0
        inst.rate_limit_streak = 0
        if self.changes is not None:
            self.changes.changed(inst, CIRCUIT, BY_ADMIN)
            self.changes.changed(inst, COOLDOWN)

    @staticmethod
    def _forget_errors(inst: InstanceState) -> None:
        """Drop the passive error history (the instance was seen healthy again)."""
        inst.recent.clear()
        inst.last_failure_mono = float("-inf")

    # ------------------------------------------------------------------ attempts

    def admit(self, inst: InstanceState, last_resort: bool, owner: object) -> str | None:
        """Why `inst` may not be sent a request right now, or None.

        A half-open circuit admits one trial at a time: `owner` (the attempt) holds it
        until a verdict or `end_attempt`. A last resort (every healthy instance has
        failed by then) is admitted even through an open circuit; an instance in a
        rate-limit cooldown never is (`rate_limited(retry_in=...)`).
        """
        blocked = inst.blocked_reason()
        if blocked is not None:
            return blocked
        now = time.monotonic()
        if inst.rate_limited_until > now:
            return inst.rate_limit_reason(now)
        if inst.circuit.acquire(now, owner) or last_resort:
            return None
        return f"circuit {inst.circuit.state}"

    @staticmethod
    def take_slot(inst: InstanceState) -> bool:
        """In flight from now, if the instance is below its `max_concurrency` (no wait)."""
        return inst.slots.take()

    @staticmethod
    async def wait_for_slot(inst: InstanceState, wait_s: float, last: bool) -> bool:
        """Queue up to `wait_s` for a slot; the last candidate (`last`) takes one anyway
        when none frees: piling on beats losing the request. False: move on."""
        if await inst.slots.wait(wait_s):
            return True
        if last:
            inst.slots.force()
            return True
        return False

    @staticmethod
    def withdraw(inst: InstanceState, owner: object) -> None:
        """An admitted attempt did not go ahead (no slot freed): a half-open trial it
        claimed may be given to another."""
        inst.circuit.release_trial(owner)

    @staticmethod
    def end_attempt(inst: InstanceState, owner: object) -> None:
        """The attempt is over: its slot frees, and a half-open trial it claimed but got
        no verdict for (the client left, a skip) may be given to another."""
        inst.slots.release()
        inst.circuit.release_trial(owner)

    def record_success(self, inst: InstanceState, ttfb_s: float) -> None:
        """An attempt got a usable answer; `ttfb_s` is its time to first output."""
        ms = ttfb_s * 1000.0
        prev = inst.ttfb_ewma_ms
        ewma = ms if prev is None else prev + EWMA_ALPHA * (ms - prev)
        inst.ttfb_ewma_ms = ewma
        inst.latency_reason = f"latency={ewma:.0f}ms"
        inst.successes += 1
        inst.rate_limit_streak = 0
        inst.recent.append((time.monotonic(), True))
        if inst.state in STALE_STATES:
            self.set_state(inst, READY, "answered a request")
        if inst.circuit.state != CLOSED:
            inst.circuit.on_success()
            log.info("circuit_closed", instance=inst.id, by="successful request")
            if self.changes is not None:
                self.changes.changed(inst, CIRCUIT, BY_REQUEST)

    def record_answer(self, inst: InstanceState) -> None:
        """The instance answered with a client error of the upstream's own (passed
        through): the server works, whatever the request's fault."""
        was = inst.circuit.state
        inst.circuit.on_success()
        if was != CLOSED and self.changes is not None:
            self.changes.changed(inst, CIRCUIT, BY_REQUEST)

    def record_failure(self, inst: InstanceState, failure: Failure,
                       retrying: bool = False) -> None:
        """An attempt failed: feed the error rate and the circuit, as the failure's class
        declares (proxy.failures).

        A failure that is no instance fault (a skip, a prompt too long for its window)
        changes nothing. A `mismatch` moves the instance to MISMATCH; a `cooldown` (a 429)
        starts a rate-limit cooldown and leaves the circuit as it is. Otherwise a STRIKE
        counts toward `failure_threshold` (every failed attempt counts), and OPENS opens
        the circuit at once, unless `retrying` (the caller tries the same instance once
        more): then it is a strike too, and the retry's failure decides.
        """
        if not failure.instance_fault:
            return
        now = time.monotonic()
        inst.failures += 1
        inst.last_error = f"{failure.code}: {failure.detail}"
        inst.last_error_at = time.time()
        inst.recent.append((now, False))
        inst.last_failure_mono = now
        changes = self.changes
        if changes is not None:
            changes.changed(inst, FAILURE)
        if failure.mismatch:
            self.set_state(inst, MISMATCH, failure.detail)
            return
        if failure.cooldown:
            self._cool_down(inst, failure.retry_after, now)
            if changes is not None:
                changes.changed(inst, COOLDOWN)
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
            if changes is not None:
                changes.changed(inst, CIRCUIT)

    @staticmethod
    def _cool_down(inst: InstanceState, retry_after_s: float | None, now: float) -> None:
        """Send the instance nothing for `retry_after_s` (its 429's word), or with none,
        health.cooldown_s doubled for each such 429 in a row up to health.max_cooldown_s."""
        if retry_after_s is None:
            circuit = inst.circuit
            wait = min(circuit.base_cooldown_s * (1 << min(inst.rate_limit_streak, 16)),
                       circuit.max_cooldown_s)
            inst.rate_limit_streak += 1
        else:
            # Bounded: a buggy or hostile `Retry-After: 1000000000` must not take the
            # instance out until a restart (a real limit still in force costs one more
            # 429 an hour).
            wait = min(retry_after_s, MAX_RATE_LIMIT_COOLDOWN_S)
        if now + wait > inst.rate_limited_until:
            inst.rate_limited_until = now + wait
        log.warning("rate_limited", instance=inst.id, retry_in_s=round(wait, 2),
                    given=retry_after_s is not None)

    @staticmethod
    def learn_window(inst: InstanceState, window: int) -> None:
        """The server stated its context window (tokens) in an overflow error: kept for
        later plans when the config declares none (a declared `ctx` is the user's word)."""
        if inst.config.ctx is not None or inst.learned_ctx == window:
            return
        inst.learned_ctx = window
        inst.ctx_reason = f"ctx=learned:{window}"
        log.info("ctx_learned", instance=inst.id, ctx=window)

    @staticmethod
    def refuse_prefill(inst: InstanceState, why: str) -> None:
        """The instance refused an assistant prefill: it is not sent one again."""
        if inst.prefill_ok:
            inst.prefill_ok = False
            log.warning("prefill_rejected", instance=inst.id, detail=why)

    # ------------------------------------------------------------------ probes

    def probed(self, inst: InstanceState, state: str, reason: str, latency_ms: float,
               warnings: tuple[str, ...] = (), load: ServerLoad | None = None) -> None:
        """What a probe saw: the state it found (READY, LOADING, DOWN, MISMATCH) and why,
        the warnings (each logged once, when it appears) and how busy the server said it
        is (None: not said; its busy and queued figures are then 0, its slots kept). A
        good probe closes a circuit that connection failures opened; a drained instance
        stays drained."""
        load = load or _NO_LOAD
        # What the server serves besides this proxy's own requests (those are counted
        # live): a figure of the probe's moment would otherwise count ours that are done.
        inst.server_busy = max(0, (load.busy or 0) - inst.slots.inflight)
        inst.server_queued = load.queued or 0
        if load.slots is not None and load.slots != inst.server_slots:  # kept while down
            inst.server_slots = load.slots
            inst.size_capacity()
        inst.last_probe_at = time.time()
        inst.last_probe_ms = latency_ms
        inst.last_probe_error = None if state == READY else reason
        if warnings != inst.warnings:
            for warning in warnings:
                if warning not in inst.warnings:
                    log.warning("instance_warning", instance=inst.id, warning=warning)
            inst.warnings = warnings
        if state == READY and inst.circuit.on_probe_ok():
            # Back after a refused or reset connection: its old errors say nothing now.
            self._forget_errors(inst)
            log.info("circuit_closed", instance=inst.id, by="probe")
            if self.changes is not None:  # the evidence is as old as the probe's start
                self.changes.changed(inst, CIRCUIT, BY_PROBE,
                                     at=inst.last_probe_at - latency_ms / 1000.0)
        if inst.state != DRAINED:  # an admin took it out; probes only keep figures fresh
            self.set_state(inst, state, reason)

    def learn_fingerprint(self, inst: InstanceState, pin: Pin) -> None:
        """What the server serves, learned (`fingerprint: auto`) or its listing changed
        around the pinned model: pinned from now on."""
        old = inst.pin
        inst.pin = pin
        if self.changes is not None:
            self.changes.changed(inst, PIN)
        if old is None:
            log.info("fingerprint_pinned", instance=inst.id, fingerprint=pin.describe(),
                     models=list(pin.models[:20]), detail=pin.detail)
        else:
            added, removed = changes(old, pin)
            log.info("fingerprint_updated", instance=inst.id, fingerprint=pin.describe(),
                     added=added[:20], removed=removed[:20])

    def reset_fingerprint(self, inst: InstanceState) -> None:
        """Forget a learned fingerprint (an admin's word); the next probe learns it again."""
        if inst.pin is not None and inst.pin.source == LEARNED:
            inst.pin = None
            if self.changes is not None:
                self.changes.changed(inst, PIN)
        if inst.state == MISMATCH:
            self.set_state(inst, UNKNOWN, "fingerprint reset by admin")
