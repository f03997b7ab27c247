"""OpenTelemetry traces (issue 20, item 4), exported over OTLP/HTTP to a small receiver
started by the test (aiohttp, decoding the protobuf with opentelemetry-proto): one SERVER
span per request continuing the client's `traceparent`, one CLIENT span per attempt with
the GenAI attributes and our reason codes, and the attempt's context sent upstream."""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from proxy.api.state import STATE
from tests.conftest import MakeProxy, MakeSim, chat_body, proxy_config

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces, protobuf, every span kept."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.resources: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            self.resources.append(attributes(resource_spans.resource.attributes))
            for scope in resource_spans.scope_spans:
                self.spans.extend(scope.spans)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in kvs}


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Receiver]:
    rx = Receiver()
    await rx.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.url)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    yield rx
    assert rx.runner is not None
    await rx.runner.cleanup()


async def test_failover_request_is_one_server_span_with_an_attempt_span_per_instance(
        receiver: Receiver, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    a, b = await make_sim("model-a"), await make_sim("model-b")
    proxy = await make_proxy(proxy_config([a, b]))
    a.set_faults(["refuse"])  # up at the first probe, refusing by the request
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    async with http.post(f"{proxy.base_url}/chat/completions", json=chat_body(),
                         headers={"traceparent": traceparent}) as resp:
        assert resp.status == 200
        assert resp.headers["x-route-instance"] == "p1:s1"
        plan_id = resp.headers["x-route-plan-id"]
    await proxy.stop()  # flushes the span queue to the receiver

    spans = receiver.spans
    servers = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    clients = [s for s in spans if s.kind == Span.SPAN_KIND_CLIENT]
    assert len(servers) == 1 and len(clients) == 2, spans
    server = servers[0]
    assert server.trace_id.hex() == CLIENT_TRACE
    assert server.parent_span_id.hex() == CLIENT_SPAN
    assert server.name == "POST /v1/chat/completions"
    got = attributes(server.attributes)
    assert got["gen_ai.operation.name"] == "chat"
    assert got["gen_ai.request.model"] == "auto"
    assert got["gen_ai.response.model"] == "model-b"
    assert got["gen_ai.system"] == "openai"
    assert got["http.response.status_code"] == 200
    assert got["failover.instance"] == "p1:s1"
    assert got["failover.plan_id"] == plan_id
    assert got["failover.attempts"] == 2
    assert got["gen_ai.usage.input_tokens"] > 0 and got["gen_ai.usage.output_tokens"] > 0
    assert server.status.code != Status.STATUS_CODE_ERROR

    first, second = sorted(clients, key=lambda s: s.start_time_unix_nano)
    for span in (first, second):
        assert span.trace_id == server.trace_id
        assert span.parent_span_id == server.span_id
    one, two = attributes(first.attributes), attributes(second.attributes)
    assert one["failover.instance"] == "p0:s0" and one["failover.attempt"] == 1
    assert one["failover.reason_code"] == "CONN_REFUSED"
    assert one["error.type"] == "CONN_REFUSED"
    assert first.status.code == Status.STATUS_CODE_ERROR
    assert (one["server.address"], one["server.port"]) == ("127.0.0.1", a.port)
    assert one["gen_ai.request.model"] == "model-a"
    assert first.name == "chat model-a"
    assert two["failover.instance"] == "p1:s1" and two["failover.attempt"] == 2
    assert "failover.reason_code" not in two
    assert two["gen_ai.response.model"] == "model-b"
    assert two["failover.plan_id"] == plan_id
    assert second.status.code != Status.STATUS_CODE_ERROR
    assert receiver.resources[0]["service.name"] == "failover-proxy"

    # The upstream that answered got the answering attempt's context.
    sent = b.stats.last_headers["traceparent"]
    version, trace_id, parent_id, _flags = sent.split("-")
    assert (version, trace_id, parent_id) == ("00", CLIENT_TRACE, second.span_id.hex())


async def test_request_with_every_attempt_failed_is_an_error_span_with_each_reason(
        receiver: Receiver, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    a = await make_sim("model-a")
    proxy = await make_proxy(proxy_config([a]))
    a.set_faults(["status=500"])
    async with http.post(f"{proxy.base_url}/chat/completions", json=chat_body()) as resp:
        assert resp.status == 502
    await proxy.stop()
    server = next(s for s in receiver.spans if s.kind == Span.SPAN_KIND_SERVER)
    assert len(server.parent_span_id) == 0  # no traceparent from the client: a new trace
    got = attributes(server.attributes)
    assert got["http.response.status_code"] == 502
    assert server.status.code == Status.STATUS_CODE_ERROR
    attempts = [attributes(s.attributes) for s in receiver.spans
                if s.kind == Span.SPAN_KIND_CLIENT]
    assert [(x["failover.attempt"], x["failover.reason_code"]) for x in attempts] == [
        (1, "UPSTREAM_5XX"), (2, "UPSTREAM_5XX")]  # the same-instance retry is an attempt
    assert a.stats.last_headers["traceparent"].split("-")[1] == server.trace_id.hex()


async def test_without_otel_variables_nothing_is_traced_nor_sent_upstream(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    a = await make_sim("model-a")
    proxy = await make_proxy(proxy_config([a]))
    assert proxy.app[STATE].tracing is None
    async with http.post(f"{proxy.base_url}/chat/completions", json=chat_body(),
                         headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}) as resp:
        assert resp.status == 200
    assert "traceparent" not in a.stats.last_headers


async def test_stream_cut_and_continued_has_a_prefill_attempt_span_after_the_cut(
        receiver: Receiver, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    a = await make_sim("twin", words=40, faults=["die_after=10"])
    b = await make_sim("twin", words=40)
    config = proxy_config([a, b])
    config = dataclasses.replace(config, instances=(
        config.instances[0], dataclasses.replace(config.instances[1],
                                                 capabilities=frozenset({"prefill"}))))
    proxy = await make_proxy(config)
    body = chat_body(stream=True, stream_options={"include_usage": True})
    async with http.post(f"{proxy.base_url}/chat/completions", json=body) as resp:
        text = await resp.text()
    assert text.endswith("data: [DONE]\n\n")
    await proxy.stop()
    server = next(s for s in receiver.spans if s.kind == Span.SPAN_KIND_SERVER)
    got = attributes(server.attributes)
    assert got["failover.instance"] == "p1:s1" and got["failover.attempts"] == 2
    assert got["gen_ai.usage.output_tokens"] > 0
    attempts = sorted((s for s in receiver.spans if s.kind == Span.SPAN_KIND_CLIENT),
                      key=lambda s: s.start_time_unix_nano)
    modes = [(attributes(s.attributes)["failover.mode"],
              attributes(s.attributes).get("failover.reason_code")) for s in attempts]
    assert modes == [("fresh", "STREAM_CUT"), ("prefill", None)]
    assert attempts[0].end_time_unix_nano <= attempts[1].start_time_unix_nano
    assert b.stats.last_headers["traceparent"].split("-")[2] == attempts[1].span_id.hex()
