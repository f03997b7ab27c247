"""What the registry tells a listener that shares instance state with other replicas
(proxy.state), and the registry's writers for what another replica learned.

The registry stays the one writer of instance state: `Registry.changes` (a `ChangeSink`)
hears of each change it makes, and `SharedWrites` (a base of the registry) takes in what
another replica saw, converted from wall-clock to this process's monotonic clock by the
caller. Neither does I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import structlog

from proxy.health.circuit import BY_CONNECTION, CLOSED, OPEN
from proxy.health.fingerprints import LEARNED, Pin
from proxy.health.instance import InstanceState
from proxy.health.states import DRAINED, MISMATCH, UNKNOWN

log = structlog.get_logger("proxy.health.registry")

#: Weight of a new time to first output in the latency EWMA.
EWMA_ALPHA = 0.2

# What changed (a ChangeSink's `what`).
CIRCUIT = "circuit"
COOLDOWN = "cooldown"
STATE = "state"
PIN = "pin"
FAILURE = "fail"

# Who closed a circuit (a CIRCUIT change's `how` when it closed; "" when it opened).
BY_PROBE = "probe"
BY_REQUEST = "request"
BY_ADMIN = "admin"

#: The states an admin or a learned fact puts an instance in, which every replica shares;
#: READY, DOWN and LOADING are each replica's own probes' word.
SHARED_STATES = frozenset({DRAINED, MISMATCH})


class ChangeSink(Protocol):
    """Told right after the registry changed `inst` (synchronously, on the event loop):
    must not block or await. `at` is the wall-clock time (unix seconds) of the evidence
    when it is not now (a probe's start)."""

    def changed(self, inst: InstanceState, what: str, how: str = "",
                at: float | None = None) -> None: ...


class SharedWrites:
    """The registry's writers for another replica's findings (times on the monotonic clock)."""

    if TYPE_CHECKING:  # the registry's own
        def set_state(self, inst: InstanceState, new: str, reason: str) -> bool: ...

    @staticmethod
    def adopt_open_circuit(inst: InstanceState, until: float, by: str | None,
                           cooldown_s: float) -> None:
        """Another replica opened the circuit until `until` (a later end here is kept)."""
        circuit = inst.circuit
        if circuit.state != CLOSED and circuit.open_until >= until:
            return
        circuit.state = OPEN
        circuit.open_until = until
        circuit.cooldown_s = max(cooldown_s, circuit.cooldown_s)
        if circuit.opened_by is None or by is not None and circuit.opened_by == BY_CONNECTION:
            circuit.opened_by = by
        circuit.strikes = 0
        log.info("circuit_opened", instance=inst.id, by="another replica",
                 cooldown_s=round(cooldown_s, 2))

    @staticmethod
    def adopt_closed_circuit(inst: InstanceState, how: str) -> None:
        """Another replica saw the instance work: a request's or an admin's word closes
        any circuit, a probe's only one that connection failures opened (as here)."""
        circuit = inst.circuit
        if circuit.state == CLOSED:
            return
        if how == BY_PROBE:
            if not circuit.on_probe_ok():
                return
        else:
            circuit.on_success()
        log.info("circuit_closed", instance=inst.id, by=f"another replica's {how}")

    @staticmethod
    def adopt_cooldown(inst: InstanceState, until: float | None) -> None:
        """Another replica's 429 cooldown until `until` (the longer one wins), or None:
        an admin ended it."""
        if until is None:
            inst.rate_limited_until = 0.0
            inst.rate_limit_streak = 0
        elif until > inst.rate_limited_until:
            inst.rate_limited_until = until

    def adopt_state(self, inst: InstanceState, state: str, reason: str) -> None:
        """Another replica drained, enabled or found a MISMATCH (`state` UNKNOWN: out of
        DRAINED or MISMATCH again). An instance the config disables stays so."""
        if not inst.config.enabled:
            return
        if state in SHARED_STATES:
            self.set_state(inst, state, reason)
        elif inst.state in SHARED_STATES:
            self.set_state(inst, UNKNOWN, reason)

    @staticmethod
    def adopt_pin(inst: InstanceState, pin: Pin | None) -> None:
        """Another replica learned (or an admin reset, None) what the instance serves; a
        configured pin is the config's word and stays."""
        if inst.pin is not None and inst.pin.source != LEARNED:
            return
        inst.pin = pin

    @staticmethod
    def adopt_failure(inst: InstanceState, at: float) -> None:
        """A failed attempt another replica made at `at`: it counts in the error rate."""
        inst.recent.append((at, False))
        if at > inst.last_failure_mono:
            inst.last_failure_mono = at

    @staticmethod
    def adopt_latency(inst: InstanceState, ms: float) -> None:
        """Another replica's latency EWMA (ms), folded in as one more observation."""
        prev = inst.ttfb_ewma_ms
        ewma = ms if prev is None else prev + EWMA_ALPHA * (ms - prev)
        inst.ttfb_ewma_ms = ewma
        inst.latency_reason = f"latency={ewma:.0f}ms"
