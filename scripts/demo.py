#!/usr/bin/env python3
"""`make run`: three simulated backends and the proxy on config/demo.yaml, in the foreground.

The simulators are separate processes with PID files under .run/, so you can kill one
and watch the proxy fail over. Ctrl-C stops everything.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run"
CONFIG = ROOT / "config" / "demo.yaml"
PROXY_PORT = int(os.environ.get("PROXY_PORT", "8080"))
SIMULATORS = [  # (name, port, model): must match config/demo.yaml
    ("primary", 18101, "demo-model"),
    ("secondary", 18102, "demo-model"),
    ("cloud", 18103, "demo-cloud"),
]


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


def main() -> int:
    RUN.mkdir(exist_ok=True)
    for _, port, _ in SIMULATORS:
        if not port_free(port):
            raise SystemExit(f"demo: port {port} is busy (a demo already running?)")
    if not port_free(PROXY_PORT):
        raise SystemExit(f"demo: port {PROXY_PORT} is busy; set PROXY_PORT=... to use another")

    py = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, port, model in SIMULATORS:
            proc = subprocess.Popen([py, "-m", "proxy", "simulate", "--port", str(port),
                                     "--model", model, "--chunk-delay", "0.05"],
                                    stdout=subprocess.DEVNULL, cwd=ROOT)
            procs.append(proc)
            (RUN / f"{name}.pid").write_text(f"{proc.pid}\n")
        for (_, port, _), proc in zip(SIMULATORS, procs, strict=True):
            wait_for_port(port, proc)

        proxy = subprocess.Popen([py, "-m", "proxy", "serve", "--config", str(CONFIG),
                                  "--port", str(PROXY_PORT), "--log-format", "console"], cwd=ROOT)
        procs.append(proxy)
        wait_for_port(PROXY_PORT, proxy)
        print(INSTRUCTIONS.format(port=PROXY_PORT, run=RUN.relative_to(ROOT)), flush=True)
        return proxy.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        for name, _, _ in SIMULATORS:
            (RUN / f"{name}.pid").unlink(missing_ok=True)


INSTRUCTIONS = """
================================================================================
 failover-proxy demo: http://127.0.0.1:{port}/v1
   local:primary   -> simulator on :18101 (demo-model)
   local:secondary -> simulator on :18102 (demo-model)
   cloud:default   -> simulator on :18103 (demo-cloud, the last resort)

 Send a request (curl):
   curl -si http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
     -d '{{"model": "auto", "messages": [{{"role": "user", "content": "hello"}}]}}'

 Or with the OpenAI SDK:
   .venv/bin/python -c 'from openai import OpenAI; c = OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="none"); r = c.chat.completions.with_raw_response.create(model="auto", messages=[{{"role": "user", "content": "hello"}}]); print(r.headers["x-route-instance"], r.parse().choices[0].message.content)'

 See a failover: kill the primary, send the same request again, and look at the
 x-route-instance header (now local:secondary):
   kill $(cat {run}/primary.pid)
 Or switch a fault on at run time (hang, 503, die mid-stream...), and off again:
   curl -s localhost:18102/_sim/faults -d '{{"faults": ["status=503"]}}'
   curl -s localhost:18102/_sim/faults -d '{{"faults": []}}'

 Ctrl-C stops the proxy and the simulators.
================================================================================
"""


if __name__ == "__main__":
    raise SystemExit(main())
