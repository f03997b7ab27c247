"""The audit trail on a real PostgreSQL server (tests/pg.py): a proxy process writing to it
and `failover-proxy events` reading it back, the database stopped mid-run (no request
fails, rows past the bound are dropped and counted, writing resumes after its restart),
and the URL's password kept out of everything a person or a log could see."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy.api.state import STATE
from proxy.audit.database import StoreUnavailable, open_database, url_password
from proxy.audit.schema import EventQuery
from proxy.audit.store import AuditStore
from tests.cluster import ROOT, Cluster, free_port, wait_until
from tests.conftest import MakeProxy, MakeSim, proxy_config, wait_for
from tests.pg import PostgresServer


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, check=False)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def log_events(cluster: Cluster) -> list[dict[str, Any]]:
    return [json.loads(line) for line in cluster.log().splitlines() if line.startswith("{")]


def processes_text() -> str:
    """Every process's command line on this machine, as `ps` shows them."""
    return subprocess.run(["ps", "axww", "-o", "args"], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, which it may stop and start."""
    server = PostgresServer()
    server.start()
    yield server
    server.destroy()


def test_a_proxy_process_writes_its_audit_trail_to_postgresql_and_events_reads_it(
        cluster: Cluster, postgres_server: PostgresServer) -> None:
    """Served through a refused instance onto a live one: the reroute and the request's
    whole story are in PostgreSQL, read back by `events --store postgresql://...` (events
    and the token sums), and the password shows nowhere: not in the proxy's log, not in
    the command lines of its processes (the writer's included), not in /admin/status."""
    url = postgres_server.create_database("cluster_trail")
    cluster.start_sim("dead", "m", listen=False)
    cluster.start_sim("live", "m")
    cluster.start_proxy([("dead", "m"), ("live", "m")], store={"url": url},
                        health={"enabled": False})
    client = cluster.client()
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hello"}])
    assert raw.headers["x-route-instance"] == "local:live"
    request_id = raw.headers["x-request-id"]
    for _ in range(3):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    status, body = get(f"http://127.0.0.1:{cluster.proxy_port}/admin/status")
    assert status == 200 and json.loads(body)["audit_store"] == (
        url.replace(postgres_server.password, "***"))
    ps = processes_text()
    assert "proxy.audit.writer" in ps and postgres_server.password not in ps

    def written() -> bool:
        out = cli("events", "--store", url, "--request-id", request_id, "--json")
        return out.returncode == 0 and len(json.loads(out.stdout)) == 4

    wait_until(written, 20, "the request's events in PostgreSQL")
    out = cli("events", "--store", url, "--request-id", request_id, "--json")
    trail = json.loads(out.stdout)[::-1]
    assert [e["type"] for e in trail] == ["ROUTE_PLANNED", "ROUTE_VERIFIED", "REROUTED",
                                          "REQUEST_COMPLETED"]
    rerouted = next(e for e in trail if e["type"] == "REROUTED")
    assert (rerouted["reason_code"], rerouted["from_instance"], rerouted["to_instance"]) == (
        "CONN_REFUSED", "local:dead", "local:live")
    status, body = get(f"http://127.0.0.1:{cluster.proxy_port}/admin/requests/{request_id}")
    assert status == 200, body
    (story,) = json.loads(body)["requests"]
    assert [(a["instance"], a["code"]) for a in story["tried"]] == [
        ("local:dead", "CONN_REFUSED"), ("local:live", None)]
    assert story["final_instance"] == "local:live" and story["plan"]["selected"] == "local:dead"
    table = cli("events", "--store", url, "--type", "REROUTED")
    assert table.returncode == 0 and "CONN_REFUSED" in table.stdout
    reload = urllib.request.Request(f"http://127.0.0.1:{cluster.proxy_port}/admin/reload",
                                    method="POST")
    with urllib.request.urlopen(reload, timeout=30) as resp:
        assert resp.status == 200  # the store goes on as it was
    again = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "after the reload"}])
    wait_until(lambda: '"REQUEST_COMPLETED"' in cli(
        "events", "--store", url, "--request-id", again.headers["x-request-id"], "--json").stdout,
        20, "a request after the reload in PostgreSQL")
    cluster.close()  # the rest of the queue is written at shutdown
    sums = cli("events", "--store", url, "--sum", "--since", "1h", "--json")
    assert sums.returncode == 0, sums.stderr
    (row,) = json.loads(sums.stdout)
    assert (row["instance"], row["model"], row["requests"]) == ("local:live", "m", 5)
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    everything = cluster.log() + out.stdout + out.stderr + table.stdout + sums.stdout
    assert postgres_server.password not in everything
    started = next(e for e in log_events(cluster) if e.get("event") == "proxy_started")
    assert started["audit"] == url.replace(postgres_server.password, "***")


