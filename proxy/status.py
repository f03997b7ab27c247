"""What an operator sees: the running proxy's status, one request's story, and the
`failover-proxy status` table.

Server side (admin key required, like every /admin path):
- `GET /admin/status`: every instance (state and why, circuit, load, latency,
  fingerprint), tallies over the last hour (requests by outcome, reroutes by reason,
  blocked routes, resumed streams) and the latest reroutes from the live feed.
- `GET /admin/requests/{request_id}`: the request view from the audit trail: the plan
  (candidates, rejected and why, scores and reasons), every attempt with its reason code
  and time, who answered, and the request's events.

The tallies cost the request path nothing: the counters the metrics and the live feed
already keep are read once a minute, and "the last hour" is today's figures less those of
the oldest reading within the hour (since start when the proxy is younger). Per process,
like /metrics.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from proxy import __version__
from proxy.auth import check_admin
from proxy.errors import BadRequest, NotFound
from proxy.eventstream import EventHub
from proxy.metrics import Metrics
from proxy.state import STATE
from proxy.store import EventQuery, query_events, query_plans

#: Event types shown as "recent reroutes".
REROUTE_TYPES = ("REROUTED", "ROUTE_BLOCKED", "STREAM_RESUMED")
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
        completion, cached}, cost}` over the last hour, or since start when that is shorter
        (`window_s` says which). Tokens count answers whose upstream reported usage."""
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
        }


TALLY = web.AppKey("tally", Tally)


async def tally_context(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: read the counters every minute for the app's life (after the
    recorder exists: register it after the app's own lifecycle)."""
    recorder = app[STATE].recorder
    assert recorder.hub is not None
    tally = app[TALLY] = Tally(recorder.metrics, recorder.hub)

    async def sampling() -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY_S)
            tally.sample()

    task = asyncio.get_running_loop().create_task(sampling())
    yield
    task.cancel()


def instance_reason(row: dict[str, Any]) -> str:
    """Why an instance (a `snapshot()` row) is in the state it is, for people: what took
    it out (drain, config, probe, mismatch), an open circuit, a rate-limit cooldown."""
    state = row["state"]
    why = str(row.get("state_reason") or "")
    if state == "DRAINED":
        return why or ("disabled in the config" if not row.get("enabled") else "drained")
    if state in ("DOWN", "LOADING", "MISMATCH"):
        return str(row.get("last_probe_error") or why or state.lower())
    circuit = row.get("circuit")
    if circuit == "open":
        return (f"circuit open for {row.get('circuit_retry_in_s', 0):g}s more after "
                f"{row.get('last_error')}")
    if circuit == "half_open":
        return f"circuit half-open (the next request is a trial) after {row.get('last_error')}"
    cooling = row.get("rate_limited_retry_in_s") or 0
    if cooling:
        return f"rate limited (retry in {cooling:g}s)"
    return why or "not probed yet"


def status_document(app: web.Application) -> dict[str, Any]:
    """The body of GET /admin/status."""
    state = app[STATE]
    tally = app[TALLY]
    recorder = state.recorder
    now = time.monotonic()
    rows = [inst.snapshot(now) for inst in state.registry.states]
    for row in rows:
        row["reason"] = instance_reason(row)
    hub = recorder.hub
    return {
        "version": __version__,
        "uptime_s": round(now - tally.started, 1),
        "audit": recorder.store is not None,
        "inflight": recorder.metrics.inflight,
        "instances": rows,
        "last_hour": tally.last_hour(now),
        "recent": [] if hub is None else hub.latest(20, REROUTE_TYPES),
    }


def _json(data: object) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


async def get_status(request: web.Request) -> web.Response:
    """GET /admin/status (see the module docstring)."""
    check_admin(request.app[STATE].config.server, request.headers)
    return _json(status_document(request.app))


async def get_request(request: web.Request) -> web.Response:
    """GET /admin/requests/{request_id}: `{request_id, requests: [...]}`, one entry per
    plan made under that id (a client may reuse an x-request-id), newest first, each with
    `plan`, `tried` (every attempt: instance, code (null for the one that answered),
    detail, elapsed_ms), the outcome and `events` (oldest first). 404 when the audit trail
    has nothing under that id, or the audit store is off."""
    state = request.app[STATE]
    check_admin(state.config.server, request.headers)
    request_id = request.match_info["request_id"]
    if len(request_id) > 128:
        raise BadRequest("A request id is at most 128 characters.", param="request_id")
    store = state.recorder.store
    if store is None:
        raise NotFound("The audit store is off (store.enabled: false).", code="audit_off")
    plans, events = await store.read(lambda conn: (
        query_plans(conn, request_id),
        query_events(conn, EventQuery(request_id=request_id, limit=1000))))
    if not plans and not events:
        raise NotFound(f"Nothing in the audit trail for request id '{request_id}' (not seen, "
                       "still running, or past the retention).", code="request_not_found")
    return _json({"request_id": request_id, "requests": request_story(plans, events)})


