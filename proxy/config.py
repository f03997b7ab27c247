"""The proxy's configuration: plain frozen dataclasses, loaded from YAML or JSON.

Every validation error names the file, the key path and what was expected, and never
echoes a secret's value. `${VAR}` (and `${VAR:-default}`) in any string is read from the
environment; a missing variable is an error naming it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import yaml

from proxy.failures import RETRY_KINDS

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_STORE_URL = "sqlite:///./data/audit.db"
#: Server implementations the prober knows how to ask (see proxy/health.py).
SERVER_KINDS = ("openai", "llamacpp", "ollama", "lmstudio", "vllm")
#: What an instance may declare it can do (`metadata.capabilities`) or state it cannot
#: (`metadata.unsupported`): what proxy/requirements.py derives from a request (`tools`,
#: `json`, `vision`), and continuing a cut stream from an assistant prefill (`prefill`).
CAPABILITIES = ("json", "prefill", "tools", "vision")
SECRET_KEYS = frozenset({"api_key", "api_keys", "admin_key", "headers"})
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    admin_key: str | None = field(default=None, repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: Put /metrics behind the admin key.
    metrics_auth: bool = False
    #: On SIGTERM: how long in-flight requests and streams may take to finish.
    shutdown_grace_s: float = 30.0
    #: How long a client may take to send its request body.
    body_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class Weights:
    """How much each scoring term counts (see proxy/scoring.py)."""

    ready: float = 0.25
    tags: float = 0.30
    latency: float = 0.15
    local: float = 0.20
    cost: float = 0.10
    error_rate: float = 0.20
    sticky: float = 0.50


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    prefer_local: bool = True
    session_header: str = "x-session-id"
    sticky_ttl_s: float = 1800.0
    strict_models: bool = False
    default_max_tokens: int = 1024
    weights: Weights = Weights()
    #: Most sessions remembered at once (oldest forgotten first).
    max_sessions: int = 100_000


@dataclass(frozen=True, slots=True)
class HealthConfig:
    interval_s: float = 5.0
    timeout_s: float = 2.0
    #: First circuit cooldown; doubles on each failed half-open trial up to the cap.
    cooldown_s: float = 1.0
    max_cooldown_s: float = 16.0
    #: Consecutive timeouts or 5xx that open the circuit (refusals and resets open it at once).
    failure_threshold: int = 3
    #: Probes in the background; off, instances are judged by live traffic alone.
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    connect_s: float = 2.0
    first_byte_s: float = 30.0
    idle_s: float = 30.0
    total_s: float = 600.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Bounds on what an upstream may send; beyond them the attempt fails over with
    UPSTREAM_PROTOCOL_ERROR instead of buffering without end."""

    #: A whole (non-streamed) response body, after content decoding.
    max_response_bytes: int = 128 * 1024 * 1024
    #: One server-sent event of a stream (its lines up to the blank line).
    max_event_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """An https:// instance's `tls:`: `ca_file` (PEM CAs trusted instead of the system's),
    `verify` (false: no certificate or host name check, for a test rig only),
    `client_cert` and `client_key` (PEM; the key may be inside the certificate file)."""

    ca_file: str | None = None
    verify: bool = True
    client_cert: str | None = None
    client_key: str | None = field(default=None, repr=False)

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


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_attempts: int = 4
    on: frozenset[str] = frozenset(RETRY_KINDS)
    #: Longest `Retry-After` the proxy waits out itself when no other instance can serve.
    max_retry_after_s: float = 10.0
    #: Extra tries on the same instance for a transient failure (500, reset before any byte).
    same_instance_retries: int = 1
    #: How long a request waits for a slot on an instance at its max_concurrency before
    #: moving on to the next one.
    queue_wait_s: float = 0.25

    def retries(self, code: str) -> bool:
        """Whether a failure with this reason code may be retried elsewhere."""
        return any(code in RETRY_KINDS[kind] for kind in self.on)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = DEFAULT_STORE_URL
    #: Off: no audit rows are written (logs and metrics remain).
    enabled: bool = True
    retention_days: float = 7.0
    max_rows: int = 1_000_000
    #: Rows waiting for the writer; beyond this they are dropped and counted.
    queue_size: int = 50_000


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: str = "json"  # json | console
    level: str = "info"


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    """One model server: `id` is the full `provider_id:instance_id`."""

    id: str
    provider_id: str
    base_url: str  # as configured, minus a trailing slash
    root_url: str  # without a trailing /v1: where /health, /props, /api/tags live
    api_base: str  # with /v1: where /chat/completions lives
    kind: str = "openai"
    #: Which server implementation answers there, for health probes.
    server: str = "openai"
    local: bool = True
    enabled: bool = True
    model: str | None = None
    tags: tuple[str, ...] = ()
    ctx: int | None = None
    #: Known to work. A capability in neither set is unknown: allowed, ranked lower.
    capabilities: frozenset[str] = frozenset()
    #: Stated not to work: requests that need one never go to this instance.
    unsupported: frozenset[str] = frozenset()
    cost_input_per_mtok: float = 0.0
    cost_output_per_mtok: float = 0.0
    fingerprint: str | None = "auto"  # "auto", a model name, or None (no check)
    api_key: str | None = field(default=None, repr=False)
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    forward_client_auth: bool = False
    #: Most requests in flight to this instance at once (None: no cap).
    max_concurrency: int | None = None
    #: TLS settings of an https:// instance (None: the system's CAs, verified).
    tls: TlsConfig | None = None


