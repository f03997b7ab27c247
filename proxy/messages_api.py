"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) in front of
the chat-completions path.

A Messages request is translated into a chat completion request (`to_chat`) and runs
through the same planner, forwarder, continuation, audit and metrics as any chat request,
on any instance kind; the answer comes back as a Message (`MessagesExchange.answer`) or as
the Messages stream events (`MessagesSink`), and every error in Anthropic's shape
`{"type": "error", "error": {"type": ..., "message": ...}}` with the statuses the
`anthropic` SDK maps to its exceptions (see `proxy.anthropic.ERROR_TYPES`). Shapes follow
Anthropic's API reference ("Messages", "Streaming Messages", "Errors") and the `anthropic`
Python SDK's types. The mapping tables (stop reasons, tool choices, error types) are
`proxy.anthropic`'s, shared with the Anthropic upstream translation.

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

from collections.abc import Mapping
from typing import Any

import orjson

from proxy import anthropic
from proxy.config import Config
from proxy.errors import BadRequest, ProxyError
from proxy.failures import UpstreamFailure
from proxy.forwarding import StreamSink
from proxy.fronts import (
    Json,
    TranslatingSink,
    count,
    error_message,
    listed,
    number,
    positive_int,
    sse,
)
from proxy.inbound import CHAT, MAX_MESSAGES, ClientRequest, load_object
from proxy.instances import InstanceState
from proxy.requirements import CHARS_PER_TOKEN
from proxy.sse import delta_reasoning
from proxy.upstream import NATIVE_EVENTS, Upstream

#: Where the Messages API is served: errors under it take Anthropic's shape.
MESSAGES_PATH = "/v1/messages"
_USER_BLOCKS = ("text", "image", "tool_result")
_ASSISTANT_BLOCKS = ("text", "tool_use", "thinking", "redacted_thinking")


def _bad(message: str, param: str | None = None) -> BadRequest:
    return BadRequest(message, param=param)


# --------------------------------------------------------------------------- requests


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{where}: Input should be a valid string", where)
    return value


def _blocks(content: Any, where: str) -> list[Json]:
    """A message's content as a list of blocks (a string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _bad(f"{where}: Input should be a valid string or list of content blocks", where)
    for n, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _bad(f"{where}.{n}: Input should be a content block with a type",
                       f"{where}.{n}")
    return content


def _image(block: Json, where: str) -> Json:
    """An OpenAI image_url part from an Anthropic image block (base64 or URL source)."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        assert isinstance(source, dict)
        media = _text(source.get("media_type"), where + ".source.media_type")
        data = _text(source.get("data"), where + ".source.data")
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if kind == "url":
        assert isinstance(source, dict)
        return {"type": "image_url", "image_url": {"url": _text(source.get("url"),
                                                                where + ".source.url")}}
    raise _bad(f"{where}.source: only base64 and url image sources are supported here",
               where + ".source")


def _tool_result_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for n, block in enumerate(_blocks(content, where)):
        if block["type"] != "text":
            raise _bad(f"{where}.{n}: only text is supported inside a tool_result here "
                       f"(not {block['type']})", f"{where}.{n}")
        texts.append(_text(block.get("text"), f"{where}.{n}.text"))
    return "".join(texts)


