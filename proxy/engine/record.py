"""What happened to one request, as plain data: the engine writes it, the recorder
(proxy.audit.recorder) turns it into the log line, the metrics and the audit rows.

An attempt is one instance and a mode: a fresh try, or a continuation of a cut stream by
prefill or by replay. An instance passed over (not ready, busy, unable to take the
request) is an entry too, marked as not sent: it is no attempt against the retry budget,
but it is part of the story (a REROUTED event, the 502's "not tried" list).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.audit.usage import Usage
    from proxy.routing.planner import RoutePlan
    from proxy.tracing import RequestTrace

# Attempt modes.
FRESH = "fresh"
PREFILL = "prefill"
REPLAY = "replay"

# Outcomes, as recorded per request (an error's own code otherwise).
OK = "ok"
PASSED_THROUGH = "passthrough"
STREAM_FAILED = "stream_failed"
CLIENT_GONE = "client_gone"


@dataclass(slots=True)
class Attempt:
    """One try on one instance (`sent`), or one instance passed over (not `sent`).

    `code` is None for the try that answered, else the reason code (proxy.failures);
    `elapsed_ms` is the try's own time; `at` the wall clock when it ended (for the audit
    events); `carried` the characters of a continued answer carried over by it, and
    `after` the instance whose cut it continued.
    """

    instance: str
    mode: str = FRESH
    code: str | None = None
    detail: str = "ok"
    elapsed_ms: float = 0.0
    at: float = 0.0
    sent: bool = True
    carried: int = 0
    #: For a continuation that answered: the instance whose cut it continued.
    after: str | None = None

    def describe(self) -> str:
        """`p:s0 CONN_REFUSED: connection refused ...` for messages."""
        return f"{self.instance} {self.code}: {self.detail}" if self.code else f"{self.instance} ok"


@dataclass(slots=True)
class RequestRecord:
    """One request from its plan to its answer (or error).

    `instance` is the instance that answered (for a continued stream, the one that
    finished it); `status` the HTTP status sent; `outcome` one of the outcomes above or
    the error's code. `ttfb_s` is the upstream's time to first output of the instance
    that committed, `duration_s` the whole request in the proxy. `usage` holds the
    answer's tokens and cost when the upstream stated its usage.
    """

    request_id: str
    model: str | None = None
    stream: bool = False
    plan: RoutePlan | None = None
    planned_at: float = 0.0
    attempts: list[Attempt] = field(default_factory=list)
    #: Attempts written upstream (`x-route-attempts`); the entries not sent are skips.
    sent: int = 0
    status: int = 200
    outcome: str = OK
    instance: str | None = None
    ttfb_s: float | None = None
    duration_s: float = 0.0
    #: Why nothing could be routed, when that is the answer (a ROUTE_BLOCKED event).
    blocked: str | None = None
    #: Why a stream cut mid-answer could not be continued (the client's error event).
    stream_error: str | None = None
    usage: Usage | None = None
    #: Its live span when tracing is on (proxy.tracing), ended by the recorder.
    trace: RequestTrace | None = None

    def add(self, attempt: Attempt) -> None:
        """Append an entry that has ended (its `at` is now)."""
        attempt.at = time.time()
        self.attempts.append(attempt)
        if attempt.sent:
            self.sent += 1

    @property
    def upstream_s(self) -> float:
        """Seconds spent in attempts (waiting on upstreams), for the overhead metric."""
        return sum(a.elapsed_ms for a in self.attempts) / 1000.0

    @property
    def tried(self) -> list[Attempt]:
        """The attempts sent upstream, in order (the skips left out)."""
        return [a for a in self.attempts if a.sent]
