"""Reading a config: `${VAR}` expansion, the schema's errors in this file's words, and the
flat objects the proxy routes with.

Every error names the file, the key path and what was expected, e.g. `c.yaml:
providers[0].instances[1].metadata.capabilities[0]: expected one of json, prefill, tools,
vision, got a string ('prefil')`, and describes a secret's value without echoing it.
`${VAR}` (and `${VAR:-default}`) in any string is read from the environment before
validation; a missing variable is an error naming it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin
from urllib.parse import urlsplit

import orjson
import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from proxy.audit.database import redact_url
from proxy.config.schema import (
    SERVER_KINDS,
    DocumentSpec,
    GroupSpec,
    HealthConfig,
    InstanceSpec,
    LoggingConfig,
    ProviderSpec,
    RetryConfig,
    RoutingConfig,
    ServerConfig,
    StateConfig,
    StoreConfig,
    TimeoutsConfig,
    TlsConfig,
    UpstreamConfig,
)

#: Keys whose values are never quoted in an error, at any depth below them.
SECRET_KEYS = frozenset({"api_key", "api_keys", "admin_key", "headers"})
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    """One model server, flattened from its InstanceSpec and provider (the defaults are
    theirs, in proxy/config/schema.py)."""

    id: str  # the full `provider_id:instance_id`
    provider_id: str
    base_url: str  # as configured, minus a trailing slash
    root_url: str  # without a trailing /v1: where /health, /props, /api/tags live
    api_base: str  # with /v1: where /chat/completions lives
    kind: str
    #: Which server implementation answers there, for health probes.
    server: str
    local: bool
    enabled: bool
    model: str | None
    tags: tuple[str, ...]
    ctx: int | None
    capabilities: frozenset[str]
    unsupported: frozenset[str]
    cost_input_per_mtok: float
    cost_output_per_mtok: float
    fingerprint: str | None  # "auto", a model name, or None (no check)
    api_key: str | None = field(repr=False)
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    forward_client_auth: bool
    max_concurrency: int | None
    #: TLS settings of an https:// instance (None: the system's CAs, verified).
    tls: TlsConfig | None


@dataclass(frozen=True, slots=True)
class ModelGroup:
    name: str
    tags: tuple[str, ...]
    instances: tuple[str, ...]  # full instance ids
    strategy: str  # scored | ordered


@dataclass(frozen=True, slots=True)
class Config:
    source: str = "<defaults>"
    server: ServerConfig = field(default_factory=ServerConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    state: StateConfig = field(default_factory=StateConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
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


# --------------------------------------------------------------------------- errors

_NOTHING: Any = object()
#: What each of pydantic's constraint errors expected (its `ctx` fills the braces).
_CONSTRAINTS = {
    "greater_than_equal": "a number >= {ge:g}", "greater_than": "a number > {gt:g}",
    "less_than_equal": "a number <= {le:g}", "less_than": "a number < {lt:g}",
    "int_from_float": "a whole number", "too_short": "a non-empty list",
    "finite_number": "a finite number",
}


def _error(source: str, path: str, expected: str, got: Any = _NOTHING) -> ConfigError:
    msg = f"{source}: {path or '(top level)'}: expected {expected}"
    if got is not _NOTHING:
        msg += f", got {_describe(got, _is_secret_path(path))}"
    return ConfigError(msg)


#: Whole values that may hold a password (a URL's user info).
SECRET_PATHS = frozenset({"state.url"})


def _is_secret_path(path: str) -> bool:
    return path in SECRET_PATHS or any(part.split("[")[0] in SECRET_KEYS for part in path.split("."))


def _describe(value: Any, secret: bool) -> str:
    kind = {dict: "a mapping", list: "a list", bool: "a boolean", int: "a number",
            float: "a number", str: "a string", type(None): "nothing"}.get(type(value), type(value).__name__)
    if secret or value is None or isinstance(value, (dict, list)):
        return kind
    if isinstance(value, str):  # a URL's password (`store.url`) is a secret wherever it is
        value = redact_url(value)
    return f"{kind} ({value!r})"


def _unwrap(ann: Any) -> Any:
    """The type under Annotated[...] and `X | None`."""
    while True:
        origin = get_origin(ann)
        if origin is Annotated:
            ann = get_args(ann)[0]
        elif origin in (Union, types.UnionType):
            ann = next(a for a in get_args(ann) if a is not type(None))
        else:
            return ann


def _schema_at(loc: tuple[int | str, ...]) -> tuple[Any, FieldInfo | None]:
    """The declared type at a pydantic error location, and its field when it names one."""
    ann: Any = DocumentSpec
    info: FieldInfo | None = None
    for part in loc:
        ann = _unwrap(ann)
        origin = get_origin(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel) and part in ann.model_fields:
            info = ann.model_fields[str(part)]
            ann = info.annotation
        elif origin in (list, tuple, frozenset) and isinstance(part, int):
            ann, info = get_args(ann)[0], None
        elif origin is dict:
            ann, info = get_args(ann)[1], None
        else:
            return None, None
    return ann, info


def _phrase(ann: Any) -> str:
    """How an error message names a declared type."""
    ann = _unwrap(ann)
    if ann is str:
        return "a string"
    if ann in (int, float):
        return "a number"
    if ann is bool:
        return "true or false"
    if get_origin(ann) in (list, tuple, frozenset):
        return "a list of strings" if _unwrap(get_args(ann)[0]) is str else "a list"
    if get_origin(ann) is dict or (isinstance(ann, type) and issubclass(ann, BaseModel)):
        return "a mapping"
    return "a valid value"


def _schema_error(exc: ValidationError, source: str) -> ConfigError:
    """The first of pydantic's errors, in the words and key paths of this file."""
    errors = exc.errors(include_url=False)
    # an unknown key first: a misspelt key also leaves the real one missing
    err = min(errors, key=lambda e: e["type"] != "extra_forbidden")
    loc, kind, ctx = err["loc"], err["type"], err.get("ctx") or {}
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if kind == "extra_forbidden":
        allowed = _unwrap(_schema_at(loc[:-1])[0]).model_fields
        return ConfigError(f"{source}: {path}: unknown key; expected one of "
                           + ", ".join(sorted(allowed)))
    ann, info = _schema_at(loc)
    said = info.description if info is not None else None
    if kind == "missing":
        return _error(source, path, f"{said or _phrase(ann)} (required)")
    if said is None:
        said = (ctx["expected"] if kind == "expected" else
                _CONSTRAINTS[kind].format(**ctx) if kind in _CONSTRAINTS else _phrase(ann))
    return _error(source, path, said, err["input"])


