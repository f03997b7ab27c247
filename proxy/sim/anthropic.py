"""A minimal simulated Anthropic Messages API backend on a real port.

It answers the same deterministic words as the OpenAI-style simulator
(:mod:`proxy.sim.simulator`) for the same conversation and model, so tests of an
OpenAI -> Anthropic failover can check the exact text a client received.

Endpoints: ``GET /v1/models``, ``POST /v1/messages`` (plain and streamed) and
``POST /v1/messages/count_tokens``.

Rate limits as Anthropic reports them (Anthropic docs, "Rate limits"): with ``status=429``
the answer carries ``retry-after`` (``retry_after``; None leaves it out) and
``anthropic-ratelimit-requests-*`` headers saying the limit is exhausted until
``retry_after`` seconds from now (20 without one), the reset as an RFC 3339 time. With
``ratelimit_headers=True`` every other answer carries them too.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from proxy.sim.text import answer_words, message_text, stream_pieces

__all__ = ["AnthropicSimulator", "anthropic_prompt"]

_TOOL_ID = "toolu_sim1"
_TOOL_INPUT: dict[str, Any] = {"city": "Paris"}


def anthropic_prompt(system: Any, messages: Sequence[Any]) -> str:
    """Return the prompt key of a Messages request.

    Same key as :func:`proxy.sim.text.prompt_of_messages` gives the equivalent
    OpenAI conversation (system message first): the system text, then every
    message's text, except a trailing assistant message (a prefill).
    """
    msgs: Sequence[Any] = messages
    if messages and isinstance(messages[-1], Mapping) and messages[-1].get("role") == "assistant":
        msgs = messages[:-1]
    parts: list[str] = []
    if system is not None:
        parts.append(message_text(system))
    parts.extend(message_text(m.get("content")) for m in msgs if isinstance(m, Mapping))
    return "\n".join(parts)


def _error_type(status: int) -> str:
    if status == 529:
        return "overloaded_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "api_error"
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
    }.get(status, "invalid_request_error")


def _error(status: int, message: str, etype: str | None = None,
           headers: Mapping[str, str] | None = None) -> web.Response:
    body = {"type": "error", "error": {"type": etype or _error_type(status), "message": message}}
    return web.json_response(body, status=status, headers=dict(headers or {}))


def _ratelimit_headers(remaining: int, reset_in_s: float) -> dict[str, str]:
    reset = (datetime.now(UTC) + timedelta(seconds=reset_in_s)).isoformat(
        timespec="seconds").replace("+00:00", "Z")
    return {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": str(remaining),
        "anthropic-ratelimit-requests-reset": reset,
    }


def _sse(event: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _tool_result_text(content: Any) -> str | None:
    """Text of the first tool_result block in a user message's ``content``, else None."""
    if not isinstance(content, list):
        return None
    for block in content:
        if isinstance(block, Mapping) and block.get("type") == "tool_result":
            return message_text(block.get("content"))
    return None


def _malformed(data: dict[str, Any]) -> web.Response | None:
    """A 400 for a Messages request missing what the API requires, else None."""
    max_tokens = data.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return _error(400, "max_tokens: field required (a positive integer)")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") for m in messages):
        return _error(400, "messages: a non-empty list of {role, content} is required")
    system = data.get("system")
    if system is not None and not isinstance(system, (str, list)):
        return _error(400, "system: must be a string or a list of text blocks")
    tools = data.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools)):
        return _error(400, "tools: must be a list of tools with a name")
    return None


def _remainder(pieces: Sequence[str], k: int) -> list[str]:
    """Pieces of ``"".join(pieces)[k:]``; the first may be the tail of a word."""
    out: list[str] = []
    pos = 0
    for p in pieces:
        end = pos + len(p)
        if end > k:
            out.append(p[max(k - pos, 0):])
        pos = end
    return [p for p in out if p]


