"""Replicas sharing what they learn through Redis (`state: {url: redis://...}`).

`SharedState` is the registry's `ChangeSink` and the applier of other replicas' news:

- A change the registry makes (proxy.health.changes) becomes a message (proxy.state.merge)
  put on a bounded queue, without waiting; one task writes the queue to Redis in
  pipelines. The request path never waits on Redis: plans read only local state.
- Per instance, Redis keeps a hash `PREFIX i:ID` (field -> newest message) written by a
  compare-and-set script that publishes on `PREFIX events` only what is newer. Keyed
  maps with a TTL (session stickiness; later prefix affinity) are published alone, the
  entries of a writer's batch in one message, each with its expiry: a session costs the
  request path one queue put and Redis a share of one PUBLISH.
- One task listens on the channel and applies what other replicas send through the
  registry (`Ledger.remote`), and every `resync_s` offers Redis what this replica holds
  and reads back every instance's hash: anything missed (a message lost while Redis was
  away, a replica started later) is repaired both ways.
- Redis down or slow (each call bounded by `timeout_s`): the replica keeps serving from
  its local state, says so in /readyz and `failover_proxy_shared_state_up`, logs one
  line when it goes down and one when it is back, and reconnects with back-off. A change
  made while Redis was away (a drain) is in the ledger and offered at the resync that
  follows the reconnect: the latest evidence wins there as anywhere. Map entries and
  figures made while it was away are not replayed, nor known to a replica started later
  (a session re-sticks at its next turn).

Redis: the `redis` package's asyncio client (redis-py, https://redis.readthedocs.io),
against Redis 7 (Debian 12's redis-server 7.0): EVALSHA with a Lua script, PUBLISH,
SUBSCRIBE, HGETALL, SET PX.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.config import StateConfig
from proxy.health.instance import InstanceState
from proxy.health.registry import Registry
from proxy.state.merge import Ledger, Message, number, to_mono

log = structlog.get_logger("proxy.state")

#: Instance hashes live this long after the last write or resync (seconds).
KEY_TTL_S = 86400
#: How often each replica publishes its latency figures (seconds).
FIGURES_S = 1.0
#: Back-off between reconnect attempts (seconds): doubles from the first to the last.
BACKOFF_S = (0.1, 2.0)
_BATCH = 512
#: The largest message taken in (bytes): a batch of `_BATCH` affinity chains of
#: MAX_PARTS keys is about 2.3 MB. A larger one is garbage, and parsing and applying it
#: would hold the event loop.
MAX_MESSAGE_BYTES = 4 << 20

#: HSET the field only when its message is newer than the stored one (by `t`), then
#: PUBLISH it; refresh the key's expiry either way. KEYS: hash, channel. ARGV: field,
#: message, its t, TTL in ms. Returns 1 when written.
_PUT_NEWER = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and tonumber(cjson.decode(cur)['t']) >= tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""

#: A map's applier: (key, value, expiry on the monotonic clock).
MapApply = Callable[[str, str, float], None]
#: A map's writer: (key, value, TTL in seconds).
MapWrite = Callable[[str, str, float], None]
#: ("i", instance id, field, message, 0.0) or ("m", map name, key, value, expiry wall-clock)
_Item = tuple[str, str, str, bytes | str, float]


class SharedState:
    """The link of one replica to the others; `attach` it to the registry, `start` it in
    the app's start-up and `stop` it at shutdown."""

    def __init__(self, config: StateConfig, registry: Registry,
                 metrics: CollectorRegistry) -> None:
        assert config.url is not None
        self.config = config
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.ledger = Ledger(self.replica, registry)
        self.channel = config.prefix + "events"
        self.maps: dict[str, MapApply] = {}
        self.up = False
        self.error: str | None = "not connected yet"
        self.since = time.time()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(config.queue_size)
        self._client: Redis = Redis.from_url(
            config.url, socket_timeout=config.timeout_s,
            socket_connect_timeout=config.timeout_s, retry=Retry(NoBackoff(), 0))
        self._put_newer = self._client.register_script(_PUT_NEWER)
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._announced = False  # the first verdict is logged whichever it is
        self._published: dict[str, float | None] = {}
        self._up_gauge = Gauge("failover_proxy_shared_state_up", "1 while the shared state "
                               "(Redis) is reachable, 0 while this replica serves from its "
                               "local state alone", registry=metrics)
        self._dropped = Counter("failover_proxy_shared_state_dropped", "Changes not sent to "
                                "the other replicas (queue full, or Redis down)",
                                registry=metrics)
        self.attach(registry)

    def attach(self, registry: Registry) -> None:
        """Listen to `registry` (again after a config reload) and apply to it."""
        registry.changes = self
        self.ledger.registry = registry

    def share_map(self, name: str, apply: MapApply) -> MapWrite:
        """Share a keyed map with a TTL (sessions; prefix affinity): `apply` takes in
        another replica's entries; the writer returned sends this replica's."""
        self.maps[name] = apply

        def write(key: str, value: str, ttl_s: float) -> None:
            self._put(("m", name, key, value, time.time() + ttl_s))

        return write

    def status(self) -> dict[str, object]:
        """For /readyz: whether the shared state is reachable, and since when."""
        return {"up": self.up, "since": round(self.since, 3),
                **({} if self.up else {"error": self.error,
                                      "detail": "serving from this replica's local state"})}

    # ------------------------------------------------------------------ ChangeSink

    def changed(self, inst: InstanceState, what: str, how: str = "",
                at: float | None = None) -> None:
        """The registry changed `inst` (see ChangeSink): queue the news, never wait."""
        raw = self.ledger.local(inst, what, how, at)
        if raw is not None:
            self._put(("i", inst.id, what, raw, 0.0))

    def _put(self, item: _Item) -> None:
        if not self.up:
            # Kept fields are in the ledger and offered at the next resync.
            if item[0] != "i":
                self._dropped.inc()
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._dropped.inc()

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        """Start the tasks; waits (a little) for a first connection and resync, so the
        first plans know what the others know. Redis away: starts anyway, down."""
        self._tasks = [asyncio.create_task(self._run(), name="shared-state"),
                       asyncio.create_task(self._write(), name="shared-state-writer")]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), max(1.0, 8 * self.config.timeout_s))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._client.aclose()

    def _set_up(self, up: bool, error: BaseException | None = None) -> None:
        if up == self.up and self._announced:
            return
        self._announced = True
        self.up = up
        self.since = time.time()
        self._up_gauge.set(1.0 if up else 0.0)
        if up:
            self.error = None
            log.warning("shared_state_up", replica=self.replica)
        else:
            self.error = f"{type(error).__name__}: {error}" if error else "down"
            log.warning("shared_state_down", replica=self.replica, error=self.error,
                        detail="serving from local state; reconnecting")

    async def _run(self) -> None:
        """Subscribe, resync, then apply messages as they come, with a resync every
        `resync_s`; on any Redis error, mark down and start again after a back-off."""
        delay = BACKOFF_S[0]
        while True:
            try:
                async with self._client.pubsub() as pubsub:
                    await asyncio.wait_for(pubsub.subscribe(self.channel),
                                           self.config.timeout_s)
                    await self._resync()
                    self._set_up(True)
                    self._ready.set()
                    delay = BACKOFF_S[0]
                    await self._listen(pubsub)
            except (RedisError, OSError, TimeoutError) as exc:
                self._set_up(False, exc)
            except Exception as exc:  # a bug must not end sharing for the process's life
                log.exception("shared_state_failed")
                self._set_up(False, exc)
            self._ready.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    async def _listen(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        next_figures = loop.time()
        next_resync = next_figures + self.config.resync_s
        while self.up:  # the writer may find Redis gone first
            now = loop.time()
            if now >= next_figures:
                self._figures()
                next_figures = now + FIGURES_S
            if now >= next_resync:
                await self._resync()
                next_resync = now + self.config.resync_s
            wait = max(0.0, min(next_resync, next_figures) - loop.time())
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            if message is not None and message.get("type") == "message":
                self._on_message(message["data"])
        raise ConnectionError(self.error or "down")

    def _on_message(self, raw: bytes) -> None:
        try:
            if len(raw) > MAX_MESSAGE_BYTES:
                raise ValueError(f"{len(raw)} bytes, more than {MAX_MESSAGE_BYTES}")
            msg: Message = orjson.loads(raw)
            if "m" in msg:
                if msg["r"] != self.replica and (apply := self.maps.get(msg["m"])):
                    entries = msg["e"]
                    if not isinstance(entries, list) or len(entries) > _BATCH:
                        raise ValueError(f"'e' is not a list of at most {_BATCH} entries")
                    for key, value, expires in entries:
                        apply(str(key), str(value), to_mono(number(expires, "expires")))
            else:
                self.ledger.remote(msg, raw)
        except (KeyError, TypeError, ValueError, AttributeError, orjson.JSONDecodeError) as exc:
            log.warning("shared_state_message_ignored", error=f"{type(exc).__name__}: {exc}")

    def _figures(self) -> None:
        """Publish this replica's latency figures that changed since the last time."""
        for inst in self.ledger.registry.states:
            ms = inst.ttfb_ewma_ms
            if ms is not None and self._published.get(inst.id) != ms:
                self._published[inst.id] = ms
                raw = self.ledger.latency(inst)
                self._put(("i", inst.id, "lat:" + self.replica, raw, 0.0))

    def _key(self, instance_id: str) -> str:
        return f"{self.config.prefix}i:{instance_id}"

    async def _stage(self, pipe: Pipeline, items: list[_Item]) -> None:
        """Add the items' commands to `pipe` (nothing is sent before `execute`): a
        compare-and-set per instance field, and one message per map for all its entries
        (map entries travel by pub/sub alone: nothing reads them back from Redis)."""
        entries: dict[str, list[tuple[str, bytes | str, float]]] = {}
        for kind, name, key, payload, extra in items:
            if kind == "i":
                assert isinstance(payload, bytes)
                t = orjson.loads(payload)["t"]
                await self._put_newer(keys=[self._key(name), self.channel],
                                      args=[key, payload, repr(t), KEY_TTL_S * 1000],
                                      client=pipe)
            else:
                entries.setdefault(name, []).append((key, payload, extra))
        for name, batch in entries.items():
            pipe.publish(self.channel, orjson.dumps(
                {"r": self.replica, "t": time.time(), "m": name, "e": batch}))

    async def _write(self) -> None:
        """Drain the queue into Redis, a pipeline per batch."""
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < _BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            if not self.up:  # kept fields go at the resync after the reconnect
                self._dropped.inc(sum(item[0] != "i" for item in batch))
                continue
            pipe = self._client.pipeline(transaction=False)
            await self._stage(pipe, batch)
            try:
                await asyncio.wait_for(pipe.execute(), self.config.timeout_s)
            except (RedisError, OSError, TimeoutError) as exc:
                self._set_up(False, exc)
            except Exception as exc:  # a bug must not end the writer
                log.exception("shared_state_failed")
                self._set_up(False, exc)

    async def _resync(self) -> None:
        """Offer Redis every kept field this replica holds (written where newer), then
        read every instance's hash back and take in what is newer here."""
        ledger = self.ledger
        pipe = self._client.pipeline(transaction=False)
        await self._stage(pipe, [("i", instance_id, field, raw, 0.0)
                                 for (instance_id, field), raw in list(ledger.latest.items())])
        ids = [inst.id for inst in ledger.registry.states]
        for instance_id in ids:
            pipe.hgetall(self._key(instance_id))
        results = await asyncio.wait_for(pipe.execute(), 4 * self.config.timeout_s)
        for fields in results[len(results) - len(ids):]:
            for raw in fields.values():
                self._on_message(raw)
