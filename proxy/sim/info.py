"""What a simulated server says about itself: the models it lists (OpenAI's
`/v1/models`, Ollama's `/api/tags`), its health, and llama.cpp's `/props` and `/slots`
(its slots, busy as many as requests are in flight), which the proxy's prober reads as
the server's own load."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy.sim.responses import JSON_HEADERS, error
from proxy.sim.server import SimServer


class InfoServer(SimServer):
    """The info endpoints of `proxy.sim.simulator.Simulator` (routes added by
    `_info_routes`)."""

    #: llama.cpp's slots: `/props` says `total_slots` and `/slots` which are busy (one
    #: per request in flight); None: neither is said (a server that does not tell).
    slots: int | None
    _created: int

    def _info_routes(self) -> None:
        routes = self.routes
        for prefix in ("/v1", ""):  # llama.cpp also answers without the /v1 prefix
            routes[prefix + "/models"] = ("GET", self._models)
        routes["/health"] = ("GET", self._health)
        routes["/props"] = ("GET", self._props)
        routes["/slots"] = ("GET", self._slots)
        routes["/api/tags"] = ("GET", self._ollama_tags)

    def _listed(self) -> tuple[str, ...]:
        faults = self._faults
        return faults.models or (faults.model or self.model,)

    async def _models(self, request: web.BaseRequest) -> web.StreamResponse:
        body = {"object": "list",
                "data": [{"id": model, "object": "model", "created": self._created, "owned_by": "simulator"}
                         for model in self._listed()]}
        return web.Response(body=orjson.dumps(body), headers=JSON_HEADERS)

    async def _ollama_tags(self, request: web.BaseRequest) -> web.StreamResponse:
        """Ollama's model listing, so the prober's Ollama path can be tested."""
        body = {"models": [{"name": model, "model": model, "size": 0, "digest": "sim"}
                           for model in self._listed()]}
        return web.Response(body=orjson.dumps(body), headers=JSON_HEADERS)

    async def _health(self, request: web.BaseRequest) -> web.StreamResponse:
        if self._faults.loading:
            return error(503, "Loading model", "unavailable_error")
        return web.Response(body=b'{"status":"ok"}', headers=JSON_HEADERS)

    async def _props(self, request: web.BaseRequest) -> web.StreamResponse:
        model = self._listed()[0]
        body: dict[str, Any] = {"model_alias": model,
                                "model_path": self._faults.model_file or f"/models/{model}.gguf"}
        if self.slots is not None:
            body |= {"total_slots": self.slots, "endpoint_slots": True}
        return web.Response(body=orjson.dumps(body), headers=JSON_HEADERS)

    async def _slots(self, request: web.BaseRequest) -> web.StreamResponse:
        """llama.cpp's `/slots`: each slot's `is_processing` (501 when not enabled, as
        llama.cpp answers with `--no-slots`)."""
        if self.slots is None:
            return error(501, "This server does not support slots endpoint.", "not_supported_error")
        busy = self.stats.inflight
        body = [{"id": n, "is_processing": n < busy} for n in range(self.slots)]
        return web.Response(body=orjson.dumps(body), headers=JSON_HEADERS)
