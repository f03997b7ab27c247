"""What a config file may say: one typed schema (pydantic v2) holding every check and default.

The sections (`ServerConfig`, `RoutingConfig`, ...) are both the schema of their part of
the file and the frozen objects the proxy reads (`config.timeouts.first_byte_s`).
Providers, instances and model groups are described in the file's shape (`ProviderSpec`,
`InstanceSpec`, `GroupSpec`); proxy/config/loader.py flattens them into the
`InstanceConfig` and `ModelGroup` the router uses. Unknown keys are refused; a key with no
value (`key:`, or `${VAR:-}` that expands to nothing) takes its default. A check that
fails raises `_expected(...)`, whose text the loader puts after "expected" in its message.
"""

from __future__ import annotations

import importlib.util
import ssl
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from proxy.audit.database import check_url, is_postgres
from proxy.failures import RETRY_KINDS

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_STORE_URL = "sqlite:///./data/audit.db"
#: Wire protocols: OpenAI's, or Anthropic's Messages API (proxy/providers/anthropic.py translates).
KINDS = ("openai", "anthropic")
#: Server implementations the prober knows how to ask (see proxy/providers/).
SERVER_KINDS = ("openai", "llamacpp", "ollama", "lmstudio", "vllm")
#: What an instance may declare it can do (`metadata.capabilities`) or state it cannot
#: (`metadata.unsupported`): what proxy/routing/requirements.py derives from a request (`tools`,
#: `json`, `vision`), and continuing a cut stream from an assistant prefill (`prefill`).
CAPABILITIES = ("json", "prefill", "tools", "vision")


# --------------------------------------------------------------------------- value types


def _expected(text: str) -> PydanticCustomError:
    """A validation error that says what was expected (the message keeps it verbatim)."""
    return PydanticCustomError("expected", "{expected}", {"expected": text})


def _not_bool(value: Any) -> Any:
    # pydantic reads true as 1; a boolean where a number belongs is a slip, not a number
    if isinstance(value, bool):
        raise _expected("a number")
    return value


def _listed(value: Any) -> Any:
    """A single string where a list of strings belongs is a list of one."""
    return [value] if isinstance(value, str) else value


def _one_of(options: tuple[str, ...], fold_case: bool = False) -> AfterValidator:
    def check(value: str) -> str:
        value = value.lower() if fold_case else value
        if value not in options:
            raise _expected("one of " + ", ".join(options))
        return value
    return AfterValidator(check)


def _http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _expected("an http:// or https:// URL with a host")
    return url


def _store_url(url: str) -> str:
    """`sqlite:///PATH` (a file) or `postgresql://USER:PASS@HOST:PORT/DB`."""
    problem = check_url(url)
    if problem:
        raise _expected(problem)
    if is_postgres(url) and importlib.util.find_spec("psycopg") is None:
        raise _expected("a sqlite:///PATH url, or psycopg 3 installed for a postgresql:// one "
                        "(pip install -e '.[postgres]' in the source tree, or "
                        "pip install 'psycopg[binary]>=3.1')")
    return url


def _fingerprint(value: Any) -> Any:
    """`auto` (learn at the first probe, then pin), `off`/false (no check) or `{model: X}`."""
    if value == "auto":
        return {"model": "auto"}
    if value is False or value == "off":
        return None
    if isinstance(value, dict):
        return value
    raise _expected("auto, off, or a mapping {model: NAME}")


Number = Annotated[float, BeforeValidator(_not_bool)]
Whole = Annotated[int, BeforeValidator(_not_bool)]
Strings = Annotated[tuple[str, ...], BeforeValidator(_listed)]
Capabilities = Annotated[frozenset[Annotated[str, _one_of(CAPABILITIES, fold_case=True)]],
                         BeforeValidator(_listed)]


class _Schema(BaseModel):
    """A mapping of the file: frozen, unknown keys refused, empty values unset."""

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _unset_empty(cls, data: Any) -> Any:
        # `key:` with no value, or `${VAR:-}` that is empty, means "not set": the default
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None and v != ""}
        return data


# --------------------------------------------------------------------------- sections


