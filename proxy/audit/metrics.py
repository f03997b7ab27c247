"""Prometheus metrics of one proxy, in their own registry (so several apps can share a process).

The metrics every request touches (requests, duration, overhead, time to first byte) are
plain numbers updated from the event loop's thread without locks, and turned into
Prometheus families only when /metrics is scraped (`_LoopCollector`); the rare ones use
prometheus-client's own classes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0)
_OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# prometheus-client adds a `*_created` series (the creation time) to every counter and
# histogram of its own classes; Prometheus has no use for it in the text format and it
# doubles the series. (A process-wide setting of the library.)
disable_created_metrics()  # type: ignore[no-untyped-call]


class _CounterCell:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HistogramCell:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class LoopCounter:
    """A labelled counter for the event loop's thread: `labels(...).inc()` takes no lock."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self.cells: dict[tuple[str, ...], _CounterCell] = {}

    def labels(self, *values: str) -> _CounterCell:
        cell = self.cells.get(values)
        if cell is None:
            cell = self.cells[values] = _CounterCell()
        return cell

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, cell in self.cells.items():
            family.add_metric(list(values), cell.value)
        return family


class LoopHistogram:
    """A labelled histogram for the event loop's thread: `observe` takes no lock."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = (),
                 buckets: tuple[float, ...] = ()) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(sorted(buckets))
        self.cells: dict[tuple[str, ...], _HistogramCell] = {}
        self._plain = None if self.labelnames else self.labels()

    def labels(self, *values: str) -> _HistogramCell:
        cell = self.cells.get(values)
        if cell is None:
            cell = self.cells[values] = _HistogramCell(self.bounds)
        return cell

    def observe(self, value: float) -> None:
        """For a histogram without labels."""
        assert self._plain is not None
        self._plain.observe(value)

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        names = [repr(b) for b in self.bounds] + ["+Inf"]  # as prometheus-client writes them
        for values, cell in self.cells.items():
            total = 0
            buckets = []
            for name, count in zip(names, cell.counts, strict=True):
                total += count
                buckets.append((name, float(total)))
            family.add_metric(list(values), buckets, cell.sum)
        return family


class _Tokens:
    """The token and cost cells of one (model label, instance), stated or estimated. The
    cached-token and cost series appear at their first non-zero figure, as with
    `labels(...).inc()` called only then."""

    __slots__ = ("tokens", "costs", "where", "prompt", "completion", "cached", "cost")

    def __init__(self, tokens: LoopCounter, costs: LoopCounter, where: tuple[str, str]) -> None:
        self.tokens, self.costs, self.where = tokens, costs, where
        self.prompt = tokens.labels(*where, "prompt")
        self.completion = tokens.labels(*where, "completion")
        self.cached: _CounterCell | None = None
        self.cost: _CounterCell | None = None

    def add(self, prompt: int, completion: int, cached: int, cost: float) -> None:
        self.prompt.inc(prompt)
        self.completion.inc(completion)
        if cached:
            if self.cached is None:
                self.cached = self.tokens.labels(*self.where, "cached")
            self.cached.inc(cached)
        if cost:
            if self.cost is None:
                self.cost = self.costs.labels(*self.where)
            self.cost.inc(cost)


class RequestSeries:
    """The cells a request of one kind updates: by the model label, the instance that
    answered (None: none did), the outcome and whether it streamed. Made once per kind
    (`Metrics.request_series`), so that a request finds its cells with one look-up instead
    of one `labels()` per metric; each series still appears when it is first updated."""

    __slots__ = ("metrics", "where", "instance", "requests", "duration", "_ttfb", "_tokens")

    def __init__(self, metrics: Metrics, model: str, instance: str | None, outcome: str,
                 stream: bool) -> None:
        self.metrics = metrics
        self.where = (model, instance or "")
        self.instance = instance
        self.requests = metrics.requests.labels(model, instance or "", outcome)
        self.duration = metrics.duration.labels("true" if stream else "false")
        self._ttfb: _HistogramCell | None = None
        self._tokens: dict[bool, _Tokens] = {}

    def ttfb(self, instance: str) -> _HistogramCell:
        """The time-to-first-byte cell of `instance` (this kind's)."""
        if self._ttfb is None:
            self._ttfb = self.metrics.ttfb.labels(instance)
        return self._ttfb

    def tokens(self, estimated: bool) -> _Tokens:
        """The token and cost cells, of the stated figures or of the estimated ones."""
        cells = self._tokens.get(estimated)
        if cells is None:
            m = self.metrics
            cells = self._tokens[estimated] = (
                _Tokens(m.tokens_estimated, m.cost_estimated, self.where) if estimated
                else _Tokens(m.tokens, m.cost, self.where))
        return cells


class _LoopCollector:
    def __init__(self, metrics: list[LoopCounter | LoopHistogram]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            yield metric.family()


class Metrics:
    """Every metric the proxy exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = LoopCounter(
            "failover_proxy_requests", "Requests by model asked for, instance that answered, "
            "and outcome", ["model", "instance", "outcome"])
        self.reroutes = Counter(
            "failover_proxy_reroutes", "Moves from one instance to another, by reason",
            ["reason", "from_instance", "to_instance"], registry=r)
        self.blocked = Counter(
            "failover_proxy_routes_blocked", "Requests no instance could be routed to",
            registry=r)
        self.instance_state = Gauge(
            "failover_proxy_instance_state", "1 for the state each instance is in",
            ["instance", "state"], registry=r)
        self.ttfb = LoopHistogram(
            "failover_proxy_ttfb_seconds", "Upstream time to first byte (first content chunk "
            "for streams)", ["instance"], buckets=_LATENCY_BUCKETS)
        self.duration = LoopHistogram(
            "failover_proxy_request_duration_seconds", "Whole request duration in the proxy",
            ["stream"], buckets=_LATENCY_BUCKETS)
        self.overhead = LoopHistogram(
            "failover_proxy_overhead_seconds", "Time spent in the proxy itself, excluding "
            "waiting on upstreams", buckets=_OVERHEAD_BUCKETS)
        self.tokens = LoopCounter(
            "failover_proxy_tokens", "Tokens of answers as their upstream reported them "
            "(usage), by model asked for, instance, and kind: prompt, completion, cached (the "
            "part of the prompt the server had cached)", ["model", "instance", "kind"])
        self.cost = LoopCounter(
            "failover_proxy_cost", "Cost of answers from their tokens and the instance's "
            "metadata.cost (in its currency), by model asked for and instance",
            ["model", "instance"])
        self.tokens_estimated = LoopCounter(
            "failover_proxy_tokens_estimated", "Tokens of answers that came without usage, "
            "estimated (prompt: the planner's estimate; completion: characters of the answer "
            "/ 4), by model asked for, instance, and kind: prompt, completion",
            ["model", "instance", "kind"])
        self.cost_estimated = LoopCounter(
            "failover_proxy_cost_estimated", "Cost of the estimated tokens (metadata.cost), "
            "by model asked for and instance", ["model", "instance"])
        r.register(_LoopCollector([self.requests, self.ttfb, self.duration, self.overhead,
                                   self.tokens, self.cost, self.tokens_estimated,
                                   self.cost_estimated]))
        #: Requests being served now: a plain counter on the hot path, read at scrape time.
        self.inflight = 0
        Gauge("failover_proxy_inflight_requests", "Requests being served now",
              registry=r).set_function(lambda: self.inflight)
        self.events_dropped = Counter(
            "failover_proxy_events_dropped", "Audit rows dropped because the writer fell behind or "
            "its database was away past store.queue_size rows",
            registry=r)
        self.audit_up = Gauge(
            "failover_proxy_audit_store_up", "1 while the audit writer can reach its database "
            "(0 while PostgreSQL is away: rows wait, up to store.queue_size)", registry=r)
        self.stream_resumed = Counter(
            "failover_proxy_streams_resumed", "Streams continued on another instance after a "
            "mid-stream failure", ["from_instance", "to_instance"], registry=r)
        #: By (model label, instance, outcome, stream): bounded as the labels are (the
        #: configured models and instances, the outcomes, two stream values).
        self._series: dict[tuple[str, str | None, str, bool], RequestSeries] = {}

    def request_series(self, model: str, instance: str | None, outcome: str,
                       stream: bool) -> RequestSeries:
        """The cells of a request of this kind (RequestSeries)."""
        key = (model, instance, outcome, stream)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = RequestSeries(self, model, instance, outcome, stream)
        return series

    def set_state(self, instance: str, state: str, states: tuple[str, ...]) -> None:
        for s in states:
            self.instance_state.labels(instance, s).set(1.0 if s == state else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
