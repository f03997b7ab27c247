"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) in front of
the chat-completions path.

A Messages request is translated into a chat completion request (`to_chat`) and runs
through the same planner, forwarder, continuation, audit and metrics as any chat request,
on any instance kind; the answer comes back as a Message (`MessagesExchange.answer`) or as
the Messages stream events (`MessagesSink`), and every error in Anthropic's shape
`{"type": "error", "error": {"type": ..., "message": ...}}` with the statuses the
`anthropic` SDK maps to its exceptions (see `ERROR_TYPES`). Shapes follow
Anthropic's API reference ("Messages", "Streaming Messages", "Errors") and the `anthropic`
Python SDK's types. The stop reasons and tool choices are
the Anthropic provider's tables (proxy.providers.anthropic_*), shared with the upstream
translation. Requests are translated in proxy.fronts.messages_requests.

Translated: `system` (a string or text blocks), `messages` with text, image (base64 or
URL), `tool_use` and `tool_result` blocks, `tools` (custom tools with an `input_schema`),
`tool_choice` (auto, any, tool, none; `disable_parallel_tool_use`), `max_tokens`,
`stop_sequences`, `temperature`, `top_p`, `metadata.user_id`, `stream`. `thinking` and
`redacted_thinking` blocks in the history are dropped (chat has no place for them), and
`cache_control` and `top_k` are not sent; with `thinking` enabled a server's reasoning
comes back as `thinking` blocks (without a signature: it is not Anthropic's). Refused with a
400: document and file blocks, images inside tool results, Anthropic-defined and server
tools (`bash_...`, `web_search_...`), `mcp_servers`.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.api.errors import ProxyError
from proxy.api.inbound import CHAT, ClientRequest, load_object
from proxy.config import Config
from proxy.engine.chunks import delta_reasoning
from proxy.engine.relay import StreamSink
from proxy.fronts.base import (
    Json,
    TranslatingSink,
    count,
    error_message,
    first_message,
    listed,
    sse,
)
from proxy.fronts.messages_requests import signed_only, to_chat
from proxy.health.instance import InstanceState
from proxy.providers.anthropic_responses import STOP_REASONS
from proxy.providers.base import NATIVE_EVENTS
from proxy.providers.transport import Upstream
from proxy.routing.requirements import CHARS_PER_TOKEN

#: Where the Messages API is served: errors under it take Anthropic's shape.
MESSAGES_PATH = "/v1/messages"

#: HTTP status -> Anthropic error type (Anthropic docs, "Errors"; the `anthropic` SDK raises
#: by status: 400 BadRequestError, 401 AuthenticationError, 403 PermissionDeniedError,
#: 404 NotFoundError, 413 RequestTooLargeError, 429 RateLimitError, >= 500
#: InternalServerError).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """The Anthropic error type for an HTTP status (`api_error` for other 5xx,
    `invalid_request_error` for other 4xx)."""
    return ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def _usage(usage: Any) -> Json:
    """An Anthropic usage object from a chat one: Anthropic's input_tokens leave out the
    tokens read from the cache (the inverse of proxy.providers.anthropic_responses' reading)."""
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return {"input_tokens": max(0, count(usage.get("prompt_tokens")) - cached),
            "output_tokens": count(usage.get("completion_tokens")),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def _tool_input(arguments: Any) -> Any:
    """A tool call's JSON arguments as a tool_use block's input (an object)."""
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except orjson.JSONDecodeError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {"arguments": arguments}


def _message_id(chat_id: Any, request_id: str) -> str:
    if isinstance(chat_id, str) and chat_id.startswith("msg_"):
        return chat_id
    return "msg_" + request_id


class MessagesExchange:
    """One Messages request on its way through the engine and back."""

    def __init__(self, body: Json, request: ClientRequest) -> None:
        self.body = body
        self.request = request
        thinking = body.get("thinking")
        #: The client asked for thinking: a server's reasoning comes back as thinking blocks.
        self.thinking = isinstance(thinking, dict) and thinking.get("type") in ("enabled",
                                                                                 "adaptive")

    def answer(self, status: int, body: bytes) -> tuple[int, bytes]:
        """A chat.completion as a Message; an upstream's error in Anthropic's shape."""
        if status >= 300:
            return status, error_body(status, error_message(body))
        completion = orjson.loads(body)
        if completion.get("type") == "message":
            return status, body  # an Anthropic instance's own answer (request.native)
        message, choice = first_message(completion)
        content: list[Json] = []
        thought = delta_reasoning(message)[0]
        if thought and self.thinking:
            content.append({"type": "thinking", "thinking": thought, "signature": ""})
        text = message.get("content")
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal:
            content.append({"type": "text", "text": refusal})
        for call in listed(message.get("tool_calls")):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                content.append({"type": "tool_use", "id": str(call.get("id") or ""),
                                "name": str(function.get("name") or ""),
                                "input": _tool_input(function.get("arguments"))})
        model = completion.get("model")
        return status, orjson.dumps({
            "id": _message_id(completion.get("id"), self.request.request_id),
            "type": "message", "role": "assistant",
            "model": model if isinstance(model, str) and model else self.request.model,
            "content": content,
            "stop_reason": STOP_REASONS.get(str(choice.get("finish_reason")),
                                                      "end_turn"),
            "stop_sequence": None, "usage": _usage(completion.get("usage")),
        })

    def stream(self, sink: StreamSink) -> StreamSink:
        return MessagesSink(sink, self)


class MessagesSink(TranslatingSink):
    """Chat completion chunks -> the Messages stream events: message_start and a ping,
    then per content block content_block_start, its deltas (text_delta, thinking_delta,
    input_json_delta) and content_block_stop; message_delta (stop reason and usage) and
    message_stop end a whole answer, an `error` event one the proxy could not complete
    (the `anthropic` SDK raises on it)."""

    def __init__(self, sink: StreamSink, exchange: MessagesExchange) -> None:
        super().__init__(sink)
        self.x = exchange
        self.started = False
        self.blocks = 0  # content blocks started
        self.open: int | None = None  # the block being written
        self.open_type: str | None = None
        self.calls: dict[int, int] = {}  # chat tool-call index -> block index
        self.ended = False

    def chunk(self, obj: Json) -> list[bytes]:
        native = obj.get(NATIVE_EVENTS)
        if native is not None:
            return self._relay(native)
        out: list[bytes] = []
        if not self.started:
            self.started = True
            model = obj.get("model")
            out.append(sse("message_start", {"type": "message_start", "message": {
                "id": _message_id(obj.get("id"), self.x.request.request_id),
                "type": "message", "role": "assistant",
                "model": model if isinstance(model, str) and model else self.x.request.model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}))
            out.append(sse("ping", {"type": "ping"}))
        return self.answer(out, obj)

    def usage_of(self, usage: Json) -> Json | None:
        return _usage(usage)

    def deltas(self, out: list[bytes], delta: Json) -> None:
        """A chat delta's thinking, text and tool calls as block deltas."""
        thought = delta_reasoning(delta)[0]
        if thought and self.x.thinking:
            self._delta(out, "thinking", {"type": "thinking_delta", "thinking": thought})
        for key in ("content", "refusal"):
            text = delta.get(key)
            if isinstance(text, str) and text:
                self._delta(out, "text", {"type": "text_delta", "text": text})
        for call in listed(delta.get("tool_calls")):
            if isinstance(call, dict):
                self._call(out, call)

    def _relay(self, events: list[Json]) -> list[bytes]:
        """An Anthropic instance's own events, as they came (thinking blocks and their
        signatures, citations, cache usage...), noting the blocks they open and close so
        that a continuation from another instance carries on in the right block."""
        out = []
        for data in events:
            kind = str(data.get("type"))
            if kind == "message_start":
                self.started = True
            elif kind == "content_block_start":
                block = data.get("content_block")
                self.open = count(data.get("index"))
                self.open_type = str(block.get("type")) if isinstance(block, dict) else None
                self.blocks = self.open + 1
            elif kind == "content_block_stop":
                self.open = self.open_type = None
            elif kind == "message_stop":
                self.ended = True
            out.append(sse(kind, data))
        return out

    def _start(self, out: list[bytes], kind: str, block: Json) -> int:
        self._stop(out)
        index = self.blocks
        self.blocks += 1
        self.open, self.open_type = index, kind
        out.append(sse("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": block}))
        return index

    def _stop(self, out: list[bytes]) -> None:
        if self.open is not None:
            out.append(sse("content_block_stop", {"type": "content_block_stop",
                                                  "index": self.open}))
            self.open = self.open_type = None

    def _delta(self, out: list[bytes], kind: str, delta: Json) -> None:
        if self.open_type != kind:
            self._start(out, kind, {"type": "text", "text": ""} if kind == "text" else
                        {"type": "thinking", "thinking": "", "signature": ""})
        out.append(sse("content_block_delta", {"type": "content_block_delta",
                                               "index": self.open, "delta": delta}))

    def _call(self, out: list[bytes], call: Json) -> None:
        number_ = count(call.get("index"))
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        assert isinstance(function, dict)
        index = self.calls.get(number_)
        if index is None:
            index = self.calls[number_] = self._start(out, "tool_use", {
                "type": "tool_use", "id": str(call.get("id") or ""),
                "name": str(function.get("name") or ""), "input": {}})
        piece = function.get("arguments")
        if isinstance(piece, str) and piece:
            out.append(sse("content_block_delta", {
                "type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": piece}}))

    def done(self) -> list[bytes]:
        if self.ended:
            return []  # the Anthropic instance's own message_stop went out
        out: list[bytes] = []
        if not self.started:  # an answer with no chunk at all: still a whole message
            out.extend(self.chunk({}))
        self._stop(out)
        usage = self.usage or {}
        out.append(sse("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": STOP_REASONS.get(self.finish or "stop",
                                                                "end_turn"),
                      "stop_sequence": None},
            "usage": {"output_tokens": usage.get("output_tokens", 0),
                      **({"input_tokens": usage["input_tokens"],
                          "cache_read_input_tokens": usage["cache_read_input_tokens"]}
                         if usage else {})}}))
        out.append(sse("message_stop", {"type": "message_stop"}))
        return out

    def failed(self, error: Json) -> list[bytes]:
        message = str(error.get("message") or "the answer could not be completed")
        return [sse("error", {"type": "error",
                              "error": {"type": "api_error", "message": message}})]


