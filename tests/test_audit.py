"""The audit trail: the seed's four acceptance scenarios checked through the events API,
events surviving a restart, the `events` command, metrics, and the store's back-pressure;
every test of the store on both backends (`store_url`: a SQLite file, and a database on a
real PostgreSQL server, tests/pg.py)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy.audit.database import StoreError, open_database
from proxy.audit.schema import EventQuery
from proxy.audit.store import AuditStore
from proxy.config import parse_config
from proxy.sim.simulator import Simulator
from tests.conftest import MakeProxy, MakeSim, RunningProxy, chat_body

ROOT = Path(__file__).resolve().parents[1]


def seed_config(local: list[Simulator], cloud: Simulator | None, store_url: str,
                **sections: Any) -> Any:
    """Local llama.cpp-style instances and, optionally, a cloud instance (`local: false`)."""
    providers: list[dict[str, Any]] = [{"provider_id": "llamacpp", "server": "openai", "instances": [
        {"id": f"local{n}", "base_url": sim.base_url, "metadata": {"model": sim.model,
                                                                    "tags": ["coding"]}}
        for n, sim in enumerate(local)]}]
    if cloud is not None:
        providers.append({"provider_id": "openai", "local": False, "instances": [
            {"id": "default", "base_url": cloud.base_url + "/v1",
             "metadata": {"model": cloud.model}}]})
    return parse_config({"health": {"interval_s": 30, "timeout_s": 5, "cooldown_s": 60,
                                    "max_cooldown_s": 120},
                         "store": {"url": store_url},
                         "providers": providers, **sections}, "<test>")


def select(store_url: str, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """Rows of a query on the store, read as any other client of the database would."""
    db = open_database(store_url, readonly=True)
    try:
        return db.execute(sql, args)
    finally:
        db.close()


async def events(proxy: RunningProxy, **params: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/admin/events",
                                                         params=params) as resp:
        assert resp.status == 200, await resp.text()
        return list(reversed((await resp.json())["events"]))  # oldest first


async def chat(proxy: RunningProxy, prompt: str = "fix this python bug") -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy.base_url}/chat/completions", json=chat_body(prompt)) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.json()


async def test_scenario_1_healthy_selected_instance_is_verified(
        make_sim: MakeSim, make_proxy: MakeProxy, store_url: str) -> None:
    a, b = await make_sim("coder"), await make_sim("coder")
    proxy = await make_proxy(seed_config([a, b], None, store_url))
    status, headers, _ = await chat(proxy)
    assert status == 200
    trail = await events(proxy, request_id=headers["x-request-id"])
    assert [e["type"] for e in trail] == ["ROUTE_PLANNED", "ROUTE_VERIFIED", "REQUEST_COMPLETED"]
    assert all(e["plan_id"] == headers["x-route-plan-id"] for e in trail)
    assert trail[1]["instance"] == "llamacpp:local0"
    assert trail[2]["detail"]["status"] == 200 and trail[2]["detail"]["attempts"] == 1


async def test_scenario_2_selected_local_stopped_reroutes_to_next_local(
        make_sim: MakeSim, make_proxy: MakeProxy, store_url: str) -> None:
    a, b = await make_sim("coder"), await make_sim("coder")
    cloud = await make_sim("gpt-4o-mini")
    await a.stop()  # stopped before the proxy (and its first probe) even starts
    proxy = await make_proxy(seed_config([a, b], cloud, store_url))
    status, headers, body = await chat(proxy)
    assert status == 200 and headers["x-route-instance"] == "llamacpp:local1"
    trail = await events(proxy, request_id=headers["x-request-id"])
    rerouted = [e for e in trail if e["type"] == "REROUTED"]
    assert len(rerouted) == 1
    assert rerouted[0]["reason_code"] == "INSTANCE_NOT_READY"
    assert (rerouted[0]["from_instance"], rerouted[0]["to_instance"]) == (
        "llamacpp:local0", "llamacpp:local1")
    assert "state=DOWN" in rerouted[0]["detail"]["detail"]
    assert cloud.stats.requests == 0


async def test_scenario_3_every_local_stopped_served_by_cloud(
        make_sim: MakeSim, make_proxy: MakeProxy, store_url: str) -> None:
    a, b = await make_sim("coder"), await make_sim("coder")
    cloud = await make_sim("gpt-4o-mini")
    proxy = await make_proxy(seed_config([a, b], cloud, store_url))
    await a.stop()
    await b.stop()  # the prober has not noticed: traffic finds out, and moves on
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "fix this python bug"}])
    assert raw.headers["x-route-instance"] == "openai:default"
    assert raw.parse().model == "gpt-4o-mini"
    trail = await events(proxy, request_id=raw.headers["x-request-id"])
    moves = [(e["reason_code"], e["from_instance"], e["to_instance"])
             for e in trail if e["type"] == "REROUTED"]
    assert moves == [("CONN_REFUSED", "llamacpp:local0", "llamacpp:local1"),
                     ("CONN_REFUSED", "llamacpp:local1", "openai:default")]
    lineage = select(store_url, "SELECT kind, from_instance, to_instance, reason_code FROM"
                     " lineage WHERE request_id=? ORDER BY id", raw.headers["x-request-id"])
    assert lineage == [("route_change", "llamacpp:local0", "llamacpp:local1", "CONN_REFUSED"),
                       ("route_change", "llamacpp:local1", "openai:default", "CONN_REFUSED")]


async def test_scenario_4_nothing_available_is_blocked(make_sim: MakeSim, make_proxy: MakeProxy,
                                                       store_url: str) -> None:
    a = await make_sim("coder")
    await a.stop()
    proxy = await make_proxy(seed_config([a], None, store_url))
    status, headers, body = await chat(proxy)
    assert status == 503
    assert "No available instances" in body["error"]["message"]
    trail = await events(proxy, request_id=headers["x-request-id"])
    # The instance the prober saw down is still given a last try (it might be back):
    # refused, so the request is blocked.
    assert [e["type"] for e in trail] == ["ROUTE_PLANNED", "REROUTED", "ROUTE_BLOCKED",
                                          "REQUEST_COMPLETED"]
    assert trail[1]["reason_code"] == "CONN_REFUSED"
    assert "No available instances" in trail[2]["detail"]["message"]
    assert trail[2]["detail"]["rejected"] == {}


async def test_state_changes_are_events(make_sim: MakeSim, make_proxy: MakeProxy,
                                        store_url: str) -> None:
    a = await make_sim("coder")
    proxy = await make_proxy(seed_config([a], None, store_url))
    changes = await events(proxy, type="INSTANCE_STATE_CHANGED", instance="llamacpp:local0")
    assert changes[-1]["detail"]["new"] == "READY"
    assert changes[-1]["detail"]["old"] == "UNKNOWN"


async def test_events_survive_a_restart_and_the_cli_reads_them(
        make_sim: MakeSim, make_proxy: MakeProxy, store_url: str) -> None:
    a = await make_sim("coder")
    config = seed_config([a], None, store_url)
    proxy = await make_proxy(config)
    status, headers, _ = await chat(proxy)
    request_id = headers["x-request-id"]
    await proxy.stop()  # shutdown flushes the queue
    again = await make_proxy(config)
    assert [e["type"] for e in await events(again, request_id=request_id)] == [
        "ROUTE_PLANNED", "ROUTE_VERIFIED", "REQUEST_COMPLETED"]
    url = store_url
    out = subprocess.run([sys.executable, "-m", "proxy", "events", "--store", url,
                          "--request-id", request_id, "--json"], capture_output=True,
                         text=True, cwd=ROOT, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert [e["type"] for e in json.loads(out.stdout)][::-1] == [
        "ROUTE_PLANNED", "ROUTE_VERIFIED", "REQUEST_COMPLETED"]
    table = subprocess.run([sys.executable, "-m", "proxy", "events", "--store", url,
                            "--type", "ROUTE_VERIFIED"], capture_output=True, text=True,
                           cwd=ROOT, timeout=30, check=False)
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split()[:3] == ["TIME", "TYPE", "REQUEST"]
    assert "ROUTE_VERIFIED" in table.stdout and "llamacpp:local0" in table.stdout
    bad = subprocess.run([sys.executable, "-m", "proxy", "events", "--store", url,
                          "--type", "NOPE"], capture_output=True, text=True, cwd=ROOT,
                         timeout=30, check=False)
    assert bad.returncode == 2 and "Unknown event type" in bad.stderr


async def test_events_api_rejects_bad_filters(make_sim: MakeSim, make_proxy: MakeProxy,
                                              store_url: str) -> None:
    proxy = await make_proxy(seed_config([await make_sim("coder")], None, store_url))
    async with aiohttp.ClientSession() as http:
        for params in ({"type": "NOPE"}, {"limit": "x"}, {"limit": "0"}, {"since": "yesterday"}):
            async with http.get(f"{proxy.url}/admin/events", params=params) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["type"] == "invalid_request_error"
        async with http.get(f"{proxy.url}/admin/events", params={"since": "1h"}) as resp:
            assert resp.status == 200


async def test_route_plan_rows_record_the_final_instance(make_sim: MakeSim, make_proxy: MakeProxy,
                                                         store_url: str) -> None:
    a, b = await make_sim("coder"), await make_sim("coder")
    proxy = await make_proxy(seed_config([a, b], None, store_url))
    await a.stop()
    status, headers, _ = await chat(proxy)
    await proxy.stop()
    (row,) = select(store_url, "SELECT selected, final_instance, outcome, status, attempts, plan"
                    " FROM route_plans WHERE plan_id = ?", headers["x-route-plan-id"])
    assert row[:5] == ("llamacpp:local0", "llamacpp:local1", "ok", 200, 2)
    assert json.loads(row[5])["fallback"] == ["llamacpp:local1"]


async def test_metrics_move(make_sim: MakeSim, make_proxy: MakeProxy, store_url: str) -> None:
    a, b = await make_sim("coder"), await make_sim("coder")
    proxy = await make_proxy(seed_config([a, b], None, store_url))

    async def scrape() -> str:
        async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            return await resp.text()

    await chat(proxy)
    await a.stop()
    await chat(proxy)
    text = await scrape()
    assert 'failover_proxy_requests_total{instance="llamacpp:local0",model="auto",outcome="ok"} 1.0' in text
    assert 'failover_proxy_requests_total{instance="llamacpp:local1",model="auto",outcome="ok"} 1.0' in text
    assert ('failover_proxy_reroutes_total{from_instance="llamacpp:local0",reason="CONN_REFUSED",'
            'to_instance="llamacpp:local1"} 1.0') in text
    assert 'failover_proxy_instance_state{instance="llamacpp:local0",state="READY"} 1.0' in text
    assert "failover_proxy_ttfb_seconds_count" in text
    assert "failover_proxy_overhead_seconds_count 2.0" in text
    assert "failover_proxy_inflight_requests 0.0" in text
    assert "failover_proxy_events_dropped_total 0.0" in text


async def test_writer_behind_drops_events_never_requests(store_url: str) -> None:
    dropped: list[int] = []
    store = AuditStore(store_url, queue_size=10, on_drop=dropped.append)
    await store.start()
    assert store.writer_pid is not None
    os.kill(store.writer_pid, signal.SIGSTOP)  # a stalled disk: the writer makes no progress
    try:
        for n in range(100):
            store.event(time.time(), "ROUTE_PLANNED", f"r{n}", "p", None)
            if n % 10 == 0:
                await asyncio.sleep(store.SEND_EVERY_S)  # batches go out meanwhile
        assert store.dropped >= 80 and sum(dropped) == store.dropped
    finally:
        os.kill(store.writer_pid, signal.SIGCONT)
    await store.close()  # whatever was queued is written
    ((kept,),) = select(store_url, "SELECT COUNT(*) FROM events")
    assert kept + store.dropped == 100


async def test_retention_by_age_and_count(store_url: str) -> None:
    store = AuditStore(store_url, retention_s=3600, max_rows=100)
    await store.start()
    old = time.time() - 7200
    for n in range(50):
        store.event(old, "ROUTE_PLANNED", f"old{n}", "p", None)
    for n in range(150):
        store.event(time.time(), "ROUTE_PLANNED", f"new{n}", "p", None)
    await store.flush()
    await store.apply_retention()
    rows = await store.query(EventQuery(limit=1000))
    await store.close()
    assert len(rows) == 100
    assert all(r["request_id"].startswith("new") for r in rows)
    assert rows[0]["request_id"] == "new149"


async def test_schema_is_versioned(store_url: str) -> None:
    """A new store gets the whole schema, at this release's version; a store written by a
    newer release is refused rather than misread."""
    from proxy.audit.schema import SCHEMA_VERSION

    db = open_database(store_url)
    assert db.schema_version() == SCHEMA_VERSION
    assert db.execute("SELECT prompt_tokens, tokens_estimated FROM route_plans") == []
    if db.kind == "sqlite":
        assert db.execute("PRAGMA journal_mode")[0][0] == "wal"
        db.execute("PRAGMA user_version = 999")
    else:
        db.execute("UPDATE audit_schema SET version = 999")
    db.close()
    with pytest.raises(StoreError, match="newer than this release"):
        open_database(store_url)
    with pytest.raises(StoreError, match="newer than this release"):
        open_database(store_url, readonly=True)


def test_a_version_1_sqlite_store_is_migrated_in_place(tmp_path: Path) -> None:
    """A store written before token figures were kept (schema 1) gains the columns and
    keeps its rows."""
    import sqlite3

    from proxy.audit.schema import migration

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(migration(1, "sqlite") + "; PRAGMA user_version = 1;")
    conn.execute("INSERT INTO route_plans (plan_id, request_id, ts) VALUES ('p', 'r', 1.0)")
    conn.close()
    db = open_database(f"sqlite:///{path}")
    assert db.execute("SELECT plan_id, prompt_tokens FROM route_plans") == [("p", None)]
    assert db.schema_version() == 2


def _open_at_once(url: str, barrier: Any, results: Any) -> None:
    """One worker's start: open the store when every other one does."""
    barrier.wait()
    try:
        open_database(url).close()
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported by the test
        results.put(repr(exc))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_workers_opening_one_new_store_at_once_all_start(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """`--workers N` (or replicas): every worker and its writer open (and create, and
    migrate) the one store at the same moment; each must wait its turn, none may fail to
    start with "database is locked" (SQLite answers a concurrent switch to WAL without
    waiting) or a duplicate table (PostgreSQL's CREATE TABLE IF NOT EXISTS is not safe
    against a concurrent one). Several rounds of four processes, as a race shows only
    sometimes."""
    ctx = multiprocessing.get_context("fork")
    server = request.getfixturevalue("postgres_server") if backend == "postgresql" else None
    for n in range(20 if server is None else 8):
        url = (f"sqlite:///{tmp_path}/audit{n}.db" if server is None
               else server.create_database(f"race{n}_{os.getpid()}"))
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_at_once, args=(url, barrier, results))
                 for _ in range(4)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join()
        assert outcomes == ["ok"] * 4, (n, outcomes)


