"""What the status page and `failover-proxy status` read: the live event stream, the status
document, the request view, and the page's own files, through the proxy on a real port."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import aiohttp
import orjson

from proxy.api.state import STATE
from proxy.audit.eventstream import QUEUE_SIZE, EventHub
from proxy.audit.metrics import Metrics
from proxy.audit.tally import SAMPLE_EVERY_S, WINDOW_S, Tally
from proxy.config import parse_config
from tests.conftest import MakeProxy, MakeSim, RunningProxy, chat_body, proxy_config

ADMIN = "adm-key-for-status-tests"
CLIENT = "client-key-for-status-tests"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


class EventReader:
    """Reads an open /admin/events/stream response event by event (aiohttp parses the
    HTTP; the SSE blocks are split on their blank lines)."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.buffer = b""
        self.raw = b""

    async def next(self) -> tuple[str, dict[str, Any]] | None:
        """(event name, data) of the next event with data; None at the end of the stream."""
        while True:
            end = self.buffer.find(b"\n\n")
            if end >= 0:
                block, self.buffer = self.buffer[:end], self.buffer[end + 2:]
                fields = dict(line.split(b": ", 1) for line in block.split(b"\n")
                              if b": " in line and not line.startswith(b":"))
                if b"data" in fields:
                    return fields.get(b"event", b"message").decode(), orjson.loads(fields[b"data"])
                continue
            chunk = await self.resp.content.readany()
            if not chunk:
                return None
            self.raw += chunk
            self.buffer += chunk

    async def until_any(self) -> tuple[str, dict[str, Any]]:
        item = await self.next()
        assert item is not None, "the stream ended"
        return item

    async def until(self, wanted: str, **match: Any) -> dict[str, Any]:
        while True:
            item = await self.next()
            assert item is not None, f"the stream ended before a {wanted} event"
            name, data = item
            if name == wanted and all(data.get(k) == v for k, v in match.items()):
                return data


def secured(sims: list[Any], **sections: Any) -> Any:
    return proxy_config(sims, server={"admin_key": ADMIN, "api_keys": [CLIENT]},
                        health={"enabled": False}, **sections)


async def chat(http: aiohttp.ClientSession, proxy: RunningProxy, **kw: Any) -> aiohttp.ClientResponse:
    async with http.post(f"{proxy.base_url}/chat/completions", json=chat_body(**kw),
                         headers={"Authorization": f"Bearer {CLIENT}"}) as resp:
        await resp.read()
        return resp


