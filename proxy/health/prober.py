"""Background health probes: what each instance is, and whether it is up, off the request path.

One task per instance asks the server, the way its implementation answers (llama.cpp's
`/health` and `/props`, Ollama's `/api/tags`, otherwise `/v1/models`), every
`health.interval_s` with jitter. Each probe updates the instance's state (READY, LOADING,
DOWN, MISMATCH), learns or checks its fingerprint (proxy/health/fingerprints.py), notes a label
the server does not list as a warning, and may close a circuit that connection failures
opened. Requests never wait for a probe.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import orjson
import structlog

from proxy.config import HealthConfig
from proxy.failures import UpstreamFailure
from proxy.health.fingerprints import Served, judge, label_warning, learn
from proxy.health.instance import DOWN, LOADING, MISMATCH, READY, InstanceState
from proxy.health.registry import Registry
from proxy.providers.transport import Upstream

log = structlog.get_logger("proxy.health.prober")


@dataclass(slots=True)
class ProbeResult:
    """What one probe saw: a state, why, and what the server says it serves (None when
    it did not say)."""

    state: str
    reason: str
    served: Served | None = None
    latency_ms: float = 0.0


def _json(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _listed_ids(doc: object) -> list[str]:
    """Model names from an OpenAI `/v1/models` list (with llama.cpp's `aliases` of each)
    or Ollama's `/api/tags` (`name`, `model`)."""
    if not isinstance(doc, dict):
        return []
    items = doc.get("data")
    if not isinstance(items, list):
        items = doc.get("models")
    names: list[str] = []
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                aliases = item.get("aliases")
                extra = aliases if isinstance(aliases, list) else []
                for value in (item.get("id"), item.get("name"), item.get("model"), *extra):
                    if isinstance(value, str) and value and value not in names:
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
        # `model_alias` is the --alias, else the -m path or -hf repo; `model_path` the file
        # (llama.cpp tools/server/server-context.cpp get_res_props, llama-cpp-python 0.3.36).
        alias, path = doc.get("model_alias"), doc.get("model_path")
        names = tuple(dict.fromkeys(n for n in (alias, path) if isinstance(n, str) and n))
        if not names:  # an older server whose /props does not say
            status, body = await self.upstream.probe(cfg, cfg.api_base + "/models", timeout)
            return self._from_listing(status, body)
        return ProbeResult(READY, "healthy", Served(
            names, names[0], path if isinstance(path, str) and path else None))

    @staticmethod
    def _from_listing(status: int, body: bytes) -> ProbeResult:
        if status == 200:
            names = tuple(_listed_ids(_json(body)))
            return ProbeResult(READY, "healthy",
                               Served(names, names[0] if len(names) == 1 else None))
        if status == 404:
            return ProbeResult(READY, "reachable (no model listing)")
        if status == 503:
            return ProbeResult(LOADING, "model listing answered 503")
        return ProbeResult(DOWN, f"model listing answered HTTP {status}")

    def apply(self, inst: InstanceState, result: ProbeResult) -> None:
        """Apply a probe's result through the registry: state, fingerprint, warnings,
        circuit."""
        state, reason = result.state, result.reason
        served = result.served
        warnings: tuple[str, ...] = inst.warnings
        if state == READY and served is not None and served.models:
            state, reason = self._check_fingerprint(inst, served)
            cfg = inst.config
            # llama.cpp ignores a request's `model`; every other server looks it up.
            warning = label_warning(cfg.model, served, cfg.server != "llamacpp")
            warnings = () if warning is None else (warning,)
        self.registry.probed(inst, state, reason, result.latency_ms, warnings)

    def _check_fingerprint(self, inst: InstanceState, served: Served) -> tuple[str, str]:
        """(state, reason) for a server that answered its probe with what it serves; a
        first good probe (`auto`) pins what it serves, a listing that changed around the
        pinned model is taken in."""
        if inst.config.fingerprint is None:
            return READY, "healthy (fingerprint off)"
        pin = inst.pin
        if pin is None:  # `auto`: learn at the first good probe, then pin
            self.registry.learn_fingerprint(inst, learn(served, inst.config.model))
            return READY, "healthy (fingerprint pinned)"
        kept, mismatch = judge(pin, served)
        if mismatch is not None:
            return MISMATCH, mismatch
        if kept is not pin:  # the same server; its listing changed around the pinned model
            self.registry.learn_fingerprint(inst, kept)
        return READY, "healthy"

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
