"""Found by attacking the parts of issues 18-20 as an adversary would: a server's load
figures, another replica's messages on Redis. Each test is the smallest reproduction of one
defect, on real sockets (a raw asyncio server pretending to be llama-server; a real
redis-server from tests/redis_server.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from redis.asyncio import Redis

from proxy.api.inbound import CHAT, ClientRequest, parse_request
from proxy.api.state import STATE
from proxy.config import parse_config
from proxy.health.changes import STATE as STATE_F
from proxy.health.registry import MAX_RATE_LIMIT_COOLDOWN_S
from proxy.health.states import DRAINED
from proxy.routing.affinity import prefix_of
from tests import test_upstream_edges
from tests.cluster import free_port
from tests.conftest import MakeProxy, MakeSim, RunningProxy, proxy_config, started, wait_for
from tests.rawhttp import RawServer
from tests.redis_server import RedisServer
from tests.test_upstream_edges import SSE_HEAD, Hostile, MakeHostile, chunk_event, post_chat

make_hostile = test_upstream_edges.make_hostile  # the raw-socket upstream fixture

#: Bodies a hostile `llama-server` may answer `/metrics` with, each with the busy and
#: queued figures that are sane to take from it (None: the body says nothing usable).
HOSTILE_METRICS: dict[str, tuple[bytes, tuple[int, int] | None]] = {
    "nan": (b"llamacpp:requests_processing NaN\nllamacpp:requests_deferred NaN\n", None),
    "infinite": (b"llamacpp:requests_processing +Inf\nllamacpp:requests_deferred 1\n",
                 None),
    "negative": (b"llamacpp:requests_processing -5\nllamacpp:requests_deferred -100\n",
                 (0, 0)),
    "absurd": (b"llamacpp:requests_processing 1e300\nllamacpp:requests_deferred 3\n",
               None),
    "a_million_series": (b"".join(b'llamacpp:requests_deferred{i="%d"} 1\n' % i
                                  for i in range(40_000)), None),
}


class FakeLlamaServer(RawServer):
    """A raw-socket server answering as llama-server does for its probes (`/health`,
    `/props` with metrics on), with `metrics` as its `/metrics` body."""

    def __init__(self, metrics: bytes, slots: object = 4) -> None:
        super().__init__()
        self.metrics = metrics
        self.slots = slots
        self.served: dict[str, int] = {}

    def _body(self, path: str) -> bytes:
        if path == "/props":
            return orjson.dumps({"model_alias": "twin", "total_slots": self.slots,
                                 "endpoint_metrics": True, "endpoint_slots": False})
        if path == "/metrics":
            return self.metrics
        return b'{"status": "ok"}'

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = re.match(rb"[A-Z]+ (\S+)", head)
                name = path.group(1).decode() if path else "?"
                self.served[name] = self.served.get(name, 0) + 1
                body = self._body(name)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()


MakeLlama = Callable[..., Awaitable[FakeLlamaServer]]


@pytest.fixture
async def make_llama() -> AsyncIterator[MakeLlama]:
    async with started(FakeLlamaServer) as make:
        yield make


def llama_config(server: FakeLlamaServer) -> object:
    return parse_config({
        "health": {"interval_s": 0.2, "timeout_s": 5},
        "providers": [{"provider_id": "llamacpp", "instances": [
            {"id": "s0", "base_url": f"http://127.0.0.1:{server.port}",
             "metadata": {"model": "twin"}}]}],
    }, "<test>")


@pytest.mark.parametrize("attack", list(HOSTILE_METRICS))
async def test_hostile_llama_metrics_neither_stop_the_proxy_nor_skew_its_load(
        attack: str, make_llama: MakeLlama, make_proxy: MakeProxy) -> None:
    """NaN, infinite, negative or absurd figures, or a flood of series, in `/metrics`:
    the proxy starts, its probes keep the instance READY, and the load it takes is
    never negative nor beyond what any server could serve."""
    body, sane = HOSTILE_METRICS[attack]
    server = await make_llama(body)
    proxy = await make_proxy(llama_config(server))  # type: ignore[arg-type]
    inst = proxy.app[STATE].registry.by_id["llamacpp:s0"]
    await wait_for(lambda: server.served.get("/metrics", 0) >= 3, 20,
                   "three probes of /metrics")
    assert inst.state == "READY", inst.last_probe_error
    figures = (inst.server_busy, inst.server_queued)
    if sane is not None:
        assert figures == sane
    assert all(0 <= n <= 1_000_000 for n in figures), figures
    async with aiohttp.ClientSession() as http, \
            http.get(f"{proxy.url}/admin/instances") as resp:
        assert resp.status == 200


async def test_a_llama_server_claiming_a_trillion_slots_is_not_believed(
        make_llama: MakeLlama, make_proxy: MakeProxy) -> None:
    """`/props` `total_slots: 1e12` would size the connection pool and the load term to
    a server no machine runs: the figure is left out (capacity unknown), not taken."""
    server = await make_llama(b"llamacpp:requests_processing 1\n", slots=10**12)
    proxy = await make_proxy(llama_config(server))  # type: ignore[arg-type]
    inst = proxy.app[STATE].registry.by_id["llamacpp:s0"]
    await wait_for(lambda: server.served.get("/metrics", 0) >= 2, 20, "two probes")
    assert inst.state == "READY", inst.last_probe_error
    assert inst.server_slots is None and inst.capacity is None
    assert inst.server_busy == 1


# --------------------------------------------------------------------------- Redis channel


class Channel:
    """Publishes on a proxy's Redis channel as another process would; `settle` waits
    until everything published before it has been taken in (a valid drain of the
    sentinel instance, p1:s1, published last: one subscriber gets messages in order)."""

    def __init__(self, client: Redis, prefix: str, proxy: RunningProxy) -> None:
        self.client = client
        self.channel = f"{prefix}events"
        self.proxy = proxy

    async def publish(self, msg: object) -> None:
        await self.client.publish(self.channel, orjson.dumps(msg))

    async def settle(self) -> None:
        sentinel = self.proxy.app[STATE].registry.by_id["p1:s1"]
        await self.publish({"r": "another", "t": time.time(), "i": sentinel.id, "f": STATE_F,
                            "state": DRAINED, "reason": "sentinel"})
        await wait_for(lambda: sentinel.state == DRAINED, 10, "the sentinel message")


@pytest.fixture
async def channel(request: pytest.FixtureRequest, make_sim: MakeSim, make_proxy: MakeProxy,
                  redis_server: RedisServer) -> AsyncIterator[Channel]:
    prefix = f"adv{abs(hash(request.node.name)) % 10**8}:"
    proxy = await make_proxy(proxy_config([await make_sim(), await make_sim()],
                                          state={"url": redis_server.url, "prefix": prefix}))
    client = Redis.from_url(redis_server.url)
    try:
        yield Channel(client, prefix, proxy)
    finally:
        await client.aclose()


async def test_a_message_from_a_far_future_clock_is_ignored(channel: Channel) -> None:
    """A replica whose clock runs a year ahead (or a forged `t`) must not outrank every
    later word: taken in, its drain would stay for good, and every later enable here
    would be sent with a time after it."""
    inst = channel.proxy.app[STATE].registry.by_id["p0:s0"]
    await channel.publish({"r": "skewed", "t": time.time() + 365 * 86400, "i": inst.id,
                           "f": STATE_F, "state": DRAINED, "reason": "from the future"})
    await channel.settle()
    assert inst.state != DRAINED
    shared = channel.proxy.app[STATE].shared
    assert shared is not None
    assert all(t <= time.time() + 3600 for t in shared.ledger.seen.values())


async def test_another_replicas_circuit_and_cooldown_last_no_longer_than_ours_would(
        channel: Channel) -> None:
    """An open circuit or a 429 cooldown `until` a century from now (a bug, a forged
    message) is held no longer than this replica would hold its own."""
    inst = channel.proxy.app[STATE].registry.by_id["p0:s0"]
    far = time.time() + 100 * 365 * 86400
    await channel.publish({"r": "x", "t": time.time(), "i": inst.id, "f": "circuit",
                           "open": True, "until": far, "by": "http", "cool": far})
    await channel.publish({"r": "x", "t": time.time(), "i": inst.id, "f": "cooldown",
                           "until": far})
    await channel.settle()
    now = time.monotonic()
    assert inst.circuit.open_until <= now + inst.circuit.max_cooldown_s + 1
    assert inst.circuit.cooldown_s <= inst.circuit.max_cooldown_s
    assert inst.rate_limited_until <= now + MAX_RATE_LIMIT_COOLDOWN_S + 1


async def test_wrong_types_on_the_channel_neither_break_the_link_nor_poison_figures(
        channel: Channel) -> None:
    """A field that is no string, a latency that is "nan" or negative, a time that is
    "nan": each is ignored, the link stays subscribed (no reconnect), and the scorer's
    latency figure stays a real one."""
    state = channel.proxy.app[STATE]
    inst = state.registry.by_id["p0:s0"]
    shared = state.shared
    assert shared is not None
    since = shared.since
    now = time.time()
    for msg in ({"r": "x", "t": now, "i": inst.id, "f": 5},
                {"r": "x", "t": now, "i": inst.id, "f": ["state"]},
                {"r": "x", "t": now, "i": inst.id, "f": "lat:x", "ms": "nan"},
                {"r": "x", "t": now, "i": inst.id, "f": "lat:y", "ms": -1e12},
                {"r": "x", "t": "nan", "i": inst.id, "f": "lat:z", "ms": 5},
                {"r": "x", "t": now, "i": inst.id, "f": "fail", "extra": 1e300},
                {"r": "x", "t": now + 1e9, "i": inst.id, "f": "fail"},
                {"r": "x", "t": now, "m": "sessions", "e": [["s", "p0:s0", "inf"]]},
                {"r": "x", "t": now, "m": "sessions", "e": [["s2", "p0:s0", now + 1e9]]},
                {"r": "x", "t": now, "m": "sessions", "e": 5}):
        await channel.publish(msg)
    await channel.settle()
    assert shared.up and shared.since == since  # never dropped and resubscribed
    ewma = inst.ttfb_ewma_ms
    assert ewma is None or math.isfinite(ewma) and ewma >= 0, ewma
    assert inst.last_failure_mono <= time.monotonic() + 1
    sessions = state.planner.sessions
    for key in ("s", "s2"):
        entry = sessions._entries.get(key)  # noqa: SLF001 (what an expiry is held as)
        assert entry is None or entry[1] <= time.monotonic() + sessions.ttl_s + 1, entry


# --------------------------------------------------------------------------- store URL


def proxy_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                          text=True, timeout=60, check=False)


#: Passwords a user writes into a store URL without percent-encoding them: with `@` or
#: `/` the URL no longer says where the password ends.
RAW_PASSWORDS = {"at": "Se@cr3tPart", "slash": "Se/cr3tPart", "percent": "Se%cr3tPart",
                 "colon": "Se:cr3tPart", "all": "S@e/c%r:3tPart"}


@pytest.mark.parametrize("kind", list(RAW_PASSWORDS))
def test_a_store_password_with_at_slash_percent_or_colon_shows_in_no_output(
        kind: str, tmp_path: Path) -> None:
    """`check` of a config and `events --store` with such a URL fail in one line that
    shows no part of the password (nothing listens on the port: no server needed to
    leak it through a resolver's or driver's error)."""
    password = RAW_PASSWORDS[kind]
    url = f"postgresql://audit:{password}@127.0.0.1:{free_port()}/audit"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"store": {"url": url}, "providers": [
        {"provider_id": "p", "instances": [{"id": "a", "base_url": "http://127.0.0.1:9"}]}]}))
    outputs = []
    for args in (("check", "--config", str(config)), ("events", "--store", url),
                 ("events", "--store", url, "--sum")):
        out = proxy_cli(*args)
        assert out.returncode != 0, out
        assert "Traceback" not in out.stderr, out.stderr
        outputs.append(out.stdout + out.stderr)
    text = "\n".join(outputs)
    for piece in ("cr3tPart", "3tPart"):
        assert piece not in text, text


async def test_an_oversized_message_on_the_channel_is_ignored_whole(channel: Channel) -> None:
    """A map message with a hundred thousand entries (a replica sends at most one batch
    of 512), or megabytes of padding: not taken in entry by entry (the loop would be held
    for as long), the link stays up."""
    state = channel.proxy.app[STATE]
    shared = state.shared
    assert shared is not None
    since = shared.since
    now = time.time()
    await channel.publish({"r": "x", "t": now, "m": "sessions",
                           "e": [[f"k{n}", "p0:s0", now + 60] for n in range(100_000)]})
    await channel.publish({"r": "x", "t": now, "i": "p0:s0", "f": STATE_F, "state": DRAINED,
                           "reason": "padded", "pad": "x" * (8 << 20)})
    await channel.settle()
    assert len(state.planner.sessions) == 0
    assert state.registry.by_id["p0:s0"].state != DRAINED
    assert shared.up and shared.since == since


# --------------------------------------------------------------------------- affinity


def test_a_long_text_part_is_chained_whole_like_a_long_text() -> None:
    """A history sent as content parts (`[{"type": "text", "text": ...}]`) chains as a
    history of strings does: the whole text (up to chain.MAX_BYTES) stands in the keys, so
    an edit in the middle of a long part is seen, and the chain covers all of it."""
    long = "x" * 8192

    def parts(text: str) -> ClientRequest:
        return parse_request(CHAT, orjson.dumps({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": "u"}}]}]}),
            "r")

    base, middle = prefix_of(parts(long)), prefix_of(parts(long[:2000] + "y" + long[2001:]))
    same = prefix_of(parts(long))
    assert base is not None and middle is not None and same is not None
    assert base.keys == same.keys and base.keys != middle.keys
    assert base.total > len(long)


# --------------------------------------------------------------------------- usage


HOSTILE_USAGE = {
    "negative": {"prompt_tokens": -5, "completion_tokens": -7,
                 "prompt_tokens_details": {"cached_tokens": -3}},
    "absurd": {"prompt_tokens": 10**15, "completion_tokens": 2**62},
    "bools": {"prompt_tokens": True, "completion_tokens": False},
}


@pytest.mark.parametrize("attack", list(HOSTILE_USAGE))
async def test_a_stream_stating_negative_or_absurd_usage_is_recorded_as_estimated(
        attack: str, make_hostile: MakeHostile, make_proxy: MakeProxy) -> None:
    """A stream's last chunk says `usage` with negative, bool or beyond-any-model token
    counts: the client gets its answer, the request is audited, and the token figures
    (metrics, log, audit) are the proxy's estimate, never a negative or absurd count."""
    events = (chunk_event({"role": "assistant", "content": "hello there"})
              + chunk_event({}, "stop")
              + b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk",
                                        "created": 1, "model": "sim-model", "choices": [],
                                        "usage": HOSTILE_USAGE[attack]}).encode() + b"\n\n"
              + b"data: [DONE]\n\n")

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        while True:
            await h.read_request(reader)
            writer.write(SSE_HEAD + b"%x\r\n%b\r\n0\r\n\r\n" % (len(events), events))
            await writer.drain()

    hostile = await make_hostile(behave)
    proxy = await make_proxy(proxy_config([("h", hostile.base_url)], health={"enabled": False}))
    async with aiohttp.ClientSession() as http:
        status, headers, body = await post_chat(http, proxy, stream=True)
        assert status == 200 and b"hello there" in body, body
        request_id = headers["x-request-id"]
        async with http.get(f"{proxy.url}/metrics") as resp:
            metrics = await resp.text()

        async def audited() -> dict[str, object] | None:
            async with http.get(f"{proxy.url}/admin/requests/{request_id}") as resp:
                return dict(await resp.json()) if resp.status == 200 else None

        deadline = time.monotonic() + 10
        while (record := await audited()) is None:
            assert time.monotonic() < deadline, "the request was never audited"
            await asyncio.sleep(0.05)
    text = json.dumps(record)
    for field in ("prompt_tokens", "completion_tokens", "cached_tokens"):
        for value in re.findall(rf'"{field}": (-?[0-9]+)', text):
            assert 0 <= int(value) < 10**12, (field, value)
    assert '"tokens_estimated": true' in text, text
    for line in metrics.splitlines():
        if line.startswith("failover_proxy_tokens") and not line.startswith("#"):
            value = float(line.rsplit(" ", 1)[1])
            assert 0 <= value < 10**12, line