def test_postgresql_stopped_mid_run_loses_no_request_and_writing_resumes(
        cluster: Cluster, own_postgres: PostgresServer) -> None:
    """PostgreSQL stops under traffic: every request is still answered; audit rows wait up
    to store.queue_size and past it are dropped and counted; the operator gets one log line
    for each change (database gone, dropping started, database back, rows queued again) and
    a 503 from the audit API meanwhile, never the password; once the server is back the
    queued rows and new ones are written."""
    url = own_postgres.create_database("outage")
    cluster.start_sim("a", "m")
    cluster.start_proxy([("a", "m")], store={"url": url, "queue_size": 40},
                        health={"enabled": False})
    client = cluster.client()
    admin = f"http://127.0.0.1:{cluster.proxy_port}"

    def ask(n: int, tag: str) -> list[str]:
        ids = []
        for i in range(n):
            raw = client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": f"{tag} {i}"}])
            assert raw.parse().choices[0].message.content
            ids.append(raw.headers["x-request-id"])
        return ids

    def completed(ids: list[str]) -> int:
        out = cli("events", "--store", url, "--type", "REQUEST_COMPLETED", "--limit", "1000",
                  "--json")
        assert out.returncode == 0, out.stderr
        return len({e["request_id"] for e in json.loads(out.stdout)} & set(ids))

    before = ask(3, "before")
    wait_until(lambda: completed(before) == 3, 20, "the first requests written")
    own_postgres.stop()
    during = ask(30, "during")  # 4 rows each: 120 rows against a bound of 40

    def figures() -> tuple[float | None, float | None]:
        text = get(f"{admin}/metrics")[1]
        return (metric(text, "failover_proxy_audit_store_up"),
                metric(text, "failover_proxy_events_dropped_total"))

    # 40 rows (the first 10 requests') wait within the bound; the other 80 are dropped
    wait_until(lambda: figures() == (0.0, 120 - 40), 20,
               "the outage in the metrics (store down, rows past the bound dropped)")
    status, body = get(f"{admin}/admin/events")
    assert status == 503 and json.loads(body)["error"]["code"] == "audit_unavailable"
    assert own_postgres.password not in body and "***" in body
    status_view = cli("status", "--url", admin)
    assert status_view.returncode == 0 and "audit on, database away" in status_view.stdout
    assert own_postgres.password not in status_view.stdout
    gone = cli("events", "--store", url)
    assert gone.returncode == 1 and "cannot reach the audit database" in gone.stderr
    assert own_postgres.password not in gone.stderr + gone.stdout

    own_postgres.start()
    wait_until(lambda: metric(get(f"{admin}/metrics")[1], "failover_proxy_audit_store_up") == 1.0,
               30, "the writer back on PostgreSQL")
    wait_until(lambda: completed(during) == 10, 20, "the rows that waited written")
    after = ask(3, "after")
    wait_until(lambda: completed(after) == 3, 20, "the requests after the restart written")
    assert completed(during) == 10 and figures()[1] == 80
    status, body = get(f"{admin}/admin/events?limit=5")
    assert status == 200
    cluster.close()
    lines = [e["event"] for e in log_events(cluster)]
    for event in ("audit_store_unavailable", "audit_rows_dropping", "audit_store_available",
                  "audit_rows_queued_again"):
        assert lines.count(event) == 1, (event, lines.count(event))
    assert own_postgres.password not in cluster.log()


def test_the_store_password_shows_in_no_error(postgres_server: PostgresServer,
                                                tmp_path: Path) -> None:
    """A wrong URL in a config, a wrong password, a database that does not exist, a server
    that is not there: every message names the store, none holds its password."""
    secret = "s3cret-" + "x" * 10
    bad_port = f"postgresql://audit:{secret}@127.0.0.1:notaport/db"
    config = tmp_path / "c.yaml"
    config.write_text(f"store: {{url: '{bad_port}'}}\nproviders: [{{provider_id: p, instances: "
                      "[{id: a, base_url: 'http://127.0.0.1:9'}]}]\n")
    checked = cli("check", "--config", str(config))
    assert checked.returncode == 1 and "store.url" in checked.stderr
    wrong_password = postgres_server.url().replace(postgres_server.password, secret)
    no_database = postgres_server.url("nope")
    nobody_there = f"postgresql://audit:{secret}@127.0.0.1:{free_port()}/db"
    in_the_query = f"postgresql://audit@127.0.0.1:{free_port()}/db?password={secret}"
    outputs = [checked.stdout + checked.stderr]
    for url in (bad_port, wrong_password, nobody_there, in_the_query):
        out = cli("events", "--store", url)
        assert out.returncode == 1, out
        assert "postgresql://audit" in out.stderr and "***" in out.stderr
        outputs.append(out.stdout + out.stderr)
    out = cli("events", "--store", no_database, "--sum")
    assert out.returncode == 1 and '"nope" does not exist' in out.stderr
    outputs.append(out.stdout + out.stderr)
    text = "\n".join(outputs)
    assert secret not in text and postgres_server.password not in text