@dataclass(frozen=True, slots=True)
class ModelGroup:
    name: str
    tags: tuple[str, ...] = ()
    instances: tuple[str, ...] = ()
    strategy: str = "scored"  # scored | ordered


@dataclass(frozen=True, slots=True)
class Config:
    source: str = "<defaults>"
    server: ServerConfig = ServerConfig()
    routing: RoutingConfig = RoutingConfig()
    health: HealthConfig = HealthConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    retry: RetryConfig = RetryConfig()
    store: StoreConfig = StoreConfig()
    logging: LoggingConfig = LoggingConfig()
    models: Mapping[str, ModelGroup] = field(default_factory=dict)
    instances: tuple[InstanceConfig, ...] = ()

    #: Full ids and unique short ids -> full id; built once by `instance_ids`.
    ids: Mapping[str, str] = field(default_factory=dict)

    def instance(self, instance_id: str) -> InstanceConfig | None:
        """The instance with this full id, or a unique short id."""
        full = self.ids.get(instance_id)
        return None if full is None else next(i for i in self.instances if i.id == full)


def instance_ids(instances: tuple[InstanceConfig, ...]) -> dict[str, str]:
    """Every name an instance answers to: its full id, and its short id when unique."""
    ids = {i.id: i.id for i in instances}
    shorts: dict[str, list[str]] = {}
    for inst in instances:
        shorts.setdefault(inst.id.split(":", 1)[1], []).append(inst.id)
    for short, full in shorts.items():
        if len(full) == 1:
            ids.setdefault(short, full[0])
    return ids


# --------------------------------------------------------------------------- reading


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so `on: [...]` stays the key "on"."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))


