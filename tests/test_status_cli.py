"""`failover-proxy status`: the running proxy's view as a terminal table, run as a real
process against a proxy on a real port."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import yaml

from tests.cluster import ROOT, free_port
from tests.conftest import MakeProxy, MakeSim, chat_body, proxy_config

ADMIN = "adm-key-for-the-status-cli"


async def status(*args: str, env: dict[str, str] | None = None,
                 cwd: Path = ROOT) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *(args if args[:1] == ("events",) else ("status", *args)),
        cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PROXY_ADMIN_KEY": "", "PYTHONPATH": str(ROOT), **(env or {})})
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_status_shows_instances_circuits_load_and_the_latest_reroutes(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    a, b = await make_sim("demo-model"), await make_sim("demo-model")
    # A cooldown far beyond the status process's start-up (seconds on a busy machine), so
    # the circuit is still open, not half-open, when it asks.
    proxy = await make_proxy(proxy_config([a, b], server={"admin_key": ADMIN},
                                          health={"enabled": False, "cooldown_s": 120,
                                                  "max_cooldown_s": 120}))
    a.set_faults(["refuse"])
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy.base_url}/chat/completions", json=chat_body()) as resp:
        assert resp.headers["x-route-instance"] == "p1:s1"
        request_id = resp.headers["x-request-id"]
    code, out, err = await status("--url", proxy.url, "--admin-key", ADMIN)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"failover-proxy 0.1.0 at {proxy.url}")
    header = next(line for line in lines if line.startswith("INSTANCE"))
    assert header.split() == ["INSTANCE", "STATE", "CIRCUIT", "LOAD", "LATENCY", "FINGERPRINT",
                              "REASON"]
    p0 = next(line for line in lines if line.startswith("p0:s0")).split()
    assert p0[1:4] == ["UNKNOWN", "open", "0"]
    assert "CONN_REFUSED" in " ".join(p0)
    p1 = next(line for line in lines if line.startswith("p1:s1")).split()
    assert p1[1:4] == ["UNKNOWN", "closed", "0"] and "ms" in p1
    assert any(line.startswith("since start") and "1 request (ok 1)" in line
               and "1 reroute (CONN_REFUSED 1)" in line for line in lines)
    reroute = next(line for line in lines if " REROUTED " in line)
    assert "CONN_REFUSED" in reroute and "p0:s0 -> p1:s1" in reroute and request_id in reroute
    assert ADMIN not in out


async def test_status_takes_the_address_and_key_from_the_config(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    a = await make_sim()
    proxy = await make_proxy(proxy_config([a], server={"admin_key": ADMIN}))
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump({
        "server": {"host": "0.0.0.0", "port": proxy.port, "admin_key": "${MY_ADMIN_KEY}",
                   "api_keys": ["client-key-1"]},
        "providers": [{"provider_id": "p0", "instances": [{"id": "s0", "base_url": a.base_url}]}]}))
    code, out, err = await status("--config", str(path), env={"MY_ADMIN_KEY": ADMIN})
    assert (code, err) == (0, "")
    assert f"at http://127.0.0.1:{proxy.port}" in out and "p0:s0" in out
    code, out, err = await status("--url", proxy.url, env={"PROXY_ADMIN_KEY": ADMIN})
    assert code == 0 and "p0:s0" in out


async def test_status_and_events_in_the_directory_of_init_s_config_need_no_arguments(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    # The quickstart: `init` writes ./failover-proxy.yaml (the proxy on 8081, as llama-server
    # has 8080), `serve --config failover-proxy.yaml`; then plain `status` and `events` must
    # find that proxy and its audit store, not ask :8080 or read another file.
    a = await make_sim()
    store = tmp_path / "elsewhere" / "audit.db"
    proxy = await make_proxy(proxy_config([a], server={"admin_key": ADMIN},
                                          store={"url": f"sqlite:///{store}"}))
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy.base_url}/chat/completions", json=chat_body()) as resp:
        request_id = resp.headers["x-request-id"]
    (tmp_path / "failover-proxy.yaml").write_text(yaml.safe_dump({
        "server": {"port": proxy.port, "admin_key": ADMIN},
        "store": {"url": f"sqlite:///{store}"},
        "providers": [{"provider_id": "p0", "instances": [{"id": "s0", "base_url": a.base_url}]}]}))
    code, out, err = await status(cwd=tmp_path)
    assert (code, err) == (0, ""), err
    assert out.startswith(f"failover-proxy 0.1.0 at http://127.0.0.1:{proxy.port}")
    assert "p0:s0" in out
    deadline = asyncio.get_running_loop().time() + 30  # the writer process batches rows
    while True:
        code, out, err = await status("events", "--request-id", request_id, cwd=tmp_path)
        if code == 0 and "REQUEST_COMPLETED" in out:
            break
        assert asyncio.get_running_loop().time() < deadline, (code, out, err)
        await asyncio.sleep(0.2)
    code, out, err = await status("--url", f"http://127.0.0.1:{free_port()}", cwd=tmp_path)
    assert code == 1 and "no proxy answers" in err  # --url wins over the file


async def test_status_explains_a_missing_key_or_proxy_in_one_line(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    a = await make_sim()
    proxy = await make_proxy(proxy_config([a], server={"admin_key": ADMIN}))
    code, out, err = await status("--url", proxy.url)
    assert (code, out) == (1, "")
    assert err == (f"status: {proxy.url} refused the admin key (HTTP 401): give --admin-key "
                   "or set PROXY_ADMIN_KEY\n")
    nobody = f"http://127.0.0.1:{free_port()}"
    code, out, err = await status("--url", nobody, "--admin-key", ADMIN)
    assert (code, out) == (1, "")
    assert err.startswith(f"status: no proxy answers at {nobody}") and err.count("\n") == 1
    code, out, err = await status("--url", f"{a.base_url}")  # a simulator is no proxy
    assert code == 1 and "is this a failover-proxy?" in err and err.count("\n") == 1
    code, _, err = await status("--url", proxy.url, "--interval", "0")
    assert code == 2 and "--interval" in err


async def test_status_watch_redraws_until_interrupted(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    a = await make_sim()
    proxy = await make_proxy(proxy_config([a]))
    # started with SIGINT ignored, as a shell's background job is (and a CI step may be):
    # Ctrl-C must stop it all the same
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "status", "--url", proxy.url, "--watch",
        "--interval", "0.1", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.stdout is not None
    pages = 0
    while pages < 3:
        line = await proc.stdout.readline()
        assert line, "status --watch exited early"
        pages += line.startswith(b"failover-proxy ")
    proc.send_signal(signal.SIGINT)
    out, err = await proc.communicate()
    assert proc.returncode == 0 and b"Traceback" not in err
