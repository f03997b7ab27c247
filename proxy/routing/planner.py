"""The scored route plan: which instances may serve a request, in what order, and why.

request -> requirements -> resolution of `model` -> hard filters -> scores -> plan.
Planning reads only in-memory state (the registry, the session table) and touches no
network; it takes microseconds.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.api.errors import NotFound
from proxy.api.inbound import ClientRequest
from proxy.audit.schema import plan_doc
from proxy.config import Config
from proxy.engine.record import PREFILL, REPLAY
from proxy.health.fingerprints import models_match
from proxy.health.instance import InstanceState
from proxy.health.registry import Registry
from proxy.health.states import DRAINED, STALE_STATES
from proxy.routing.affinity import Affinity, Prefix, prefix_of
from proxy.routing.requirements import Requirements, extract
from proxy.routing.scoring import RATE_LIMITED_REASON, Terms, hard_filter, score, terms
from proxy.routing.sessions import SessionTable

AUTO = "auto"
SCORED = "scored"
LEAST_LOADED = "least_loaded"


@dataclass(slots=True)
class RoutePlan:
    """Plain data: the decision for one request, kept for the audit record."""

    plan_id: str
    request_id: str
    model: str
    requirements: Requirements
    strategy: str
    selected: str | None
    fallback: list[str]
    rejected: dict[str, str]
    reasons: dict[str, list[str]]
    scores: dict[str, float]
    #: Instances to try, in order (selected first). Not part of the serialised plan.
    candidates: list[InstanceState] = field(default_factory=list, repr=False)
    #: How many candidates were healthy at planning time; the rest are last resorts.
    healthy: int = 0
    #: The instance the plan would have chosen were it ready, when that is not `selected`
    #: (recorded as REROUTED / INSTANCE_NOT_READY), and why it was not.
    preferred: str | None = None
    preferred_why: str | None = None
    #: Instances left out only because of a rate-limit cooldown: they could serve once it
    #: ends (the forwarder may wait for the soonest, or answer 429 with its Retry-After).
    cooling: tuple[InstanceState, ...] = ()
    #: The prompt's hash chain (proxy.routing.affinity), remembered for whoever serves it.
    prefix: Prefix | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return plan_doc(self.plan_id, self.request_id, self.model, self.strategy,
                        self.requirements.as_dict(), self.selected, self.fallback,
                        self.rejected, self.reasons, self.scores)


@dataclass(slots=True)
class Continuation:
    """The instances that may continue a cut stream, in order, each with its mode (PREFILL,
    REPLAY, or None: it could prefill, but not this request), and those left out (id ->
    why)."""

    candidates: list[InstanceState]
    modes: list[str | None]
    rejected: dict[str, str]


@dataclass(slots=True)
class Resolution:
    """What the client's `model` names: tiers of instances, tried tier by tier."""

    tiers: list[list[InstanceState]]
    strategy: str = SCORED
    tags: tuple[str, ...] = ()  # a tag group's tags stand in for the request's


_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def _new_id_prefix() -> None:
    """A forked worker must not share its parent's prefix (ids would collide)."""
    global _ID_PREFIX, _id_counter
    _ID_PREFIX = os.urandom(8).hex()
    _id_counter = itertools.count(1)


os.register_at_fork(after_in_child=_new_id_prefix)


def new_id() -> str:
    """A unique id (request ids, plan ids): a random per-process prefix and a counter.

    No system call per id, unlike os.urandom; unique across processes and restarts.
    """
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


def resolve_model(config: Config, registry: Registry, model: str) -> Resolution | None:
    """Resolve `model`: a group, an instance id, an upstream model name, or `auto`.

    A group confines the request to its members. A named instance comes first, then
    every other instance; a model name puts the instances serving it first, then the
    rest; a model name is a label (`metadata.model`) or, failing that, a name a server
    lists. Returns None when the name is unknown (the caller decides: 404 or `auto`).
    """
    return configured_resolution(config, registry, model) or listed_resolution(registry, model)


