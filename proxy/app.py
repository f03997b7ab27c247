"""The aiohttp application: shared state under typed keys, lifecycle, error shape."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web

from proxy.admin import add_admin_routes
from proxy.audit import STATES, Recorder
from proxy.config import Config
from proxy.endpoints import add_routes, models_body
from proxy.errors import error_body
from proxy.forwarding import Forwarder
from proxy.health import Prober
from proxy.instances import Registry
from proxy.metrics import Metrics
from proxy.routing import Planner
from proxy.secrets import Redactor, config_secrets, set_log_redactor
from proxy.state import CONFIG, REGISTRY, STATE, ProxyState
from proxy.store import AuditStore
from proxy.upstream import Upstream, make_session

log = structlog.get_logger("proxy.app")


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Start-up and shutdown: audit store, upstream session, prober, in that order."""
    config = app[CONFIG]
    registry = app[REGISTRY]
    metrics = Metrics()
    store = None
    if config.store.enabled:
        store = AuditStore(config.store.url, queue_size=config.store.queue_size,
                           retention_s=config.store.retention_days * 86400.0,
                           max_rows=config.store.max_rows,
                           on_drop=lambda n: metrics.events_dropped.inc(n))
        await store.start()
    recorder = Recorder(metrics, store)
    registry.listeners.append(recorder.state_changed)
    for inst in registry.states:
        metrics.set_state(inst.id, inst.state, STATES)
    session = make_session(config.timeouts)  # one pooled session for the app's life
    redactor = Redactor(config_secrets(config))
    set_log_redactor(redactor)
    upstream = Upstream(session, config.timeouts, redactor)
    prober = Prober(registry, upstream, config.health)
    app[STATE] = ProxyState(
        config=config,
        registry=registry,
        planner=Planner(config, registry),
        forwarder=Forwarder(config, registry, upstream, recorder),
        prober=prober,
        recorder=recorder,
        models_body=models_body(config),
    )
    if config.health.enabled:
        # One round before accepting traffic, so the first plans know who is up. Bounded
        # by health.timeout_s; the loops then keep it fresh in the background.
        await prober.probe_all()
        prober.start()
    log.info("proxy_started", instances=[s.id for s in registry.states],
             config=config.source, audit=config.store.url if store else "off")
    yield
    await prober.stop()
    await session.close()
    if store is not None:
        await store.close()  # flushes what is queued
    registry.listeners.remove(recorder.state_changed)


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


#: How the proxy's server must run (`serve` and the tests use it): no access log (the
#: proxy logs one line per request itself), and a handler is cancelled as soon as its
#: client disconnects, so the upstream request is closed at once, never orphaned.
SERVER_OPTIONS: dict[str, object] = {"access_log": None, "handler_cancellation": True}


def create_app(config: Config) -> web.Application:
    """Build the proxy application for a validated config."""
    app = web.Application(client_max_size=config.server.max_body_bytes,
                          middlewares=[openai_errors])
    app[CONFIG] = config
    app[REGISTRY] = Registry(config.instances, config.health)
    app.cleanup_ctx.append(_lifecycle)
    add_routes(app)
    add_admin_routes(app)
    return app
