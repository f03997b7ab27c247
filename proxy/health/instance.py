"""One instance's live state: its static profile (the config) plus the figures real traffic
and the background prober give it, and the read-only views the planner and the attempt
loop take of it. Only the registry (proxy.health.registry) writes these figures.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from proxy.audit.database import redact_url
from proxy.config import InstanceConfig
from proxy.health.circuit import CLOSED, Circuit
from proxy.health.fingerprints import Pin, configured, request_model
from proxy.health.slots import Slots
from proxy.health.states import (
    DISABLED_REASON,
    DRAINED,
    ROUTABLE_STATES,
    STALE_STATES,
    UNKNOWN,
)
from proxy.providers.base import Provider
from proxy.providers.kinds import provider_for

#: How many recent outcomes, and how far back, the error rate looks at. Old failures are
#: forgotten even without new traffic, so an instance that failed once is not shunned forever.
ERROR_WINDOW_N = 20
ERROR_WINDOW_S = 60.0


@dataclass(slots=True)
class InstanceState:
    """Runtime figures of one instance. `config` is immutable; the rest changes."""

    config: InstanceConfig
    state: str = UNKNOWN
    #: Why the instance is in its state, for people (the reason of its last change).
    state_reason: str = ""
    circuit: Circuit = field(default_factory=Circuit)
    #: Requests in flight to it, and its `max_concurrency` (proxy.health.slots).
    slots: Slots = field(init=False)
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
    #: How busy the server itself says it is, from the latest probe (proxy.providers.load):
    #: its slots (None: not said), requests it serves for other clients (its figure less
    #: this proxy's in flight then) and requests it queues (0: not said).
    server_slots: int | None = None
    server_busy: int = 0
    server_queued: int = 0
    #: Requests it serves at once: the fewer of `max_concurrency` and the server's slots;
    #: None when neither is known (kept by `derive` and the registry).
    capacity: int | None = field(default=None, init=False)
    #: Set when a config reload dropped or replaced this instance: requests still in flight
    #: on it finish, but what they report no longer reaches the registry's listeners.
    retired: bool = False
    # Copied from the config once, for the planner's inner loop.
    id: str = field(init=False)
    #: What its kind of server does its own way (proxy.providers).
    provider: Provider = field(init=False)
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
    model_known: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        cfg = self.config
        self.slots = Slots(cfg.max_concurrency)
        self.derive()
        if cfg.fingerprint is not None and cfg.fingerprint != "auto":
            self.pin = configured(cfg.fingerprint, cfg.model)
        self.prefill_ok = "prefill" in cfg.capabilities
        if not cfg.enabled:
            self.state, self.state_reason = DRAINED, DISABLED_REASON

    def derive(self) -> None:
        """Copy what the planner's inner loop reads from the config (again after a reload)."""
        cfg = self.config
        self.id = cfg.id
        self.provider = provider_for(cfg)
        self.tags = frozenset(cfg.tags)
        self.cost_per_mtok = cfg.cost_input_per_mtok + cfg.cost_output_per_mtok
        self.tag_match_cache.clear()
        self.model_known = False  # the label may have changed
        self.size_capacity()

    def size_capacity(self) -> None:
        """Work out `capacity` again (a reload, or a probe that read the server's slots)."""
        known = [n for n in (self.config.max_concurrency, self.server_slots) if n is not None]
        self.capacity = min(known) if known else None

    def load(self) -> tuple[int, int]:
        """(requests in flight, requests queued): this proxy's own, counted live, plus
        what the server served for other clients at the latest probe; and its queue."""
        return self.slots.inflight + self.server_busy, self.server_queued

    @property
    def inflight(self) -> int:
        """Requests in flight to this instance now."""
        return self.slots.inflight

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
        if pin is not self._model_pin or not self.model_known:
            cfg = self.config
            self._model_name = request_model(cfg.model, pin, self.provider.checks_names)
            self._model_pin = pin
            self.model_known = True
        return self._model_name

    @property
    def ctx(self) -> int | None:
        """The context window in tokens: the configured one, else the one the server
        stated in an overflow error, else None (unknown)."""
        declared = self.config.ctx
        return declared if declared is not None else self.learned_ctx

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

    def snapshot(self, now: float | None = None) -> dict[str, object]:
        """A JSON-ready view for /admin/instances and `check` (no secrets)."""
        now = time.monotonic() if now is None else now
        cfg = self.config
        circuit = self.circuit
        return {
            "id": self.id,
            "base_url": redact_url(cfg.base_url),  # (a password in it is a secret)
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
            "capacity": self.capacity,
            "server_busy": self.server_busy,
            "server_queued": self.server_queued,
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