async def test_failover_reaches_the_event_stream_with_reason_and_request_id(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    a, b = await make_sim(), await make_sim()
    proxy = await make_proxy(secured([a, b]))
    async with http.get(f"{proxy.url}/admin/events/stream", headers=AUTH) as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        a.set_faults(["refuse"])
        resp = await chat(http, proxy)
        assert resp.headers["x-route-instance"] == "p1:s1"
        event = await EventReader(stream).until("REROUTED",
                                                request_id=resp.headers["x-request-id"])
    assert event["reason_code"] == "CONN_REFUSED"
    assert (event["from_instance"], event["to_instance"]) == ("p0:s0", "p1:s1")
    assert event["plan_id"] == resp.headers["x-route-plan-id"]


async def test_event_stream_needs_the_admin_key_and_never_carries_a_key(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    a = await make_sim(faults=["leak_auth"])
    b = await make_sim()
    proxy = await make_proxy(secured([a, b]))
    for headers, status in (({}, 401), ({"Authorization": f"Bearer {CLIENT}"}, 403),
                            ({"Authorization": "Bearer wrong"}, 401)):
        async with http.get(f"{proxy.url}/admin/events/stream", headers=headers) as resp:
            assert resp.status == status
            assert (await resp.json())["error"]["message"]
    upstream_key = "sk-upstream-secret-1234567890"
    doc_providers = [{"provider_id": "p0", "instances": [
        {"id": "s0", "base_url": a.base_url, "api_key": upstream_key,
         "metadata": {"model": a.model}}]},
        {"provider_id": "p1", "instances": [{"id": "s1", "base_url": b.base_url,
                                             "metadata": {"model": b.model}}]}]
    config = parse_config({"server": {"admin_key": ADMIN, "api_keys": [CLIENT]},
                           "health": {"enabled": False}, "providers": doc_providers}, "<test>")
    proxy = await make_proxy(config)
    async with http.get(f"{proxy.url}/admin/events/stream", headers=AUTH) as stream:
        resp = await chat(http, proxy)  # s0 answers 401 quoting the key it was sent
        assert resp.headers["x-route-instance"] == "p1:s1"
        reader = EventReader(stream)
        await reader.until("REROUTED", reason_code="UPSTREAM_AUTH")
    assert upstream_key.encode() not in reader.raw
    assert ADMIN.encode() not in reader.raw


async def test_a_reader_that_stops_reading_costs_a_bounded_queue_and_learns_what_it_missed(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    a = await make_sim()
    proxy = await make_proxy(secured([a]))
    hub = proxy.app[STATE].recorder.hub
    assert hub is not None
    async with http.get(f"{proxy.url}/admin/events/stream", headers=AUTH) as stream:
        await asyncio.sleep(0)
        while not hub.subscribers:
            await asyncio.sleep(0.01)
        (sub,) = hub.subscribers
        # 20,000 events of 2 KB while the client reads nothing: far beyond what socket
        # buffers hold, so the server's writes stall and the rest waits in (or is dropped
        # from) the subscriber's queue.
        for n in range(20_000):
            hub.publish(float(n), "REROUTED", f"r{n}", None, "p0:s0", "TIMEOUT", "p0:s0",
                        None, {"detail": "x" * 2000})
            assert sub.queue.qsize() <= QUEUE_SIZE
            if n % 500 == 0:
                await asyncio.sleep(0)  # let the handler write what the socket takes
        assert sub.missed > 0
        reader = EventReader(stream)
        seen = 0
        missed = 0
        while True:
            name, data = await reader.until_any()
            if name == "missed":
                missed += data["missed"]
            else:
                seen += 1
            if data.get("request_id") == "r19999":
                break
    assert missed > 0
    # Every event was either delivered or counted as missed (the first ones may have been
    # the backlog of recent events, which the stream begins with).
    assert seen + missed >= 20_000


async def test_event_stream_ends_cleanly_when_the_proxy_shuts_down(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    a = await make_sim()
    proxy = await make_proxy(secured([a]))
    async with http.get(f"{proxy.url}/admin/events/stream", headers=AUTH) as stream:
        reader = EventReader(stream)
        stopping = asyncio.ensure_future(proxy.stop())
        name, _ = await reader.until_any()
        assert name == "shutdown"
        assert await reader.next() is None  # a clean end: the chunked body is complete
        await stopping
    assert not proxy.app[STATE].recorder.hub.subscribers  # type: ignore[union-attr]


async def test_a_reconnecting_reader_resumes_after_the_last_event_it_saw(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    a = await make_sim()
    proxy = await make_proxy(secured([a]))
    hub = proxy.app[STATE].recorder.hub
    assert hub is not None
    for n in range(5):
        hub.publish(float(n), "REROUTED", f"r{n}", None, "p0:s0", "TIMEOUT", "p0:s0", None)
    third = [e for e in hub.recent if e["request_id"] == "r2"][0]["id"]
    async with http.get(f"{proxy.url}/admin/events/stream",
                        headers={**AUTH, "Last-Event-ID": str(third)}) as stream:
        reader = EventReader(stream)
        first = await reader.until("REROUTED")
        assert first["request_id"] == "r3"


async def test_status_shows_instances_with_reasons_and_the_hours_tallies(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    a, b, c = await make_sim(), await make_sim(), await make_sim()
    proxy = await make_proxy(secured([a, b, c]))
    async with http.post(f"{proxy.url}/admin/instances/p2:s2/drain", headers=AUTH) as resp:
        assert resp.status == 200
    a.set_faults(["refuse"])
    for _ in range(3):
        assert (await chat(http, proxy)).status == 200
    async with http.get(f"{proxy.url}/admin/status", headers=AUTH) as resp:
        assert resp.status == 200
        doc = await resp.json()
    rows = {r["id"]: r for r in doc["instances"]}
    assert rows["p2:s2"]["state"] == "DRAINED" and rows["p2:s2"]["reason"] == "drained by admin"
    assert rows["p0:s0"]["circuit"] == "open"
    assert "CONN_REFUSED" in rows["p0:s0"]["reason"]
    assert rows["p1:s1"]["inflight"] == 0 and rows["p1:s1"]["successes"] == 3
    hour = doc["last_hour"]
    assert hour["requests"] == 3 and hour["outcomes"] == {"ok": 3}
    assert hour["reroutes"]["CONN_REFUSED"] == 1  # then the open circuit keeps p0 aside
    assert [e["type"] for e in doc["recent"]][:1] == ["REROUTED"]
    assert doc["audit"] is True and doc["inflight"] == 0


def test_tallies_cover_the_last_hour_only() -> None:
    metrics, hub = Metrics(), EventHub()
    tally = Tally(metrics, hub, now=0.0)
    minute = SAMPLE_EVERY_S
    for n in range(1, 91):  # 90 minutes, one request and one reroute a minute
        metrics.requests.labels("auto", "p0:s0", "ok").inc()
        hub.publish(n * minute, "REROUTED", None, None, "p0:s0", "TIMEOUT", "p0:s0", "p1:s1")
        tally.sample(n * minute)
    hour = tally.last_hour(90 * minute)
    assert hour["window_s"] == WINDOW_S
    assert hour["requests"] == 60 and hour["reroutes"] == {"TIMEOUT": 60}
    young = Tally(Metrics(), EventHub(), now=0.0)
    assert young.last_hour(5 * minute)["window_s"] == 5 * minute  # since start


async def test_request_view_shows_the_plan_every_attempt_and_who_answered(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    a, b = await make_sim(), await make_sim()
    config = secured([a, b, a])  # p2:s2 is disabled in the config: rejected in the plan
    instances = list(config.instances)
    instances[2] = replace(instances[2], enabled=False)
    config = replace(config, instances=tuple(instances))
    proxy = await make_proxy(config)
    a.set_faults(["status=500"])
    resp = await chat(http, proxy)
    assert resp.status == 200 and resp.headers["x-route-attempts"] == "3"
    request_id = resp.headers["x-request-id"]
    async with http.get(f"{proxy.url}/admin/requests/{request_id}", headers=AUTH) as view:
        assert view.status == 200
        doc = await view.json()
    (story,) = doc["requests"]
    assert story["plan"]["selected"] == "p0:s0" and story["plan"]["fallback"] == ["p1:s1"]
    assert story["plan"]["rejected"] == {"p2:s2": "disabled"}
    assert set(story["plan"]["scores"]) == {"p0:s0", "p1:s1"}
    assert story["plan"]["reasons"]["p0:s0"]
    # a 500 is retried once on the same instance, then the request moves on
    assert [(t["instance"], t["code"]) for t in story["tried"]] == [
        ("p0:s0", "UPSTREAM_5XX"), ("p0:s0", "UPSTREAM_5XX"), ("p1:s1", None)]
    assert all(t["elapsed_ms"] >= 0 for t in story["tried"])
    assert story["final_instance"] == "p1:s1" and story["outcome"] == "ok"
    assert story["status"] == 200 and story["attempts"] == 3
    types = [e["type"] for e in story["events"]]
    assert types[0] == "ROUTE_PLANNED" and types[-1] == "REQUEST_COMPLETED"
    assert "REROUTED" in types


async def test_request_view_of_a_failed_request_lists_its_attempts(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    a = await make_sim(faults=["status=503"])
    proxy = await make_proxy(secured([a]))
    resp = await chat(http, proxy)
    assert resp.status == 502
    async with http.get(f"{proxy.url}/admin/requests/{resp.headers['x-request-id']}",
                        headers=AUTH) as view:
        (story,) = (await view.json())["requests"]
    assert story["final_instance"] is None and story["outcome"] == "all_attempts_failed"
    assert [t["code"] for t in story["tried"]] == ["UPSTREAM_5XX", "UPSTREAM_5XX"]


async def test_request_view_errors_are_openai_shaped(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    a = await make_sim()
    proxy = await make_proxy(secured([a]))
    async with http.get(f"{proxy.url}/admin/requests/nope", headers=AUTH) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "request_not_found"
    async with http.get(f"{proxy.url}/admin/requests/{'x' * 129}", headers=AUTH) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "request_id"
    async with http.get(f"{proxy.url}/admin/requests/nope") as resp:
        assert resp.status == 401
    async with http.get(f"{proxy.url}/admin/status",
                        headers={"Authorization": f"Bearer {CLIENT}"}) as resp:
        assert resp.status == 403
    off = await make_proxy(proxy_config([a], store={"enabled": False}))
    async with http.get(f"{off.url}/admin/requests/nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "audit_off"


async def test_the_page_is_served_without_a_key_and_holds_no_data(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    a = await make_sim()
    proxy = await make_proxy(secured([a]))
    async with http.get(f"{proxy.url}/ui") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/html")
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        page = await resp.text()
    assert "/ui/app.js" in page and "/ui/style.css" in page
    assert "p0:s0" not in page
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        async with http.get(f"{proxy.url}/ui/{name}") as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith(kind)
    async with http.get(f"{proxy.url}/ui/../proxy/app.py") as resp:
        assert resp.status == 404
    async with http.get(f"{proxy.url}/ui/secrets.txt") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["message"] == "Unknown path: /ui/secrets.txt"
    async with http.get(f"{proxy.url}/", allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"] == "/ui"
