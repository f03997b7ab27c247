"""The link to Redis (proxy/state/link.py), with proxies served in this process on the
session's real redis-server: what lands in Redis, what a replica makes of what it finds
there or hears on the channel."""

from __future__ import annotations

import asyncio
import time

import orjson
from redis.asyncio import Redis

from proxy.api.state import STATE
from proxy.health.states import DRAINED
from tests.conftest import MakeProxy, MakeSim, proxy_config, wait_for
from tests.redis_server import RedisServer


async def test_a_replica_started_after_a_drain_knows_it_before_its_first_request(
        make_sim: MakeSim, make_proxy: MakeProxy, redis_server: RedisServer) -> None:
    sim = await make_sim()
    config = proxy_config([sim], state={"url": redis_server.url, "prefix": "late:"})
    first = await make_proxy(config)
    first_state = first.app[STATE]
    first_state.registry.drain(first_state.registry.states[0])
    client = Redis.from_url(redis_server.url)
    try:
        # The drain lands in the instance's hash, namespaced by the prefix, with an expiry.
        key = "late:i:p0:s0"
        deadline = time.monotonic() + 5
        while b"state" not in (fields := await client.hgetall(key)):
            assert time.monotonic() < deadline, fields
            await asyncio.sleep(0.02)
        assert orjson.loads(fields[b"state"])["state"] == DRAINED
        assert 0 < await client.ttl(key) <= 86400
    finally:
        await client.aclose()
    second = await make_proxy(config)  # its start-up waits for the first resync
    assert second.app[STATE].registry.states[0].state == DRAINED


async def test_garbage_on_the_channel_is_ignored_and_another_replicas_word_applied(
        make_sim: MakeSim, make_proxy: MakeProxy, redis_server: RedisServer) -> None:
    sim = await make_sim()
    proxy = await make_proxy(proxy_config([sim], state={"url": redis_server.url,
                                                        "prefix": "garbage:"}))
    inst = proxy.app[STATE].registry.states[0]
    client = Redis.from_url(redis_server.url)
    try:
        for junk in (b"not json", b"[1, 2]", orjson.dumps({"r": "x"}),
                     orjson.dumps({"r": "x", "t": "soon", "i": inst.id, "f": "state"}),
                     orjson.dumps({"r": "x", "t": time.time(), "i": "p9:nobody",
                                   "f": "state", "state": DRAINED, "reason": "?"}),
                     orjson.dumps({"r": "x", "t": time.time(), "m": "sessions", "k": "s"})):
            await client.publish("garbage:events", junk)
        await client.publish("garbage:events", orjson.dumps(
            {"r": "another", "t": time.time(), "i": inst.id, "f": "state", "state": DRAINED,
             "reason": "drained by admin"}))
        await wait_for(lambda: inst.state == DRAINED, 5, "the valid message to apply")
    finally:
        await client.aclose()
    shared = proxy.app[STATE].shared
    assert shared is not None and shared.up  # nothing of that broke the link
