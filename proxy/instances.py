"""Live view of every configured instance: its static profile plus figures from real traffic
and from the background prober.

The registry is the only mutable routing state. It is read by the planner and written by
the forwarder after each attempt and by the prober after each probe; every method is
synchronous and O(1), so the hot path never waits on it and never holds anything across an
upstream await.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from proxy.circuit import BY_CONNECTION, BY_HTTP, CLOSED, Circuit
from proxy.config import HealthConfig, InstanceConfig, instance_ids
from proxy.failures import (
    CONN_REFUSED,
    FINGERPRINT_MISMATCH,
    PROCESS_EXITED,
    STREAM_CUT,
    RateLimited,
    UpstreamFailure,
)
from proxy.fingerprints import CONFIGURED, Pin, configured, request_model

log = structlog.get_logger("proxy.instances")

# Instance states (SPEC section 6).
UNKNOWN = "UNKNOWN"
READY = "READY"
LOADING = "LOADING"
DOWN = "DOWN"
MISMATCH = "MISMATCH"
DRAINED = "DRAINED"

DISABLED_REASON = "disabled in the config"

#: States in which an instance may be sent traffic.
ROUTABLE_STATES = frozenset({UNKNOWN, READY})
#: States the prober saw last, which may be out of date by now: such an instance is still
#: tried as a last resort (if its circuit allows), so a server that came back between two
#: probes is never refused.
STALE_STATES = frozenset({DOWN, LOADING})

_EWMA_ALPHA = 0.2
#: How many recent outcomes, and how far back, the error rate looks at. Old failures are
#: forgotten even without new traffic, so an instance that failed once is not shunned forever.
ERROR_WINDOW_N = 20
ERROR_WINDOW_S = 60.0

# Failures that say the connection itself is gone: the circuit opens at once.
_CONNECTION_FAILURES = frozenset({CONN_REFUSED, PROCESS_EXITED, STREAM_CUT})

StateListener = Callable[["InstanceState", str, str, str], None]


@dataclass(slots=True)
class InstanceState:
    """Runtime figures of one instance. `config` is immutable; the rest changes."""

    config: InstanceConfig
    state: str = UNKNOWN
    #: Why the instance is in its state, for people (the reason of its last change).
    state_reason: str = ""
    circuit: Circuit = field(default_factory=Circuit)
    inflight: int = 0
    ttfb_ewma_ms: float | None = None
    successes: int = 0
    failures: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    #: (monotonic time, succeeded) of the latest attempts.
    recent: deque[tuple[float, bool]] = field(
        default_factory=lambda: deque(maxlen=ERROR_WINDOW_N))
    error_window_s: float = ERROR_WINDOW_S
    last_failure_mono: float = float("-inf")
    #: What the server is known to serve: configured, or learned at the first good probe
    #: and kept until it changes or an admin resets it. None: not known (not checked).
    pin: Pin | None = None
    #: Things a person should fix that do not stop routing (a label the server does not
    #: list), from the latest probe.
    warnings: tuple[str, ...] = ()
    last_probe_at: float | None = None
    last_probe_ms: float | None = None
    last_probe_error: str | None = None
    #: False once the instance refused an assistant prefill (mid-stream continuation).
    prefill_ok: bool = True
    #: The context window (tokens) the server stated in a context-overflow error, for an
    #: instance whose config declares no `ctx`; None until one said it.
    learned_ctx: int | None = None
    #: Monotonic time until which the instance is sent nothing: it answered 429 and said
    #: (or, saying nothing, was given) how long to stay away.
    rate_limited_until: float = 0.0
    #: 429s in a row that gave no wait: each doubles the default cooldown.
    rate_limit_streak: int = 0
    #: Set when a config reload dropped or replaced this instance: requests still in flight
    #: on it finish, but what they report no longer reaches the registry's listeners.
    retired: bool = False
    # Copied from the config once, for the planner's inner loop.
    id: str = field(init=False)
    tags: frozenset[str] = field(init=False)
    cost_per_mtok: float = field(init=False)
    #: The latency reason string, formatted when the EWMA changes rather than per plan.
    latency_reason: str = "latency=unknown"
    #: The context reason of a window learned from the server, formatted once.
    ctx_reason: str = "ctx=unknown"
    #: Requested tags -> (matched share, reason): few distinct tag sets ever occur.
    tag_match_cache: dict[tuple[str, ...], tuple[float, str]] = field(default_factory=dict)
    # request_model's cache: the pin it was computed for, and the name.
    _model_pin: Pin | None = field(default=None, init=False, repr=False)
    _model_name: str | None = field(default=None, init=False, repr=False)
    _model_known: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self._derive()
        cfg = self.config
        if cfg.fingerprint is not None and cfg.fingerprint != "auto":
            self.pin = configured(cfg.fingerprint, cfg.model)
        self.prefill_ok = "prefill" in cfg.capabilities

    def _derive(self) -> None:
        cfg = self.config
        self.id = cfg.id
        self.tags = frozenset(cfg.tags)
        self.cost_per_mtok = cfg.cost_input_per_mtok + cfg.cost_output_per_mtok
        self.tag_match_cache.clear()

    @property
    def fingerprint(self) -> str | None:
        """The pinned model's name, or a learned set's names, or None when not known."""
        pin = self.pin
        return None if pin is None else pin.describe()

    @property
    def request_model(self) -> str | None:
        """The `model` to send this instance (None: the client's own), recomputed only
        when the pin changes (see fingerprints.request_model)."""
        pin = self.pin
        if pin is not self._model_pin or not self._model_known:
            cfg = self.config
            self._model_name = request_model(cfg.model, pin, cfg.server != "llamacpp")
            self._model_pin = pin
            self._model_known = True
        return self._model_name

    @property
    def ctx(self) -> int | None:
        """The context window in tokens: the configured one, else the one the server
        stated in an overflow error, else None (unknown)."""
        declared = self.config.ctx
        return declared if declared is not None else self.learned_ctx

    def reconfigure(self, config: InstanceConfig, health: HealthConfig) -> None:
        """Take a reloaded config of the same server (same id, address, model and kind).

        Every live figure stays (state, circuit, in-flight count, latency, error history,
        rate-limit cooldown, a learned fingerprint or context window, a refused prefill)
        and the object stays the same, so requests in flight during a reload report to
        what new requests read.
        """
        old = self.config
        self.config = config
        self._derive()
        self._model_known = False  # the label may have changed
        circuit = self.circuit
        circuit.base_cooldown_s = health.cooldown_s
        circuit.max_cooldown_s = health.max_cooldown_s
        circuit.threshold = health.failure_threshold
        pin = self.pin
        if config.fingerprint is not None and config.fingerprint != "auto":
            if pin is None or pin.source != CONFIGURED or pin.name != config.fingerprint:
                self.pin = configured(config.fingerprint, config.model)
        elif config.fingerprint is None or (pin is not None and pin.source == CONFIGURED):
            self.pin = None  # off, or back to auto: learn again at the next probe
        if config.ctx is not None:
            self.learned_ctx = None  # the user's word now
            self.ctx_reason = "ctx=unknown"
        # A refusal learned from traffic stands; a newly declared prefill is believed.
        self.prefill_ok = "prefill" in config.capabilities and (
            self.prefill_ok or "prefill" not in old.capabilities)
        if not config.enabled:
            self.state, self.state_reason = DRAINED, DISABLED_REASON
        elif self.state == DRAINED and not old.enabled:
            self.state, self.state_reason = UNKNOWN, "enabled in the config"

    def routable(self, now: float | None = None) -> bool:
        """Whether traffic may be sent now: a routable state, no rate-limit cooldown and a
        circuit that is not open.

        Disabled (config `enabled: false`) and drained instances are in state DRAINED.
        """
        if self.state not in ROUTABLE_STATES:
            return False
        now = time.monotonic() if now is None else now
        return self.rate_limited_until <= now and self.circuit.available(now)

    def rate_limit_reason(self, now: float) -> str | None:
        """`rate_limited(retry_in=29.4s)` while a 429 cooldown runs (a hard filter), else None."""
        left = self.rate_limited_until - now
        return f"rate_limited(retry_in={left:.1f}s)" if left > 0 else None

    def blocked_reason(self) -> str | None:
        """Why the instance may not be sent any request now (a hard filter), or None.

        DOWN and LOADING are not blocking: the planner keeps such an instance as a last
        resort while its circuit is closed.
        """
        state = self.state
        if state in ROUTABLE_STATES or state in STALE_STATES:
            return None
        if state == DRAINED:
            return "drained" if self.config.enabled else "disabled"
        return f"state={state}"

    def error_rate(self, now: float | None = None) -> float:
        """Share of failures among the recent attempts (0.0 with no recent history)."""
        since = (time.monotonic() if now is None else now) - self.error_window_s
        if self.last_failure_mono < since:
            return 0.0  # no failure in the window: the common case, no scan
        total = failed = 0
        for at, ok in self.recent:
            if at >= since:
                total += 1
                failed += not ok
        return failed / total if total else 0.0

    def _remember(self, ok: bool, now: float) -> None:
        self.recent.append((now, ok))
        if not ok:
            self.last_failure_mono = now

    def forget_errors(self) -> None:
        """Drop the passive error history (the instance was seen healthy again)."""
        self.recent.clear()
        self.last_failure_mono = float("-inf")

    def snapshot(self, now: float | None = None) -> dict[str, object]:
        """A JSON-ready view for /admin/instances and `check` (no secrets)."""
        now = time.monotonic() if now is None else now
        cfg = self.config
        circuit = self.circuit
        return {
            "id": self.id,
            "base_url": cfg.base_url,
            "model": cfg.model,
            "local": cfg.local,
            "enabled": self.state != DRAINED,
            "state": self.state,
            "state_reason": self.state_reason,
            "routable": self.routable(now),
            "circuit": circuit.state if circuit.state == CLOSED or now < circuit.open_until
            else "half_open",
            "circuit_opened_by": circuit.opened_by,
            "circuit_retry_in_s": round(circuit.remaining(now), 2),
            "rate_limited_retry_in_s": round(max(0.0, self.rate_limited_until - now), 2),
            "fingerprint": self.fingerprint,
            "fingerprint_source": "none" if self.pin is None else self.pin.source,
            "fingerprint_models": [] if self.pin is None else list(self.pin.models),
            "fingerprint_detail": None if self.pin is None else self.pin.detail,
            "warnings": list(self.warnings),
            "latency_ewma_ms": None if self.ttfb_ewma_ms is None else round(self.ttfb_ewma_ms, 2),
            "error_rate": round(self.error_rate(now), 3),
            "inflight": self.inflight,
            "successes": self.successes,
            "failures": self.failures,
            "last_probe_at": self.last_probe_at,
            "last_probe_ms": self.last_probe_ms,
            "last_probe_error": self.last_probe_error,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "prefill": self.prefill_ok,
            "ctx": self.ctx,
            "ctx_source": "configured" if cfg.ctx is not None
            else "learned" if self.learned_ctx is not None else "unknown",
        }


#: Longest rate-limit cooldown taken from an upstream's headers (Retry-After, resets).
MAX_RATE_LIMIT_COOLDOWN_S = 3600.0


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
                inst.state, inst.state_reason = DRAINED, DISABLED_REASON

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
        inst.state_reason = reason  # the latest word, even when the state stays
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

    def record_failure(self, inst: InstanceState, failure: UpstreamFailure,
                       retrying: bool = False) -> None:
        """An attempt written upstream failed: feed the error rate and the circuit.

        Every failed attempt is one strike towards `failure_threshold`. A refused or reset
        connection opens the circuit at once, unless `retrying` (the caller tries the same
        instance once more): then it is a strike too, and the retry's failure decides.
        A 429 starts a rate-limit cooldown instead (the circuit stays as it is): its
        Retry-After, or with none, health.cooldown_s doubled for each such 429 in a row up
        to health.max_cooldown_s. A failure that is no instance fault (a prompt too long
        for its window) changes nothing.
        """
        if not failure.instance_fault:
            return
        now = time.monotonic()
        inst.failures += 1
        inst.last_error = f"{failure.code}: {failure.detail}"
        inst.last_error_at = time.time()
        inst._remember(False, now)
        code = failure.code
        if code == FINGERPRINT_MISMATCH:
            self.set_state(inst, MISMATCH, failure.detail)
            return
        if isinstance(failure, RateLimited):
            self._cool_down(inst, failure.retry_after, now)
            return
        if code in _CONNECTION_FAILURES:
            opened = inst.circuit.on_failure(BY_CONNECTION, now, not retrying)
        else:
            opened = inst.circuit.on_failure(BY_HTTP, now, False)
        if opened:
            log.warning("circuit_opened", instance=inst.id, reason=code,
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
            # Bounded: a buggy or hostile `Retry-After: 1000000000` must not take the
            # instance out until a restart (a real limit still in force costs one more
            # 429 an hour).
            wait = min(retry_after_s, MAX_RATE_LIMIT_COOLDOWN_S)
        if now + wait > inst.rate_limited_until:
            inst.rate_limited_until = now + wait
        log.warning("rate_limited", instance=inst.id, retry_in_s=round(wait, 2),
                    given=retry_after_s is not None)

    def release_trial(self, inst: InstanceState) -> None:
        """An acquired half-open trial ended without a verdict (e.g. the client left)."""
        inst.circuit.trial_in_flight = False