def configured_resolution(config: Config, registry: Registry, model: str) -> Resolution | None:
    """What `model` names by the config alone (`auto`, a group, an instance id, a label):
    the same for every request while the config and the registry's instances are, so
    the planner keeps it. None for any other name."""
    states = registry.states
    if model == AUTO or not model:
        return Resolution([list(states)])
    group = config.models.get(model)
    if group is not None:
        if group.instances:
            return Resolution([[registry.by_id[i] for i in group.instances]], group.strategy)
        wanted = set(group.tags)
        members = [s for s in states if not wanted.isdisjoint(s.config.tags)]
        return Resolution([members], group.strategy, group.tags)
    inst = config.instance(model)
    if inst is not None:
        first = registry.by_id[inst.id]
        return Resolution([[first], [s for s in states if s is not first]])
    serving = [s for s in states if s.config.model == model]
    if serving:
        return Resolution([serving, [s for s in states if s.config.model != model]])
    return None


def listed_resolution(registry: Registry, model: str) -> Resolution | None:
    """The instances whose server lists `model` as its probe reported it (changes with
    every probe), first; None when none does."""
    states = registry.states
    listed = [s for s in states if s.pin is not None and model in s.pin.models]
    if listed:
        return Resolution([listed, [s for s in states
                                    if s.pin is None or model not in s.pin.models]])
    return None


