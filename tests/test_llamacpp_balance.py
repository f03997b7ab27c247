"""Prefix-cache affinity and connections sized to the server, against real `llama-server`
processes (tests/test_llamacpp.py's fixtures: the cached binary, tiny GGUF models) behind
the proxy process, with the official `openai` SDK as the client.

What is asserted is what the proxy decided (x-route-instance, the dry run's reasons), what
llama.cpp says it took from its cache (`timings.cache_n`) and how many connections the
proxy holds to a server: never how long anything took.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests import test_llamacpp
from tests.cluster import wait_until
from tests.test_llamacpp import Bench, Llama

pytestmark = pytest.mark.e2e
llama = test_llamacpp.llama  # the fixture: the binary and models, or a clear failure


@pytest.fixture
def bench(llama: Llama, tmp_path: Path) -> Iterator[Bench]:
    b = Bench(llama, tmp_path)
    yield b
    b.close()


SYSTEM = "You review diffs of a proxy. "


def start_three(bench: Bench, *extra: str) -> None:
    """Three servers loading the same tiny model (4 slots each), their loads in parallel."""
    servers = [bench.server(name) for name in ("a", "b", "c")]
    for srv in servers:
        srv.start("tiny-a", "tiny", "-np", "4", "-c", "4096", *extra, wait=False)
    for srv in servers:
        srv.wait_ready()


def dry_run(bench: Bench, messages: list[dict[str, str]]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{bench.cluster.proxy_port}/admin/route",
        data=json.dumps({"model": "tiny", "messages": messages}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        plan: dict[str, Any] = json.loads(resp.read())
        return plan


def turn(client: openai.OpenAI, history: list[dict[str, str]], question: str,
         model: str = "tiny") -> tuple[str, int]:
    """Send the next turn with the whole history; (instance that answered, cache_n)."""
    history.append({"role": "user", "content": question})
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=history, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    body = raw.http_response.json()
    history.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    return str(raw.headers["x-route-instance"]), int(body["timings"]["cache_n"])


def test_three_llama_servers_each_conversation_returns_to_its_cache(bench: Bench) -> None:
    start_three(bench)
    bench.start_proxy(["a", "b", "c"], models={n: "tiny" for n in "abc"},
                      routing={"affinity": {"min_prefix_chars": 64}})
    for name in "abc":
        bench.wait_instance(name, lambda i: i["state"] == "READY" and i["capacity"] == 4,
                            "ready, its 4 slots read")
    client = bench.client()
    conversations = {name: [{"role": "system", "content": SYSTEM + name}] for name in "abc"}
    # Each conversation's first turn is placed on its own server by naming it...
    for name, history in conversations.items():
        assert turn(client, history, f"first question of {name}", f"local:{name}")[0] \
            == f"local:{name}"
    # ...then, interleaved and with `model: tiny` (any of the three), each turn goes back to
    # the server that has its history cached, though all three are idle.
    for round_no in range(2):
        for name, history in conversations.items():
            question = f"follow-up {round_no} for {name}"
            plan = dry_run(bench, [*history, {"role": "user", "content": question}])
            assert plan["selected"] == f"local:{name}", plan
            assert any(r.startswith("prefix_hit=") for r in plan["reasons"][f"local:{name}"])
            assert any(r.startswith("load=0/4") for r in plan["reasons"][f"local:{name}"])
            served, cache_n = turn(client, history, question)
            assert served == f"local:{name}"
            assert cache_n > 0, f"{name} round {round_no}: nothing came from llama.cpp's cache"


def proxy_connections(pid: int, port: int) -> int:
    """ESTABLISHED TCP connections of process `pid` to 127.0.0.1:`port` (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and inode in inodes and int(remote.split(":")[1], 16) == port:
            count += 1
    return count


def test_proxy_holds_no_more_connections_than_the_servers_slots(bench: Bench) -> None:
    """A llama-server with its default HTTP threads and 2 slots; 12 concurrent clients."""
    srv = bench.server("a")
    srv.start("tiny-slow", "tiny", "-np", "2", "-c", "2048")
    bench.start_proxy(["a"], models={"a": "tiny"})
    bench.wait_instance("a", lambda i: i["capacity"] == 2, "its 2 slots read")
    proxy_pid = bench.cluster.proxy.pid
    client = bench.client()
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(proxy_connections(proxy_pid, srv.port))
            done.wait(0.005)

    def ask(n: int) -> str:
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"question {n}"}],
            max_tokens=8, temperature=0)
        return reply.choices[0].message.content or ""

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(ask, range(12)))
    finally:
        done.set()
        watcher.join()
    assert all(answers)
    assert max(seen) >= 2, seen  # the burst did use both slots
    assert max(seen) <= 3, f"more connections than 2 slots (+1 probe): {max(seen)}"
    wait_until(lambda: proxy_connections(proxy_pid, srv.port) == 0, 20,
               "the idle connections to be closed", 0.05)
