"""The aiohttp application: shared state under typed keys, lifecycle, error shape."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web

from proxy.admin import add_admin_routes
from proxy.config import Config
from proxy.endpoints import add_routes, models_body
from proxy.errors import error_body
from proxy.forwarding import Forwarder
from proxy.health import Prober
from proxy.instances import Registry
from proxy.routing import Planner
from proxy.state import CONFIG, REGISTRY, STATE, ProxyState
from proxy.upstream import Upstream, make_session

log = structlog.get_logger("proxy.app")


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    """One pooled ClientSession for the life of the app."""
    config = app[CONFIG]
    session = make_session(config.timeouts)
    registry = app[REGISTRY]
    upstream = Upstream(session, config.timeouts)
    prober = Prober(registry, upstream, config.health)
    app[STATE] = ProxyState(
        config=config,
        registry=registry,
        planner=Planner(config, registry),
        forwarder=Forwarder(config, registry, upstream),
        prober=prober,
        models_body=models_body(config),
    )
    if config.health.enabled:
        # One round before accepting traffic, so the first plans know who is up. Bounded
        # by health.timeout_s; the loops then keep it fresh in the background.
        await prober.probe_all()
        prober.start()
    log.info("proxy_started", instances=[s.id for s in registry.states],
             config=config.source)
    yield
    await prober.stop()
    await session.close()


_STATUS_TYPES = {404: "invalid_request_error", 405: "invalid_request_error",
                 413: "invalid_request_error"}


@web.middleware
async def openai_errors(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
    """Give the framework's own errors (unknown path, wrong method...) OpenAI's shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.reason if exc.status != 404 else f"Unknown path: {request.path}"
        return web.Response(
            status=exc.status,
            body=error_body(message, _STATUS_TYPES.get(exc.status, "invalid_request_error")),
            content_type="application/json",
        )


def create_app(config: Config) -> web.Application:
    """Build the proxy application for a validated config."""
    app = web.Application(client_max_size=config.server.max_body_bytes,
                          middlewares=[openai_errors])
    app[CONFIG] = config
    app[REGISTRY] = Registry(config.instances, config.health)
    app.cleanup_ctx.append(_upstream_session)
    add_routes(app)
    add_admin_routes(app)
    return app
