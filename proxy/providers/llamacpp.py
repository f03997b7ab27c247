"""llama.cpp's `llama-server`: OpenAI's protocol, plus what it does its own way.

- It answers with its one loaded model whatever a request's `model` says, so an instance's
  label is sent as it is (`checks_names` False).
- A probe asks `/health` (503 while the model loads) and `/props`, whose `model_alias` is
  the `--alias`, else the `-m` path or `-hf` repo, and `model_path` the loaded file
  (llama.cpp tools/server/server-context.cpp `get_res_props`, as vendored in
  llama-cpp-python 0.3.36); an older server without them is read from `/v1/models`.
  The same probe reads how busy it is (`total_slots`, then `/metrics` or `/slots`: see
  proxy.providers.load).
- `/tokenize` counts tokens, so a continuation keeps the client's token budget (chunks
  are not tokens: a character of several tokens comes as one chunk); with
  `/apply-template` it counts a chat request's input (the Messages API's count_tokens).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from proxy.config import InstanceConfig
from proxy.failures import UpstreamFailure
from proxy.health.fingerprints import Served
from proxy.health.states import DOWN, LOADING, READY
from proxy.providers.base import ProbeResult, from_listing, json_of
from proxy.providers.load import (
    LLAMACPP_RUNNING,
    LLAMACPP_WAITING,
    ServerLoad,
    from_metrics,
    from_slots,
    total_slots,
)
from proxy.providers.openai import OpenAICompatible

if TYPE_CHECKING:
    from proxy.providers.transport import Upstream


class LlamaCpp(OpenAICompatible):
    """llama.cpp's server (see the module doc)."""

    checks_names = False
    counts_input = True
    sized_pool = True

    def __init__(self) -> None:
        super().__init__("llamacpp")

    async def probe(self, upstream: Upstream, inst: InstanceConfig,
                    timeout_s: float) -> ProbeResult:
        status, body = await upstream.get(inst, inst.root_url + "/health", timeout_s)
        if status == 503:
            return ProbeResult(LOADING, "loading model (/health 503)")
        if status == 404:  # an older server, or not llama.cpp after all
            return await super().probe(upstream, inst, timeout_s)
        if status != 200:
            return ProbeResult(DOWN, f"/health answered HTTP {status}")
        status, body = await upstream.get(inst, inst.root_url + "/props", timeout_s)
        doc = json_of(body) if status == 200 else None
        if not isinstance(doc, dict):
            return await super().probe(upstream, inst, timeout_s)
        alias, path = doc.get("model_alias"), doc.get("model_path")
        names = tuple(dict.fromkeys(n for n in (alias, path) if isinstance(n, str) and n))
        if not names:  # an older server whose /props does not say
            status, body = await upstream.get(inst, inst.api_base + "/models", timeout_s)
            result = from_listing(status, body)
        else:
            result = ProbeResult(READY, "healthy", Served(
                names, names[0], path if isinstance(path, str) and path else None))
        result.load = await self._load(upstream, inst, doc, timeout_s)
        return result

    @staticmethod
    async def _load(upstream: Upstream, inst: InstanceConfig, props: dict[str, Any],
                    timeout_s: float) -> ServerLoad:
        """Its slots (`/props` `total_slots`) and how many are busy and queued: `/metrics`
        when on (it counts the queue too), else `/slots` (see proxy.providers.load)."""
        slots = total_slots(props)
        busy: int | None = None
        queued: int | None = None
        if props.get("endpoint_metrics") is True:
            status, body = await upstream.get(inst, inst.root_url + "/metrics", timeout_s)
            figures = from_metrics(body.decode("utf-8", "replace"), LLAMACPP_RUNNING,
                                   LLAMACPP_WAITING) if status == 200 else None
            if figures is not None:
                busy, queued = figures
        if busy is None and props.get("endpoint_slots", True) is not False:
            status, body = await upstream.get(inst, inst.root_url + "/slots", timeout_s)
            listed = from_slots(json_of(body)) if status == 200 else None
            if listed is not None:
                slots = slots or listed[0] or None
                busy = listed[1]
        return ServerLoad(slots, busy, queued)

    async def count_tokens(self, upstream: Upstream, inst: InstanceConfig, text: str,
                           timeout_s: float) -> int | None:
        """By `/tokenize` (`{"content", "add_special": false}` -> `{"tokens": [...]}`)."""
        body = orjson.dumps({"content": text, "add_special": False})
        try:
            status, data = await upstream.get(inst, inst.root_url + "/tokenize", timeout_s,
                                              body)
        except UpstreamFailure:
            return None
        doc = json_of(data) if status == 200 else None
        tokens = doc.get("tokens") if isinstance(doc, dict) else None
        return len(tokens) if isinstance(tokens, list) else None

    async def count_input(self, upstream: Upstream, inst: InstanceConfig,
                          chat: dict[str, Any], native: dict[str, Any] | None,
                          timeout_s: float) -> int | None:
        """By `/apply-template` (the prompt its chat template makes of the messages and
        tools: `{"prompt": ...}`), then `/tokenize` (llama.cpp tools/server README, "API
        Endpoints")."""
        body = orjson.dumps({"messages": chat["messages"], **(
            {"tools": chat["tools"]} if chat.get("tools") else {})})
        try:
            status, data = await upstream.get(inst, inst.root_url + "/apply-template",
                                              timeout_s, body)
        except UpstreamFailure:  # no count from this server: the caller estimates
            return None
        doc = json_of(data) if status == 200 else None
        prompt = doc.get("prompt") if isinstance(doc, dict) else None
        if not isinstance(prompt, str):
            return None
        return await self.count_tokens(upstream, inst, prompt, timeout_s)
