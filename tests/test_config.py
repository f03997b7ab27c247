"""Config loading: YAML and JSON, the seed's providers.json, ${VAR}, base_url forms, errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config, parse_config, split_base_url

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
