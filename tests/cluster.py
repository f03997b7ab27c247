"""Real processes for end-to-end tests: simulators and the proxy started through the CLI,
and the test helpers for them (a free port, waiting for a listener or for a condition);
tests/conftest.py has their in-process, asyncio counterparts."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.05) -> None:
    """Poll (blocking) until `predicate()` is true; fails after `timeout` seconds saying
    `what` it waited for (a callable: worked out only then, e.g. with a log's tail)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0,
                   log: Path | None = None) -> None:
    """Wait until `port` accepts connections; fail with the process's output if it exits."""

    def listening() -> bool:
        if proc.poll() is not None:
            if log is not None:
                out = log.read_text(errors="replace")[-3000:]
            else:
                out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"process exited with {proc.returncode}:\n{out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_until(listening, timeout, f"something listening on {port}")


class Cluster:
    """Simulator processes plus a proxy process in front of them, all via `python -m proxy`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.sims: dict[str, tuple[int, subprocess.Popen[bytes] | None]] = {}
        self.proxy_port = free_port()

    def start_sim(self, name: str, model: str, *faults: str, listen: bool = True,
                  options: tuple[str, ...] = ()) -> int:
        """Start a simulator process (or, with listen=False, just reserve a dead port)."""
        port = free_port()
        proc = None
        if listen:
            args = [sys.executable, "-m", "proxy", "simulate", "--port", str(port), "--model",
                    model, *options]
            for fault in faults:
                args += ["--fault", fault]
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
            self.procs.append(proc)
            wait_listening(port, proc)
        self.sims[name] = (port, proc)
        return port

    def kill_sim(self, name: str) -> None:
        proc = self.sims[name][1]
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)

    def start_proxy(self, order: list[tuple[str, str]], *extra_args: str,
                    instance_extra: dict[str, dict[str, Any]] | None = None,
                    **sections: object) -> None:
        """Serve the named simulators in this order; `instance_extra` adds keys per instance."""
        extra = instance_extra or {}
        doc: dict[str, object] = {
            "server": {"host": "127.0.0.1", "port": self.proxy_port},
            # Generous enough for a simulator's first byte on a loaded machine; a hang
            # still costs only these 5 s (tests/test_e2e_cli.py bounds it at 15).
            "timeouts": {"connect_s": 1, "first_byte_s": 5, "idle_s": 5, "total_s": 30},
            "retry": {"max_retry_after_s": 2},
            "store": {"url": f"sqlite:///{self.tmp}/audit.db"},
            "providers": [{"provider_id": "local", "instances": [
                {"id": name, "base_url": f"http://127.0.0.1:{self.sims[name][0]}",
                 "metadata": {"model": model}, **extra.get(name, {})} for name, model in order]}],
            **sections,
        }
        path = self.tmp / "proxy.yaml"
        path.write_text(yaml.safe_dump(doc))
        log = open(self.tmp / "proxy.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path),
                                 *extra_args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(proc)
        self.proxy = proc
        wait_listening(self.proxy_port, proc)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}/v1"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=20)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=20)

    def log(self) -> str:
        return (self.tmp / "proxy.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            if proc.stdout:
                proc.stdout.close()
