"""Anthropic's Messages API behind the OpenAI surface.

Chat completions are sent as Messages requests (proxy.providers.anthropic_requests) with
`x-api-key` and `anthropic-version`; answers, whole or streamed, come back as OpenAI chat
completions (proxy.providers.anthropic_responses); errors map to the reason codes (429
RATE_LIMITED with its `retry-after` or the reset of an exhausted
`anthropic-ratelimit-*` limit; 529, 5xx, `overloaded_error` and `api_error`
UPSTREAM_5XX; 401/403 UPSTREAM_AUTH; "prompt is too long" CONTEXT_TOO_LONG; any other
4xx the client's, in OpenAI's error shape). The protocol carries single-choice chat
completions only: a text completion, an embedding or `n` > 1 never goes to it. A probe
reads its `/v1/models`. (Anthropic docs: "Messages", "Streaming Messages", "Errors",
"Rate limits"; API version 2023-06-01.)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from proxy.api.errors import error_body
from proxy.api.inbound import CHAT
from proxy.config import InstanceConfig
from proxy.failures import (
    ContextTooLong,
    RateLimited,
    ResponseMalformed,
    UnsupportedRequest,
    Upstream5xx,
    UpstreamAuth,
    UpstreamFailure,
)
from proxy.providers import overflow
from proxy.providers.anthropic_requests import TranslationError, to_messages_request
from proxy.providers.anthropic_responses import (
    AnthropicStreamError,
    StreamTranslator,
    from_messages_response,
)
from proxy.providers.base import NATIVE_EVENTS, Outgoing, PassThrough, ProviderBase, json_of
from proxy.providers.ratelimits import relay_headers, retry_after_s
from proxy.providers.sse import DONE_EVENT, EventSource, event_data

if TYPE_CHECKING:
    from proxy.providers.transport import Upstream

ANTHROPIC_VERSION = "2023-06-01"
Json = dict[str, Any]


class Anthropic(ProviderBase):
    """The Messages API (see the module doc)."""

    name = "anthropic"
    unsupported = frozenset({"completions", "embeddings", "n>1"})

    counts_input = True

    def request(self, inst: InstanceConfig, endpoint: str, body: bytes,
                default_max_tokens: int, native: Json | None = None) -> Outgoing:
        """A chat request as a Messages request (the planner sends nothing else: see
        `unsupported`); the Messages API requires `max_tokens`, so `default_max_tokens`
        when the client sent none. Raises UnsupportedRequest for what it cannot express.
        A client's own Messages request (`native`) goes as it came, with the instance's
        model."""
        if native is not None:
            model = inst.model or orjson.loads(body)["model"]
            return Outgoing("/messages", orjson.dumps({**native, "model": model}))
        try:
            if endpoint != CHAT:
                raise TranslationError(f"the Messages API has no {endpoint} endpoint")
            translated = to_messages_request(orjson.loads(body), inst.model, default_max_tokens)
        except (TranslationError, orjson.JSONDecodeError) as exc:
            raise UnsupportedRequest(f"cannot be expressed for {inst.id}: {exc}") from None
        return Outgoing("/messages", orjson.dumps(translated))

    def headers(self, inst: InstanceConfig, client_auth: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity",
                   "x-api-key": inst.api_key or "", "anthropic-version": ANTHROPIC_VERSION}
        headers.update(inst.headers)
        return headers

    def error_for(self, status: int, body: bytes,
                  headers: Mapping[str, str]) -> UpstreamFailure | PassThrough:
        error_type, message = _error_of(body)
        if status == 429 or error_type == "rate_limit_error":
            return RateLimited(retry_after_s(headers), body, relay_headers(headers))
        if status >= 500 or error_type in ("overloaded_error", "api_error"):
            return Upstream5xx(status, body)
        overflowed = overflow.classify(status, body)  # "prompt is too long: N tokens > M"
        if overflowed is not None:
            return ContextTooLong(overflowed)
        if status in (401, 403):
            return UpstreamAuth(status)
        return PassThrough(status, error_body(message or f"HTTP {status}",
                                              "invalid_request_error"),
                           "application/json", relay_headers(headers))

    def events(self, reader: EventSource, include_usage: bool,
               native: bool = False) -> EventSource:
        return MessagesEvents(reader, StreamTranslator(int(time.time()), include_usage),
                              native)

    def body(self, body: bytes, native: bool = False) -> bytes:
        if native:
            return body  # a Message, as the client's own request asked for
        try:
            doc = orjson.loads(body)
            if not isinstance(doc, dict):
                raise TypeError(f"a JSON {type(doc).__name__}, not an object")
            return orjson.dumps(from_messages_response(doc, int(time.time())))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ResponseMalformed(f"unreadable Messages API response: {exc}") from None


    async def count_input(self, upstream: Upstream, inst: InstanceConfig, chat: Json,
                          native: Json | None, timeout_s: float) -> int | None:
        """By the instance's own `/v1/messages/count_tokens` (`{"input_tokens": N}`),
        sent the client's Messages request (`native`; None: not counted)."""
        if native is None:
            return None
        body = orjson.dumps({**native, "model": inst.model or native.get("model")})
        try:
            status, data = await upstream.get(inst, inst.api_base + "/messages/count_tokens",
                                              timeout_s, body)
        except UpstreamFailure:
            return None
        doc = json_of(data) if status == 200 else None
        counted = doc.get("input_tokens") if isinstance(doc, dict) else None
        return counted if isinstance(counted, int) and not isinstance(counted, bool) \
            and counted > 0 else None