class ServerConfig(_Schema):
    """`server:`: where the proxy listens and who may call it."""

    host: str = "127.0.0.1"
    port: Whole = Field(8080, ge=0, le=65535, description="a port number (0-65535)")
    #: Client keys (`Authorization: Bearer KEY` or `x-api-key`); none: no client auth.
    api_keys: Annotated[Strings, AfterValidator(lambda keys: tuple(k for k in keys if k))] = \
        Field((), repr=False)
    admin_key: str | None = Field(None, repr=False)
    max_body_bytes: Whole = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    #: Put /metrics behind the admin key.
    metrics_auth: bool = False
    #: On SIGTERM: how long in-flight requests and streams may take to finish (seconds).
    shutdown_grace_s: Number = Field(30.0, ge=0)
    #: How long a client may take to send its request body (seconds).
    body_timeout_s: Number = Field(30.0, ge=0.01)


class Weights(_Schema):
    """`routing.weights`: how much each scoring term counts (see proxy/routing/scoring.py).
    Finite, and the terms every score counts (ready, latency, local, cost, error_rate) not
    all 0: a score is their weighted mean, which would otherwise be 0 / 0 or inf / inf."""

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True,
                              allow_inf_nan=False)

    ready: Number = Field(0.25, ge=0)
    tags: Number = Field(0.30, ge=0)
    latency: Number = Field(0.15, ge=0)
    local: Number = Field(0.20, ge=0)
    cost: Number = Field(0.10, ge=0)
    error_rate: Number = Field(0.20, ge=0)
    sticky: Number = Field(0.50, ge=0)
    #: How idle an instance is (`routing.balance: least_loaded`). At most `local`, so a
    #: busy local server still comes before an idle cloud one.
    load: Number = Field(0.20, ge=0)
    #: Times the share of the prompt whose prefix the instance served last (its KV cache).
    affinity: Number = Field(0.50, ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> Weights:
        if not self.ready + self.latency + self.local + self.cost + self.error_rate > 0:
            raise _expected("at least one of ready, latency, local, cost, error_rate above 0")
        return self


#: `routing.balance`: `least_loaded` scores how busy each instance is (proxy/routing/
#: scoring.py); `config_order` leaves equal instances in config order.
BALANCES = ("least_loaded", "config_order")


class AffinityConfig(_Schema):
    """`routing.affinity`: send a prompt back to the instance that served its prefix
    (proxy/routing/affinity.py)."""

    enabled: bool = True
    #: How long a prefix is remembered after it was last served (seconds). llama.cpp keeps
    #: a slot's cache until another prompt needs the slot, so this is a hint, not a promise.
    ttl_s: Number = Field(1800.0, ge=0)
    #: Most prefixes remembered at once (oldest forgotten first); each request adds one per
    #: message (or per prompt chunk) it has.
    max_entries: Whole = Field(100_000, ge=1)
    #: A known prefix shorter than this (characters of the request's JSON) earns no bonus:
    #: re-reading it costs less than waiting behind a busier server.
    min_prefix_chars: Whole = Field(512, ge=0)


class RoutingConfig(_Schema):
    """`routing:`: how plans are made (proxy/routing/planner.py, scoring.py); times in
    seconds."""

    prefer_local: bool = True
    session_header: Annotated[str, AfterValidator(str.lower)] = "x-session-id"
    sticky_ttl_s: Number = Field(1800.0, ge=0)
    strict_models: bool = False
    default_max_tokens: Whole = Field(1024, ge=1)
    weights: Weights = Weights()
    #: Most sessions remembered at once (oldest forgotten first).
    max_sessions: Whole = Field(100_000, ge=1)
    balance: Annotated[str, _one_of(BALANCES, fold_case=True)] = "least_loaded"
    affinity: AffinityConfig = AffinityConfig()


class HealthConfig(_Schema):
    """`health:`: background probes and the circuit breaker; times in seconds."""

    interval_s: Number = Field(5.0, ge=0.05)
    timeout_s: Number = Field(2.0, ge=0.01)
    #: First circuit cooldown; doubles on each failed half-open trial up to the cap.
    cooldown_s: Number = Field(1.0, ge=0.01)
    max_cooldown_s: Number = Field(16.0, ge=0.01)
    #: Consecutive timeouts or 5xx that open the circuit (refusals and resets open it at once).
    failure_threshold: Whole = Field(3, ge=1)
    #: Probes in the background; off, instances are judged by live traffic alone.
    enabled: bool = True


class TimeoutsConfig(_Schema):
    """Upstream waits, in seconds (see README: first_byte_s)."""

    connect_s: Number = Field(2.0, ge=0.01)
    first_byte_s: Number = Field(30.0, ge=0.01)
    idle_s: Number = Field(30.0, ge=0.01)
    total_s: Number = Field(600.0, ge=0.01)


class UpstreamConfig(_Schema):
    """Bounds on what an upstream may send (bytes); beyond them the attempt fails over with
    UPSTREAM_PROTOCOL_ERROR instead of buffering without end."""

    #: A whole (non-streamed) response body, after content decoding.
    max_response_bytes: Whole = Field(128 * 1024 * 1024, ge=1024)
    #: One server-sent event of a stream (its lines up to the blank line).
    max_event_bytes: Whole = Field(8 * 1024 * 1024, ge=1024)


class TlsConfig(_Schema):
    """An https:// instance's `tls:`: `ca_file` (PEM CAs trusted instead of the system's),
    `verify` (false: no certificate or host name check, for a test rig only),
    `client_cert` and `client_key` (PEM; the key may be inside the certificate file)."""

    ca_file: str | None = None
    verify: bool = True
    client_cert: str | None = None
    client_key: str | None = Field(None, repr=False)

    def context(self) -> ssl.SSLContext:
        """A client SSLContext with these settings; raises OSError or ssl.SSLError for an
        unreadable or invalid file."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert is not None:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


class RetryConfig(_Schema):
    """`retry:`: which failures move a request on, and how far."""

    max_attempts: Whole = Field(4, ge=1)
    #: Failure kinds (proxy/failures.py RETRY_KINDS) that move a request to another instance.
    on: Annotated[frozenset[Annotated[str, _one_of(tuple(RETRY_KINDS))]],
                  BeforeValidator(_listed)] = frozenset(RETRY_KINDS)
    #: Longest `Retry-After` the proxy waits out itself when no other instance can serve.
    max_retry_after_s: Number = Field(10.0, ge=0)
    #: Extra tries on the same instance for a transient failure (500, reset before any byte).
    same_instance_retries: Whole = Field(1, ge=0)
    #: How long a request waits for a slot on an instance at its max_concurrency before
    #: moving on to the next one (seconds).
    queue_wait_s: Number = Field(0.25, ge=0)

    def retries(self, code: str) -> bool:
        """Whether a failure with this reason code may be retried elsewhere."""
        return any(code in RETRY_KINDS[kind] for kind in self.on)


class StoreConfig(_Schema):
    """`store:`: the audit store (proxy/audit/store.py), SQLite or PostgreSQL by the URL."""

    url: Annotated[str, AfterValidator(_store_url)] = DEFAULT_STORE_URL
    #: Off: no audit rows are written (logs and metrics remain).
    enabled: bool = True
    retention_days: Number = Field(7.0, ge=0.001)
    max_rows: Whole = Field(1_000_000, ge=100)
    #: Rows waiting for the writer; beyond this they are dropped and counted.
    queue_size: Whole = Field(50_000, ge=1)


def _redis_url(url: str | None) -> str | None:
    if url is None:
        return None
    split = urlsplit(url)
    try:
        port, path = split.port, split.path.strip("/")
    except ValueError:
        port, path = None, "?"
    if (split.scheme not in ("redis", "rediss", "unix")
            or (split.scheme != "unix" and (not split.hostname or (split.netloc.endswith(":")
                                                                    and port is None)))
            or (split.scheme != "unix" and path and not path.isdigit())):
        raise _expected("a redis://HOST:PORT/DB url (or rediss://, unix://PATH)")
    return url


class StateConfig(_Schema):
    """`state:`: where replicas share what they learn (proxy/state); no `url`: in process."""

    #: redis://[:PASSWORD@]HOST:PORT/DB; a password in it is a secret (never echoed).
    url: Annotated[str | None, AfterValidator(_redis_url)] = Field(None, repr=False)
    #: Namespace of every key and of the channel: replicas of one fleet share it.
    prefix: str = Field("failover-proxy:", min_length=1, max_length=100)
    #: Every so often each replica compares its state with Redis and repairs both (seconds).
    resync_s: Number = Field(5.0, ge=0.1)
    #: Longest wait for one Redis call; past it Redis counts as down (seconds).
    timeout_s: Number = Field(0.25, ge=0.01)
    #: Changes waiting to be written; beyond this they are dropped (the resync repairs them).
    queue_size: Whole = Field(10_000, ge=1)


class LoggingConfig(_Schema):
    """`logging:`: structlog's output (proxy/logs.py)."""

    format: Annotated[str, _one_of(("json", "console"))] = "json"
    level: Annotated[str, _one_of(("debug", "info", "warning", "error"))] = "info"


# --------------------------------------------------------------------------- the file's shape


class CostSpec(_Schema):
    """`metadata.cost`: price per million tokens (the examples use US dollars); scoring
    counts 1 / (1 + input + output). Finite."""

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True,
                              allow_inf_nan=False)

    input_per_mtok: Number = Field(0.0, ge=0)
    output_per_mtok: Number = Field(0.0, ge=0)


