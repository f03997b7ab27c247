#!/usr/bin/env python3
"""Three proxy replicas behind nginx, sharing state through Redis (README: "Several replicas").

Installs Debian's `redis-server` and `nginx` when missing (apt-get, as root), then starts,
all on 127.0.0.1 and all under the run directory: redis-server (:6379), two simulators
(:18201, :18202), three replicas of config/replicas.yaml (:8181, :8182, :8183) and nginx
(:8080) balancing over them round-robin. Then it checks that it works:

1. requests through nginx are answered, by all three replicas;
2. an instance drained through replica 1's admin API gets no request through nginx at all
   (each replica learned of the drain through Redis), and is back after an enable.

    .venv/bin/python scripts/replicas_demo.py            # start, check, stay up (Ctrl-C)
    .venv/bin/python scripts/replicas_demo.py --check    # start, check, stop: exit 0 if OK
    .venv/bin/python scripts/replicas_demo.py --check --free-ports   # no fixed port used
    make replicas REPLICAS_ARGS="--check --free-ports"   # the same through make

A fixed port already in use is one line and exit 1, before anything is started.

Environment: DEMO_RUN_DIR (.run/replicas).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "replicas.yaml"
PORTS = {"nginx": 8080, "redis": 6379, "primary": 18201, "secondary": 18202,
         "replica1": 8181, "replica2": 8182, "replica3": 8183}
NGINX_CONF = """\
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    upstream failover_proxy {{
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://failover_proxy;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;          # streamed answers go out as they come
            proxy_read_timeout 600s;
            proxy_next_upstream error;    # a replica that is down: the next one
        }}
    }}
}}
"""


def log(msg: str) -> None:
    print(f"replicas-demo: {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def busy_ports(ports: dict[str, int]) -> list[str]:
    """`name :port` for each of `ports` something already listens on at 127.0.0.1 (a
    llama-server or `make run` on 8080, a system Redis on 6379): the demo's readiness check
    would take that listener for its own process, and its check would then talk to it."""
    taken = []
    for name, port in ports.items():
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                taken.append(f"{name} :{port}")
    return taken


def need(binary: str, package: str) -> str:
    """The path of `binary`, installing Debian's `package` when it is missing."""
    found = shutil.which(binary) or shutil.which(f"/usr/sbin/{binary}")
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit(f"replicas-demo: {binary} is missing: apt-get install {package}")
    log(f"installing {package} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", package]
    if subprocess.run(cmd, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)
    found = shutil.which(binary) or shutil.which(f"/usr/sbin/{binary}")
    if not found:
        raise SystemExit(f"replicas-demo: {binary} still missing after installing {package}")
    return found


