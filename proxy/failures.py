"""Every way an instance can fail to serve a request, what each failure means, and the one
place where aiohttp's errors become ours.

Reason codes are the product's vocabulary (SPEC section 6): they appear in events, logs,
metrics and the 502 message. Each is a class here (httpx's `_exceptions.py` is the model),
and each declares what it means, so that the attempt loop and the instance registry read
attributes instead of keeping lists of codes:

- `attempt`: something was written upstream (it counts against `retry.max_attempts`);
  a *skip* (not ready, busy, a request the instance cannot take) is not an attempt;
- `same_instance_retry`: a blip, worth one more try on the same instance
  (`retry.same_instance_retries`) before moving on;
- `circuit`: how it feeds the instance's circuit breaker: NO_CIRCUIT, STRIKE (one strike
  toward `health.failure_threshold`, "by HTTP": only a successful trial closes it) or
  OPENS (at once, "by connection": a good probe closes it too; a strike when the same
  instance is tried again);
- `instance_fault`: says something about the instance's health (its error rate and
  `last_error`); False for a fact about this request only;
- `retry_kind`: the `retry.on` kind under which it reroutes to another instance (None: it
  always does); `RETRY_KINDS` is derived from these;
- `cooldown` (a 429: the instance is sent nothing for a while), `mismatch` (another model
  answers: state MISMATCH) and `refuses_prefill` (no prefill is sent to it again), the
  effects that are not the circuit's.

Handlers never catch transport exceptions themselves: every wait on aiohttp's client goes
through :func:`map_exceptions` (or, on the per-event hot path, :func:`failure_from`), which
turns aiohttp's exceptions (aiohttp 3.14, `aiohttp/client_exceptions.py`), socket errors
and timeouts into these failures. An error *answer* (a status and body) becomes one in its
provider's `error_for` (proxy/providers/).
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from types import MappingProxyType, TracebackType
from typing import ClassVar, Literal

import aiohttp
from aiohttp.http_exceptions import ContentEncodingError, DecompressSizeError

from proxy.providers.overflow import Overflow

# Reason codes, as strings so they serialise as they are.
INSTANCE_NOT_READY = "INSTANCE_NOT_READY"
INSTANCE_BUSY = "INSTANCE_BUSY"
UNSUPPORTED_REQUEST = "UNSUPPORTED_REQUEST"
CONN_REFUSED = "CONN_REFUSED"
TIMEOUT = "TIMEOUT"
PROCESS_EXITED = "PROCESS_EXITED"
EMPTY_STREAM = "EMPTY_STREAM"
FINGERPRINT_MISMATCH = "FINGERPRINT_MISMATCH"
UPSTREAM_5XX = "UPSTREAM_5XX"
RATE_LIMITED = "RATE_LIMITED"
CONTEXT_TOO_LONG = "CONTEXT_TOO_LONG"
STREAM_CUT = "STREAM_CUT"
STREAM_STALLED = "STREAM_STALLED"
STREAM_MALFORMED = "STREAM_MALFORMED"
RESPONSE_MALFORMED = "RESPONSE_MALFORMED"
UPSTREAM_ERROR = "UPSTREAM_ERROR"
UPSTREAM_AUTH = "UPSTREAM_AUTH"
UPSTREAM_PROTOCOL_ERROR = "UPSTREAM_PROTOCOL_ERROR"
NOT_STREAMED = "NOT_STREAMED"
PREFILL_REJECTED = "PREFILL_REJECTED"
REPLAY_DIVERGED = "REPLAY_DIVERGED"

# How a failure feeds the instance's circuit breaker (proxy.health.circuit).
CircuitEffect = Literal["none", "strike", "opens"]
NO_CIRCUIT: CircuitEffect = "none"
STRIKE: CircuitEffect = "strike"
OPENS: CircuitEffect = "opens"

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class Failure(Exception):
    """Why an instance did not serve the request; `detail` says it for people."""

    code: ClassVar[str] = UPSTREAM_ERROR
    attempt: ClassVar[bool] = True
    same_instance_retry: ClassVar[bool] = False
    circuit: ClassVar[CircuitEffect] = STRIKE
    instance_fault: ClassVar[bool] = True
    retry_kind: ClassVar[str | None] = None
    cooldown: ClassVar[bool] = False
    mismatch: ClassVar[bool] = False
    #: A continuation's prefill was refused: the instance is not sent one again.
    refuses_prefill: ClassVar[bool] = False
    #: What a failed answer said, when it said it: the pause a 429 asked for (seconds),
    #: its rate-limit headers (relayed to the client), a context overflow's figures.
    retry_after: float | None = None
    headers: Mapping[str, str] = _NO_HEADERS
    overflow: Overflow | None = None

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.code)
        self.detail = detail or self.code


# --------------------------------------------------------------------------- skips


class Skip(Failure):
    """The instance was passed over for this request: nothing was sent, it did nothing
    wrong, and its circuit and error rate stay untouched."""

    attempt = False
    circuit = NO_CIRCUIT
    instance_fault = False


class InstanceNotReady(Skip):
    """Not routable right now: drained, MISMATCH, its circuit open, or in a rate-limit
    cooldown (`rate_limited(retry_in=...)`)."""

    code = INSTANCE_NOT_READY


class InstanceBusy(Skip):
    """At its `max_concurrency`, and no slot freed within `retry.queue_wait_s`."""

    code = INSTANCE_BUSY


class UnsupportedRequest(Skip):
    """The instance cannot take this particular request: a continuation it cannot
    express, or a request its protocol cannot carry."""

    code = UNSUPPORTED_REQUEST


# --------------------------------------------------------------------------- attempts


class UpstreamFailure(Failure):
    """An attempt written to one instance failed; another may still serve the request."""


class ConnRefused(UpstreamFailure):
    """Nothing listens at the instance's address (or the host is unreachable, its name
    does not resolve, its TLS handshake or forward proxy fails)."""

    code = CONN_REFUSED
    circuit = OPENS
    retry_kind = "conn_refused"


class UpstreamTimeout(UpstreamFailure):
    """Connect, first byte or total deadline passed; `phase` says which."""

    code = TIMEOUT
    retry_kind = "timeout"

    def __init__(self, phase: str, seconds: float | None = None) -> None:
        detail = f"{phase} timeout" + (f" after {seconds:g}s" if seconds is not None else "")
        super().__init__(detail)
        self.phase = phase


class StreamStalled(UpstreamFailure):
    """No event of a stream the client was already receiving arrived within `idle_s`."""

    code = STREAM_STALLED
    retry_kind = "timeout"


class ProcessExited(UpstreamFailure):
    """The connection was reset or closed before the response was complete."""

    code = PROCESS_EXITED
    same_instance_retry = True
    circuit = OPENS
    retry_kind = "process_exited"


class StreamCut(UpstreamFailure):
    """A stream the client was already receiving ended (closed or reset) before its
    finish reason."""

    code = STREAM_CUT
    circuit = OPENS
    retry_kind = "process_exited"


class StreamMalformed(UpstreamFailure):
    """The upstream sent an event that is not valid JSON or not a completion chunk."""

    code = STREAM_MALFORMED
    retry_kind = "process_exited"


class UpstreamErrorEvent(UpstreamFailure):
    """The upstream reported an error inside an otherwise successful stream."""

    code = UPSTREAM_ERROR
    retry_kind = "process_exited"


class FingerprintMismatch(UpstreamFailure):
    """The server at the address answers as a different model than the one pinned."""

    code = FINGERPRINT_MISMATCH
    circuit = NO_CIRCUIT
    mismatch = True
    retry_kind = "fingerprint_mismatch"


class Upstream5xx(UpstreamFailure):
    """The upstream answered with a server error status."""

    code = UPSTREAM_5XX
    same_instance_retry = True
    retry_kind = "upstream_5xx"

    def __init__(self, status: int, body: bytes = b"") -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class UpstreamAuth(UpstreamFailure):
    """The upstream refused the proxy's credentials (401/403): the instance is misconfigured,
    not the client's request wrong."""

    code = UPSTREAM_AUTH
    retry_kind = "upstream_auth"

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}: the upstream refused the configured credentials")
        self.status = status