class MetadataSpec(_Schema):
    """An instance's `metadata:`: what it serves and can do, for planning."""

    #: A label: the name clients may use, and the `model` sent upstream (see README).
    model: str | None = None
    tags: Strings = ()
    ctx: Whole | None = Field(None, ge=1)
    #: Known to work. A capability in neither set is unknown: allowed, ranked lower.
    capabilities: Capabilities = frozenset()
    #: Stated not to work: requests that need one never go to this instance.
    unsupported: Capabilities = frozenset()
    cost: CostSpec = CostSpec()


class PinSpec(_Schema):
    """`fingerprint: {model: X}`; `auto` is read as {model: auto}."""

    model: str


class InstanceSpec(_Schema):
    """One entry of a provider's `instances:`; None means "the provider's" (or guessed)."""

    id: str = Field(pattern=r"^[A-Za-z0-9._\-/]+$",
                    description="a string of letters, digits, '.', '_', '-' or '/'")
    base_url: Annotated[str, AfterValidator(_http_url)]
    enabled: bool = True
    local: bool | None = None
    kind: Annotated[str, _one_of(KINDS)] | None = None
    server: Annotated[str, _one_of(SERVER_KINDS)] | None = None
    fingerprint: Annotated[PinSpec | None, BeforeValidator(_fingerprint)] = \
        Field("auto", validate_default=True)
    metadata: MetadataSpec = MetadataSpec()
    api_key: str | None = Field(None, repr=False)
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    forward_client_auth: bool = False
    #: Most requests in flight to this instance at once (None: no cap).
    max_concurrency: Whole | None = Field(None, ge=1)
    tls: TlsConfig | None = None


