"""What every kind of model server is asked for: one narrow interface, `Provider`.

The engine, the prober and the planner talk to every instance through its provider
(TensorZero's shape): how to build the upstream request, how to read an error answer, its
stream events and a whole body into OpenAI's shapes, how to probe it, how to count
tokens, and what of the OpenAI protocol it cannot express. Nothing outside
proxy/providers/ asks which kind of server an instance is.

Implementations: `openai` (OpenAI and every OpenAI-compatible server: vLLM and LM Studio
differ in nothing the proxy does), `llamacpp`, `ollama`, `anthropic`; `provider_for`
(proxy.providers.kinds) picks one from an instance's `kind` and `server`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from proxy.config import InstanceConfig
from proxy.failures import UpstreamFailure
from proxy.health.fingerprints import Served
from proxy.health.states import DOWN, LOADING, READY
from proxy.providers.load import ServerLoad
from proxy.providers.sse import EventSource

if TYPE_CHECKING:
    from proxy.providers.transport import Upstream

#: The key under which a translated chunk carries the provider's own events it was made of,
#: for a request that came in in that provider's protocol (`native`: the Messages front
#: relays an Anthropic instance's events as they came).
NATIVE_EVENTS = "native_events"


class PassThrough(Exception):
    """The upstream's own client error (400/404/422...), relayed unchanged and not retried.

    Not a failure: the instance worked, the request was wrong.
    """

    def __init__(self, status: int, body: bytes, content_type: str,
                 headers: dict[str, str]) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


@dataclass(slots=True)
class Outgoing:
    """A request to send upstream: the path under the instance's `api_base`, and the body."""

    path: str
    body: bytes


@dataclass(slots=True)
class ProbeResult:
    """What one probe saw: an instance state (proxy.health.states: READY, LOADING, DOWN),
    why, what the server says it serves (None when it did not say) and how busy it says
    it is (proxy.providers.load; None when it did not say)."""

    state: str
    reason: str
    served: Served | None = None
    latency_ms: float = 0.0
    load: ServerLoad | None = None


class Provider(Protocol):
    """What the proxy does differently for each kind of model server."""

    #: The kind, for people (`unsupported_by_anthropic=n>1`).
    name: str
    #: What of the OpenAI protocol it cannot express (`completions`, `embeddings`,
    #: `n>1`: see routing.requirements): a request that needs one never goes to it.
    unsupported: frozenset[str]
    #: Whether the server looks a request's `model` up (every server but llama.cpp,
    #: which answers with its loaded model whatever is asked): see fingerprints.
    checks_names: bool

    def request(self, inst: InstanceConfig, endpoint: str, body: bytes,
                default_max_tokens: int, native: dict[str, Any] | None = None) -> Outgoing:
        """The upstream request for a client request to `endpoint` (proxy.api.inbound's
        CHAT, COMPLETIONS, EMBEDDINGS) with this body (already naming the instance's
        model); raises UnsupportedRequest when the protocol cannot express it.
        `default_max_tokens` for a protocol that requires one. `native`: the client's
        request in a provider's own protocol (ClientRequest.native), sent as it came by
        the provider that speaks it (its answer then stays in that protocol too)."""
        ...

    def headers(self, inst: InstanceConfig, client_auth: str | None) -> dict[str, str]:
        """The request headers: the instance's own credentials, never the client's unless
        `forward_client_auth`."""
        ...

    def error_for(self, status: int, body: bytes,
                  headers: Mapping[str, str]) -> UpstreamFailure | PassThrough:
        """What an error answer (a status >= 400, its body and headers) means: a failure
        (proxy.failures), or the upstream's own client error to pass through. The one
        mapping point of its answers."""
        ...

    def events(self, reader: EventSource, include_usage: bool,
               native: bool = False) -> EventSource:
        """The stream's events as OpenAI chat or text completion chunks; for a `native`
        request each chunk also carries, under NATIVE_EVENTS, the provider's own events
        it was made of."""
        ...

    def body(self, body: bytes, native: bool = False) -> bytes:
        """A whole answer as OpenAI's JSON (for a `native` request, as the provider sent
        it); raises ResponseMalformed when it is unreadable."""
        ...

    async def probe(self, upstream: Upstream, inst: InstanceConfig,
                    timeout_s: float) -> ProbeResult:
        """Ask the server whether it is up and what it serves; raises UpstreamFailure when
        it cannot be reached."""
        ...

    async def count_tokens(self, upstream: Upstream, inst: InstanceConfig, text: str,
                           timeout_s: float) -> int | None:
        """How many of its tokens `text` is, when the server can tell (else None)."""
        ...

    #: Whether the server can count a chat request's input tokens (`count_input`).
    counts_input: bool
    #: Whether the server answers HTTP on a few threads that an idle keep-alive connection
    #: holds (llama.cpp's): its requests then get a pool of no more connections than its
    #: slots, closed soon when idle (proxy.providers.pools), and its probes close theirs.
    sized_pool: bool

    async def count_input(self, upstream: Upstream, inst: InstanceConfig,
                          chat: dict[str, Any], native: dict[str, Any] | None,
                          timeout_s: float) -> int | None:
        """The input tokens of a chat request (`native`: the client's own request, when it
        came in the provider's protocol) by the server's tokenizer, or None when it
        cannot say."""
        ...


class ProviderBase:
    """What most providers do alike: a server that looks a request's `model` up, nothing
    of the OpenAI protocol it cannot express, events and bodies already in OpenAI's shape,
    a probe of `/v1/models`, no way to count tokens. Implementations override the rest."""

    name = "openai"
    unsupported: frozenset[str] = frozenset()
    checks_names = True
    counts_input = False
    sized_pool = False

    def events(self, reader: EventSource, include_usage: bool,
               native: bool = False) -> EventSource:
        return reader

    def body(self, body: bytes, native: bool = False) -> bytes:
        return body

    async def probe(self, upstream: Upstream, inst: InstanceConfig,
                    timeout_s: float) -> ProbeResult:
        status, body = await upstream.get(inst, inst.api_base + "/models", timeout_s)
        return from_listing(status, body)

    async def count_tokens(self, upstream: Upstream, inst: InstanceConfig, text: str,
                           timeout_s: float) -> int | None:
        return None

    async def count_input(self, upstream: Upstream, inst: InstanceConfig,
                          chat: dict[str, Any], native: dict[str, Any] | None,
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
