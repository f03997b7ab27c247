"""Three proxy replicas sharing what they learn through a real Redis (issue 19).

Replicas A, B and C are `failover-proxy serve` processes with the same config but for the
port, in front of simulator processes; the official `openai` SDK sends round-robin across
them. Their own probes run only at start-up here (health.interval_s: 300), so what one
replica knows of an instance after that came from another through Redis.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.cluster import ROOT, Cluster, free_port, wait_until
from tests.pg import PostgresServer
from tests.redis_server import RedisServer
from tests.replicas import Replicas

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def replicas(cluster: Cluster, redis_server: RedisServer,
             request: pytest.FixtureRequest) -> Iterator[Replicas]:
    """Three replicas on the session's Redis, under a key prefix of this test's own."""
    yield Replicas(cluster, redis_server.url, f"t:{request.node.name}:")


def served_by(reps: Replicas, n: int, session: str | None = None,
              model: str = "auto") -> tuple[str, int]:
    """(instance, attempts) of one chat completion through replica `n`."""
    headers = {} if session is None else {"x-session-id": session}
    raw = reps.client(n).chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, extra_headers=headers)  # type: ignore[arg-type]
    raw.parse()
    return raw.headers["x-route-instance"], int(raw.headers["x-route-attempts"])


def round_robin(reps: Replicas, count: int, who: tuple[int, ...] = (0, 1, 2)) -> list[str]:
    return [served_by(reps, who[k % len(who)])[0] for k in range(count)]


def wait_each(ns: tuple[int, ...], check: Callable[[int], bool], what: str,
              timeout: float = 10) -> None:
    """Wait until `check(n)` holds for every replica `n` of `ns`."""
    for n in ns:
        wait_until(partial(check, n), timeout, f"replica {n} {what}")


def set_faults(cluster: Cluster, name: str, faults: list[str]) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{cluster.sims[name][0]}/_sim/faults",
        data=json.dumps({"faults": faults}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200


def test_a_refused_connection_met_by_a_keeps_b_and_c_from_sending_to_that_instance(
        cluster: Cluster, replicas: Replicas) -> None:
    replicas.start_two()
    assert round_robin(replicas, 3) == ["local:first"] * 3  # all healthy: first is first
    cluster.kill_sim("first")  # its port now refuses connections
    assert served_by(replicas, 0) == ("local:second", 2)  # A met the refusal, then moved
    wait_each((1, 2), lambda n: replicas.instance(n, "first")["circuit"] == "open",
              "to see A's open circuit")
    for n in (1, 2, 1, 2, 1, 2):
        assert served_by(replicas, n) == ("local:second", 1)
    for n in (1, 2):
        row = replicas.instance(n, "first")
        assert row["failures"] == 0, row  # B and C never sent it anything
        assert row["circuit_opened_by"] == "connection"


def test_the_events_of_a_request_served_via_c_after_a_reroute_found_by_a_are_in_postgresql(
        cluster: Cluster, replicas: Replicas, postgres_server: PostgresServer) -> None:
    """One audit trail for the fleet: the three replicas write to one PostgreSQL database,
    and `failover-proxy events --store postgresql://...` reads any replica's requests."""
    url = postgres_server.create_database("replicas_trail")
    replicas.start_two(store={"url": url})

    def ask(n: int) -> tuple[str, int, str]:
        raw = replicas.client(n).chat.completions.with_raw_response.create(
            model="auto", messages=MESSAGES)  # type: ignore[arg-type]
        raw.parse()
        return (raw.headers["x-route-instance"], int(raw.headers["x-route-attempts"]),
                raw.headers["x-request-id"])

    assert round_robin(replicas, 3) == ["local:first"] * 3  # all healthy: first is first
    cluster.kill_sim("first")
    found_by_a = ask(0)
    assert found_by_a[:2] == ("local:second", 2)  # A met the refusal and rerouted
    wait_each((2,), lambda n: replicas.instance(n, "first")["circuit"] == "open",
              "to see A's open circuit")
    via_c = ask(2)
    assert via_c[:2] == ("local:second", 1)  # C knew: no attempt on `first`

    def trail(request_id: str) -> list[dict[str, object]]:
        out = subprocess.run([sys.executable, "-m", "proxy", "events", "--store", url,
                              "--request-id", request_id, "--json"], capture_output=True,
                             text=True, cwd=ROOT, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        assert postgres_server.password not in out.stdout + out.stderr
        return list(json.loads(out.stdout))[::-1]

    wait_until(lambda: [e["type"] for e in trail(via_c[2])][-1:] == ["REQUEST_COMPLETED"], 20,
               "C's request in PostgreSQL")
    events_c = trail(via_c[2])
    assert [(e["type"], e["instance"]) for e in events_c] == [
        ("ROUTE_PLANNED", "local:second"), ("ROUTE_VERIFIED", "local:second"),
        ("REQUEST_COMPLETED", "local:second")], events_c
    detail = events_c[-1]["detail"]
    assert isinstance(detail, dict)
    assert [t["instance"] for t in detail["tried"]] == ["local:second"]
    wait_until(lambda: "REQUEST_COMPLETED" in [e["type"] for e in trail(found_by_a[2])], 20,
               "A's request in PostgreSQL")
    rerouted = [e for e in trail(found_by_a[2]) if e["type"] == "REROUTED"]
    assert [(e["reason_code"], e["from_instance"], e["to_instance"]) for e in rerouted] == [
        ("CONN_REFUSED", "local:first", "local:second")]


def test_a_drain_through_a_admin_api_stops_traffic_from_all_three(
        cluster: Cluster, replicas: Replicas) -> None:
    replicas.start_two()
    assert round_robin(replicas, 3) == ["local:first"] * 3
    status, body = replicas.call(0, "POST", "/admin/instances/first/drain")
    assert status == 200 and body["state"] == "DRAINED"
    wait_each((1, 2), lambda n: replicas.instance(n, "first")["state"] == "DRAINED",
              "to see the drain")
    assert round_robin(replicas, 9) == ["local:second"] * 9
    # An enable through C brings it back everywhere.
    status, _ = replicas.call(2, "POST", "/admin/instances/first/enable")
    assert status == 200
    wait_each((0, 1), lambda n: replicas.instance(n, "first")["state"] == "READY",
              "to see the enable (and probe it)")
    assert round_robin(replicas, 3) == ["local:first"] * 3


def test_a_session_started_on_a_continues_on_the_same_instance_through_b(
        cluster: Cluster, replicas: Replicas) -> None:
    replicas.start_two()
    # Without a session every replica picks `first` (the config order breaks the tie).
    assert round_robin(replicas, 3) == ["local:first"] * 3
    # The session starts on A with `second` (a request naming the instance).
    assert served_by(replicas, 0, session="conv-1", model="local:second")[0] == "local:second"

    def b_plans_second() -> bool:
        status, plan = replicas.call(1, "POST", "/admin/route",
                                     {"model": "auto", "messages": MESSAGES},
                                     {"x-session-id": "conv-1"})
        assert status == 200, plan
        return bool(plan["selected"] == "local:second")

    wait_until(b_plans_second, 10, "B to know the session")
    assert served_by(replicas, 1, session="conv-1") == ("local:second", 1)
    assert served_by(replicas, 2, session="conv-1") == ("local:second", 1)
    assert served_by(replicas, 1, session="conv-2")[0] == "local:first"  # others as before


def test_a_conversation_served_through_a_goes_back_to_its_cached_instance_through_b(
        cluster: Cluster, replicas: Replicas) -> None:
    """Prefix affinity is shared: no session header, only the history re-sent."""
    replicas.start_two()
    history: list[dict[str, str]] = [
        {"role": "system", "content": "You review pull requests carefully. " * 30},
        {"role": "user", "content": "Turn one: look at this diff."}]

    def answer(n: int, model: str = "auto") -> str:
        raw = replicas.client(n).chat.completions.with_raw_response.create(
            model=model, messages=history)  # type: ignore[arg-type]
        completion = raw.parse()
        history.append({"role": "assistant",
                        "content": completion.choices[0].message.content or ""})
        history.append({"role": "user", "content": f"Turn {len(history) // 2 + 1}."})
        return raw.headers["x-route-instance"]

    # Turn one lands on `second` through A (a request naming the instance): `second`
    # now has this prompt cached; without affinity every replica would pick `first`.
    assert answer(0, model="local:second") == "local:second"

    def b_plans_second() -> bool:
        status, plan = replicas.call(1, "POST", "/admin/route",
                                     {"model": "auto", "messages": history})
        assert status == 200, plan
        hit = [r for r in plan["reasons"].get("local:second", []) if r.startswith("prefix_hit=")]
        return bool(plan["selected"] == "local:second" and hit)

    wait_until(b_plans_second, 10, "B to know where the conversation is cached")
    assert answer(1) == "local:second"
    assert answer(2) == "local:second"
    # Another conversation has no cached prefix anywhere.
    status, plan = replicas.call(1, "POST", "/admin/route", {"model": "auto", "messages": [
        {"role": "system", "content": "You translate manuals. " * 40},
        {"role": "user", "content": "Start."}]})
    assert status == 200, plan
    assert not [r for rs in plan["reasons"].values() for r in rs if "prefix_hit" in r], plan


def test_a_429_seen_by_b_keeps_a_and_c_away_for_its_retry_after(
        cluster: Cluster, replicas: Replicas) -> None:
    replicas.start_two()
    assert round_robin(replicas, 3) == ["local:first"] * 3
    set_faults(cluster, "first", ["rate_limit=40"])
    assert served_by(replicas, 1) == ("local:second", 2)  # B met the 429, then moved
    set_faults(cluster, "first", [])  # `first` would answer again: only the cooldown says no
    wait_each((0, 2), lambda n: replicas.instance(n, "first")["rate_limited_retry_in_s"] > 0,
              "to see B's cooldown")
    for n in (0, 2):
        left = replicas.instance(n, "first")["rate_limited_retry_in_s"]
        assert 0 < left <= 40  # the Retry-After's end, on B's clock
        assert replicas.instance(n, "first")["circuit"] == "closed"  # no circuit matter
    assert round_robin(replicas, 6, (0, 2)) == ["local:second"] * 6
    for n in (0, 2):
        assert replicas.instance(n, "first")["failures"] == 0


def _shared_up(reps: Replicas, n: int) -> bool:
    status, body = reps.call(n, "GET", "/readyz")
    assert status == 200, body  # serving from local state: still ready
    return bool(body["shared_state"]["up"])


def test_redis_killed_mid_run_fails_no_request_and_state_converges_after_restart(
        cluster: Cluster, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        _redis_killed_mid_run(cluster, Replicas(cluster, redis.url, "kill:"), redis)
    finally:
        redis.stop()


def _redis_killed_mid_run(cluster: Cluster, reps: Replicas, redis: RedisServer) -> None:
    reps.start_two()
    assert all(_shared_up(reps, n) for n in range(3))
    outcomes: Counter[str] = Counter()

    async def load(stop: asyncio.Event) -> None:
        clients = [reps.async_client(n) for n in range(3)]

        async def worker(k: int) -> None:
            while not stop.is_set():
                try:
                    await clients[k % 3].chat.completions.create(model="auto",
                                                                 messages=MESSAGES)  # type: ignore[arg-type]
                    outcomes["ok"] += 1
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    outcomes[f"failed: {exc!r}"] += 1
                k += 1

        await asyncio.gather(*(worker(k) for k in range(3)))
        for client in clients:
            await client.close()

    async def scenario() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(load(stop))
        await asyncio.sleep(0.3)
        redis.kill()
        await asyncio.to_thread(wait_each, (0, 1, 2), lambda n: not _shared_up(reps, n),
                                "to notice Redis gone")
        assert "failover_proxy_shared_state_up 0.0" in reps.metrics(0)
        # A drain while Redis is away: A's own word, offered to the others when it returns.
        status, _ = await asyncio.to_thread(reps.call, 0, "POST",
                                            "/admin/instances/first/drain")
        assert status == 200
        assert reps.instance(1, "first")["state"] != "DRAINED"  # B could not hear of it
        await asyncio.sleep(0.5)  # requests go on meanwhile, from local state
        redis.start()
        await asyncio.to_thread(wait_each, (0, 1, 2), lambda n: _shared_up(reps, n),
                                "to reconnect", 15)
        await asyncio.to_thread(
            wait_each, (1, 2), lambda n: reps.instance(n, "first")["state"] == "DRAINED",
            "to get the drain made while Redis was away")
        stop.set()
        await running

    asyncio.run(scenario())
    assert set(outcomes) == {"ok"}, outcomes  # zero failed requests
    assert outcomes["ok"] > 10
    assert "failover_proxy_shared_state_up 1.0" in reps.metrics(0)
    assert round_robin(reps, 3) == ["local:second"] * 3
    for n in range(3):
        log = reps.log(n)
        # One line when it went, one when it came back: not one per call.
        assert len(re.findall(r"shared_state_down", log)) == 1, log[-3000:]
        assert len(re.findall(r"shared_state_up", log)) == 2, log[-3000:]  # start, return


def test_a_redis_that_hangs_costs_no_request_and_the_replicas_say_so_until_it_answers(
        cluster: Cluster, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    reps = Replicas(cluster, redis.url, "hang:", n=2)
    try:
        reps.start_two()
        redis.pause()
        wait_each((0, 1), lambda n: not _shared_up(reps, n), "to find Redis too slow")
        status, body = reps.call(0, "GET", "/readyz")
        assert body["shared_state"]["error"].startswith("TimeoutError"), body
        assert "local state" in body["shared_state"]["detail"]
        # Requests and admin calls go on from local state, each as fast as usual: every
        # Redis call is bounded by state.timeout_s and none is on the request path.
        assert round_robin(reps, 6, (0, 1)) == ["local:first"] * 6
        assert reps.call(1, "POST", "/admin/instances/first/drain")[0] == 200
        assert round_robin(reps, 2, (1,)) == ["local:second"] * 2
        redis.resume()
        wait_each((0, 1), lambda n: _shared_up(reps, n), "to be back", 15)
        wait_each((0,), lambda n: reps.instance(n, "first")["state"] == "DRAINED",
                  "to get the drain made while Redis hung")
    finally:
        redis.stop()


def test_the_replicas_demo_script_starts_three_replicas_behind_nginx_and_checks_them(
        tmp_path: Path) -> None:
    """scripts/replicas_demo.py, as the README tells users to run it (on free ports)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "replicas_demo.py"),
                           "--check", "--free-ports"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "DEMO_RUN_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "answered by 3 replicas" in done.stdout
    assert "went to local:secondary" in done.stdout
    assert done.stdout.rstrip().endswith("OK")


def test_the_replicas_demo_with_a_fixed_port_taken_says_which_and_starts_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A llama-server left on 8080 by the quickstart: before, the demo's readiness check
    took it for nginx, said `up`, and died in a traceback on the llama-server's answer."""
    spec = importlib.util.spec_from_file_location("replicas_demo_busy",
                                                  ROOT / "scripts" / "replicas_demo.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    ports = {name: free_port() for name in demo.PORTS}
    monkeypatch.setattr(demo, "PORTS", ports)  # the demo's fixed ports, here free ones
    monkeypatch.setenv("DEMO_RUN_DIR", str(tmp_path))
    with socket.socket() as other:
        other.bind(("127.0.0.1", ports["nginx"]))
        other.listen()
        with pytest.raises(SystemExit) as exited:
            demo.main([])
    message = str(exited.value.code)
    assert message.startswith(f"replicas-demo: busy: nginx :{ports['nginx']};"), message
    assert "REPLICAS_ARGS=--free-ports" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no log: nothing was started
