"""Talking to one instance: open a request, classify its status, read bodies.

This is the boundary where transport exceptions become our failures (via
`map_exceptions`); nothing above it sees an aiohttp client exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
import orjson

from proxy.config import InstanceConfig, TimeoutsConfig
from proxy.failures import (
    ContextTooLong,
    RateLimited,
    Upstream5xx,
    UpstreamAuth,
    UpstreamFailure,
    map_exceptions,
    parse_retry_after,
)
from proxy.secrets import Redactor
from proxy.sse import EventReader

_PASS_HEADERS = ("retry-after",)


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


def make_session(timeouts: TimeoutsConfig) -> aiohttp.ClientSession:
    """The one pooled client session of the app (keep-alive, no per-host cap)."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60,
                                     ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect_s,
                                      connect=timeouts.connect_s),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
        json_serialize=lambda o: orjson.dumps(o).decode(),
    )


def instance_headers(inst: InstanceConfig, client_auth: str | None) -> dict[str, str]:
    """Headers for a request to `inst`: its own credentials, never the client's unless allowed."""
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if inst.api_key:
        headers["Authorization"] = f"Bearer {inst.api_key}"
    elif inst.forward_client_auth and client_auth:
        headers["Authorization"] = client_auth
    for name, value in inst.headers:
        headers[name] = value
    return headers


class Upstream:
    """Opens requests to instances over the shared session, with the configured timeouts."""

    def __init__(self, session: aiohttp.ClientSession, timeouts: TimeoutsConfig,
                 redactor: Redactor | None = None) -> None:
        self.session = session
        self.timeouts = timeouts
        self.redactor = redactor or Redactor()
        self._headers: dict[str, dict[str, str]] = {}

    def headers_for(self, inst: InstanceConfig, client_auth: str | None) -> dict[str, str]:
        if inst.forward_client_auth:
            return instance_headers(inst, client_auth)
        cached = self._headers.get(inst.id)
        if cached is None:
            cached = self._headers[inst.id] = instance_headers(inst, None)
        return cached

    async def open(self, inst: InstanceConfig, path: str, body: bytes,
                   client_auth: str | None = None) -> aiohttp.ClientResponse:
        """POST `body` to the instance and wait for the status line and headers.

        Returns a 2xx/3xx response with its body unread. Raises PassThrough for a 4xx
        the client should see unchanged, and an UpstreamFailure for refusals, timeouts,
        resets, 5xx, 429 and context overflow.
        The wait for headers is bounded by `first_byte_s`; the caller bounds the rest.
        """
        url = inst.api_base + path
        with map_exceptions("first_byte", self.timeouts.first_byte_s):
            async with asyncio.timeout(self.timeouts.first_byte_s):
                resp = await self.session.post(url, data=body,
                                               headers=self.headers_for(inst, client_auth))
        status = resp.status
        if status < 400:
            return resp
        if status == 429:
            body_bytes = await self.read_error_body(resp)
            raise RateLimited(parse_retry_after(resp.headers.get("Retry-After")), body_bytes)
        if status >= 500:
            raise Upstream5xx(status, await self.read_error_body(resp))
        body_bytes = await self.read_error_body(resp)
        if status in (401, 403):
            raise UpstreamAuth(status)
        if status == 400 and _is_context_overflow(body_bytes):
            raise ContextTooLong("prompt exceeds the instance's context window", body_bytes)
        raise PassThrough(status, body_bytes, resp.headers.get("Content-Type", "application/json"),
                          passthrough_headers(resp.headers))

    async def read_error_body(self, resp: aiohttp.ClientResponse, limit: int = 65536) -> bytes:
        """Read (a bounded part of) an error response's body and release the connection."""
        try:
            with map_exceptions("body", self.timeouts.idle_s):
                async with asyncio.timeout(self.timeouts.idle_s):
                    data = await resp.content.read(limit)
        except Exception:
            data = b""
        resp.release()
        return self.redactor.data(data)  # a server may quote the key it was sent

    async def read_body(self, resp: aiohttp.ClientResponse, deadline_s: float) -> bytes:
        """Read a whole response body; a cut or stalled body becomes a failure."""
        with map_exceptions("body", deadline_s):
            async with asyncio.timeout(deadline_s):
                return await resp.read()


    async def probe(self, inst: InstanceConfig, url: str, timeout_s: float) -> tuple[int, bytes]:
        """GET a health endpoint: (status, body). Raises UpstreamFailure when unreachable."""
        with map_exceptions("probe", timeout_s):
            async with asyncio.timeout(timeout_s):
                async with self.session.get(url, headers=self.headers_for(inst, None)) as resp:
                    return resp.status, await resp.content.read(1 << 20)

    async def count_tokens(self, inst: InstanceConfig, text: str,
                           timeout_s: float) -> int | None:
        """How many tokens `text` is for this instance's model, by llama.cpp's /tokenize;
        None when it cannot tell."""
        body = orjson.dumps({"content": text, "add_special": False})
        try:
            with map_exceptions("probe", timeout_s):
                async with asyncio.timeout(timeout_s):
                    async with self.session.post(inst.root_url + "/tokenize", data=body,
                                                 headers=self.headers_for(inst, None)) as resp:
                        if resp.status != 200:
                            return None
                        data = await resp.read()
        except UpstreamFailure:
            return None
        try:
            tokens = orjson.loads(data).get("tokens")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        return len(tokens) if isinstance(tokens, list) else None

    @staticmethod
    async def next_event(reader: EventReader, timeout_s: float, phase: str) -> bytes | None:
        """The next SSE event within `timeout_s`; a silence or a cut becomes a failure."""
        with map_exceptions(phase, timeout_s):
            async with asyncio.timeout(timeout_s):
                return await reader.next()


def passthrough_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The upstream headers worth relaying on a passed-through response."""
    return {name: headers[name] for name in _PASS_HEADERS if name in headers}


def _is_context_overflow(body: bytes) -> bool:
    if b"context" not in body:
        return False
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return False
    if not isinstance(error, dict):
        return False
    code = str(error.get("code") or "")
    message = str(error.get("message") or "").lower()
    return code == "context_length_exceeded" or "maximum context length" in message \
        or "exceeds the available context size" in message
