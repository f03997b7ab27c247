"""Client-facing attacks on a proxy *process* (`python -m proxy serve`, via
tests/cluster.py), each the way a hostile client would try it: pipelining without reading
the answers, a long pipelined burst, requests with no Host or two, credentials that are
not UTF-8, endless request and header lines.

During each attack `GET /healthz` must answer within a second (a liveness check, probed
every 0.1 s), the proxy process's RSS must stay within RSS_GROWTH_MB of where it started,
and a normal request made in the middle of it must be served. The raw HTTP helpers
(tests/rawhttp.py) guard every read with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.sim.text import answer_text
from tests.cluster import Cluster
from tests.rawhttp import Reply, assert_closed, build, chat, post_chat, read_reply

pytestmark = pytest.mark.e2e

MODEL = "attack-model"
WORDS = 8
#: The proxy process (see Target) has client keys, so unauthenticated requests get 401.
KEY = "attack-client-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: How much the proxy process's RSS may grow during one attack.
RSS_GROWTH_MB = 25.0
#: The liveness bound: /healthz must answer within this during an attack.
LIVENESS_S = 1.0


class Target(Cluster):
    """The proxy process in front of one simulator process, shared by the module's
    tests; each attack measures from its own baseline."""

    def start(self) -> None:
        self.start_sim("s0", MODEL, options=("--words", str(WORDS)))
        self.start_proxy([("s0", MODEL)],
                         server={"host": "127.0.0.1", "port": self.proxy_port,
                                 "api_keys": [KEY], "max_body_bytes": 64 * 1024},
                         health={"interval_s": 5, "timeout_s": 1},
                         logging={"format": "json", "level": "warning"})

    def rss_mb(self) -> float:
        """Resident memory of the proxy process (Linux /proc)."""
        for line in Path(f"/proc/{self.proxy.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    if not Path("/proc/self/status").exists():
        pytest.fail("the attack tests read the proxy's RSS from /proc (Linux)")
    t = Target(tmp_path_factory.mktemp("attacks"))
    try:
        t.start()
        yield t
    finally:
        t.close()


async def healthz_within(port: int, bound_s: float = LIVENESS_S) -> None:
    """GET /healthz on a new connection answers 200 within `bound_s` (liveness)."""
    try:
        async with asyncio.timeout(bound_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(build("GET", "/healthz", headers={"Connection": "close"}))
                reply = await read_reply(reader)
            finally:
                writer.close()
    except TimeoutError:
        raise AssertionError(f"/healthz did not answer within {bound_s:g}s") from None
    assert reply.status == 200


async def victim(port: int, prompt: str = "victim") -> Reply:
    """A normal, authenticated chat request on its own connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(post_chat(prompt, headers=AUTH))
        return await read_reply(reader)
    finally:
        writer.close()


@dataclass
class Watch:
    """What was seen while an attack ran."""

    baseline_mb: float
    peak_mb: float = 0.0
    probes: int = 0
    victim: Reply | None = None

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.baseline_mb

    def check(self) -> None:
        """/healthz answered in time all along (checked as it ran), a normal request made
        during the attack was served, and memory stayed bounded."""
        assert self.probes >= 1
        assert self.victim is not None and self.victim.status == 200, self.victim
        assert self.victim.json()["choices"][0]["message"]["content"] == answer_text(
            MODEL, "victim", WORDS)
        assert self.growth_mb < RSS_GROWTH_MB, (
            f"RSS grew by {self.growth_mb:.0f} MB ({self.baseline_mb:.0f} -> "
            f"{self.peak_mb:.0f} MB)")


async def under_attack(t: Target, attack: Any, seconds: float) -> Watch:
    """Run `attack()` for up to `seconds` (less when it ends by itself) while probing
    /healthz every 0.1 s and sampling the proxy's RSS, and send one normal request in
    the middle of it; the attack is cancelled at the end (a flood never ends by itself,
    and its writers may be blocked on a full socket)."""
    await healthz_within(t.proxy_port)
    watch = Watch(baseline_mb=t.rss_mb())
    watch.peak_mb = watch.baseline_mb
    task = asyncio.create_task(attack())
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    try:
        while loop.time() < end and not task.done():
            await asyncio.sleep(0.1)
            await healthz_within(t.proxy_port)
            watch.probes += 1
            watch.peak_mb = max(watch.peak_mb, t.rss_mb())
            if watch.victim is None:
                watch.victim = await victim(t.proxy_port)
        if task.done():
            task.result()  # an attacker that failed fails the test
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await task
    assert t.proxy.poll() is None, "the proxy died:\n" + t.log()[-3000:]
    return watch


async def test_attack_pipelining_without_reading_the_answers_keeps_memory_bounded(
        target: Target) -> None:
    """20 connections pipeline requests (unauthenticated ones get 401, others are health
    checks) as fast as the proxy takes them, and never read an answer."""
    one_round = (b"".join(post_chat(f"no key {n}") for n in range(50))
                 + build("GET", "/healthz") * 50 + build("GET", "/v1/models") * 50)
    opened: list[asyncio.StreamWriter] = []

    async def flood() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", target.proxy_port)
        opened.append(writer)
        while True:
            writer.write(one_round)
            await writer.drain()  # blocks for good once the proxy stops reading

    async def attack() -> None:
        await asyncio.gather(*(flood() for _ in range(20)))

    try:
        watch = await under_attack(target, attack, seconds=4.0)
    finally:
        for writer in opened:
            writer.close()
    watch.check()
    assert watch.probes >= 10


