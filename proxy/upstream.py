"""Talking to one instance over the process's one aiohttp client session: open a request,
classify its status, read bodies and events within the configured timeouts and limits.

Every wait on aiohttp goes through `proxy.failures.map_exceptions` (or its `failure_from`),
so what leaves this module is our failure vocabulary, never an aiohttp exception.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import aiohttp
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from proxy import anthropic, overflow
from proxy.config import InstanceConfig, TimeoutsConfig, UpstreamConfig
from proxy.errors import error_body
from proxy.failures import (
    ContextTooLong,
    ProcessExited,
    RateLimited,
    UnsupportedByInstance,
    Upstream5xx,
    UpstreamAuth,
    UpstreamFailure,
    UpstreamProtocolError,
    map_exceptions,
)
from proxy.ratelimits import relay_headers, retry_after_s
from proxy.secrets import Redactor
from proxy.sse import DONE_EVENT, EventReader, event_data

#: What the forwarder holds while an answer is read: aiohttp's response (its `status`,
#: `headers`, `release()` and `close()` are all the forwarder uses).
Response = aiohttp.ClientResponse

#: Idle keep-alive connections are dropped after this long (aiohttp's default). Servers
#: may close theirs sooner (llama.cpp's cpp-httplib and uvicorn, under vLLM, after 5 s):
#: aiohttp sees their FIN and does not reuse such a connection. Only a close that crosses
#: a new request is left; it fails at once (no byte back) as PROCESS_EXITED, and the
#: forwarder's same-instance retry, a counted attempt, covers it. A shorter keep-alive
#: would make every sparse request to a cloud instance pay a new TLS handshake.
KEEPALIVE_S = 15.0
#: Response head limits (aiohttp's parser; its defaults, stated): a longer line or more
#: header lines is UPSTREAM_PROTOCOL_ERROR. Real servers send 10 to 40 headers.
MAX_LINE_BYTES = 8190
MAX_FIELD_BYTES = 8190
MAX_HEADERS = 128


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


def make_client(timeouts: TimeoutsConfig) -> aiohttp.ClientSession:
    """The process's one client session (call inside the running loop; close it at exit).

    - Keep-alive pool without a cap on connections (`limit=0`, `limit_per_host=0`): each
      instance's `max_concurrency` is enforced by the forwarder, visibly (it waits
      `queue_wait_s`, then reroutes with INSTANCE_BUSY); a connector cap would queue
      requests inside aiohttp instead, unseen, and make health probes wait behind long
      streams, so that a busy instance looked dead.
    - HTTP_PROXY, HTTPS_PROXY and NO_PROXY apply (see `Upstream.route`), read once per
      instance rather than by `trust_env=True`, which has aiohttp read the environment
      and ~/.netrc in a worker thread on every request (aiohttp 3.14 client.py
      `_request`).
    - Bodies in gzip or deflate are decoded (auto_decompress) though the proxy asks for
      `identity`: a compressed answer reaches the client as the plain bytes it stands for.
    - No redirects are followed (`allow_redirects=False` per request), no cookies kept,
      no User-Agent sent. A POST is never re-sent by aiohttp itself (it retries a dropped
      keep-alive connection for idempotent methods only, aiohttp 3.14 client.py
      `_request`); every POST written upstream is an attempt the forwarder counts.
    - Timeouts: `connect_s` for the TCP (and TLS) connect; the rest are the caller's
      (first byte, idle, body), each on the wait it bounds.
    """
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=KEEPALIVE_S,
                                     ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_connect=timeouts.connect_s,
                                      sock_read=None),
        trust_env=False,  # the environment's proxies: see Upstream.route
        auto_decompress=True,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",),
        max_line_size=MAX_LINE_BYTES, max_field_size=MAX_FIELD_BYTES, max_headers=MAX_HEADERS,
    )


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
#: The key under which a translated chunk carries its Messages API events (see
#: AnthropicEvents); only for requests that came in as Messages API requests.
NATIVE_EVENTS = "anthropic_events"


class AnthropicEvents:
    """Reads a Messages API event stream and yields OpenAI chunk events in its place.

    The rest of the relay sees what any OpenAI-compatible server would send: chunks,
    `[DONE]` at message_stop, an in-band `{"error": ...}` for an error event. With
    `keep` (a request that came in as a Messages API request), each chunk also carries,
    under NATIVE_EVENTS, the Messages events it was made of (and those that made no chunk
    since the last one: pings, block stops, signature deltas), for the Messages front to
    relay as they came.
    """

    __slots__ = ("_events", "_translator", "_queue", "_kept")

    def __init__(self, events: EventReader, translator: anthropic.StreamTranslator,
                 keep: bool = False) -> None:
        self._events = events
        self._translator = translator
        self._queue: list[bytes] = []
        self._kept: list[Any] | None = [] if keep else None

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
            kept = self._kept
            if kept is not None:
                kept.append(data)
                if chunks:
                    chunks[0][NATIVE_EVENTS] = kept[:]
                    kept.clear()
            self._queue.extend(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
            if self._translator.done:
                self._queue.append(DONE_EVENT)
        return self._queue.pop(0)


def _as_sent(native: dict[str, Any], model: str) -> bytes:
    """A client's own Messages API request as sent to an Anthropic instance: as it came,
    with the instance's model."""
    return orjson.dumps({**native, "model": model})


