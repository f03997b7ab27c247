"""What an operator runs into first: `serve` on a busy port, `events` from another
directory, stopping `make run` with a signal, a killed demo simulator, what `make run`
installs, /metrics' series, what the wheel ships, and a clone that needs nothing outside
itself. Real processes and sockets throughout."""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import aiohttp
import pytest
import trustme
import yaml

from tests.cluster import ROOT, free_port, wait_listening
from tests.conftest import MakeProxy, MakeSim, chat_body, proxy_config


def write_config(path: Path, sim_url: str, **sections: object) -> Path:
    path.write_text(yaml.safe_dump({
        "health": {"enabled": False},
        "providers": [{"provider_id": "p", "instances": [
            {"id": "s", "base_url": sim_url, "metadata": {"model": "sim-model"}}]}],
        **sections}))
    return path


# ------------------------------------------------------------------ serve

def test_serve_on_a_busy_port_says_so_in_one_line_and_exits_1(tmp_path: Path) -> None:
    config = write_config(tmp_path / "proxy.yaml", "http://127.0.0.1:9")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        for workers in ("1", "2"):
            done = subprocess.run(
                [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port",
                 str(port), "--workers", workers], cwd=ROOT, capture_output=True, timeout=60)
            assert done.returncode == 1
            assert done.stdout == b""  # never announced
            assert done.stderr.decode().splitlines() == [
                f"serve: cannot listen on 127.0.0.1:{port}: address already in use "
                "(is another proxy, or `make run`, using it?)"]


def test_serve_announces_only_once_it_is_listening(tmp_path: Path) -> None:
    config = write_config(tmp_path / "proxy.yaml", "http://127.0.0.1:9",
                          store={"url": f"sqlite:///{tmp_path}/audit.db"})
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config),
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith(f"failover-proxy 0.1.0 serving on http://127.0.0.1:{port}/v1 "
                               "(1 instance, config ")
        # the moment it says so, the port answers (no wait, no retry)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        proc.stdout.close()  # type: ignore[union-attr]


# ------------------------------------------------------------------ relative paths

async def test_a_relative_store_url_is_beside_the_config_whatever_the_working_directory(
        make_sim: MakeSim, tmp_path: Path) -> None:
    sim = await make_sim()
    conf_dir = tmp_path / "etc" / "proxy"
    conf_dir.mkdir(parents=True)
    config = write_config(conf_dir / "proxy.yaml", sim.base_url,
                          store={"url": "sqlite:///./state/audit.db"})
    elsewhere = tmp_path / "somewhere-else"
    elsewhere.mkdir()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config",
                             os.path.relpath(config, elsewhere), "--port", str(port)],
                            cwd=elsewhere, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        async with aiohttp.ClientSession() as http, http.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json=chat_body()) as resp:
            assert resp.status == 200
            request_id = resp.headers["x-request-id"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # the audit queue is flushed on the way out
    assert (conf_dir / "state" / "audit.db").exists()
    assert not (elsewhere / "state").exists()
    # `events --config` from yet another directory finds the same database
    done = subprocess.run([sys.executable, "-m", "proxy", "events", "--config", str(config),
                           "--request-id", request_id, "--json"], cwd=tmp_path, env=env,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert b'"REQUEST_COMPLETED"' in done.stdout


def test_relative_tls_files_are_beside_the_config(tmp_path: Path) -> None:
    ca = trustme.CA()
    conf_dir = tmp_path / "conf"
    (conf_dir / "certs").mkdir(parents=True)
    ca.cert_pem.write_to_path(str(conf_dir / "certs" / "ca.pem"))
    config = conf_dir / "proxy.yaml"
    config.write_text(yaml.safe_dump({"providers": [{"provider_id": "p", "instances": [
        {"id": "s", "base_url": "https://127.0.0.1:9", "tls": {"ca_file": "certs/ca.pem"}}]}]}))
    from proxy.config import load_config

    loaded = load_config(os.path.relpath(config))  # from the tests' working directory
    tls = loaded.instances[0].tls
    assert tls is not None and tls.ca_file == str(conf_dir / "certs" / "ca.pem")
    assert loaded.store.url == f"sqlite:///{conf_dir}/data/audit.db"  # the default, too


# ------------------------------------------------------------------ the demo

class DemoOutput:
    """The demo's stdout read with a deadline: a line that never comes (the demo waits for
    something that will not happen, or exited) fails the test with what was said, the
    demo's stderr included, instead of blocking it forever."""

    def __init__(self, proc: subprocess.Popen[bytes], stderr: Path) -> None:
        assert proc.stdout is not None
        self.proc, self.fd, self.stderr, self.text = proc, proc.stdout.fileno(), stderr, b""
        #: What the demo printed up to ` Ctrl-C` (its banner), once started.
        self.banner = ""

    def until(self, marker: bytes, timeout: float = 60.0) -> str:
        """Everything said up to the end of the line with `marker`; consumed."""
        deadline = time.monotonic() + timeout
        while marker not in self.text or b"\n" not in self.text[self.text.index(marker):]:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, left))
            chunk = os.read(self.fd, 65536) if ready else b""
            if not chunk:
                raise AssertionError(
                    f"the demo did not say {marker!r} "
                    f"({'it exited' if ready else f'within {timeout:g}s'}); it said:\n"
                    f"{self.text.decode(errors='replace')}\nstderr:\n"
                    f"{self.stderr.read_text(errors='replace')[-3000:]}")
            self.text += chunk
        end = self.text.index(b"\n", self.text.index(marker)) + 1
        said, self.text = self.text[:end], self.text[end:]
        return said.decode(errors="replace")


