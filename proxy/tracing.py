"""OpenTelemetry traces: a span per request and one per attempt, when asked for.

On when the `otel` extra is installed (opentelemetry-sdk and
opentelemetry-exporter-otlp-proto-http) and the environment asks for OTLP:
`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set, or
`OTEL_TRACES_EXPORTER=otlp`; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` keep
it off. Everything else is the SDK's own reading of the standard variables (endpoint,
headers, timeout, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*` batching, `OTEL_SERVICE_NAME`
(default here: failover-proxy), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_PROPAGATORS`;
opentelemetry-python 1.45 docs, "Environment variables"). Spans go out over OTLP/HTTP
protobuf only.

Off, it costs nothing: opentelemetry is not imported, and the request path checks one
`tracing is None` per layer (endpoint, attempt, upstream send).

Spans (OpenTelemetry semantic conventions: HTTP for the server span, GenAI 1.36 for
`gen_ai.*`):
- `POST /v1/chat/completions` (SERVER), the client's request, continuing the client's
  `traceparent`: `http.request.method`, `url.path`, `http.response.status_code`,
  `gen_ai.operation.name` (chat, text_completion, embeddings), `gen_ai.request.model`
  (as the client asked), `gen_ai.response.model` and `gen_ai.system` of the instance that
  answered, `gen_ai.usage.input_tokens` / `output_tokens` when the upstream stated usage,
  and ours: `failover.request_id`, `failover.plan_id`, `failover.instance` (who
  answered), `failover.attempts`, `failover.outcome`. Status ERROR on a 5xx or a stream
  failed after its start (`error.type` = the outcome).
- `chat MODEL` (CLIENT), one per attempt written upstream, a child of the request span,
  whose context is the `traceparent` the upstream receives: `gen_ai.*` as above for
  this instance (`gen_ai.request.model` is the name sent to it, `gen_ai.system` its
  provider: openai, llamacpp, ollama, vllm, lmstudio, anthropic), `server.address`,
  `server.port`, `failover.instance`, `failover.attempt` (1 for the first attempt
  written upstream), `failover.mode` (fresh, prefill, replay), `failover.plan_id`, and
  for a failed attempt `failover.reason_code` and `error.type` (the reason code, e.g.
  CONN_REFUSED) with status ERROR. `gen_ai.response.model` is the model the instance is
  pinned to (its fingerprint; an answer naming another fails over), else the name sent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from yarl import URL

from proxy import __version__
from proxy.api.inbound import CHAT, COMPLETIONS, EMBEDDINGS
from proxy.engine.record import STREAM_FAILED

if TYPE_CHECKING:
    from collections.abc import Mapping

    from proxy.engine.record import Attempt, RequestRecord
    from proxy.health.instance import InstanceState

log = structlog.get_logger("proxy.tracing")
#: gen_ai.operation.name by endpoint (GenAI semantic conventions' well-known values).
OPERATIONS = {CHAT: "chat", COMPLETIONS: "text_completion", EMBEDDINGS: "embeddings"}
PATHS = {CHAT: "/v1/chat/completions", COMPLETIONS: "/v1/completions",
         EMBEDDINGS: "/v1/embeddings"}


def wanted(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for OTLP traces (see the module doc)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",")}
    if "none" in exporters:
        return False
    return ("otlp" in exporters or bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
            or bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")))


def setup(env: Mapping[str, str] | None = None) -> Tracing | None:
    """The process's tracing when the environment asks for it and the `otel` extra is
    installed, else None (with one warning when asked for but not installed)."""
    env = os.environ if env is None else env
    if not wanted(env):
        return None
    try:
        return Tracing(env)
    except ImportError as exc:
        log.warning("tracing_unavailable", reason=f"{exc}; install the otel extra: "
                    "pip install -e '.[otel]' in the source tree")
        return None


@dataclass(slots=True)
class RequestTrace:
    """The live span of one request (kept on its RequestRecord), and what its attempts
    tell it about the answer."""

    tracing: Tracing
    span: Any
    token: Any
    response_model: str | None = None
    system: str | None = None

    def end(self, record: RequestRecord) -> None:
        """Close the span with what the record says (see Tracing.end_request)."""
        self.tracing.end_request(self, record)


@dataclass(slots=True)
class AttemptTrace:
    """The live span of one attempt."""

    span: Any
    token: Any


class Tracing:
    """A tracer provider exporting over OTLP/HTTP, and the proxy's span making."""

    def __init__(self, env: Mapping[str, str]) -> None:
        """Raises ImportError when the `otel` extra is not installed."""
        from opentelemetry import context, propagate, trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        attributes: dict[str, str] = {"service.version": __version__}
        if not env.get("OTEL_SERVICE_NAME") and \
                "service.name=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
            attributes["service.name"] = "failover-proxy"
        # Its own provider, not the global one: the app owns it and shuts it down.
        self.provider = TracerProvider(resource=Resource.create(attributes))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("failover-proxy", __version__)
        self._context, self._propagate, self._trace = context, propagate, trace
        self._server, self._client = trace.SpanKind.SERVER, trace.SpanKind.CLIENT
        self._error = trace.StatusCode.ERROR
        self._status = trace.Status
        #: (server.address, server.port) by api_base, parsed once.
        self._servers: dict[str, tuple[str, int]] = {}

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout) and stop."""
        self.provider.shutdown()

    # ------------------------------------------------------------------ request

    def start_request(self, headers: Mapping[str, str], endpoint: str,
                      record: RequestRecord) -> None:
        """Open the request's SERVER span, the child of the client's `traceparent` when
        it sent one, and make it the current context."""
        parent = self._propagate.extract(headers)
        span = self.tracer.start_span(f"POST {PATHS[endpoint]}", context=parent,
                                      kind=self._server, attributes={
                                          "http.request.method": "POST",
                                          "url.path": PATHS[endpoint],
                                          "gen_ai.operation.name": OPERATIONS[endpoint],
                                          "failover.request_id": record.request_id})
        token = self._context.attach(self._trace.set_span_in_context(span, parent))
        record.trace = RequestTrace(self, span, token)

    def end_request(self, trace: RequestTrace, record: RequestRecord) -> None:
        """Close the request's span with what the record says (called once, by the
        recorder, when the request is over)."""
        span = trace.span
        attributes: dict[str, str | int] = {"http.response.status_code": record.status,
                                            "failover.attempts": record.sent,
                                            "failover.outcome": record.outcome}
        if record.model is not None:
            attributes["gen_ai.request.model"] = record.model
        if record.plan is not None:
            attributes["failover.plan_id"] = record.plan.plan_id
        if record.instance is not None:
            attributes["failover.instance"] = record.instance
        if trace.response_model is not None:
            attributes["gen_ai.response.model"] = trace.response_model
        if trace.system is not None:
            attributes["gen_ai.system"] = trace.system
        _usage(attributes, record)
        span.set_attributes(attributes)
        if record.status >= 500 or record.outcome == STREAM_FAILED:
            span.set_attribute("error.type", record.outcome)
            span.set_status(self._status(self._error, record.stream_error or record.outcome))
        span.end()
        self._context.detach(trace.token)

    # ------------------------------------------------------------------ attempt

    def start_attempt(self, record: RequestRecord, endpoint: str, inst: InstanceState,
                      attempt: Attempt) -> AttemptTrace:
        """Open an attempt's CLIENT span under the request's and make it current, so
        that `inject` sends its context upstream."""
        cfg = inst.config
        server = self._servers.get(cfg.api_base)
        if server is None:
            url = URL(cfg.api_base)
            server = self._servers[cfg.api_base] = (url.host or "", url.port or 0)
        model = inst.request_model
        operation = OPERATIONS[endpoint]
        attributes: dict[str, str | int] = {
            "gen_ai.operation.name": operation, "gen_ai.system": inst.provider.name,
            "server.address": server[0], "server.port": server[1],
            "failover.instance": inst.id, "failover.attempt": record.sent + 1,
            "failover.mode": attempt.mode}
        if model is not None:
            attributes["gen_ai.request.model"] = model
        if record.plan is not None:
            attributes["failover.plan_id"] = record.plan.plan_id
        span = self.tracer.start_span(f"{operation} {model or inst.id}", kind=self._client,
                                      attributes=attributes)
        token = self._context.attach(self._trace.set_span_in_context(span))
        return AttemptTrace(span, token)

    def end_attempt(self, trace: AttemptTrace, record: RequestRecord, inst: InstanceState,
                    attempt: Attempt) -> None:
        """Close an attempt's span with its outcome: the reason code when it failed, the
        model and usage when it answered."""
        span = trace.span
        if attempt.code is not None:
            span.set_attributes({"failover.reason_code": attempt.code,
                                 "error.type": attempt.code})
            span.set_status(self._status(self._error, f"{attempt.code}: {attempt.detail}"))
        elif not any(entry is attempt for entry in reversed(record.attempts)):
            # never recorded: cancelled (the client went away) before it ended
            span.set_attribute("error.type", "cancelled")
            span.set_status(self._status(self._error, "cancelled: the client went away"))
        else:
            pin = inst.pin
            model = (pin.name if pin is not None else None) or inst.request_model
            attributes: dict[str, str | int] = {}
            if model is not None:
                attributes["gen_ai.response.model"] = model
            _usage(attributes, record)
            span.set_attributes(attributes)
            request = record.trace
            if request is not None:
                request.response_model, request.system = model, inst.provider.name
        span.end()
        self._context.detach(trace.token)

    def inject(self, headers: Mapping[str, str]) -> dict[str, str]:
        """A copy of an upstream request's headers with the current context's
        `traceparent` (and `tracestate`, baggage: OTEL_PROPAGATORS)."""
        carrier = dict(headers)
        self._propagate.inject(carrier)
        return carrier


def _usage(attributes: dict[str, str | int], record: RequestRecord) -> None:
    usage = record.usage
    # (an estimate is no usage: the GenAI attributes are the counts a server stated)
    if usage is not None and not usage.estimated:
        attributes["gen_ai.usage.input_tokens"] = usage.prompt
        attributes["gen_ai.usage.output_tokens"] = usage.completion
