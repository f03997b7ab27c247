"""Simulated OpenAI-compatible backend with injectable faults.

Used by the tests, the demo and the benchmarks. It listens on a real TCP port,
answers ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` and
``/v1/models`` in the OpenAI wire format (plus llama.cpp's ``/health`` and
``/props``), with text from :mod:`proxy.simtext` so a client can check what it
received word by word.

Faults (``name`` or ``name=value``) are set at construction, with
:meth:`Simulator.set_faults`, or over HTTP with ``POST /_sim/faults``:

===================  =========================================================
``refuse``           not listening: connections are refused; applying it also
                     aborts open connections (the backend went down)
``hang``             read the request, never answer
``slow_first_byte=S`` wait S seconds before the response headers
``die_after=N``      stream: abort the TCP connection after N content pieces;
                     non-stream: send full Content-Length, half the body, abort
``stall_after=N``    stream: stop after N pieces, keep the connection open;
                     non-stream: headers, then nothing
``malformed_after=N`` stream: one ``data: {not json`` event after N pieces
``error_after=N``    stream: in-band error event after N pieces, end, no [DONE]
``no_done``          stream: no ``data: [DONE]``
``no_finish``        stream: neither finish_reason chunk nor [DONE]
``status=CODE``      answer with that HTTP status (400-599) and an error body
``rate_limit=S``     answer 429 with ``Retry-After: S``
``model=NAME``       serve (report and generate for) model NAME instead
``context=N``        400 context_length_exceeded if the prompt has > N words
``times=N``          the whole set applies to the next N model requests only,
                     then it is cleared (cannot be combined with ``refuse``)
``models=A,B``       list these ids (``/v1/models``, ``/api/tags``) like a
                     multi-model server or gateway, and answer as the
                     request's ``model`` (as Ollama, vLLM and gateways echo it)
``model_file=PATH``  ``/props`` reports this ``model_path`` (llama.cpp's loaded
                     file; default ``/models/MODEL.gguf``)
``azure_prelude``    streams begin with Azure OpenAI's prompt-filter event:
                     ``"model": ""``, ``"choices": []``
``reasoning=S``      chat stream: S seconds of reasoning deltas (ten a second,
                     ``delta.reasoning_content``) before the answer; they count
                     as pieces for the stream faults above
``reasoning_field=F`` the delta field of that reasoning: ``reasoning_content``
                     (DeepSeek, llama.cpp), ``reasoning`` (vLLM, OpenRouter,
                     Ollama) or ``thinking``
``refusal``          chat stream: the words come as ``delta.refusal`` (OpenAI)
``context_style=W``  how ``context=N`` says it, as server W does:
                     ``openai`` (default), ``vllm``, ``vllm_old``, ``sglang``,
                     ``tgi``, ``llamacpp``, ``llamacpp_old``, ``ollama``,
                     ``lmstudio``, ``anthropic`` (status, body shape, wording)
``ratelimit_headers`` successful answers carry OpenAI's ``x-ratelimit-*``
                     headers (a 429 from ``rate_limit`` always does, with
                     ``retry-after-ms`` too)
``strict_models``    a request naming a model this server does not serve gets
                     404 model-not-found, as Ollama, vLLM and LM Studio answer
===================  =========================================================

A stream fault whose N is larger than the number of pieces never fires.
Faults other than ``refuse``, ``model``, ``models`` and ``model_file`` only
affect model requests (chat, completions, embeddings); ``/health``, ``/props``
and ``/v1/models`` keep answering normally.

Listening is done with :class:`aiohttp.web.Server` (aiohttp's low-level
server) on sockets this module binds itself, instead of ``AppRunner`` +
``TCPSite``: ``refuse`` must close and reopen the listener synchronously from
:meth:`Simulator.set_faults` on the same port, and connections must be counted
exactly. Open connections are counted by a ``web.Server`` subclass that
overrides its ``connection_made``/``connection_lost`` hooks, which every
``RequestHandler`` (one per TCP connection) calls; so a hung connection that
never produced a response is still counted, and is dropped from the count the
moment its socket closes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import enum
import functools
import itertools
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import orjson
from aiohttp import web

from .simtext import (
    answer_words,
    embedding_vector,
    message_text,
    prompt_of_messages,
    reasoning_words,
    stream_pieces,
)

__all__ = ["Faults", "SimStats", "Simulator", "add_arguments", "parse_faults", "run"]

_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

_JSON_HEADERS: Final = {"Content-Type": "application/json"}
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE: Final = b"data: [DONE]\n\n"
_MALFORMED: Final = b"data: {not json\n\n"
_ERROR_EVENT: Final = (
    b'data: {"error": {"message": "simulated failure", "type": "server_error", "code": null}}\n\n'
)
#: Azure OpenAI's first chat stream event (prompt filter results; no model, no choices).
_AZURE_PRELUDE: Final = (
    b'data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":'
    b'[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},'
    b'"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,'
    b'"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}}]}\n\n'
)


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True, slots=True)
class Faults:
    """A parsed, immutable fault set; ``spec`` keeps the normalised strings."""

    spec: tuple[str, ...] = ()
    refuse: bool = False
    hang: bool = False
    #: Like llama.cpp while it loads a model: /health and model requests answer 503.
    loading: bool = False
    #: Like llama.cpp: a continued assistant message is echoed before the continuation.
    echo_prefill: bool = False
    #: A careless server: answers 401 (or the `status` fault) quoting the key it was sent.
    leak_auth: bool = False
    #: Streams answer with a tool call (its arguments carry the words) instead of text.
    tool_call: bool = False
    slow_first_byte: float = 0.0
    die_after: int | None = None
    stall_after: int | None = None
    malformed_after: int | None = None
    error_after: int | None = None
    no_done: bool = False
    no_finish: bool = False
    status: int | None = None
    rate_limit: str | None = None  # the Retry-After header value
    model: str | None = None
    context: int | None = None
    times: int | None = None
    #: The ids a multi-model server or gateway lists; answers name the requested model.
    models: tuple[str, ...] = ()
    #: llama.cpp's /props `model_path` (the loaded file).
    model_file: str | None = None
    #: Azure OpenAI's first stream event: prompt filter results, no model, no choices.
    azure_prelude: bool = False
    #: Seconds of reasoning deltas before the answer, and their delta field.
    reasoning: float = 0.0
    reasoning_field: str = "reasoning_content"
    #: Streams answer with a refusal (`delta.refusal`) instead of text.
    refusal: bool = False
    #: Whose wording `context=N` uses (see _CONTEXT_STYLES).
    context_style: str = "openai"
    #: Like OpenAI: successful answers carry `x-ratelimit-*` headers.
    ratelimit_headers: bool = False
    #: Refuse (404) a request naming a model not served, as Ollama/vLLM/LM Studio do.
    strict_models: bool = False

    @property
    def shapes_stream(self) -> bool:
        """True if a stream must be built event by event (fault points)."""
        return (
            self.die_after is not None
            or self.stall_after is not None
            or self.malformed_after is not None
            or self.error_after is not None
            or self.no_done
            or self.no_finish
        )

    @property
    def before_headers(self) -> bool:
        """True if a fault acts before the request is even parsed."""
        return (
            self.hang
            or self.loading
            or self.leak_auth
            or self.slow_first_byte > 0
            or self.status is not None
            or self.rate_limit is not None
        )


_FLAGS: Final = frozenset({"refuse", "hang", "loading", "echo_prefill", "leak_auth", "no_done",
                            "no_finish", "tool_call", "azure_prelude", "refusal",
                            "ratelimit_headers", "strict_models"})
_COUNTS: Final = frozenset({"die_after", "stall_after", "malformed_after", "error_after", "context"})
_SECONDS: Final = frozenset({"slow_first_byte", "rate_limit", "reasoning"})
_STRINGS: Final = frozenset({"model", "model_file"})
#: Faults whose value is one of a few names.
_CHOICES: Final = {
    "reasoning_field": ("reasoning_content", "reasoning", "thinking"),
    "context_style": ("openai", "vllm", "vllm_old", "sglang", "tgi", "llamacpp", "llamacpp_old",
                      "ollama", "lmstudio", "anthropic"),
}
_KNOWN: Final = sorted(_FLAGS | _COUNTS | _SECONDS | {"status", "model", "times"}
                       | _STRINGS | {"models"} | set(_CHOICES))
#: Reasoning deltas come this often (so `reasoning=S` streams S / step of them).
REASONING_STEP_S: Final = 0.1


def parse_faults(specs: Sequence[str]) -> Faults:
    """Parse fault strings (``name`` or ``name=value``) into a :class:`Faults`.

    Raises ValueError with a readable message for unknown names or bad values.
    A fault given twice keeps its last value.
    """
    if isinstance(specs, str):  # a lone string would otherwise be split into letters
        specs = [specs]
    values: dict[str, Any] = {}
    for raw in specs:
        if not isinstance(raw, str):
            raise TypeError(f"fault must be a string, got {raw!r}")
        name, sep, value = raw.strip().partition("=")
        name, value = name.strip(), value.strip()
        if name not in _KNOWN:
            raise ValueError(f"unknown fault {name!r} (known: {', '.join(_KNOWN)})")
        if name in _FLAGS:
            if sep:
                raise ValueError(f"fault {name!r} takes no value")
            values[name] = True
            continue
        if not value:
            raise ValueError(f"fault {name!r} needs a value: {name}=VALUE")
        if name in _STRINGS:
            values[name] = value
        elif name == "models":
            ids = tuple(m.strip() for m in value.split(",") if m.strip())
            if not ids:
                raise ValueError("fault 'models' needs model ids: models=A,B")
            values[name] = ids
        elif name in _CHOICES:
            if value not in _CHOICES[name]:
                raise ValueError(f"fault {name!r} needs one of {', '.join(_CHOICES[name])}, "
                                 f"got {value!r}")
            values[name] = value
        elif name in _SECONDS:
            secs = _number(name, value)
            # Keep an integral Retry-After integral ("5", not "5.0"): clients parse it as int.
            values[name] = _fmt_seconds(secs) if name == "rate_limit" else secs
        else:
            n = _integer(name, value)
            if name == "status" and not 400 <= n <= 599:
                raise ValueError(f"fault 'status' needs an HTTP error code 400-599, got {n}")
            if name == "times" and n < 1:
                raise ValueError("fault 'times' needs a count >= 1")
            values[name] = n
    if values.get("refuse") and "times" in values:
        # refuse receives no requests, so nothing would ever count the times down.
        raise ValueError("fault 'times' cannot be combined with 'refuse'")
    spec = tuple(
        k if v is True else f"{k}={','.join(v) if isinstance(v, tuple) else v}"
        for k, v in sorted(values.items())
    )
    return Faults(spec=spec, **values)


def _integer(name: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"fault {name!r} needs an integer, got {value!r}") from None
    if n < 0:
        raise ValueError(f"fault {name!r} needs a non-negative integer, got {n}")
    return n


def _number(name: str, value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"fault {name!r} needs a number of seconds, got {value!r}") from None
    if not x >= 0 or x == float("inf"):  # also rejects nan
        raise ValueError(f"fault {name!r} needs a finite number of seconds >= 0, got {value!r}")
    return x


def _fmt_seconds(x: float) -> str:
    return str(int(x)) if x.is_integer() else repr(x)


_NO_FAULTS: Final = Faults()


# --------------------------------------------------------------------------- stats


@dataclass(slots=True)
class SimStats:
    """Counters of one simulator (control requests are not counted).

    ``open_connections`` and ``inflight`` are gauges (current values); the rest
    count since start or the last reset. ``completed_streams`` counts streams
    the simulator ended itself (including error_after/no_done/no_finish);
    ``aborted`` counts streams whose connection went away first (client
    disconnect, or :meth:`Simulator.stop`), not those cut by ``die_after``.
    """

    #: Model requests (chat, completions, embeddings); `by_path` counts every path.
    requests: int = 0
    #: Headers of the latest model request (to check what a proxy forwards).
    last_headers: dict[str, str] = field(default_factory=dict)
    #: The `model` of the latest model request.
    last_model: str | None = None
    #: The JSON body of the latest model request (to check what a proxy translated).
    last_body: dict[str, Any] | None = None
    by_path: dict[str, int] = field(default_factory=dict)
    open_connections: int = 0
    inflight: int = 0
    completed_streams: int = 0
    aborted: int = 0

    def reset(self) -> None:
        """Zero the counters, keeping the gauges."""
        self.requests = self.completed_streams = self.aborted = 0
        self.by_path.clear()


# --------------------------------------------------------------------------- server plumbing


class _TrackingServer(web.Server):
    """``web.Server`` that keeps the exact set of live TCP connections."""

    def __init__(self, handler: _Handler, on_count: Callable[[int], None] | None = None) -> None:
        # handler_cancellation: a hung/stalled handler is cancelled as soon as
        # its client goes away, so nothing lingers. access_log=None: no per-request logging.
        super().__init__(handler, handler_cancellation=True, access_log=None)
        self.live: dict[web.RequestHandler, asyncio.Transport] = {}
        self._on_count = on_count

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.live[handler] = transport
        if self._on_count is not None:
            self._on_count(len(self.live))

    def connection_lost(self, handler: web.RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        if self.live.pop(handler, None) is not None and self._on_count is not None:
            self._on_count(len(self.live))

    def abort_all(self, keep: asyncio.BaseTransport | None = None) -> None:
        """Reset every connection (RST, like a killed process), except ``keep``."""
        for transport in list(self.live.values()):
            if transport is not keep:
                transport.abort()


def _bind(host: str, port: int) -> socket.socket:
    """Return a bound, listening, non-blocking socket."""
    family, type_, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, type_, proto)
    try:
        # SO_REUSEADDR: a restart must get the same port even with TIME_WAIT leftovers.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(512)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def _forever() -> None:
    # Parks the handler until it is cancelled (client gone, or stop()).
    await asyncio.get_running_loop().create_future()


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class _Refused(Exception):
    """A request answered with an error in some server's own status and body shape."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status)
        self.status, self.body = status, body


