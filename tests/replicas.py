"""Several proxy processes (replicas) in front of the same simulators, sharing state through
a real Redis: started through the CLI like any deployment, one config each but for the
port. `store` (the audit store section) is per replica unless the test gives one."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import openai
import yaml

from tests.cluster import ROOT, Cluster, free_port, wait_listening, wait_until


class Replicas:
    """`n` proxies (A, B, C, ...) serving the cluster's simulators in the order given."""

    def __init__(self, cluster: Cluster, redis_url: str, prefix: str, n: int = 3) -> None:
        self.cluster = cluster
        self.redis_url = redis_url
        self.prefix = prefix
        self.ports = [free_port() for _ in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []

    def config(self, n: int, order: list[str], **sections: Any) -> dict[str, Any]:
        tmp = self.cluster.tmp
        doc: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": self.ports[n]},
            "timeouts": {"connect_s": 1, "first_byte_s": 3, "idle_s": 3, "total_s": 30},
            # Probes only at start-up within a test's life: what the replicas know of each
            # other's instances comes from the shared state, not from their own probes.
            "health": {"interval_s": 300, "timeout_s": 1, "cooldown_s": 60,
                       "max_cooldown_s": 120},
            "retry": {"max_retry_after_s": 0},
            "store": {"url": f"sqlite:///{tmp}/audit-{n}.db"},
            "state": {"url": self.redis_url, "prefix": self.prefix, "resync_s": 1,
                      "timeout_s": 0.25},
            "providers": [{"provider_id": "local", "instances": [
                {"id": name, "base_url": f"http://127.0.0.1:{self.cluster.sims[name][0]}",
                 "metadata": {"model": "m"}} for name in order]}],
        }
        for key, value in sections.items():
            doc[key] = {**doc.get(key, {}), **value}
        return doc

    def start(self, order: list[str], **sections: Any) -> None:
        """Start every replica at once, then wait for each to listen and to be linked to
        Redis (what a replica learns before its link is up is its own until the next
        turn: tests about sharing start from linked replicas)."""
        tmp = self.cluster.tmp
        for n in range(len(self.ports)):
            path = tmp / f"replica-{n}.yaml"
            path.write_text(yaml.safe_dump(self.config(n, order, **sections)))
            log = open(self.log_path(n), "wb")  # noqa: SIM115 - closed with the process
            proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config",
                                     str(path)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            self.procs.append(proc)
            self.cluster.procs.append(proc)
        for port, proc, n in zip(self.ports, self.procs, range(len(self.ports)), strict=True):
            wait_listening(port, proc, timeout=30, log=self.log_path(n))
        for n in range(len(self.ports)):
            wait_until(partial(self._linked, n), 30, f"replica {n} linked to Redis")

    def _linked(self, n: int) -> bool:
        status, body = self.call(n, "GET", "/readyz")
        return bool(isinstance(body, dict) and (body.get("shared_state") or {}).get("up"))

    def start_two(self, **sections: Any) -> None:
        """Two simulators of model `m`, `first` and `second` (in that order in every
        replica's config), and the replicas in front of them."""
        self.cluster.start_sim("first", "m")
        self.cluster.start_sim("second", "m")
        self.start(["first", "second"], **sections)

    def log_path(self, n: int) -> Path:
        return self.cluster.tmp / f"replica-{n}.log"

    def log(self, n: int) -> str:
        return self.log_path(n).read_text(errors="replace")

    def url(self, n: int) -> str:
        return f"http://127.0.0.1:{self.ports[n]}"

    def client(self, n: int) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url(n) + "/v1", api_key="unused", max_retries=0,
                             timeout=20)

    def async_client(self, n: int) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url(n) + "/v1", api_key="unused",
                                  max_retries=0, timeout=20)

    def call(self, n: int, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """(status, decoded JSON body) of a plain HTTP call to replica `n`."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url(n) + path, data=data, method=method,
                                         headers={"Content-Type": "application/json",
                                                  **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def instance(self, n: int, name: str) -> dict[str, Any]:
        """Replica `n`'s /admin/instances row of instance `local:name`."""
        status, body = self.call(n, "GET", "/admin/instances")
        assert status == 200, body
        rows = {row["id"]: row for row in body["instances"]}
        return dict(rows[f"local:{name}"])

    def metrics(self, n: int) -> str:
        with urllib.request.urlopen(self.url(n) + "/metrics", timeout=10) as resp:
            return str(resp.read().decode())
