"""Committed streams: what the client has been sent, and how another instance's stream is
spliced in after a mid-stream failure so the client sees one answer.

Two ways to go on after a cut (SPEC section 6):
- prefill: the next instance is sent the original messages plus the text delivered so
  far as a final assistant message, and continues it. Some servers (llama.cpp) echo the
  prefill at the start of their output; the echo is recognised and dropped.
- replay: a twin (same model, no prefill support) regenerates the answer from the
  original messages; it is used only if it begins with exactly the delivered text, and
  only what follows is sent. Anything else is a divergence.

Reasoning (a reasoning model's thinking, streamed beside the answer: see
`sse.REASONING_FIELDS`) is not part of the answer text, and no server takes it back as
a prefill. So:
- once answer text was delivered, the prefill is that text alone (the reasoning is not
  re-sent) and whatever reasoning the continuation streams is not relayed: the client's
  reasoning phase is over, and a second one would be text it never asked for;
- a cut while only reasoning was delivered can be continued by a replay alone, held to
  the same rule: the twin's reasoning must begin with exactly the delivered reasoning,
  then the rest of its reasoning and its whole answer follow. A prefill cannot carry on a
  reasoning, so without a twin such a stream fails loudly.
The client never sees text twice, nor a gap.

Pure logic over parsed chunks; no I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.engine.chunks import REASONING_FIELDS, Chunk, delta_reasoning
from proxy.engine.record import PREFILL, REPLAY

#: Delta fields a spliced chunk does not pass on as they came: the role (the client has
#: had it), the answer and the reasoning (what of them is new is decided here), and
#: OpenRouter's structured `reasoning_details` (neither compared nor carried over).
_REWRITTEN = frozenset({"role", "content", "reasoning_details", *REASONING_FIELDS})


class Diverged(Exception):
    """A replay's output does not begin with the text the client already has."""


@dataclass(slots=True)
class Delivered:
    """What the client has received on a committed stream: answer text and reasoning,
    each as the pieces sent and their chunk count (a token count stand-in)."""

    id: str | None = None
    created: int | None = None
    pieces: list[str] = field(default_factory=list)
    content_chunks: int = 0
    reasoning_pieces: list[str] = field(default_factory=list)
    reasoning_chunks: int = 0
    tool_call: bool = False
    refusal: bool = False
    finished: bool = False
    role_sent: bool = False
    #: The usage the stream reported to the client (a spliced one's as rewritten).
    usage: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_pieces)

    def note(self, chunk: Chunk) -> None:
        """Account for one chunk sent as it was (the first instance's own stream)."""
        if self.id is None:
            obj = chunk.obj
            chunk_id = obj.get("id")
            self.id = chunk_id if isinstance(chunk_id, str) else None
            created = obj.get("created")
            self.created = created if isinstance(created, int) else None
        if chunk.text:
            self.pieces.append(chunk.text)
            self.content_chunks += 1
        if chunk.reasoning:
            self.reasoning_pieces.append(chunk.reasoning)
            self.reasoning_chunks += 1
        if chunk.tool_call:
            self.tool_call = True
        if chunk.refusal:
            self.refusal = True
        if chunk.finish_reason is not None:
            self.finished = True
        if chunk.usage is not None and isinstance(chunk.usage, dict):
            self.usage = chunk.usage
        self.role_sent = True


class _Prefix:
    """Holds back one channel's output (answer or reasoning) until it is clear what of it
    is new: an echo of a prefill, or a replay of what the client already has."""

    __slots__ = ("prefix", "mode", "pending", "decided")

    def __init__(self, prefix: str, mode: str) -> None:
        self.prefix = prefix
        self.mode = mode
        self.pending = ""
        self.decided = not prefix  # nothing delivered: everything is new

    def take(self, text: str, finishing: bool) -> str | None:
        """The new part of `text` to send, or None while undecided; raises Diverged."""
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