class ProviderSpec(_Schema):
    """One entry of `providers:`: settings its instances inherit."""

    provider_id: str
    kind: Annotated[str, _one_of(KINDS)] = "openai"
    #: None: guessed from provider_id (`llama-cpp` -> llamacpp), else openai.
    server: Annotated[str, _one_of(SERVER_KINDS)] | None = None
    #: None: each instance's host decides (loopback, private, link-local: local).
    local: bool | None = None
    api_key: str | None = Field(None, repr=False)
    instances: list[InstanceSpec] = Field(min_length=1,
                                          description="a non-empty list of instances")


class GroupSpec(_Schema):
    """One entry of `models:`: a name clients may ask for."""

    instances: Strings = ()
    tags: Strings = ()
    strategy: Annotated[str, _one_of(("scored", "ordered"))] = "scored"


class DocumentSpec(_Schema):
    """The whole file."""

    server: ServerConfig = ServerConfig()
    routing: RoutingConfig = RoutingConfig()
    health: HealthConfig = HealthConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    retry: RetryConfig = RetryConfig()
    store: StoreConfig = StoreConfig()
    state: StateConfig = StateConfig()
    logging: LoggingConfig = LoggingConfig()
    models: dict[str, GroupSpec] = Field(default_factory=dict)
    providers: list[ProviderSpec] = Field(min_length=1,
                                          description="a non-empty list of providers")
