#!/usr/bin/env python3
"""`make run`: three simulated backends and the proxy on config/demo.yaml, in the foreground.

The simulators are separate processes with PID files under .run/, so you can kill one
and watch the proxy fail over; `kill -USR1 $(cat .run/demo.pid)` starts every killed
simulator again. Ctrl-C, SIGTERM or SIGHUP stops everything and removes the PID files.

Environment: PROXY_PORT (8080); DEMO_SIM_PORTS=P1,P2,P3 runs the simulators on other ports
(the proxy then gets a copy of demo.yaml under the run directory with those addresses);
DEMO_RUN_DIR (.run).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import yaml

ROOT = Path(__file__).resolve().parent.parent
RUN = Path(os.environ.get("DEMO_RUN_DIR") or ROOT / ".run").absolute()
CONFIG = ROOT / "config" / "demo.yaml"
PROXY_PORT = int(os.environ.get("PROXY_PORT", "8080"))
SIMULATORS = [  # (name, port, model): must match config/demo.yaml
    ("primary", 18101, "demo-model"),
    ("secondary", 18102, "demo-model"),
    ("cloud", 18103, "demo-cloud"),
]
#: Signals that stop the demo, and the one that brings killed simulators back.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RESTART_SIGNAL = signal.SIGUSR1


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: process for port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"demo: nothing listening on port {port} after {timeout:g}s")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def simulators() -> list[tuple[str, int, str]]:
    ports = os.environ.get("DEMO_SIM_PORTS")
    if not ports:
        return SIMULATORS
    given = [int(p) for p in ports.split(",")]
    if len(given) != len(SIMULATORS):
        raise SystemExit(f"demo: DEMO_SIM_PORTS needs {len(SIMULATORS)} ports")
    return [(name, port, model) for (name, _, model), port in zip(SIMULATORS, given, strict=True)]


def config_for(sims: list[tuple[str, int, str]]) -> Path:
    """config/demo.yaml, or (other simulator ports) a copy of it with their addresses."""
    if sims == SIMULATORS:
        return CONFIG
    doc = yaml.safe_load(CONFIG.read_text())
    ports = {default: port for (_, default, _), (_, port, _) in zip(SIMULATORS, sims, strict=True)}
    for provider in doc["providers"]:
        for inst in provider["instances"]:
            for default, port in ports.items():
                inst["base_url"] = inst["base_url"].replace(f":{default}", f":{port}")
    path = RUN / "demo.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class Demo:
    """The child processes, and what the signals asked for."""

    def __init__(self, sims: list[tuple[str, int, str]]) -> None:
        self.sims = sims
        self.sim_procs: dict[str, subprocess.Popen[bytes]] = {}
        self.reported: set[str] = set()
        self.stop_signal: int | None = None
        self.restart = False

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == RESTART_SIGNAL:
            self.restart = True
        else:
            self.stop_signal = signum

    def start_sim(self, name: str, port: int, model: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "simulate", "--port", str(port),
                                 "--model", model, "--chunk-delay", "0.05"],
                                stdout=subprocess.DEVNULL, cwd=ROOT)
        self.sim_procs[name] = proc
        (RUN / f"{name}.pid").write_text(f"{proc.pid}\n")
        return proc

    def watch_simulators(self) -> None:
        """Say once when a simulator has stopped, and how to bring it back."""
        for name, port, _ in self.sims:
            proc = self.sim_procs[name]
            if proc.poll() is not None and name not in self.reported:
                self.reported.add(name)
                print(f"\ndemo: the {name} simulator (:{port}) has stopped; the proxy fails "
                      f"over around it. To start it again:\n"
                      f"  kill -USR1 $(cat {RUN}/demo.pid)\n", flush=True)

    def restart_stopped(self) -> None:
        self.restart = False
        for name, port, model in self.sims:
            if self.sim_procs[name].poll() is None:
                continue
            if not port_free(port):
                print(f"demo: cannot restart {name}: port {port} is busy", flush=True)
                continue
            wait_for_port(port, self.start_sim(name, port, model))
            self.reported.discard(name)
            print(f"demo: the {name} simulator is back on :{port}", flush=True)


def check_ports(sims: list[tuple[str, int, str]]) -> None:
    """Exit with one line when a port the demo needs is taken."""
    for _, port, _ in sims:
        if not port_free(port):
            raise SystemExit(f"demo: port {port} is busy (a demo already running?)")
    if not port_free(PROXY_PORT):
        raise SystemExit(f"demo: port {PROXY_PORT} is busy; set PROXY_PORT=... to use another")


def run_until_stopped(demo: Demo, proxy: subprocess.Popen[bytes]) -> int:
    """Watch the proxy and the simulators until a stop signal (0) or the proxy exits (its
    code); bring stopped simulators back when asked."""
    while demo.stop_signal is None:
        if proxy.poll() is not None:
            return proxy.returncode
        demo.watch_simulators()
        if demo.restart:
            demo.restart_stopped()
        time.sleep(0.1)
    print(f"\ndemo: {signal.Signals(demo.stop_signal).name}: stopping the proxy and "
          "the simulators", flush=True)
    return 0


def stop_all(procs: list[subprocess.Popen[bytes]], names: list[str]) -> None:
    """SIGTERM every child still running, wait (kill after 10 s), remove the PID files."""
    for sig in STOP_SIGNALS:  # a second Ctrl-C must not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for name in names:
        (RUN / f"{name}.pid").unlink(missing_ok=True)


def main() -> int:
    RUN.mkdir(parents=True, exist_ok=True)
    sims = simulators()
    check_ports(sims)
    demo = Demo(sims)
    # Every stop signal alike: the children are stopped and the PID files removed (the
    # default SIGTERM or SIGHUP action would end this process and orphan them).
    for sig in (*STOP_SIGNALS, RESTART_SIGNAL):
        signal.signal(sig, demo.on_signal)
    proxy: subprocess.Popen[bytes] | None = None
    try:
        (RUN / "demo.pid").write_text(f"{os.getpid()}\n")
        for name, port, model in sims:
            demo.start_sim(name, port, model)
        for name, port, _ in sims:
            wait_for_port(port, demo.sim_procs[name])
        config = config_for(sims)
        proxy = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config",
                                  str(config), "--port", str(PROXY_PORT),
                                  "--log-format", "console"], cwd=ROOT)
        (RUN / "proxy.pid").write_text(f"{proxy.pid}\n")
        wait_for_port(PROXY_PORT, proxy)
        ports = {f"{name}_port": port for name, port, _ in sims}
        shown = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config
        print(INSTRUCTIONS.format(port=PROXY_PORT, run=RUN, config=shown, **ports), flush=True)
        return run_until_stopped(demo, proxy)
    finally:
        procs = list(demo.sim_procs.values())
        if proxy is not None:
            procs.insert(0, proxy)
        stop_all(procs, ["demo", "proxy", *(name for name, _, _ in sims)])


INSTRUCTIONS = """
================================================================================
 failover-proxy demo: http://127.0.0.1:{port}/v1
   local:primary   -> simulator on :{primary_port} (demo-model)
   local:secondary -> simulator on :{secondary_port} (demo-model)
   cloud:default   -> simulator on :{cloud_port} (demo-cloud, the last resort)
 Status page: http://127.0.0.1:{port}/ui   (or: .venv/bin/failover-proxy status --url http://127.0.0.1:{port})
 Audit trail (the demo's own store, beside its config):
   .venv/bin/failover-proxy events --config {config}   (--sum --since 1h: tokens)

 Send a request (curl):
   curl -si http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
     -d '{{"model": "auto", "messages": [{{"role": "user", "content": "hello"}}]}}'

 Or with the OpenAI SDK (pip install openai):
   python -c 'from openai import OpenAI; c = OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="none"); r = c.chat.completions.with_raw_response.create(model="auto", messages=[{{"role": "user", "content": "hello"}}]); print(r.headers["x-route-instance"], r.parse().choices[0].message.content)'

 See a failover: kill the primary, send the same request again, and look at the
 x-route-instance header (now local:secondary), or at the status page's timeline:
   kill $(cat {run}/primary.pid)
 Bring every killed simulator back:
   kill -USR1 $(cat {run}/demo.pid)
 Or switch a fault on at run time (hang, 503, die mid-stream...), and off again:
   curl -s localhost:{secondary_port}/_sim/faults -d '{{"faults": ["status=503"]}}'
   curl -s localhost:{secondary_port}/_sim/faults -d '{{"faults": []}}'

 Ctrl-C (or SIGTERM) stops the proxy and the simulators.
================================================================================
"""


if __name__ == "__main__":
    raise SystemExit(main())
