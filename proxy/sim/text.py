"""Deterministic answer text for the simulated backend.

The simulator and the tests both derive the "correct" answer from here, so a
test can tell exactly which words a client should have received. Every word
carries its position (``"bakoti0 rumesa1 ..."``), which makes a duplicated,
missing or reordered word visible in the joined text, e.g. after a failover
that resumed a stream at the wrong place.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "SYLLABLES",
    "answer_text",
    "answer_words",
    "embedding_vector",
    "message_text",
    "prompt_of_messages",
    "reasoning_words",
    "stream_pieces",
]

# 16 consonants x 5 vowels = 80 syllables; three per word give 512,000 stems,
# so two different prompts practically never share even a one-word answer.
SYLLABLES: tuple[str, ...] = tuple(c + v for c in "bdfghklmnprstvwz" for v in "aeiou")

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _seed(model: str, prompt: str) -> int:
    # blake2b rather than hash(): hash() of str is salted per process, and the
    # answer must be identical in the simulator process and the test process.
    digest = hashlib.blake2b(f"{model}\0{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _mix(x: int) -> int:
    # splitmix64 finaliser: word i depends only on (seed, i), so the answer for
    # n words is always a prefix of the answer for more words.
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def answer_words(model: str, prompt: str, n: int) -> list[str]:
    """Return the first ``n`` answer words for ``model`` and ``prompt``.

    Words are unique within an answer (each ends in its index) and differ
    between models and prompts; the result is stable across processes.
    """
    seed = _seed(model, prompt)
    syl = SYLLABLES
    k = len(syl)
    words: list[str] = []
    for i in range(max(n, 0)):
        h = _mix((seed + (i + 1) * _GOLDEN) & _MASK64)
        words.append(f"{syl[h % k]}{syl[(h >> 8) % k]}{syl[(h >> 16) % k]}{i}")
    return words


def reasoning_words(model: str, prompt: str, n: int) -> list[str]:
    """Return the first ``n`` words of the reasoning streamed before the answer (the
    simulator's ``reasoning=S``); unlike the answer's, and just as stable."""
    return answer_words(model, f"\0reasoning\0{prompt}", n)


def answer_text(model: str, prompt: str, n: int) -> str:
    """Return the answer words joined by single spaces."""
    return " ".join(answer_words(model, prompt, n))


def message_text(content: Any) -> str:
    """Return the text of one message ``content`` (string or list of parts).

    Non-text parts (images, audio, ...) and malformed parts are ignored.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"]
            for p in content
            if isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def prompt_of_messages(messages: Sequence[Any]) -> str:
    """Return the prompt key of a chat request.

    It is the text of every message joined by newlines, except a trailing
    assistant message: that one is a prefill (the start of the answer), so a
    continuation request maps to the same answer as the original request.
    """
    msgs: Iterable[Any] = messages
    if messages and _is_assistant(messages[-1]):
        msgs = messages[:-1]
    return "\n".join(message_text(m.get("content")) for m in msgs if isinstance(m, Mapping))


def _is_assistant(message: Any) -> bool:
    return isinstance(message, Mapping) and message.get("role") == "assistant"


def stream_pieces(words: Sequence[str]) -> list[str]:
    """Return the content pieces as streamed: ``["w0", " w1", " w2", ...]``.

    ``"".join(stream_pieces(words)) == " ".join(words)``.
    """
    if not words:
        return []
    return [words[0], *(" " + w for w in words[1:])]


def embedding_vector(text: str) -> list[float]:
    """Return a deterministic unit vector of 8 floats for ``text``."""
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    raw = struct.unpack("<8h", digest)
    norm = math.sqrt(sum(v * v for v in raw))
    if norm == 0.0:  # all-zero digest: astronomically unlikely, but stay a unit vector
        return [1.0] + [0.0] * 7
    return [v / norm for v in raw]
