"""The route plan: which instances may serve a request, in what order, and why.

Planning reads only in-memory state (the registry) and touches no network. For now the
order is the config order among the instances the requested model resolves to; the
scored planner replaces `order_candidates` without changing the plan's shape.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from proxy.config import Config
from proxy.instances import InstanceState, Registry

AUTO = "auto"


@dataclass(slots=True)
class RoutePlan:
    """Plain data: the decision for one request, kept for the audit record."""

    plan_id: str
    request_id: str
    model: str
    selected: str | None
    fallback: list[str]
    rejected: dict[str, str]
    reasons: dict[str, list[str]]
    scores: dict[str, float]
    #: Instances to try, in order (selected first). Not part of the serialised plan.
    candidates: list[InstanceState] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "plan_id": self.plan_id,
            "request_id": self.request_id,
            "model": self.model,
            "selected": self.selected,
            "fallback": self.fallback,
            "rejected": self.rejected,
            "reasons": self.reasons,
            "scores": self.scores,
        }


def new_id() -> str:
    """A short random hex id (request ids, plan ids)."""
    return os.urandom(12).hex()


def resolve_model(config: Config, registry: Registry, model: str) -> tuple[list[InstanceState], list[InstanceState]]:
    """(preferred, others): the instances the client's `model` names, then the rest.

    `model` may be a model group, an instance id (full or short), an upstream model name
    or `auto`. A group confines the request to its members; a specific instance or
    model comes first, with every other instance behind it as a fallback.
    """
    states = registry.states
    if model == AUTO or not model:
        return list(states), []
    group = config.models.get(model)
    if group is not None:
        if group.instances:
            return [registry.by_id[i] for i in group.instances], []
        wanted = set(group.tags)
        return [s for s in states if wanted & set(s.config.tags)], []
    inst = config.instance(model)
    if inst is not None:
        first = registry.by_id[inst.id]
        return [first], [s for s in states if s is not first]
    serving = [s for s in states if s.config.model == model]
    if serving:
        return serving, [s for s in states if s.config.model != model]
    return [], list(states)


def order_candidates(preferred: list[InstanceState], others: list[InstanceState],
                     rejected: dict[str, str], reasons: dict[str, list[str]]) -> list[InstanceState]:
    """Config order: routable preferred, routable others, then cooling-down ones as a last resort.

    A cooling-down instance is still tried after every healthy one, so a request is
    never refused while some instance could serve it.
    """
    now = time.monotonic()
    ready: list[InstanceState] = []
    last_resort: list[InstanceState] = []
    for group, label in ((preferred, "model_match"), (others, "fallback_any")):
        for inst in group:
            why = inst.not_routable_reason(now)
            if why is None:
                ready.append(inst)
                reasons[inst.id] = ["READY", label]
            elif why == "disabled":
                rejected[inst.id] = why
            else:
                last_resort.append(inst)
                reasons[inst.id] = [why, label, "last_resort"]
    return ready + last_resort


def plan_route(config: Config, registry: Registry, request_id: str, model: str) -> RoutePlan:
    """Build the plan for one request."""
    preferred, others = resolve_model(config, registry, model)
    rejected: dict[str, str] = {}
    reasons: dict[str, list[str]] = {}
    order = order_candidates(preferred, others, rejected, reasons)
    ids = [s.id for s in order]
    n = len(ids)
    return RoutePlan(
        plan_id=new_id(),
        request_id=request_id,
        model=model,
        selected=ids[0] if ids else None,
        fallback=ids[1:],
        rejected=rejected,
        reasons=reasons,
        scores={i: round(1.0 - k / max(n, 1), 3) for k, i in enumerate(ids)},
        candidates=order,
    )
