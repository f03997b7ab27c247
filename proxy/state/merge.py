"""The merge rules of shared instance state: what a local change says to other replicas,
and how a message from another replica is taken in. Pure bookkeeping over the registry;
no I/O (proxy.state.link moves the bytes).

A message is one JSON object: `r` the replica that sent it, `t` the wall-clock time
(unix seconds) of its evidence, `i` the instance id, `f` the field, and the field's
payload. Times inside payloads (`until`) are wall-clock too; each replica converts them
to and from its own monotonic clock (`to_mono`, `to_wall`): monotonic clocks of two
processes have nothing in common.

The rules, per instance and field (circuit, cooldown, state, pin):

1. **The latest evidence wins**: a message is applied only when its `t` is newer than
   every message of that field applied or sent here (`Ledger.seen`); an older one that
   arrives late (a resync, a slow replica) changes nothing. Redis keeps the newest too
   (proxy.state.link's compare-and-set script), so a resync converges on it.
2. **An open circuit propagates** with its end (`until`): a replica whose own circuit
   stays open longer keeps its longer end. Strikes short of the threshold are each
   replica's own.
3. **Who may close follows the local rule** (proxy.health.circuit): a request's success
   or an admin's enable closes any circuit everywhere; a probe's success closes only a
   circuit that connection failures opened, and its evidence is as old as the probe's
   *start*: a probe that was in flight when another replica's circuit opened neither
   closes that circuit elsewhere nor here (the local close is undone, `Ledger.local`).
4. **A 429 cooldown only grows** (the latest end of all replicas' 429s is kept), except
   that an admin's enable, newer, ends it everywhere.
5. **Drains, enables and MISMATCH** are shared states (proxy.health.changes
   SHARED_STATES): the latest word wins; READY, DOWN and LOADING are each replica's
   own probes' word.
6. **A learned fingerprint**: the latest wins; a configured one is never replaced.
7. **Latency and errors**: each replica publishes its latency EWMA about once a second
   (field `lat:REPLICA`), folded into the others' as one more observation; each failed
   attempt is published once (`fail`, not stored) and counts in the others' error rate.
   Figures older than `STALE_FIGURES_S` are ignored.
8. **Each replica ignores its own messages.**
9. **Another replica's word is bounded like this replica's own**: a time `t` more than
   `MAX_SKEW_S` ahead of this clock (a broken clock, a forged message) is ignored, since
   it would outrank every later word for good; an open circuit lasts at most the local
   `max_cooldown_s`, a 429 cooldown at most `MAX_RATE_LIMIT_COOLDOWN_S`, a latency is a
   finite number of ms from 0 to `MAX_LATENCY_MS`. Numbers must be JSON numbers (not
   "nan" strings), fields strings: anything else is a malformed message (ValueError or
   TypeError), logged and ignored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import orjson
import structlog

from proxy.health.changes import CIRCUIT, COOLDOWN, FAILURE, PIN, SHARED_STATES, STATE
from proxy.health.circuit import CLOSED
from proxy.health.fingerprints import Pin
from proxy.health.instance import InstanceState
from proxy.health.registry import MAX_RATE_LIMIT_COOLDOWN_S, Registry

log = structlog.get_logger("proxy.state")

#: Fields kept per instance (in Redis and in the ledger); `fail` and `lat:*` are figures.
KEPT_FIELDS = (CIRCUIT, COOLDOWN, STATE, PIN)
LATENCY = "lat:"
#: Another replica's latency figure older than this says nothing about now (seconds).
STALE_FIGURES_S = 60.0
#: How far ahead of this replica's clock another's may run (seconds): NTP keeps real ones
#: within milliseconds; a message from further ahead is ignored (rule 9).
MAX_SKEW_S = 300.0
#: The largest latency figure believed from another replica (ms): ten minutes.
MAX_LATENCY_MS = 600_000.0

Message = dict[str, Any]


def to_mono(wall: float) -> float:
    """A wall-clock time (unix seconds) on this process's monotonic clock."""
    return time.monotonic() + (wall - time.time())


def to_wall(mono: float) -> float:
    """A monotonic time of this process as wall-clock (unix seconds)."""
    return time.time() + (mono - time.monotonic())