def request_story(plans: list[dict[str, Any]],
                  events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join route_plans rows and events (newest first, as the queries return them) into one
    entry per plan id."""
    by_plan: dict[str | None, list[dict[str, Any]]] = {}
    for event in reversed(events):
        by_plan.setdefault(event["plan_id"], []).append(event)
    stories = []
    for row in plans:
        own = by_plan.pop(row["plan_id"], [])
        completed = next((e for e in own if e["type"] == "REQUEST_COMPLETED"), None)
        detail = (completed or {}).get("detail") or {}
        stories.append({**row, "tried": detail.get("tried") or [], "usage": detail.get("usage"),
                        "events": own})
    for plan_id, own in by_plan.items():  # events of a plan whose row is not written yet
        stories.append({"plan_id": plan_id, "request_id": own[0]["request_id"], "plan": None,
                        "ts": own[0]["ts"], "tried": [], "usage": None, "events": own})
    return stories


def add_status_routes(app: web.Application) -> None:
    """Register /admin/status and /admin/requests/{id}, and the tallies' sampler (call
    after the app's lifecycle context is registered)."""
    app.cleanup_ctx.append(tally_context)
    app.router.add_get("/admin/status", get_status)
    app.router.add_get("/admin/requests/{request_id}", get_request)


# ---------------------------------------------------------------------- the CLI view

class StatusError(Exception):
    """The proxy could not be asked (not running, refused the key, not a proxy)."""


async def fetch_status(url: str, admin_key: str | None, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET {url}/admin/status. Raises StatusError with a one-line explanation."""
    import aiohttp

    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    target = url.rstrip("/") + "/admin/status"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s, \
                s.get(target, headers=headers) as resp:
            if resp.status in (401, 403):
                raise StatusError(f"{url} refused the admin key (HTTP {resp.status}): give "
                                  "--admin-key or set PROXY_ADMIN_KEY")
            if resp.status != 200:
                raise StatusError(f"{target} answered HTTP {resp.status}: is this a "
                                  "failover-proxy?")
            doc = await resp.json(content_type=None)
    except aiohttp.InvalidURL:
        raise StatusError(f"not a URL: {url}") from None
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise StatusError(f"no proxy answers at {url} ({type(exc).__name__})") from None
    except ValueError:
        raise StatusError(f"{target} did not answer JSON: is this a failover-proxy?") from None
    if not isinstance(doc, dict) or "instances" not in doc:
        raise StatusError(f"{target} did not answer a status: is this a failover-proxy?")
    return doc


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def format_status(doc: dict[str, Any], url: str) -> str:
    """The status document as a terminal page: a header, the instance table, the last
    hour's tallies and the latest reroutes."""
    from proxy.cli import text_table

    lines = [f"failover-proxy {doc.get('version')} at {url}   up {_age(doc['uptime_s'])}   "
             f"in flight {doc.get('inflight', 0)}   audit {'on' if doc.get('audit') else 'off'}",
             ""]
    table: list[tuple[str, ...]] = [("INSTANCE", "STATE", "CIRCUIT", "LOAD", "LATENCY",
                                     "FINGERPRINT", "REASON")]
    for row in doc["instances"]:
        ewma, probe = row.get("latency_ewma_ms"), row.get("last_probe_ms")
        latency = (f"{ewma:.0f} ms" if isinstance(ewma, (int, float))
                   else f"{probe:.0f} ms probe" if isinstance(probe, (int, float)) else "-")
        table.append((str(row["id"]), str(row["state"]), str(row["circuit"]),
                      str(row.get("inflight", 0)), latency, str(row.get("fingerprint") or "-"),
                      str(row.get("reason") or "")))
    lines.append(text_table(table))
    hour = doc["last_hour"]
    span = "last hour" if hour["window_s"] >= WINDOW_S - SAMPLE_EVERY_S \
        else f"since start ({_age(hour['window_s'])})"
    reroutes = sum(hour["reroutes"].values())
    tokens = hour.get("tokens")
    lines += ["", f"{span}: {_n(hour['requests'], 'request')}"
              + (f" ({_counts(hour['outcomes'])})" if hour["outcomes"] else "")
              + f"; {_n(reroutes, 'reroute')}"
              + (f" ({_counts(hour['reroutes'])})" if reroutes else "")
              + f"; {hour['blocked']} blocked; {_n(hour['resumed'], 'stream')} resumed"]
    if tokens is not None:  # (a proxy older than this command has no token figures)
        lines.append(f"tokens: {tokens['prompt']} prompt ({tokens['cached']} cached), "
                     f"{tokens['completion']} completion; cost {hour.get('cost', 0):g}")
    recent = doc.get("recent") or []
    lines += ["", "recent reroutes:" if recent else "recent reroutes: none"]
    if recent:
        events: list[tuple[str, ...]] = [("TIME", "TYPE", "REASON", "FROM -> TO", "REQUEST",
                                          "DETAIL")]
        for e in recent[-10:]:
            detail = e.get("detail") or {}
            text = detail.get("detail") or detail.get("message") or detail.get("mode") or ""
            events.append((time.strftime("%H:%M:%S", time.localtime(e["ts"])), e["type"],
                           str(e.get("reason_code") or "-"),
                           f"{e.get('from_instance') or '-'} -> {e.get('to_instance') or '-'}",
                           str(e.get("request_id") or "-"), str(text)[:80]))
        lines.append(text_table(events))
    return "\n".join(lines)


def run(url: str, admin_key: str | None, watch: bool, interval_s: float = 2.0) -> int:
    """`failover-proxy status`: print the table once (exit 1 when the proxy cannot be
    asked), or with `watch` redraw it every `interval_s` until Ctrl-C (errors are shown
    and retried: the proxy may be restarting)."""
    if not watch:
        try:
            doc = asyncio.run(fetch_status(url, admin_key))
        except StatusError as exc:
            print(f"status: {exc}", file=sys.stderr)
            return 1
        print(format_status(doc, url))
        return 0
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            try:
                page = format_status(asyncio.run(fetch_status(url, admin_key)), url)
            except StatusError as exc:
                page = f"status: {exc} (retrying every {interval_s:g}s)"
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"{clear}{page}\n\n{stamp}, every {interval_s:g}s; Ctrl-C stops\n")
            sys.stdout.flush()
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return 0