def _event_name(raw: bytes) -> str | None:
    for line in raw.split(b"\n"):
        if line.startswith(b"event:"):
            return line[6:].strip().decode("utf-8", "replace")
    return None


class Route(NamedTuple):
    """How requests to one instance travel: `ssl=`, `proxy=` and `proxy_headers=` of
    aiohttp's request."""

    ssl: ssl.SSLContext | bool
    proxy: URL | None
    proxy_headers: dict[str, str] | None


class Upstream:
    """Opens requests to instances over the shared client session, with the configured
    timeouts, TLS settings and response limits."""

    def __init__(self, client: aiohttp.ClientSession, timeouts: TimeoutsConfig,
                 redactor: Redactor | None = None, default_max_tokens: int = 1024,
                 limits: UpstreamConfig | None = None) -> None:
        self.client = client
        self.timeouts = timeouts
        self.redactor = redactor or Redactor()
        #: The Messages API requires max_tokens; used when the client sent none.
        self.default_max_tokens = default_max_tokens
        self.limits = limits or UpstreamConfig()
        self._headers: dict[str, dict[str, str]] = {}
        self._urls: dict[str, URL] = {}
        self._routes: dict[str, Route] = {}

    def _url(self, url: str) -> URL:
        """The parsed URL (parsed once: yarl's parsing is a cost per request otherwise)."""
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) > 4096:  # bounded: probe and model paths are few
                self._urls.clear()
            parsed = self._urls[url] = URL(url)
        return parsed

    def route(self, inst: InstanceConfig) -> Route:
        """How to reach `inst`, worked out at its first request under this config.

        TLS: its own SSLContext when it has `tls:` settings (passed per request on the
        one session; aiohttp keys pooled connections by it), else True (aiohttp's
        default, verified). Forward proxy: HTTPS_PROXY for an https:// instance,
        HTTP_PROXY for http://, unless NO_PROXY lists its host (the standard library's
        rules, through aiohttp's `get_env_proxy_for_url`: the same reading `trust_env`
        does, including credentials in the proxy URL or ~/.netrc, which go in a
        Proxy-Authorization header).
        """
        route = self._routes.get(inst.id)
        if route is None:
            context = inst.tls.context() if inst.tls is not None else True
            try:
                proxy, auth = get_env_proxy_for_url(URL(inst.base_url))
            except LookupError:
                proxy, auth = None, None
            headers = {"Proxy-Authorization": auth.encode()} if auth is not None else None
            route = self._routes[inst.id] = Route(context, proxy, headers)
        return route

    def headers_for(self, inst: InstanceConfig, client_auth: str | None) -> dict[str, str]:
        if inst.forward_client_auth:
            return instance_headers(inst, client_auth)
        cached = self._headers.get(inst.id)
        if cached is None:
            cached = self._headers[inst.id] = instance_headers(inst, None)
        return cached

    async def open(self, inst: InstanceConfig, path: str, body: bytes,
                   client_auth: str | None = None,
                   native: dict[str, Any] | None = None) -> Response:
        """POST `body` to the instance and wait for the status line and headers. An
        Anthropic instance is sent `native` (the client's own Messages API request) when
        given, else `body` translated.

        Returns a 2xx response with its body unread (the caller releases or closes it).
        Raises PassThrough for a 4xx the client should see unchanged, and an
        UpstreamFailure for refusals, timeouts, resets, 5xx, 429, context overflow, and
        (UpstreamProtocolError) an answer that breaks HTTP, a 101 or a redirect.
        The wait for headers is bounded by `first_byte_s`, connecting included; the
        caller bounds the rest.
        """
        if inst.kind == ANTHROPIC:
            path = "/messages"
            body = (self._to_anthropic(inst, body) if native is None
                    else _as_sent(native, inst.model or orjson.loads(body)["model"]))
        first_byte_s = self.timeouts.first_byte_s
        with map_exceptions("first_byte", first_byte_s):
            route = self.route(inst)
            async with asyncio.timeout(first_byte_s):  # connecting included
                resp = await self.client.post(
                    self._url(inst.api_base + path), data=body,
                    headers=self.headers_for(inst, client_auth), allow_redirects=False,
                    ssl=route.ssl, proxy=route.proxy, proxy_headers=route.proxy_headers)
        status = resp.status
        if 200 <= status < 300:
            return resp
        if status < 400:
            resp.close()
            raise self._not_an_answer(resp)
        if status == 429:
            body_bytes = await self.read_error_body(resp)
            raise RateLimited(retry_after_s(resp.headers), body_bytes,
                              self.relayed(resp.headers))
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
                          self.relayed(resp.headers))

    def relayed(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The upstream's rate-limit headers for the client (see proxy.ratelimits), with
        any configured secret scrubbed from their values: a server may quote the key it
        was sent in them, as in an error body."""
        out = relay_headers(headers)
        if out and self.redactor:
            text = self.redactor.text
            for name, value in out.items():
                out[name] = text(value)
        return out

    def _not_an_answer(self, resp: Response) -> UpstreamProtocolError:
        """A final status that is neither an answer nor an error: an unasked-for protocol
        switch (101) or a redirect (not followed: a model server that redirects is
        misconfigured, and a POST must not turn into a GET)."""
        status = resp.status
        if status == 101:
            return UpstreamProtocolError("HTTP 101: switched protocols unasked")
        where = resp.headers.get("Location")
        return UpstreamProtocolError(
            f"HTTP {status}" + (f" redirect to {self.redactor.text(where)}" if where else "")
            + " (redirects are not followed)")

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
            raise RateLimited(retry_after_s(headers), body, self.relayed(headers))
        if code == "UPSTREAM_5XX":
            raise Upstream5xx(status, body)
        if code == "UPSTREAM_AUTH":
            raise UpstreamAuth(status)
        raise PassThrough(status, error_body(message, "invalid_request_error"),
                          "application/json", self.relayed(headers))

    def translate_body(self, inst: InstanceConfig, body: bytes, native: bool = False) -> bytes:
        """A whole response in OpenAI's chat.completion shape (Messages API translated,
        unless the request was `native`: then it stays the instance's own)."""
        if inst.kind != ANTHROPIC or native:
            return body
        try:
            return orjson.dumps(anthropic.from_messages_response(orjson.loads(body),
                                                                 int(time.time())))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ProcessExited(f"unreadable Messages API response: {exc}") from None

    def events(self, inst: InstanceConfig, resp: Response, include_usage: bool,
               native: bool = False) -> EventReader | AnthropicEvents:
        """The response's server-sent events, as OpenAI chat completion chunks (for a
        `native` request carrying the Messages events: see AnthropicEvents); an event
        over `upstream.max_event_bytes` fails with UpstreamProtocolError."""
        reader = EventReader(resp.content, self.limits.max_event_bytes)
        if inst.kind == ANTHROPIC:
            return AnthropicEvents(reader,
                                   anthropic.StreamTranslator(int(time.time()), include_usage),
                                   native)
        return reader

    async def read_error_body(self, resp: Response, limit: int = 65536) -> bytes:
        """Read (at most `limit` bytes of) an error response's body within `idle_s`, and
        release the connection (aiohttp closes it unless the whole body was read)."""
        try:
            data = await _read(resp.content, limit, self.timeouts.idle_s, "body", False)
        except UpstreamFailure:
            data = b""
        finally:
            resp.release()
        return self.redactor.data(data)  # a server may quote the key it was sent

    async def read_body(self, resp: Response, deadline_s: float) -> bytes:
        """Read a whole response body (decoded) within `deadline_s` seconds.

        Raises UpstreamTimeout("body") when it does not arrive in time, ProcessExited when
        it is cut short, UpstreamProtocolError when it is larger than
        `upstream.max_response_bytes` (checked as it arrives, so never held whole).
        """
        limit = self.limits.max_response_bytes
        length = resp.content_length
        if length is not None and length > limit and "Content-Encoding" not in resp.headers:
            raise _too_large(limit)
        return await _read(resp.content, limit, deadline_s, "body", True)

    async def probe(self, inst: InstanceConfig, url: str, timeout_s: float,
                    body: bytes | None = None) -> tuple[int, bytes]:
        """GET (or, with a body, POST) a side endpoint of the server: health, props,
        tokenize. Returns (status, first MiB of the body) within `timeout_s`; raises
        UpstreamFailure when unreachable (UpstreamTimeout("probe") when too slow)."""
        route = self.route(inst)
        with map_exceptions("probe", timeout_s):
            async with asyncio.timeout(timeout_s):
                resp = await self.client.request(
                    "POST" if body is not None else "GET", self._url(url), data=body,
                    headers=self.headers_for(inst, None), allow_redirects=False,
                    ssl=route.ssl, proxy=route.proxy, proxy_headers=route.proxy_headers)
                try:
                    return resp.status, await _read(resp.content, 1 << 20, None, "probe", False)
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


def _too_large(limit: int) -> UpstreamProtocolError:
    return UpstreamProtocolError(f"response body larger than {limit} bytes "
                                 "(upstream.max_response_bytes)")


async def _read(content: aiohttp.StreamReader, limit: int, timeout_s: float | None,
                phase: str, strict: bool) -> bytes:
    """Up to `limit` bytes of a body, within `timeout_s` (no timer when the whole body has
    already arrived). A body over the limit is cut there, or with `strict` raises
    UpstreamProtocolError."""
    if content.is_eof() and content.exception() is None:
        # The whole body came with the head (the usual small answer): no wait, no timer.
        data = content.read_nowait()
        if len(data) > limit and strict:
            raise _too_large(limit)
        return data[:limit]
    parts: list[bytes] = []
    size = 0
    with map_exceptions(phase, timeout_s):
        async with asyncio.timeout(timeout_s):
            while size <= limit and (chunk := await content.readany()):
                parts.append(chunk)
                size += len(chunk)
    if size > limit:
        if strict:
            raise _too_large(limit)
        return b"".join(parts)[:limit]
    return parts[0] if len(parts) == 1 else b"".join(parts)

