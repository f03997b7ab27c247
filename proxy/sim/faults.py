"""The simulator's faults: what can go wrong, parsed once into an immutable set.

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

"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final


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
KNOWN: Final = sorted(_FLAGS | _COUNTS | _SECONDS | {"status", "model", "times"}
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
        if name not in KNOWN:
            raise ValueError(f"unknown fault {name!r} (known: {', '.join(KNOWN)})")
        if name in _FLAGS:
            if sep:
                raise ValueError(f"fault {name!r} takes no value")
            values[name] = True
            continue
        if not value:
            raise ValueError(f"fault {name!r} needs a value: {name}=VALUE")
        values[name] = _value(name, value)
    if values.get("refuse") and "times" in values:
        # refuse receives no requests, so nothing would ever count the times down.
        raise ValueError("fault 'times' cannot be combined with 'refuse'")
    spec = tuple(
        k if v is True else f"{k}={','.join(v) if isinstance(v, tuple) else v}"
        for k, v in sorted(values.items())
    )
    return Faults(spec=spec, **values)


def _value(name: str, value: str) -> Any:
    """The value of fault `name` given as `value`; ValueError when it is not one."""
    if name in _STRINGS:
        return value
    if name == "models":
        ids = tuple(m.strip() for m in value.split(",") if m.strip())
        if not ids:
            raise ValueError("fault 'models' needs model ids: models=A,B")
        return ids
    if name in _CHOICES:
        if value not in _CHOICES[name]:
            raise ValueError(f"fault {name!r} needs one of {', '.join(_CHOICES[name])}, "
                             f"got {value!r}")
        return value
    if name in _SECONDS:
        secs = _number(name, value)
        # Keep an integral Retry-After integral ("5", not "5.0"): clients parse it as int.
        return fmt_seconds(secs) if name == "rate_limit" else secs
    n = _integer(name, value)
    if name == "status" and not 400 <= n <= 599:
        raise ValueError(f"fault 'status' needs an HTTP error code 400-599, got {n}")
    if name == "times" and n < 1:
        raise ValueError("fault 'times' needs a count >= 1")
    return n


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


def fmt_seconds(x: float) -> str:
    return str(int(x)) if x.is_integer() else repr(x)


NO_FAULTS: Final = Faults()