class RateLimited(UpstreamFailure):
    """The upstream answered 429; `retry_after` is its requested pause in seconds (None when
    it gave none), `headers` its rate-limit headers, relayed to the client. No circuit
    matter: the instance works and said when to come back."""

    code = RATE_LIMITED
    circuit = NO_CIRCUIT
    cooldown = True
    retry_kind = "rate_limited"

    def __init__(self, retry_after: float | None, body: bytes = b"",
                 headers: Mapping[str, str] | None = None) -> None:
        detail = "HTTP 429" + (f", retry after {retry_after:g}s" if retry_after is not None else "")
        super().__init__(detail)
        self.retry_after = retry_after
        self.body = body
        if headers:
            self.headers = headers


class ContextTooLong(UpstreamFailure):
    """The upstream said the prompt does not fit its context window (in any server's
    wording: see proxy.providers.overflow); `overflow` holds the window and size it
    stated. A fact about this request, not about the instance's health: only an instance
    with a larger window is tried next."""

    code = CONTEXT_TOO_LONG
    circuit = NO_CIRCUIT
    instance_fault = False
    retry_kind = "context_too_long"

    def __init__(self, overflow: Overflow) -> None:
        super().__init__(overflow.describe())
        self.overflow = overflow


class UpstreamProtocolError(UpstreamFailure):
    """The answer breaks HTTP (unparsable head, too many or too long header lines, bad
    chunking or content coding, an unasked-for 101 or a redirect) or exceeds the response
    limits (`upstream.max_response_bytes`, `upstream.max_event_bytes`)."""

    code = UPSTREAM_PROTOCOL_ERROR
    retry_kind = "protocol_error"


