"""The upstream transport: talking to one instance over the process's one aiohttp client
session. It sends what the instance's provider builds, hands an error answer to the
provider to classify, and reads bodies and events within the configured timeouts and
limits.

Every wait on aiohttp goes through `proxy.failures.map_exceptions` (or its `failure_from`),
so what leaves this module is our failure vocabulary, never an aiohttp exception.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from multidict import CIMultiDict
from yarl import URL

from proxy.config import InstanceConfig, TimeoutsConfig, UpstreamConfig
from proxy.failures import (
    UpstreamFailure,
    UpstreamProtocolError,
    map_exceptions,
)
from proxy.providers.base import Provider
from proxy.providers.kinds import provider_for
from proxy.providers.pools import SizedPools
from proxy.providers.ratelimits import relay_headers
from proxy.providers.sse import EventReader, EventSource
from proxy.secrets import Redactor

if TYPE_CHECKING:
    from proxy.tracing import Tracing

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


def make_client(timeouts: TimeoutsConfig) -> aiohttp.ClientSession:
    """The process's one client session (call inside the running loop; close it at exit).

    - Keep-alive pool without a cap on connections (`limit=0`, `limit_per_host=0`): each
      instance's `max_concurrency` is enforced by the forwarder, visibly (it waits
      `queue_wait_s`, then reroutes with INSTANCE_BUSY); a connector cap would queue
      requests inside aiohttp instead, unseen, and make health probes wait behind long
      streams, so that a busy instance looked dead. (A server that answers HTTP on a
      few threads, llama.cpp's, gets a pool of its own: proxy.providers.pools.)
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
    return client_session(timeouts, aiohttp.TCPConnector(
        limit=0, limit_per_host=0, keepalive_timeout=KEEPALIVE_S, ttl_dns_cache=300))


def client_session(timeouts: TimeoutsConfig,
                   connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
    """A client session with the settings `make_client` describes, over `connector`."""
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
                 limits: UpstreamConfig | None = None, pools: SizedPools | None = None) -> None:
        self.client = client
        #: Connections to servers with few HTTP threads (kept across config reloads).
        self.pools = pools or SizedPools(lambda connector: client_session(timeouts, connector))
        self.timeouts = timeouts
        self.redactor = redactor or Redactor()
        #: The Messages API requires max_tokens; used when the client sent none.
        self.default_max_tokens = default_max_tokens
        self.limits = limits or UpstreamConfig()
        self._headers: dict[str, CIMultiDict[str]] = {}
        self._urls: dict[str, URL] = {}
        self._routes: dict[str, Route] = {}
        #: OpenTelemetry traces (proxy.tracing), set by the app when on: requests then
        #: carry the current attempt span's `traceparent`.
        self.tracing: Tracing | None = None

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

    def headers_for(self, inst: InstanceConfig, provider: Provider,
                    client_auth: str | None) -> Mapping[str, str]:
        """The instance's request headers (worked out once, unless the client's
        credentials are forwarded). Kept as the CIMultiDict aiohttp would otherwise build
        from a dict on every request (aiohttp 3.14 client.py `_prepare_headers`)."""
        if inst.forward_client_auth:
            return provider.headers(inst, client_auth)
        cached = self._headers.get(inst.id)
        if cached is None:
            cached = self._headers[inst.id] = CIMultiDict(provider.headers(inst, None))
        return cached

    async def open(self, inst: InstanceConfig, provider: Provider, endpoint: str,
                   body: bytes, client_auth: str | None = None,
                   native: dict[str, Any] | None = None) -> Response:
        """Send the client's request (to `endpoint`, its body naming the instance's model)
        as the provider builds it, and wait for the status line and headers. `native` is
        the client's request in a provider's own protocol (see ClientRequest.native): a
        provider that speaks it sends it as it came.

        Returns a 2xx response with its body unread (the caller releases or closes it).
        Raises what the provider makes of an error answer (an UpstreamFailure, or
        PassThrough for a 4xx the client should see unchanged), UnsupportedRequest for a
        request its protocol cannot carry (nothing sent), and an UpstreamFailure for
        refusals, timeouts, resets and (UpstreamProtocolError) an answer that breaks
        HTTP, a 101 or a redirect. The wait for headers is bounded by `first_byte_s`,
        connecting included; the caller bounds the rest.
        """
        outgoing = provider.request(inst, endpoint, body, self.default_max_tokens, native)
        first_byte_s = self.timeouts.first_byte_s
        with map_exceptions("first_byte", first_byte_s):
            route = self.route(inst)
            headers = self.headers_for(inst, provider, client_auth)
            if self.tracing is not None:
                headers = self.tracing.inject(headers)
            client = self.pools.session(inst.id) if provider.sized_pool else self.client
            with Deadline(first_byte_s):  # connecting included
                resp = await client.post(
                    self._url(inst.api_base + outgoing.path), data=outgoing.body,
                    headers=headers,
                    allow_redirects=False, ssl=route.ssl, proxy=route.proxy,
                    proxy_headers=route.proxy_headers)
        status = resp.status
        if 200 <= status < 300:
            return resp
        if status < 400:
            resp.close()
            raise self._not_an_answer(resp)
        error = provider.error_for(status, await self.read_error_body(resp), resp.headers)
        if error.headers and self.redactor:  # a server may quote the key it was sent in
            error.headers = self.scrubbed(error.headers)  # them, as in an error body
        raise error

    def relayed(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The upstream's rate-limit headers of an answer, for the client (see
        proxy.providers.ratelimits), with any configured secret scrubbed from them."""
        out = relay_headers(headers)
        return self.scrubbed(out) if out and self.redactor else out

    def scrubbed(self, headers: Mapping[str, str]) -> dict[str, str]:
        """Relayed headers with any configured secret scrubbed from their values."""
        if not self.redactor:
            return dict(headers)
        text = self.redactor.text
        return {name: text(value) for name, value in headers.items()}

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

    def events(self, provider: Provider, resp: Response, include_usage: bool,
               native: bool = False) -> EventSource:
        """The response's server-sent events, as OpenAI chat completion chunks (for a
        `native` request, carrying the provider's own events: see Provider.events); an
        event over `upstream.max_event_bytes` fails with UpstreamProtocolError."""
        return provider.events(EventReader(resp.content, self.limits.max_event_bytes),
                               include_usage, native)

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

    def arrived(self, resp: Response) -> bytes | None:
        """The whole body (decoded) when it has already arrived, as a small answer comes
        with its head; else None: `read_body` waits for it. Raises UpstreamProtocolError
        when it is larger than `upstream.max_response_bytes`."""
        return _arrived(resp.content, self.limits.max_response_bytes, True)

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

    async def get(self, inst: InstanceConfig, url: str, timeout_s: float,
                  body: bytes | None = None) -> tuple[int, bytes]:
        """GET (or, with a body, POST) a side endpoint of the server: model listings,
        health, props, tokenize. Returns (status, first MiB of the body) within
        `timeout_s`; raises UpstreamFailure when unreachable (UpstreamTimeout("probe")
        when too slow). To a server with few HTTP threads (`Provider.sized_pool`) the
        connection is closed after the answer: an idle one would hold one of its threads."""
        route = self.route(inst)
        provider = provider_for(inst)
        headers = self.headers_for(inst, provider, None)
        if provider.sized_pool:
            headers = {**headers, "Connection": "close"}
        with map_exceptions("probe", timeout_s):
            async with asyncio.timeout(timeout_s):
                resp = await self.client.request(
                    "POST" if body is not None else "GET", self._url(url), data=body,
                    headers=headers,
                    allow_redirects=False,
                    ssl=route.ssl, proxy=route.proxy, proxy_headers=route.proxy_headers)
                try:
                    return resp.status, await _read(resp.content, 1 << 20, None, "probe", False)
                finally:
                    resp.release()


class Deadline:
    """``with Deadline(seconds):`` around one await of the current task: when the time
    is up the task is cancelled, and the cancellation leaves the block as TimeoutError.

    What ``async with asyncio.timeout(seconds)`` does for a wait that is never
    rescheduled, with one timer handle and no more: asyncio's Timeout (Python 3.11,
    asyncio/timeouts.py) goes through five Python calls and a state machine to enter and
    leave, on the way to every upstream answer. As with asyncio.timeout, a cancellation
    that did not come from the deadline passes through unchanged.
    """

    __slots__ = ("_task", "_handle", "_fired")

    def __init__(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)  # (given the loop, it does not look it up again)
        assert task is not None, "Deadline is used inside a task"
        self._task = task
        self._fired = False
        self._handle = loop.call_later(seconds, self._fire)

    def _fire(self) -> None:
        self._fired = True
        self._task.cancel()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        self._handle.cancel()
        # Our cancellation, withdrawn (so that the task is not left cancelling), is a
        # timeout; anyone else's is still pending and goes on.
        if self._fired and self._task.uncancel() == 0 and kind is asyncio.CancelledError:
            raise TimeoutError from exc


def _too_large(limit: int) -> UpstreamProtocolError:
    return UpstreamProtocolError(f"response body larger than {limit} bytes "
                                 "(upstream.max_response_bytes)")


def _arrived(content: aiohttp.StreamReader, limit: int, strict: bool) -> bytes | None:
    """Up to `limit` bytes of a body that has already arrived whole (the usual small answer
    comes with its head), taken without a wait; None when it has not. A body over the
    limit is cut there, or with `strict` raises UpstreamProtocolError."""
    if not content.is_eof() or content.exception() is not None:
        return None
    data = content.read_nowait()
    if len(data) > limit:
        if strict:
            raise _too_large(limit)
        return data[:limit]
    return data


async def _read(content: aiohttp.StreamReader, limit: int, timeout_s: float | None,
                phase: str, strict: bool) -> bytes:
    """Up to `limit` bytes of a body, within `timeout_s` (no timer when the whole body has
    already arrived: `_arrived`). A body over the limit is cut there, or with `strict`
    raises UpstreamProtocolError."""
    data = _arrived(content, limit, strict)
    if data is not None:
        return data
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