class _Reader:
    """Typed access to one mapping of the raw document, tracking the key path for errors."""

    def __init__(self, source: str, path: str, data: Any, base: Path | None = None) -> None:
        self.source = source
        self.path = path
        #: The config file's directory: relative file paths in it are relative to it.
        self.base = base
        if not isinstance(data, dict):
            raise self.error(path, "a mapping", data)
        self.data: dict[str, Any] = data

    def error(self, path: str, expected: str, got: Any = ..., secret: bool = False) -> ConfigError:
        where = path or "(top level)"
        msg = f"{self.source}: {where}: expected {expected}"
        if got is not ...:
            msg += f", got {_describe(got, secret or _is_secret_path(path))}"
        return ConfigError(msg)

    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def check_keys(self, allowed: set[str]) -> None:
        for key in self.data:
            if key not in allowed:
                raise ConfigError(
                    f"{self.source}: {self.sub(str(key))}: unknown key; expected one of "
                    + ", ".join(sorted(allowed))
                )

    def child(self, key: str, required: bool = False) -> _Reader | None:
        if key not in self.data or self.data[key] is None:
            if required:
                raise self.error(self.sub(key), "a mapping (required)")
            return None
        return _Reader(self.source, self.sub(key), self.data[key], self.base)

    def file_path(self, key: str) -> str | None:
        """A file path: one relative to the config file's directory is made absolute (so
        the proxy and its commands find the file whatever their working directory)."""
        value = self.string(key)
        return None if value is None else _beside(self.base, value)

    def string(self, key: str, default: str | None = None, required: bool = False) -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(self.sub(key), "a string (required)")
            return default
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(self.sub(key), "a string", value)
        return self.interpolate(self.sub(key), str(value))

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            value = self.interpolate(self.sub(key), value).strip().lower()
            if value in ("true", "yes", "on", "1"):
                return True
            if value in ("false", "no", "off", "0"):
                return False
        if not isinstance(value, bool):
            raise self.error(self.sub(key), "true or false", value)
        return value

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            value = self.interpolate(self.sub(key), value)
            try:
                value = float(value)
            except ValueError:
                raise self.error(self.sub(key), "a number", value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(self.sub(key), "a number", value)
        if value < minimum:
            raise self.error(self.sub(key), f"a number >= {minimum:g}", value)
        return float(value)

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        value = self.number(key, float(default), float(minimum))
        if value != int(value):
            raise self.error(self.sub(key), "a whole number", value)
        return int(value)

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.data.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.error(self.sub(key), "a list of strings", value)
        out = []
        for i, item in enumerate(value):
            path = f"{self.sub(key)}[{i}]"
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise self.error(path, "a string", item)
            out.append(self.interpolate(path, str(item)))
        return tuple(out)

    def names(self, key: str, known: tuple[str, ...]) -> frozenset[str]:
        """A list of names from `known` (case-insensitive); an unknown one is an error
        naming its index and the known names."""
        names = self.strings(key)
        for i, name in enumerate(names):
            if name.lower() not in known:
                raise self.error(f"{self.sub(key)}[{i}]", "one of " + ", ".join(known), name)
        return frozenset(n.lower() for n in names)

    def choice(self, key: str, default: str, options: tuple[str, ...]) -> str:
        value = self.string(key, default)
        assert value is not None
        if value not in options:
            raise self.error(self.sub(key), "one of " + ", ".join(options), value)
        return value

    def interpolate(self, path: str, text: str) -> str:
        if "${" not in text:
            return text

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = os.environ.get(name)
            if value is None or (value == "" and default is not None):
                if default is not None:
                    return default
                raise ConfigError(
                    f"{self.source}: {path}: environment variable {name} is not set"
                    " (use ${" + name + ":-default} for a default)"
                )
            return value

        return _VAR.sub(replace, text)


def _is_secret_path(path: str) -> bool:
    return any(part.split("[")[0] in SECRET_KEYS for part in path.split("."))


def _describe(value: Any, secret: bool) -> str:
    kind = {dict: "a mapping", list: "a list", bool: "a boolean", int: "a number",
            float: "a number", str: "a string", type(None): "nothing"}.get(type(value), type(value).__name__)
    if secret or isinstance(value, (dict, list)):
        return kind
    return f"{kind} ({value!r})"


# --------------------------------------------------------------------------- sections


def _server(r: _Reader | None) -> ServerConfig:
    if r is None:
        return ServerConfig()
    r.check_keys({"host", "port", "api_keys", "admin_key", "max_body_bytes", "metrics_auth",
                  "shutdown_grace_s", "body_timeout_s"})
    port = r.integer("port", 8080)
    if port > 65535:
        raise r.error(r.sub("port"), "a port number (0-65535)", port)
    return ServerConfig(
        host=r.string("host", "127.0.0.1") or "127.0.0.1",
        port=port,
        api_keys=tuple(k for k in r.strings("api_keys") if k),
        admin_key=r.string("admin_key") or None,
        max_body_bytes=r.integer("max_body_bytes", DEFAULT_MAX_BODY_BYTES, minimum=1024),
        metrics_auth=r.boolean("metrics_auth", False),
        shutdown_grace_s=r.number("shutdown_grace_s", 30.0),
        body_timeout_s=r.number("body_timeout_s", 30.0, minimum=0.01),
    )


def _routing(r: _Reader | None) -> RoutingConfig:
    if r is None:
        return RoutingConfig()
    r.check_keys({"prefer_local", "session_header", "sticky_ttl_s", "strict_models",
                  "default_max_tokens", "weights", "max_sessions"})
    weights = Weights()
    w = r.child("weights")
    if w is not None:
        names = ("ready", "tags", "latency", "local", "cost", "error_rate", "sticky")
        w.check_keys(set(names))
        weights = Weights(**{n: w.number(n, getattr(Weights(), n)) for n in names})
    return RoutingConfig(
        prefer_local=r.boolean("prefer_local", True),
        session_header=(r.string("session_header", "x-session-id") or "x-session-id").lower(),
        sticky_ttl_s=r.number("sticky_ttl_s", 1800.0),
        strict_models=r.boolean("strict_models", False),
        default_max_tokens=r.integer("default_max_tokens", 1024, minimum=1),
        weights=weights,
        max_sessions=r.integer("max_sessions", 100_000, minimum=1),
    )


def _health(r: _Reader | None) -> HealthConfig:
    if r is None:
        return HealthConfig()
    r.check_keys({"interval_s", "timeout_s", "cooldown_s", "max_cooldown_s",
                  "failure_threshold", "enabled"})
    return HealthConfig(
        interval_s=r.number("interval_s", 5.0, minimum=0.05),
        timeout_s=r.number("timeout_s", 2.0, minimum=0.01),
        cooldown_s=r.number("cooldown_s", 1.0, minimum=0.01),
        max_cooldown_s=r.number("max_cooldown_s", 16.0, minimum=0.01),
        failure_threshold=r.integer("failure_threshold", 3, minimum=1),
        enabled=r.boolean("enabled", True),
    )


def _timeouts(r: _Reader | None) -> TimeoutsConfig:
    if r is None:
        return TimeoutsConfig()
    r.check_keys({"connect_s", "first_byte_s", "idle_s", "total_s"})
    return TimeoutsConfig(
        connect_s=r.number("connect_s", 2.0, minimum=0.01),
        first_byte_s=r.number("first_byte_s", 30.0, minimum=0.01),
        idle_s=r.number("idle_s", 30.0, minimum=0.01),
        total_s=r.number("total_s", 600.0, minimum=0.01),
    )


def _upstream(r: _Reader | None) -> UpstreamConfig:
    if r is None:
        return UpstreamConfig()
    r.check_keys({"max_response_bytes", "max_event_bytes"})
    return UpstreamConfig(*(r.integer(key, getattr(UpstreamConfig(), key), minimum=1024)
                            for key in ("max_response_bytes", "max_event_bytes")))


def _tls(r: _Reader | None, scheme: str) -> TlsConfig | None:
    """An instance's `tls:` mapping, checked by building its SSL context once."""
    if r is None:
        return None
    r.check_keys({"ca_file", "verify", "client_cert", "client_key"})
    if scheme != "https":
        raise r.error(r.path, "an https:// base_url for tls settings")
    tls = TlsConfig(r.file_path("ca_file"), r.boolean("verify", True),
                    r.file_path("client_cert"), r.file_path("client_key"))
    if tls.client_key is not None and tls.client_cert is None:
        raise r.error(r.sub("client_cert"), "a certificate for client_key (required)")
    for key in ("ca_file", "client_cert", "client_key"):
        if getattr(tls, key) is not None and not os.path.isfile(getattr(tls, key)):
            raise r.error(r.sub(key), "the path of a readable PEM file", getattr(tls, key))
    try:
        tls.context()
    except (OSError, ssl.SSLError) as exc:  # the reason only, never the files' content
        why = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise r.error(r.path, f"PEM files that load ({why})") from None
    return tls


def _retry(r: _Reader | None) -> RetryConfig:
    if r is None:
        return RetryConfig()
    r.check_keys({"max_attempts", "on", "max_retry_after_s", "same_instance_retries",
                  "queue_wait_s"})
    kinds = r.strings("on") if "on" in r.data else tuple(RETRY_KINDS)
    for i, kind in enumerate(kinds):
        if kind not in RETRY_KINDS:
            raise r.error(f"{r.sub('on')}[{i}]", "one of " + ", ".join(RETRY_KINDS), kind)
    return RetryConfig(
        max_attempts=r.integer("max_attempts", 4, minimum=1),
        on=frozenset(kinds),
        max_retry_after_s=r.number("max_retry_after_s", 10.0),
        same_instance_retries=r.integer("same_instance_retries", 1),
        queue_wait_s=r.number("queue_wait_s", 0.25),
    )


def _store(r: _Reader | None, base: Path | None) -> StoreConfig:
    if r is None:
        return StoreConfig(url=_store_beside(base, DEFAULT_STORE_URL))
    r.check_keys({"url", "enabled", "retention_days", "max_rows", "queue_size"})
    url = r.string("url", DEFAULT_STORE_URL) or DEFAULT_STORE_URL
    if not url.startswith("sqlite:///") or url[len("sqlite:///"):] in ("", ":memory:"):
        # (not in memory: the audit writer is a separate process with its own memory)
        raise r.error(r.sub("url"), "a sqlite:///PATH url with a file path", url)
    return StoreConfig(
        url=_store_beside(base, url),
        enabled=r.boolean("enabled", True),
        retention_days=r.number("retention_days", 7.0, minimum=0.001),
        max_rows=r.integer("max_rows", 1_000_000, minimum=100),
        queue_size=r.integer("queue_size", 50_000, minimum=1),
    )


def _beside(base: Path | None, path: str) -> str:
    """`path` as written, or, when it is relative and the config came from a file, the
    same path under that file's directory."""
    if base is None or os.path.isabs(os.path.expanduser(path)):
        return os.path.expanduser(path)
    return os.path.normpath(base / path)


def _store_beside(base: Path | None, url: str) -> str:
    """A `sqlite:///PATH` url whose relative PATH is taken from the config's directory."""
    return "sqlite:///" + _beside(base, url[len("sqlite:///"):])


def _logging(r: _Reader | None) -> LoggingConfig:
    if r is None:
        return LoggingConfig()
    r.check_keys({"format", "level"})
    return LoggingConfig(
        format=r.choice("format", "json", ("json", "console")),
        level=r.choice("level", "info", ("debug", "info", "warning", "error")),
    )


def split_base_url(base_url: str) -> tuple[str, str]:
    """(root, api_base) for a base URL given with or without the `/v1` suffix."""
    url = base_url.rstrip("/")
    if url.endswith("/v1"):
        return url[:-3], url
    return url, url + "/v1"


def is_local_host(host: str) -> bool:
    """True for loopback, private and link-local addresses and for `localhost`."""
    if host in ("localhost", "localhost.localdomain") or host.endswith(".local"):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_loopback or addr.is_private or addr.is_link_local


def _instance(r: _Reader, provider_id: str, kind: str, provider_local: bool | None,
              provider_key: str | None, server: str) -> InstanceConfig:
    r.check_keys({"id", "base_url", "enabled", "local", "fingerprint", "metadata", "api_key",
                  "headers", "forward_client_auth", "kind", "server", "max_concurrency",
                  "tls"})
    inst_id = r.string("id", required=True)
    assert inst_id is not None
    if not re.fullmatch(r"[A-Za-z0-9._\-/]+", inst_id):
        raise r.error(r.sub("id"), "letters, digits, '.', '_', '-' or '/'", inst_id)
    base_url = r.string("base_url", required=True)
    assert base_url is not None
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise r.error(r.sub("base_url"), "an http:// or https:// URL with a host", base_url)
    root, api_base = split_base_url(base_url)

    meta = r.child("metadata")
    model = tags = ctx = None
    capabilities: frozenset[str] = frozenset()
    unsupported: frozenset[str] = frozenset()
    cost_in = cost_out = 0.0
    if meta is not None:
        meta.check_keys({"model", "tags", "ctx", "capabilities", "unsupported", "cost"})
        model = meta.string("model")
        tags = meta.strings("tags")
        ctx = meta.integer("ctx", 0, minimum=1) if "ctx" in meta.data else None
        capabilities = meta.names("capabilities", CAPABILITIES)
        unsupported = meta.names("unsupported", CAPABILITIES)
        both = capabilities & unsupported
        if both:
            raise meta.error(meta.sub("unsupported"), "capabilities not also listed in "
                             f"{meta.sub('capabilities')}", ", ".join(sorted(both)))
        cost = meta.child("cost")
        if cost is not None:
            cost.check_keys({"input_per_mtok", "output_per_mtok"})
            cost_in = cost.number("input_per_mtok", 0.0)
            cost_out = cost.number("output_per_mtok", 0.0)

    fingerprint: str | None = "auto"
    raw_fp = r.data.get("fingerprint")
    if raw_fp is None or raw_fp == "auto":
        fingerprint = "auto"
    elif raw_fp is False or raw_fp == "off":
        fingerprint = None
    elif isinstance(raw_fp, dict):
        fp = r.child("fingerprint")
        assert fp is not None
        fp.check_keys({"model"})
        fingerprint = fp.string("model", required=True)
    else:
        raise r.error(r.sub("fingerprint"), "auto, off, or a mapping {model: NAME}", raw_fp)

    headers: tuple[tuple[str, str], ...] = ()
    hdr = r.child("headers")
    if hdr is not None:
        headers = tuple((str(k), hdr.string(str(k)) or "") for k in hdr.data)

    local = r.boolean("local", provider_local if provider_local is not None
                      else is_local_host(parts.hostname))
    return InstanceConfig(
        id=f"{provider_id}:{inst_id}",
        provider_id=provider_id,
        base_url=base_url.rstrip("/"),
        root_url=root,
        api_base=api_base,
        kind=r.choice("kind", kind, ("openai", "anthropic")),
        server=r.choice("server", server, SERVER_KINDS),
        local=local,
        enabled=r.boolean("enabled", True),
        model=model,
        tags=tags or (),
        ctx=ctx,
        capabilities=capabilities,
        unsupported=unsupported,
        cost_input_per_mtok=cost_in,
        cost_output_per_mtok=cost_out,
        fingerprint=fingerprint,
        api_key=r.string("api_key") or provider_key,
        headers=headers,
        forward_client_auth=r.boolean("forward_client_auth", False),
        max_concurrency=(r.integer("max_concurrency", 0, minimum=1)
                         if r.data.get("max_concurrency") is not None else None),
        tls=_tls(r.child("tls"), parts.scheme),
    )


def _providers(root: _Reader) -> tuple[InstanceConfig, ...]:
    raw = root.data.get("providers")
    if not isinstance(raw, list) or not raw:
        raise root.error("providers", "a non-empty list of providers", raw if raw is not None else ...)
    instances: list[InstanceConfig] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        p = _Reader(root.source, f"providers[{i}]", item, root.base)
        p.check_keys({"provider_id", "kind", "local", "api_key", "instances", "server"})
        provider_id = p.string("provider_id", required=True)
        assert provider_id is not None
        kind = p.choice("kind", "openai", ("openai", "anthropic"))
        guess = provider_id.lower().replace("-", "").replace("_", "").replace(".", "")
        server = p.choice("server", guess if guess in SERVER_KINDS else "openai", SERVER_KINDS)
        local = p.boolean("local", False) if "local" in p.data else None
        key = p.string("api_key")
        raw_instances = p.data.get("instances")
        if not isinstance(raw_instances, list) or not raw_instances:
            raise p.error(p.sub("instances"), "a non-empty list of instances",
                          raw_instances if raw_instances is not None else ...)
        for j, raw_inst in enumerate(raw_instances):
            inst = _instance(_Reader(root.source, f"{p.sub('instances')}[{j}]", raw_inst, p.base),
                             provider_id, kind, local, key, server)
            if inst.id in seen:
                raise ConfigError(f"{root.source}: {p.sub('instances')}[{j}].id: "
                                  f"expected a unique id, {inst.id} appears twice")
            seen.add(inst.id)
            instances.append(inst)
    return tuple(instances)


def _models(r: _Reader | None, instances: tuple[InstanceConfig, ...]) -> dict[str, ModelGroup]:
    if r is None:
        return {}
    groups: dict[str, ModelGroup] = {}
    ids = instance_ids(instances)
    for name in r.data:
        g = r.child(str(name), required=True)
        assert g is not None
        g.check_keys({"tags", "instances", "strategy"})
        members = []
        for k, ref in enumerate(g.strings("instances")):
            full = ids.get(ref)
            if full is None:
                raise g.error(f"{g.sub('instances')}[{k}]", "the id of a configured instance", ref)
            members.append(full)
        groups[str(name)] = ModelGroup(
            name=str(name),
            tags=g.strings("tags"),
            instances=tuple(members),
            strategy=g.choice("strategy", "scored", ("scored", "ordered")),
        )
    return groups


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Build a Config from an already-decoded document; raises ConfigError. Relative file
    paths (`store.url`'s, an instance's `tls` files) are taken from `base_dir` when given
    (load_config gives the file's directory), else from the working directory."""
    root = _Reader(source, "", data, base_dir)
    root.check_keys({"server", "routing", "health", "timeouts", "upstream", "retry", "store",
                     "models", "providers", "logging"})
    instances = _providers(root)
    return Config(
        source=source,
        server=_server(root.child("server")),
        routing=_routing(root.child("routing")),
        health=_health(root.child("health")),
        timeouts=_timeouts(root.child("timeouts")),
        upstream=_upstream(root.child("upstream")),
        retry=_retry(root.child("retry")),
        store=_store(root.child("store"), base_dir),
        logging=_logging(root.child("logging")),
        models=_models(root.child("models"), instances),
        instances=instances,
        ids=instance_ids(instances),
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML or JSON config file; raises ConfigError."""
    source = str(path)
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    try:
        if source.endswith(".json"):
            data = orjson.loads(text)
        else:
            data = yaml.load(text, Loader=_YamlLoader)  # YAML is a superset of JSON
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"{source}: (top level): expected a mapping, the file is empty")
    return parse_config(data, source, Path(path).absolute().parent)
