"""What the simulator sends, in each server's shape: errors (a context overflow in every
server's wording), rate-limit headers, server-sent events, and the deterministic answer
cut into pieces (see proxy.sim.text)."""

from __future__ import annotations

import bisect
import enum
import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from proxy.sim.faults import REASONING_STEP_S, Faults
from proxy.sim.text import answer_words, reasoning_words, stream_pieces

JSON_HEADERS: Final = {"Content-Type": "application/json"}
SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE: Final = b"data: [DONE]\n\n"
MALFORMED: Final = b"data: {not json\n\n"
ERROR_EVENT: Final = (
    b'data: {"error": {"message": "simulated failure", "type": "server_error", "code": null}}\n\n'
)
#: Azure OpenAI's first chat stream event (prompt filter results; no model, no choices).
AZURE_PRELUDE: Final = (
    b'data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":'
    b'[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},'
    b'"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,'
    b'"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}}]}\n\n'
)


class BadRequest(Exception):
    """A request the simulated server refuses with a 400 in OpenAI's shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class Refused(Exception):
    """A request answered with an error in some server's own status and body shape."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status)
        self.status, self.body = status, body


def context_error(style: str, n_ctx: int, tokens: int, param: str) -> tuple[int, Any]:
    """(status, body) of a context overflow as server `style` answers it (the wordings and
    their sources are in proxy.providers.overflow's docstring)."""
    if style == "vllm":
        return 400, {"error": {
            "message": f"This model's maximum context length is {n_ctx} tokens. However, you "
                       f"requested 0 output tokens and your prompt contains at least {tokens} "
                       f"input tokens, for a total of at least {tokens} tokens. Please reduce "
                       f"the length of the input prompt or the number of requested output "
                       f"tokens. (parameter=input_tokens, value={tokens})",
            "type": "BadRequestError", "param": "input_tokens", "code": 400}}
    if style in ("vllm_old", "sglang"):
        message = (f"The input ({tokens} tokens) is longer than the model's context length "
                   f"({n_ctx} tokens)." if style == "sglang" else
                   f"This model's maximum context length is {n_ctx} tokens. However, you "
                   f"requested {tokens} tokens ({tokens} in the messages, 0 in the completion)."
                   f" Please reduce the length of the messages or completion.")
        return 400, {"object": "error", "message": message, "type": "BadRequestError",
                     "param": None, "code": 400}
    if style == "tgi":
        return 422, {"error": f"Input validation error: `inputs` tokens + `max_new_tokens` must "
                              f"be <= {n_ctx}. Given: {tokens} `inputs` tokens and 0 "
                              f"`max_new_tokens`", "error_type": "validation"}
    if style == "llamacpp":
        return 400, {"error": {"code": 400, "message": f"request ({tokens} tokens) exceeds the "
                               f"available context size ({n_ctx} tokens), try increasing it",
                               "type": "exceed_context_size_error", "n_prompt_tokens": tokens,
                               "n_ctx": n_ctx}}
    if style == "llamacpp_old":
        return 400, {"error": {"code": 400, "message": "the request exceeds the available context "
                               "size, try increasing it", "type": "invalid_request_error"}}
    if style == "ollama":
        return 400, {"error": f"prompt too long; exceeded max context length by "
                              f"{tokens - n_ctx} tokens"}
    if style == "lmstudio":
        return 400, {"error": f"The number of tokens to keep from the initial prompt is greater "
                              f"than the context length (n_keep: {tokens} >= n_ctx: {n_ctx}). Try "
                              f"to load the model with a larger context length, or provide a "
                              f"shorter input."}
    if style == "anthropic":
        return 400, {"type": "error", "error": {
            "type": "invalid_request_error",
            "message": f"prompt is too long: {tokens} tokens > {n_ctx} maximum"}}
    return 400, {"error": {
        "message": f"This model's maximum context length is {n_ctx} tokens. However, your "
                   f"request resulted in {tokens} tokens. Please reduce the length of the "
                   f"{param}.",
        "type": "invalid_request_error", "param": param, "code": "context_length_exceeded"}}