async def test_requests_do_not_wait_on_a_slow_disk(make_sim: MakeSim, make_proxy: MakeProxy,
                                                   store_url: str) -> None:
    """The writer process is stopped (a stand-in for a stalled disk or database); requests
    still flow."""
    a = await make_sim("coder")
    proxy = await make_proxy(seed_config([a], None, store_url))
    from proxy.api.state import STATE

    store = proxy.app[STATE].recorder.store
    assert store is not None and store.writer_pid is not None
    os.kill(store.writer_pid, signal.SIGSTOP)  # the writer process is stuck
    try:
        results = await asyncio.gather(*(chat(proxy, f"q{n}") for n in range(20)))
        assert all(status == 200 for status, _, _ in results)
    finally:
        os.kill(store.writer_pid, signal.SIGCONT)


def test_loop_metrics_render_as_prometheus_histograms_and_counters() -> None:
    """The lock-free request metrics come out in Prometheus' format: cumulative buckets
    (a value equal to a bound counts in that bucket), +Inf, sum and count; counters by label."""
    from proxy.audit.metrics import Metrics

    m = Metrics()
    for value in (0.00005, 0.0003, 0.0003, 7.0):
        m.overhead.observe(value)
    m.requests.labels("auto", "p:s0", "ok").inc()
    m.requests.labels("auto", "p:s0", "ok").inc()
    m.requests.labels("auto", "", "route_blocked").inc()
    text = m.render().decode()
    assert 'failover_proxy_overhead_seconds_bucket{le="5e-05"} 1.0' in text
    assert 'failover_proxy_overhead_seconds_bucket{le="0.00025"} 1.0' in text
    assert 'failover_proxy_overhead_seconds_bucket{le="0.0005"} 3.0' in text
    assert 'failover_proxy_overhead_seconds_bucket{le="0.1"} 3.0' in text
    assert 'failover_proxy_overhead_seconds_bucket{le="+Inf"} 4.0' in text
    assert "failover_proxy_overhead_seconds_count 4.0" in text
    assert "failover_proxy_overhead_seconds_sum 7.00065" in text
    assert ('failover_proxy_requests_total{instance="p:s0",model="auto",outcome="ok"} 2.0'
            in text)
    assert ('failover_proxy_requests_total{instance="",model="auto",outcome="route_blocked"} 1.0'
            in text)


