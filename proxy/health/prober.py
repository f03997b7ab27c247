"""Background health probes: what each instance is, and whether it is up, off the request path.

One task per instance asks the server, the way its provider asks (llama.cpp's `/health`
and `/props`, Ollama's `/api/tags`, otherwise `/v1/models`: proxy/providers/), every
`health.interval_s` with jitter. Each probe updates the instance's state (READY, LOADING,
DOWN, MISMATCH), learns or checks its fingerprint (proxy/health/fingerprints.py), notes a label
the server does not list as a warning, and may close a circuit that connection failures
opened. Requests never wait for a probe.
"""

from __future__ import annotations

import asyncio
import random
import time

import structlog

from proxy.config import HealthConfig
from proxy.failures import UpstreamFailure
from proxy.health.fingerprints import Served, judge, label_warning, learn
from proxy.health.instance import InstanceState
from proxy.health.registry import Registry
from proxy.health.states import DOWN, MISMATCH, READY
from proxy.providers.base import ProbeResult
from proxy.providers.transport import Upstream

log = structlog.get_logger("proxy.health.prober")


class Prober:
    """Probes every instance in the background and applies what it sees to the registry."""

    def __init__(self, registry: Registry, upstream: Upstream, health: HealthConfig) -> None:
        self.registry = registry
        self.upstream = upstream
        self.health = health
        self._tasks: list[asyncio.Task[None]] = []

    async def probe(self, inst: InstanceState) -> ProbeResult:
        """Ask the server once, the way its provider does; never raises."""
        started = time.perf_counter()
        try:
            result = await inst.provider.probe(self.upstream, inst.config, self.health.timeout_s)
        except UpstreamFailure as failure:
            result = ProbeResult(DOWN, f"{failure.code}: {failure.detail}")
        result.latency_ms = round((time.perf_counter() - started) * 1000.0, 2)
        return self._scrubbed(result)

    def _scrubbed(self, result: ProbeResult) -> ProbeResult:
        """`result` with every configured secret masked in what the server said (its
        errors, the names it serves): a server may quote the key it was sent, and these
        become state reasons, warnings and the fingerprint, in events and admin output."""
        redactor = self.upstream.redactor
        if not redactor:
            return result
        text = redactor.text
        result.reason = text(result.reason)
        served = result.served
        if served is not None:
            result.served = Served(tuple(map(text, served.models)),
                                   None if served.identity is None else text(served.identity),
                                   None if served.detail is None else text(served.detail))
        return result

    def apply(self, inst: InstanceState, result: ProbeResult) -> None:
        """Apply a probe's result through the registry: state, fingerprint, warnings,
        circuit."""
        state, reason = result.state, result.reason
        served = result.served
        warnings: tuple[str, ...] = inst.warnings
        if state == READY and served is not None and served.models:
            state, reason = self._check_fingerprint(inst, served)
            warning = label_warning(inst.config.model, served, inst.provider.checks_names)
            warnings = () if warning is None else (warning,)
        self.registry.probed(inst, state, reason, result.latency_ms, warnings, result.load)
        if inst.provider.sized_pool:
            self.upstream.pools.resize(inst.id, inst.capacity)

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
        results = await asyncio.gather(*(self.probe(s) for s in states),
                                       return_exceptions=True)
        for inst, result in zip(states, results, strict=True):
            try:  # a probe bug (a server's answer nobody foresaw) must not stop start-up
                if isinstance(result, BaseException):
                    raise result
                self.apply(inst, result)
            except Exception:
                log.exception("probe_failed", instance=inst.id)

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

    def probe_soon(self, inst: InstanceState) -> None:
        """Probe `inst` once now, in the background (another replica enabled it: its
        state is UNKNOWN here until a probe says more)."""
        if self.health.enabled:
            task = asyncio.create_task(self._once(inst), name=f"probe-now:{inst.id}")
            self._tasks.append(task)
            task.add_done_callback(self._forget)

    async def _once(self, inst: InstanceState) -> None:
        try:
            self.apply(inst, await self.probe(inst))
        except Exception:  # a probe bug must not go unsaid
            log.exception("probe_failed", instance=inst.id)

    def _forget(self, task: asyncio.Task[None]) -> None:
        if task in self._tasks:
            self._tasks.remove(task)

    def start(self) -> None:
        """Start one background task per instance."""
        self._tasks += [asyncio.create_task(self._loop(s), name=f"probe:{s.id}")
                        for s in self.registry.states]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
