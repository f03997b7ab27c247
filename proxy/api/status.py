"""What an operator sees of the running proxy over HTTP (admin key required, like every
/admin path):

- `GET /admin/status`: every instance (state and why, circuit, load, latency,
  fingerprint), the last hour's tallies (proxy.audit.tally: requests by outcome, reroutes
  by reason, blocked routes, resumed streams, tokens and cost) and the latest reroutes
  from the live feed.
- `GET /admin/requests/{request_id}`: the request view from the audit trail: the plan
  (candidates, rejected and why, scores and reasons), every attempt with its reason code
  and time, who answered, and the request's events.
- `GET /admin/events/stream`: the live feed (proxy.audit.eventstream) as server-sent
  events.

The status page (proxy/ui) and `failover-proxy status` (proxy.cli_status) read these.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from proxy import __version__
from proxy.api.admin import audit_unavailable
from proxy.api.auth import check_admin
from proxy.api.endpoints import expect_continue
from proxy.api.errors import BadRequest, NotFound
from proxy.api.state import STATE
from proxy.audit.database import StoreUnavailable
from proxy.audit.eventstream import HEARTBEAT_S, RETRY_MS
from proxy.audit.schema import EventQuery, query_events, query_plans
from proxy.audit.tally import SAMPLE_EVERY_S, Tally

#: Event types shown as "recent reroutes".
REROUTE_TYPES = ("REROUTED", "ROUTE_BLOCKED", "STREAM_RESUMED")


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
        # (the store's URL without its password; whether its writer reaches it now)
        "audit_store": None if recorder.store is None else recorder.store.shown,
        "audit_available": recorder.store is not None and recorder.store.available,
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
    try:
        plans, events = await store.read(lambda db: (
            query_plans(db, request_id),
            query_events(db, EventQuery(request_id=request_id, limit=1000))))
    except StoreUnavailable as exc:
        raise audit_unavailable(exc) from None
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
    """Register /admin/status, /admin/requests/{id} and /admin/events/stream, the tallies'
    sampler (call after the app's lifecycle context is registered) and the end of the
    open event streams at shutdown (before the grace period, which they would hold)."""
    app.cleanup_ctx.append(tally_context)
    app.on_shutdown.append(close_feed)
    router = app.router
    router.add_get("/admin/status", get_status)
    router.add_get("/admin/requests/{request_id}", get_request)
    router.add_get("/admin/events/stream", stream_events, expect_handler=expect_continue)


def _last_event_id(request: web.Request) -> int | None:
    text = request.headers.get("Last-Event-ID") or request.query.get("after") or ""
    return int(text) if text.isdigit() and len(text) < 19 else None


async def stream_events(request: web.Request) -> web.StreamResponse:
    """GET /admin/events/stream: live events as server-sent events (admin key required).

    `Last-Event-ID` (sent by a reconnecting EventSource) or `?after=ID` resumes after that
    event, as far as the kept events reach. Ends with `event: shutdown` when the proxy
    stops.
    """
    state = request.app[STATE]
    check_admin(state.config.server, request.headers)
    hub = state.recorder.hub
    if hub is None:  # (an app always has one; a Recorder built elsewhere may not)
        raise NotFound("There is no live feed in this process.", code="feed_off")
    sub = hub.subscribe(_last_event_id(request))
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"})
    try:
        await response.prepare(request)
        await response.write(b"retry: %d\n\n" % RETRY_MS)
        while True:
            chunk = await sub.next_chunk(HEARTBEAT_S)
            if chunk is None:
                await response.write(b"event: shutdown\ndata: {}\n\n")
                await response.write_eof()
                break
            await response.write(chunk or b": ping\n\n")
    except (ConnectionError, RuntimeError):
        pass  # the client went away
    finally:
        hub.unsubscribe(sub)
    return response


async def close_feed(app: web.Application) -> None:
    """on_shutdown: end every open event stream (aiohttp runs it before it waits for
    running handlers, so a stream never holds the graceful shutdown)."""
    hub = app[STATE].recorder.hub
    if hub is not None:
        hub.close()
