"""Shared fixtures: simulators on real ports and the proxy in front of them.

In-process tests run the proxy app and the simulators in the test's event loop, on real
sockets; tests/e2e starts both as subprocesses through the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import pytest
from aiohttp import web
from openai import AsyncStream
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from proxy.api.server import ProxyRunner, bound_port, start
from proxy.app import create_app
from proxy.config import DEFAULT_STORE_URL, Config, parse_config
from proxy.sim.simulator import Simulator
from tests.cluster import Cluster
from tests.pg import PostgresServer
from tests.redis_server import RedisServer

MakeSim = Callable[..., Awaitable[Simulator]]


class _Startable(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


S = TypeVar("S", bound=_Startable)


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[int]:
    """`app` served on 127.0.0.1 (aiohttp's own runner), on a port of the kernel's
    choosing, which it yields; cleaned up on the way out."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def started(factory: Callable[..., S]) -> AsyncIterator[Callable[..., Awaitable[S]]]:
    """`make(*args, **kw)` builds a simulator with `factory` and starts it on a free port;
    every one made is stopped on exit."""
    sims: list[S] = []

    async def make(*args: Any, **kw: Any) -> S:
        sim = factory(*args, **kw)
        await sim.start()
        sims.append(sim)
        return sim

    try:
        yield make
    finally:
        for sim in sims:
            await sim.stop()


@pytest.fixture
async def make_sim() -> AsyncIterator[MakeSim]:
    """Start simulators on free ports; all are stopped at the end of the test."""
    def simulator(model: str = "sim-model", faults: Sequence[str] = (), **kw: Any) -> Simulator:
        return Simulator(model, faults=faults, **kw)

    async with started(simulator) as make:
        yield make


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the whole session (tests keep apart by key prefix)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Real processes (proxy, simulators) for end-to-end tests; all stopped at the end."""
    c = Cluster(tmp_path)
    yield c
    c.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the test session (tests/pg.py); each test that uses
    it gets a database of its own (`store_url`)."""
    server = PostgresServer()
    server.start()
    yield server
    server.destroy()


_databases = iter(range(1, 1_000_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty audit store of each backend: a SQLite file in the test's directory, and a
    new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/audit.db"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database(f"audit{next(_databases)}")


def proxy_config(sims: Sequence[Simulator | tuple[str, str]], *, models: dict[str, Any] | None = None,
                 local: Sequence[bool] | None = None, **sections: Any) -> Config:
    """A config with one provider per simulator: ids `p0:s0`, `p1:s1`, ... in order.

    An entry may also be `(id_suffix, base_url)` for an address where nothing listens.
    """
    providers = []
    for n, sim in enumerate(sims):
        if isinstance(sim, Simulator):
            url, model = sim.base_url, sim.model
        else:
            url, model = sim[1], "sim-model"
        entry: dict[str, Any] = {"provider_id": f"p{n}", "instances": [
            {"id": f"s{n}", "base_url": url, "metadata": {"model": model}}]}
        if local is not None:
            entry["local"] = local[n]
        providers.append(entry)
    doc: dict[str, Any] = {
        # Wall-clock budgets a loaded machine does not outlast: a healthy simulator's first
        # byte or next chunk gets 5 s, a probe of it 5 s (a start-up probe timed out would
        # mark it DOWN), and an open circuit stays open for 60 s (a cooldown run out
        # mid-test adds a half-open trial attempt). A test about any of these sets its own.
        "timeouts": {"connect_s": 1, "first_byte_s": 5, "idle_s": 5, "total_s": 30},
        "health": {"interval_s": 0.5, "timeout_s": 5, "cooldown_s": 60, "max_cooldown_s": 120},
        "retry": {"max_retry_after_s": 3},
        "providers": providers,
    }
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value}
    if models:
        doc["models"] = models
    return parse_config(doc, "<test>")


class RunningProxy:
    """The proxy app served on a real port, the way `failover-proxy serve` serves it."""

    def __init__(self, runner: ProxyRunner, port: int, app: web.Application) -> None:
        self.runner = runner
        self.port = port
        self.app = app
        self.stopped = False

    async def stop(self) -> None:
        """Shut down as on SIGTERM (which flushes the audit queue); idempotent."""
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


MakeProxy = Callable[[Config], Awaitable[RunningProxy]]


@pytest.fixture
async def make_proxy(tmp_path: Path) -> AsyncIterator[MakeProxy]:
    """Serve a config on a free port; its audit store goes to the test's temp dir unless
    the config names one."""
    running: list[RunningProxy] = []

    async def make(config: Config) -> RunningProxy:
        if config.store.url == DEFAULT_STORE_URL:
            config = dataclasses.replace(config, store=config.store.model_copy(
                update={"url": f"sqlite:///{tmp_path}/audit.db"}))
        app = create_app(config)
        runner = await start(app, "127.0.0.1", 0, shutdown_timeout=1.0)
        proxy = RunningProxy(runner, bound_port(runner), app)
        running.append(proxy)
        return proxy

    yield make
    for proxy in running:
        await proxy.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0,
                   what: str = "condition") -> float:
    """Poll until `predicate()` is true; returns the seconds it took. Fails after `timeout`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not predicate():
        if loop.time() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)
    return loop.time() - started


def chat_body(prompt: str = "hello", *, model: str = "auto", stream: bool = False,
              **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}],
            "stream": stream, **extra}


async def sdk_text(parsed: ChatCompletion | AsyncStream[ChatCompletionChunk]) -> str:
    """The answer text of what the openai SDK returned, streamed or not."""
    if isinstance(parsed, AsyncStream):
        return "".join([c.choices[0].delta.content or "" async for c in parsed if c.choices])
    return parsed.choices[0].message.content or ""
