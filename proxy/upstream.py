"""Talking to one instance: open a request, classify its status, read bodies.

Transport problems arrive here already as our failures: the HTTP client
(`proxy.httpclient`) raises them itself, its own timeouts included.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import orjson

from proxy import anthropic, overflow
from proxy.config import InstanceConfig, TimeoutsConfig
from proxy.errors import error_body
from proxy.failures import (
    ContextTooLong,
    ProcessExited,
    RateLimited,
    UnsupportedByInstance,
    Upstream5xx,
    UpstreamAuth,
    UpstreamFailure,
)
from proxy.httpclient import Pool, Response
from proxy.ratelimits import relay_headers, retry_after_s
from proxy.secrets import Redactor
from proxy.sse import DONE_EVENT, EventReader, event_data


class PassThrough(Exception):
    """The upstream's own client error (400/404/422...), relayed unchanged and not retried.

    Not an UpstreamFailure: the instance worked, the request was wrong.
    """

    def __init__(self, status: int, body: bytes, content_type: str,
                 headers: dict[str, str]) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


def make_client(timeouts: TimeoutsConfig) -> Pool:
    """The one pooled HTTP client of the app (keep-alive, no cap on connections)."""
    return Pool(timeouts.connect_s, keepalive_s=60.0)


def instance_headers(inst: InstanceConfig, client_auth: str | None) -> dict[str, str]:
    """Headers for a request to `inst`: its own credentials, never the client's unless allowed."""
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if inst.kind == ANTHROPIC:
        headers.update(anthropic.HEADERS(inst.api_key or ""))
    elif inst.api_key:
        headers["Authorization"] = f"Bearer {inst.api_key}"
    elif inst.forward_client_auth and client_auth:
        headers["Authorization"] = client_auth
    for name, value in inst.headers:
        headers[name] = value
    return headers


ANTHROPIC = "anthropic"


