"""The proxy application: the parts wired together (api -> routing -> engine -> providers,
health and audit beside them), shared state under typed keys, start-up, shutdown and
config reload."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog
from aiohttp import ClientSession, web

from proxy.api.admin import add_admin_routes
from proxy.api.endpoints import add_routes, models_body
from proxy.api.middleware import openai_errors
from proxy.api.server import HANDLER_ARGS
from proxy.api.state import CONFIG, RELOAD, STATE, ProxyState
from proxy.api.status import add_status_routes
from proxy.audit.eventstream import EventHub
from proxy.audit.metrics import Metrics
from proxy.audit.recorder import STATES, Recorder
from proxy.audit.store import AuditStore
from proxy.config import Config, ConfigError, load_config
from proxy.engine.forwarder import Forwarder
from proxy.health.prober import Prober
from proxy.health.registry import Registry
from proxy.providers.transport import Upstream, make_client
from proxy.routing.planner import Planner
from proxy.routing.scoring import capability_notes
from proxy.secrets import Redactor, config_secrets, set_log_redactor
from proxy.state import SharedState
from proxy.tracing import Tracing
from proxy.tracing import setup as setup_tracing
from proxy.ui import add_ui_routes

log = structlog.get_logger("proxy.app")

#: One reload at a time: each stops the running prober and starts its own, so two that
#: overlap (a burst of SIGHUPs, admin reloads sent together) would leave one running
#: for a config no longer in use, probing every instance for the process's life.
RELOAD_LOCK = web.AppKey("reload_lock", asyncio.Lock)


def _assemble(config: Config, registry: Registry, recorder: Recorder,
              client: ClientSession, tracing: Tracing | None,
              shared: SharedState | None = None) -> ProxyState:
    """Everything that depends on the config, around the long-lived client, recorder and
    tracing."""
    redactor = Redactor(config_secrets(config))
    upstream = Upstream(client, config.timeouts, redactor, config.routing.default_max_tokens,
                        config.upstream)
    upstream.tracing = tracing
    planner = Planner(config, registry)
    forwarder = Forwarder(config, registry, upstream, planner)
    forwarder.tracing = tracing
    if shared is not None:
        shared.attach(registry)
    registry.listeners.append(recorder.state_changed)
    recorder.known_models = frozenset(
        {"auto", *config.models, *(i.model for i in config.instances if i.model),
         *(i.id for i in config.instances)})
    for inst in registry.states:
        recorder.metrics.set_state(inst.id, inst.state, STATES)
    return ProxyState(
        config=config,
        registry=registry,
        planner=planner,
        forwarder=forwarder,
        upstream=upstream,
        prober=Prober(registry, upstream, config.health),
        recorder=recorder,
        client=client,
        redactor=redactor,
        models_body=models_body(config),
        tracing=tracing,
        shared=shared,
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
                           on_drop=lambda n: metrics.events_dropped.inc(n),
                           on_available=lambda up: metrics.audit_up.set(1.0 if up else 0.0))
        metrics.audit_up.set(1.0)
        await store.start()
    recorder = Recorder(metrics, store, EventHub())
    client = make_client(config.timeouts)  # one pooled client for the app's life
    tracing = setup_tracing()
    registry = Registry(config.instances, config.health)
    shared = None
    if config.state.url is not None:
        shared = SharedState(config.state, registry, metrics.registry)
    state = _assemble(config, registry, recorder, client, tracing, shared)
    set_log_redactor(state.redactor)
    app[STATE] = state
    if shared is not None:  # before the first probes: plans start from what others know
        state.planner.sessions.on_remember = shared.share_map(
            "sessions", state.planner.sessions.adopt)
        state.planner.affinity.on_remember = shared.share_map(
            "affinity", state.planner.affinity.adopt)
        shared.ledger.on_back = lambda inst: app[STATE].prober.probe_soon(inst)
        await shared.start()
    await _start_probing(state)
    log.info("proxy_started", instances=[s.id for s in state.registry.states],
             config=config.source, audit=store.shown if store else "off",
             shared_state="redis" if shared else "off")
    if notes := capability_notes(config.instances):
        log.warning("capability_coverage", notes=notes)
    yield
    state = app[STATE]  # the latest, after any reloads
    await state.prober.stop()
    if state.shared is not None:
        await state.shared.stop()
    await client.close()
    await state.upstream.pools.close()
    if store is not None:
        await store.close()  # flushes what is queued
    if tracing is not None:  # exports what is queued (a blocking HTTP post, at exit only)
        await asyncio.to_thread(tracing.shutdown)


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
    if config.state != old.state:
        notes.append("state settings take effect at the next restart")
    registry = Registry(config.instances, config.health)
    registry.adopt(state.registry, config.health)
    fresh = _assemble(config, registry, state.recorder, state.client, state.tracing,
                      state.shared)
    fresh.planner.sessions = state.planner.sessions
    fresh.planner.sessions.ttl_s = config.routing.sticky_ttl_s
    fresh.planner.affinity.keep(state.planner.affinity)
    fresh.upstream.pools = state.upstream.pools
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


def create_app(config: Config) -> web.Application:
    """Build the proxy application for a validated config (serve it with
    `proxy.api.server.ProxyRunner`, which also gives aiohttp's protocol errors our shape)."""
    app = web.Application(client_max_size=config.server.max_body_bytes,
                          middlewares=[openai_errors], handler_args=HANDLER_ARGS)
    app[CONFIG] = config
    app[RELOAD] = reload_config
    app[RELOAD_LOCK] = asyncio.Lock()
    app.cleanup_ctx.append(_lifecycle)
    add_routes(app)
    add_admin_routes(app)
    add_status_routes(app)  # (after the lifecycle: its sampler reads the recorder)
    add_ui_routes(app)
    return app
