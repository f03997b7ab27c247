"""The merge rules of shared state (proxy/state/merge.py), between two real registries.

Each replica's registry tells its Ledger of every change (the `Wire` below is the sink
that keeps the messages instead of queueing them for Redis); a message is delivered to
the other replica by hand, in whatever order the scenario needs (late, twice, stale).
"""

from __future__ import annotations

import time

import orjson

from proxy.config import parse_config
from proxy.failures import ConnRefused, FingerprintMismatch, RateLimited, Upstream5xx
from proxy.health.changes import CIRCUIT
from proxy.health.circuit import BY_HTTP, CLOSED, OPEN
from proxy.health.fingerprints import Pin
from proxy.health.instance import InstanceState
from proxy.health.registry import Registry
from proxy.health.states import DRAINED, MISMATCH, READY, UNKNOWN
from proxy.routing.sessions import SessionTable
from proxy.state.merge import Ledger


class Wire:
    """A replica's ChangeSink that keeps its messages for the test to deliver."""

    def __init__(self, name: str, cooldown_s: float = 30.0) -> None:
        config = parse_config({"health": {"cooldown_s": cooldown_s, "max_cooldown_s": 60,
                                          "failure_threshold": 2},
                               "providers": [{"provider_id": "p", "instances": [
                                   {"id": "a", "base_url": "http://127.0.0.1:9"},
                                   {"id": "c", "base_url": "http://127.0.0.1:10",
                                    "fingerprint": {"model": "fixed"}}]}]}, "<test>")
        self.registry = Registry(config.instances, config.health)
        self.registry.changes = self
        self.ledger = Ledger(name, self.registry)
        self.sent: list[bytes] = []

    def changed(self, inst: InstanceState, what: str, how: str = "",
                at: float | None = None) -> None:
        raw = self.ledger.local(inst, what, how, at)
        if raw is not None:
            self.sent.append(raw)

    @property
    def a(self) -> InstanceState:
        return self.registry.states[0]

    def take(self) -> list[bytes]:
        out, self.sent = self.sent, []
        return out

    def receive(self, messages: list[bytes]) -> list[bool]:
        return [self.ledger.remote(orjson.loads(raw), raw) for raw in messages]


def test_a_circuit_opened_on_one_replica_opens_on_the_other_with_the_same_end() -> None:
    a, b = Wire("A"), Wire("B")
    a.registry.record_failure(a.a, ConnRefused("refused"))
    assert a.a.circuit.state == OPEN
    sent = a.take()
    assert b.receive(sent) == [True, True]  # the failure (error rate) and the circuit
    assert b.a.circuit.state == OPEN and not b.a.routable()
    # The same wall-clock end, each on its own monotonic clock (within a few ms).
    assert abs(b.a.circuit.open_until - a.a.circuit.open_until) < 0.05
    assert b.a.error_rate() == 1.0
    assert b.take() == []  # what was applied is not sent back
    assert b.receive(sent) == [True, False]  # a circuit message seen before changes nothing


def test_a_replica_ignores_its_own_messages() -> None:
    a = Wire("A")
    a.registry.record_failure(a.a, ConnRefused("refused"))
    a.registry.enable(a.a)
    assert a.receive(a.take()[:2]) == [False, False]
    assert a.a.circuit.state == CLOSED


def test_a_probe_started_before_another_replicas_open_closes_it_neither_there_nor_here() -> None:
    a, b = Wire("A"), Wire("B")
    probe_started = time.time()
    time.sleep(0.01)
    a.registry.record_failure(a.a, ConnRefused("refused"))
    b.receive(a.take())
    assert b.a.circuit.state == OPEN
    # B's probe, in flight while A met the refusal, comes back good 20 ms later.
    latency_ms = (time.time() - probe_started) * 1000.0
    b.registry.probed(b.a, READY, "healthy", latency_ms)
    assert b.a.circuit.state == OPEN  # undone: older evidence than the open
    assert b.take() == []  # and not sent


def test_a_probe_started_after_the_open_closes_a_connection_circuit_everywhere() -> None:
    a, b = Wire("A"), Wire("B")
    a.registry.record_failure(a.a, ConnRefused("refused"))
    b.receive(a.take())
    time.sleep(0.01)
    b.registry.probed(b.a, READY, "healthy", 1.0)
    assert b.a.circuit.state == CLOSED
    assert a.receive(b.take()) == [True]
    assert a.a.circuit.state == CLOSED


def test_a_probe_success_elsewhere_does_not_close_a_circuit_http_errors_opened() -> None:
    a, b = Wire("A"), Wire("B")
    for _ in range(2):  # failure_threshold 2
        a.registry.record_failure(a.a, Upstream5xx(500))
    assert a.a.circuit.state == OPEN and a.a.circuit.opened_by == BY_HTTP
    b.receive(a.take())
    assert b.a.circuit.opened_by == BY_HTTP
    time.sleep(0.01)
    # B's probe of /v1/models proves nothing about completions: nothing closes, nothing sent.
    b.registry.probed(b.a, READY, "healthy", 1.0)
    assert b.a.circuit.state == OPEN and b.take() == []
    # A successful request on B closes it, and A with it.
    b.registry.record_success(b.a, 0.05)
    a.receive(b.take())
    assert a.a.circuit.state == CLOSED


