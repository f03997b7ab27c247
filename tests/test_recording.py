"""What the recorder writes for a request: the audit rows the writer process derives from the
request's one entry are the rows the plan and the record describe (the plan row is the
plan's `as_dict`, the events carry the attempts and the usage as the request view reads
them), in the order the request's events happened; on both backends (`store_url`)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from typing import Any

import orjson

from proxy.api.inbound import CHAT, parse_request
from proxy.audit.eventstream import EventHub
from proxy.audit.metrics import Metrics
from proxy.audit.recorder import Recorder
from proxy.audit.schema import ATTEMPT_FIELDS, REQUIREMENT_FIELDS, USAGE_FIELDS, EventQuery
from proxy.audit.store import AuditStore
from proxy.audit.usage import Usage, priced
from proxy.config import parse_config
from proxy.engine.record import Attempt, RequestRecord
from proxy.failures import CONN_REFUSED
from proxy.health.registry import Registry
from proxy.health.states import READY
from proxy.routing.planner import Planner, RoutePlan
from tests.cluster import ROOT
from tests.test_audit import select


def _planner(store_url: str) -> Planner:
    config = parse_config({"store": {"url": store_url}, "providers": [
        {"provider_id": "p", "instances": [
            {"id": f"s{n}", "base_url": f"http://127.0.0.1:{20000 + n}/v1",
             "metadata": {"model": "m", "tags": ["coding"], "ctx": 8192 * (n + 1),
                          "capabilities": ["tools", "json"],
                          "cost": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}}
            for n in range(3)]}]}, "<test>")
    registry = Registry(config.instances)
    for state in registry.states:
        state.state = READY
    return Planner(config, registry)


def _plan(planner: Planner, request_id: str) -> RoutePlan:
    """A plan whose requirements have every kind of field filled (capabilities, tags from
    the header, a session), with scores of many decimals."""
    body = {"model": "auto", "messages": [{"role": "user", "content": "fix this python bug"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "response_format": {"type": "json_object"}, "max_tokens": 100}
    return planner.plan(parse_request(CHAT, orjson.dumps(body), request_id),
                        {"x-route-tags": "coding,frontend", "x-session-id": "sess-1"})


async def _recorded(store_url: str, *records: RequestRecord) -> AuditStore:
    store = AuditStore(store_url)
    await store.start()
    recorder = Recorder(Metrics(), store, EventHub())
    for record in records:
        recorder.completed(record)
    await store.flush()
    return store


async def test_a_rerouted_request_is_recorded_as_its_plan_and_attempts_say(
        store_url: str) -> None:
    """The selected instance refuses, the next answers: ROUTE_PLANNED, ROUTE_VERIFIED,
    REROUTED (and its lineage row), REQUEST_COMPLETED with both attempts and the usage, and
    a route_plans row holding exactly the plan's `as_dict`."""
    planner = _planner(store_url)
    plan = _plan(planner, "req-1")
    assert plan.requirements.capabilities and plan.requirements.tags and plan.fallback
    record = RequestRecord("req-1", model="auto", plan=plan, planned_at=time.time())
    selected, second = plan.selected, plan.fallback[0]
    assert selected is not None
    record.add(Attempt(selected, code=CONN_REFUSED, detail="connection refused",
                       elapsed_ms=0.4))
    record.add(Attempt(second, elapsed_ms=12.5))
    record.instance, record.ttfb_s, record.duration_s = second, 0.01234, 0.0151
    record.usage = priced(1234, 56, 7, planner.config.instances[1])
    assert record.usage.cost % 1e-8  # more decimals than the event keeps
    store = await _recorded(store_url, record)
    events = await store.query(EventQuery(request_id="req-1"))
    await store.close()

    assert [e["type"] for e in reversed(events)] == [
        "ROUTE_PLANNED", "ROUTE_VERIFIED", "REROUTED", "REQUEST_COMPLETED"]
    planned, verified, rerouted, completed = reversed(events)
    assert planned["instance"] == selected and planned["detail"] == {"fallback": plan.fallback}
    assert planned["ts"] == verified["ts"] == record.planned_at
    assert verified["instance"] == selected and verified["detail"] is None
    assert (rerouted["reason_code"], rerouted["from_instance"], rerouted["to_instance"]) == (
        CONN_REFUSED, selected, second)
    assert completed["instance"] == second
    assert completed["detail"] == {
        "status": 200, "outcome": "ok", "attempts": 2, "ttfb_ms": 12.34, "duration_ms": 15.1,
        "tried": [dataclasses.asdict(a) for a in record.tried],
        "usage": record.usage.as_dict()}
    (row,) = select(store_url, "SELECT plan_id, request_id, model, requirements, plan, selected,"
                    " final_instance, outcome, status, attempts, ttfb_ms, duration_ms,"
                    " prompt_tokens, completion_tokens, cached_tokens, cost, tokens_estimated"
                    " FROM route_plans")
    assert row[4] == orjson.dumps(plan.as_dict()).decode()  # the very text /admin/route shows
    assert row[3] == orjson.dumps(plan.requirements.as_dict()).decode()
    assert row[:3] + row[5:] == (plan.plan_id, "req-1", "auto", selected, second, "ok", 200, 2,
                                 12.34, 15.1, 1234, 56, 7, record.usage.cost, 0)
    assert select(store_url, "SELECT kind, request_id, from_instance, to_instance, reason_code"
                  " FROM lineage") == [("route_change", "req-1", selected, second, CONN_REFUSED)]


