"""Server-sent events: split an upstream byte stream into events and read what failover needs.

The relay forwards events as the upstream framed them; it parses each payload once, only to
learn what the failover logic must know (content present? finish reason? error? valid?).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from proxy.failures import (
    UpstreamFailure,
    UpstreamProtocolError,
    UpstreamTimeout,
    failure_from,
)

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"


class EventSource(Protocol):
    """Anything that yields complete SSE events (an EventReader, or a translating one)."""

    async def next(self, timeout_s: float | None = None, phase: str = "idle") -> bytes | None:
        ...

    def buffered(self) -> bytes | None:
        """The next event if one is already at hand, else None (never waits)."""
        ...


class EventReader:
    """Yields raw events, each ending in its blank-line terminator (line ends normalised
    to LF), from an aiohttp response body (`resp.content`).

    An event longer than `max_event_bytes` fails with UpstreamProtocolError instead of
    being buffered on. A wait longer than its `timeout_s` fails with UpstreamTimeout(phase);
    a cut or reset body with ProcessExited (see proxy.failures.failure_from).

    Waits share one lazy timer per stream rather than one timer per wait: each wait only
    moves the deadline, and the timer, when it fires early, re-arms itself for what is
    left (so a stream of frequent events costs about one timer per timeout period). It
    ends the wait by failing the body reader, the way aiohttp's own sock_read does.
    """

    __slots__ = ("_content", "_max", "_buffer", "_events", "_eof", "_cr", "_loop",
                 "_timer", "_deadline", "_phase", "_timeout_s")

    def __init__(self, content: aiohttp.StreamReader, max_event_bytes: int) -> None:
        self._content = content
        self._max = max_event_bytes
        self._buffer = bytearray()  # an unfinished event (LF-normalised)
        self._events: deque[bytes] = deque()
        self._eof = False
        self._cr = False  # the last chunk ended in CR: maybe half of a CRLF
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None  # of the wait in progress
        self._phase = "idle"
        self._timeout_s = 0.0
        content.on_eof(self._drop_timer)

    async def next(self, timeout_s: float | None = None, phase: str = "idle") -> bytes | None:
        """The next event, or None when the stream has ended; an event already at hand is
        returned without waiting, else the whole wait is bounded by `timeout_s`."""
        events = self._events
        if events:
            return events.popleft()
        if timeout_s is not None:
            self._arm(timeout_s, phase)
        try:
            while not events:
                if self._eof:
                    return None
                try:
                    chunk = await self._content.readany()
                except UpstreamFailure:
                    raise
                except Exception as exc:
                    raise failure_from(exc, phase, timeout_s) from exc
                if chunk:
                    self._feed(chunk)
                else:
                    self._end()
        finally:
            self._deadline = None
        return events.popleft()

    def buffered(self) -> bytes | None:
        """The next event if one is already at hand (no waiting), else None."""
        events = self._events
        return events.popleft() if events else None

    def _feed(self, chunk: bytes) -> None:
        if self._cr or b"\r" in chunk:
            chunk = self._normalise(chunk)
        buf = self._buffer
        if buf:
            # Search only where a terminator can be new: one byte back, for a LF that
            # ended the previous chunk.
            scan = len(buf) - 1
            buf += chunk
            if buf.find(b"\n\n", scan) < 0:
                self._check_size(buf)
                return
            data = bytes(buf)
            buf.clear()
        else:
            data = chunk
        start = 0
        find = data.find
        append = self._events.append
        while True:
            end = find(b"\n\n", start)
            if end < 0:
                break
            if end > start:
                append(data[start:end + 2])
            start = end + 2
        if start < len(data):
            buf += data[start:] if start else data
            self._check_size(buf)

    def _normalise(self, chunk: bytes) -> bytes:
        """CRLF and CR line ends as LF; a CR at the end of a chunk waits for the next one
        (it may be the first half of a CRLF)."""
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._cr = True
        return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

    def _check_size(self, buf: bytearray) -> None:
        if len(buf) > self._max:
            raise UpstreamProtocolError(f"a server-sent event longer than {self._max} bytes "
                                        "(upstream.max_event_bytes)")

    def _end(self) -> None:
        self._eof = True
        if self._cr:
            self._buffer += b"\n"
            self._cr = False
        tail = bytes(self._buffer).strip()
        self._buffer.clear()
        if tail:
            # An unterminated last event is still an event; the caller judges it.
            self._events.append(tail + b"\n\n")

    # -- the stream's timer -----------------------------------------------------------

    def _arm(self, timeout_s: float, phase: str) -> None:
        deadline = self._loop.time() + timeout_s
        self._deadline = deadline
        self._phase = phase
        self._timeout_s = timeout_s
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return  # no wait in progress
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._expire)
            return
        self._content.set_exception(UpstreamTimeout(self._phase, self._timeout_s))

    def _drop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def event_data(event: bytes) -> bytes | None:
    """The `data:` payload of an event (several data lines joined), or None if it has none."""
    if event.startswith(b"data: ") and event.find(b"\n") == len(event) - 2:
        return event[6:-2]  # the common case: one `data: ...` line
    lines = []
    for line in event.rstrip(b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            payload = line[5:]
            lines.append(payload[1:] if payload.startswith(b" ") else payload)
    return b"\n".join(lines) if lines else None


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


class MalformedEvent(ValueError):
    """An event whose payload is not a JSON object."""


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
    text = ""
    reasoning = ""
    finish = None
    tool_call = False
    refusal = False
    other = False  # output with no text of its own (structured reasoning details)
    for choice in choices:
        if not isinstance(choice, dict):
            raise MalformedEvent("choice is not an object")
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            if content:
                text += content if isinstance(content, str) else ""
            if len(delta) > 1 or not content:  # an answer-text-only delta has nothing else
                reasoning += delta_reasoning(delta)[0]
                if delta.get("tool_calls") or delta.get("function_call"):
                    tool_call = True
                if delta.get("refusal"):
                    refusal = True
                if delta.get("reasoning_details"):
                    other = True
        else:
            completion = choice.get("text")
            if isinstance(completion, str):
                text += completion
        if choice.get("finish_reason") is not None:
            finish = choice["finish_reason"]
    # A chunk without choices or with an empty model (Azure OpenAI's first event:
    # `"model": "", "choices": [], "prompt_filter_results": [...]`) claims no model.
    model = obj.get("model") if choices else None
    return Chunk(bool(text or reasoning) or tool_call or refusal or other, finish, None,
                 model if isinstance(model, str) and model else None, text, tool_call, obj,
                 reasoning, refusal)


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
        if not isinstance(choice, dict):
            return None
        index = choice.get("index", n)
        if not chat:
            if not isinstance(choice.get("text"), str):
                return None
            out.append({**choice, "index": index})
            continue
        message = choice.get("message")
        if not isinstance(message, dict):
            return None
        delta = {k: v for k, v in message.items() if v is not None}
        delta.setdefault("role", "assistant")
        calls = delta.get("tool_calls")
        if isinstance(calls, list):  # a streamed tool call says which one it extends
            delta["tool_calls"] = [{**call, "index": i} if isinstance(call, dict) else call
                                   for i, call in enumerate(calls)]
        out.append({"index": index, "delta": delta,
                    "finish_reason": choice.get("finish_reason")})
    events = [b"data: " + orjson.dumps({**base, "choices": out}) + b"\n\n"]
    usage = obj.get("usage")
    if include_usage and usage is not None:
        events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage})
                      + b"\n\n")
    events.append(DONE_EVENT)
    return b"".join(events)
