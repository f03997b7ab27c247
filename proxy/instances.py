"""Live view of every configured instance: its static profile plus figures from real traffic.

The registry is the only mutable routing state. It is read by the planner and written by
the forwarder after each attempt; every method is synchronous and O(1), so the hot path
never waits on it and never holds anything across an upstream await.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from proxy.config import InstanceConfig
from proxy.failures import CONN_REFUSED, RATE_LIMITED, UpstreamFailure

# Instance states (SPEC section 6 / issue 4).
UNKNOWN = "UNKNOWN"
READY = "READY"
LOADING = "LOADING"
DOWN = "DOWN"
MISMATCH = "MISMATCH"
DRAINED = "DRAINED"

#: States in which an instance may be sent traffic.
ROUTABLE_STATES = frozenset({UNKNOWN, READY})

_EWMA_ALPHA = 0.2
#: How many recent outcomes, and how far back, the error rate looks at. Old failures are
#: forgotten even without new traffic, so an instance that failed once is not shunned forever.
ERROR_WINDOW_N = 20
ERROR_WINDOW_S = 60.0


@dataclass(slots=True)
class InstanceState:
    """Runtime figures of one instance. `config` is immutable; the rest changes with traffic."""

    config: InstanceConfig
    state: str = UNKNOWN
    inflight: int = 0
    ttfb_ewma_ms: float | None = None
    successes: int = 0
    failures: int = 0
    #: Monotonic time before which the instance is skipped (e.g. after a 429's Retry-After).
    cooldown_until: float = 0.0
    last_error: str | None = None
    last_error_at: float | None = None
    #: (monotonic time, succeeded) of the latest attempts.
    recent: deque[tuple[float, bool]] = field(
        default_factory=lambda: deque(maxlen=ERROR_WINDOW_N))
    error_window_s: float = ERROR_WINDOW_S
    last_failure_mono: float = float("-inf")
    # Copied from the config once, for the planner's inner loop.
    id: str = field(init=False)
    tags: frozenset[str] = field(init=False)
    cost_per_mtok: float = field(init=False)
    #: The latency reason string, formatted when the EWMA changes rather than per plan.
    latency_reason: str = "latency=unknown"
    #: Requested tags -> (matched share, reason): few distinct tag sets ever occur.
    tag_match_cache: dict[tuple[str, ...], tuple[float, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.id = self.config.id
        self.tags = frozenset(self.config.tags)
        self.cost_per_mtok = self.config.cost_input_per_mtok + self.config.cost_output_per_mtok

    def routable(self, now: float | None = None) -> bool:
        """Whether traffic may be sent now (enabled, in a routable state, not cooling down)."""
        if not self.config.enabled or self.state not in ROUTABLE_STATES:
            return False
        return self.cooldown_until <= (time.monotonic() if now is None else now)

    def not_routable_reason(self, now: float | None = None) -> str | None:
        """Why the instance cannot take traffic now, or None if it can."""
        if not self.config.enabled:
            return "disabled"
        if self.state not in ROUTABLE_STATES:
            return f"state={self.state}"
        remaining = self.cooldown_until - (time.monotonic() if now is None else now)
        if remaining > 0:
            return f"cooldown={remaining:.1f}s"
        return None

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

    def _remember(self, ok: bool) -> None:
        now = time.monotonic()
        self.recent.append((now, ok))
        if not ok:
            self.last_failure_mono = now


class Registry:
    """All instances in config order, addressable by full id."""

    def __init__(self, instances: Iterable[InstanceConfig]) -> None:
        self.states: tuple[InstanceState, ...] = tuple(InstanceState(cfg) for cfg in instances)
        self.by_id: dict[str, InstanceState] = {s.id: s for s in self.states}

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.states)

    def get(self, instance_id: str) -> InstanceState | None:
        return self.by_id.get(instance_id)

    def any_routable(self) -> bool:
        now = time.monotonic()
        return any(s.routable(now) for s in self.states)

    def record_success(self, inst: InstanceState, ttfb_s: float) -> None:
        """An attempt got a usable answer; `ttfb_s` is its time to first byte."""
        ms = ttfb_s * 1000.0
        prev = inst.ttfb_ewma_ms
        ewma = ms if prev is None else prev + _EWMA_ALPHA * (ms - prev)
        inst.ttfb_ewma_ms = ewma
        inst.latency_reason = f"latency={ewma:.0f}ms"
        inst.successes += 1
        inst._remember(True)

    def record_failure(self, inst: InstanceState, failure: UpstreamFailure,
                       retry_after_s: float | None = None) -> None:
        """An attempt failed; a refusal or a 429 keeps the instance out for a while."""
        inst.failures += 1
        inst.last_error = f"{failure.code}: {failure.detail}"
        inst.last_error_at = time.time()
        inst._remember(False)
        if failure.code == RATE_LIMITED and retry_after_s is not None:
            inst.cooldown_until = max(inst.cooldown_until, time.monotonic() + retry_after_s)
        elif failure.code == CONN_REFUSED:
            # A dead port stays dead for a moment; don't make the next request pay for it.
            inst.cooldown_until = max(inst.cooldown_until, time.monotonic() + 1.0)
