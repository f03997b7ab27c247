"""Token counts and cost of an answer: what the upstream reported in `usage`, priced with
the instance's `metadata.cost`.

`usage` is OpenAI's shape (`prompt_tokens`, `completion_tokens`, and the cached part of
the prompt in `prompt_tokens_details.cached_tokens`, OpenAI API reference "The chat
completion object"); llama.cpp's server, vLLM, Ollama's /v1 and LM Studio send the same
names, and Anthropic's is translated into it (proxy/providers/anthropic_responses.py). A stream carries it
in its last chunk when the client asked for `stream_options.include_usage` (some servers
send it regardless). An answer without usage has no figures here: nothing is estimated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from proxy.config import InstanceConfig

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*([0-9]{1,12})')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*([0-9]{1,12})')
_CACHED = re.compile(rb'"cached_tokens"\s*:\s*([0-9]{1,12})')


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one answer, and its cost in the currency of `metadata.cost` (0.0 when the
    instance declares no cost)."""

    prompt: int
    completion: int
    cached: int
    cost: float

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "cached_tokens": self.cached, "cost": round(self.cost, 8)}


def priced(prompt: int, completion: int, cached: int, cfg: InstanceConfig) -> Usage:
    """A Usage with its cost: prompt tokens at `input_per_mtok` and completion tokens at
    `output_per_mtok`, per million (cached prompt tokens at the input price: the config
    has no separate price for them)."""
    cost = (prompt * cfg.cost_input_per_mtok + completion * cfg.cost_output_per_mtok) / 1e6
    return Usage(prompt, completion, cached, cost)


def of_object(usage: Any, cfg: InstanceConfig) -> Usage | None:
    """The Usage of a decoded `usage` object (a stream chunk's), or None when it is not
    one."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return priced(prompt, completion, cached if isinstance(cached, int) else 0, cfg)


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
        return None
    cached = _CACHED.search(body, at)
    return priced(int(prompt.group(1)), int(completion.group(1)),
                  int(cached.group(1)) if cached is not None else 0, cfg)
