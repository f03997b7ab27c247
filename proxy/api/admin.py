"""Admin endpoints, behind `server.admin_key` when one is configured."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

import orjson
from aiohttp import web

from proxy.api.auth import check_admin
from proxy.api.endpoints import expect_continue, read_body
from proxy.api.errors import AuditUnavailable, BadRequest, NotFound
from proxy.api.inbound import CHAT, parse_request
from proxy.api.state import RELOAD, STATE
from proxy.audit.database import StoreUnavailable
from proxy.audit.recorder import EVENT_TYPES
from proxy.audit.schema import EventQuery
from proxy.health.instance import InstanceState
from proxy.routing.planner import new_id

Handler = Callable[[web.Request], Awaitable[web.Response]]


def admin(handler: Handler) -> Handler:
    """Wrap an admin handler with the admin key check (errors get their shape from the
    app's middleware)."""

    async def wrapped(request: web.Request) -> web.Response:
        check_admin(request.app[STATE].config.server, request.headers)
        return await handler(request)

    wrapped.__doc__ = handler.__doc__
    return wrapped


@admin
async def route_dry_run(request: web.Request) -> web.Response:
    """POST /admin/route: the plan the proxy would make for this body; nothing is sent."""
    state = request.app[STATE]
    server = state.config.server
    raw = await read_body(request, server.max_body_bytes, server.body_timeout_s)
    req = parse_request(CHAT, raw, new_id())
    plan = state.planner.plan(req, request.headers)
    return _json_response(plan.as_dict())


def _instance(request: web.Request) -> InstanceState:
    inst = request.app[STATE].registry.get(request.match_info["id"])
    if inst is None:
        raise NotFound(f"No instance '{request.match_info['id']}'.", code="instance_not_found")
    return inst


def _json_response(data: object) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


@admin
async def list_instances(request: web.Request) -> web.Response:
    """GET /admin/instances: state, circuit, fingerprint, latency, errors of each instance."""
    now = time.monotonic()
    return _json_response({"instances": [s.snapshot(now)
                                         for s in request.app[STATE].registry.states]})


@admin
async def drain_instance(request: web.Request) -> web.Response:
    """POST /admin/instances/{id}/drain: no new requests; in-flight ones finish."""
    inst = _instance(request)
    request.app[STATE].registry.drain(inst)
    return _json_response(inst.snapshot())


@admin
async def enable_instance(request: web.Request) -> web.Response:
    """POST /admin/instances/{id}/enable: back in rotation (circuit closed, rate-limit
    cooldown ended); probed again at once."""
    state = request.app[STATE]
    inst = _instance(request)
    state.registry.enable(inst)
    if state.config.health.enabled:
        state.prober.apply(inst, await state.prober.probe(inst))
    return _json_response(inst.snapshot())


@admin
async def reset_instance_fingerprint(request: web.Request) -> web.Response:
    """POST /admin/instances/{id}/reset-fingerprint: learn the fingerprint anew."""
    state = request.app[STATE]
    inst = _instance(request)
    state.registry.reset_fingerprint(inst)
    state.prober.apply(inst, await state.prober.probe(inst))
    return _json_response(inst.snapshot())


@admin
async def list_events(request: web.Request) -> web.Response:
    """GET /admin/events?request_id=&type=&instance=&since=&until=&limit= (newest first)."""
    store = request.app[STATE].recorder.store
    if store is None:
        raise NotFound("The audit store is off (store.enabled: false).", code="audit_off")
    query = parse_event_query(request.query)
    try:
        return _json_response({"events": await store.query(query)})
    except StoreUnavailable as exc:
        raise audit_unavailable(exc) from None


def audit_unavailable(exc: StoreUnavailable) -> AuditUnavailable:
    """The 503 of an admin read while the audit database is away (its message names the
    store without its password)."""
    return AuditUnavailable(f"The audit database cannot be reached now ({exc}); rows are "
                            "kept for it up to store.queue_size.")


def parse_event_query(params: Mapping[str, str]) -> EventQuery:
    """An EventQuery from query parameters; BadRequest on malformed values."""
    type_ = params.get("type") or None
    if type_ is not None and type_ not in EVENT_TYPES:
        raise BadRequest(f"Unknown event type '{type_}'; expected one of "
                         + ", ".join(EVENT_TYPES) + ".", param="type")
    since, until = _time_param(params, "since"), _time_param(params, "until")
    limit = 100
    if params.get("limit"):
        try:
            limit = int(params["limit"])
        except ValueError:
            raise BadRequest("'limit' must be an integer.", param="limit") from None
        if not 1 <= limit <= 10_000:
            raise BadRequest("'limit' must be between 1 and 10000.", param="limit")
    return EventQuery(request_id=params.get("request_id") or None, type=type_,
                      instance=params.get("instance") or None, since=since, until=until,
                      limit=limit)


_AGE = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,6})?)([smhd])")
_NUMBER = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,6})?")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _time_param(params: Mapping[str, str], name: str) -> float | None:
    """Query parameter `name` as unix seconds (None when absent); BadRequest when it is
    not a time `parse_since` reads."""
    text = params.get(name)
    if not text:
        return None
    at = parse_since(text)
    if at is None:
        raise BadRequest(f"'{name}' must be unix seconds, an ISO-8601 time, or an age "
                         "such as 15m, 2h, 1d.", param=name)
    return at


def parse_since(text: str) -> float | None:
    """Unix seconds from `1732780000`, `2026-11-28T05:00:00Z` or an age like `15m`."""
    text = text.strip()
    age = _AGE.fullmatch(text)
    if age is not None:
        return time.time() - float(age.group(1)) * _UNITS[age.group(2)]
    if _NUMBER.fullmatch(text):
        return float(text)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


@admin
async def reload(request: web.Request) -> web.Response:
    """POST /admin/reload: re-read the config file; 200 when switched, 400 when rejected."""
    ok, message = await request.app[RELOAD](request.app)
    if not ok:
        raise BadRequest(f"The new config was rejected; the running one stays. {message}",
                         code="invalid_config")
    return _json_response({"status": "reloaded", "message": message})


def add_admin_routes(app: web.Application) -> None:
    router = app.router
    for path, handler in (("/admin/reload", reload), ("/admin/route", route_dry_run),
                          ("/admin/instances/{id}/drain", drain_instance),
                          ("/admin/instances/{id}/enable", enable_instance),
                          ("/admin/instances/{id}/reset-fingerprint", reset_instance_fingerprint)):
        router.add_post(path, handler, expect_handler=expect_continue)
    router.add_get("/admin/events", list_events, expect_handler=expect_continue)
    router.add_get("/admin/instances", list_instances, expect_handler=expect_continue)