# --------------------------------------------------------------------------- reading


def _interpolate(value: Any, source: str, path: str = "") -> Any:
    """The document with `${VAR}` and `${VAR:-default}` in every string replaced."""
    if isinstance(value, dict):
        return {k: _interpolate(v, source, f"{path}.{k}" if path else str(k))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, source, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found is None or (found == "" and default is not None):
            if default is not None:
                return default
            raise ConfigError(f"{source}: {path}: environment variable {name} is not set"
                              " (use ${" + name + ":-default} for a default)")
        return found

    return _VAR.sub(replace, value)


def _beside(base: Path | None, path: str) -> str:
    """`path` as written, or, when it is relative and the config came from a file, the
    same path under that file's directory (so the proxy and its commands find it whatever
    their working directory)."""
    path = os.path.expanduser(path)
    if base is None or os.path.isabs(path):
        return path
    return os.path.normpath(base / path)


def _store_beside(store: StoreConfig, base: Path | None) -> StoreConfig:
    """The store with its `sqlite:///PATH` taken from the config's directory (a
    postgresql:// URL as it is)."""
    if not store.url.startswith("sqlite:///"):
        return store
    path = store.url[len("sqlite:///"):]
    url = "sqlite:///" + _beside(base, path)
    return store if url == store.url else store.model_copy(update={"url": url})


def _checked_tls(tls: TlsConfig | None, scheme: str, path: str, source: str,
                 base: Path | None) -> TlsConfig | None:
    """An instance's `tls:` once its files load (at load time, not at the first request);
    relative file paths are taken from the config file's directory."""
    if tls is None:
        return None
    tls = tls.model_copy(update={key: _beside(base, getattr(tls, key))
                                 for key in ("ca_file", "client_cert", "client_key")
                                 if getattr(tls, key) is not None})
    if scheme != "https":
        raise _error(source, path, "an https:// base_url for tls settings")
    if tls.client_key is not None and tls.client_cert is None:
        raise _error(source, f"{path}.client_cert", "a certificate for client_key (required)")
    for key in ("ca_file", "client_cert", "client_key"):
        file = getattr(tls, key)
        if file is not None and not os.path.isfile(file):
            raise _error(source, f"{path}.{key}", "the path of a readable PEM file", file)
    try:
        tls.context()
    except (OSError, ssl.SSLError) as exc:  # the reason only, never the files' content
        why = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise _error(source, path, f"PEM files that load ({why})") from None
    return tls


def _instance(spec: InstanceSpec, provider: ProviderSpec, server: str, path: str,
              source: str, base: Path | None) -> InstanceConfig:
    meta = spec.metadata
    both = meta.capabilities & meta.unsupported
    if both:
        raise _error(source, f"{path}.metadata.unsupported", "capabilities not also listed in "
                     f"{path}.metadata.capabilities", ", ".join(sorted(both)))
    parts = urlsplit(spec.base_url)
    root, api_base = split_base_url(spec.base_url)
    local = (spec.local if spec.local is not None else provider.local
             if provider.local is not None else is_local_host(parts.hostname or ""))
    return InstanceConfig(
        id=f"{provider.provider_id}:{spec.id}", provider_id=provider.provider_id,
        base_url=spec.base_url.rstrip("/"), root_url=root, api_base=api_base,
        kind=spec.kind or provider.kind, server=spec.server or server, local=local,
        enabled=spec.enabled, model=meta.model, tags=meta.tags, ctx=meta.ctx,
        capabilities=meta.capabilities, unsupported=meta.unsupported,
        cost_input_per_mtok=meta.cost.input_per_mtok,
        cost_output_per_mtok=meta.cost.output_per_mtok,
        fingerprint=None if spec.fingerprint is None else spec.fingerprint.model,
        api_key=spec.api_key or provider.api_key, headers=tuple(spec.headers.items()),
        forward_client_auth=spec.forward_client_auth, max_concurrency=spec.max_concurrency,
        tls=_checked_tls(spec.tls, parts.scheme, f"{path}.tls", source, base))


def _instances(providers: list[ProviderSpec], source: str,
               base: Path | None) -> tuple[InstanceConfig, ...]:
    out: dict[str, InstanceConfig] = {}
    for i, provider in enumerate(providers):
        guess = re.sub(r"[-_.]", "", provider.provider_id.lower())
        server = provider.server or (guess if guess in SERVER_KINDS else "openai")
        for j, spec in enumerate(provider.instances):
            path = f"providers[{i}].instances[{j}]"
            inst = _instance(spec, provider, server, path, source, base)
            if inst.id in out:
                raise ConfigError(f"{source}: {path}.id: expected a unique id, "
                                  f"{inst.id} appears twice")
            out[inst.id] = inst
    return tuple(out.values())


def _models(groups: dict[str, GroupSpec], instances: tuple[InstanceConfig, ...],
            source: str) -> dict[str, ModelGroup]:
    ids = instance_ids(instances)
    out = {}
    for name, group in groups.items():
        for k, ref in enumerate(group.instances):
            if ref not in ids:
                raise _error(source, f"models.{name}.instances[{k}]",
                             "the id of a configured instance", ref)
        members = tuple(ids[ref] for ref in group.instances)
        out[name] = ModelGroup(name, group.tags, members, group.strategy)
    return out


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Build a Config from an already-decoded document (a dict, as YAML or JSON gives it);
    raises ConfigError naming `source`, the key path and what was expected. Relative file
    paths (`store.url`'s, an instance's `tls` files) are taken from `base_dir` when given
    (load_config gives the file's directory), else from the working directory."""
    try:
        doc = DocumentSpec.model_validate(_interpolate(data, source))
    except ValidationError as exc:
        raise _schema_error(exc, source) from None
    instances = _instances(doc.providers, source, base_dir)
    return Config(source=source, server=doc.server, routing=doc.routing, health=doc.health,
                  timeouts=doc.timeouts, upstream=doc.upstream, retry=doc.retry,
                  store=_store_beside(doc.store, base_dir), state=doc.state, logging=doc.logging,
                  models=_models(doc.models, instances, source), instances=instances,
                  ids=instance_ids(instances))


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so `on: [...]` stays the key "on"."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))


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
