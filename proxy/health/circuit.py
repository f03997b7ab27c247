"""The circuit breaker of one instance: a failing instance is skipped until it has cooled down.

closed -> open (cooldown) -> half_open (one trial request) -> closed, or open again with a
doubled cooldown. Pure logic over a monotonic clock the caller passes in; no I/O.

Who may close an open circuit depends on what opened it: a refused or reset connection
is something a health probe sees too, so a good probe closes it; HTTP errors on
completions are not (a probe of /v1/models can succeed while completions fail), so only a
successful half-open trial closes that. A 429 is no circuit matter: the server works and
said when to come back, so the registry keeps the instance out for exactly that long
(`InstanceState.rate_limited_until`) and no half-open trial ever shortens it.

`threshold` counts failed attempts: a 5xx retried once on the same instance that fails again
is two strikes.
"""

from __future__ import annotations

from dataclasses import dataclass

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

# What opened the circuit.
BY_CONNECTION = "connection"
BY_HTTP = "http"


@dataclass(slots=True)
class Circuit:
    """Breaker state; `open_until` is on the caller's monotonic clock."""

    base_cooldown_s: float = 1.0
    max_cooldown_s: float = 16.0
    threshold: int = 3
    state: str = CLOSED
    opened_by: str | None = None
    open_until: float = 0.0
    cooldown_s: float = 0.0
    #: Consecutive timeouts / 5xx not yet enough to open.
    strikes: int = 0
    #: Who holds the half-open trial (the attempt that claimed it), or None.
    trial_owner: object | None = None

    def available(self, now: float) -> bool:
        """Whether a request may be sent now (without claiming a half-open trial)."""
        if self.state == CLOSED:
            return True
        if now < self.open_until:
            return False
        return self.trial_owner is None

    def acquire(self, now: float, owner: object) -> bool:
        """Claim the right to send one request now; a half-open circuit allows one at a time,
        and `owner` holds that trial until a verdict or `release_trial(owner)`."""
        if self.state == CLOSED:
            return True
        if now < self.open_until or self.trial_owner is not None:
            return False
        self.state = HALF_OPEN
        self.trial_owner = owner
        return True

    def release_trial(self, owner: object) -> None:
        """`owner`'s trial ended without a verdict (the client left, a skip): another may
        be tried. A trial someone else holds, or none, is left alone."""
        if self.trial_owner is owner:
            self.trial_owner = None

    def remaining(self, now: float) -> float:
        return max(0.0, self.open_until - now) if self.state != CLOSED else 0.0

    def on_success(self) -> None:
        """A request succeeded: whatever the state, the instance works."""
        self._close()

    def on_failure(self, kind: str, now: float, immediate: bool) -> bool:
        """Record a failed attempt; returns True when this opened (or re-opened) the circuit.

        `kind` is BY_CONNECTION or BY_HTTP. `immediate` opens at once (refused or reset
        connections); otherwise only after `threshold` failed attempts in a row.
        """
        self.trial_owner = None
        if self.state == CLOSED and not immediate:
            self.strikes += 1
            if self.strikes < self.threshold:
                return False
        # Open, or re-open after a failed trial, with an exponential cooldown.
        if self.state == CLOSED:
            self.cooldown_s = self.base_cooldown_s
        else:
            self.cooldown_s = min(max(self.cooldown_s, self.base_cooldown_s) * 2,
                                  self.max_cooldown_s)
        self.state = OPEN
        if self.opened_by != BY_HTTP:
            self.opened_by = kind  # HTTP failures are the stickier cause: keep them
        self.open_until = now + self.cooldown_s
        self.strikes = 0
        return True

    def on_probe_ok(self) -> bool:
        """A health probe succeeded; closes a circuit that connection failures opened."""
        if self.state != CLOSED and self.opened_by == BY_CONNECTION:
            self._close()
            return True
        return False

    def _close(self) -> None:
        self.state = CLOSED
        self.opened_by = None
        self.open_until = 0.0
        self.cooldown_s = 0.0
        self.strikes = 0
        self.trial_owner = None