class Demo:
    def __init__(self, run: Path, ports: dict[str, int]) -> None:
        self.run = run
        self.ports = ports
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None,
              ) -> None:
        out = open(self.run / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.run,
                                env={**os.environ, **(env or {})})
        out.close()
        self.procs.append((name, proc))
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                tail = (self.run / f"{name}.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"replicas-demo: {name} exited with {proc.returncode}:\n{tail}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"replicas-demo: {name} not listening on {port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    def config(self) -> Path:
        """config/replicas.yaml with this run's addresses, in the run directory (so the
        audit files land there too)."""
        doc = yaml.safe_load(CONFIG.read_text())
        for provider in doc["providers"]:
            for inst in provider["instances"]:
                inst["base_url"] = f"http://127.0.0.1:{self.ports[inst['id']]}/v1"
        path = self.run / "replicas.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def up(self) -> None:
        redis = need("redis-server", "redis-server")
        nginx = need("nginx", "nginx")
        ports, py = self.ports, sys.executable
        self.start("redis", [redis, "--port", str(ports["redis"]), "--bind", "127.0.0.1",
                             "--dir", str(self.run), "--save", "", "--appendonly", "no"],
                   ports["redis"])
        for name in ("primary", "secondary"):
            self.start(name, [py, "-m", "proxy", "simulate", "--port", str(ports[name]),
                              "--model", "demo-model"], ports[name])
        config = self.config()
        redis_url = f"redis://127.0.0.1:{ports['redis']}/0"
        for n in (1, 2, 3):
            port = ports[f"replica{n}"]
            self.start(f"replica{n}", [py, "-m", "proxy", "serve", "--config", str(config),
                                       "--port", str(port)], port,
                       env={"REDIS_URL": redis_url, "REPLICA": str(n)})
        servers = "\n".join(f"        server 127.0.0.1:{ports[f'replica{n}']};"
                            for n in (1, 2, 3))
        conf = self.run / "nginx.conf"
        conf.write_text(NGINX_CONF.format(run=self.run, servers=servers, port=ports["nginx"]))
        self.start("nginx", [nginx, "-p", str(self.run), "-c", str(conf), "-g", "daemon off;"],
                   ports["nginx"])
        log(f"up: nginx on http://127.0.0.1:{ports['nginx']}/v1 -> replicas on "
            + ", ".join(str(ports[f"replica{n}"]) for n in (1, 2, 3))
            + f"; Redis on {ports['redis']}; logs in {self.run}")

    def http(self, method: str, url: str, body: Any = None) -> tuple[dict[str, str], Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=20) as resp:
                return dict(resp.headers), json.loads(resp.read())
        except (OSError, ValueError) as exc:  # urllib's errors are OSErrors
            raise SystemExit(f"replicas-demo: FAILED: {method} {url}: {exc}") from None

    def ask(self) -> tuple[str, str]:
        """(replica id prefix, instance) of one chat completion through nginx."""
        headers, body = self.http("POST", f"http://127.0.0.1:{self.ports['nginx']}/v1/chat/"
                                  "completions", {"model": "auto", "messages": [
                                      {"role": "user", "content": "hello"}]})
        if "x-route-instance" not in headers or not body.get("choices"):
            raise SystemExit("replicas-demo: FAILED: the answer through nginx is not a "
                             f"failover-proxy's: {str(body)[:200]}")
        return headers["x-request-id"][:16], headers["x-route-instance"]

    def state_everywhere(self, instance: str) -> list[str]:
        states = []
        for n in (1, 2, 3):
            _, doc = self.http("GET", f"http://127.0.0.1:{self.ports[f'replica{n}']}"
                               "/admin/instances")
            states += [row["state"] for row in doc["instances"] if row["id"] == instance]
        return states

    def check(self) -> None:
        answers = [self.ask() for _ in range(9)]
        replicas = {prefix for prefix, _ in answers}
        log(f"9 requests through nginx answered by {len(replicas)} replicas: "
            + ", ".join(sorted({inst for _, inst in answers})))
        if len(replicas) != 3:
            raise SystemExit("replicas-demo: FAILED: nginx did not reach all three replicas")
        self.http("POST", f"http://127.0.0.1:{self.ports['replica1']}/admin/instances/"
                  "primary/drain")
        deadline = time.monotonic() + 10
        while set(self.state_everywhere("local:primary")) != {"DRAINED"}:
            if time.monotonic() > deadline:
                raise SystemExit("replicas-demo: FAILED: the drain did not reach every replica")
            time.sleep(0.05)
        served = {self.ask()[1] for _ in range(9)}
        log("drained local:primary through replica 1: 9 requests through nginx went to "
            + ", ".join(sorted(served)))
        if served != {"local:secondary"}:
            raise SystemExit("replicas-demo: FAILED: a drained instance still got traffic")
        self.http("POST", f"http://127.0.0.1:{self.ports['replica2']}/admin/instances/"
                  "primary/enable")
        deadline = time.monotonic() + 10
        while "DRAINED" in self.state_everywhere("local:primary"):
            if time.monotonic() > deadline:
                raise SystemExit("replicas-demo: FAILED: the enable did not reach every replica")
            time.sleep(0.05)
        log("enabled it again through replica 2: back on every replica. OK")


def _stop_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="start, check, stop")
    parser.add_argument("--free-ports", action="store_true",
                        help="ports of the kernel's choosing instead of the fixed ones")
    args = parser.parse_args(argv)
    run = Path(os.environ.get("DEMO_RUN_DIR") or ROOT / ".run" / "replicas").absolute()
    run.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in PORTS} if args.free_ports else dict(PORTS)
    taken = busy_ports(ports)
    if taken:
        raise SystemExit(f"replicas-demo: busy: {', '.join(taken)}; stop what listens there "
                         "(a llama-server, `make run`, another demo?), or use other ports: "
                         "`make replicas REPLICAS_ARGS=--free-ports`")
    demo = Demo(run, ports)
    # SIGINT too, not only Python's default: a demo started in the background by a shell
    # inherits SIGINT ignored, and its children would stop while it waited on.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_signal)
    try:
        demo.up()
        demo.check()
        if not args.check:
            log("running; Ctrl-C stops everything")
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        demo.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
