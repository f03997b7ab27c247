"""Committed streams: what the client has been sent, and how another instance's stream is
spliced in after a mid-stream failure so the client sees one answer.

Two ways to go on after a cut (SPEC section 6):
- prefill: the next instance is sent the original messages plus the text delivered so
  far as a final assistant message, and continues it. Some servers (llama.cpp) echo the
  prefill at the start of their output; the echo is recognised and dropped.
- replay: a twin (same model, no prefill support) regenerates the answer from the
  original messages; it is used only if it begins with exactly the delivered text, and
  only what follows is sent. Anything else is a divergence.

Pure logic over parsed chunks; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

PREFILL = "prefill"
REPLAY = "replay"


class Diverged(Exception):
    """A replay's output does not begin with the text the client already has."""


@dataclass(slots=True)
class Delivered:
    """What the client has received on a committed stream."""

    id: str | None = None
    created: int | None = None
    pieces: list[str] = field(default_factory=list)
    content_chunks: int = 0
    tool_call: bool = False
    finished: bool = False
    role_sent: bool = False

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def note(self, obj: dict[str, Any], text: str, tool_call: bool,
             finish_reason: str | None) -> None:
        """Account for one chunk sent as it was (the first instance's own stream)."""
        if self.id is None:
            chunk_id = obj.get("id")
            self.id = chunk_id if isinstance(chunk_id, str) else None
            created = obj.get("created")
            self.created = created if isinstance(created, int) else None
        if text:
            self.pieces.append(text)
            self.content_chunks += 1
        if tool_call:
            self.tool_call = True
        if finish_reason is not None:
            self.finished = True
        self.role_sent = True


def _content_of(choice: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(text, delta) of a chat chunk's choice, or (text, None) for a text completion."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        return (content if isinstance(content, str) else ""), delta
    text = choice.get("text")
    return (text if isinstance(text, str) else ""), None


class Splicer:
    """Turns a continuation or replay stream into the rest of the client's stream."""

    def __init__(self, delivered: Delivered, mode: str) -> None:
        self.delivered = delivered
        self.mode = mode
        self.prefix = delivered.text
        #: Tokens of the delivered text, for usage; chunks unless the caller knows better.
        self.carried_chunks = delivered.content_chunks
        self.pending = ""
        self.decided = False
        #: True once this stream has sent the client something new.
        self.committed = False

    def feed(self, obj: dict[str, Any]) -> bytes | None:
        """The event to send the client for this upstream chunk, or None to send nothing.

        Raises Diverged when a replay turns out to differ from what was delivered.
        """
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices:
            usage = obj.get("usage")
            if not isinstance(usage, dict):
                return None
            return self._event({**obj, "usage": self._usage(usage)})
        choice = choices[0]
        if not isinstance(choice, dict):
            return None
        text, delta = _content_of(choice)
        finish = choice.get("finish_reason")
        tool_calls = delta.get("tool_calls") if delta is not None else None
        new = self._take(text, finish is not None)
        if new is None:
            return None  # still deciding whether this is an echo or a faithful replay
        if not new and finish is None and not tool_calls:
            return None  # a role-only or empty chunk: the client has had its role chunk
        out_choice = dict(choice)
        if delta is not None:
            out_delta = {k: v for k, v in delta.items() if k not in ("role", "content")}
            out_delta["content"] = new
            out_choice["delta"] = out_delta
        else:
            out_choice["text"] = new
        if new:
            self.delivered.pieces.append(new)
            self.delivered.content_chunks += 1
            self.committed = True
        if tool_calls:
            self.delivered.tool_call = True
            self.committed = True
        if finish is not None:
            self.delivered.finished = True
            self.committed = True
        return self._event({**obj, "choices": [out_choice]})

    def _take(self, text: str, finishing: bool) -> str | None:
        """The new part of `text` to send, or None while undecided."""
        if self.decided:
            return text
        self.pending += text
        prefix, pending = self.prefix, self.pending
        if self.mode == REPLAY:
            if len(pending) < len(prefix):
                if not prefix.startswith(pending):
                    raise Diverged(f"replay diverged after {_common(prefix, pending)} of "
                                   f"{len(prefix)} delivered characters")
                if finishing:
                    raise Diverged("replay ended before reaching the delivered text")
                return None
            if not pending.startswith(prefix):
                raise Diverged(f"replay diverged after {_common(prefix, pending)} of "
                               f"{len(prefix)} delivered characters")
            self.decided = True
            return pending[len(prefix):]
        # Prefill: an output that starts by repeating the prefill is an echo.
        if prefix.startswith(pending) and not finishing:
            return None  # possibly an echo in progress
        self.decided = True
        if pending.startswith(prefix):
            return pending[len(prefix):]
        if prefix.startswith(pending):
            return ""  # finished within a partial echo: nothing new
        return pending

    def _usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        """Usage for the whole answer: a prefill's prompt included the carried text."""
        if self.mode != PREFILL:
            return usage  # a replay generated the whole answer itself
        carried = self.carried_chunks
        prompt = max(0, int(usage.get("prompt_tokens") or 0) - carried)
        completion = int(usage.get("completion_tokens") or 0) + carried
        return {**usage, "prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _event(self, obj: dict[str, Any]) -> bytes:
        if self.delivered.id is not None:
            obj["id"] = self.delivered.id
        if self.delivered.created is not None:
            obj["created"] = self.delivered.created
        return b"data: " + orjson.dumps(obj) + b"\n\n"


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def continuation_body(body: dict[str, Any], endpoint_is_chat: bool, delivered: Delivered,
                      model: str | None, carried_tokens: int | None = None
                      ) -> dict[str, Any] | None:
    """The request that asks an instance to continue the delivered text, or None if it
    cannot be asked (a completions prompt that is not a string).

    `carried_tokens` is the delivered text's length in the instance's tokens when known;
    otherwise its content chunks stand in (one token each for most servers)."""
    carried = delivered.content_chunks if carried_tokens is None else carried_tokens
    text = delivered.text
    out = dict(body)
    if model is not None:
        out["model"] = model
    out["stream"] = True
    for key in ("max_tokens", "max_completion_tokens"):
        limit = body.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool):
            out[key] = max(1, limit - carried)  # what is left of the budget
    if endpoint_is_chat:
        out["messages"] = [*body["messages"], {"role": "assistant", "content": text}]
        return out
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        return None
    out["prompt"] = prompt + text
    return out