async def test_the_writer_ignores_group_signals_and_comes_back_after_a_crash(
        store_url: str) -> None:
    """Ctrl-C or a service manager signals the whole process group: the writer keeps going
    (the proxy ends it by closing the pipe). Killed outright, it is replaced, and what it
    had not acknowledged is counted as dropped."""
    store = AuditStore(store_url)
    store.RESTART_AFTER_S = 0.05
    await store.start()
    first = store.writer_pid
    assert first is not None
    await store.flush()  # the writer is up (past its start-up)
    os.kill(first, signal.SIGTERM)
    os.kill(first, signal.SIGINT)
    store.event(time.time(), "ROUTE_PLANNED", "before", "p", None)
    await store.flush()
    assert store.writer_pid == first and store.written == 1

    os.kill(first, signal.SIGSTOP)
    store.event(time.time(), "ROUTE_PLANNED", "lost", "p", None)
    await asyncio.sleep(store.SEND_EVERY_S * 3)  # sent, never acknowledged
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while store.writer_pid in (first, None) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert store.writer_pid not in (first, None), "no new writer"
    assert store.dropped == 1
    store.event(time.time(), "ROUTE_PLANNED", "after", "p", None)
    rows = await store.query(EventQuery(limit=10))
    await store.close()
    assert sorted(r["request_id"] for r in rows) == ["after", "before"]


async def test_a_nul_in_an_events_filter_or_a_request_id_is_no_server_error(
        make_sim: MakeSim, make_proxy: MakeProxy, store_url: str) -> None:
    """PostgreSQL's text holds no NUL (psycopg refuses one in a parameter): a filter or a
    request id with one finds nothing, as any other that matches no row."""
    proxy = await make_proxy(seed_config([await make_sim("coder")], None, store_url))
    async with aiohttp.ClientSession() as http:
        for params in ({"request_id": "a\x00b"}, {"instance": "\x00"}):
            async with http.get(f"{proxy.url}/admin/events", params=params) as resp:
                assert resp.status == 200 and (await resp.json())["events"] == []
        async with http.get(f"{proxy.url}/admin/requests/a%00b") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
