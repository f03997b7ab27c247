"""Pure translation between OpenAI chat completions and Anthropic's Messages API.

No I/O happens here: the upstream layer sends what :func:`to_messages_request` builds with
:func:`HEADERS`, turns a non-streamed answer back with :func:`from_messages_response`, feeds
each server-sent event of a streamed answer to a :class:`StreamTranslator`, and classifies
error responses with :func:`map_error`.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy import overflow

Json = dict[str, Any]

ANTHROPIC_VERSION = "2023-06-01"

# Reason codes, spelled as in proxy.failures (kept as plain strings so this module stays pure).
RATE_LIMITED = "RATE_LIMITED"
UPSTREAM_5XX = "UPSTREAM_5XX"
UPSTREAM_AUTH = "UPSTREAM_AUTH"
CONTEXT_TOO_LONG = "CONTEXT_TOO_LONG"
CLIENT_ERROR = "CLIENT_ERROR"
UPSTREAM_ERROR = "UPSTREAM_ERROR"

#: Anthropic stop_reason -> OpenAI finish_reason (Anthropic docs, "Handling stop reasons").
#: Read both ways: `STOP_REASONS` is its inverse, for the Messages API front
#: (proxy.messages_api), the first Anthropic reason listed for a finish reason winning.
FINISH_REASONS: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
}
STOP_REASONS: dict[str, str] = {}
for _stop, _finish in FINISH_REASONS.items():
    STOP_REASONS.setdefault(_finish, _stop)

#: OpenAI tool_choice string -> Anthropic tool_choice; `TOOL_CHOICE_NAMES` is its inverse
#: (Anthropic's `{"type": "tool", "name": ...}` is OpenAI's `{"type": "function", ...}`).
TOOL_CHOICES: dict[str, Json] = {
    "auto": {"type": "auto"},
    "required": {"type": "any"},
    "none": {"type": "none"},
}
TOOL_CHOICE_NAMES: dict[str, str] = {v["type"]: k for k, v in TOOL_CHOICES.items()}

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


class TranslationError(ValueError):
    """The OpenAI request cannot be expressed as a Messages API request (a client error)."""


class AnthropicStreamError(Exception):
    """An `error` event arrived in the middle of a streamed Messages API answer."""

    def __init__(self, message: str, error_type: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type


def HEADERS(api_key: str) -> dict[str, str]:  # noqa: N802 - named as the upstream layer expects
    """The request headers for the Messages API with `api_key`."""
    return {
        "x-api-key": api_key,
        "anthropic-version": ANTHROPIC_VERSION,
        "content-type": "application/json",
    }


# --------------------------------------------------------------------------- requests


def _text_of(content: Any, what: str) -> str:
    """The text of a string content or of a list of text parts (other parts are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise TranslationError(f"{what} content may only hold text parts")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise TranslationError(f"{what} content must be a string or a list of parts")


def _image_block(part: Json) -> Json:
    """An Anthropic image block from an OpenAI `image_url` part (data: or http(s) URL)."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise TranslationError("image_url part without a url")
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not sep or encoding != "base64" or not media_type:
            raise TranslationError("image data URLs must be base64 with a media type")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError("image_url must be a data: or http(s) URL")


def _content_blocks(content: Any) -> list[Json]:
    """Anthropic content blocks from OpenAI message content; empty text is dropped."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError("message content must be a string or a list of parts")
    blocks: list[Json] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = str(part.get("text", ""))
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            blocks.append(_image_block(part))
        else:
            raise TranslationError(f"unsupported content part type: {kind!r}")
    return blocks


def _tool_use_block(call: Any) -> Json:
    """An Anthropic tool_use block from one OpenAI assistant tool call."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise TranslationError("tool_calls entries must be function calls")
    function: Json = call["function"]
    raw = function.get("arguments") or "{}"
    try:
        arguments = orjson.loads(raw) if isinstance(raw, str | bytes) else raw
    except orjson.JSONDecodeError as exc:
        raise TranslationError(f"tool call arguments are not JSON: {exc}") from exc
    if not isinstance(arguments, dict):
        raise TranslationError("tool call arguments must be a JSON object")
    return {"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": arguments}


def _tool_result_block(message: Json) -> Json:
    """An Anthropic tool_result block from an OpenAI `role: tool` message."""
    tool_use_id = message.get("tool_call_id")
    if not isinstance(tool_use_id, str):
        raise TranslationError("tool messages need a tool_call_id")
    return {
        "type": "tool_result",
        "tool_use_id": tool_use_id,
        "content": _text_of(message.get("content"), "tool"),
    }


def _turn(message: Json) -> tuple[str, list[Json]]:
    """The Anthropic role and content blocks of one non-system OpenAI message."""
    role = message.get("role")
    if role == "user":
        return "user", _content_blocks(message.get("content"))
    if role == "assistant":
        blocks = _content_blocks(message.get("content"))
        blocks.extend(_tool_use_block(call) for call in message.get("tool_calls") or [])
        return "assistant", blocks
    if role == "tool":
        return "user", [_tool_result_block(message)]
    raise TranslationError(f"unsupported message role: {role!r}")


def _merge_turns(turns: list[tuple[str, list[Json]]]) -> list[Json]:
    """Messages with consecutive same-role turns merged, as the API requires alternation."""
    merged: list[Json] = []
    for role, blocks in turns:
        if not blocks:
            continue
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"].extend(blocks)
        else:
            merged.append({"role": role, "content": list(blocks)})
    return merged


def _trim_prefill(messages: list[Json]) -> None:
    """Strip trailing whitespace of a final assistant prefill (the API refuses it)."""
    if not messages or messages[-1]["role"] != "assistant":
        return
    last = messages[-1]["content"][-1]
    if last.get("type") == "text":
        last["text"] = last["text"].rstrip()
        if not last["text"]:
            messages[-1]["content"].pop()
            if not messages[-1]["content"]:
                messages.pop()


def _split_messages(raw: Any) -> tuple[str, list[Json]]:
    """The joined system prompt and the alternating Anthropic messages of an OpenAI request."""
    if not isinstance(raw, list) or not raw:
        raise TranslationError("messages must be a non-empty list")
    system: list[str] = []
    turns: list[tuple[str, list[Json]]] = []
    for message in raw:
        if not isinstance(message, dict):
            raise TranslationError("each message must be an object")
        if message.get("role") in ("system", "developer"):
            text = _text_of(message.get("content"), "system")
            if text:
                system.append(text)
        else:
            turns.append(_turn(message))
    messages = _merge_turns(turns)
    _trim_prefill(messages)
    if not messages:
        raise TranslationError("the request has no user or assistant content")
    return "\n\n".join(system), messages


def _tool(tool: Any) -> Json:
    """An Anthropic tool definition from an OpenAI function tool."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise TranslationError("only function tools are supported")
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise TranslationError("function tools need a name")
    out: Json = {
        "name": function["name"],
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        out["description"] = function["description"]
    return out


def _tool_choice(choice: Any) -> Json:
    """An Anthropic tool_choice from an OpenAI one."""
    if isinstance(choice, str) and choice in TOOL_CHOICES:
        return dict(TOOL_CHOICES[choice])
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return {"type": "tool", "name": function["name"]}
    raise TranslationError(f"unsupported tool_choice: {choice!r}")


def _stop_sequences(stop: Any) -> list[str]:
    """Anthropic stop_sequences from OpenAI `stop` (a string or a list of strings)."""
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise TranslationError("stop must be a string or a list of strings")


def _max_tokens(body: Json, default: int) -> int:
    """`max_tokens` (or `max_completion_tokens`) of the request, else `default`."""
    value = body.get("max_tokens")
    if value is None:
        value = body.get("max_completion_tokens")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TranslationError("max_tokens must be a positive integer")
    return value


def _add_tools(body: Json, out: Json) -> None:
    """Copy tools, tool_choice and parallel_tool_calls of `body` into `out`."""
    if body.get("tools"):
        out["tools"] = [_tool(t) for t in body["tools"]]
    choice = _tool_choice(body["tool_choice"]) if body.get("tool_choice") is not None else None
    if body.get("parallel_tool_calls") is False and out.get("tools"):
        choice = choice or {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    if choice is not None:
        out["tool_choice"] = choice


def to_messages_request(body: Json, model: str | None, default_max_tokens: int) -> Json:
    """An Anthropic Messages request from an OpenAI chat completion request.

    `model` overrides the request's model when given (the instance's upstream model name).
    Raises :class:`TranslationError` for what the Messages API cannot express.
    """
    name = model or body.get("model")
    if not isinstance(name, str) or not name:
        raise TranslationError("no model to send upstream")
    system, messages = _split_messages(body.get("messages"))
    out: Json = {"model": name, "max_tokens": _max_tokens(body, default_max_tokens), "messages": messages}
    if system:
        out["system"] = system
    if body.get("stop") is not None:
        out["stop_sequences"] = _stop_sequences(body["stop"])
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stream"):
        out["stream"] = True
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    _add_tools(body, out)
    return out


# --------------------------------------------------------------------------- responses


def finish_reason(stop_reason: str | None) -> str | None:
    """The OpenAI finish_reason for an Anthropic stop_reason (unknown ones become "stop")."""
    if stop_reason is None:
        return None
    return FINISH_REASONS.get(stop_reason, "stop")


def _usage(input_tokens: int, output_tokens: int, cached: int = 0) -> Json:
    """An OpenAI usage object."""
    usage: Json = {
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _usage_of(usage: Any) -> Json:
    """An OpenAI usage object from an Anthropic one; cache reads and writes count as prompt."""
    usage = usage if isinstance(usage, dict) else {}
    cached = int(usage.get("cache_read_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + cached
    prompt += int(usage.get("cache_creation_input_tokens") or 0)
    return _usage(prompt, int(usage.get("output_tokens") or 0), cached)


def _tool_call(block: Json) -> Json:
    """An OpenAI tool call from an Anthropic tool_use block."""
    return {
        "id": block.get("id"),
        "type": "function",
        "function": {
            "name": block.get("name"),
            "arguments": orjson.dumps(block.get("input") or {}).decode(),
        },
    }


def from_messages_response(resp: Json, created: int) -> Json:
    """An OpenAI chat.completion from a non-streamed Anthropic Messages response."""
    blocks = [b for b in resp.get("content") or [] if isinstance(b, dict)]
    texts = [str(b.get("text", "")) for b in blocks if b.get("type") == "text"]
    calls = [_tool_call(b) for b in blocks if b.get("type") == "tool_use"]
    message: Json = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": resp.get("id"),
        "object": "chat.completion",
        "created": created,
        "model": resp.get("model"),
        "choices": [
            {"index": 0, "message": message, "finish_reason": finish_reason(resp.get("stop_reason"))}
        ],
        "usage": _usage_of(resp.get("usage")),
    }


# --------------------------------------------------------------------------- streams


class StreamTranslator:
    """Turns the events of one streamed Messages answer into OpenAI chat.completion.chunks."""

    def __init__(self, created: int, include_usage: bool) -> None:
        self.created = created
        self.include_usage = include_usage
        self.id = ""
        self.model = ""
        self.done = False
        self.finish_reason: str | None = None
        self._usage: Json = {}
        self._tool_index: dict[int, int] = {}

    def feed(self, event_type: str, data: Json) -> list[Json]:
        """The chunks for one event; unknown events are ignored, `error` raises."""
        if event_type == "error":
            error = data.get("error")
            error = error if isinstance(error, dict) else {}
            raise AnthropicStreamError(
                str(error.get("message") or "upstream stream error"), str(error.get("type") or "error")
            )
        if self.done:
            return []
        handler = {
            "message_start": self._message_start,
            "content_block_start": self._block_start,
            "content_block_delta": self._block_delta,
            "message_delta": self._message_delta,
            "message_stop": self._message_stop,
        }.get(event_type)
        return handler(data) if handler else []

    def _chunk(self, delta: Json, finish: str | None = None) -> Json:
        """One chunk with a single choice."""
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def _message_start(self, data: Json) -> list[Json]:
        """Remember id, model and input usage; announce the assistant role."""
        message = data.get("message") or {}
        self.id = str(message.get("id") or "")
        self.model = str(message.get("model") or "")
        self._usage.update(message.get("usage") or {})
        return [self._chunk({"role": "assistant", "content": ""})]

    def _block_start(self, data: Json) -> list[Json]:
        """A tool_use block opens a tool call; a text block's initial text (if any) is content."""
        block = data.get("content_block") or {}
        if block.get("type") == "tool_use":
            index = len(self._tool_index)
            self._tool_index[int(data.get("index", 0))] = index
            call = {
                "index": index,
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": ""},
            }
            return [self._chunk({"tool_calls": [call]})]
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        return []

    def _block_delta(self, data: Json) -> list[Json]:
        """Text becomes content, thinking reasoning; partial tool input JSON becomes tool
        call arguments (Anthropic's `thinking_delta`, `text_delta`, `input_json_delta`)."""
        delta = data.get("delta") or {}
        if delta.get("type") == "text_delta":
            return [self._chunk({"content": delta.get("text", "")})]
        if delta.get("type") == "thinking_delta":
            # Extended thinking: reasoning, named as llama.cpp and DeepSeek stream it.
            return [self._chunk({"reasoning_content": delta.get("thinking", "")})]
        if delta.get("type") == "input_json_delta":
            index = self._tool_index.get(int(data.get("index", 0)))
            if index is None:
                return []
            call = {"index": index, "function": {"arguments": delta.get("partial_json", "")}}
            return [self._chunk({"tool_calls": [call]})]
        return []

    def _message_delta(self, data: Json) -> list[Json]:
        """The stop reason becomes a finishing chunk; output usage is remembered."""
        self._usage.update(data.get("usage") or {})
        stop = (data.get("delta") or {}).get("stop_reason")
        if stop is None:
            return []
        self.finish_reason = finish_reason(stop)
        return [self._chunk({}, self.finish_reason)]

    def _message_stop(self, data: Json) -> list[Json]:
        """The end of the answer: a usage chunk when asked for."""
        self.done = True
        if not self.include_usage:
            return []
        chunk = self._chunk({})
        chunk["choices"] = []
        chunk["usage"] = _usage_of(self._usage)
        return [chunk]


# --------------------------------------------------------------------------- errors


def _error_of(body: bytes) -> tuple[str, str]:
    """The (type, message) of an Anthropic error body, or ("", the raw text)."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        return str(error.get("type") or ""), str(error.get("message") or "")
    return "", body.decode("utf-8", "replace").strip()[:500]


def map_error(status: int, body: bytes) -> tuple[str, str]:
    """The proxy reason code and a message for an Anthropic error response."""
    error_type, message = _error_of(body)
    message = message or f"HTTP {status}"
    if status == 429 or error_type == "rate_limit_error":
        return RATE_LIMITED, message
    if status >= 500 or error_type in ("overloaded_error", "api_error"):
        return UPSTREAM_5XX, message
    if status in (401, 403):
        return UPSTREAM_AUTH, message
    if overflow.classify(status, body) is not None:  # "prompt is too long: N tokens > M maximum"
        return CONTEXT_TOO_LONG, message
    if 400 <= status < 500:
        return CLIENT_ERROR, message
    return UPSTREAM_ERROR, message
