"""Hard filters and weighted scores for one instance against one request's requirements.

Pure functions over plain data: no I/O, no clock reads beyond what the caller passes in,
no framework. Every term leaves a reason string so a plan explains itself, in the seed's
vocabulary (`READY`, `tags_match=coding`, `ctx>=4096`, `latency=38ms`, `local_preferred`).
"""

from __future__ import annotations

from proxy.config import Weights
from proxy.instances import READY, ROUTABLE_STATES, InstanceState
from proxy.requirements import Requirements

#: Time to first byte that scores 0.5 on the latency term.
LATENCY_HALF_MS = 500.0
#: Score factor for an instance that declares no capabilities when some are needed.
UNKNOWN_CAPABILITIES_FACTOR = 0.8


def hard_filter(inst: InstanceState, req: Requirements) -> str | None:
    """Why the instance can never serve this request, or None if it may."""
    cfg = inst.config
    if not cfg.enabled:
        return "disabled"
    if inst.state not in ROUTABLE_STATES:
        return f"state={inst.state}"
    if cfg.ctx is not None and cfg.ctx < req.ctx_needed:
        return f"ctx={cfg.ctx}<{req.ctx_needed}"
    if req.capabilities and cfg.capabilities:
        missing = req.capabilities - cfg.capabilities
        if missing:
            return "missing_capability=" + ",".join(sorted(missing))
    return None


def score(inst: InstanceState, req: Requirements, weights: Weights, prefer_local: bool,
          sticky: bool | None) -> tuple[float, list[str]]:
    """(score in 0..1, reasons) for an instance that passed the hard filters.

    `sticky` is None when the request's session has no instance yet; otherwise it says
    whether this instance is the session's, and the term counts for every candidate.
    """
    cfg = inst.config
    reasons: list[str] = []
    total = 0.0
    weight_sum = 0.0

    # Readiness: a probed, healthy instance beats one nobody has checked yet.
    ready = 1.0 if inst.state == READY else 0.6
    reasons.append(inst.state)
    total += weights.ready * ready
    weight_sum += weights.ready

    # Tags: the share of the requested tags the instance carries.
    if req.tags:
        matched = [t for t in req.tags if t in cfg.tags]
        if matched:
            tag_term = len(matched) / len(req.tags)
            reasons.append("tags_match=" + ",".join(matched))
        else:
            tag_term = 0.5 if req.tags == ("general",) else 0.0
            reasons.append("tags_match=none")
        total += weights.tags * tag_term
        weight_sum += weights.tags

    reasons.append(f"ctx>={req.ctx_needed}" if cfg.ctx is not None else "ctx=unknown")

    # Latency: EWMA of time to first byte from real traffic; unknown is neutral.
    latency_w = weights.latency * (3.0 if req.prefer == "fast" else 1.0)
    ewma = inst.ttfb_ewma_ms
    if ewma is None:
        latency_term = 0.5
        reasons.append("latency=unknown")
    else:
        latency_term = 1.0 / (1.0 + ewma / LATENCY_HALF_MS)
        reasons.append(f"latency={ewma:.0f}ms")
    total += latency_w * latency_term
    weight_sum += latency_w

    # Local or cloud, as the config and the request prefer.
    wants_cloud = req.prefer == "cloud"
    wants_local = req.prefer == "local" or (prefer_local and not wants_cloud)
    local_w = weights.local * (3.0 if req.prefer in ("local", "cloud") else 1.0)
    if wants_local:
        local_term = 1.0 if cfg.local else 0.0
        reasons.append("local_preferred" if cfg.local else "cloud")
    elif wants_cloud:
        local_term = 0.0 if cfg.local else 1.0
        reasons.append("local" if cfg.local else "cloud_preferred")
    else:
        local_term = 0.5
        reasons.append("local" if cfg.local else "cloud")
    total += local_w * local_term
    weight_sum += local_w

    # Cost per million tokens (input + output): free scores 1.
    cost_w = weights.cost * (3.0 if req.prefer == "cheap" else 1.0)
    cost = cfg.cost_input_per_mtok + cfg.cost_output_per_mtok
    total += cost_w / (1.0 + cost)
    weight_sum += cost_w
    if cost:
        reasons.append(f"cost={cost:g}/Mtok")

    # Recent error rate from live traffic.
    rate = inst.error_rate()
    total += weights.error_rate * (1.0 - rate)
    weight_sum += weights.error_rate
    if rate:
        reasons.append(f"error_rate={rate:.2f}")

    if sticky is not None:
        weight_sum += weights.sticky
        if sticky:
            total += weights.sticky
            reasons.append("sticky_session")

    value = total / weight_sum if weight_sum else 0.0
    if req.capabilities and not cfg.capabilities:
        value *= UNKNOWN_CAPABILITIES_FACTOR
        reasons.append("capabilities_unknown")
    return round(value, 3), reasons
