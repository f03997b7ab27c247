"""Simulated OpenAI-compatible backend with injectable faults (see proxy.sim.faults).

Used by the tests, the demo and the benchmarks. It listens on a real TCP port,
answers ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` and
``/v1/models`` in the OpenAI wire format (plus llama.cpp's ``/health`` and
``/props``, and Ollama's ``/api/tags``), with text from :mod:`proxy.sim.text` so a
client can check what it received word by word. Faults are set at construction, with
:meth:`Simulator.set_faults`, or over HTTP with ``POST /_sim/faults``
(proxy.sim.server). What it says about itself (models, health, llama.cpp's props and
slots) is in proxy.sim.info; how answers go out on the wire, in proxy.sim.wire.

Listening is done with :class:`aiohttp.web.Server` (aiohttp's low-level
server) on sockets proxy.sim.server binds itself, instead of ``AppRunner`` +
``TCPSite``: ``refuse`` must close and reopen the listener synchronously from
:meth:`Simulator.set_faults` on the same port, and connections must be counted
exactly. Open connections are counted by a ``web.Server`` subclass that
overrides its ``connection_made``/``connection_lost`` hooks, which every
``RequestHandler`` (one per TCP connection) calls; so a hung connection that
never produced a response is still counted, and is dropped from the count the
moment its socket closes.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aiohttp import web

from proxy.sim.faults import Faults, fmt_seconds
from proxy.sim.responses import (
    AZURE_PRELUDE,
    JSON_HEADERS,
    BadRequest,
    Refused,
    answer,
    context_error,
    error,
    error_type,
    include_usage,
    limit_of,
    ratelimit_headers,
    remainder,
    sse,
    thoughts_of,
    usage,
)
from proxy.sim.server import forever
from proxy.sim.text import embedding_vector, message_text, prompt_of_messages
from proxy.sim.wire import WireServer

__all__ = ["Simulator"]


class Simulator(WireServer):
    """An OpenAI-compatible backend on a real TCP port, with injectable faults."""

    def __init__(
        self,
        model: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        words: int = 20,
        chunk_delay: float = 0.0,
        faults: Sequence[str] = (),
        control_port: int | None = None,
        prefill: bool = True,
        slots: int | None = None,
    ) -> None:
        """Configure (but do not start) a simulator serving ``model``.

        Raises ValueError for bad faults or negative ``words``/``chunk_delay``.
        """
        if words < 0:
            raise ValueError(f"words must be >= 0, got {words}")
        if slots is not None and slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if not chunk_delay >= 0:
            raise ValueError(f"chunk_delay must be >= 0, got {chunk_delay}")
        super().__init__(model, host=host, port=port, faults=faults, control_port=control_port)
        self.words = words
        self.chunk_delay = chunk_delay
        self.prefill = prefill
        self.slots = slots  # proxy.sim.info
        self._created = int(time.time())
        self._id_prefix = os.urandom(3).hex()
        self._ids = itertools.count(1)
        routes = self.routes
        for prefix in ("/v1", ""):  # llama.cpp also answers without the /v1 prefix
            routes[prefix + "/chat/completions"] = ("POST", self._chat)
            routes[prefix + "/completions"] = ("POST", self._completions)
            routes[prefix + "/embeddings"] = ("POST", self._embeddings)
        self._info_routes()

    # ------------------------------------------------------------------ model endpoints

    async def _model_request(
        self,
        request: web.BaseRequest,
        build: Callable[[web.BaseRequest, dict[str, Any], Faults, str], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        self.stats.requests += 1  # model requests only: health probes don't count
        self.stats.last_headers = {str(k): v for k, v in request.headers.items()}
        body = await request.read()
        faults = self._take_faults()
        self.stats.inflight += 1
        try:
            if faults.before_headers:
                early = await self._early_faults(faults, request)
                if early is not None:
                    return early
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise BadRequest(f"We could not parse the JSON body of your request: {exc}") from None
            if not isinstance(data, dict):
                raise BadRequest("The request body must be a JSON object.")
            asked = data.get("model")
            self.stats.last_model = asked if isinstance(asked, str) else None
            self.stats.last_body = data
            if faults.strict_models and asked not in self._listed():
                # Ollama's OpenAI layer (openai.go): 404 with this message for a model it
                # has not pulled; vLLM and LM Studio also answer 404.
                raise Refused(404, {"error": {
                    "message": f'model "{asked}" not found, try pulling it first',
                    "type": "api_error", "param": None, "code": None}})
            return await build(request, data, faults, self._answering(faults, data))
        except BadRequest as exc:
            return error(400, exc.message, "invalid_request_error", param=exc.param, code=exc.code)
        except Refused as exc:
            return web.Response(status=exc.status, body=orjson.dumps(exc.body), headers=JSON_HEADERS)
        finally:
            self.stats.inflight -= 1

    async def _early_faults(self, faults: Faults,
                            request: web.BaseRequest) -> web.StreamResponse | None:
        if faults.hang:
            await forever()
        if faults.leak_auth:
            sent = request.headers.get("Authorization", "(none)")
            return error(faults.status or 401, f"Incorrect API key provided: {sent}",
                          "invalid_request_error", code="invalid_api_key")
        if faults.loading:
            return error(503, "Loading model", "unavailable_error")
        if faults.slow_first_byte > 0:
            await asyncio.sleep(faults.slow_first_byte)
        if faults.rate_limit is not None:
            return error(
                429,
                f"Rate limit reached (simulated). Please try again in {faults.rate_limit}s.",
                "rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": faults.rate_limit,
                         "retry-after-ms": fmt_seconds(float(faults.rate_limit) * 1000),
                         **ratelimit_headers(0, f"{faults.rate_limit}s")},
            )
        if faults.status is not None:
            return error(faults.status, f"simulated HTTP {faults.status} failure",
                          error_type(faults.status))
        return None

    def _answering(self, faults: Faults, data: dict[str, Any]) -> str:
        """The model an answer names: with ``models``, the one asked for (echoed)."""
        if faults.model:
            return faults.model
        if faults.models:
            asked = data.get("model")
            return asked if isinstance(asked, str) and asked else faults.models[0]
        return self.model

    def _check_context(self, faults: Faults, tokens: int, param: str) -> None:
        if faults.context is not None and tokens > faults.context:
            raise Refused(*context_error(faults.context_style, faults.context, tokens, param))

    def _plan(self, model: str, prompt: str, prefix: str | None,
              limit: int | None) -> tuple[Sequence[str], str]:
        """Pieces to send and finish_reason."""
        ans = answer(model, prompt, self.words)
        pieces: Sequence[str] = ans.pieces
        if prefix:
            if ans.text.startswith(prefix):
                pieces = remainder(ans, len(prefix))
            else:
                # Not our answer's beginning: continue "something else", visibly different.
                pieces = answer(model, f"{prompt}\n{prefix}", self.words).pieces
        if limit is not None and limit < len(pieces):
            return pieces[:limit], "length"
        return pieces, "stop"

    def _new_id(self, kind: str) -> str:
        return f"{kind}-sim{self._id_prefix}{next(self._ids):x}"

    async def _chat(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._model_request(request, self._build_chat)

    async def _build_chat(
        self, request: web.BaseRequest, data: dict[str, Any], faults: Faults, model: str
    ) -> web.StreamResponse:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array", "messages")
        limit = limit_of(data)
        prefix: str | None = None
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
            if not self.prefill:
                raise BadRequest(
                    "assistant prefill is not supported: the last message must not have role 'assistant'",
                    "messages",
                )
            prefix = message_text(last.get("content"))
        prompt = prompt_of_messages(messages)
        prompt_tokens = len(prompt.split()) + (len(prefix.split()) if prefix else 0)
        self._check_context(faults, prompt_tokens, "messages")
        pieces, finish = self._plan(model, prompt, prefix, limit)
        if prefix and faults.echo_prefill:
            # The prefill comes back first, in 7-character pieces (as split as a tokenizer's).
            pieces = [prefix[i:i + 7] for i in range(0, len(prefix), 7)] + list(pieces)
        cid, created = self._new_id("chatcmpl"), int(time.time())

        if data.get("stream") is not True:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces)}
            if faults.tool_call:  # the same call as streamed below, whole
                message = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_sim", "type": "function", "function": {
                        "name": "lookup", "arguments": '{"q": "' + "".join(pieces) + '"}'}}]}
                finish = "tool_calls"
            body = orjson.dumps({
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": usage(prompt_tokens, len(pieces)),
            })
            return await self._send_json(request, faults, body)

        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        head = b"data: " + orjson.dumps(base)[:-1] + b',"choices":[{"index":0,"delta":{"content":'
        tail = b'},"finish_reason":null}]}\n\n'
        first = sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]})
        firsts = [AZURE_PRELUDE, first] if faults.azure_prelude else [first]
        if faults.tool_call:
            # The words travel as a tool call's JSON arguments, split across chunks.
            firsts.append(sse({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": "call_sim", "type": "function",
                 "function": {"name": "lookup", "arguments": ""}}]}, "finish_reason": None}]}))
            head = (b"data: " + orjson.dumps(base)[:-1]
                    + b',"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":'
                      b'{"arguments":')
            tail = b'}}]},"finish_reason":null}]}\n\n'
            pieces = ['{"q": "', *pieces, '"}']
            finish = "tool_calls"
        if faults.refusal:  # as OpenAI streams a refusal: `delta.refusal`, no content
            head = b"data: " + orjson.dumps(base)[:-1] + b',"choices":[{"index":0,"delta":{"refusal":'
        thoughts = thoughts_of(faults, base, model, prompt)
        finish_ev = sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        usage_ev = (sse({**base, "choices": [],
                          "usage": usage(prompt_tokens, len(thoughts) + len(pieces))})
                    if include_usage(data) else None)
        return await self._stream(request, faults, firsts, head, tail, pieces, finish_ev, usage_ev,
                                  thoughts)

    async def _completions(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._model_request(request, self._build_completion)

    async def _build_completion(
        self, request: web.BaseRequest, data: dict[str, Any], faults: Faults, model: str
    ) -> web.StreamResponse:
        prompt = data.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string or a non-empty array of strings", "prompt")
        limit = limit_of(data)
        prompt_tokens = len(prompt.split())
        self._check_context(faults, prompt_tokens, "prompt")
        pieces, finish = self._plan(model, prompt, None, limit)
        cid, created = self._new_id("cmpl"), int(time.time())

        if data.get("stream") is not True:
            body = orjson.dumps({
                "id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": finish}],
                "usage": usage(prompt_tokens, len(pieces)),
            })
            return await self._send_json(request, faults, body)

        base = {"id": cid, "object": "text_completion", "created": created, "model": model}
        head = b"data: " + orjson.dumps(base)[:-1] + b',"choices":[{"text":'
        tail = b',"index":0,"logprobs":null,"finish_reason":null}]}\n\n'
        finish_ev = sse({**base, "choices": [{"text": "", "index": 0, "logprobs": None,
                                               "finish_reason": finish}]})
        usage_ev = (sse({**base, "choices": [], "usage": usage(prompt_tokens, len(pieces))})
                    if include_usage(data) else None)
        prelude = [AZURE_PRELUDE] if faults.azure_prelude else []
        return await self._stream(request, faults, prelude, head, tail, pieces, finish_ev, usage_ev)

    async def _embeddings(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._model_request(request, self._build_embeddings)

    async def _build_embeddings(
        self, request: web.BaseRequest, data: dict[str, Any], faults: Faults, model: str
    ) -> web.StreamResponse:
        inp = data.get("input")
        texts = [inp] if isinstance(inp, str) else inp
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("'input' must be a string or a non-empty array of strings", "input")
        tokens = sum(len(t.split()) for t in texts)
        self._check_context(faults, max(len(t.split()) for t in texts), "input")
        as_b64 = data.get("encoding_format") == "base64"  # the openai SDK asks for base64 by default
        items = []
        for i, text in enumerate(texts):
            vec = embedding_vector(text)
            emb: Any = base64.b64encode(struct.pack("<8f", *vec)).decode() if as_b64 else vec
            items.append({"object": "embedding", "index": i, "embedding": emb})
        body = orjson.dumps({"object": "list", "data": items, "model": model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        return await self._send_json(request, faults, body)
