"""Admin endpoints, behind `server.admin_key` when one is configured."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from proxy.errors import Forbidden, ProxyError, Unauthorized
from proxy.inbound import CHAT, parse_request
from proxy.routing import new_id
from proxy.state import STATE

_JSON = "application/json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _check_admin(request: web.Request) -> None:
    key = request.app[STATE].config.server.admin_key
    if key is None:
        return
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer "):
        raise Unauthorized("Admin endpoints need the admin key as a Bearer token.")
    if not hmac.compare_digest(auth[7:].encode(), key.encode()):
        raise Forbidden("This key may not use the admin endpoints.")


def admin(handler: Handler) -> Handler:
    """Wrap an admin handler: key check, and ProxyErrors as OpenAI-shaped responses."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            _check_admin(request)
            return await handler(request)
        except ProxyError as exc:
            return web.Response(status=exc.status, body=exc.body(), content_type=_JSON)

    wrapped.__doc__ = handler.__doc__
    return wrapped


@admin
async def route_dry_run(request: web.Request) -> web.Response:
    """POST /admin/route: the plan the proxy would make for this body; nothing is sent."""
    state = request.app[STATE]
    req = parse_request(CHAT, await request.read(), new_id())
    plan = state.planner.plan(req, request.headers)
    return web.Response(body=orjson.dumps(plan.as_dict()), content_type=_JSON)


def add_admin_routes(app: web.Application) -> None:
    app.router.add_post("/admin/route", route_dry_run)
