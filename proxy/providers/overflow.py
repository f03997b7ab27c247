"""Every server's way of saying "the prompt does not fit the context window".

One classifier for all of them, so that an overflow reroutes to an instance with a larger
window (and teaches the proxy the window of an instance whose config does not state it)
whatever server said it, in whatever shape. Anything else stays the client's error.

How servers word and shape it (status; body; message):

- OpenAI: 400 `{"error": {"message", "type": "invalid_request_error", "param",
  "code": "context_length_exceeded"}}`; "This model's maximum context length is N
  tokens. However, your messages resulted in M tokens. ...", for text completions "...
  is N tokens, however you requested M tokens (P in your prompt; C for the completion)",
  and for newer models "Input tokens exceed the configured limit of N tokens. Your
  messages resulted in M tokens." (the code is what we go by).
- vLLM (`vllm/entrypoints/openai/serving_engine.py`, `VLLMValidationError`): 400, before
  v0.10.1 a top-level `{"object": "error", "message", "type": "BadRequestError", "param",
  "code": 400}`, since then (PR #22099) `{"error": {...}}` with the same fields. Wordings
  by version:
  "This model's maximum context length is N tokens. However, you requested M tokens (P in
  the messages, C in the completion). ..."; "... However, your request has P input
  tokens. ..."; "'max_tokens' or 'max_completion_tokens' is too large: C. This model's
  maximum context length is N tokens and your request has P input tokens (C > N - P)";
  "... However, you requested M tokens in the messages, Please reduce ..."; "... However,
  you requested C output tokens and your prompt contains at least P input tokens, for a
  total of at least M tokens. ...".
- SGLang: 400 in vLLM's old top-level shape; "The input (M tokens) is longer than the
  model's context length (N tokens)."; also "Requested token count exceeds the model's
  maximum context length of N tokens. ...".
- llama.cpp `llama-server` (`tools/server`, `ERROR_TYPE_EXCEED_CONTEXT_SIZE`): 400
  `{"error": {"code": 400, "message", "type": "exceed_context_size_error",
  "n_prompt_tokens": M, "n_ctx": N}}`; "request (M tokens) exceeds the available context
  size (N tokens), try increasing it" (older builds: "the request exceeds the available
  context size, try increasing it", no numbers; "input (M tokens) is larger than the max
  context size (N tokens). skipping"). Streamed or not, the same 400 (checked against the
  llama.cpp vendored by llama-cpp-python 0.3.36: tests/test_llamacpp.py).
- LM Studio (its llama.cpp engine): 400 `{"error": "The number of tokens to keep from the
  initial prompt is greater than the context length (n_keep: M >= n_ctx: N). Try to load
  the model with a larger context length, or provide a shorter input."}` (a string error;
  the numbers are not always there); and "Trying to keep the first M tokens when context
  the overflows. However, the model is loaded with context length of only N tokens, which
  is not enough. ..." (a string error too).
- TGI (`router/src/validation.rs`, `ValidationError`): 422 `{"error": "Input validation
  error: `inputs` tokens + `max_new_tokens` must be <= N. Given: P `inputs` tokens and C
  `max_new_tokens`", "error_type": "validation"}` (older releases without the backticks);
  "`inputs` must have less than L tokens. Given: P" is its input limit, not the window.
- Ollama: 400 `{"error": "prompt too long; exceeded max context length by K tokens"}`
  natively, `{"error": {"message": ...}}` on `/v1`; states neither the window nor the size.
- Anthropic: 400 `{"type": "error", "error": {"type": "invalid_request_error", "message":
  "prompt is too long: M tokens > N maximum"}}`, and before Claude 4.5 "input length and
  `max_tokens` exceed context limit: P + C > N, decrease input length or `max_tokens` and
  try again". (Its 413 `request_too_large` is about bytes, not tokens: not an overflow.)

Pure functions over the status and the body; no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

#: Statuses an overflow comes with (TGI answers 422; 413 from gateways that say it so).
STATUSES = frozenset({400, 413, 422})
#: Error codes and types that say it outright (OpenAI; llama.cpp).
_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error"})


@dataclass(frozen=True, slots=True)
class Overflow:
    """A context-window overflow: the instance's window and the size the request needed,
    in the server's tokens, each None when the message does not say it."""

    window: int | None
    requested: int | None
    message: str

    def describe(self) -> str:
        """A one-line detail for events, logs and the client's error message."""
        if self.window is not None and self.requested is not None:
            return f"context window {self.window} tokens < {self.requested} requested"
        if self.window is not None:
            return f"prompt exceeds the context window of {self.window} tokens"
        if self.requested is not None:
            return f"{self.requested} tokens requested exceed the context window"
        return "prompt exceeds the instance's context window"


