"""Token counts and cost of an answer: what the upstream reported in `usage`, priced with
the instance's `metadata.cost`.

`usage` is OpenAI's shape (`prompt_tokens`, `completion_tokens`, and the cached part of
the prompt in `prompt_tokens_details.cached_tokens`, OpenAI API reference "The chat
completion object"); llama.cpp's server, vLLM, Ollama's /v1 and LM Studio send the same
names, and Anthropic's is translated into it (proxy/providers/anthropic_responses.py). A stream carries it
in its last chunk when the client asked for `stream_options.include_usage` (some servers
send it regardless).

An answer without usage (a stream whose client did not ask for `include_usage`, a server
that leaves it out) gets an estimate, marked `estimated` wherever it shows: the prompt as
the planner estimates it (proxy.routing.requirements: characters / 4 plus per-message and
image overhead), the completion as the characters of the answer's text, reasoning and tool
calls / 4 (`CHARS_PER_TOKEN`, no tokenizer: cheap, offline, and within about 30% for
English text and code; cached tokens are never estimated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson

from proxy.audit.schema import usage_doc
from proxy.config import InstanceConfig
from proxy.routing.requirements import CHARS_PER_TOKEN

#: The largest token count believed: 12 digits (what `of_body` reads).
MAX_TOKENS = 10**12 - 1
_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*([0-9]{1,12})')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*([0-9]{1,12})')
_CACHED = re.compile(rb'"cached_tokens"\s*:\s*([0-9]{1,12})')
# Anthropic's Messages API (a native /v1/messages answer): `usage.input_tokens`,
# `usage.output_tokens` (Anthropic API reference, "Messages").
_INPUT = re.compile(rb'"input_tokens"\s*:\s*([0-9]{1,12})')
_OUTPUT = re.compile(rb'"output_tokens"\s*:\s*([0-9]{1,12})')


@dataclass(slots=True)
class Usage:
    """Tokens of one answer, and its cost in the currency of `metadata.cost` (0.0 when the
    instance declares no cost). `estimated`: no `usage` came with the answer; the figures
    are the estimate described above. Not changed once made (not frozen only because a
    frozen dataclass takes several times as long to make, and one is made per answer)."""

    prompt: int
    completion: int
    cached: int
    cost: float
    estimated: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The figures as the log line, the audit record and the request view show them:
        `{prompt_tokens, completion_tokens, cached_tokens, cost, tokens_estimated}`."""
        return usage_doc(self.prompt, self.completion, self.cached, self.cost, self.estimated)


def priced(prompt: int, completion: int, cached: int, cfg: InstanceConfig,
           estimated: bool = False) -> Usage:
    """A Usage with its cost: prompt tokens at `input_per_mtok` and completion tokens at
    `output_per_mtok`, per million (cached prompt tokens at the input price: the config
    has no separate price for them)."""
    cost = (prompt * cfg.cost_input_per_mtok + completion * cfg.cost_output_per_mtok) / 1e6
    return Usage(prompt, completion, cached, cost, estimated)


def estimate(prompt_tokens: int, completion_chars: int, cfg: InstanceConfig) -> Usage:
    """The estimated Usage of an answer without `usage`: the planner's prompt estimate,
    and `completion_chars` / CHARS_PER_TOKEN (rounded up) completion tokens."""
    completion = -(-completion_chars // CHARS_PER_TOKEN)
    return priced(prompt_tokens, completion, 0, cfg, estimated=True)


def estimate_body(body: bytes, prompt_tokens: int, cfg: InstanceConfig) -> Usage:
    """The estimated Usage of a whole JSON answer without `usage` (parsed only then): its
    choices' text, reasoning and tool calls (OpenAI's chat and completions shapes) or its
    content blocks (Anthropic's)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    return estimate(prompt_tokens, _chars(doc.get("choices") if isinstance(doc, dict) else None)
                    + _chars(doc.get("content") if isinstance(doc, dict) else None), cfg)


_TEXT_KEYS = ("content", "text", "reasoning_content", "reasoning", "refusal", "thinking",
              "arguments", "input")


def _chars(value: Any, depth: int = 0) -> int:
    """Characters of the answer text under `value` (a choice list, a message, a content
    block list), walking at most a few levels."""
    if isinstance(value, str):
        return len(value)
    if depth > 5:
        return 0
    if isinstance(value, list):
        return sum(_chars(item, depth + 1) for item in value)
    if isinstance(value, dict):
        total = 0
        for key, item in value.items():
            if isinstance(item, str):
                total += len(item) if key in _TEXT_KEYS else 0
            elif key == "input" and isinstance(item, dict):  # an Anthropic tool_use's input
                total += len(orjson.dumps(item))
            elif isinstance(item, (dict, list)):
                total += _chars(item, depth + 1)
        return total
    return 0


def of_object(usage: Any, cfg: InstanceConfig) -> Usage | None:
    """The Usage of a decoded `usage` object (a stream chunk's), or None when it is not
    one (its counts not ints from 0 to MAX_TOKENS: the answer is then estimated)."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not _count(prompt) or not _count(completion):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return priced(prompt, completion, cached if _count(cached) else 0, cfg)


def _count(value: Any) -> TypeGuard[int]:
    """A token count a server could mean: an int (not a bool) from 0 to MAX_TOKENS, as
    the regular expressions of `of_body` read (a negative count would run the token
    counters backwards, one beyond 64 bits breaks the audit record's JSON)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS


def of_body(body: bytes, cfg: InstanceConfig) -> Usage | None:
    """The Usage of a whole JSON answer, read from its `usage` object without parsing the
    body (OpenAI-compatible servers write it last, after the choices, which hold the
    model's text and could hold anything); None when there is none."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    prompt = _PROMPT.search(body, at)
    completion = _COMPLETION.search(body, at)
    if prompt is None or completion is None:
        prompt, completion = _INPUT.search(body, at), _OUTPUT.search(body, at)
        if prompt is None or completion is None:
            return None
        return priced(int(prompt.group(1)), int(completion.group(1)), 0, cfg)
    cached = _CACHED.search(body, at)
    return priced(int(prompt.group(1)), int(completion.group(1)),
                  int(cached.group(1)) if cached is not None else 0, cfg)
