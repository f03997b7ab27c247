"""Who gets in, what is forwarded, and that no secret ever leaves the proxy."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from proxy.config import parse_config
from proxy.sim.text import answer_text
from tests.cluster import ROOT, Cluster, free_port
from tests.conftest import MakeProxy, MakeSim, chat_body

CLIENT_KEY = "cli-SECRET-cccc1111"
ADMIN_KEY = "adm-SECRET-dddd2222"
UPSTREAM_KEY = "sk-up-SECRET-aaaa3333"
HEADER_TOKEN = "tok-SECRET-bbbb4444"
SECRETS = (CLIENT_KEY, ADMIN_KEY, UPSTREAM_KEY, HEADER_TOKEN)


def keyed_config(sims: list[Any], **extra: Any) -> Any:
    return parse_config({
        "server": {"api_keys": [CLIENT_KEY], "admin_key": ADMIN_KEY, **extra.pop("server", {})},
        "health": {"interval_s": 30, "timeout_s": 5, "cooldown_s": 60,
                   "max_cooldown_s": 120},
        "providers": [{"provider_id": "p", "instances": [
            {"id": f"s{n}", "base_url": sim.base_url, "metadata": {"model": sim.model},
             **extra.get(f"s{n}", {})} for n, sim in enumerate(sims)]}],
    }, "<test>")


async def status_of(http: aiohttp.ClientSession, method: str, url: str,
                    key: str | None = None, **kw: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.request(method, url, headers=headers, **kw) as resp:
        body = await resp.read()
        return resp.status, (json.loads(body) if body.startswith(b"{") else body)


async def test_client_keys(make_sim: MakeSim, make_proxy: MakeProxy,
                           http: aiohttp.ClientSession) -> None:
    proxy = await make_proxy(keyed_config([await make_sim()]))
    url = f"{proxy.base_url}/chat/completions"
    for key in (None, "wrong-key-123456", ADMIN_KEY[:-1]):
        status, body = await status_of(http, "POST", url, key, json=chat_body())
        assert status == 401
        assert body["error"]["code"] == "invalid_api_key"
    assert (await status_of(http, "POST", url, CLIENT_KEY, json=chat_body()))[0] == 200
    async with http.post(url, json=chat_body(), headers={"x-api-key": CLIENT_KEY}) as resp:
        assert resp.status == 200
    assert (await status_of(http, "GET", f"{proxy.base_url}/models"))[0] == 401
    assert (await status_of(http, "GET", f"{proxy.base_url}/models", CLIENT_KEY))[0] == 200
    assert (await status_of(http, "GET", f"{proxy.url}/healthz"))[0] == 200
    sdk = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="nope-nope-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await sdk.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])


async def test_admin_needs_the_admin_key(make_sim: MakeSim, make_proxy: MakeProxy,
                                         http: aiohttp.ClientSession) -> None:
    proxy = await make_proxy(keyed_config([await make_sim()], server={"metrics_auth": True}))
    for path in ("/admin/instances", "/admin/events", "/metrics"):
        assert (await status_of(http, "GET", proxy.url + path))[0] == 401
        assert (await status_of(http, "GET", proxy.url + path, CLIENT_KEY))[0] == 403
        assert (await status_of(http, "GET", proxy.url + path, ADMIN_KEY))[0] == 200


async def test_admin_is_off_without_an_admin_key(make_sim: MakeSim, make_proxy: MakeProxy,
                                                 http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    config = parse_config({"server": {"api_keys": [CLIENT_KEY]}, "providers": [
        {"provider_id": "p", "instances": [{"id": "a", "base_url": sim.base_url}]}]})
    proxy = await make_proxy(config)
    status, body = await status_of(http, "GET", f"{proxy.url}/admin/instances", CLIENT_KEY)
    assert status == 403 and body["error"]["code"] == "admin_disabled"


async def test_credentials_forwarded_are_the_instances_own(make_sim: MakeSim,
                                                           make_proxy: MakeProxy,
                                                           http: aiohttp.ClientSession) -> None:
    keyed, bare, passes = await make_sim(), await make_sim(), await make_sim()
    proxy = await make_proxy(keyed_config(
        [keyed, bare, passes],
        s0={"api_key": UPSTREAM_KEY, "headers": {"X-Api-Token": HEADER_TOKEN}},
        s2={"forward_client_auth": True}))
    hop_by_hop = {"Authorization": f"Bearer {CLIENT_KEY}", "Connection": "keep-alive, X-Private",
                  "X-Private": "do-not-forward", "Proxy-Authorization": "Basic Zm9vOmJhcg==",
                  "TE": "trailers", "Upgrade": "h2c"}
    for model, sim in (("p:s0", keyed), ("p:s1", bare), ("p:s2", passes)):
        async with http.post(f"{proxy.base_url}/chat/completions", json=chat_body(model=model),
                             headers=hop_by_hop) as resp:
            assert resp.status == 200
            assert "X-Private" not in resp.headers
        seen = {k.lower(): v for k, v in sim.stats.last_headers.items()}
        assert not {"x-private", "proxy-authorization", "te", "upgrade"} & set(seen)
        if sim is keyed:
            assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
            assert seen["x-api-token"] == HEADER_TOKEN
        elif sim is bare:
            assert "authorization" not in seen  # the client's key stays with the proxy
        else:
            assert seen["authorization"] == f"Bearer {CLIENT_KEY}"  # explicitly allowed


async def test_upstream_refusing_our_key_fails_over(make_sim: MakeSim, make_proxy: MakeProxy,
                                                    http: aiohttp.ClientSession) -> None:
    bad, good = await make_sim(faults=["leak_auth"]), await make_sim("good")
    proxy = await make_proxy(keyed_config([bad, good], s0={"api_key": UPSTREAM_KEY}))
    async with http.post(f"{proxy.base_url}/chat/completions", json=chat_body(),
                         headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as resp:
        assert resp.status == 200
        assert resp.headers["x-route-instance"] == "p:s1"
        assert (await resp.json())["choices"][0]["message"]["content"] == answer_text(
            "good", "hello", 20)


@pytest.fixture
def keyed_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.close()


def test_no_secret_reaches_logs_events_admin_errors_or_check(keyed_cluster: Cluster,
                                                              tmp_path: Path) -> None:
    c = keyed_cluster
    c.start_sim("leaky", "m", "leak_auth")               # 401 quoting the key it got
    c.start_sim("quoting", "m", "leak_auth", "status=400")  # a 400 quoting it: passed through
    c.start_sim("good", "m")
    c.start_proxy([("leaky", "m"), ("good", "m"), ("quoting", "m")],
                  instance_extra={name: {"api_key": UPSTREAM_KEY,
                                         "headers": {"X-Api-Token": HEADER_TOKEN}}
                                  for name in ("leaky", "quoting", "good")},
                  server={"host": "127.0.0.1", "port": c.proxy_port, "api_keys": [CLIENT_KEY],
                          "admin_key": ADMIN_KEY},
                  logging={"format": "json", "level": "debug"},
                  models={"q": {"instances": ["local:quoting"]}})
    seen: list[str] = []

    def call(path: str, key: str | None, body: dict[str, Any] | None = None) -> str:
        request = urllib.request.Request(
            f"http://127.0.0.1:{c.proxy_port}{path}",
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json",
                     **({"Authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(request, timeout=20) as resp:
                text = str(resp.read().decode())
        except urllib.error.HTTPError as err:
            text = err.read().decode()
        seen.append(text)
        return text

    answer = json.loads(call("/v1/chat/completions", CLIENT_KEY, chat_body()))
    assert answer["choices"][0]["message"]["content"]  # served by "good" after "leaky" failed
    passed = call("/v1/chat/completions", CLIENT_KEY, chat_body(model="q"))
    assert "Incorrect API key provided" in passed and "***" in passed
    call("/v1/chat/completions", "wrong-key-999999", chat_body())
    call("/v1/chat/completions", ADMIN_KEY[:-2], chat_body())
    call("/admin/instances", CLIENT_KEY)
    call("/admin/instances", ADMIN_KEY)
    call("/admin/events?limit=1000", ADMIN_KEY)
    call("/metrics", None)
    call("/admin/route", ADMIN_KEY, chat_body())
    c.close()
    seen.append(c.log())
    db_rows = subprocess.run([sys.executable, "-m", "proxy", "events", "--store",
                              f"sqlite:///{tmp_path}/audit.db", "--json", "--limit", "10000"],
                             capture_output=True, text=True, cwd=ROOT, timeout=30, check=False)
    seen.append(db_rows.stdout + db_rows.stderr)
    config_file = tmp_path / "proxy.yaml"
    check = subprocess.run([sys.executable, "-m", "proxy", "check", "--config",
                            str(config_file), "--json"], capture_output=True, text=True,
                           cwd=ROOT, timeout=30, check=False)
    seen.append(check.stdout + check.stderr)
    broken = yaml.safe_load(config_file.read_text())
    broken["providers"][0]["instances"][0]["api_key"] = [UPSTREAM_KEY]  # wrong type
    broken["server"]["admin_key"] = {"x": ADMIN_KEY}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    bad = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config",
                          str(tmp_path / "broken.yaml")], capture_output=True, text=True,
                         cwd=ROOT, timeout=30, check=False)
    assert bad.returncode == 1
    seen.append(bad.stdout + bad.stderr)
    everything = "\n".join(seen)
    assert "REROUTED" in everything and "UPSTREAM_AUTH" in everything  # the run did happen
    for secret in SECRETS:
        assert secret not in everything, f"{secret[:8]}... leaked"


def test_serve_refuses_an_open_public_address_without_keys(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("providers: [{provider_id: p, instances: "
                      "[{id: a, base_url: 'http://127.0.0.1:9'}]}]\n"
                      f"store: {{url: 'sqlite:///{tmp_path}/a.db'}}\n")
    refused = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(config),
                              "--host", "0.0.0.0", "--port", str(free_port())],
                             capture_output=True, text=True, cwd=ROOT, timeout=30, check=False)
    assert refused.returncode == 1
    assert "refusing to listen on 0.0.0.0" in refused.stderr
    port = free_port()
    allowed = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config),
                                "--host", "0.0.0.0", "--port", str(port), "--insecure"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        from tests.cluster import wait_listening
        wait_listening(port, allowed)
    finally:
        allowed.terminate()
        allowed.wait(timeout=10)
        assert allowed.stdout is not None
        allowed.stdout.close()


def test_a_log_line_masks_a_secret_in_any_field_and_passes_short_ones_over() -> None:
    """The log processor searches only values at least as long as the shortest secret (a
    shorter one cannot hold it): a secret is masked wherever it is (a field exactly the
    secret, inside text, in a list or dict, in bytes), and ids, names and numbers pass
    unchanged."""
    from proxy.secrets import MASK, Redactor, redact_log_event, set_log_redactor

    short, long = "tok-123", "sk-up-" + "x" * 40
    redactor = Redactor([long, short, "abc"])  # "abc": too short to be treated as a secret
    assert redactor.shortest == len(short)
    set_log_redactor(redactor)
    try:
        event = redact_log_event(None, "info", {
            "event": "request", "request_id": short, "model": "abc", "instance": "p:s0",
            "detail": f"upstream said: bad key {long}!", "attempts": 2, "cost": 0.5,
            "stream": False, "usage": None, "tried": [{"detail": f"Bearer {short}"}],
            "pair": (short[:-1], long)})
    finally:
        set_log_redactor(Redactor())
    assert event == {
        "event": "request", "request_id": MASK, "model": "abc", "instance": "p:s0",
        "detail": f"upstream said: bad key {MASK}!", "attempts": 2, "cost": 0.5,
        "stream": False, "usage": None, "tried": [{"detail": f"Bearer {MASK}"}],
        "pair": [short[:-1], MASK]}
    assert redactor.data(f"x {short} y".encode()) == f"x {MASK} y".encode()
    assert redactor.data(short[:-1].encode()) == short[:-1].encode()


_LOGGING_SCRIPT = """
import sys
import structlog
from proxy.logs import configure_logging
from proxy.secrets import Redactor, set_log_redactor
key = sys.argv[2]
configure_logging(sys.argv[1], "info")
set_log_redactor(Redactor([key]))
log = structlog.get_logger("t")
try:
    raise ValueError("upstream said: bad key " + key)