class Splicer:
    """Turns a continuation or replay stream into the rest of the client's stream."""

    def __init__(self, delivered: Delivered, mode: str) -> None:
        self.delivered = delivered
        self.mode = mode
        self.prefix = delivered.text
        self._answer = _Prefix(self.prefix, mode)
        #: Only reasoning was delivered: a replay must repeat it exactly, then go on.
        #: Otherwise the continuation's reasoning is not relayed (see the module doc).
        self._reasoning = (_Prefix(delivered.reasoning, REPLAY)
                           if not self.prefix and delivered.reasoning else None)
        #: Tokens of the delivered text, for usage; chunks unless the caller knows better.
        self.carried_chunks = delivered.content_chunks
        #: True once the upstream has streamed any output (even output held back or not
        #: relayed): from then on the wait between events is the idle timeout.
        self.producing = False
        #: True once this stream has sent the client something new, and when (perf_counter).
        self.committed = False
        self.committed_at: float | None = None

    def feed(self, obj: dict[str, Any]) -> bytes | None:
        """The event to send the client for this upstream chunk, or None to send nothing.

        Raises Diverged when a replay turns out to differ from what was delivered.
        """
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices:
            return self._usage_event(obj)
        choice = choices[0]
        if not isinstance(choice, dict):
            return None
        delta = choice.get("delta")
        text, thought, thought_field, other = _parts(choice, delta)
        finish = choice.get("finish_reason")
        if text or thought or other:
            self.producing = True
        new_thought = self._new_reasoning(thought, bool(text or other) or finish is not None)
        if new_thought is None:
            return None  # still replaying the delivered reasoning
        new = self._answer.take(text, finish is not None)
        if new is None:
            return None  # still deciding whether this is an echo or a faithful replay
        if not new and not new_thought and finish is None and not other:
            return None  # a role-only or empty chunk, or reasoning that is not relayed
        self._account(new, new_thought, delta, finish)
        out = {**obj, "choices": [_rewritten(choice, delta, new, new_thought, thought_field)]}
        usage = obj.get("usage")
        if isinstance(usage, dict):  # (llama.cpp puts it in the finishing chunk)
            out["usage"] = self.delivered.usage = self._usage(usage)
        return self._event(out)

    def _new_reasoning(self, thought: str, answering: bool) -> str | None:
        """What of a chunk's reasoning is new and relayed ("" when none is; None while a
        replay is still repeating the delivered reasoning). Once the answer begins, the
        replay's reasoning must have covered the delivered one (raises Diverged)."""
        reasoning = self._reasoning
        if reasoning is None:
            return ""  # the continuation's own reasoning is not relayed
        new = ""
        if thought:
            taken = reasoning.take(thought, False)
            if taken is None:
                return None
            new = taken
        if answering:
            reasoning.take("", True)
        return new

    def _account(self, new: str, new_thought: str, delta: Any, finish: Any) -> None:
        """Note what the client is about to be sent."""
        delivered = self.delivered
        if new:
            delivered.pieces.append(new)
            delivered.content_chunks += 1
        if new_thought:
            delivered.reasoning_pieces.append(new_thought)
            delivered.reasoning_chunks += 1
        if isinstance(delta, dict):
            if delta.get("tool_calls") or delta.get("function_call"):
                delivered.tool_call = True
            if delta.get("refusal"):
                delivered.refusal = True
        if finish is not None:
            delivered.finished = True
        if not self.committed:
            self.committed = True
            self.committed_at = time.perf_counter()

    def _usage_event(self, obj: dict[str, Any]) -> bytes | None:
        """A chunk without choices: its usage (for the whole answer), else nothing."""
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            return None
        self.delivered.usage = self._usage(usage)
        return self._event({**obj, "usage": self.delivered.usage})

    def _usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        """Usage for the whole answer: a prefill's prompt included the carried text, and
        the reasoning delivered before the cut was generated for this answer too."""
        if self.mode != PREFILL:
            return usage  # a replay generated the whole answer itself
        carried = self.carried_chunks
        prompt = max(0, int(usage.get("prompt_tokens") or 0) - carried)
        completion = (int(usage.get("completion_tokens") or 0) + carried
                      + self.delivered.reasoning_chunks)
        return {**usage, "prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _event(self, obj: dict[str, Any]) -> bytes:
        if self.delivered.id is not None:
            obj["id"] = self.delivered.id
        if self.delivered.created is not None:
            obj["created"] = self.delivered.created
        return b"data: " + orjson.dumps(obj) + b"\n\n"


def _parts(choice: dict[str, Any], delta: Any) -> tuple[str, str, str | None, bool]:
    """(answer text, reasoning, the reasoning's field, other output: a tool call or a
    refusal) of a chat delta or a text completion's choice."""
    if isinstance(delta, dict):
        content = delta.get("content")
        thought, thought_field = delta_reasoning(delta)
        other = bool(delta.get("tool_calls") or delta.get("function_call")
                     or delta.get("refusal"))
    else:
        content = choice.get("text")  # a text completion
        thought, thought_field, other = "", None, False
    return (content if isinstance(content, str) else ""), thought, thought_field, other


def _rewritten(choice: dict[str, Any], delta: Any, new: str, new_thought: str,
               thought_field: str | None) -> dict[str, Any]:
    """The choice as the client gets it: only the new text and reasoning, no role."""
    out_choice = dict(choice)
    if isinstance(delta, dict):
        out_delta = {k: v for k, v in delta.items() if k not in _REWRITTEN}
        if new or "content" in delta:
            out_delta["content"] = new
        if new_thought and thought_field is not None:
            out_delta[thought_field] = new_thought
        out_choice["delta"] = out_delta
    else:
        out_choice["text"] = new
    return out_choice


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
    otherwise its content chunks stand in (one token each for most servers). The client's
    `max_tokens` also paid for the delivered reasoning (vLLM, llama.cpp and the DeepSeek
    API count reasoning tokens in it), so its chunks come off the budget too; the
    reasoning itself is not sent (see the module doc)."""
    carried = delivered.content_chunks if carried_tokens is None else carried_tokens
    carried += delivered.reasoning_chunks
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
