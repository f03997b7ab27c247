"""What every front shares: the `Front` and `Exchange` interfaces, the `TranslatingSink`,
and readers of the odd values servers send.

A front (the Responses API in `proxy.fronts.responses`, Anthropic's Messages API in
`proxy.fronts.messages`) turns its request into a chat completion request, which then goes
through the same planner, forwarder (failover, continuation), audit and metrics as any
`/v1/chat/completions` request; and it turns what comes back into its own API's shape:
a whole answer or an upstream's error (`Exchange.answer`), the events of a stream (a
`TranslatingSink` in front of the HTTP layer's sink), and the proxy's own errors
(`Front.error_body`). The engine never knows a front was involved.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from proxy.api.errors import ProxyError
from proxy.api.inbound import MAX_INT, ClientRequest
from proxy.config import Config
from proxy.engine.relay import StreamSink
from proxy.providers.sse import DONE, event_data

Json = dict[str, Any]


class Exchange(Protocol):
    """One translated request: the chat request the engine runs, and the way back."""

    request: ClientRequest

    def answer(self, status: int, body: bytes) -> tuple[int, bytes]:
        """(status, body) for the client, from a whole chat.completion (2xx) or from an
        upstream's own error answer passed through (4xx, in OpenAI's shape)."""
        ...

    def stream(self, sink: StreamSink) -> StreamSink:
        """A sink that writes this API's events to `sink` (the HTTP response)."""
        ...


class Front(Protocol):
    """A client API translated onto chat completions."""

    def exchange(self, raw: bytes, request_id: str, config: Config) -> Exchange:
        """Parse and translate a client's body; raises BadRequest (a ProxyError) for what
        is malformed or cannot be translated, phrased in this API's terms."""
        ...

    def error_body(self, exc: ProxyError) -> bytes:
        """The proxy's own error in this API's error shape (the status stays exc.status)."""
        ...


class TranslatingSink:
    """A StreamSink that rewrites the engine's chat-completion chunk events (and its
    loud-failure error event) into another API's events on the way to the client.

    The forwarder writes whole events only (one or several per write), each ending in a
    blank line, already validated as chunk objects; `[DONE]` ends a complete answer, and
    an event `{"error": {...}}` without a `[DONE]` after it ends a failed one.
    Subclasses implement `chunk`, `done` and `failed`, each returning encoded events, and
    `usage_of` and `deltas` for `answer`, which reads a chunk's answer for them.
    """

    def __init__(self, sink: StreamSink) -> None:
        self.sink = sink
        #: The answer's usage in this API's shape, and its chat finish reason, once seen.
        self.usage: Json | None = None
        self.finish: str | None = None

    async def start(self, instance_id: str, attempts: int, first: bytes,
                    upstream_headers: dict[str, str]) -> None:
        await self.sink.start(instance_id, attempts, self.translate(first), upstream_headers)

    async def write(self, data: bytes) -> None:
        out = self.translate(data)
        if out:
            await self.sink.write(out)

    def translate(self, data: bytes) -> bytes:
        """The client's events for a run of the engine's events."""
        out: list[bytes] = []
        for event in data.split(b"\n\n"):
            payload = event_data(event + b"\n\n") if event else None
            if payload is None:
                continue
            if payload == DONE:
                out.extend(self.done())
                continue
            obj = orjson.loads(payload)
            error = obj.get("error")
            if error is not None:
                out.extend(self.failed(error if isinstance(error, dict) else {}))
            else:
                out.extend(self.chunk(obj))
        return b"".join(out)

    def chunk(self, obj: Json) -> list[bytes]:
        raise NotImplementedError

    def answer(self, out: list[bytes], obj: Json) -> list[bytes]:
        """`out` with what a chunk says of the answer, once the subclass has opened it:
        its usage (kept, as `usage_of` words it) and choice 0's delta (`deltas`) and finish
        reason (kept)."""
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = self.usage_of(usage)
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:  # the one answer
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    self.deltas(out, delta)
                if choice.get("finish_reason") is not None:
                    self.finish = str(choice["finish_reason"])
        return out

    def usage_of(self, usage: Json) -> Json | None:
        raise NotImplementedError

    def deltas(self, out: list[bytes], delta: Json) -> None:
        raise NotImplementedError

    def done(self) -> list[bytes]:
        raise NotImplementedError

    def failed(self, error: Json) -> list[bytes]:
        raise NotImplementedError


def first_message(completion: Json) -> tuple[Json, Any]:
    """(message, choice) of a whole chat.completion's first choice; empty objects for what
    a server left out or sent wrong."""
    choices = completion.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    message = choice.get("message") if isinstance(choice, dict) else None
    return (message if isinstance(message, dict) else {}), choice


def sse(event: str, data: Json) -> bytes:
    """One named server-sent event (`event:` line, then the JSON `data:` line)."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def error_message(body: bytes) -> str:
    """The message of an upstream error body (OpenAI's shape, Anthropic's, or text)."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(parsed.get("message"), str):
            return str(parsed["message"])
    return body.decode("utf-8", "replace").strip()[:2000] or "the upstream refused the request"


def count(value: Any) -> int:
    """A count a server reported (a token count, an index): a non-negative integer, else 0.
    Servers' answers are not validated field by field, so a wrong type must not raise."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def listed(value: Any) -> list[Any]:
    """A list a server reported (tool calls), or an empty one for anything else."""
    return value if isinstance(value, list) else []


def positive_int(value: Any) -> bool:
    """Whether `value` is an integer from 1 to MAX_INT (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_INT


def number(value: Any) -> bool:
    """Whether `value` is a JSON number (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