except ValueError as exc:
    log.error("traceback_given", exc_info=exc)
    log.exception("traceback_current")
    log.warning("exception_as_a_value", error=exc)
log.info("bytes_value", raw=b"key=" + key.encode())
log.info("set_value", keys={key})
log.info("dict_key", headers={key: "x"})
"""


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_secret_in_an_exception_bytes_a_set_or_a_dict_key_never_reaches_the_log(
        fmt: str) -> None:
    """The log processor masks a key wherever a renderer would write it: in a traceback
    (formatted to text before the scrubbing), an exception or bytes given as a field (the
    renderers write their repr), a set, a dict's keys."""
    done = subprocess.run([sys.executable, "-c", _LOGGING_SCRIPT, fmt, UPSTREAM_KEY],
                          capture_output=True, timeout=60, cwd=ROOT)
    out = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, out
    for event in ("traceback_given", "traceback_current", "exception_as_a_value",
                  "bytes_value", "set_value", "dict_key"):
        assert event in out
    assert "upstream said: bad key ***" in out and "key=***" in out
    assert UPSTREAM_KEY not in out


URL_PASSWORD = "pw-SECRET-eeee5555"


async def test_a_password_in_a_base_url_is_a_secret_in_admin_output(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    """`base_url: http://user:PASSWORD@host/v1` (the config takes it; aiohttp sends it as
    basic auth): the instance listing shows the URL with the password masked, and the
    password is scrubbed like any other configured secret."""
    sim = await make_sim()
    with_password = sim.base_url.replace("http://", f"http://proxy:{URL_PASSWORD}@")
    config = keyed_config([sim], s0={"base_url": with_password})
    from proxy.secrets import config_secrets
    assert URL_PASSWORD in config_secrets(config)
    proxy = await make_proxy(config)
    status, body = await status_of(http, "POST", f"{proxy.base_url}/chat/completions",
                                   CLIENT_KEY, json=chat_body())
    assert status == 200
    status, body = await status_of(http, "GET", f"{proxy.url}/admin/instances", ADMIN_KEY)
    assert status == 200
    text = json.dumps(body)
    assert URL_PASSWORD not in text and "proxy:***@127.0.0.1" in text
