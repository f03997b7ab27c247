"""What request handlers share, under typed application keys."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import ClientSession, web

from proxy.audit.recorder import Recorder
from proxy.config import Config
from proxy.engine.forwarder import Forwarder
from proxy.health.prober import Prober
from proxy.health.registry import Registry
from proxy.providers.transport import Upstream
from proxy.routing.planner import Planner
from proxy.secrets import Redactor
from proxy.state import SharedState
from proxy.tracing import Tracing


@dataclass(slots=True)
class ProxyState:
    """Everything a request handler needs. Handlers take what they need from it once, at
    the start of a request; a reload replaces its contents in one synchronous step."""

    config: Config
    registry: Registry
    planner: Planner
    forwarder: Forwarder
    #: The transport to the instances (for side requests: count_tokens).
    upstream: Upstream
    prober: Prober
    recorder: Recorder
    client: ClientSession
    redactor: Redactor
    models_body: bytes
    #: OpenTelemetry traces, when the environment asks for them (proxy.tracing).
    tracing: Tracing | None = None
    #: The link to the other replicas (`state.url`), or None: this process's state alone.
    shared: SharedState | None = None

    def replace_with(self, other: ProxyState) -> None:
        """Take over every field of `other` (used by reload)."""
        for name in self.__slots__:
            setattr(self, name, getattr(other, name))


STATE = web.AppKey("state", ProxyState)
#: The app's reload function (see proxy.app.reload_config): (app) -> (ok, message).
Reloader = Callable[[web.Application], Awaitable[tuple[bool, str]]]
RELOAD: web.AppKey[Reloader] = web.AppKey("reload")
CONFIG = web.AppKey("config", Config)
