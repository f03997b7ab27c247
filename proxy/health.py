"""Background health probes: what each instance is, and whether it is up, off the request path.

One task per instance asks the server, the way its implementation answers (llama.cpp's
`/health` and `/props`, Ollama's `/api/tags`, otherwise `/v1/models`), every
`health.interval_s` with jitter. Each probe updates the instance's state (READY, LOADING,
DOWN, MISMATCH), learns or checks its fingerprint, and may close a circuit that
connection failures opened. Requests never wait for a probe.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import orjson
import structlog

from proxy.config import HealthConfig
from proxy.failures import UpstreamFailure
from proxy.fingerprints import any_match
from proxy.instances import DOWN, DRAINED, LOADING, MISMATCH, READY, InstanceState, Registry
from proxy.upstream import Upstream

log = structlog.get_logger("proxy.health")


@dataclass(slots=True)
class ProbeResult:
    """What one probe saw. `models` are the names the server reports serving."""

    state: str
    reason: str
    models: list[str] = field(default_factory=list)
    #: For one-model servers (llama.cpp): the model's identity, e.g. its alias.
    identity: str | None = None
    detail: str | None = None
    latency_ms: float = 0.0


def _json(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _listed_ids(doc: object) -> list[str]:
    """Model ids from an OpenAI `/v1/models` list or Ollama's `/api/tags`."""
    if not isinstance(doc, dict):
        return []
    items = doc.get("data")
    if not isinstance(items, list):
        items = doc.get("models")
    names: list[str] = []
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                for key in ("id", "name", "model"):
                    value = item.get(key)
                    if isinstance(value, str) and value not in names:
                        names.append(value)
    return names


