"""Anthropic Messages API answers as OpenAI chat completions: a whole answer, and the
events of a streamed one (`message_start`, `content_block_*`, `message_delta`,
`message_stop`, in-band `error`) as chat.completion.chunks. Pure translation, no I/O.
"""

from __future__ import annotations

from typing import Any

import orjson

Json = dict[str, Any]

#: Anthropic stop_reason -> OpenAI finish_reason (Anthropic docs, "Handling stop reasons").
#: Read both ways: `STOP_REASONS` is its inverse, for the Messages API front
#: (proxy.fronts), the first Anthropic reason listed for a finish reason winning.
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


class AnthropicStreamError(Exception):
    """An `error` event arrived in the middle of a streamed Messages API answer."""

    def __init__(self, message: str, error_type: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type


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

