"""Config loading: YAML and JSON, the seed's providers.json, ${VAR}, base_url forms, errors."""

from __future__ import annotations

import copy
import json
import re
import textwrap
import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from proxy.config import ConfigError, DocumentSpec, load_config, parse_config, split_base_url
from proxy.secrets import config_secrets

#: The seed's providers.json, a real user's config (copied: a clone has no ../shared).
SEED_PROVIDERS = Path(__file__).resolve().parent / "fixtures" / "providers.json"
ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_seed_providers_json_loads_unchanged() -> None:
    config = load_config(SEED_PROVIDERS)
    ids = [i.id for i in config.instances]
    assert ids == ["llamacpp:qwen3-coder-30b", "llamacpp:glm47flash-q8"]
    coder = config.instances[0]
    assert coder.api_base == "http://127.0.0.1:11435/v1"
    assert coder.root_url == "http://127.0.0.1:11435"
    assert coder.tags == ("coding", "big_ctx")
    assert coder.ctx == 32768
    assert coder.model == "Qwen3-Coder-30B"
    assert coder.local is True  # loopback


@pytest.mark.parametrize("name", ["demo.yaml", "example.yaml"])
def test_shipped_configs_load(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    config = load_config(ROOT / "config" / name)
    assert config.instances


def test_json_and_yaml_give_the_same_config(tmp_path: Path) -> None:
    doc = {"providers": [{"provider_id": "p", "instances": [
        {"id": "a", "base_url": "http://127.0.0.1:1/v1", "metadata": {"model": "m", "ctx": 10}}]}],
        "timeouts": {"first_byte_s": 3}}
    from_json = load_config(write(tmp_path, json.dumps(doc), "c.json"))
    from_yaml = load_config(write(tmp_path, json.dumps(doc), "c.yaml"))
    assert from_json.instances == from_yaml.instances
    assert from_json.timeouts.first_byte_s == 3.0


@pytest.mark.parametrize("given,root,api", [
    ("http://h:1", "http://h:1", "http://h:1/v1"),
    ("http://h:1/", "http://h:1", "http://h:1/v1"),
    ("http://h:1/v1", "http://h:1", "http://h:1/v1"),
    ("https://api.openai.com/v1/", "https://api.openai.com", "https://api.openai.com/v1"),
    ("https://openrouter.ai/api/v1", "https://openrouter.ai/api", "https://openrouter.ai/api/v1"),
])
def test_base_url_with_or_without_v1(given: str, root: str, api: str) -> None:
    assert split_base_url(given) == (root, api)


def test_env_interpolation_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_PORT", "18555")
    monkeypatch.setenv("KEY", "sk-secret")
    monkeypatch.delenv("UNSET_THING", raising=False)
    config = load_config(write(tmp_path, """
        providers:
          - provider_id: p
            instances:
              - id: a
                base_url: http://127.0.0.1:${SIM_PORT}
                api_key: ${KEY}
                metadata: {model: "${UNSET_THING:-fallback-model}"}
    """))
    inst = config.instances[0]
    assert inst.api_base == "http://127.0.0.1:18555/v1"
    assert inst.api_key == "sk-secret"
    assert inst.model == "fallback-model"
    assert "sk-secret" not in repr(inst)


def test_missing_env_var_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_KEY", raising=False)
    path = write(tmp_path, """
        providers:
          - provider_id: openai
            instances: [{id: default, base_url: "https://api.openai.com/v1", api_key: "${NOPE_KEY}"}]
    """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "providers[0].instances[0].api_key" in msg and "NOPE_KEY" in msg


@pytest.mark.parametrize("body,path,expected", [
    ("providers: []", "providers", "a non-empty list"),
    ("providers: [{provider_id: p, instances: [{id: a}]}]",
     "providers[0].instances[0].base_url", "a string (required)"),
    ("providers: [{provider_id: p, instances: [{id: a, base_url: 'ftp://x'}]}]",
     "providers[0].instances[0].base_url", "an http:// or https:// URL"),
    ("providers: [{provider_id: p, instances: [{id: a, base_url: 'http://x', metadata: {ctx: big}}]}]",
     "providers[0].instances[0].metadata.ctx", "a number"),
    ("timeouts: {first_byte_s: -1}\nproviders: [{provider_id: p, instances: [{id: a, base_url: 'http://x'}]}]",
     "timeouts.first_byte_s", "a number >= "),
    ("timeout: {}\nproviders: [{provider_id: p, instances: [{id: a, base_url: 'http://x'}]}]",
     "timeout", "unknown key"),
    ("retry: {on: [conn_refused, sometimes]}\nproviders: [{provider_id: p, instances: [{id: a, base_url: 'http://x'}]}]",
     "retry.on[1]", "one of conn_refused"),
    ("models: {fast: {instances: [nope]}}\nproviders: [{provider_id: p, instances: [{id: a, base_url: 'http://x'}]}]",
     "models.fast.instances[0]", "the id of a configured instance"),
    ("providers: [{provider_id: p, instances: [{id: a, base_url: 'http://x'}, {id: a, base_url: 'http://y'}]}]",
     "providers[0].instances[1].id", "a unique id"),
    ("- just a list", "(top level)", "a mapping"),
    ("server: {port: 99999}\nproviders: [{provider_id: p, instances: [{id: a, base_url: 'http://x'}]}]",
     "server.port", "a port number"),
])
def test_errors_name_file_path_and_expectation(tmp_path: Path, body: str, path: str,
                                               expected: str) -> None:
    file = write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_config(file)
    msg = str(err.value)
    assert msg.startswith(f"{file}: {path}:"), msg
    assert expected in msg, msg
    assert "Traceback" not in msg


def test_secret_values_never_echoed_in_errors(tmp_path: Path) -> None:
    file = write(tmp_path, """
        providers:
          - provider_id: p
            instances: [{id: a, base_url: 'http://x', api_key: [sk-live-ABCDEF]}]
    """)
    with pytest.raises(ConfigError) as err:
        load_config(file)
    assert "sk-live-ABCDEF" not in str(err.value)
    assert "api_key" in str(err.value)


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+"):
        load_config(write(tmp_path, "providers:\n  - [unclosed\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_local_defaults_from_host_and_provider() -> None:
    config = parse_config({"providers": [
        {"provider_id": "lan", "instances": [
            {"id": "a", "base_url": "http://192.168.1.20:8080"},
            {"id": "b", "base_url": "http://localhost:8080"}]},
        {"provider_id": "cloud", "instances": [{"id": "c", "base_url": "https://api.example.com/v1"}]},
        {"provider_id": "forced", "local": False, "instances": [{"id": "d", "base_url": "http://127.0.0.1:9"}]},
    ]})
    assert [i.local for i in config.instances] == [True, True, False, False]


def test_defaults_match_the_spec() -> None:
    config = parse_config({"providers": [{"provider_id": "p", "instances": [
        {"id": "a", "base_url": "http://127.0.0.1:1"}]}]})
    assert config.timeouts.connect_s == 2 and config.timeouts.first_byte_s == 30
    assert config.timeouts.idle_s == 30 and config.timeouts.total_s == 600
    assert config.retry.max_attempts == 4
    assert config.routing.session_header == "x-session-id"
    assert config.store.url == "sqlite:///./data/audit.db"
    assert config.instances[0].fingerprint == "auto"


def _with_instance(**fields: object) -> dict[str, object]:
    inst = {"id": "a", "base_url": "https://h.test:8443/v1", **fields}
    return {"providers": [{"provider_id": "p", "instances": [inst]}]}


def test_tls_settings_load_and_build_a_context(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("client.test").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "client.pem"))
    config = parse_config(_with_instance(tls={
        "ca_file": str(tmp_path / "ca.pem"), "client_cert": str(tmp_path / "client.pem")}))
    tls = config.instances[0].tls
    assert tls is not None and tls.verify is True
    assert tls.context().verify_mode.name == "CERT_REQUIRED"
    assert parse_config(_with_instance()).instances[0].tls is None


@pytest.mark.parametrize("fields,message", [
    ({"tls": {"ca_file": "/nonexistent/ca.pem"}},
     "providers[0].instances[0].tls.ca_file: expected the path of a readable PEM file"),
    ({"tls": {"client_key": "/etc/hostname"}},
     "providers[0].instances[0].tls.client_cert: expected a certificate for client_key"),
    ({"tls": {"verify": "maybe"}}, "providers[0].instances[0].tls.verify: expected true or false"),
    ({"tls": {"cafile": "x"}}, "providers[0].instances[0].tls.cafile: unknown key"),
    ({"tls": {"verify": False}, "base_url": "http://h.test:1"},
     "providers[0].instances[0].tls: expected an https:// base_url for tls settings"),
])
def test_tls_errors_name_the_key(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_with_instance(**fields), "c.yaml")
    assert message in str(err.value)


def test_a_file_that_is_not_pem_is_refused_without_its_content(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("sk-secret-not-a-certificate\n")
    with pytest.raises(ConfigError) as err:
        parse_config(_with_instance(tls={"ca_file": str(tmp_path / "ca.pem")}), "c.yaml")
    assert "providers[0].instances[0].tls: expected PEM files that load" in str(err.value)
    assert "sk-secret" not in str(err.value)


def test_upstream_limits(tmp_path: Path) -> None:
    config = parse_config({**_with_instance(), "upstream": {"max_response_bytes": 2048}})
    assert config.upstream.max_response_bytes == 2048
    assert config.upstream.max_event_bytes == 8 * 1024 * 1024
    with pytest.raises(ConfigError, match="upstream.max_event_bytes: expected a number >= 1024"):
        parse_config({**_with_instance(), "upstream": {"max_event_bytes": 10}})


# --------------------------------------------------------------------------- the schema


def _inside(annotation: Any) -> tuple[Any, tuple[int | str, ...]]:
    """The type under `X | None`, list[X] and dict[str, X], and a path step per container
    crossed (index 0 for a list, "g" for a mapping of names)."""
    steps: tuple[int | str, ...] = ()
    while True:
        origin = get_origin(annotation)
        if origin is Annotated or origin in (Union, types.UnionType):
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        elif origin in (list, dict):
            annotation, steps = get_args(annotation)[-1], (*steps, 0 if origin is list else "g")
        else:
            return annotation, steps


def _annotation_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model under `X | None`, list[X] or dict[str, X], if any."""
    inner = _inside(annotation)[0]
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def _schema_keys(model: type[BaseModel], prefix: str = "") -> dict[str, FieldInfo]:
    """Every key a mapping may hold, nested mappings as dotted paths (lists not entered)."""
    keys: dict[str, FieldInfo] = {}
    for name, info in model.model_fields.items():
        keys[prefix + name] = info
        nested = _annotation_model(info.annotation)
        # fingerprint's mapping is one of its three forms, written `{model: X}` in the table
        if nested is not None and get_origin(info.annotation) is not list and name != "fingerprint":
            keys.update(_schema_keys(nested, f"{prefix}{name}."))
    return keys


_TABLE_TOKEN = re.compile(r"`(?P<key>[a-z_]+)`(?: \((?P<default>[^()]*)\))?|(?P<open>\{)|(?P<close>\})"
                          r"|\([^()]*\)")


def _table_keys(cell: str) -> dict[str, str | None]:
    """`key` (default) items of a README table cell, `key`: {...} nesting as dotted paths;
    parentheses elsewhere (and backticks inside them) are commentary."""
    keys: dict[str, str | None] = {}
    stack: list[str] = []
    last = ""
    for token in _TABLE_TOKEN.finditer(cell):
        if token["key"]:
            last = ".".join([*stack, token["key"]])
            keys[last] = token["default"]
        elif token["open"]:
            stack = last.split(".")
        elif token["close"]:
            stack.pop()
    return keys


class _Required:
    def __repr__(self) -> str:
        return "required"


_REQUIRED = _Required()


def _readme_value(text: str) -> Any:
    """A default as the README writes it: `8 MiB`, `1e6`, `[a, b]`, `true`, `required`,
    `none`/`guessed ...`/`the provider's ...` (no fixed default); text after `;` or `: `
    is commentary."""
    value = re.split(r"; |: ", text, maxsplit=1)[0].strip()
    if value == "required":
        return _REQUIRED
    if value.startswith(("none", "guessed", "the provider's")):
        return None
    if value in ("true", "false"):
        return value == "true"
    if mib := re.fullmatch(r"(\d+) MiB", value):
        return int(mib[1]) * 1024 * 1024
    if value.startswith("["):
        return {item.strip(" `") for item in value.strip("[]").split(",") if item.strip()}
    if value == "{}":
        return {}
    try:
        return float(value)
    except ValueError:
        return value


def _same_default(readme: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(readme, bool):
        return readme is default
    if isinstance(default, (tuple, frozenset)):
        return bool(readme == set(default))
    return bool(readme == default)  # a number as written (8 MiB, 1e6) is read as a float


def _readme_table() -> dict[str, dict[str, str | None]]:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| section | keys (defaults) |"):].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        section, cell = (part.strip() for part in line.strip().strip("|").split("|"))
        rows[section.strip("`")] = _table_keys(cell)
    return rows


def test_readme_config_table_matches_the_schema() -> None:
    rows = _readme_table()
    assert set(rows) == {*DocumentSpec.model_fields, "instance"}
    where = {name: (name,) for name in DocumentSpec.model_fields} | {"instance": ("providers", "instances")}
    mismatches = []
    for section, listed in rows.items():
        model: type[BaseModel] | None = DocumentSpec
        for name in where[section]:
            assert model is not None
            model = _annotation_model(model.model_fields[name].annotation)
        assert model is not None, section
        schema = _schema_keys(model)
        if set(listed) != set(schema):
            mismatches.append(f"{section}: only in the README {sorted(set(listed) - set(schema))}, "
                              f"only in the schema {sorted(set(schema) - set(listed))}")
            continue
        for key, info in schema.items():
            default = PydanticUndefined if info.is_required() else info.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                continue  # a nested mapping: its keys are listed inside {...}
            written = listed[key]
            expected: Any = _REQUIRED if default is PydanticUndefined else default
            if written is None:
                if expected is not None:
                    mismatches.append(f"{section}.{key}: the README gives no default, the schema {expected!r}")
            elif not _same_default(_readme_value(written), expected):
                mismatches.append(f"{section}.{key}: the README says ({written}), the schema {expected!r}")
    assert not mismatches, "\n".join(mismatches)


def _set(doc: dict[str, Any], path: tuple[str | int, ...], key: str, value: Any) -> dict[str, Any]:
    """A deep copy of doc with `key: value` added in the mapping at path (made if absent)."""
    doc = copy.deepcopy(doc)
    node: Any = doc
    for part in path:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    node[key] = value
    return doc


def _mappings(model: type[BaseModel], path: tuple[int | str, ...] = ()
              ) -> list[tuple[tuple[int | str, ...], type[BaseModel]]]:
    """Every mapping the schema describes, from the document down: (path, its model)."""
    found = [(path, model)]
    for name, info in model.model_fields.items():
        nested = _annotation_model(info.annotation)
        if nested is not None:
            found += _mappings(nested, (*path, name, *_inside(info.annotation)[1]))
    return found


_VALID = {"providers": [{"provider_id": "p", "instances": [
    {"id": "a", "base_url": "https://h.test/v1", "fingerprint": {"model": "m"}}]}]}
_INSTANCE = ("providers", 0, "instances", 0)


@pytest.mark.parametrize("path", [path for path, _ in _mappings(DocumentSpec)],
                         ids=lambda p: ".".join(map(str, p)) or "top")
def test_an_unknown_key_anywhere_names_its_path_and_the_known_keys(path: tuple[str | int, ...]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_set(_VALID, path, "bogus", 1), "c.yaml")
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in (*path, "bogus")).lstrip(".")
    message = str(err.value)
    assert message.startswith(f"c.yaml: {where}: unknown key; expected one of "), message
    assert "bogus" not in message.split("expected one of ")[1]


def test_a_misspelt_key_is_named_rather_than_the_missing_one_it_leaves() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"providers": [{"provider_id": "p", "instances": [
            {"id": "a", "base_ur": "http://h:1"}]}]}, "c.yaml")
    assert str(err.value).startswith("c.yaml: providers[0].instances[0].base_ur: unknown key; "
                                     "expected one of api_key, base_url,")


@pytest.mark.parametrize("section,key,value,expected", [
    ("timeouts", "connect_s", True, "timeouts.connect_s: expected a number, got a boolean (True)"),
    ("server", "max_body_bytes", "8M", "server.max_body_bytes: expected a number, got a string ('8M')"),
    ("server", "max_body_bytes", 2048.5, "server.max_body_bytes: expected a whole number, got a number (2048.5)"),
    ("server", "body_timeout_s", 0, "server.body_timeout_s: expected a number >= 0.01, got a number (0)"),
    ("retry", "max_attempts", 0, "retry.max_attempts: expected a number >= 1, got a number (0)"),
    ("store", "max_rows", 10, "store.max_rows: expected a number >= 100, got a number (10)"),
    ("health", "enabled", "maybe", "health.enabled: expected true or false, got a string ('maybe')"),
    ("logging", "level", "loud", "logging.level: expected one of debug, info, warning, error, got a string ('loud')"),
    ("models", "g", {"strategy": "random"},
     "models.g.strategy: expected one of scored, ordered, got a string ('random')"),
    ("routing", "weights", {"ready": -1}, "routing.weights.ready: expected a number >= 0, got a number (-1)"),
    # a score is the weights' mean: inf / inf, or 0 / 0 when every always-counted one is 0
    ("routing", "weights", {"latency": float("inf")},
     "routing.weights.latency: expected a finite number, got a number (inf)"),
    ("routing", "weights", {"ready": 0, "latency": 0, "local": 0, "cost": 0, "error_rate": 0},
     "routing.weights: expected at least one of ready, latency, local, cost, error_rate above 0,"
     " got a mapping"),
])
def test_bounds_and_types_are_worded_as_before(section: str, key: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_set(_VALID, (section,), key, value), "c.yaml")
    assert str(err.value) == f"c.yaml: {expected}"


def test_a_price_must_be_finite() -> None:
    """`metadata.cost` of `.inf` (YAML's infinity): refused, as a weight of it is."""
    doc = _set(_VALID, (*_INSTANCE, "metadata"), "cost", {"input_per_mtok": float("inf")})
    with pytest.raises(ConfigError) as err:
        parse_config(doc, "c.yaml")
    assert str(err.value) == ("c.yaml: providers[0].instances[0].metadata.cost.input_per_mtok: "
                              "expected a finite number, got a number (inf)")


@pytest.mark.parametrize("url,expected", [
    ("sqlite:///:memory:", "a sqlite:///PATH url with a file path"),
    ("mysql://audit:hunter22@db/audit", "a sqlite:///PATH or postgresql://USER:PASS@HOST:PORT/DB url"),
    ("postgresql://audit:hunter22@db:5432/", "a postgresql://USER:PASS@HOST:PORT/DB url with a host and a database"),
    ("postgresql://audit:hunter22@db:port/audit", "a sqlite:///PATH or postgresql://USER:PASS@HOST:PORT/DB url (bad port)"),
])
def test_a_store_url_that_cannot_be_used_is_named_without_its_password(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_set(_VALID, ("store",), "url", url), "c.yaml")
    assert str(err.value).startswith(f"c.yaml: store.url: expected {expected}, got a string")
    assert "hunter22" not in str(err.value)


def test_a_postgresql_store_url_is_taken_as_written(tmp_path: Path) -> None:
    """Not a path: nothing is resolved against the config file's directory."""
    url = "postgresql://audit:pw@db.internal:5432/audit"
    config = load_config(write(tmp_path, f"store: {{url: '{url}'}}\nproviders: [{{provider_id: p, "
                               "instances: [{id: a, base_url: 'http://127.0.0.1:9'}]}]\n"))
    assert config.store.url == url


def test_an_empty_value_or_an_empty_variable_takes_the_default(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_ADMIN_KEY", raising=False)
    monkeypatch.setenv("PORT", "18080")
    monkeypatch.setenv("CHECK_HEALTH", "off")
    config = load_config(write(tmp_path, """
        server: {port: "${PORT}", admin_key: "${NO_ADMIN_KEY:-}", api_keys: ["", k-123456], host: }
        health: {enabled: "${CHECK_HEALTH}", interval_s:}
        routing: {session_header: X-Conversation}
        providers:
          - provider_id: llama-cpp
            api_key: sk-provider
            instances:
              - {id: a, base_url: "http://127.0.0.1:1", api_key: "", fingerprint: , metadata: }
    """))
    assert config.server.port == 18080 and config.server.host == "127.0.0.1"
    assert config.server.admin_key is None and config.server.api_keys == ("k-123456",)
    assert config.health.enabled is False and config.health.interval_s == 5.0
    assert config.routing.session_header == "x-conversation"
    inst = config.instances[0]
    assert inst.api_key == "sk-provider" and inst.fingerprint == "auto" and inst.model is None
    assert inst.server == "llamacpp"  # guessed from the provider id


@pytest.mark.parametrize("path,key,value", [
    (("server",), "api_keys", ["k-123456", True]),
    (("server",), "admin_key", True),
    (_INSTANCE, "api_key", False),
    (_INSTANCE, "headers", {"Authorization": True}),
    (("providers", 0), "api_key", True),
])
def test_a_bad_value_under_a_secret_key_is_described_not_quoted(
        path: tuple[str | int, ...], key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_set(_VALID, path, key, value), "c.yaml")
    message = str(err.value)
    assert f".{key}" in message or message.startswith(f"c.yaml: {key}"), message
    assert message.endswith("expected a string, got a boolean"), message


_KEYS = sorted({key for _, model in _mappings(DocumentSpec) for key in model.model_fields})
_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
            | st.sampled_from(["", "auto", "off", "TOOLS", "yes", "1e3", "http://h:1", "https://h",
                               "sqlite:///x.db", "${HOME}", "${UNSET_IN_THIS_TEST}", "${X:-7}"]))


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(_KEYS) | st.text(max_size=4), inner, max_size=4)


_ANY_VALUE = st.recursive(_SCALARS, _containers, max_leaves=12)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), value=_ANY_VALUE)
def test_any_value_under_any_key_gives_a_config_or_a_config_error(data: st.DataObject,
                                                                  value: Any) -> None:
    path, model = data.draw(st.sampled_from(_mappings(DocumentSpec)))
    # mostly a key this mapping has, so that the value itself is judged
    key = data.draw(st.sampled_from(sorted(model.model_fields)) | st.sampled_from(_KEYS))
    try:
        parse_config(_set(_VALID, path, key, value), "c.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("c.yaml: ") and "Traceback" not in str(exc)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(document=_ANY_VALUE)
def test_any_document_gives_a_config_or_a_config_error(document: Any) -> None:
    try:
        parse_config(document, "c.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("c.yaml: ")


@pytest.mark.parametrize("url", ["http://user:hunter2-secret@redis.example:6379/0",
                                 "redis://:hunter2-secret@h:port/0",
                                 "redis://:hunter2-secret@h:6379/zero", "redis://"])
def test_a_state_url_that_is_not_redis_is_refused_without_quoting_its_password(url: str) -> None:
    doc = {**_VALID, "state": {"url": url}}
    with pytest.raises(ConfigError) as err:
        parse_config(doc, "c.yaml")
    message = str(err.value)
    assert message.startswith("c.yaml: state.url: expected a redis://HOST:PORT/DB url"), message
    assert "hunter2-secret" not in message


def test_the_password_of_a_state_url_is_a_secret_to_scrub() -> None:
    config = parse_config({**_VALID, "state": {"url": "redis://:hunter2-secret@h:6379/0"}},
                          "c.yaml")
    assert "hunter2-secret" in config_secrets(config)
    assert "hunter2-secret" not in repr(config.state)
