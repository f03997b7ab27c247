"""OpenAI's API and every server that speaks it (vLLM, LM Studio, SGLang, TGI's Messages
layer, gateways, clouds): requests go as the client sent them, answers come back as they
are, and a probe reads `/v1/models`.

vLLM (`--served-model-name`) and LM Studio are this provider under their own names: they
differ from OpenAI in nothing the proxy does (both list their models at `/v1/models` and
look a request's `model` up).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import orjson

from proxy.api.inbound import CHAT, COMPLETIONS, EMBEDDINGS
from proxy.config import InstanceConfig
from proxy.failures import ContextTooLong, RateLimited, Upstream5xx, UpstreamAuth, UpstreamFailure
from proxy.health.fingerprints import Served
from proxy.health.states import DOWN, LOADING, READY
from proxy.providers import overflow
from proxy.providers.base import Outgoing, PassThrough, ProbeResult
from proxy.providers.ratelimits import relay_headers, retry_after_s
from proxy.providers.sse import EventSource

if TYPE_CHECKING:
    from proxy.providers.transport import Upstream

#: Path under the instance's api_base (`.../v1`) for each endpoint.
PATHS = {CHAT: "/chat/completions", COMPLETIONS: "/completions", EMBEDDINGS: "/embeddings"}


class OpenAICompatible:
    """The OpenAI protocol as it is (see the module doc)."""

    unsupported: frozenset[str] = frozenset()
    checks_names = True

    def __init__(self, name: str = "openai") -> None:
        self.name = name

    def request(self, inst: InstanceConfig, endpoint: str, body: bytes,
                default_max_tokens: int) -> Outgoing:
        return Outgoing(PATHS[endpoint], body)

    def headers(self, inst: InstanceConfig, client_auth: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if inst.api_key:
            headers["Authorization"] = f"Bearer {inst.api_key}"
        elif inst.forward_client_auth and client_auth:
            headers["Authorization"] = client_auth
        headers.update(inst.headers)
        return headers

    def error_for(self, status: int, body: bytes,
                  headers: Mapping[str, str]) -> UpstreamFailure | PassThrough:
        """429 RATE_LIMITED (its wait from the headers), 5xx UPSTREAM_5XX, a context
        overflow in any server's wording CONTEXT_TOO_LONG (proxy.providers.overflow),
        401/403 UPSTREAM_AUTH (the proxy's credentials, not the client's request); any
        other 4xx is the client's, passed through."""
        if status == 429:
            return RateLimited(retry_after_s(headers), body, relay_headers(headers))
        if status >= 500:
            return Upstream5xx(status, body)
        overflowed = overflow.classify(status, body)
        if overflowed is not None:
            return ContextTooLong(overflowed)
        if status in (401, 403):
            return UpstreamAuth(status)
        return PassThrough(status, body, headers.get("Content-Type", "application/json"),
                           relay_headers(headers))

    def events(self, reader: EventSource, include_usage: bool) -> EventSource:
        return reader

    def body(self, body: bytes) -> bytes:
        return body

    async def probe(self, upstream: Upstream, inst: InstanceConfig,
                    timeout_s: float) -> ProbeResult:
        status, body = await upstream.get(inst, inst.api_base + "/models", timeout_s)
        return from_listing(status, body)

    async def count_tokens(self, upstream: Upstream, inst: InstanceConfig, text: str,
                           timeout_s: float) -> int | None:
        return None


def from_listing(status: int, body: bytes) -> ProbeResult:
    """A probe's result from a model listing: OpenAI's `/v1/models` or Ollama's
    `/api/tags`. A 404 is a server without a listing (reachable); 503 one still loading."""
    if status == 200:
        names = tuple(listed_ids(json_of(body)))
        return ProbeResult(READY, "healthy", Served(names, names[0] if len(names) == 1 else None))
    if status == 404:
        return ProbeResult(READY, "reachable (no model listing)")
    if status == 503:
        return ProbeResult(LOADING, "model listing answered 503")
    return ProbeResult(DOWN, f"model listing answered HTTP {status}")


def listed_ids(doc: object) -> list[str]:
    """Model names from an OpenAI `/v1/models` list (with llama.cpp's `aliases` of each)
    or Ollama's `/api/tags` (`name`, `model`)."""
    if not isinstance(doc, dict):
        return []
    items = doc.get("data")
    if not isinstance(items, list):
        items = doc.get("models")
    names: list[str] = []
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                aliases = item.get("aliases")
                extra = aliases if isinstance(aliases, list) else []
                for value in (item.get("id"), item.get("name"), item.get("model"), *extra):
                    if isinstance(value, str) and value and value not in names:
                        names.append(value)
    return names


def json_of(body: bytes) -> object:
    """A JSON body, or None when it is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