def test_strikes_short_of_the_threshold_are_each_replicas_own() -> None:
    a, b = Wire("A"), Wire("B")
    a.registry.record_failure(a.a, Upstream5xx(500))
    b.receive(a.take())
    b.registry.record_failure(b.a, Upstream5xx(500))
    assert a.a.circuit.state == CLOSED and b.a.circuit.state == CLOSED


def test_a_429_cooldown_only_grows_and_an_admin_enable_ends_it_everywhere() -> None:
    a, b, c = Wire("A"), Wire("B"), Wire("C")
    b.registry.record_failure(b.a, RateLimited(30.0))
    long_one = b.take()
    time.sleep(0.01)
    c.registry.record_failure(c.a, RateLimited(5.0))
    short_one = c.take()
    a.receive(long_one)
    a.receive(short_one)  # newer, but shorter: the longer end stays
    assert 29.0 < a.a.rate_limited_until - time.monotonic() <= 30.0
    assert a.a.circuit.state == CLOSED  # a 429 is no circuit matter, here as there
    time.sleep(0.01)
    c.registry.enable(c.a)
    a.receive(c.take())
    assert a.a.rate_limited_until == 0.0 and a.a.routable()


def test_drain_and_enable_the_latest_word_wins_whatever_the_arrival_order() -> None:
    a, b, c = Wire("A"), Wire("B"), Wire("C")
    a.registry.drain(a.a)
    drain = a.take()
    time.sleep(0.01)
    b.receive(drain)
    b.registry.enable(b.a)
    enable = b.take()
    c.receive(enable)  # C hears of the enable first, then of the older drain
    c.receive(drain)
    assert c.a.state == UNKNOWN
    a.receive(enable)
    assert a.a.state == UNKNOWN
    assert b.a.state == UNKNOWN


def test_a_mismatch_found_by_one_replica_takes_the_instance_out_on_all() -> None:
    a, b = Wire("A"), Wire("B")
    a.registry.record_failure(a.a, FingerprintMismatch("served other-model"))
    assert a.a.state == MISMATCH
    b.receive(a.take())
    assert b.a.state == MISMATCH and not b.a.routable()


def test_a_drained_instance_stays_drained_whatever_another_replicas_probe_says() -> None:
    a, b = Wire("A"), Wire("B")
    a.registry.drain(a.a)
    b.receive(a.take())
    b.registry.probed(b.a, READY, "healthy", 1.0)
    assert b.a.state == DRAINED
    assert b.take() == []


def test_a_learned_fingerprint_is_shared_and_a_configured_one_is_kept() -> None:
    a, b = Wire("A"), Wire("B")
    learned = Pin("learned", ("m1", "m2"), "m1", ("m1",), None, None)
    a.registry.learn_fingerprint(a.a, learned)
    c_inst = a.registry.states[1]
    a.registry.learn_fingerprint(c_inst, learned)
    b.receive(a.take())
    assert b.a.pin == learned
    assert b.registry.states[1].pin is not None
    assert b.registry.states[1].pin.name == "fixed"  # configured: the config's word
    time.sleep(0.01)
    a.registry.reset_fingerprint(a.a)
    b.receive(a.take())
    assert b.a.pin is None


def test_another_replicas_latency_counts_as_one_more_observation() -> None:
    a, b = Wire("A"), Wire("B")
    a.registry.record_success(a.a, 0.100)
    b.registry.record_success(b.a, 0.200)
    raw = a.ledger.latency(a.a)
    assert b.receive([raw]) == [True]
    assert b.a.ttfb_ewma_ms is not None
    assert abs(b.a.ttfb_ewma_ms - (200 + 0.2 * (100 - 200))) < 1e-6
    assert b.receive([raw]) == [False]  # the same figure once only


def test_an_open_circuit_whose_end_has_passed_is_not_taken_in() -> None:
    a, b = Wire("A", cooldown_s=0.01), Wire("B")
    a.registry.record_failure(a.a, ConnRefused("refused"))
    time.sleep(0.03)
    b.receive(a.take())
    assert b.a.circuit.state == CLOSED
    assert (a.a.id, CIRCUIT) in b.ledger.seen


def test_a_session_is_told_to_the_other_replicas_when_new_changed_or_half_expired() -> None:
    told: list[tuple[str, str, float]] = []
    table = SessionTable(ttl_s=100.0)
    table.on_remember = lambda key, inst, ttl: told.append((key, inst, ttl))
    table.remember("s1", "p:a", now=0.0)
    table.remember("s1", "p:a", now=10.0)  # the same, fresh: nothing to tell
    table.remember("s1", "p:b", now=20.0)  # moved: told
    table.remember("s1", "p:b", now=75.0)  # past half its TTL: refreshed everywhere
    assert told == [("s1", "p:a", 100.0), ("s1", "p:b", 100.0), ("s1", "p:b", 100.0)]
    other = SessionTable(ttl_s=100.0)
    other.adopt("s1", "p:b", expires=50.0)
    assert other.get("s1", now=49.0) == "p:b" and other.get("s1", now=50.0) is None