async def test_a_store_started_while_postgresql_is_down_waits_for_it(
        own_postgres: PostgresServer) -> None:
    """The proxy may start before its database: the store says it is unavailable, keeps
    the rows, and writes them once the server is up."""
    url = own_postgres.create_database("late")
    own_postgres.stop()
    changes: list[bool] = []
    store = AuditStore(url, on_available=changes.append)
    await store.start()
    try:
        assert store.available is False
        for n in range(5):
            store.event(time.time(), "ROUTE_PLANNED", f"early{n}", "p", None)
        with pytest.raises(StoreUnavailable):
            await store.query(EventQuery())
        await asyncio.to_thread(own_postgres.start)
        await wait_for(lambda: store.available, 30, "the writer on the started server")
        rows = await store.query(EventQuery(limit=10))
    finally:
        await store.close()
    assert sorted(r["request_id"] for r in rows) == [f"early{n}" for n in range(5)]
    assert changes == [False, True] and store.dropped == 0


def test_serve_refuses_a_store_written_by_a_newer_release_in_one_line(
        store_url: str, tmp_path: Path) -> None:
    """On either backend: one line saying why, exit 1, no traceback, no password."""
    db = open_database(store_url)
    db.execute("PRAGMA user_version = 999" if db.kind == "sqlite"
               else "UPDATE audit_schema SET version = 999")
    db.close()
    config = tmp_path / "c.yaml"
    config.write_text(f"store: {{url: '{store_url}'}}\nserver: {{port: {free_port()}}}\n"
                      "providers: [{provider_id: p, instances: [{id: a, base_url: "
                      "'http://127.0.0.1:9'}]}]\nhealth: {enabled: false}\n")
    out = cli("serve", "--config", str(config))
    assert out.returncode == 1
    assert out.stderr.startswith("serve: the audit store cannot be used: ")
    assert "newer than this release" in out.stderr and "Traceback" not in out.stderr
    password = url_password(store_url)
    assert password is None or password not in out.stdout + out.stderr


async def test_a_frozen_postgresql_blocks_no_request_and_the_audit_api_answers_in_time(
        own_postgres: PostgresServer, make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    """Every process of the server stopped (a database stuck on its disk: connections open,
    nothing answers): requests are answered as before, audit rows past the bound are
    dropped and counted, an audit read is a 503 after the reader's timeout instead of a
    hung request; thawed, the queued rows and new ones are written."""
    url = own_postgres.create_database("frozen")
    sim = await make_sim("m")
    proxy = await make_proxy(proxy_config([sim], store={"url": url, "queue_size": 40},
                                          health={"enabled": False}))
    store = proxy.app[STATE].recorder.store
    assert store is not None
    store.reader.timeout_s = 2.0
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0, timeout=30)

    async def ask(tag: str) -> str:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": tag}])
        assert raw.parse().choices[0].message.content
        return raw.headers["x-request-id"]

    first = await ask("before")
    assert [e["type"] for e in await store.query(EventQuery(request_id=first))][0] == \
        "REQUEST_COMPLETED"
    await asyncio.to_thread(own_postgres.freeze)
    try:
        for n in range(30):  # 4 rows each against a bound of 40
            await ask(f"during {n}")
        assert store.dropped >= 120 - 40
        async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/admin/events") as resp:
            assert resp.status == 503
            body = await resp.json()
        assert body["error"]["code"] == "audit_unavailable" and "no answer within 2 s" in \
            body["error"]["message"]
        assert own_postgres.password not in json.dumps(body)
    finally:
        await asyncio.to_thread(own_postgres.thaw)
    # the first request's 4 rows, then the 40 that waited within the bound; 80 dropped
    await wait_for(lambda: store.written == 4 + 40, 30, "the rows that waited written")
    assert store.dropped == 30 * 4 - 40
    last = await ask("after")
    trail = await store.query(EventQuery(request_id=last))
    assert {e["type"] for e in trail} == {"ROUTE_PLANNED", "ROUTE_VERIFIED", "REQUEST_COMPLETED"}


def test_serve_says_in_one_line_when_the_database_user_may_not_create_the_tables(
        postgres_server: PostgresServer, tmp_path: Path) -> None:
    """A login that may not create tables there (PostgreSQL 15 gives no one but the owner
    CREATE on the public schema): one line naming the store and PostgreSQL's reason."""
    import psycopg

    url = postgres_server.create_database("not_yours")
    secret = "lowly-" + "y" * 12
    with psycopg.connect(postgres_server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE lowly LOGIN PASSWORD '{secret}'")
    lowly = url.replace(f"audit:{postgres_server.password}", f"lowly:{secret}")
    config = tmp_path / "c.yaml"
    config.write_text(f"store: {{url: '{lowly}'}}\nserver: {{port: {free_port()}}}\n"
                      "providers: [{provider_id: p, instances: [{id: a, base_url: "
                      "'http://127.0.0.1:9'}]}]\nhealth: {enabled: false}\n")
    out = cli("serve", "--config", str(config))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("serve: the audit store cannot be used: postgresql://lowly:***@")
    assert "permission denied" in out.stderr and secret not in out.stdout + out.stderr
