"""What failover needs to know about one completion chunk (OpenAI's chat or text
completion chunk shape): model output or not, finish reason, in-band error, model name,
answer text, reasoning. Parsed once per event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from proxy.failures import StreamMalformed
from proxy.providers.sse import DONE_EVENT

#: Delta fields in which servers stream a reasoning model's thinking, apart from `content`:
#: - `reasoning_content`: the DeepSeek API (its original convention), llama.cpp's
#:   `llama-server --reasoning-format deepseek` (its default), SGLang's reasoning parsers,
#:   LM Studio, and vLLM's reasoning parsers before vLLM PR #27752 (Oct 2025);
#: - `reasoning`: OpenRouter (its `ChatStreamDelta`), vLLM since PR #27752 (the only name
#:   after PR #33402, Jan 2026), and Ollama's OpenAI-compatible `/v1` layer;
#: - `thinking`: what Ollama's native API calls it, and gateways that copy it.
#: Looked up in that order; the first non-empty string is the chunk's reasoning.
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")


@dataclass(slots=True)
class Chunk:
    """What failover needs to know about one completion chunk.

    `has_content` is true for every chunk that carries model output: answer text
    (`delta.content`, or `text` of a text completion), reasoning (REASONING_FIELDS, or
    OpenRouter's structured `reasoning_details`), a tool call (`delta.tool_calls`, or the
    legacy `delta.function_call`) or a refusal (`delta.refusal`, OpenAI). `text` is the
    answer text and `reasoning` the reasoning text of the chunk's choices.
    """

    has_content: bool
    finish_reason: str | None
    error: Any
    model: str | None
    text: str
    tool_call: bool
    obj: dict[str, Any]
    reasoning: str = ""
    refusal: bool = False
    #: The upstream's `usage` object, on a chunk without choices or with a finish reason.
    usage: Any = None


class MalformedEvent(StreamMalformed):
    """An event whose payload is not a completion chunk: STREAM_MALFORMED, never
    forwarded."""


def delta_reasoning(delta: dict[str, Any]) -> tuple[str, str | None]:
    """(reasoning text, the field it came in) of a chat delta; ("", None) if it has none."""
    for name in REASONING_FIELDS:
        piece = delta.get(name)
        if piece and isinstance(piece, str):
            return piece, name
    return "", None


def inspect_chunk(payload: bytes) -> Chunk:
    """Parse a chat or text completion chunk; raises MalformedEvent on anything else."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise MalformedEvent("event is not valid JSON") from None
    if not isinstance(obj, dict):
        raise MalformedEvent("event is not a JSON object")
    error = obj.get("error")
    if error is not None:
        return Chunk(False, None, error, None, "", False, obj)
    choices = obj.get("choices")
    if not isinstance(choices, list):
        raise MalformedEvent("chunk has no choices list")
    plain = _text_only(obj, choices[0]) if len(choices) == 1 else None
    return plain if plain is not None else _of_choices(obj, choices)


def _of_choices(obj: dict[str, Any], choices: list[Any]) -> Chunk:
    """A chunk's Chunk, read choice by choice (any shape of chunk)."""
    text = reasoning = ""
    finish = None
    tool_call = refusal = other = False
    for choice in choices:
        if not isinstance(choice, dict):
            raise MalformedEvent("choice is not an object")
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            if content and isinstance(content, str):
                text += content
            if len(delta) > 1 or not content:  # an answer-text-only delta has nothing else
                thought, call, refused, details = _beyond_text(delta)
                reasoning += thought
                tool_call, refusal, other = tool_call or call, refusal or refused, \
                    other or details
        else:
            completion = choice.get("text")
            if isinstance(completion, str):
                text += completion
        if choice.get("finish_reason") is not None:
            finish = choice["finish_reason"]
    # A chunk without choices or with an empty model (Azure OpenAI's first event:
    # `"model": "", "choices": [], "prompt_filter_results": [...]`) claims no model. Usage
    # comes in a last chunk without choices (OpenAI's `include_usage`), or beside the
    # finish reason (some servers): only those are looked at.
    model = obj.get("model") if choices else None
    return Chunk(bool(text or reasoning) or tool_call or refusal or other, finish, None,
                 model if isinstance(model, str) and model else None, text, tool_call, obj,
                 reasoning, refusal,
                 obj.get("usage") if finish is not None or not choices else None)


def _text_only(obj: dict[str, Any], choice: Any) -> Chunk | None:
    """The Chunk of a one-choice chunk whose delta is a piece of answer text and nothing
    else, not the last: the shape of nearly every chunk of every server, read here
    without inspect_chunk's loop (this runs once per streamed event). None for any other
    shape (inspect_chunk reads it the general way)."""
    delta = choice.get("delta") if isinstance(choice, dict) else None
    if not isinstance(delta, dict) or len(delta) != 1:
        return None
    content = delta.get("content")
    if not content or not isinstance(content, str) or choice.get("finish_reason") is not None:
        return None
    model = obj.get("model")
    return Chunk(True, None, None, model if isinstance(model, str) and model else None,
                 content, False, obj)


def _beyond_text(delta: dict[str, Any]) -> tuple[str, bool, bool, bool]:
    """(reasoning, a tool call?, a refusal?, structured reasoning details?) of a delta
    that carries more than answer text."""
    return (delta_reasoning(delta)[0],
            bool(delta.get("tool_calls") or delta.get("function_call")),
            bool(delta.get("refusal")), bool(delta.get("reasoning_details")))


def whole_as_events(body: bytes, include_usage: bool) -> bytes | None:
    """A whole (non-streamed) chat or text completion as the events of a stream that says
    the same: one chunk with every choice's message as its delta and its finish reason,
    a usage chunk when the client asked for one, then `[DONE]`. For an upstream that
    ignored `stream: true`: relayed as it came, an SDK iterating the stream finds no event
    and returns an empty answer without raising. None when `body` is not a completion."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not choices:
        return None
    chat = obj.get("object") != "text_completion"
    base = {"id": obj.get("id") or "", "created": obj.get("created") or 0,
            "model": obj.get("model") or "",
            "object": "chat.completion.chunk" if chat else "text_completion"}
    out = []
    for n, choice in enumerate(choices):
        delta = _as_delta(choice, n, chat)
        if delta is None:
            return None
        out.append(delta)
    events = [b"data: " + orjson.dumps({**base, "choices": out}) + b"\n\n"]
    usage = obj.get("usage")
    if include_usage and usage is not None:
        events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage})
                      + b"\n\n")
    events.append(DONE_EVENT)
    return b"".join(events)


def _as_delta(choice: Any, n: int, chat: bool) -> dict[str, Any] | None:
    """A whole answer's choice as a chunk's choice (None: it is not a completion's)."""
    if not isinstance(choice, dict):
        return None
    index = choice.get("index", n)
    if not chat:
        return {**choice, "index": index} if isinstance(choice.get("text"), str) else None
    message = choice.get("message")
    if not isinstance(message, dict):
        return None
    delta = {k: v for k, v in message.items() if v is not None}
    delta.setdefault("role", "assistant")
    calls = delta.get("tool_calls")
    if isinstance(calls, list):  # a streamed tool call says which one it extends
        delta["tool_calls"] = [{**call, "index": i} if isinstance(call, dict) else call
                               for i, call in enumerate(calls)]
    return {"index": index, "delta": delta, "finish_reason": choice.get("finish_reason")}