async def test_a_request_without_usage_and_a_blocked_one_keep_their_rows(
        store_url: str) -> None:
    """An answer without token figures (none on its row or event), a retry of a cut stream
    on another instance that was not planned first (no ROUTE_VERIFIED), and a request
    nothing could serve (ROUTE_BLOCKED before REQUEST_COMPLETED)."""
    planner = _planner(store_url)
    plain = RequestRecord("req-2", model="m", plan=_plan(planner, "req-2"),
                          planned_at=time.time())
    plan = plain.plan
    assert plan is not None and plan.selected is not None
    plain.add(Attempt(plan.fallback[0], mode="replay", elapsed_ms=3.0))
    plain.instance, plain.duration_s = plan.fallback[0], 0.004
    blocked = RequestRecord("req-3", model="nope", plan=_plan(planner, "req-3"),
                            planned_at=time.time(), status=503, outcome="route_blocked",
                            blocked="no instance serves nope")
    store = await _recorded(store_url, plain, blocked)
    events = await store.query(EventQuery(limit=100))
    await store.close()

    by_request: dict[str, list[dict[str, Any]]] = {}
    for event in reversed(events):
        by_request.setdefault(event["request_id"], []).append(event)
    assert [e["type"] for e in by_request["req-2"]] == ["ROUTE_PLANNED", "REQUEST_COMPLETED"]
    assert by_request["req-2"][-1]["detail"]["usage"] is None
    assert by_request["req-2"][-1]["detail"]["ttfb_ms"] is None
    assert [e["type"] for e in by_request["req-3"]] == [
        "ROUTE_PLANNED", "ROUTE_BLOCKED", "REQUEST_COMPLETED"]
    assert by_request["req-3"][1]["detail"]["message"] == "no instance serves nope"
    assert by_request["req-3"][-1]["detail"]["tried"] == []
    assert select(store_url, "SELECT request_id, prompt_tokens, cost, tokens_estimated"
                  " FROM route_plans ORDER BY request_id") == [
        ("req-2", None, None, None), ("req-3", None, None, None)]
    # rows, as the store counts them: (2 events + plan row) + (3 events + plan row)
    assert store.written == 7 and store.dropped == 0


