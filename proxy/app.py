"""The proxy application: routes, shared state under typed keys, lifecycle, error shape."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import ClientSession, web

from proxy.admin import add_admin_routes
from proxy.audit import STATES, Recorder
from proxy.config import Config, ConfigError, load_config
from proxy.endpoints import add_routes, error_response, models_body
from proxy.errors import ProxyError, error_body
from proxy.eventstream import EventHub, close_feed
from proxy.forwarding import Forwarder
from proxy.health import Prober
from proxy.instances import Registry
from proxy.messages_api import MESSAGES_PATH
from proxy.messages_api import error_body as messages_error_body
from proxy.metrics import Metrics
from proxy.routing import Planner
from proxy.scoring import capability_notes
from proxy.secrets import Redactor, config_secrets, set_log_redactor
from proxy.state import CONFIG, RELOAD, STATE, ProxyState
from proxy.status import add_status_routes
from proxy.store import AuditStore
from proxy.ui import add_ui_routes
from proxy.upstream import Upstream, make_client

log = structlog.get_logger("proxy.app")

#: One reload at a time: each stops the running prober and starts its own, so two that
#: overlap (a burst of SIGHUPs, admin reloads sent together) would leave one running
#: for a config no longer in use, probing every instance for the process's life.
RELOAD_LOCK = web.AppKey("reload_lock", asyncio.Lock)


def _assemble(config: Config, registry: Registry, recorder: Recorder,
              client: ClientSession) -> ProxyState:
    """Everything that depends on the config, around the long-lived client and recorder."""
    redactor = Redactor(config_secrets(config))
    upstream = Upstream(client, config.timeouts, redactor, config.routing.default_max_tokens,
                        config.upstream)
    registry.listeners.append(recorder.state_changed)
    recorder.known_models = frozenset(
        {"auto", *config.models, *(i.model for i in config.instances if i.model),
         *(i.id for i in config.instances)})
    for inst in registry.states:
        recorder.metrics.set_state(inst.id, inst.state, STATES)
    return ProxyState(
        config=config,
        registry=registry,
        planner=Planner(config, registry),
        forwarder=Forwarder(config, registry, upstream, recorder),
        prober=Prober(registry, upstream, config.health),
        recorder=recorder,
        client=client,
        redactor=redactor,
        models_body=models_body(config),
    )


async def _start_probing(state: ProxyState) -> None:
    if state.config.health.enabled:
        # One round before the state is used, so the first plans know who is up. Bounded
        # by health.timeout_s; the loops then keep it fresh in the background.
        await state.prober.probe_all()
        state.prober.start()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Start-up and shutdown: audit store, upstream client, prober, in that order."""
    config = app[CONFIG]
    metrics = Metrics()
    store = None
    if config.store.enabled:
        store = AuditStore(config.store.url, queue_size=config.store.queue_size,
                           retention_s=config.store.retention_days * 86400.0,
                           max_rows=config.store.max_rows,
                           on_drop=lambda n: metrics.events_dropped.inc(n))
        await store.start()
    recorder = Recorder(metrics, store, EventHub())
    client = make_client(config.timeouts)  # one pooled client for the app's life
    state = _assemble(config, Registry(config.instances, config.health), recorder, client)
    set_log_redactor(state.redactor)
    app[STATE] = state
    await _start_probing(state)
    log.info("proxy_started", instances=[s.id for s in state.registry.states],
             config=config.source, audit=config.store.url if store else "off")
    if notes := capability_notes(config.instances):
        log.warning("capability_coverage", notes=notes)
    yield
    state = app[STATE]  # the latest, after any reloads
    await state.prober.stop()
    await client.close()
    if store is not None:
        await store.close()  # flushes what is queued


async def reload_config(app: web.Application, path: str | None = None) -> tuple[bool, str]:
    """Load the config file again and switch to it for new requests.

    In-flight requests finish on the state they started with, except that an instance
    which kept its id, address, model and server kind is the same live object in both
    (Registry.adopt): it keeps its health, circuit, cooldown, fingerprint and latency
    figures, and in-flight requests release their count and slot on it.
    An invalid file is rejected and the running config stays. Returns (ok, message).
    """
    async with app[RELOAD_LOCK]:  # overlapping reloads would each start a prober
        return await _reload(app, path)


