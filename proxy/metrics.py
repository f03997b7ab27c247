"""Prometheus metrics of one proxy, in their own registry (so several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0)
_OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every metric the proxy exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "failover_proxy_requests", "Requests by model asked for, instance that answered, "
            "and outcome", ["model", "instance", "outcome"], registry=r)
        self.reroutes = Counter(
            "failover_proxy_reroutes", "Moves from one instance to another, by reason",
            ["reason", "from_instance", "to_instance"], registry=r)
        self.blocked = Counter(
            "failover_proxy_routes_blocked", "Requests no instance could be routed to",
            registry=r)
        self.instance_state = Gauge(
            "failover_proxy_instance_state", "1 for the state each instance is in",
            ["instance", "state"], registry=r)
        self.ttfb = Histogram(
            "failover_proxy_ttfb_seconds", "Upstream time to first byte (first content chunk "
            "for streams)", ["instance"], buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram(
            "failover_proxy_request_duration_seconds", "Whole request duration in the proxy",
            ["stream"], buckets=_LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram(
            "failover_proxy_overhead_seconds", "Time spent in the proxy itself, excluding "
            "waiting on upstreams", buckets=_OVERHEAD_BUCKETS, registry=r)
        #: Requests being served now: a plain counter on the hot path, read at scrape time.
        self.inflight = 0
        Gauge("failover_proxy_inflight_requests", "Requests being served now",
              registry=r).set_function(lambda: self.inflight)
        self.events_dropped = Counter(
            "failover_proxy_events_dropped", "Audit rows dropped because the writer fell behind",
            registry=r)
        self.stream_resumed = Counter(
            "failover_proxy_streams_resumed", "Streams continued on another instance after a "
            "mid-stream failure", ["from_instance", "to_instance"], registry=r)

    def set_state(self, instance: str, state: str, states: tuple[str, ...]) -> None:
        for s in states:
            self.instance_state.labels(instance, s).set(1.0 if s == state else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