def test_the_entry_fields_are_the_dataclasses_fields() -> None:
    """The tuples a request entry carries name every field of their classes, in the order
    the request view and RoutePlan.as_dict show them."""
    assert ATTEMPT_FIELDS == tuple(f.name for f in dataclasses.fields(Attempt))
    assert USAGE_FIELDS == tuple(f.name for f in dataclasses.fields(Usage))
    planner = _planner("sqlite:///unused.db")
    assert REQUIREMENT_FIELDS == tuple(_plan(planner, "r").requirements.as_dict())


def test_request_metrics_appear_with_their_first_figure_and_add_up() -> None:
    """Requests of one kind share their cells (looked up once per kind): the counts add up,
    and a series appears only with its first figure, as it did with one `labels()` call per
    metric: cached tokens and cost when non-zero, estimated tokens apart from stated ones,
    time to first byte only for a request that has one."""
    recorder = Recorder(Metrics(), None, EventHub())
    recorder.known_models = frozenset({"auto"})

    def served(ttfb_s: float | None, usage: Usage | None, model: str = "auto") -> None:
        record = RequestRecord("r", model=model, instance="p:s0", ttfb_s=ttfb_s,
                               duration_s=0.02, usage=usage)
        record.add(Attempt("p:s0", elapsed_ms=15.0))
        recorder.completed(record)

    served(0.01, Usage(10, 5, 0, 0.0))
    text = recorder.metrics.render().decode()
    assert 'failover_proxy_tokens_total{instance="p:s0",kind="prompt",model="auto"} 10.0' in text
    assert 'kind="cached"' not in text and "failover_proxy_cost_total{" not in text
    served(None, Usage(20, 7, 4, 0.5))
    served(0.03, Usage(3, 9, 0, 0.0, estimated=True))
    served(None, None, model="unknown-model")
    text = recorder.metrics.render().decode()
    for line in (
            'failover_proxy_requests_total{instance="p:s0",model="auto",outcome="ok"} 3.0',
            'failover_proxy_requests_total{instance="p:s0",model="other",outcome="ok"} 1.0',
            'failover_proxy_tokens_total{instance="p:s0",kind="prompt",model="auto"} 30.0',
            'failover_proxy_tokens_total{instance="p:s0",kind="completion",model="auto"} 12.0',
            'failover_proxy_tokens_total{instance="p:s0",kind="cached",model="auto"} 4.0',
            'failover_proxy_cost_total{instance="p:s0",model="auto"} 0.5',
            'failover_proxy_tokens_estimated_total{instance="p:s0",kind="prompt",model="auto"} 3.0',
            'failover_proxy_ttfb_seconds_count{instance="p:s0"} 2.0',
            'failover_proxy_request_duration_seconds_count{stream="false"} 4.0',
            "failover_proxy_overhead_seconds_count 4.0"):
        assert line in text, line
    assert "failover_proxy_cost_estimated_total{" not in text
    assert 'failover_proxy_tokens_total{instance="p:s0",kind="prompt",model="other"}' not in text


async def test_an_infinite_cost_loses_no_rows_of_its_batch(store_url: str) -> None:
    """A price the config takes (finite, if absurd: 1e300 per million tokens) times a
    billion tokens is an infinite cost, which JSON cannot hold (orjson writes null). The
    request's rows and those of the other request in the same batch are all written, the
    cost as NULL, as before the writer derived the rows (then the proxy rounded the cost
    first)."""
    planner = _planner(store_url)
    inf_cost = parse_config({"providers": [{"provider_id": "q", "instances": [
        {"id": "s", "base_url": "http://127.0.0.1:20009/v1",
         "metadata": {"model": "m", "cost": {"input_per_mtok": 1e300}}}]}]},
        "<test>").instances[0]
    records = []
    for n, usage in enumerate((priced(10**9, 5, 0, inf_cost), priced(10, 5, 0,
                                                                   planner.config.instances[0]))):
        record = RequestRecord(f"req-{n}", model="auto", plan=_plan(planner, f"req-{n}"),
                               planned_at=time.time())
        plan = record.plan
        assert plan is not None and plan.selected is not None
        record.add(Attempt(plan.selected, elapsed_ms=3.0))
        record.instance, record.duration_s, record.usage = plan.selected, 0.004, usage
        records.append(record)
    usages = [r.usage for r in records]
    assert usages[0] is not None and usages[0].cost == float("inf") and usages[1] is not None
    store = await _recorded(store_url, *records)
    events = await store.query(EventQuery(limit=100, type="REQUEST_COMPLETED"))
    await store.close()
    assert store.dropped == 0 and store.written == 2 * 4
    costs = {e["request_id"]: e["detail"]["usage"]["cost"] for e in events}
    assert costs == {"req-0": None, "req-1": round(usages[1].cost, 8)}
    assert select(store_url, "SELECT request_id, cost FROM route_plans ORDER BY request_id") \
        == [("req-0", None), ("req-1", usages[1].cost)]