async def _reload(app: web.Application, path: str | None) -> tuple[bool, str]:
    state = app[STATE]
    source = path or state.config.source
    try:
        config = load_config(source)
    except ConfigError as exc:
        log.error("reload_rejected", error=str(exc))
        return False, str(exc)
    notes = []
    old = state.config
    if (config.server.host, config.server.port) != (old.server.host, old.server.port):
        notes.append("server.host/port take effect at the next restart")
    if config.store != old.store:
        notes.append("store settings take effect at the next restart")
    registry = Registry(config.instances, config.health)
    registry.adopt(state.registry, config.health)
    fresh = _assemble(config, registry, state.recorder, state.client)
    fresh.planner.sessions = state.planner.sessions
    fresh.planner.sessions.ttl_s = config.routing.sticky_ttl_s
    await state.prober.stop()
    await _start_probing(fresh)
    # The switch: one synchronous step, so a request sees the old state or the new one.
    # (The old registry's listeners are already the new one's: see Registry.adopt.)
    set_log_redactor(fresh.redactor)
    app[STATE].replace_with(fresh)
    message = f"reloaded {source}: {len(config.instances)} instances"
    if notes:
        message += "; " + "; ".join(notes)
    log.warning("config_reloaded", source=source, instances=len(config.instances),
                notes=notes)
    return True, message


def http_error_response(status: int, message: str, headers: dict[str, str] | None = None,
                        code: str | None = None) -> web.Response:
    """An OpenAI-shaped error answer for a status the framework chose (404, 405, 413, or
    400/414/431 for a request aiohttp's parser refused)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.Response(status=status, body=error_body(message, kind, code),
                        content_type="application/json", headers=headers)


def framework_error(request: web.BaseRequest, exc: web.HTTPException) -> web.Response:
    """An HTTPException aiohttp raised (404 unknown path, 405 with Allow, 413 over
    `client_max_size`, 417...) as an OpenAI-shaped response with the same status; in
    Anthropic's shape under /v1/messages, whose clients read that one."""
    response = _framework_error(request, exc)
    if request.path.startswith(MESSAGES_PATH) and isinstance(response.body, bytes):
        message = orjson.loads(response.body)["error"]["message"]
        response.body = messages_error_body(response.status, message)
    return response


def _framework_error(request: web.BaseRequest, exc: web.HTTPException) -> web.Response:
    if isinstance(exc, web.HTTPNotFound):
        return http_error_response(404, f"Unknown path: {request.path}")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return http_error_response(
            405, f"Method {request.method} is not allowed for {request.path}; allowed: "
                 f"{allowed}.", {"Allow": allowed})
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        resp = http_error_response(413, f"The request body is larger than the limit of "
                                        f"{request.client_max_size} bytes.",
                                   code="request_too_large")
        resp.force_close()  # the rest of the body is not worth reading
        return resp
    return http_error_response(exc.status, exc.text or exc.reason)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """OpenAI's error shape for the proxy's own errors raised by any handler, for the
    framework's (unknown path, wrong method, body over `client_max_size`), and a logged
    500 in the same shape for a bug of ours."""
    try:
        return await handler(request)
    except ProxyError as exc:
        return error_response(exc, {})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return framework_error(request, exc)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unhandled_error", path=request.path)
        return http_error_response(500, "The proxy hit an internal error; it has been logged.")


#: How aiohttp's server runs this app, wherever it is served (`serve`, tests, chaos):
#: - a request line over MAX_LINE_SIZE bytes is refused (414), a header line (name and
#:   value) over MAX_FIELD_SIZE or more than MAX_HEADERS headers too (431); each parsed
#:   request waiting on a connection holds at most MAX_HEADERS * MAX_FIELD_SIZE bytes, and
#:   aiohttp stops reading a connection that has 32 unanswered requests queued;
#: - a handler is cancelled as soon as its client disconnects, so the upstream request is
#:   closed at once rather than orphaned;
#: - request bodies are never decompressed (compressed ones are refused with a 415 before
#:   they are read); no access log (the proxy logs one line per request itself);
#: - a keep-alive connection idle for KEEPALIVE_S is closed (also one that never completes
#:   its first request head); after an answer sent before its request's body was read
#:   (401, 413...), what is left of the body is read and dropped for up to LINGER_S, so
#:   that closing does not reset the connection before the client has read the answer.
MAX_LINE_SIZE = 8 * 1024
MAX_FIELD_SIZE = 16 * 1024
MAX_HEADERS = 100
KEEPALIVE_S = 75.0
LINGER_S = 2.0
HANDLER_ARGS: dict[str, Any] = {
    "max_line_size": MAX_LINE_SIZE, "max_field_size": MAX_FIELD_SIZE,
    "max_headers": MAX_HEADERS, "keepalive_timeout": KEEPALIVE_S, "lingering_time": LINGER_S,
    "handler_cancellation": True, "auto_decompress": False, "access_log": None,
}


def create_app(config: Config) -> web.Application:
    """Build the proxy application for a validated config (serve it with
    `proxy.server.ProxyRunner`, which also gives aiohttp's protocol errors our shape)."""
    app = web.Application(client_max_size=config.server.max_body_bytes,
                          middlewares=[openai_errors], handler_args=HANDLER_ARGS)
    app[CONFIG] = config
    app[RELOAD] = reload_config
    app[RELOAD_LOCK] = asyncio.Lock()
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(close_feed)  # open event streams end before the grace period
    add_routes(app)
    add_admin_routes(app)
    add_status_routes(app)
    add_ui_routes(app)
    return app