class Prober:
    """Probes every instance in the background and applies what it sees to the registry."""

    def __init__(self, registry: Registry, upstream: Upstream, health: HealthConfig) -> None:
        self.registry = registry
        self.upstream = upstream
        self.health = health
        self._tasks: list[asyncio.Task[None]] = []

    async def probe(self, inst: InstanceState) -> ProbeResult:
        """Ask the server once; never raises."""
        cfg = inst.config
        timeout = self.health.timeout_s
        started = time.perf_counter()
        try:
            if cfg.server == "llamacpp":
                result = await self._probe_llamacpp(inst, timeout)
            elif cfg.server == "ollama":
                status, body = await self.upstream.probe(cfg, cfg.root_url + "/api/tags", timeout)
                result = self._from_listing(status, body)
            else:
                status, body = await self.upstream.probe(cfg, cfg.api_base + "/models", timeout)
                result = self._from_listing(status, body)
        except UpstreamFailure as failure:
            result = ProbeResult(DOWN, f"{failure.code}: {failure.detail}")
        result.latency_ms = round((time.perf_counter() - started) * 1000.0, 2)
        return result

    async def _probe_llamacpp(self, inst: InstanceState, timeout: float) -> ProbeResult:
        cfg = inst.config
        status, body = await self.upstream.probe(cfg, cfg.root_url + "/health", timeout)
        if status == 503:
            return ProbeResult(LOADING, "loading model (/health 503)")
        if status == 404:  # an older server, or not llama.cpp after all
            status, body = await self.upstream.probe(cfg, cfg.api_base + "/models", timeout)
            return self._from_listing(status, body)
        if status != 200:
            return ProbeResult(DOWN, f"/health answered HTTP {status}")
        status, body = await self.upstream.probe(cfg, cfg.root_url + "/props", timeout)
        doc = _json(body) if status == 200 else None
        if not isinstance(doc, dict):
            status, body = await self.upstream.probe(cfg, cfg.api_base + "/models", timeout)
            return self._from_listing(status, body)
        alias = doc.get("model_alias")
        path = doc.get("model_path")
        names = [n for n in (alias, path) if isinstance(n, str) and n]
        identity = alias if isinstance(alias, str) and alias else (names[0] if names else None)
        return ProbeResult(READY, "healthy", names, identity,
                           path if isinstance(path, str) else None)

    @staticmethod
    def _from_listing(status: int, body: bytes) -> ProbeResult:
        if status == 200:
            names = _listed_ids(_json(body))
            identity = names[0] if len(names) == 1 else None
            return ProbeResult(READY, "healthy", names, identity)
        if status == 404:
            return ProbeResult(READY, "reachable (no model listing)")
        if status == 503:
            return ProbeResult(LOADING, "model listing answered 503")
        return ProbeResult(DOWN, f"model listing answered HTTP {status}")

    def apply(self, inst: InstanceState, result: ProbeResult) -> None:
        """Apply a probe's result: state, fingerprint, circuit."""
        inst.last_probe_at = time.time()
        inst.last_probe_ms = result.latency_ms
        state, reason = result.state, result.reason
        if state == READY and result.models:
            state, reason = self._check_fingerprint(inst, result)
        inst.last_probe_error = None if state == READY else reason
        if state == READY and inst.circuit.on_probe_ok():
            # Back after a refused or reset connection: its old errors say nothing now.
            inst.forget_errors()
            log.info("circuit_closed", instance=inst.id, by="probe")
        if inst.state == DRAINED:
            return  # an admin took it out; probes only keep its figures fresh
        self.registry.set_state(inst, state, reason)

    @staticmethod
    def _check_fingerprint(inst: InstanceState, result: ProbeResult) -> tuple[str, str]:
        cfg = inst.config
        if cfg.fingerprint is None:
            return READY, "healthy (fingerprint off)"
        if inst.fingerprint is None:
            # `auto`: learn at the first good probe, then pin.
            if cfg.model and not any_match(cfg.model, result.models):
                return MISMATCH, (f"serves {', '.join(result.models[:5])}, "
                                  f"not the configured model {cfg.model}")
            learned = result.identity if cfg.server == "llamacpp" else None
            if learned is None:
                learned = cfg.model or result.identity
            if learned is None:
                return READY, f"healthy ({len(result.models)} models listed, none pinned)"
            inst.fingerprint = learned
            inst.fingerprint_source = "learned"
            inst.fingerprint_detail = result.detail
            log.info("fingerprint_pinned", instance=inst.id, fingerprint=learned,
                     detail=result.detail)
            return READY, "healthy (fingerprint pinned)"
        pinned_file = inst.fingerprint_detail
        if (inst.fingerprint_source == "learned" and pinned_file and result.detail
                and result.detail != pinned_file):
            # Same alias, another weights file: a different model under the same name.
            return MISMATCH, (f"serves the file {result.detail}, not the pinned "
                              f"{pinned_file} (alias {inst.fingerprint})")
        if any_match(inst.fingerprint, result.models):
            return READY, "healthy"
        return MISMATCH, (f"serves {', '.join(result.models[:5])}, "
                          f"not the pinned {inst.fingerprint}")

    async def probe_all(self) -> None:
        """One probe of every instance, concurrently (start-up, `check`)."""
        states = self.registry.states
        results = await asyncio.gather(*(self.probe(s) for s in states))
        for inst, result in zip(states, results, strict=True):
            self.apply(inst, result)

    async def _loop(self, inst: InstanceState) -> None:
        interval = self.health.interval_s
        while True:
            # Jittered, so probes of many instances do not fire in step. The first round
            # ran at start-up (probe_all), so the loop begins with a sleep.
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))
            try:
                self.apply(inst, await self.probe(inst))
            except Exception:  # a probe bug must not kill the loop
                log.exception("probe_failed", instance=inst.id)

    def start(self) -> None:
        """Start one background task per instance."""
        self._tasks = [asyncio.create_task(self._loop(s), name=f"probe:{s.id}")
                       for s in self.registry.states]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []


def reset_fingerprint(inst: InstanceState) -> None:
    """Forget a learned fingerprint; the next probe learns it again (admin action)."""
    if inst.fingerprint_source == "learned":
        inst.fingerprint = None
        inst.fingerprint_source = "none"
        inst.fingerprint_detail = None

