"""Upstream rate limits: how long a 429 asks the proxy to stay away, and which of the
upstream's rate-limit headers the client gets to see.

What servers send (the facts this module relies on):
- `Retry-After` (RFC 9110, section 10.2.3): delay-seconds or an HTTP-date. Sent on 429 by
  OpenAI, Anthropic, Azure OpenAI and most gateways.
- `retry-after-ms`: milliseconds, more precise than `Retry-After`. Sent by OpenAI and Azure
  OpenAI; the `openai` Python SDK reads it before `Retry-After`
  (`openai/_base_client.py`, `_parse_retry_after_header`, openai 1.x).
- OpenAI `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` on every answer; `reset`
  is a duration such as `1s`, `6m0s` or `12ms` (OpenAI docs, "Rate limits").
- Anthropic `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
  {limit,remaining,reset}` on every answer; `reset` is an RFC 3339 time (Anthropic docs,
  "Rate limits"), plus `retry-after` on a 429.

Local servers (llama.cpp, Ollama, vLLM, LM Studio) send none of these; for them the
relay costs one look at the first character of each response header name.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime

#: Response headers relayed to the client (lowercase prefixes).
RELAYED_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "retry-after")
_FIRST_CHARS = frozenset("xXaArR")  # first characters of RELAYED_PREFIXES, in any case

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def relay_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The upstream's rate-limit headers, names lowercased: `x-ratelimit-*`,
    `anthropic-ratelimit-*`, `retry-after` and `retry-after-ms`. Empty when there are none.

    Runs once per upstream answer, so it rejects most names on their first character.
    """
    out: dict[str, str] = {}
    for name, value in headers.items():
        if name[:1] in _FIRST_CHARS:
            low = name.lower()
            if low.startswith(RELAYED_PREFIXES):
                out[low] = value
    return out


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """How many seconds a 429 asks to wait, from its headers (a case-insensitive mapping,
    as the HTTP client gives); None when it does not say.

    In order: `retry-after-ms`, `Retry-After` (seconds or an HTTP-date), then the latest
    reset among the exhausted limits (`...-remaining` = 0) of OpenAI's `x-ratelimit-*` or
    Anthropic's `anthropic-ratelimit-*` headers. `now` is the wall clock (time.time()).
    """
    value = headers.get("retry-after-ms")
    if value is not None:
        ms = _seconds(value)
        if ms is not None:
            return ms / 1000.0
    value = headers.get("retry-after")
    if value is not None:
        seconds = _seconds(value)
        if seconds is None:
            seconds = _until_date(value, now)
        if seconds is not None:
            return seconds
    return _exhausted_reset(headers, now)


def _seconds(value: str) -> float | None:
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 <= seconds < math.inf else None


def _until_date(value: str, now: float | None) -> float | None:
    """Seconds until an HTTP-date (`Wed, 21 Oct 2015 07:28:00 GMT`), at least 0."""
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _exhausted_reset(headers: Mapping[str, str], now: float | None) -> float | None:
    """The latest reset, in seconds from now, of the limits whose `remaining` is 0."""
    wait: float | None = None
    for name, value in headers.items():
        low = name.lower()
        if "ratelimit" not in low or "remaining" not in low or value.strip() != "0":
            continue
        # x-ratelimit-remaining-requests -> x-ratelimit-reset-requests (OpenAI);
        # anthropic-ratelimit-tokens-remaining -> anthropic-ratelimit-tokens-reset.
        reset = headers.get(low.replace("remaining", "reset"))
        seconds = None if reset is None else _reset_seconds(reset, now)
        if seconds is not None and (wait is None or seconds > wait):
            wait = seconds
    return wait


def _reset_seconds(value: str, now: float | None) -> float | None:
    """A reset header as seconds from now: a duration (`6m0s`, OpenAI), an RFC 3339 time
    (Anthropic) or plain seconds."""
    value = value.strip()
    parts = _DURATION_PART.findall(value)
    if parts and "".join(n + u for n, u in parts) == value:
        return sum(float(n) * _UNIT_S[u] for n, u in parts)
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