async def test_attack_a_long_pipelined_burst_is_answered_whole_and_in_order(
        target: Target) -> None:
    """One connection sends 600 requests in one burst, each with a 6 KB header (many
    requests' worth of head bytes in every read, and heads that straddle reads); every
    one is answered, in order, and none is refused as too large."""
    count = 600
    pad = "p" * 6000
    burst = b"".join(post_chat(f"burst {n}", headers={**AUTH, "x-request-id": f"burst-{n}",
                                                     "X-Pad": pad}) for n in range(count))
    answers: list[Reply] = []

    async def attack() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", target.proxy_port)
        try:
            writer.write(burst)
            # write and read at once, as a pipelining client does
            drained = asyncio.create_task(writer.drain())
            for _ in range(count):
                answers.append(await read_reply(reader))
            await drained
        finally:
            writer.close()

    watch = await under_attack(target, attack, seconds=120.0)
    watch.check()
    assert len(answers) == count, f"only {len(answers)} of {count} answered"
    for n, reply in enumerate(answers):
        assert reply.status == 200, (n, reply.status, reply.body[:300])
        assert reply.headers["x-request-id"] == f"burst-{n}"
        assert reply.json()["choices"][0]["message"]["content"] == answer_text(
            MODEL, f"burst {n}", WORDS)


async def test_attack_requests_without_host_or_with_two_get_400_and_the_proxy_stays_up(
        target: Target) -> None:
    """20 clients send, over and over, HTTP/1.1 requests with no Host or with two (the
    ambiguity request smuggling through a front proxy relies on); each gets a 400 in
    OpenAI's shape, on a connection that is closed after it."""
    heads = [b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
             b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
             b"GET /v1/models HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer " + KEY.encode()
             + b"\r\nhost: b\r\n\r\n"]
    answered: list[int] = []

    async def client(n: int) -> None:
        while True:
            reader, writer = await asyncio.open_connection("127.0.0.1", target.proxy_port)
            try:
                writer.write(heads[n % len(heads)])
                reply = await read_reply(reader)
                assert reply.status == 400 and "Host" in reply.error()["message"], reply
                await assert_closed(reader)
                answered.append(reply.status)
            finally:
                writer.close()

    async def attack() -> None:
        await asyncio.gather(*(client(n) for n in range(20)))

    watch = await under_attack(target, attack, seconds=3.0)
    watch.check()
    assert len(answered) >= 20


@pytest.mark.parametrize("header", ["Authorization", "x-api-key"])
@pytest.mark.parametrize("value", [b"Bearer \xff\xfe\xfd", b"Bearer " + KEY.encode() + b"\xc3(",
                                   b"\xed\xa0\x80", b"Bearer \x80" * 40])
async def test_attack_non_utf8_credentials_get_401_never_500(target: Target, header: str,
                                                             value: bytes) -> None:
    if header == "x-api-key":
        value = value.removeprefix(b"Bearer ")
    for path, method in (("/v1/chat/completions", "POST"), ("/v1/models", "GET"),
                         ("/admin/instances", "GET")):
        body = chat("who am I") if method == "POST" else b""
        head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n").encode() + header.encode() + b": " + value
        reader, writer = await asyncio.open_connection("127.0.0.1", target.proxy_port)
        try:
            writer.write(head + b"\r\n\r\n" + body)
            reply = await read_reply(reader)
        finally:
            writer.close()
        assert reply.status in (400, 401, 403), (path, reply.status, reply.body[:300])
        reply.error()
    await healthz_within(target.proxy_port)
    assert '"unhandled_error"' not in target.log()


@pytest.mark.parametrize("where", ["header line", "request line"])
async def test_attack_an_endless_line_is_refused_and_the_proxy_stays_up(
        target: Target, where: str) -> None:
    """10 connections each send a line that never ends, as fast as the proxy reads."""
    opening = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: " if where == "header line"
               else b"GET /healthz?q=")
    statuses: list[int] = []
    piece = b"a" * 65536

    async def endless() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", target.proxy_port)
        try:
            writer.write(opening)
            answer = asyncio.create_task(read_reply(reader))
            # Until the answer comes; the proxy may stop reading first (a full socket) or
            # close while bytes are still on their way (a reset): both are fine.
            with contextlib.suppress(ConnectionError, TimeoutError):
                while not answer.done():
                    writer.write(piece)
                    await asyncio.wait_for(writer.drain(), 0.5)
            reply = await answer
            reply.error()
            statuses.append(reply.status)
        finally:
            writer.close()

    async def attack() -> None:
        await asyncio.gather(*(endless() for _ in range(10)))
        await asyncio.sleep(1.0)  # keep the watch on a little after the refusals

    watch = await under_attack(target, attack, seconds=30.0)
    watch.check()
    assert statuses == [431 if where == "header line" else 414] * 10