def _error_of(body: bytes) -> tuple[str, str]:
    """The (type, message) of an Anthropic error body (`{"type": "error", "error": {"type",
    "message"}}`), or ("", the raw text)."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        return str(error.get("type") or ""), str(error.get("message") or "")
    return "", body.decode("utf-8", "replace").strip()[:500]


class MessagesEvents:
    """Reads a Messages API event stream and yields OpenAI chunk events in its place.

    The rest of the relay sees what any OpenAI-compatible server would send: chunks,
    `[DONE]` at message_stop, an in-band `{"error": ...}` for an error event. With
    `keep` (a request that came in as a Messages API request), each chunk also carries,
    under NATIVE_EVENTS, the Messages events it was made of (and those that made no chunk
    since the last one: pings, block stops, signature deltas), for the Messages front to
    relay as they came.
    """

    __slots__ = ("_events", "_translator", "_queue", "_kept")

    def __init__(self, events: EventSource, translator: StreamTranslator,
                 keep: bool = False) -> None:
        self._events = events
        self._translator = translator
        self._queue: deque[bytes] = deque()
        self._kept: list[Json] | None = [] if keep else None

    def buffered(self) -> bytes | None:
        """A translated event already at hand, else None (no waiting)."""
        return self._queue.popleft() if self._queue else None

    async def next(self, timeout_s: float | None = None, phase: str = "idle") -> bytes | None:
        deadline = None
        while not self._queue:
            if timeout_s is not None:  # pings do not extend the wait for content
                deadline = deadline or time.monotonic() + timeout_s
                timeout_s = max(deadline - time.monotonic(), 0.0)
            raw = await self._events.next(timeout_s, phase)
            if raw is None:
                return None
            self._translate(raw)
        return self._queue.popleft()

    def _translate(self, raw: bytes) -> None:
        """Queue the chunk events one Messages event stands for (none for a ping)."""
        payload = event_data(raw)
        if payload is None:
            return
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self._queue.append(b"data: " + payload + b"\n\n")  # malformed: the relay judges
            return
        if not isinstance(data, dict):
            return
        try:
            chunks = self._translator.feed(_event_name(raw) or str(data.get("type", "")), data)
        except AnthropicStreamError as exc:
            self._queue.append(b"data: " + orjson.dumps(
                {"error": {"message": exc.message, "type": exc.error_type}}) + b"\n\n")
            return
        kept = self._kept
        if kept is not None:
            kept.append(data)
            if chunks:
                chunks[0][NATIVE_EVENTS] = kept[:]
                kept.clear()
        self._queue.extend(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
        if self._translator.done:
            self._queue.append(DONE_EVENT)


def _event_name(raw: bytes) -> str | None:
    for line in raw.split(b"\n"):
        if line.startswith(b"event:"):
            return line[6:].strip().decode("utf-8", "replace")
    return None