_Numbers = Callable[[re.Match[str]], tuple[int | None, int | None]]


def _i(text: str | None) -> int | None:
    return int(text.replace(",", "")) if text else None


#: (pattern, (window, requested) from its match), tried in order; the first match wins.
_WORDINGS: tuple[tuple[re.Pattern[str], _Numbers], ...] = (
    # llama.cpp: "request (M tokens) exceeds the available context size (N tokens)".
    (re.compile(r"(?:request|input) \((\d+) tokens\) (?:exceeds the available|is larger "
                r"than the max) context size \((\d+) tokens\)"),
     lambda m: (_i(m[2]), _i(m[1]))),
    (re.compile(r"exceeds the available context size"), lambda m: (None, None)),
    # SGLang (and Together): "The input (M tokens) is longer than the model's context
    # length (N tokens)."
    (re.compile(r"input \((\d+) tokens\) is longer than the model'?s context length "
                r"\((\d+) tokens\)"),
     lambda m: (_i(m[2]), _i(m[1]))),
    # vLLM's max_tokens form: "is too large: C. This model's maximum context length is N
    # tokens and your request has P input tokens".
    (re.compile(r"is too large: (\d+)\. this model'?s maximum context length is (\d+) "
                r"tokens and your request has (\d+) input tokens"),
     lambda m: (_i(m[2]), (_i(m[1]) or 0) + (_i(m[3]) or 0))),
    # OpenAI and vLLM: "maximum context length is N tokens. However, you requested M
    # tokens" / "your messages resulted in M tokens" / "your request has M input tokens" /
    # "... for a total of at least M tokens".
    (re.compile(r"maximum context length is (\d+) tokens(?:.*?(?:for a total of (?:at "
                r"least )?|you requested |resulted in |request has )(\d+) (?:input )?"
                r"tokens)?", re.DOTALL),
     lambda m: (_i(m[1]), _i(m[2]))),
    (re.compile(r"maximum context length of (\d+) tokens"), lambda m: (_i(m[1]), None)),
    # vLLM's input processor (token-id prompts): "The decoder prompt (length M) is longer
    # than the maximum model length of N."
    (re.compile(r"\(length (\d+)\) is longer than the maximum model length of (\d+)"),
     lambda m: (_i(m[2]), _i(m[1]))),
    # TGI: "`inputs` tokens + `max_new_tokens` must be <= N. Given: P `inputs` tokens and
    # C `max_new_tokens`".
    (re.compile(r"`?inputs?`? tokens \+ `?max_new_tokens`? must be <= (\d+)\. given: "
                r"(\d+) `?inputs?`? tokens and (\d+)"),
     lambda m: (_i(m[1]), (_i(m[2]) or 0) + (_i(m[3]) or 0))),
    (re.compile(r"`?inputs`? must have less than (\d+) tokens\. given: (\d+)"),
     lambda m: (None, _i(m[2]))),
    # LM Studio: "tokens to keep from the initial prompt is greater than the context
    # length (n_keep: M >= n_ctx: N)".
    (re.compile(r"greater than the context length(?: \(n_keep: ?(\d+) ?>= ?n_ctx: ?(\d+)\))?"),
     lambda m: (_i(m[2]), _i(m[1]))),
    # LM Studio, its other wording (lmstudio-bug-tracker #237, #546): "Trying to keep the
    # first M tokens when context the overflows. However, the model is loaded with context
    # length of only N tokens, which is not enough." (newer builds: "when context overflows").
    (re.compile(r"trying to keep the first (\d+) tokens when context (?:the )?overflows\. "
                r"however, the model is loaded with (?:a )?context length of only (\d+) tokens"),
     lambda m: (_i(m[2]), _i(m[1]))),
    # Anthropic: "prompt is too long: M tokens > N maximum"; "input length and
    # `max_tokens` exceed context limit: P + C > N".
    (re.compile(r"prompt is too long: ([\d,]+) tokens > ([\d,]+) maximum"),
     lambda m: (_i(m[2]), _i(m[1]))),
    (re.compile(r"exceed context limit: (\d+) \+ (\d+) > (\d+)"),
     lambda m: (_i(m[3]), (_i(m[1]) or 0) + (_i(m[2]) or 0))),
    # OpenAI: "Input tokens exceed the configured limit of N tokens. Your messages
    # resulted in M tokens."; "Your input exceeds the context window of this model."
    (re.compile(r"exceed the configured limit of (\d+) tokens\. your messages resulted in "
                r"(\d+) tokens"),
     lambda m: (_i(m[1]), _i(m[2]))),
    (re.compile(r"exceeds the context window"), lambda m: (None, None)),
    # Ollama: "prompt too long; exceeded max context length by K tokens"; its embeddings:
    # "the input length exceeds the context length".
    (re.compile(r"prompt too long; exceeded (?:max )?context length"), lambda m: (None, None)),
    (re.compile(r"input length exceeds the context length"), lambda m: (None, None)),
)
#: Cheap gate before the patterns: every wording above contains one of these.
_HINTS = ("context", "too long", "must be <=", "must have less than", "model length")
_N_CTX = re.compile(r"n_ctx\D{0,3}(\d+)")


