"""Limits, reload and graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import openai
import yaml

from proxy.api.state import STATE
from proxy.app import reload_config
from proxy.config import load_config
from proxy.sim.simulator import Simulator
from proxy.sim.text import answer_text
from tests.cluster import Cluster, wait_until
from tests.conftest import MakeProxy, MakeSim, RunningProxy, chat_body, wait_for


def write_config(path: Path, sims: list[Simulator], **extra: Any) -> Path:
    doc = {
        "timeouts": {"connect_s": 1, "first_byte_s": 5, "idle_s": 5},
        "health": {"interval_s": 30, "timeout_s": 5, "cooldown_s": 60,
                   "max_cooldown_s": 120},
        "store": {"url": f"sqlite:///{path.parent}/audit.db"},
        "providers": [{"provider_id": "p", "instances": [
            {"id": f"s{n}", "base_url": sim.base_url, "metadata": {"model": sim.model},
             **extra.pop(f"s{n}", {})} for n, sim in enumerate(sims)]}],
        **extra,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


async def served_by(proxy: RunningProxy, prompt: str = "hi") -> str:
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy.base_url}/chat/completions", json=chat_body(prompt)) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["x-route-instance"]


async def test_a_busy_instance_sends_the_overflow_elsewhere(make_sim: MakeSim,
                                                            make_proxy: MakeProxy,
                                                            tmp_path: Path) -> None:
    a = await make_sim("twin", words=30, chunk_delay=0.03)
    b = await make_sim("twin", words=30, chunk_delay=0.03)
    config = load_config(write_config(tmp_path / "c.yaml", [a, b],
                                      s0={"max_concurrency": 1},
                                      retry={"queue_wait_s": 0.05}))
    proxy = await make_proxy(config)
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)

    async def one(n: int) -> tuple[str, str]:
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": f"q{n}"}], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in raw.parse()
                        if c.choices])
        return raw.headers["x-route-instance"], text

    results = await asyncio.gather(*(one(n) for n in range(4)))
    assert [inst for inst, _ in results].count("p:s0") == 1  # never more than its cap
    assert all(text == answer_text("twin", f"q{n}", 30) for n, (_, text) in enumerate(results))


async def test_the_last_instance_takes_the_overflow_rather_than_lose_it(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    a = await make_sim("solo", words=10, chunk_delay=0.03)
    config = load_config(write_config(tmp_path / "c.yaml", [a], s0={"max_concurrency": 1},
                                      retry={"queue_wait_s": 0.05}))
    proxy = await make_proxy(config)
    async with aiohttp.ClientSession() as http:
        async def one(n: int) -> int:
            async with http.post(f"{proxy.base_url}/chat/completions",
                                 json=chat_body(f"q{n}", stream=True)) as resp:
                await resp.read()
                return resp.status
        assert await asyncio.gather(*(one(n) for n in range(3))) == [200, 200, 200]


async def test_reload_switches_new_requests_and_keeps_in_flight_ones(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    a = await make_sim("old", words=40, chunk_delay=0.02)
    b = await make_sim("new")
    path = write_config(tmp_path / "c.yaml", [a], server={"admin_key": "adm-key-123456"})
    proxy = await make_proxy(load_config(path))
    admin = {"Authorization": "Bearer adm-key-123456"}
    async with aiohttp.ClientSession() as http:
        stream = await http.post(f"{proxy.base_url}/chat/completions",
                                 json=chat_body("long", stream=True))
        await stream.content.readany()  # in flight on the old config
        write_config(path, [b], server={"admin_key": "adm-key-123456"})
        async with http.post(f"{proxy.url}/admin/reload", headers=admin) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["status"] == "reloaded"
        assert await served_by(proxy) == "p:s0"
        assert b.stats.requests == 1  # the new config's s0 is the "new" simulator
        rest = await stream.read()
        assert rest.endswith(b"data: [DONE]\n\n")  # the old stream finished on the old one
        stream.close()
        path.write_text("providers: [{provider_id: p, instances: [{id: x, base_url: nope}]}]\n")
        async with http.post(f"{proxy.url}/admin/reload", headers=admin) as resp:
            assert resp.status == 400
            body = await resp.json()
        assert "running one stays" in body["error"]["message"]
        assert "base_url" in body["error"]["message"]
        assert await served_by(proxy) == "p:s0" and b.stats.requests == 2


async def test_a_client_too_slow_to_send_its_body_gets_408(make_sim: MakeSim,
                                                           make_proxy: MakeProxy,
                                                           tmp_path: Path) -> None:
    a = await make_sim()
    proxy = await make_proxy(load_config(write_config(tmp_path / "c.yaml", [a],
                                                      server={"body_timeout_s": 0.3})))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
    await writer.drain()
    head = await asyncio.wait_for(reader.read(4096), timeout=5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert b'"request_timeout"' in head


async def test_too_many_messages_is_a_400(make_sim: MakeSim, make_proxy: MakeProxy,
                                          tmp_path: Path, http: aiohttp.ClientSession) -> None:
    proxy = await make_proxy(load_config(write_config(tmp_path / "c.yaml", [await make_sim()])))
    body = {"model": "auto", "messages": [{"role": "user", "content": "x"}] * 10_001}
    async with http.post(f"{proxy.base_url}/chat/completions", json=body) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "too_many_messages"


def _stream_lines(port: int, prompt: str) -> tuple[Any, Any]:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    body = json.dumps(chat_body(prompt, stream=True)).encode()
    conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                 b"\r\n\r\n" + body)
    return conn, conn.makefile("rb")


def test_sigterm_lets_streams_finish_flushes_the_audit_and_exits_0(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        c.start_sim("slow", "m", options=("--words", "40", "--chunk-delay", "0.05"))
        c.start_proxy([("slow", "m")], server={"host": "127.0.0.1", "port": c.proxy_port,
                                               "shutdown_grace_s": 10})
        conn, stream = _stream_lines(c.proxy_port, "tell me")
        assert stream.readline().startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        c.proxy.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", c.proxy_port), timeout=1).close()
            except OSError:
                return True
            return False

        # Polled, not after a fixed pause: a loaded machine may take a while to handle
        # the signal; the stream below is still in flight either way.
        wait_until(refused, 10, "the proxy to stop accepting connections after SIGTERM", 0.05)
        raw = stream.read()  # the in-flight stream runs to its end
        conn.close()
        text = ""
        for line in raw.split(b"\n"):
            if line.startswith(b"data: {"):
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        assert text == answer_text("m", "tell me", 40)
        assert b"data: [DONE]" in raw
        assert c.proxy.wait(timeout=15) == 0
        assert time.monotonic() - started < 12
        events = subprocess.run([sys.executable, "-m", "proxy", "events", "--store",
                                 f"sqlite:///{tmp_path}/audit.db", "--type",
                                 "REQUEST_COMPLETED", "--json"], capture_output=True,
                                text=True, timeout=30, check=True)
        assert len(json.loads(events.stdout)) == 1  # flushed on the way out
    finally:
        c.close()


def test_sighup_reloads_and_a_bad_file_keeps_the_old_config(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        c.start_sim("first", "m1")
        c.start_sim("second", "m2")
        c.start_proxy([("first", "m1")])
        url = f"http://127.0.0.1:{c.proxy_port}/v1/chat/completions"

        def instance() -> str:
            request = urllib.request.Request(url, data=json.dumps(chat_body()).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as resp:
                return str(resp.headers["x-route-instance"])

        assert instance() == "local:first"
        config = tmp_path / "proxy.yaml"
        doc = yaml.safe_load(config.read_text())
        doc["providers"][0]["instances"][0]["id"] = "renamed"
        config.write_text(yaml.safe_dump(doc))
        c.proxy.send_signal(signal.SIGHUP)
        wait_until(lambda: instance() == "local:renamed", 10, "SIGHUP to reload", 0.1)
        config.write_text("providers: oops\n")
        c.proxy.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload_rejected" in c.log(), 10, "the bad reload's rejection", 0.1)
        assert instance() == "local:renamed"
        assert c.proxy.poll() is None
    finally:
        c.close()


async def test_reload_keeps_what_it_learned_about_unchanged_instances(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    a = await make_sim("a")
    path = write_config(tmp_path / "c.yaml", [a])
    proxy = await make_proxy(load_config(path))
    await served_by(proxy)
    before = proxy.app[STATE].registry.by_id["p:s0"]
    assert before.successes == 1 and before.fingerprint == "a"
    ok, message = await reload_config(proxy.app)
    assert ok, message
    after = proxy.app[STATE].registry.by_id["p:s0"]
    assert after is before  # the same live object, reconfigured in place (Registry.adopt)
    assert after.successes == 1 and after.fingerprint == "a" and after.state == "READY"


async def test_a_reload_during_an_in_flight_stream_leaves_inflight_zero_and_the_slot_free(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    a = await make_sim("twin", words=40, chunk_delay=0.02)
    b = await make_sim("twin")
    path = write_config(tmp_path / "c.yaml", [a, b], s0={"max_concurrency": 1},
                        retry={"queue_wait_s": 0.05})
    proxy = await make_proxy(load_config(path))
    async with aiohttp.ClientSession() as http:
        stream = await http.post(f"{proxy.base_url}/chat/completions",
                                 json=chat_body("long", stream=True))
        assert stream.headers["x-route-instance"] == "p:s0"
        await stream.content.readany()  # in flight on s0
        # The reload changes s0's config (a tag), so s0 is reconfigured, not replaced.
        write_config(path, [a, b], s0={"max_concurrency": 1, "metadata": {
            "model": "twin", "tags": ["coding"]}}, retry={"queue_wait_s": 0.05})
        ok, message = await reload_config(proxy.app)
        assert ok, message
        s0 = proxy.app[STATE].registry.by_id["p:s0"]
        assert s0.inflight == 1 and s0.tags == frozenset({"coding"})
        rest = await stream.read()
        assert rest.endswith(b"data: [DONE]\n\n")
        stream.close()
        await wait_for(lambda: s0.inflight == 0, what="the in-flight count to drop after the "
                       "stream that started before the reload")
        async with http.get(f"{proxy.url}/admin/instances") as resp:
            rows = {r["id"]: r for r in (await resp.json())["instances"]}
        assert rows["p:s0"]["inflight"] == 0
        # With max_concurrency 1, the free slot admits the next request at once.
        async with http.post(f"{proxy.base_url}/chat/completions", json=chat_body("next")) as r:
            assert r.status == 200
            assert (r.headers["x-route-instance"], r.headers["x-route-attempts"]) == ("p:s0", "1")
    assert b.stats.requests == 0