class Planner:
    """Builds route plans from config, live instance state and session memory."""

    def __init__(self, config: Config, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self.sessions = SessionTable(config.routing.sticky_ttl_s, config.routing.max_sessions)
        aff = config.routing.affinity
        self.affinity = Affinity(aff.enabled, aff.ttl_s, aff.max_entries, aff.min_prefix_chars)
        #: configured_resolution per model name (only names the config knows: bounded),
        #: for the registry's instances as they were when they were worked out.
        self._resolved: dict[str, Resolution] = {}
        self._resolved_for = registry.states
        #: scoring.terms by (the request's `prefer`, whether it has tags): at most ten.
        self._terms: dict[tuple[str | None, bool], Terms] = {}

    def resolve(self, model: str) -> Resolution | None:
        """resolve_model, with what the config alone decides worked out once per name.
        The tiers are shared between plans: read, never changed."""
        registry = self.registry
        if registry.states is not self._resolved_for:  # (Registry.adopt replaced them)
            self._resolved.clear()
            self._resolved_for = registry.states
        found = self._resolved.get(model)
        if found is None:
            found = configured_resolution(self.config, registry, model)
            if found is None:
                return listed_resolution(registry, model)
            self._resolved[model] = found
        return found

    def requirements(self, req: ClientRequest, headers: Mapping[str, str]) -> Requirements:
        routing = self.config.routing
        return extract(req, headers, routing.default_max_tokens, routing.session_header)

    def plan(self, req: ClientRequest, headers: Mapping[str, str]) -> RoutePlan:
        """The plan for one request; raises NotFound for an unknown model in strict mode.

        `headers` is looked up with lower-case names (the server's are case-insensitive).
        """
        config = self.config
        resolution = self.resolve(req.model)
        if resolution is None:
            if config.routing.strict_models:
                raise NotFound(f"The model '{req.model}' does not exist on this proxy.",
                               param="model")
            resolution = Resolution([list(self.registry.states)])
        reqs = self.requirements(req, headers)
        if resolution.tags and reqs.tags_source != "header":
            reqs = _with_tags(reqs, resolution.tags)
        affinity = self.affinity
        # A prompt shorter than min_prefix_chars is neither looked up nor remembered.
        prefix = prefix_of(req, affinity.min_prefix_chars) if affinity.enabled else None
        return self.build(req.request_id, req.model, reqs, resolution, prefix)

    def terms(self, reqs: Requirements) -> Terms:
        """scoring.terms for this config and request, worked out once per kind of request."""
        key = (reqs.prefer, bool(reqs.tags))
        found = self._terms.get(key)
        if found is None:
            routing = self.config.routing
            found = self._terms[key] = terms(routing.weights, reqs, routing.prefer_local)
        return found

    def build(self, request_id: str, model: str, reqs: Requirements,
              resolution: Resolution, prefix: Prefix | None = None) -> RoutePlan:
        """Filter, score and order the resolved instances. A request's session wins over
        its prompt's prefix: affinity is looked up only when the session has no instance."""
        routing = self.config.routing
        sticky_id = self.sessions.get(reqs.session)
        now = time.monotonic()
        strategy = resolution.strategy
        built = _Build(reqs, self.terms(reqs), now, strategy, routing.balance == LEAST_LOADED)
        hit = self.affinity.hit(prefix, now) if sticky_id is None and strategy == SCORED \
            else None
        holders, hit_share = hit if hit is not None else (None, 0.0)
        resident = self.affinity.store.resident if self.affinity.enabled else None
        scores, reasons = built.scores, built.reasons
        ordered: list[InstanceState] = []
        seen: set[str] = set()
        ctx_reason = built.ctx_reason
        first_rank: _Rank | None = None  # the rank (see _key) of the plan's first instance
        position = 0
        terms, balance, scored = built.terms, built.balance, strategy == SCORED
        for tier_no, tier in enumerate(resolution.tiers):
            ranked: list[tuple[float, int, InstanceState]] = []  # (score, position, it)
            for inst in tier:
                inst_id = inst.id
                if inst_id in seen:
                    continue
                seen.add(inst_id)
                position += 1
                sticky = None if sticky_id is None else inst_id == sticky_id
                why = hard_filter(inst, reqs, now)
                if why is not None:
                    built.reject(inst, why, sticky, tier_no, position)
                    continue
                stale = inst.state in STALE_STATES
                value, why_list = score(
                    inst, reqs, terms, sticky, now, ctx_reason, stale, balance,
                    None if holders is None else hit_share if inst_id in holders else 0.0,
                    0 if resident is None or inst.capacity is None else resident(inst_id))
                scores[inst_id] = value
                reasons[inst_id] = why_list
                if stale or not inst.circuit.available(now):
                    built.hold_back(inst, stale, why_list,
                                    (tier_no, _key(strategy, value, position), position))
                else:
                    ranked.append((value, position, inst))
            if not ranked:
                continue
            if scored:
                ranked.sort(key=_by_score)  # stable: ties keep config order
            if first_rank is None:  # the lowest rank of the first tier with a ready one
                value, at, _ = ranked[0]
                first_rank = (tier_no, _key(strategy, value, at), at)
            ordered.extend([inst for _, _, inst in ranked])
        plan = built.plan(request_id, model, ordered, first_rank)
        plan.prefix = prefix
        return plan

    def served(self, plan: RoutePlan, instance_id: str | None) -> None:
        """Feed back who answered: the session sticks to it from now on, and it has the
        prompt's prefix cached."""
        if instance_id is not None:
            if plan.requirements.session is not None:
                self.sessions.remember(plan.requirements.session, instance_id)
            if plan.prefix is not None:
                self.affinity.served(plan.prefix, instance_id)


    def continuation(self, plan: RoutePlan, origin: InstanceState,
                     prefill: bool) -> Continuation:
        """Who may continue a stream `origin` was cut in, and how, as things stand now.

        In order: the plan's candidates after `origin`, then those before it, then
        instances the plan rejected that are fit again (a twin that came back after
        planning). Each continues by prefill when it declares it and `prefill` is True (the
        request can be continued so), else by replay when it serves the same model (a
        greedy replay gives the same text); one that declares prefill but can do neither
        here has mode None (a skip: UNSUPPORTED_REQUEST). The rest are left out, with why.
        """
        candidates = plan.candidates
        start = next((n + 1 for n, c in enumerate(candidates) if c is origin), 0)
        pool = candidates[start:] + [c for c in candidates[:start] if c is not origin]
        seen = {c.id for c in pool} | {origin.id}
        now = time.monotonic()
        for inst_id in plan.rejected:
            inst = self.registry.by_id.get(inst_id)
            if inst is not None and inst.id not in seen and inst.routable(now) \
                    and hard_filter(inst, plan.requirements, now) is None:
                pool.append(inst)
        chosen = Continuation([], [], {})
        for inst in pool:
            mode = PREFILL if inst.prefill_ok and prefill else \
                REPLAY if _twins(origin, inst) else None
            if mode is None and not inst.prefill_ok:
                chosen.rejected[inst.id] = "no prefill capability and another model"
                continue
            chosen.candidates.append(inst)
            chosen.modes.append(mode)
        return chosen


def _twins(a: InstanceState, b: InstanceState) -> bool:
    """Whether two instances serve the same model (so a greedy replay gives the same text)."""
    ma = a.fingerprint or a.config.model
    mb = b.fingerprint or b.config.model
    return ma is not None and mb is not None and models_match(ma, mb)


_Rank = tuple[int, float, int]  # (tier, score or position key, position): lower first


class _Build:
    """One plan being built: the instances left out and held back so far, and why."""

    __slots__ = ("reqs", "terms", "now", "strategy", "ctx_reason", "rejected", "reasons",
                 "scores", "last_resort", "desperate", "cooling", "unready", "balance")

    def __init__(self, reqs: Requirements, weights: Terms, now: float, strategy: str,
                 balance: bool = True) -> None:
        self.reqs = reqs
        self.balance = balance
        self.terms = weights
        self.now = now
        self.strategy = strategy
        self.ctx_reason = f"ctx>={reqs.ctx_needed}"
        self.rejected: dict[str, str] = {}
        self.reasons: dict[str, list[str]] = {}
        self.scores: dict[str, float] = {}
        self.last_resort: list[InstanceState] = []
        self.desperate: list[InstanceState] = []
        self.cooling: list[InstanceState] = []
        #: The best instance that is not ready now, for the audit: (rank, id, why).
        self.unready: tuple[_Rank, str, str] | None = None

    def reject(self, inst: InstanceState, why: str, sticky: bool | None, tier_no: int,
               position: int) -> None:
        """A hard filter left `inst` out. One that could serve once its state or
        rate-limit cooldown changes is ranked as if it were ready, for the audit."""
        self.rejected[inst.id] = why
        limited = why.startswith(RATE_LIMITED_REASON)
        if limited:
            self.cooling.append(inst)
        if inst.state != DRAINED and (limited or why.startswith("state=")):
            value, _ = score(inst, self.reqs, self.terms, sticky, self.now, self.ctx_reason,
                             True, self.balance)
            self._unready((tier_no, _key(self.strategy, value, position), position),
                          inst.id, why)

    def hold_back(self, inst: InstanceState, stale: bool, why_list: list[str],
                  rank: _Rank) -> None:
        """`inst` is still tried, after every healthy instance: never refuse a request some
        instance might serve (a server may be back before the prober or its cooldown has
        noticed). Down by both probe and traffic: last."""
        circuit = inst.circuit
        open_circuit = not circuit.available(self.now)
        if stale:
            why_list[0] = f"state={inst.state}"
        if open_circuit:
            why_list.append(f"circuit_open={circuit.remaining(self.now):.1f}s")
        why_list.append("last_resort")
        (self.desperate if stale and open_circuit else self.last_resort).append(inst)
        self._unready(rank, inst.id, f"state={inst.state}" if stale
                      else f"circuit {circuit.state}")

    def _unready(self, rank: _Rank, inst_id: str, why: str) -> None:
        if self.unready is None or rank < self.unready[0]:
            self.unready = (rank, inst_id, why)

    def plan(self, request_id: str, model: str, ordered: list[InstanceState],
             first_rank: _Rank | None) -> RoutePlan:
        """The plan: the healthy instances in order, then the held back ones."""
        healthy = len(ordered)
        ordered.extend(self.last_resort)
        ordered.extend(self.desperate)
        ids = [s.id for s in ordered]
        preferred = preferred_why = None
        unready = self.unready
        if unready is not None and (first_rank is None or unready[0] < first_rank):
            preferred, preferred_why = unready[1], unready[2]
        # In the order of RoutePlan's fields (keywords took 0.5 us more per plan).
        return RoutePlan(new_id(), request_id, model, self.reqs, self.strategy,
                         ids[0] if ids else None, ids[1:], self.rejected, self.reasons,
                         self.scores, ordered, healthy, preferred, preferred_why,
                         tuple(self.cooling))


def larger_window(failed: int | None, candidate: int | None) -> bool:
    """Whether an instance with context window `candidate` (tokens; None: unknown) might
    fit a prompt that overflowed a window of `failed` tokens (None: unknown)."""
    if failed is None or candidate is None:
        return True
    return candidate > failed


def _by_score(item: tuple[float, int, InstanceState]) -> float:
    return -item[0]


def _key(strategy: str, value: float, position: int) -> float:
    """Within a tier, lower keys come first: by score when scored, by position when ordered."""
    return -value if strategy == SCORED else float(position)


def _with_tags(reqs: Requirements, tags: tuple[str, ...]) -> Requirements:
    return Requirements(reqs.prompt_tokens, reqs.ctx_needed, reqs.capabilities, tags, "group",
                        reqs.prefer, reqs.session, reqs.protocol)
