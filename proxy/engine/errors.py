"""What the client is told when the attempt loop gives up: the error for a request no
attempt could serve (429, 400, 503, 502, 504, in OpenAI's shape: proxy.api.errors), and the
message of a stream cut mid-answer that no instance could continue."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from proxy.api.errors import (
    AllAttemptsFailed,
    AllAttemptsTimedOut,
    ContextError,
    ProxyError,
    RateLimitedError,
    RouteBlocked,
)
from proxy.engine.record import RequestRecord
from proxy.failures import CONTEXT_TOO_LONG, TIMEOUT, Failure
from proxy.health.instance import InstanceState
from proxy.routing.planner import RoutePlan

#: Instances held back by a rate-limit cooldown -> the rate-limit headers of their 429 in
#: this request (empty when the cooldown predates it).
Limited = dict[str, tuple[InstanceState, Mapping[str, str]]]


def final_error(plan: RoutePlan, record: RequestRecord, limited: Limited,
                last: Failure | None) -> ProxyError:
    """The error for a request no attempt could serve (`last`: its last failure).

    While an instance that could serve it is in a rate-limit cooldown, that is the
    answer: 429 with `Retry-After` = the soonest end (whole seconds, rounded up, at
    least 1), and the rate-limit headers of that instance's 429 when it answered one
    in this request. A request larger than every instance's window is a 400; nothing
    ready a 503 (its message in `record.blocked`); every attempt timed out a 504; else
    a 502 listing each attempt and each instance not tried.
    """
    tried = [a for a in record.attempts if a.sent]
    listing = "; ".join(a.describe() for a in tried)
    not_tried = dict(plan.rejected)
    not_tried.update((a.instance, a.detail) for a in record.attempts if not a.sent)
    if limited:
        return _rate_limited(plan, limited, listing)
    if not tried and _only_too_small(not_tried):
        # Every instance is too small for it (no outage): the client's request must
        # change, so a 400 as OpenAI gives it, which SDKs do not retry (a 503 they would).
        why = "; ".join(f"{i}: {r}" for i, r in not_tried.items())
        return ContextError(
            f"This request needs about {plan.requirements.ctx_needed} tokens of context "
            f"(prompt estimate plus max_tokens), more than any instance for model "
            f"'{plan.model}' has ({why}). Shorten the messages or lower max_tokens.")
    if not plan.healthy or not tried:
        # Nothing was ready (whatever was tried was a last resort), or nothing could be sent.
        why = "; ".join(f"{i}: {r}" for i, r in not_tried.items())
        if tried:
            why = f"{why}; " * bool(why) + f"last-resort tries failed: {listing}"
        error: ProxyError = RouteBlocked(
            f"No available instances for model '{plan.model}'"
            + (f" ({why})." if why else "."))
        record.blocked = error.message
        return error
    codes = {a.code for a in tried}
    n = len(tried)
    summary = f"All {n} attempt{'s' if n > 1 else ''} failed: {listing}"
    if not_tried:
        summary += ". Not tried: " + "; ".join(f"{i} ({r})" for i, r in not_tried.items())
    if codes == {TIMEOUT}:
        return AllAttemptsTimedOut(summary)
    if codes == {CONTEXT_TOO_LONG} and last is not None and last.overflow is not None:
        return ContextError(f"{last.overflow.message or last.detail} ({summary})")
    return AllAttemptsFailed(summary)


def _rate_limited(plan: RoutePlan, limited: Limited, listing: str) -> ProxyError:
    """429: only instances in a rate-limit cooldown could serve it."""
    now = time.monotonic()
    inst, headers = min(limited.values(), key=lambda entry: entry[0].rate_limited_until)
    wait = max(1, math.ceil(inst.rate_limited_until - now))
    cooling = ", ".join(f"{i.id} for {max(0.0, i.rate_limited_until - now):.1f}s"
                        for i, _ in limited.values())
    message = f"No instance can serve model '{plan.model}' now: rate limited " \
              f"({cooling}); retry after {wait}s."
    if listing:
        message += f" Attempts: {listing}."
    return RateLimitedError(message, headers={**headers, "retry-after": str(wait)})


def _only_too_small(rejected: dict[str, str]) -> bool:
    """Whether every instance left out was left out for its context window (those an
    admin took out aside), so waiting would not help."""
    sizes = [r for r in rejected.values() if r not in ("drained", "disabled")]
    return bool(sizes) and all(r.startswith("ctx=") for r in sizes)


def stream_failed(origin: str, first: Failure, why_not: str, failed: str,
                  failure: Failure) -> str:
    """The message of a stream cut on `origin` (by `first`) that could not be continued
    (`why_not`); `failed` and `failure`: the last try to continue it, when not `origin`."""
    message = (f"The stream from {origin} failed after the answer had started "
               f"({first.code}: {first.detail}) and could not be continued: {why_not}.")
    if failed != origin:
        message += (f" The last try to continue it, on {failed}, failed too "
                    f"({failure.code}: {failure.detail}).")
    return message
