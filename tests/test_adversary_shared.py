"""Found by attacking the parts of issues 18-20 as an adversary would: a server's load
figures, another replica's messages on Redis. Each test is the smallest reproduction of one
defect, on real sockets (a raw asyncio server pretending to be llama-server; a real
redis-server from tests/redis_server.py).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import pytest

from proxy.api.state import STATE
from proxy.config import parse_config
from tests.conftest import MakeProxy, wait_for

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


class FakeLlamaServer:
    """A raw-socket server answering as llama-server does for its probes (`/health`,
    `/props` with metrics on), with `metrics` as its `/metrics` body."""

    def __init__(self, metrics: bytes, slots: object = 4) -> None:
        self.metrics = metrics
        self.slots = slots
        self.served: dict[str, int] = {}
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

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
    started: list[FakeLlamaServer] = []

    async def make(metrics: bytes, slots: object = 4) -> FakeLlamaServer:
        server = FakeLlamaServer(metrics, slots)
        await server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


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