class EmptyStream(UpstreamFailure):
    """A stream that ended (cleanly) before any model output, or a continuation that
    ended before anything new."""

    code = EMPTY_STREAM
    same_instance_retry = True
    retry_kind = "empty_stream"


class ResponseMalformed(UpstreamFailure):
    """A whole answer that cannot be read as one (a Messages API body that is not one)."""

    code = RESPONSE_MALFORMED
    retry_kind = "response_malformed"


class NotStreamed(UpstreamFailure):
    """A continuation was answered whole, not streamed: unusable for splicing, but no
    mark against the instance's health."""

    code = NOT_STREAMED
    circuit = NO_CIRCUIT
    instance_fault = False
    retry_kind = "not_streamed"


class PrefillRejected(UpstreamFailure):
    """A continuation was answered with a 4xx: about the prefill, never the client's
    request. An instance that refuses a prefill is not sent one again."""

    code = PREFILL_REJECTED
    circuit = NO_CIRCUIT
    instance_fault = False
    refuses_prefill = True


class ReplayDiverged(UpstreamFailure):
    """A replay's answer does not begin with exactly what the client already has."""

    code = REPLAY_DIVERGED
    circuit = NO_CIRCUIT
    instance_fault = False


def _retry_kinds() -> dict[str, tuple[str, ...]]:
    kinds: dict[str, list[str]] = {}
    pending: list[type[Failure]] = [UpstreamFailure]
    while pending:
        cls = pending.pop(0)
        if cls.retry_kind is not None and cls.code not in kinds.get(cls.retry_kind, ()):
            kinds.setdefault(cls.retry_kind, []).append(cls.code)
        pending.extend(cls.__subclasses__())
    return {kind: tuple(codes) for kind, codes in kinds.items()}


#: The names used in `retry.on` of the config, mapped to the reason codes they cover (in
#: the order the classes above are defined).
RETRY_KINDS: dict[str, tuple[str, ...]] = _retry_kinds()