def error_body(status: int, message: str) -> bytes:
    """`{"type": "error", "error": {"type": ..., "message": ...}}` for an HTTP status."""
    return orjson.dumps({"type": "error", "error": {"type": error_type(status),
                                                    "message": message}})


class MessagesFront:
    """`POST /v1/messages`: the Front for Anthropic's Messages API."""

    def exchange(self, raw: bytes, request_id: str, config: Config) -> MessagesExchange:
        body = load_object(raw)
        chat = to_chat(body)
        stream = chat.get("stream") is True
        request = ClientRequest(request_id=request_id, endpoint=CHAT, body=chat,
                                raw=orjson.dumps(chat), model=chat["model"], stream=stream,
                                include_usage=stream, native=signed_only(body))
        return MessagesExchange(body, request)

    def error_body(self, exc: ProxyError) -> bytes:
        return error_body(exc.status, exc.message)


MESSAGES = MessagesFront()


# --------------------------------------------------------------------------- count_tokens


def count_request(raw: bytes, request_id: str) -> ClientRequest:
    """The chat request a count_tokens body stands for (it has no max_tokens); raises
    BadRequest like /v1/messages."""
    body = load_object(raw)
    chat = to_chat(body, counting=True)
    return ClientRequest(request_id=request_id, endpoint=CHAT, body=chat,
                         raw=orjson.dumps(chat), model=chat["model"], stream=False,
                         native=signed_only(body))


def estimate_input(chat: Json, prompt_tokens: int) -> int:
    """Input tokens estimated as the planner estimates a prompt (characters / 4, images,
    per-message overhead: proxy.routing.requirements), plus the tool definitions' JSON."""
    tools = chat.get("tools")
    return prompt_tokens + (len(orjson.dumps(tools)) // CHARS_PER_TOKEN if tools else 0)


async def count_tokens(upstream: Upstream, candidates: list[InstanceState],
                       request: ClientRequest, estimate: int, timeout_s: float) -> int:
    """Input tokens of a count_tokens request (`count_request`), counted by the first
    routable candidate whose server has a tokenizer to ask (its provider's
    `count_input`: a llama.cpp server through its chat template and `/tokenize`, an
    Anthropic instance through its own count_tokens, sent the client's request); else, or
    when that one cannot say, `estimate`."""
    for inst in candidates:
        provider = inst.provider
        if not provider.counts_input or not inst.routable():
            continue
        counted = await provider.count_input(upstream, inst.config, request.body,
                                             request.native, timeout_s)
        return estimate if counted is None else counted
    return estimate