class AnthropicSimulator:
    """A simulated Anthropic backend serving one model on 127.0.0.1."""

    def __init__(self, model: str, *, words: int = 20, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, status: int | None = None,
                 retry_after: str | None = "1", ratelimit_headers: bool = False) -> None:
        self.model = model
        self.retry_after = retry_after
        self.ratelimit_headers = ratelimit_headers
        self.words = words
        self.host = host
        self.api_key = api_key
        self.status = status
        self.requests = 0
        self.last_body: dict[str, Any] | None = None
        self.last_count_body: dict[str, Any] | None = None
        self.last_headers: dict[str, str] = {}
        self._port = port
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count(1)

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self._port}"

    async def start(self) -> None:
        app = web.Application()
        app.on_response_prepare.append(self._add_ratelimit_headers)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self._port = int(sockets[0].getsockname()[1])
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ handlers

    async def _add_ratelimit_headers(self, request: web.Request,
                                     response: web.StreamResponse) -> None:
        if self.ratelimit_headers and "anthropic-ratelimit-requests-limit" not in response.headers:
            response.headers.update(_ratelimit_headers(max(0, 50 - self.requests), 60.0))

    def _auth_error(self, request: web.Request) -> web.Response | None:
        if self.api_key is not None and request.headers.get("x-api-key") != self.api_key:
            return _error(401, "invalid x-api-key", "authentication_error")
        return None

    async def _models(self, request: web.Request) -> web.Response:
        err = self._auth_error(request)
        if err is not None:
            return err
        m = self.model
        return web.json_response({
            "data": [{"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}],
            "has_more": False,
            "first_id": m,
            "last_id": m,
        })

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.last_headers = {k.lower(): v for k, v in request.headers.items()}
        raw = await request.read()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        self.last_body = data if isinstance(data, dict) else None
        refused = self._refusal(request, data)
        if refused is not None:
            return refused
        assert isinstance(data, dict)
        max_tokens: int = data["max_tokens"]
        messages: list[dict[str, Any]] = data["messages"]
        tools = data.get("tools")
        prompt = anthropic_prompt(data.get("system"), messages)
        input_tokens = len(prompt.split())
        last = messages[-1]
        msg_id = f"msg_sim{next(self._ids):06x}"
        stream = data.get("stream") is True
        tool_text = _tool_result_text(last.get("content")) if last.get("role") == "user" else None
        if tools and tool_text is None and last.get("role") == "user" \
                and "weather" in message_text(last.get("content")).lower().split():
            return await self._tool_use(request, msg_id, tools[0]["name"], input_tokens, stream)
        if tool_text is not None:
            pieces: list[str] = stream_pieces(("The tool said: " + tool_text).split(" "))
            stop_reason = "end_turn" if len(pieces) <= max_tokens else "max_tokens"
            pieces = pieces[:max_tokens]
        else:
            pieces, stop_reason = self._plan(prompt, last, max_tokens)
        if stream:
            return await self._stream_text(request, msg_id, pieces, stop_reason, input_tokens)
        return web.json_response({
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": "".join(pieces)}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": len(pieces)},
        })

    def _refusal(self, request: web.Request, data: Any) -> web.Response | None:
        """The error answer for a request it refuses (credentials, the `status` fault, a
        malformed body), as the Messages API words it; None to answer it."""
        err = self._auth_error(request)
        if err is not None:
            return err
        if not request.headers.get("anthropic-version"):
            return _error(400, "anthropic-version: header is required", "invalid_request_error")
        if self.status is not None:
            headers = None
            if self.status == 429:
                reset = float(self.retry_after) if self.retry_after is not None else 20.0
                headers = _ratelimit_headers(0, reset)
                if self.retry_after is not None:
                    headers["retry-after"] = self.retry_after
            return _error(self.status, f"simulated HTTP {self.status} failure", headers=headers)
        if not isinstance(data, dict):
            return _error(400, "request body must be a JSON object")
        return _malformed(data)

    async def _count_tokens(self, request: web.Request) -> web.Response:
        """Input tokens: the words of the prompt key (as `usage.input_tokens` counts)."""
        err = self._auth_error(request)
        if err is not None:
            return err
        data = await request.json()
        self.last_count_body = data
        return web.json_response({"input_tokens": len(anthropic_prompt(
            data.get("system"), data.get("messages") or []).split())})

    def _plan(self, prompt: str, last: Mapping[str, Any], max_tokens: int) -> tuple[list[str], str]:
        """Pieces to send and the stop_reason, honouring a prefill and max_tokens."""
        pieces = stream_pieces(answer_words(self.model, prompt, self.words))
        if last.get("role") == "assistant":
            prefix = message_text(last.get("content"))
            if prefix:
                if "".join(pieces).startswith(prefix):
                    pieces = _remainder(pieces, len(prefix))
                else:
                    # Not our answer's beginning: continue "something else", visibly different.
                    pieces = stream_pieces(answer_words(self.model, f"{prompt}\n{prefix}", self.words))
        if max_tokens < len(pieces):
            return pieces[:max_tokens], "max_tokens"
        return pieces, "end_turn"

    def _message_start(self, msg_id: str, input_tokens: int) -> bytes:
        return _sse("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 0},
        }})

    @staticmethod
    def _ending(stop_reason: str, output_tokens: int) -> list[bytes]:
        return [
            _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _sse("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                   "usage": {"output_tokens": output_tokens}}),
            _sse("message_stop", {"type": "message_stop"}),
        ]

    @staticmethod
    async def _send(request: web.Request, events: Sequence[bytes]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for ev in events:
            await resp.write(ev)
        await resp.write_eof()
        return resp

    async def _stream_text(self, request: web.Request, msg_id: str, pieces: Sequence[str],
                           stop_reason: str, input_tokens: int) -> web.StreamResponse:
        events = [
            self._message_start(msg_id, input_tokens),
            _sse("ping", {"type": "ping"}),
            _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}}),
            *(_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": p}})
              for p in pieces),
            *self._ending(stop_reason, len(pieces)),
        ]
        return await self._send(request, events)

    async def _tool_use(self, request: web.Request, msg_id: str, name: str, input_tokens: int,
                        stream: bool) -> web.StreamResponse:
        output_tokens = 2
        if not stream:
            return web.json_response({
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [{"type": "tool_use", "id": _TOOL_ID, "name": name, "input": dict(_TOOL_INPUT)}],
                "stop_reason": "tool_use",
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
            })
        js = json.dumps(_TOOL_INPUT)
        half = len(js) // 2
        events = [
            self._message_start(msg_id, input_tokens),
            _sse("ping", {"type": "ping"}),
            _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": _TOOL_ID, "name": name, "input": {}}}),
            *(_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "input_json_delta", "partial_json": part}})
              for part in (js[:half], js[half:])),
            *self._ending("tool_use", output_tokens),
        ]
        return await self._send(request, events)