# --------------------------------------------------------------------------- the mapping


_REFUSAL_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})


def _unreachable(exc: aiohttp.ClientConnectorError) -> ConnRefused:
    """The instance could not be reached: refused, unresolvable, no TLS, no proxy."""
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return ConnRefused(f"cannot reach the forward proxy {exc.host}:{exc.port}")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return ConnRefused(f"cannot resolve {exc.host}")
    if isinstance(exc, aiohttp.ClientSSLError):
        return ConnRefused(f"TLS handshake with {exc.host}:{exc.port} failed: "
                           f"{getattr(exc, 'certificate_error', None) or exc.os_error}")
    os_error = exc.os_error
    if isinstance(os_error, ConnectionRefusedError) or os_error.errno in _REFUSAL_ERRNOS:
        return ConnRefused(f"connection refused by {exc.host}:{exc.port}")
    return ConnRefused(f"cannot connect to {exc.host}:{exc.port}: {os_error.strerror or os_error}")


def _broken_answer(exc: aiohttp.ClientError) -> UpstreamFailure:
    """A connection that went away mid-answer, or an answer that breaks HTTP."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return ProcessExited("server closed the connection")
    if isinstance(exc, aiohttp.ClientPayloadError):
        # A body that cannot be decoded breaks HTTP; one that stops short (the connection
        # closed before its length or last chunk) is a server that went away.
        cause = exc.__cause__
        if isinstance(cause, (ContentEncodingError, DecompressSizeError)):
            return UpstreamProtocolError(f"undecodable response body: {cause.message}")
        return ProcessExited("response body cut short")
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return ConnRefused(f"the forward proxy refused the tunnel: HTTP {exc.status}")
    if isinstance(exc, aiohttp.ClientResponseError):
        # aiohttp's parser refused the response head (too many or too long header lines,
        # not HTTP at all): the answer breaks HTTP.
        return UpstreamProtocolError(f"unparsable response: {exc.message}")
    if isinstance(exc, aiohttp.ClientOSError):
        return ProcessExited("connection reset")
    return UpstreamProtocolError(f"transport error: {type(exc).__name__}: {exc}")


def failure_from(exc: BaseException, phase: str,
                 timeout_s: float | None = None) -> UpstreamFailure:
    """Our failure for an exception raised while waiting on an upstream.

    `phase` names the wait ("connect", "first_byte", "idle", "body", "probe") so that a
    timeout says where it happened. Our own failures come back unchanged; an exception
    that is no upstream's doing (a bug of ours) is raised again.
    """
    if isinstance(exc, UpstreamFailure):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout("connect", timeout_s if phase == "connect" else None)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _unreachable(exc)
    if isinstance(exc, TimeoutError):  # asyncio's, and aiohttp's socket timeouts
        return UpstreamTimeout(phase, timeout_s)
    if isinstance(exc, aiohttp.ClientError):
        return _broken_answer(exc)
    if isinstance(exc, ConnectionError):
        return ProcessExited("connection reset")
    if isinstance(exc, OSError):
        return ProcessExited(f"connection error: {exc.strerror or exc}")
    raise exc  # a bug of ours, not the upstream's failure: let it surface


class map_exceptions:  # noqa: N801 - a context manager, named like contextlib's
    """``with map_exceptions(phase, timeout_s):`` turns whatever an upstream wait inside
    the block raises into our failure (see :func:`failure_from`). A class rather than a
    generator: it sits on every request's path."""

    __slots__ = ("phase", "timeout_s")

    def __init__(self, phase: str, timeout_s: float | None = None) -> None:
        self.phase = phase
        self.timeout_s = timeout_s

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if exc is None or isinstance(exc, UpstreamFailure) \
                or not isinstance(exc, (aiohttp.ClientError, OSError, TimeoutError)):
            return False
        raise failure_from(exc, self.phase, self.timeout_s) from exc
