"""OpenAI's API and every server that speaks it (vLLM, LM Studio, SGLang, TGI's Messages
layer, gateways, clouds): requests go as the client sent them, answers come back as they
are, and a probe reads `/v1/models`.

vLLM (`--served-model-name`) and LM Studio are this provider under their own names: they
list their models at `/v1/models` and look a request's `model` up (vLLM's probe also reads
its load: proxy/providers/vllm.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.api.inbound import CHAT, COMPLETIONS, EMBEDDINGS
from proxy.config import InstanceConfig
from proxy.failures import ContextTooLong, RateLimited, Upstream5xx, UpstreamAuth, UpstreamFailure
from proxy.providers import overflow
from proxy.providers.base import Outgoing, PassThrough, ProviderBase
from proxy.providers.ratelimits import relay_headers, retry_after_s

#: Path under the instance's api_base (`.../v1`) for each endpoint.
PATHS = {CHAT: "/chat/completions", COMPLETIONS: "/completions", EMBEDDINGS: "/embeddings"}


class OpenAICompatible(ProviderBase):
    """The OpenAI protocol as it is (see the module doc)."""

    def __init__(self, name: str = "openai") -> None:
        self.name = name

    def request(self, inst: InstanceConfig, endpoint: str, body: bytes,
                default_max_tokens: int, native: dict[str, Any] | None = None) -> Outgoing:
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