def number(value: Any, name: str) -> float:
    """`value` as a float when it is a finite JSON number (not a bool, not a string);
    raises ValueError otherwise, naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise ValueError(f"{name!r} is not a finite number: {value!r:.40}")
    return float(value)


def evidence_time(value: Any) -> float:
    """A message's `t` (unix seconds); raises ValueError when it is no finite number or
    more than MAX_SKEW_S ahead of this clock (rule 9)."""
    t = number(value, "t")
    if t > time.time() + MAX_SKEW_S:
        raise ValueError(f"'t' is {t - time.time():.0f} s ahead of this replica's clock")
    return t


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name!r} is not a string")
    return value


def _pin_of(data: Any) -> Pin | None:
    if not isinstance(data, dict):
        return None
    return Pin(str(data["source"]), tuple(data["models"]), data.get("name"),
               tuple(data.get("keep") or ()), data.get("detail"), data.get("label"))


class Ledger:
    """Per (instance id, field): the newest evidence time seen here (`seen`) and the
    message that carried it (`latest`, what a resync offers Redis)."""

    def __init__(self, replica: str, registry: Registry) -> None:
        self.replica = replica
        self.registry = registry
        self.seen: dict[tuple[str, str], float] = {}
        self.latest: dict[tuple[str, str], bytes] = {}
        #: True while a remote message is being applied: the registry's change
        #: notifications it causes are not news to send back.
        self.applying = False
        #: Told of an instance another replica brought back (out of DRAINED or MISMATCH):
        #: the app probes it at once, as an enable here does.
        self.on_back: Callable[[InstanceState], None] | None = None

    # ------------------------------------------------------------------ local changes

    def local(self, inst: InstanceState, what: str, how: str = "",
              at: float | None = None) -> bytes | None:
        """The message for a change the registry just made, or None when it is not to
        be sent (applying a remote one, or a probe's stale close, undone here)."""
        if self.applying:
            return None
        now = time.time()
        t = now if at is None else at
        if what == FAILURE:
            return orjson.dumps({"r": self.replica, "t": t, "i": inst.id, "f": FAILURE})
        key = (inst.id, what)
        prev = self.seen.get(key)
        if prev is not None and t <= prev:
            if at is not None:  # evidence older than what is known: rule 3
                self._reapply(inst, key)
                return None
            t = prev + 1e-6  # a newer fact here, whatever the other clocks say
        msg: Message = {"r": self.replica, "t": t, "i": inst.id, "f": what}
        msg.update(self.payload(inst, what, how))
        raw = orjson.dumps(msg)
        self.seen[key] = t
        self.latest[key] = raw
        return raw

    @staticmethod
    def payload(inst: InstanceState, what: str, how: str) -> Message:
        """The field's current value on `inst`, times as wall-clock."""
        if what == CIRCUIT:
            circuit = inst.circuit
            if circuit.state == CLOSED:
                return {"open": False, "how": how}
            return {"open": True, "until": to_wall(circuit.open_until),
                    "by": circuit.opened_by, "cool": circuit.cooldown_s}
        if what == COOLDOWN:
            until = inst.rate_limited_until
            return {"until": to_wall(until) if until > time.monotonic() else None}
        if what == STATE:
            return {"state": inst.state, "reason": inst.state_reason}
        if what == PIN:
            return {"pin": None if inst.pin is None else asdict(inst.pin)}
        raise ValueError(f"unknown field {what!r}")

    def latency(self, inst: InstanceState) -> bytes:
        """This replica's latency figure of `inst` (rule 7)."""
        return orjson.dumps({"r": self.replica, "t": time.time(), "i": inst.id,
                             "f": LATENCY + self.replica, "ms": inst.ttfb_ewma_ms})

    def _reapply(self, inst: InstanceState, key: tuple[str, str]) -> None:
        raw = self.latest.get(key)
        if raw is not None:
            self._apply(inst, orjson.loads(raw))

    # ------------------------------------------------------------------ remote changes

    def remote(self, msg: Message, raw: bytes) -> bool:
        """Take in another replica's message by the rules above; True when applied.
        Raises KeyError, TypeError or ValueError for a malformed one."""
        if msg["r"] == self.replica:
            return False
        inst = self.registry.by_id.get(_text(msg["i"], "i"))
        if inst is None or inst.retired:
            return False  # an instance this replica's config does not have
        field, t = _text(msg["f"], "f"), evidence_time(msg["t"])
        if field == FAILURE:
            self._with_registry(self.registry.adopt_failure, inst,
                                min(to_mono(t), time.monotonic()))
            return True
        key = (inst.id, field)
        if t <= self.seen.get(key, float("-inf")):
            return False
        self.seen[key] = t
        if field.startswith(LATENCY):
            if msg["ms"] is None or time.time() - t > STALE_FIGURES_S:
                return False
            ms = number(msg["ms"], "ms")
            if not 0 <= ms <= MAX_LATENCY_MS:
                raise ValueError(f"'ms' is out of range: {ms}")
            self._with_registry(self.registry.adopt_latency, inst, ms)
            return True
        self.latest[key] = raw
        return self._apply(inst, msg)

    def _apply(self, inst: InstanceState, msg: Message) -> bool:
        registry, field = self.registry, msg["f"]
        self.applying = True
        try:
            if field == CIRCUIT:
                longest = inst.circuit.max_cooldown_s
                if not msg["open"]:
                    registry.adopt_closed_circuit(inst, str(msg["how"]))
                elif (until := to_mono(number(msg["until"], "until"))) > time.monotonic():
                    by = msg["by"]
                    registry.adopt_open_circuit(
                        inst, min(until, time.monotonic() + longest),
                        by if isinstance(by, str) else None,
                        min(max(number(msg["cool"], "cool"), 0.0), longest))
            elif field == COOLDOWN:
                end = msg["until"]
                if end is None:
                    registry.adopt_cooldown(inst, None)
                elif (until := to_mono(number(end, "until"))) > time.monotonic():
                    registry.adopt_cooldown(
                        inst, min(until, time.monotonic() + MAX_RATE_LIMIT_COOLDOWN_S))
            elif field == STATE:
                was = inst.state
                registry.adopt_state(inst, str(msg["state"]), str(msg["reason"]))
                if was in SHARED_STATES and inst.state not in SHARED_STATES and self.on_back:
                    self.on_back(inst)
            elif field == PIN:
                registry.adopt_pin(inst, _pin_of(msg["pin"]))
            else:
                return False
        finally:
            self.applying = False
        return True

    def _with_registry(self, write: Any, *args: Any) -> None:
        self.applying = True
        try:
            write(*args)
        finally:
            self.applying = False