def start_demo(tmp_path: Path) -> tuple[subprocess.Popen[bytes], dict[str, int], Path,
                                         DemoOutput]:
    run = tmp_path / "run"
    ports = [free_port() for _ in range(3)]
    proxy_port = free_port()
    env = {**os.environ, "DEMO_RUN_DIR": str(run), "PROXY_PORT": str(proxy_port),
           "DEMO_SIM_PORTS": ",".join(map(str, ports))}
    stderr = tmp_path / "demo.stderr"
    with stderr.open("wb") as err:  # the children's too: why a simulator stopped, if it did
        proc = subprocess.Popen([sys.executable, "scripts/demo.py"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=err)
    out = DemoOutput(proc, stderr)
    out.banner = out.until(b"\n Ctrl-C")
    pids = {name: int((run / f"{name}.pid").read_text())
            for name in ("demo", "proxy", "primary", "secondary", "cloud")}
    assert pids["demo"] == proc.pid
    return proc, pids, run, out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_demo_stops_every_process_and_removes_its_pid_files_on_a_signal(
        tmp_path: Path, sig: signal.Signals) -> None:
    proc, pids, run, _ = start_demo(tmp_path)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert f"demo: {sig.name}: stopping the proxy and the simulators".encode() in out
    for name, pid in pids.items():
        assert not alive(pid), f"{name} (pid {pid}) outlived the demo"
    assert list(run.glob("*.pid")) == []


def test_the_events_command_the_demo_prints_shows_the_demo_s_requests(tmp_path: Path) -> None:
    # `failover-proxy events` run plainly in the clone reads ./data/audit.db, while the
    # demo's store is beside its config: the banner gives the command that reads it.
    proc, _, run, out = start_demo(tmp_path)
    banner = out.banner.splitlines()
    try:
        found = re.search(r"failover-proxy demo: http://127\.0\.0\.1:(\d+)/v1", out.banner)
        assert found, banner
        port = int(found.group(1))
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
            data=b'{"model": "auto", "messages": [{"role": "user", "content": "hello"}]}',
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            request_id = resp.headers["x-request-id"]
        command = next(line.split("(")[0].split() for line in banner
                       if "failover-proxy events --config" in line)
        assert command[0] == ".venv/bin/failover-proxy"
        deadline = time.monotonic() + 30  # the audit writer batches its rows
        while True:
            done = subprocess.run([sys.executable, "-m", "proxy", *command[1:],
                                   "--request-id", request_id], cwd=ROOT, capture_output=True,
                                  text=True, timeout=60, check=False)
            if "REQUEST_COMPLETED" in done.stdout:
                break
            assert time.monotonic() < deadline, done.stdout + done.stderr
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_demo_says_how_to_bring_back_a_killed_simulator_and_does(tmp_path: Path) -> None:
    proc, pids, run, out = start_demo(tmp_path)
    again = None
    try:
        # A primary already gone (and reaped by the demo's 0.1 s poll) is the state this
        # kill aims at: what follows checks the demo saw it and brings it back all the same.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids["primary"], signal.SIGKILL)
        told = out.until(b"kill -USR1")
        assert "the primary simulator" in told and "has stopped" in told
        assert f"kill -USR1 $(cat {run}/demo.pid)" in told
        proc.send_signal(signal.SIGUSR1)
        out.until(b"the primary simulator is back")
        again = int((run / "primary.pid").read_text())
        assert again != pids["primary"] and alive(again)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert again is not None and not alive(again) and list(run.glob("*.pid")) == []


# ------------------------------------------------------------------ packaging

def test_make_run_installs_what_running_needs_and_make_test_the_rest(tmp_path: Path) -> None:
    def planned(target: str) -> str:
        done = subprocess.run(["make", "-n", target, f"VENV={tmp_path}/venv"], cwd=ROOT,
                              capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.decode()

    run = planned("run")
    assert "pip install --quiet -e .\n" in run
    assert "[test" not in run and "dev]" not in run and "apt-get" not in run
    test = planned("test")
    assert "pip install --quiet -e '.[test,dev]'" in test
    assert "chromium" in test


def test_the_wheel_ships_the_status_page_and_the_example_configs(tmp_path: Path) -> None:
    # built from a copy of the sources, so that the build leaves nothing in the clone
    source = tmp_path / "src"
    shutil.copytree(ROOT / "proxy", source / "proxy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "--quiet", "-w", str(tmp_path / "dist"),
                           str(source)], capture_output=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    (wheel,) = (tmp_path / "dist").glob("failover_proxy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("proxy/ui/index.html", "proxy/ui/app.js", "proxy/ui/style.css",
                 "proxy/examples/demo.yaml", "proxy/examples/example.yaml"):
        assert name in names, f"{name} is not in {wheel.name}"


def test_nothing_in_the_clone_reads_files_outside_it() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    # a path into the steering repo's shared/ folder, beside the clone (spelled in two
    # pieces so that this file does not match itself)
    outside = ("../" + "shared/", "/work/" + "shared")
    hits = [name for name in tracked if not name.endswith(".png")
            and any(o in (ROOT / name).read_text(errors="replace") for o in outside)]
    assert hits == []
    assert (ROOT / "tests" / "fixtures" / "providers.json").exists()


# ------------------------------------------------------------------ metrics

async def test_metrics_carry_no_created_series_and_outcomes_in_one_case(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim()
    proxy = await make_proxy(proxy_config([sim], models={"nowhere": {"tags": ["no-such-tag"]}}))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.base_url}/chat/completions", json=chat_body()) as resp:
            assert resp.status == 200
        async with http.post(f"{proxy.base_url}/chat/completions",
                             json=chat_body(model="nowhere")) as resp:
            assert resp.status == 503
        sim.set_faults(["status=503"])
        async with http.post(f"{proxy.base_url}/chat/completions", json=chat_body()) as resp:
            assert resp.status == 502
        async with http.get(f"{proxy.url}/metrics") as resp:
            text = await resp.text()
    assert "_created" not in text
    outcomes = {line.split('outcome="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("failover_proxy_requests_total{")}
    assert outcomes == {"ok", "route_blocked", "all_attempts_failed"}
    assert all(o == o.lower() for o in outcomes)