def classify(status: int, body: bytes) -> Overflow | None:
    """The overflow an error response reports, or None if it is about something else.

    `status` is the HTTP status (an overflow comes with one of STATUSES); `body` the
    response body in any of the shapes above, or plain text.
    """
    if status not in STATUSES:
        return None
    return _classify_parts(*_parts(body))


def of_error(error: object) -> Overflow | None:
    """The overflow an in-band error (the `error` of a streamed event) reports, or None."""
    if isinstance(error, str):
        return _classify_parts(error, None, None)
    if isinstance(error, dict):
        return _classify_parts(*_fields(error))
    return None


def _parts(body: bytes) -> tuple[str, str | None, dict[str, Any] | None]:
    """(message, code or type, the error object) of an error body of any known shape."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")[:4096], None, None
    if not isinstance(parsed, dict):
        return "", None, None
    error = parsed.get("error")
    if isinstance(error, dict):
        return _fields(error)  # OpenAI, llama.cpp, vLLM >= 0.10.1, Anthropic, Ollama /v1
    if isinstance(error, str):
        return error, None, None  # TGI, Ollama, LM Studio
    if isinstance(parsed.get("message"), str):
        return _fields(parsed)  # vLLM < 0.10.1, SGLang: {"object": "error", "message", ...}
    detail = parsed.get("detail")
    return (detail if isinstance(detail, str) else ""), None, None


def _fields(error: dict[str, Any]) -> tuple[str, str | None, dict[str, Any] | None]:
    message = error.get("message")
    code = error.get("code")
    kind = error.get("type")
    tag = code if isinstance(code, str) and code in _CODES else \
        kind if isinstance(kind, str) and kind in _CODES else None
    return (message if isinstance(message, str) else ""), tag, error


def _classify_parts(message: str, tag: str | None,
                    error: dict[str, Any] | None) -> Overflow | None:
    lowered = message.lower()
    if tag is None and not any(hint in lowered for hint in _HINTS):
        return None
    window = requested = None
    matched = tag is not None
    for pattern, numbers in _WORDINGS:
        found = pattern.search(lowered)
        if found is not None:
            window, requested = numbers(found)
            matched = True
            break
    if not matched:
        return None
    if error is not None:  # llama.cpp states both as fields beside its message
        window = _positive(error.get("n_ctx")) or window
        requested = _positive(error.get("n_prompt_tokens")) or requested
    if window is None and tag is not None:
        found = _N_CTX.search(lowered)
        window = _i(found[1]) if found else None
    return Overflow(window, requested, message)


def _positive(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else None
