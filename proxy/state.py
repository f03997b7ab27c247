"""What request handlers share, under typed application keys."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from proxy.audit import Recorder
from proxy.config import Config
from proxy.forwarding import Forwarder
from proxy.health import Prober
from proxy.instances import Registry
from proxy.routing import Planner


@dataclass(slots=True)
class ProxyState:
    """Everything a request handler needs, looked up once per request."""

    config: Config
    registry: Registry
    planner: Planner
    forwarder: Forwarder
    prober: Prober
    recorder: Recorder
    models_body: bytes


STATE = web.AppKey("state", ProxyState)
CONFIG = web.AppKey("config", Config)
REGISTRY = web.AppKey("registry", Registry)