async def test_a_nul_in_a_model_name_or_a_detail_loses_no_rows_of_its_batch(
        store_url: str) -> None:
    """A client's model name and an upstream's error text may hold a NUL (JSON's \\u0000,
    which the proxy accepts). PostgreSQL's text holds none: a column's value is written
    with the NUL as U+FFFD there (SQLite keeps it; in a JSON column it is an escape), and
    the batch, with the other request's rows, is written whole."""
    planner = _planner(store_url)
    model = "gpt\x00evil"
    assert parse_request(CHAT, orjson.dumps({"model": model, "messages": [
        {"role": "user", "content": "x"}]}), "r").model == model
    records = []
    for n in range(2):
        record = RequestRecord(f"req-{n}", model=model if n == 0 else "auto",
                               plan=_plan(planner, f"req-{n}"), planned_at=time.time())
        plan = record.plan
        assert plan is not None and plan.selected is not None
        record.add(Attempt(plan.selected, code=CONN_REFUSED, detail="said \x00 then hung up",
                           elapsed_ms=1.0))
        record.add(Attempt(plan.fallback[0], elapsed_ms=3.0))
        record.instance, record.duration_s = plan.fallback[0], 0.004
        records.append(record)
    store = await _recorded(store_url, *records)
    rerouted = await store.query(EventQuery(limit=100, type="REROUTED"))
    await store.close()
    assert store.dropped == 0 and store.written == 2 * 6
    nul = "\x00" if store_url.startswith("sqlite") else "\ufffd"
    assert {e["request_id"]: e["detail"]["detail"] for e in rerouted} == {
        "req-0": "said \x00 then hung up", "req-1": "said \x00 then hung up"}
    assert select(store_url, "SELECT request_id, model FROM route_plans ORDER BY request_id") \
        == [("req-0", f"gpt{nul}evil"), ("req-1", "auto")]


async def test_control_characters_a_client_sent_reach_the_events_table_escaped(
        store_url: str) -> None:
    """A model name with a newline and terminal escapes (a client's, in a blocked
    request's ROUTE_BLOCKED message and its route_plans row): `failover-proxy events` and
    its `--sum` print them escaped, one table row per event, nothing for the terminal to
    run."""
    planner = _planner(store_url)
    model = "x\x1b]0;owned\x07\x1b[2J\nFAKE 00:00:00 ROUTE_VERIFIED"
    blocked = RequestRecord("req-9", model=model, plan=_plan(planner, "req-9"),
                            planned_at=time.time(), status=503, outcome="route_blocked",
                            blocked=f"no instance serves {model}")
    store = await _recorded(store_url, blocked)
    await store.close()
    shown = []
    for extra in ((), ("--sum", "--since", "1h")):
        out = subprocess.run([sys.executable, "-m", "proxy", "events", "--store", store_url,
                              *extra], capture_output=True, text=True, cwd=ROOT, timeout=60,
                             check=False)
        assert out.returncode == 0, out.stderr
        assert "\x1b" not in out.stdout and "\x07" not in out.stdout
        assert not any(line.startswith("FAKE") for line in out.stdout.splitlines())
        shown.append(out.stdout)
    assert "serves x\\x1b]0;owned\\x07\\x1b[2J\\nFAKE" in shown[0]