class AnthropicEvents:
    """Reads a Messages API event stream and yields OpenAI chunk events in its place.

    The rest of the relay sees what any OpenAI-compatible server would send: chunks,
    `[DONE]` at message_stop, an in-band `{"error": ...}` for an error event.
    """

    __slots__ = ("_events", "_translator", "_queue")

    def __init__(self, events: EventReader, translator: anthropic.StreamTranslator) -> None:
        self._events = events
        self._translator = translator
        self._queue: list[bytes] = []

    def buffered(self) -> bytes | None:
        """A translated event already at hand, else None (no waiting)."""
        return self._queue.pop(0) if self._queue else None

    async def next(self, timeout_s: float | None = None, phase: str = "idle") -> bytes | None:
        deadline = None
        while not self._queue:
            if timeout_s is not None:  # pings do not extend the wait for content
                deadline = deadline or time.monotonic() + timeout_s
                timeout_s = max(deadline - time.monotonic(), 0.0)
            raw = await self._events.next(timeout_s, phase)
            if raw is None:
                return None
            name, payload = _event_name(raw), event_data(raw)
            if payload is None:
                continue
            try:
                data = orjson.loads(payload)
            except orjson.JSONDecodeError:
                return b"data: " + payload + b"\n\n"  # malformed: let the relay judge it
            if not isinstance(data, dict):
                continue
            try:
                chunks = self._translator.feed(name or str(data.get("type", "")), data)
            except anthropic.AnthropicStreamError as exc:
                return b"data: " + orjson.dumps({"error": {"message": exc.message,
                                                           "type": exc.error_type}}) + b"\n\n"
            self._queue.extend(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
            if self._translator.done:
                self._queue.append(DONE_EVENT)
        return self._queue.pop(0)


def _event_name(raw: bytes) -> str | None:
    for line in raw.split(b"\n"):
        if line.startswith(b"event:"):
            return line[6:].strip().decode("utf-8", "replace")
    return None


class Upstream:
    """Opens requests to instances over the shared client pool, with the configured timeouts."""

    def __init__(self, client: Pool, timeouts: TimeoutsConfig,
                 redactor: Redactor | None = None, default_max_tokens: int = 1024) -> None:
        self.client = client
        self.timeouts = timeouts
        self.redactor = redactor or Redactor()
        #: The Messages API requires max_tokens; used when the client sent none.
        self.default_max_tokens = default_max_tokens
        self._headers: dict[str, dict[str, str]] = {}

    def headers_for(self, inst: InstanceConfig, client_auth: str | None) -> dict[str, str]:
        if inst.forward_client_auth:
            return instance_headers(inst, client_auth)
        cached = self._headers.get(inst.id)
        if cached is None:
            cached = self._headers[inst.id] = instance_headers(inst, None)
        return cached

    async def open(self, inst: InstanceConfig, path: str, body: bytes,
                   client_auth: str | None = None) -> Response:
        """POST `body` to the instance and wait for the status line and headers.

        Returns a 2xx/3xx response with its body unread. Raises PassThrough for a 4xx
        the client should see unchanged, and an UpstreamFailure for refusals, timeouts,
        resets, 5xx, 429 and context overflow.
        The wait for headers is bounded by `first_byte_s`; the caller bounds the rest.
        """
        if inst.kind == ANTHROPIC:
            path, body = "/messages", self._to_anthropic(inst, body)
        url = inst.api_base + path
        resp = await self.client.request("POST", url, body, self.headers_for(inst, client_auth),
                                         self.timeouts.first_byte_s, "first_byte")
        status = resp.status
        if status < 400:
            return resp
        if status == 429:
            body_bytes = await self.read_error_body(resp)
            raise RateLimited(retry_after_s(resp.headers), body_bytes,
                              passthrough_headers(resp.headers))
        if status >= 500:
            raise Upstream5xx(status, await self.read_error_body(resp))
        body_bytes = await self.read_error_body(resp)
        overflowed = overflow.classify(status, body_bytes)  # every server's wording
        if overflowed is not None:
            raise ContextTooLong(overflowed)
        if inst.kind == ANTHROPIC:
            self._anthropic_error(status, body_bytes, resp.headers)
        if status in (401, 403):
            raise UpstreamAuth(status)
        raise PassThrough(status, body_bytes, resp.headers.get("Content-Type", "application/json"),
                          passthrough_headers(resp.headers))

    def _to_anthropic(self, inst: InstanceConfig, body: bytes) -> bytes:
        """An OpenAI chat request as a Messages API request (the planner sends nothing else:
        see scoring.UNSUPPORTED)."""
        try:
            translated = anthropic.to_messages_request(orjson.loads(body), inst.model,
                                                       self.default_max_tokens)
        except (anthropic.TranslationError, orjson.JSONDecodeError) as exc:
            raise UnsupportedByInstance(f"cannot be expressed for {inst.id}: {exc}") from None
        return orjson.dumps(translated)

    def _anthropic_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        """Raise the failure (or pass-through) an Anthropic error status stands for."""
        code, message = anthropic.map_error(status, body)
        if code == "RATE_LIMITED":
            raise RateLimited(retry_after_s(headers), body, passthrough_headers(headers))
        if code == "UPSTREAM_5XX":
            raise Upstream5xx(status, body)
        if code == "UPSTREAM_AUTH":
            raise UpstreamAuth(status)
        raise PassThrough(status, error_body(message, "invalid_request_error"),
                          "application/json", passthrough_headers(headers))

    def translate_body(self, inst: InstanceConfig, body: bytes) -> bytes:
        """A whole response in OpenAI's chat.completion shape (Messages API translated)."""
        if inst.kind != ANTHROPIC:
            return body
        try:
            return orjson.dumps(anthropic.from_messages_response(orjson.loads(body),
                                                                 int(time.time())))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ProcessExited(f"unreadable Messages API response: {exc}") from None

    @staticmethod
    def events(inst: InstanceConfig, resp: Response,
               include_usage: bool) -> EventReader | AnthropicEvents:
        """The response's server-sent events, as OpenAI chat completion chunks."""
        if inst.kind == ANTHROPIC:
            return AnthropicEvents(EventReader(resp),
                                   anthropic.StreamTranslator(int(time.time()), include_usage))
        return EventReader(resp)

    async def read_error_body(self, resp: Response, limit: int = 65536) -> bytes:
        """Read (a bounded part of) an error response's body and release the connection."""
        try:
            data = await resp.read(limit, self.timeouts.idle_s)
        except Exception:
            data = b""
        finally:
            resp.release()  # (closes it unless the whole body came)
        return self.redactor.data(data)  # a server may quote the key it was sent

    async def read_body(self, resp: Response, deadline_s: float) -> bytes:
        """Read a whole response body; a cut or stalled body becomes a failure."""
        return await resp.read(None, deadline_s)

    async def probe(self, inst: InstanceConfig, url: str, timeout_s: float,
                    body: bytes | None = None) -> tuple[int, bytes]:
        """GET (or, with a body, POST) a side endpoint of the server: health, props,
        tokenize. Returns (status, first MiB of the body); raises UpstreamFailure when
        unreachable."""
        deadline = time.monotonic() + timeout_s
        resp = await self.client.request("POST" if body is not None else "GET", url, body,
                                         self.headers_for(inst, None), timeout_s, "probe")
        try:
            return resp.status, await resp.read(1 << 20, deadline - time.monotonic(), "probe")
        finally:
            resp.release()

    async def count_tokens(self, inst: InstanceConfig, text: str,
                           timeout_s: float) -> int | None:
        """How many tokens `text` is for this instance's model, by llama.cpp's /tokenize;
        None when it cannot tell."""
        body = orjson.dumps({"content": text, "add_special": False})
        try:
            status, data = await self.probe(inst, inst.root_url + "/tokenize", timeout_s, body)
        except UpstreamFailure:
            return None
        if status != 200:
            return None
        try:
            tokens = orjson.loads(data).get("tokens")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        return len(tokens) if isinstance(tokens, list) else None


def passthrough_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The upstream headers worth relaying on a passed-through or 429 answer: its
    rate-limit headers (see proxy.ratelimits)."""
    return relay_headers(headers)

