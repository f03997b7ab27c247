"""The last hour's figures for the status view (`GET /admin/status`, `failover-proxy
status`): requests by outcome, reroutes by reason, blocked routes, resumed streams, tokens
and cost.

They cost the request path nothing: the counters the metrics (proxy.audit.metrics) and the
live feed (proxy.audit.eventstream) already keep are read once a minute, and "the last
hour" is today's figures less those of the oldest reading within the hour (since start
when the proxy is younger). Per process, like /metrics.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from proxy.audit.eventstream import EventHub
from proxy.audit.metrics import Metrics

WINDOW_S = 3600.0
SAMPLE_EVERY_S = 60.0


class Tally:
    """Figures over the last hour from cumulative counters read every SAMPLE_EVERY_S."""

    def __init__(self, metrics: Metrics, hub: EventHub, now: float | None = None) -> None:
        self.metrics = metrics
        self.hub = hub
        self.started = time.monotonic() if now is None else now
        #: (monotonic time, cumulative figures), oldest first; one more than fits the window.
        self.samples: deque[tuple[float, dict[str, float]]] = deque(
            maxlen=int(WINDOW_S // SAMPLE_EVERY_S) + 2)
        self.samples.append((self.started, {}))

    def figures(self) -> dict[str, float]:
        """Cumulative figures now: `requests`, `outcome:X`, `reroute:REASON`, `blocked`,
        `resumed`."""
        out: dict[str, float] = {}
        total = 0.0
        for (_model, _instance, outcome), cell in self.metrics.requests.cells.items():
            total += cell.value
            key = f"outcome:{outcome}"
            out[key] = out.get(key, 0.0) + cell.value
        out["requests"] = total
        for (_model, _instance, kind), cell in self.metrics.tokens.cells.items():
            key = f"tokens:{kind}"
            out[key] = out.get(key, 0.0) + cell.value
        out["cost"] = sum(cell.value for cell in self.metrics.cost.cells.values())
        for (_model, _instance, kind), cell in self.metrics.tokens_estimated.cells.items():
            key = f"estimated:{kind}"
            out[key] = out.get(key, 0.0) + cell.value
        out["cost_estimated"] = sum(c.value for c in self.metrics.cost_estimated.cells.values())
        for (type_, reason), n in self.hub.counts.items():
            if type_ == "REROUTED":
                out[f"reroute:{reason}"] = float(n)
            elif type_ == "ROUTE_BLOCKED":
                out["blocked"] = out.get("blocked", 0.0) + n
            elif type_ == "STREAM_RESUMED":
                out["resumed"] = out.get("resumed", 0.0) + n
        return out

    def sample(self, now: float | None = None) -> None:
        self.samples.append((time.monotonic() if now is None else now, self.figures()))

    def last_hour(self, now: float | None = None) -> dict[str, Any]:
        """`{window_s, requests, outcomes{}, reroutes{}, blocked, resumed, tokens{prompt,
        completion, cached}, cost, tokens_estimated{prompt, completion}, cost_estimated}`
        over the last hour, or since start when that is shorter (`window_s` says which).
        `tokens` and `cost` count answers whose upstream reported usage, the `_estimated`
        ones the answers that came without it (proxy.audit.usage)."""
        now = time.monotonic() if now is None else now
        since, base = self.samples[0]
        for at, figures in self.samples:
            if at >= now - WINDOW_S:
                since, base = at, figures
                break
        current = self.figures()
        delta = {k: v - base.get(k, 0.0) for k, v in current.items()}
        return {
            "window_s": round(now - since, 1),
            "requests": int(delta.get("requests", 0)),
            "outcomes": {k[8:]: int(v) for k, v in delta.items()
                         if k.startswith("outcome:") and v},
            "reroutes": {k[8:]: int(v) for k, v in delta.items()
                         if k.startswith("reroute:") and v},
            "blocked": int(delta.get("blocked", 0)),
            "resumed": int(delta.get("resumed", 0)),
            "tokens": {kind: int(delta.get(f"tokens:{kind}", 0))
                       for kind in ("prompt", "completion", "cached")},
            "cost": round(delta.get("cost", 0.0), 6),
            "tokens_estimated": {kind: int(delta.get(f"estimated:{kind}", 0))
                                 for kind in ("prompt", "completion")},
            "cost_estimated": round(delta.get("cost_estimated", 0.0), 6),
        }