def _context_error(style: str, n_ctx: int, tokens: int, param: str) -> tuple[int, Any]:
    """(status, body) of a context overflow as server `style` answers it (the wordings and
    their sources are in proxy.overflow's docstring)."""
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


def _error(
    status: int,
    message: str,
    type_: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})
    hdrs = _JSON_HEADERS if headers is None else {**_JSON_HEADERS, **headers}
    return web.Response(status=status, body=body, headers=hdrs)


def _error_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")


_RATE_LIMIT: Final = 1000  # requests per window, as the simulated x-ratelimit-* headers say


def _ratelimit_headers(remaining: int, reset: str) -> dict[str, str]:
    """OpenAI's rate-limit headers (OpenAI docs, "Rate limits"): resets are durations."""
    return {
        "x-ratelimit-limit-requests": str(_RATE_LIMIT),
        "x-ratelimit-remaining-requests": str(remaining),
        "x-ratelimit-reset-requests": reset,
        "x-ratelimit-limit-tokens": "200000",
        "x-ratelimit-remaining-tokens": "199000" if remaining else "0",
        "x-ratelimit-reset-tokens": reset,
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@dataclass(frozen=True, slots=True)
class _Answer:
    pieces: tuple[str, ...]
    text: str
    ends: tuple[int, ...]  # ends[i] = len("".join(pieces[: i + 1]))


@functools.lru_cache(maxsize=4096)
def _answer(model: str, prompt: str, n: int) -> _Answer:
    # Cached: benchmarks repeat the same prompt, and the answer never changes.
    pieces = tuple(stream_pieces(answer_words(model, prompt, n)))
    return _Answer(pieces, "".join(pieces), tuple(itertools.accumulate(map(len, pieces))))


def _remainder(ans: _Answer, k: int) -> tuple[str, ...]:
    """Pieces of ``ans.text[k:]``; the first one may be the tail of a word."""
    idx = bisect.bisect_right(ans.ends, k)
    if idx >= len(ans.pieces):
        return ()
    start = ans.ends[idx - 1] if idx else 0
    return (ans.pieces[idx][k - start :], *ans.pieces[idx + 1 :])


def _limit(data: dict[str, Any]) -> int | None:
    limit: int | None = None
    for key in ("max_tokens", "max_completion_tokens"):
        v = data.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise _BadRequest(f"'{key}' must be a non-negative integer", key)
        limit = v if limit is None else min(limit, v)
    return limit


def _include_usage(data: dict[str, Any]) -> bool:
    opts = data.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _thoughts(faults: Faults, base: dict[str, Any], model: str, prompt: str) -> list[bytes]:
    """The reasoning events of ``reasoning=S``: one per REASONING_STEP_S, each a piece of
    :func:`reasoning_words` in the ``reasoning_field`` of its delta."""
    if faults.reasoning <= 0:
        return []
    n = max(1, round(faults.reasoning / REASONING_STEP_S))
    field = faults.reasoning_field
    return [_sse({**base, "choices": [{"index": 0, "delta": {field: piece},
                                       "finish_reason": None}]})
            for piece in stream_pieces(reasoning_words(model, prompt, n))]


class _End(enum.Enum):
    CLEAN = "clean"
    DIE = "die"
    STALL = "stall"


# --------------------------------------------------------------------------- simulator


class Simulator:
    """An OpenAI-compatible backend on a real TCP port, with injectable faults."""

    def __init__(
        self,
        model: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        words: int = 20,
        chunk_delay: float = 0.0,
        faults: Sequence[str] = (),
        control_port: int | None = None,
        prefill: bool = True,
    ) -> None:
        """Configure (but do not start) a simulator serving ``model``.

        Raises ValueError for bad faults or negative ``words``/``chunk_delay``.
        """
        if words < 0:
            raise ValueError(f"words must be >= 0, got {words}")
        if not chunk_delay >= 0:
            raise ValueError(f"chunk_delay must be >= 0, got {chunk_delay}")
        self.model = model
        self.host = host
        self.words = words
        self.chunk_delay = chunk_delay
        self.prefill = prefill
        self.stats = SimStats()
        self._port = port
        self._control_port = control_port
        self._faults = parse_faults(faults)
        self._times_left = self._faults.times
        self._created = int(time.time())
        self._id_prefix = os.urandom(3).hex()
        self._ids = itertools.count(1)
        self._running = False
        self._main: _TrackingServer | None = None
        self._control: _TrackingServer | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._control_listener: asyncio.AbstractServer | None = None
        self._listen_sock: socket.socket | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._routes: dict[str, tuple[str, _Handler]] = {}
        for prefix in ("/v1", ""):  # llama.cpp also answers without the /v1 prefix
            self._routes[prefix + "/chat/completions"] = ("POST", self._chat)
            self._routes[prefix + "/completions"] = ("POST", self._completions)
            self._routes[prefix + "/embeddings"] = ("POST", self._embeddings)
            self._routes[prefix + "/models"] = ("GET", self._models)
        self._routes["/health"] = ("GET", self._health)
        self._routes["/props"] = ("GET", self._props)
        self._routes["/api/tags"] = ("GET", self._ollama_tags)

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The main port (the requested one until the first start with port=0)."""
        return self._port

    @property
    def control_port(self) -> int | None:
        """The always-on control port, if one was requested."""
        return self._control_port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` of the main port, without ``/v1``."""
        return f"http://{_url_host(self.host)}:{self._port}"

    @property
    def faults(self) -> tuple[str, ...]:
        """The active faults, normalised (``times`` shows what is left)."""
        return self._spec()

    @property
    def running(self) -> bool:
        """True between start() and stop()."""
        return self._running

    async def start(self) -> None:
        """Start serving; binds the main port unless 'refuse' is active.

        With port=0 a free port is picked once and kept for later restarts.
        """
        if self._running:
            return
        self._main = _TrackingServer(self._handle_main, self._count_connections)
        if self._control_port is not None:
            self._control = _TrackingServer(self._handle_control_port)
            sock = _bind(self.host, self._control_port)
            self._control_port = sock.getsockname()[1]
            self._control_listener = await asyncio.get_running_loop().create_server(
                self._control, sock=sock
            )
        self._running = True
        try:
            if self._faults.refuse:
                if self._port == 0:  # pick the number now so base_url is usable
                    self._port = self._reserve_port()
            else:
                self._open_listener()
                assert self._listen_task is not None
                await self._listen_task
        except BaseException:
            await self.stop()
            raise

    def _reserve_port(self) -> int:
        sock = _bind(self.host, 0)
        try:
            port: int = sock.getsockname()[1]
        finally:
            sock.close()
        return port

    async def stop(self) -> None:
        """Close the listeners and abort every open connection at once."""
        if not self._running:
            return
        self._running = False
        self._close_listener()
        if self._control_listener is not None:
            self._control_listener.close()
            self._control_listener = None
        servers = [s for s in (self._main, self._control) if s is not None]
        for server in servers:
            server.abort_all()
        task, self._listen_task = self._listen_task, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        # abort() reports connection_lost via call_soon; let that (and the
        # handler cancellations it triggers) run before tidying up.
        await asyncio.sleep(0)
        for server in servers:
            await server.shutdown(1.0)
        self._main = self._control = None
        # All connections were aborted; handlers decrement ``inflight`` themselves.
        self.stats.open_connections = 0

    def _open_listener(self) -> None:
        # Bind and listen synchronously: from here on connections queue in the
        # kernel instead of being refused, even before the asyncio server runs.
        sock = _bind(self.host, self._port)
        self._port = sock.getsockname()[1]
        self._listen_sock = sock
        self._listen_task = asyncio.get_running_loop().create_task(self._serve(sock))

    async def _serve(self, sock: socket.socket) -> None:
        assert self._main is not None
        server = await asyncio.get_running_loop().create_server(self._main, sock=sock)
        if self._listen_sock is sock:
            self._listener = server
        else:  # refuse was applied (or stop() called) while we were starting
            server.close()

    def _close_listener(self) -> None:
        # asyncio.Server.close() stops listening right away: new connections are refused.
        self._listen_sock = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _count_connections(self, n: int) -> None:
        self.stats.open_connections = n

    # ------------------------------------------------------------------ faults

    def set_faults(self, faults: Sequence[str]) -> None:
        """Replace the active faults (ValueError if invalid; nothing changes then).

        Applying 'refuse' closes the listener and aborts open connections;
        clearing it reopens the listener on the same port.
        """
        self._apply(parse_faults(faults))

    def _apply(self, faults: Faults, keep: asyncio.BaseTransport | None = None) -> None:
        self._faults = faults
        self._times_left = faults.times
        if not self._running:
            return
        listening = self._listen_sock is not None
        if faults.refuse and listening:
            self._close_listener()
            assert self._main is not None
            self._main.abort_all(keep)
        elif not faults.refuse and not listening:
            self._open_listener()

    def _spec(self) -> tuple[str, ...]:
        f = self._faults
        if f.times is None:
            return f.spec
        return tuple(f"times={self._times_left}" if s.startswith("times=") else s for s in f.spec)

    def _take_faults(self) -> Faults:
        """The fault set for one model request, counting down ``times``."""
        faults = self._faults
        if faults.times is not None and self._times_left is not None:
            self._times_left -= 1
            if self._times_left <= 0:
                self._apply(_NO_FAULTS)
        return faults

    # ------------------------------------------------------------------ dispatch

    async def _handle_main(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_sim/"):
            return await self._handle_control(request, on_main=True)
        stats = self.stats
        stats.by_path[path] = stats.by_path.get(path, 0) + 1
        route = self._routes.get(path)
        if route is None:
            return _error(404, f"Unknown request URL: {request.method} {path}", "invalid_request_error",
                          code="unknown_url")
        method, handler = route
        if request.method != method:
            return _error(405, f"Method {request.method} not allowed for {path}", "invalid_request_error",
                          headers={"Allow": method})
        return await handler(request)

    async def _handle_control_port(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._handle_control(request, on_main=False)

    async def _handle_control(self, request: web.BaseRequest, *, on_main: bool) -> web.StreamResponse:
        path, method = request.path, request.method
        if path == "/_sim/state" and method == "GET":
            return self._state_response()
        if path == "/_sim/reset_stats" and method == "POST":
            self.stats.reset()
            return self._state_response()
        if path == "/_sim/faults" and method == "POST":
            try:
                data = orjson.loads(await request.read())
            except orjson.JSONDecodeError as exc:
                return _error(400, f"invalid JSON body: {exc}", "invalid_request_error")
            specs = data.get("faults") if isinstance(data, dict) else None
            if not isinstance(specs, list):
                return _error(400, 'body must be {"faults": ["name", "name=value", ...]}',
                              "invalid_request_error", param="faults")
            try:
                faults = parse_faults(specs)
            except (ValueError, TypeError) as exc:
                return _error(400, str(exc), "invalid_request_error", param="faults")
            # Keep the connection carrying this request alive long enough to
            # answer it, then close it (the backend is going down).
            self._apply(faults, keep=request.transport if on_main else None)
            resp = self._state_response()
            if on_main and faults.refuse:
                resp.force_close()
            return resp
        if path in ("/_sim/state", "/_sim/reset_stats", "/_sim/faults"):
            return _error(405, f"Method {method} not allowed for {path}", "invalid_request_error")
        return _error(404, f"Unknown control URL: {method} {path}", "invalid_request_error")

    def _state_response(self) -> web.Response:
        state = {
            "model": self.model,
            "port": self._port,
            "listening": self._listen_sock is not None,
            "faults": list(self._spec()),
            "stats": asdict(self.stats),
        }
        return web.Response(body=orjson.dumps(state), headers=_JSON_HEADERS)

    # ------------------------------------------------------------------ info endpoints

    def _listed(self) -> tuple[str, ...]:
        faults = self._faults
        return faults.models or (faults.model or self.model,)

    async def _models(self, request: web.BaseRequest) -> web.StreamResponse:
        body = {"object": "list",
                "data": [{"id": model, "object": "model", "created": self._created, "owned_by": "simulator"}
                         for model in self._listed()]}
        return web.Response(body=orjson.dumps(body), headers=_JSON_HEADERS)

    async def _ollama_tags(self, request: web.BaseRequest) -> web.StreamResponse:
        """Ollama's model listing, so the prober's Ollama path can be tested."""
        body = {"models": [{"name": model, "model": model, "size": 0, "digest": "sim"}
                           for model in self._listed()]}
        return web.Response(body=orjson.dumps(body), headers=_JSON_HEADERS)

    async def _health(self, request: web.BaseRequest) -> web.StreamResponse:
        if self._faults.loading:
            return _error(503, "Loading model", "unavailable_error")
        return web.Response(body=b'{"status":"ok"}', headers=_JSON_HEADERS)

    async def _props(self, request: web.BaseRequest) -> web.StreamResponse:
        model = self._listed()[0]
        body = {"model_alias": model, "model_path": self._faults.model_file or f"/models/{model}.gguf"}
        return web.Response(body=orjson.dumps(body), headers=_JSON_HEADERS)

    # ------------------------------------------------------------------ model endpoints

    async def _model_request(
        self,
        request: web.BaseRequest,
        build: Callable[[web.BaseRequest, dict[str, Any], Faults, str], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        self.stats.requests += 1  # model requests only: health probes don't count
        self.stats.last_headers = {str(k): v for k, v in request.headers.items()}
        body = await request.read()
        faults = self._take_faults()
        self.stats.inflight += 1
        try:
            if faults.before_headers:
                early = await self._early_faults(faults, request)
                if early is not None:
                    return early
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise _BadRequest(f"We could not parse the JSON body of your request: {exc}") from None
            if not isinstance(data, dict):
                raise _BadRequest("The request body must be a JSON object.")
            asked = data.get("model")
            self.stats.last_model = asked if isinstance(asked, str) else None
            self.stats.last_body = data
            if faults.strict_models and asked not in self._listed():
                # Ollama's OpenAI layer (openai.go): 404 with this message for a model it
                # has not pulled; vLLM and LM Studio also answer 404.
                raise _Refused(404, {"error": {
                    "message": f'model "{asked}" not found, try pulling it first',
                    "type": "api_error", "param": None, "code": None}})
            return await build(request, data, faults, self._answering(faults, data))
        except _BadRequest as exc:
            return _error(400, exc.message, "invalid_request_error", param=exc.param, code=exc.code)
        except _Refused as exc:
            return web.Response(status=exc.status, body=orjson.dumps(exc.body), headers=_JSON_HEADERS)
        finally:
            self.stats.inflight -= 1

    async def _early_faults(self, faults: Faults,
                            request: web.BaseRequest) -> web.StreamResponse | None:
        if faults.hang:
            await _forever()
        if faults.leak_auth:
            sent = request.headers.get("Authorization", "(none)")
            return _error(faults.status or 401, f"Incorrect API key provided: {sent}",
                          "invalid_request_error", code="invalid_api_key")
        if faults.loading:
            return _error(503, "Loading model", "unavailable_error")
        if faults.slow_first_byte > 0:
            await asyncio.sleep(faults.slow_first_byte)
        if faults.rate_limit is not None:
            return _error(
                429,
                f"Rate limit reached (simulated). Please try again in {faults.rate_limit}s.",
                "rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": faults.rate_limit,
                         "retry-after-ms": _fmt_seconds(float(faults.rate_limit) * 1000),
                         **_ratelimit_headers(0, f"{faults.rate_limit}s")},
            )
        if faults.status is not None:
            return _error(faults.status, f"simulated HTTP {faults.status} failure",
                          _error_type(faults.status))
        return None

    def _answering(self, faults: Faults, data: dict[str, Any]) -> str:
        """The model an answer names: with ``models``, the one asked for (echoed)."""
        if faults.model:
            return faults.model
        if faults.models:
            asked = data.get("model")
            return asked if isinstance(asked, str) and asked else faults.models[0]
        return self.model

    def _check_context(self, faults: Faults, tokens: int, param: str) -> None:
        if faults.context is not None and tokens > faults.context:
            raise _Refused(*_context_error(faults.context_style, faults.context, tokens, param))

    def _plan(self, model: str, prompt: str, prefix: str | None,
              limit: int | None) -> tuple[Sequence[str], str]:
        """Pieces to send and finish_reason."""
        ans = _answer(model, prompt, self.words)
        pieces: Sequence[str] = ans.pieces
        if prefix:
            if ans.text.startswith(prefix):
                pieces = _remainder(ans, len(prefix))
            else:
                # Not our answer's beginning: continue "something else", visibly different.
                pieces = _answer(model, f"{prompt}\n{prefix}", self.words).pieces
        if limit is not None and limit < len(pieces):
            return pieces[:limit], "length"
        return pieces, "stop"

    def _new_id(self, kind: str) -> str:
        return f"{kind}-sim{self._id_prefix}{next(self._ids):x}"

    async def _chat(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._model_request(request, self._build_chat)

    async def _build_chat(
        self, request: web.BaseRequest, data: dict[str, Any], faults: Faults, model: str
    ) -> web.StreamResponse:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("'messages' must be a non-empty array", "messages")
        limit = _limit(data)
        prefix: str | None = None
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
            if not self.prefill:
                raise _BadRequest(
                    "assistant prefill is not supported: the last message must not have role 'assistant'",
                    "messages",
                )
            prefix = message_text(last.get("content"))
        prompt = prompt_of_messages(messages)
        prompt_tokens = len(prompt.split()) + (len(prefix.split()) if prefix else 0)
        self._check_context(faults, prompt_tokens, "messages")
        pieces, finish = self._plan(model, prompt, prefix, limit)
        if prefix and faults.echo_prefill:
            # The prefill comes back first, in 7-character pieces (as split as a tokenizer's).
            pieces = [prefix[i:i + 7] for i in range(0, len(prefix), 7)] + list(pieces)
        cid, created = self._new_id("chatcmpl"), int(time.time())

        if data.get("stream") is not True:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces)}
            if faults.tool_call:  # the same call as streamed below, whole
                message = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_sim", "type": "function", "function": {
                        "name": "lookup", "arguments": '{"q": "' + "".join(pieces) + '"}'}}]}
                finish = "tool_calls"
            body = orjson.dumps({
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": _usage(prompt_tokens, len(pieces)),
            })
            return await self._send_json(request, faults, body)

        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        head = b"data: " + orjson.dumps(base)[:-1] + b',"choices":[{"index":0,"delta":{"content":'
        tail = b'},"finish_reason":null}]}\n\n'
        first = _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]})
        firsts = [_AZURE_PRELUDE, first] if faults.azure_prelude else [first]
        if faults.tool_call:
            # The words travel as a tool call's JSON arguments, split across chunks.
            firsts.append(_sse({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": "call_sim", "type": "function",
                 "function": {"name": "lookup", "arguments": ""}}]}, "finish_reason": None}]}))
            head = (b"data: " + orjson.dumps(base)[:-1]
                    + b',"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":'
                      b'{"arguments":')
            tail = b'}}]},"finish_reason":null}]}\n\n'
            pieces = ['{"q": "', *pieces, '"}']
            finish = "tool_calls"
        if faults.refusal:  # as OpenAI streams a refusal: `delta.refusal`, no content
            head = b"data: " + orjson.dumps(base)[:-1] + b',"choices":[{"index":0,"delta":{"refusal":'
        thoughts = _thoughts(faults, base, model, prompt)
        finish_ev = _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        usage_ev = (_sse({**base, "choices": [],
                          "usage": _usage(prompt_tokens, len(thoughts) + len(pieces))})
                    if _include_usage(data) else None)
        return await self._stream(request, faults, firsts, head, tail, pieces, finish_ev, usage_ev,
                                  thoughts)

    async def _completions(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._model_request(request, self._build_completion)

    async def _build_completion(
        self, request: web.BaseRequest, data: dict[str, Any], faults: Faults, model: str
    ) -> web.StreamResponse:
        prompt = data.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _BadRequest("'prompt' must be a string or a non-empty array of strings", "prompt")
        limit = _limit(data)
        prompt_tokens = len(prompt.split())
        self._check_context(faults, prompt_tokens, "prompt")
        pieces, finish = self._plan(model, prompt, None, limit)
        cid, created = self._new_id("cmpl"), int(time.time())

        if data.get("stream") is not True:
            body = orjson.dumps({
                "id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": finish}],
                "usage": _usage(prompt_tokens, len(pieces)),
            })
            return await self._send_json(request, faults, body)

        base = {"id": cid, "object": "text_completion", "created": created, "model": model}
        head = b"data: " + orjson.dumps(base)[:-1] + b',"choices":[{"text":'
        tail = b',"index":0,"logprobs":null,"finish_reason":null}]}\n\n'
        finish_ev = _sse({**base, "choices": [{"text": "", "index": 0, "logprobs": None,
                                               "finish_reason": finish}]})
        usage_ev = (_sse({**base, "choices": [], "usage": _usage(prompt_tokens, len(pieces))})
                    if _include_usage(data) else None)
        prelude = [_AZURE_PRELUDE] if faults.azure_prelude else []
        return await self._stream(request, faults, prelude, head, tail, pieces, finish_ev, usage_ev)

    async def _embeddings(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._model_request(request, self._build_embeddings)

    async def _build_embeddings(
        self, request: web.BaseRequest, data: dict[str, Any], faults: Faults, model: str
    ) -> web.StreamResponse:
        inp = data.get("input")
        texts = [inp] if isinstance(inp, str) else inp
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise _BadRequest("'input' must be a string or a non-empty array of strings", "input")
        tokens = sum(len(t.split()) for t in texts)
        self._check_context(faults, max(len(t.split()) for t in texts), "input")
        as_b64 = data.get("encoding_format") == "base64"  # the openai SDK asks for base64 by default
        items = []
        for i, text in enumerate(texts):
            vec = embedding_vector(text)
            emb: Any = base64.b64encode(struct.pack("<8f", *vec)).decode() if as_b64 else vec
            items.append({"object": "embedding", "index": i, "embedding": emb})
        body = orjson.dumps({"object": "list", "data": items, "model": model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        return await self._send_json(request, faults, body)

    # ------------------------------------------------------------------ writing

    def _headers(self, faults: Faults, base: dict[str, str]) -> dict[str, str]:
        if not faults.ratelimit_headers:
            return base
        return {**base, **_ratelimit_headers(max(0, _RATE_LIMIT - self.stats.requests), "1s")}

    async def _send_json(self, request: web.BaseRequest, faults: Faults, body: bytes) -> web.StreamResponse:
        headers = self._headers(faults, _JSON_HEADERS)
        if faults.die_after is None and faults.stall_after is None:
            return web.Response(body=body, headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)  # StreamResponse sends the headers right away
        if faults.die_after is not None:
            await resp.write(body[: len(body) // 2])
            if request.transport is not None:
                request.transport.abort()
            return resp
        await _forever()
        return resp  # pragma: no cover - _forever only ends by cancellation

    async def _stream(
        self,
        request: web.BaseRequest,
        faults: Faults,
        events: list[bytes],
        head: bytes,
        tail: bytes,
        pieces: Sequence[str],
        finish_ev: bytes,
        usage_ev: bytes | None,
        thoughts: Sequence[bytes] = (),
    ) -> web.StreamResponse:
        dumps = orjson.dumps
        end = _End.CLEAN
        # Reasoning events, then the answer's: the stream faults count both as pieces.
        paced = range(len(events) + 1, len(events) + len(thoughts) + 1)
        bodies = [*thoughts, *(head + dumps(p) + tail for p in pieces)]
        if not faults.shapes_stream:
            events.extend(bodies)
            events.append(finish_ev)
            if usage_ev is not None:
                events.append(usage_ev)
            events.append(_DONE)
        else:
            end = self._faulty_events(faults, events, bodies, finish_ev, usage_ev)

        resp = web.StreamResponse(headers=self._headers(faults, _SSE_HEADERS))
        try:
            await resp.prepare(request)
            delay = self.chunk_delay
            if delay > 0 or thoughts:
                # The first reasoning event at once, the next ones (and the answer after the
                # last) REASONING_STEP_S apart: the answer begins `reasoning` seconds in.
                step = faults.reasoning / len(thoughts) if thoughts else 0.0
                ready: list[bytes] = []
                for i, ev in enumerate(events):
                    pause = max(delay if i else 0.0, step if i in paced else 0.0)
                    if pause > 0:
                        if ready:
                            await resp.write(b"".join(ready))
                            ready.clear()
                        await asyncio.sleep(pause)
                    ready.append(ev)
                if ready:
                    await resp.write(b"".join(ready))
            elif events:
                # No delay: one write (one syscall) for the whole stream.
                await resp.write(b"".join(events))
            if end is _End.DIE:
                if request.transport is not None:
                    request.transport.abort()
                return resp
            if end is _End.STALL:
                await _forever()
            await resp.write_eof()
        except asyncio.CancelledError:
            self.stats.aborted += 1
            raise
        except ConnectionError:
            self.stats.aborted += 1  # the client went away mid-stream: nothing to report
            return resp
        self.stats.completed_streams += 1
        return resp

    @staticmethod
    def _faulty_events(
        faults: Faults,
        events: list[bytes],
        pieces: Sequence[bytes],
        finish_ev: bytes,
        usage_ev: bytes | None,
    ) -> _End:
        """Fill ``events`` for a stream with fault points (``pieces`` are the events of the
        reasoning and answer pieces); return how it ends."""
        for i in range(len(pieces) + 1):  # i = pieces already sent
            if faults.malformed_after == i:
                events.append(_MALFORMED)
            if faults.error_after == i:
                events.append(_ERROR_EVENT)
                return _End.CLEAN
            if faults.die_after == i:
                return _End.DIE
            if faults.stall_after == i:
                return _End.STALL
            if i < len(pieces):
                events.append(pieces[i])
        if faults.no_finish:
            return _End.CLEAN
        events.append(finish_ev)
        if usage_ev is not None:
            events.append(usage_ev)
        if not faults.no_done:
            events.append(_DONE)
        return _End.CLEAN


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` command-line options to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: pick a free one)")
    parser.add_argument("--model", required=True, help="model name to serve")
    parser.add_argument("--words", type=int, default=20, help="words per answer (default: 20)")
    parser.add_argument("--chunk-delay", type=float, default=0.0, metavar="SECONDS",
                        help="delay between streamed chunks (default: 0)")
    parser.add_argument("--fault", action="append", default=[], metavar="NAME[=VALUE]",
                        help="inject a fault; repeatable. Known: " + ", ".join(_KNOWN))
    parser.add_argument("--control-port", type=int, default=None,
                        help="extra always-on port for the /_sim/ control endpoints")
    parser.add_argument("--no-prefill", action="store_true",
                        help="reject requests whose last message is from the assistant (HTTP 400)")


def run(args: argparse.Namespace) -> int:
    """Run a simulator until SIGINT/SIGTERM; return the process exit code.

    Prints ``simulator MODEL listening on http://HOST:PORT`` once ready.
    Bad faults or options print an error and return 2; bind failures return 1.
    """
    try:
        sim = Simulator(
            args.model,
            host=args.host,
            port=args.port,
            words=args.words,
            chunk_delay=args.chunk_delay,
            faults=args.fault or (),
            control_port=args.control_port,
            prefill=not args.no_prefill,
        )
    except ValueError as exc:
        print(f"failover-proxy simulate: error: {exc}", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_serve_until_signal(sim))
    except OSError as exc:
        print(f"failover-proxy simulate: error: {exc}", file=sys.stderr)
        return 1


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _serve_until_signal(sim: Simulator) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-POSIX
            pass
    await sim.start()
    try:
        print(f"simulator {sim.model} listening on http://{_print_host(sim.host)}:{sim.port}", flush=True)
        await stop.wait()
    finally:
        await sim.stop()
    return 0


def _print_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
