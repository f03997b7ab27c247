"""Hard filters and weighted scores for one instance against one request's requirements.

Pure functions over plain data: no I/O, no clock reads beyond what the caller passes in,
no framework. Every term leaves a reason string so a plan explains itself, in the seed's
vocabulary (`READY`, `tags_match=coding`, `ctx>=4096`, `latency=38ms`, `local_preferred`),
and this proxy's own (`load=3/4`, `queue=2`, `prefix_hit=0.93`).
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.config import CAPABILITIES, InstanceConfig, Weights
from proxy.health.instance import InstanceState
from proxy.health.states import READY
from proxy.routing.requirements import Requirements

#: Time to first byte that scores 0.5 on the latency term.
LATENCY_HALF_MS = 500.0
#: Latencies are compared in steps of this size, so noise (1.1 ms against 1.3 ms) never
#: outranks config order, while 40 ms against 400 ms still does.
LATENCY_STEP_MS = 25.0
#: Score factor for an instance that does not say whether it has a capability the request
#: needs (unknown, not missing): it is still tried, after one that declares it when all
#: else is equal; a local one still beats a paid cloud one when local is preferred.
UNKNOWN_CAPABILITIES_FACTOR = 0.8
#: The local/cloud term: (weight factor, (share, reason) for a local instance, (share,
#: reason) for a cloud one), by the request's `x-route-prefer`, else `prefer_local`.
_LocalTerm = tuple[float, tuple[float, str], tuple[float, str]]
_LOCAL_TERMS: dict[str | None, _LocalTerm] = {
    "cloud": (3.0, (0.0, "local"), (1.0, "cloud_preferred")),
    "local": (3.0, (1.0, "local_preferred"), (0.0, "cloud")),
}
_LOCAL_PREFERRED: _LocalTerm = (1.0, (1.0, "local_preferred"), (0.0, "cloud"))
_NEUTRAL: _LocalTerm = (1.0, (0.5, "local"), (0.5, "cloud"))
#: The most of `weights.load` an instance's load takes away (reached at 1.8 x capacity).
LOAD_CAP = 0.9
#: The share of the load term that conversations an instance keeps cached take away, all
#: of it once they fill its slots: for an idle instance more than a known latency gains
#: over an unknown one, so that a new conversation goes to another instance rather than
#: evict one from a slot.
RESIDENT_SHARE = 0.5
#: How a rejection for a rate-limit cooldown begins (see InstanceState.rate_limit_reason).
RATE_LIMITED_REASON = "rate_limited("


def hard_filter(inst: InstanceState, req: Requirements, now: float) -> str | None:
    """Why the instance may not serve this request now, or None if it may.

    A rate-limit cooldown is checked last, so `rate_limited(...)` means the instance
    could serve the request once its cooldown (`now` is monotonic) is over.
    """
    blocked = inst.blocked_reason()
    if blocked is not None:
        return blocked
    cfg = inst.config
    if cfg.ctx is not None:
        if cfg.ctx < req.ctx_needed:
            return f"ctx={cfg.ctx}<{req.ctx_needed}"
    elif inst.learned_ctx is not None and inst.learned_ctx < req.ctx_needed:
        return f"ctx={inst.learned_ctx}(learned)<{req.ctx_needed}"
    if req.capabilities and cfg.unsupported:
        denied = req.capabilities & cfg.unsupported
        if denied:  # only an explicit statement filters: unmentioned is unknown
            return "capability_unsupported=" + ",".join(sorted(denied))
    if req.protocol:
        # What its protocol cannot express is never tried (rather than tried and failed,
        # or answered with less).
        provider = inst.provider
        unsupported = req.protocol & provider.unsupported
        if unsupported:
            return f"unsupported_by_{provider.name}=" + ",".join(sorted(unsupported))
    if inst.rate_limited_until > now:
        return inst.rate_limit_reason(now)
    return None


def tag_match(have: frozenset[str], wanted: tuple[str, ...]) -> tuple[float, str]:
    """(share of the wanted tags the instance has, reason). A `general` request is
    half-satisfied by any instance."""
    matched = [t for t in wanted if t in have]
    if matched:
        return len(matched) / len(wanted), "tags_match=" + ",".join(matched)
    return (0.5 if wanted == ("general",) else 0.0), "tags_match=none"


#: A plan's weights, worked out once per plan (`terms`): ready, tags, latency, local,
#: (share, reason) of a local and of a cloud instance, cost, error rate, load, affinity,
#: sticky, and the sum of the weights every instance is scored on (ready to error rate).
Terms = tuple[float, float, float, float, tuple[float, str], tuple[float, str], float, float,
              float, float, float, float]


def terms(weights: Weights, req: Requirements, prefer_local: bool) -> Terms:
    """The weights `score` applies for this request (its `prefer`, its tags)."""
    prefer = req.prefer
    factor, if_local, if_cloud = _LOCAL_TERMS.get(prefer) or (
        _LOCAL_PREFERRED if prefer_local else _NEUTRAL)
    latency_w = weights.latency * 3.0 if prefer == "fast" else weights.latency
    local_w = weights.local * factor
    cost_w = weights.cost * 3.0 if prefer == "cheap" else weights.cost
    # Summed in the order the terms are scored (the same floats as term by term).
    weight_sum = weights.ready
    if req.tags:
        weight_sum += weights.tags
    weight_sum += latency_w
    weight_sum += local_w
    weight_sum += cost_w
    weight_sum += weights.error_rate
    return (weights.ready, weights.tags, latency_w, local_w, if_local, if_cloud, cost_w,
            weights.error_rate, weights.load, weights.affinity, weights.sticky, weight_sum)


def score(inst: InstanceState, req: Requirements, weights: Terms,
          sticky: bool | None, now: float, ctx_reason: str,
          assume_ready: bool = False, balance: bool = True,
          prefix: float | None = None, resident: int = 0) -> tuple[float, list[str]]:
    """(score in 0..1, reasons) for an instance that passed the hard filters.

    `weights` are the plan's (`terms`). `sticky` is None when the request's session has
    no instance yet; otherwise it says
    whether this instance is the session's, and the term counts for every candidate.
    `ctx_reason` is the request's `ctx>=N`, formatted once per plan. This runs once per
    instance per request, so it avoids needless allocations. `assume_ready` scores an
    instance as if it were READY (what would the plan be, were it up?). `balance` adds
    the load term (`routing.balance: least_loaded`). `prefix` is None when no instance is
    known to have the request's prompt prefix cached; otherwise the share of the prompt
    this instance has (0.0: another one has it), and the term counts for every candidate.
    `resident`: conversations the instance holds in its cache (proxy.routing.affinity), a
    part of the load term of an instance of known capacity (slots) that spreads new
    conversations over the slots of all instances.
    """
    (ready_w, tags_w, latency_w, local_w, if_local, if_cloud, cost_w, error_w, load_w,
     affinity_w, sticky_w, weight_sum) = weights
    # Readiness: a probed, healthy instance beats one nobody has checked yet.
    reasons = [inst.state]
    total = ready_w * (1.0 if assume_ready or inst.state == READY else 0.6)

    # Tags: the share of the requested tags the instance carries.
    tags = req.tags
    if tags:
        cache = inst.tag_match_cache
        cached = cache.get(tags)
        if cached is None:
            if len(cache) >= 512:  # clients choose tags freely: keep the cache bounded
                cache.clear()
            cached = cache[tags] = tag_match(inst.tags, tags)
        total += tags_w * cached[0]
        reasons.append(cached[1])

    # A window the server stated (learned) is named as such: the config did not say it.
    reasons.append(ctx_reason if inst.config.ctx is not None else inst.ctx_reason)

    # Latency: EWMA of time to first byte from real traffic; unknown is neutral.
    ewma = inst.ttfb_ewma_ms
    if ewma is None:
        total += latency_w * 0.5
    else:
        stepped = (ewma // LATENCY_STEP_MS) * LATENCY_STEP_MS
        total += latency_w / (1.0 + stepped / LATENCY_HALF_MS)
    reasons.append(inst.latency_reason)

    # Local or cloud, as the request and else the config prefer.
    share, why = if_local if inst.config.local else if_cloud
    total += local_w * share
    reasons.append(why)

    # Cost per million tokens (input + output): free scores 1.
    cost = inst.cost_per_mtok
    total += cost_w / (1.0 + cost)
    if cost:
        reasons.append(f"cost={cost:g}/Mtok")

    # Recent error rate from live traffic.
    rate = inst.error_rate(now)
    total += error_w * (1.0 - rate)
    if rate:
        reasons.append(f"error_rate={rate:.2f}")

    if balance or prefix is not None:
        added, added_weight = _load_and_prefix(inst, load_w, affinity_w, balance, prefix,
                                               resident, reasons)
        total += added
        weight_sum += added_weight

    if sticky is not None:
        weight_sum += sticky_w
        if sticky:
            total += sticky_w
            reasons.append("sticky_session")

    value = total / weight_sum
    if req.capabilities:
        unknown = req.capabilities - inst.config.capabilities
        if unknown:
            value *= UNKNOWN_CAPABILITIES_FACTOR
            reasons.append("capability_unknown=" + ",".join(sorted(unknown)))
    return value, reasons


def _load_and_prefix(inst: InstanceState, load_w: float, affinity_w: float, balance: bool,
                     prefix: float | None, resident: int,
                     reasons: list[str]) -> tuple[float, float]:
    """(score, weight) of the load term (with `balance`: a penalty, weighing nothing) and
    the prefix-cache term (with a `prefix` share: see `score`), their reasons appended to
    `reasons`."""
    # Load: requests in flight (the proxy's own, and the server's for other clients) and
    # queued, against what the instance serves at once. A penalty, nothing when idle (so
    # that plans among idle instances are what they were without it), half the weight at
    # capacity (an idle server beats a full one by more than a known latency beats an
    # unknown one), rising as steeply beyond it up to LOAD_CAP of the weight (below
    # `local`: a busy local server still beats an idle cloud one), so full instances keep
    # taking turns rather than the one with the best latency taking all. Unknown
    # capacity: load / (1 + load).
    busy, queued = inst.load()
    capacity = inst.capacity
    total = weight = 0.0
    if balance:
        waiting = busy + queued
        if capacity is None:
            idle = 1.0 / (1.0 + waiting)
            if busy:
                reasons.append(f"load={busy}")
        else:
            busy_share = 0.5 * waiting / capacity
            idle = 1.0 - (busy_share if busy_share < LOAD_CAP else LOAD_CAP)
            reasons.append(f"load={busy}/{capacity}")
            if resident:
                # Conversations it keeps cached count too: a new conversation goes where
                # fewer are kept, so that each fits a slot (llama.cpp keeps one per slot).
                idle *= 1.0 - RESIDENT_SHARE * (resident / capacity if resident < capacity
                                                else 1.0)
                reasons.append(f"resident={resident}")
        total = -load_w * (1.0 - idle)
    if queued:
        reasons.append(f"queue={queued}")
    if prefix is not None:
        weight += affinity_w
        if prefix:
            # The load guard: a cached prefix never earns a place in a queue.
            if queued or (capacity is not None and busy >= capacity):
                reasons.append(f"prefix_hit={prefix:.2f}(busy)")
            else:
                total += affinity_w * prefix
                reasons.append(f"prefix_hit={prefix:.2f}")
    return total, weight


def capability_notes(instances: Iterable[InstanceConfig]) -> list[str]:
    """Capabilities that only cloud instances (or none) can serve, as sentences for
    `check` and the start-up log; [] when local instances may serve every one.

    By the planner's rules: an enabled instance may serve a capability unless it lists
    it in `unsupported`, except `prefill`, used only where declared. A capability that
    local instances may serve but only cloud ones declare is noted too: requests that
    need it go to the silent local instances first.
    """
    enabled = [i for i in instances if i.enabled]
    notes = []
    for cap in CAPABILITIES:
        declared = [i for i in enabled if cap in i.capabilities]
        able = declared if cap == "prefill" else [i for i in enabled if cap not in i.unsupported]
        if not able:
            notes.append("prefill: no instance declares it: a stream cut mid-answer is "
                         "replayed on a same-model instance or fails" if cap == "prefill"
                         else f"{cap}: no instance can serve it (all list it as unsupported)")
        elif not any(i.local for i in able):
            notes.append(f"{cap}: only cloud instances can serve it ({_ids(able)})")
        elif declared and not any(i.local for i in declared):
            notes.append(f"{cap}: only cloud instances declare it ({_ids(declared)}); local "
                         "instances that do not mention it are tried first (list it in "
                         "their metadata.unsupported if they lack it)")
    return notes


def _ids(instances: list[InstanceConfig]) -> str:
    return ", ".join(i.id for i in instances)