def _user_turn(content: Any, where: str) -> list[Json]:
    """Chat messages for one user turn: its tool results (as tool messages), then its text
    and images (as one user message)."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out: list[Json] = []
    parts: list[Json] = []
    for n, block in enumerate(_blocks(content, where)):
        at = f"{where}.{n}"
        kind = block["type"]
        if kind == "text":
            parts.append({"type": "text", "text": _text(block.get("text"), at + ".text")})
        elif kind == "image":
            parts.append(_image(block, at))
        elif kind == "tool_result":
            out.append({"role": "tool",
                        "tool_call_id": _text(block.get("tool_use_id"), at + ".tool_use_id"),
                        "content": _tool_result_text(block.get("content"), at + ".content")})
        else:
            raise _bad(f"{at}: content blocks of type {kind!r} are not supported here "
                       f"({', '.join(_USER_BLOCKS)} are)", at + ".type")
    if parts:
        text_only = all(p["type"] == "text" for p in parts)
        out.append({"role": "user",
                    "content": "".join(p["text"] for p in parts) if text_only else parts})
    return out


def _assistant_turn(content: Any, where: str) -> Json:
    """The chat assistant message for one assistant turn (text, then its tool calls)."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[Json] = []
    for n, block in enumerate(_blocks(content, where)):
        at = f"{where}.{n}"
        kind = block["type"]
        if kind == "text":
            texts.append(_text(block.get("text"), at + ".text"))
        elif kind == "tool_use":
            arguments = block.get("input")
            if not isinstance(arguments, dict):
                raise _bad(f"{at}.input: Input should be an object", at + ".input")
            calls.append({"id": _text(block.get("id"), at + ".id"), "type": "function",
                          "function": {"name": _text(block.get("name"), at + ".name"),
                                       "arguments": orjson.dumps(arguments).decode()}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # Anthropic's signed thinking: no chat server can take it back
        else:
            raise _bad(f"{at}: content blocks of type {kind!r} are not supported here "
                       f"({', '.join(_ASSISTANT_BLOCKS)} are)", at + ".type")
    message: Json = {"role": "assistant", "content": "".join(texts) if texts or not calls
                     else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _system(system: Any) -> str:
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise _bad("system: Input should be a valid string or list of text blocks", "system")
    texts = []
    for n, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _bad(f"system.{n}: only text blocks are accepted in system", f"system.{n}")
        texts.append(_text(block.get("text"), f"system.{n}.text"))
    return "\n".join(texts)


def _tools(tools: Any) -> list[Json]:
    if not isinstance(tools, list):
        raise _bad("tools: Input should be a valid list", "tools")
    out = []
    for n, tool in enumerate(tools):
        at = f"tools.{n}"
        if not isinstance(tool, dict):
            raise _bad(f"{at}: Input should be an object", at)
        if tool.get("type") not in (None, "custom"):
            raise _bad(f"{at}: tools of type {tool.get('type')!r} (Anthropic-defined or server "
                       "tools) are not supported here; custom tools with an input_schema are",
                       at + ".type")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise _bad(f"{at}.input_schema: Field required", at + ".input_schema")
        function: Json = {"name": _text(tool.get("name"), at + ".name"), "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, chat: Json) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    assert kind is None or isinstance(choice, dict)
    if kind == "tool":
        assert isinstance(choice, dict)
        chat["tool_choice"] = {"type": "function", "function": {
            "name": _text(choice.get("name"), "tool_choice.name")}}
    elif isinstance(kind, str) and kind in anthropic.TOOL_CHOICE_NAMES:
        chat["tool_choice"] = anthropic.TOOL_CHOICE_NAMES[kind]
    else:
        raise _bad("tool_choice: expected {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}",
                   "tool_choice")
    assert isinstance(choice, dict)
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        chat["parallel_tool_calls"] = False


def to_chat(body: Json, counting: bool = False) -> Json:
    """The chat completion request for a Messages request (`counting`: a count_tokens
    request, which has no max_tokens); raises BadRequest for what is malformed or cannot be
    translated, worded as the Messages API words its own 400s."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model: Field required", "model")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _bad("messages: Field required (a non-empty list of messages)", "messages")
    if len(raw_messages) > MAX_MESSAGES:
        raise _bad(f"messages: at most {MAX_MESSAGES} messages are accepted", "messages")
    if body.get("mcp_servers"):
        raise _bad("mcp_servers: MCP servers are not supported here", "mcp_servers")
    messages: list[Json] = []
    if body.get("system") is not None:
        system = _system(body["system"])
        if system:
            messages.append({"role": "system", "content": system})
    for n, message in enumerate(raw_messages):
        at = f"messages.{n}"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise _bad(f"{at}.role: Input should be 'user' or 'assistant'", at + ".role")
        assert isinstance(message, dict)
        if "content" not in message:
            raise _bad(f"{at}.content: Field required", at + ".content")
        if role == "user":
            messages.extend(_user_turn(message["content"], at + ".content"))
        else:
            messages.append(_assistant_turn(message["content"], at + ".content"))
    chat: Json = {"model": model, "messages": messages}
    max_tokens = body.get("max_tokens")
    if not counting or max_tokens is not None:
        if not positive_int(max_tokens):
            raise _bad("max_tokens: Field required (a positive integer)", "max_tokens")
        chat["max_tokens"] = max_tokens
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], chat)
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop_sequences: Input should be a list of strings", "stop_sequences")
        if stops:
            chat["stop"] = stops
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            if not number(body[key]):
                raise _bad(f"{key}: Input should be a valid number", key)
            chat[key] = body[key]
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise _bad("stream: Input should be a valid boolean", "stream")
    if stream and not counting:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # for message_delta's usage
    return chat


# --------------------------------------------------------------------------- answers


def _usage(usage: Any) -> Json:
    """An Anthropic usage object from a chat one: Anthropic's input_tokens leave out the
    tokens read from the cache (the inverse of proxy.anthropic's reading)."""
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
        choices = completion.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else {}
        message = choice.get("message") if isinstance(choice, dict) else None
        message = message if isinstance(message, dict) else {}
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
            "stop_reason": anthropic.STOP_REASONS.get(str(choice.get("finish_reason")),
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
        self.finish: str | None = None
        self.usage: Json | None = None
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
        if isinstance(obj.get("usage"), dict):
            self.usage = _usage(obj["usage"])
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                thought = delta_reasoning(delta)[0]
                if thought and self.x.thinking:
                    self._delta(out, "thinking", {"type": "thinking_delta",
                                                  "thinking": thought})
                for key in ("content", "refusal"):
                    text = delta.get(key)
                    if isinstance(text, str) and text:
                        self._delta(out, "text", {"type": "text_delta", "text": text})
                for call in listed(delta.get("tool_calls")):
                    if isinstance(call, dict):
                        self._call(out, call)
            if choice.get("finish_reason") is not None:
                self.finish = str(choice["finish_reason"])
        return out

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
            "delta": {"stop_reason": anthropic.STOP_REASONS.get(self.finish or "stop",
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
    return orjson.dumps({"type": "error", "error": {"type": anthropic.error_type(status),
                                                    "message": message}})


def _unsigned(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") == "thinking" \
        and not block.get("signature")


def _signed_only(body: Json) -> Json:
    """The request for an Anthropic instance: as it came, less the thinking blocks this
    proxy made from another server's reasoning (they have no signature, and Anthropic
    refuses a thinking block whose signature it cannot verify)."""
    messages = body["messages"]
    if not any(isinstance(m.get("content"), list) and any(map(_unsigned, m["content"]))
               for m in messages):
        return body
    return {**body, "messages": [
        {**m, "content": [b for b in m["content"] if not _unsigned(b)]}
        if isinstance(m.get("content"), list) else m for m in messages]}


class MessagesFront:
    """`POST /v1/messages`: the Front for Anthropic's Messages API."""

    def exchange(self, raw: bytes, request_id: str, config: Config) -> MessagesExchange:
        body = load_object(raw)
        chat = to_chat(body)
        stream = chat.get("stream") is True
        request = ClientRequest(request_id=request_id, endpoint=CHAT, body=chat,
                                raw=orjson.dumps(chat), model=chat["model"], stream=stream,
                                include_usage=stream, native=_signed_only(body))
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
                         native=_signed_only(body))


def estimate_input(chat: Json, prompt_tokens: int) -> int:
    """Input tokens estimated as the planner estimates a prompt (characters / 4, images,
    per-message overhead: proxy.requirements), plus the tool definitions' JSON."""
    tools = chat.get("tools")
    return prompt_tokens + (len(orjson.dumps(tools)) // CHARS_PER_TOKEN if tools else 0)


async def count_tokens(upstream: Upstream, candidates: list[InstanceState],
                       request: ClientRequest, estimate: int, timeout_s: float) -> int:
    """Input tokens of a count_tokens request (`count_request`), counted by the first of
    the plan's candidates with a tokenizer to ask: a llama.cpp server, through its
    `/apply-template` (the prompt its chat template makes of the messages and tools) and
    `/tokenize` (llama.cpp tools/server README, "API Endpoints"); an Anthropic instance,
    through its own `/v1/messages/count_tokens` (sent the client's request); else, or when
    that one cannot say, `estimate`."""
    for inst in candidates:
        cfg = inst.config
        if not inst.routable():
            continue
        if cfg.kind == "anthropic" and request.native is not None:
            count = await _anthropic_count(upstream, inst, request.native, timeout_s)
        elif cfg.server == "llamacpp":
            prompt = await _apply_template(upstream, inst, request.body, timeout_s)
            count = None if prompt is None else await upstream.count_tokens(cfg, prompt,
                                                                            timeout_s)
        else:
            continue
        return estimate if count is None else count
    return estimate


async def _anthropic_count(upstream: Upstream, inst: InstanceState, native: Json,
                           timeout_s: float) -> int | None:
    cfg = inst.config
    body = orjson.dumps({**native, "model": cfg.model or native.get("model")})
    try:
        status, data = await upstream.probe(cfg, cfg.api_base + "/messages/count_tokens",
                                            timeout_s, body)
    except UpstreamFailure:
        return None
    try:
        counted = orjson.loads(data).get("input_tokens") if status == 200 else None
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return counted if positive_int(counted) else None


async def _apply_template(upstream: Upstream, inst: InstanceState, chat: Json,
                          timeout_s: float) -> str | None:
    cfg = inst.config
    body = orjson.dumps({"messages": chat["messages"], **(
        {"tools": chat["tools"]} if chat.get("tools") else {})})
    try:
        status, data = await upstream.probe(cfg, cfg.root_url + "/apply-template", timeout_s,
                                            body)
    except UpstreamFailure:  # no count from this server: the caller estimates
        return None
    if status != 200:
        return None
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    prompt = parsed.get("prompt") if isinstance(parsed, Mapping) else None
    return prompt if isinstance(prompt, str) else None