def error(
    status: int,
    message: str,
    type_: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})
    hdrs = JSON_HEADERS if headers is None else {**JSON_HEADERS, **headers}
    return web.Response(status=status, body=body, headers=hdrs)


def error_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")


RATE_LIMIT: Final = 1000  # requests per window, as the simulated x-ratelimit-* headers say


def ratelimit_headers(remaining: int, reset: str) -> dict[str, str]:
    """OpenAI's rate-limit headers (OpenAI docs, "Rate limits"): resets are durations."""
    return {
        "x-ratelimit-limit-requests": str(RATE_LIMIT),
        "x-ratelimit-remaining-requests": str(remaining),
        "x-ratelimit-reset-requests": reset,
        "x-ratelimit-limit-tokens": "200000",
        "x-ratelimit-remaining-tokens": "199000" if remaining else "0",
        "x-ratelimit-reset-tokens": reset,
    }


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@dataclass(frozen=True, slots=True)
class _Answer:
    pieces: tuple[str, ...]
    text: str
    ends: tuple[int, ...]  # ends[i] = len("".join(pieces[: i + 1]))


@functools.lru_cache(maxsize=4096)
def answer(model: str, prompt: str, n: int) -> _Answer:
    # Cached: benchmarks repeat the same prompt, and the answer never changes.
    pieces = tuple(stream_pieces(answer_words(model, prompt, n)))
    return _Answer(pieces, "".join(pieces), tuple(itertools.accumulate(map(len, pieces))))


def remainder(ans: _Answer, k: int) -> tuple[str, ...]:
    """Pieces of ``ans.text[k:]``; the first one may be the tail of a word."""
    idx = bisect.bisect_right(ans.ends, k)
    if idx >= len(ans.pieces):
        return ()
    start = ans.ends[idx - 1] if idx else 0
    return (ans.pieces[idx][k - start :], *ans.pieces[idx + 1 :])


def limit_of(data: dict[str, Any]) -> int | None:
    limit: int | None = None
    for key in ("max_tokens", "max_completion_tokens"):
        v = data.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise BadRequest(f"'{key}' must be a non-negative integer", key)
        limit = v if limit is None else min(limit, v)
    return limit


def include_usage(data: dict[str, Any]) -> bool:
    opts = data.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def thoughts_of(faults: Faults, base: dict[str, Any], model: str, prompt: str) -> list[bytes]:
    """The reasoning events of ``reasoning=S``: one per REASONING_STEP_S, each a piece of
    :func:`reasoning_words` in the ``reasoning_field`` of its delta."""
    if faults.reasoning <= 0:
        return []
    n = max(1, round(faults.reasoning / REASONING_STEP_S))
    field = faults.reasoning_field
    return [sse({**base, "choices": [{"index": 0, "delta": {field: piece},
                                       "finish_reason": None}]})
            for piece in stream_pieces(reasoning_words(model, prompt, n))]


class End(enum.Enum):
    """How a stream ends: cleanly, cut (die_after) or stalled (stall_after)."""

    CLEAN = "clean"
    DIE = "die"
    STALL = "stall"


def faulty_events(
    faults: Faults,
    events: list[bytes],
    pieces: Sequence[bytes],
    finish_ev: bytes,
    usage_ev: bytes | None,
) -> End:
    """Fill ``events`` for a stream with fault points (``pieces`` are the events of the
    reasoning and answer pieces); return how it ends."""
    for i in range(len(pieces) + 1):  # i = pieces already sent
        if faults.malformed_after == i:
            events.append(MALFORMED)
        if faults.error_after == i:
            events.append(ERROR_EVENT)
            return End.CLEAN
        if faults.die_after == i:
            return End.DIE
        if faults.stall_after == i:
            return End.STALL
        if i < len(pieces):
            events.append(pieces[i])
    if faults.no_finish:
        return End.CLEAN
    events.append(finish_ev)
    if usage_ev is not None:
        events.append(usage_ev)
    if not faults.no_done:
        events.append(DONE)
    return End.CLEAN

