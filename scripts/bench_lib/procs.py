"""Child processes of the benchmark: simulators, proxies, load generators.

Every child runs in its own session (so a terminal Ctrl-C reaches only the benchmark,
which then stops them in order) and gets SIGTERM from the kernel if the benchmark dies
without cleaning up (PR_SET_PDEATHSIG). `Supervisor.stop_all` kills each child's whole
process group: SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCALHOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def raise_nofile(want: int = 65536) -> int:
    """Raise this process's open-files soft limit as far as allowed; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def _child_setup() -> None:
    # Runs in the child between fork and exec: die with the parent, many open files.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    raise_nofile()


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def listening_ports(pids: Sequence[int]) -> set[int]:
    """TCP ports these processes are listening on (their socket inodes in /proc/net/tcp*).

    Children bind port 0 and we read the port the kernel gave them: no window in which
    another program on this (shared) machine could take a port we picked for a child.
    """
    inodes: set[str] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def group_pids(pgid: int) -> list[int]:
    """Every process in process group `pgid` (a child and what it started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # after the name: state, ppid, pgrp
            pids.append(int(entry))
    return pids


class PortHolder:
    """A port that refuses connections and that no other program can take meanwhile:
    bound, never listening (a SYN to it is answered with a reset)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((LOCALHOST, 0))
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def machine_busy_seconds() -> float:
    """CPU seconds processes on all CPUs have used since boot (/proc/stat)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    # user + nice + system: time that processes used. Interrupt and softirq time (much
    # of loopback networking) and steal are attributed to no process, so they are left out.
    return sum(fields[:3]) / os.sysconf("SC_CLK_TCK")


class StartError(RuntimeError):
    """A child did not come up; the message carries the tail of its log."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path | None
    port: int | None = None
    tags: set[str] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far (/proc/PID/stat)."""
        with open(f"/proc/{self.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        # After the command name: state is field 3, utime field 14, stime field 15.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        """VmRSS of the process, from /proc/PID/status."""
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for {self.name} (pid {self.pid})")


class Supervisor:
    """Starts children, waits for them, and always tears them all down."""

    def __init__(self, workdir: Path, python: str = sys.executable) -> None:
        self.workdir = workdir
        self.python = python
        self.children: list[Child] = []
        self._reaped: list[Child] = []

    # ------------------------------------------------------------------ start

    def spawn(self, name: str, cmd: Sequence[str], *, port: int | None = None,
              env: dict[str, str] | None = None, log: bool = True,
              stdin: int | None = subprocess.DEVNULL, stdout: int | None = None,
              tags: Sequence[str] = (), wrap: Sequence[str] = ()) -> Child:
        """Start `cmd` (behind `wrap`, e.g. valgrind's command line) in a session of its
        own, its output to the work folder's NAME.log (or nowhere: `log=False`)."""
        log_path = self.workdir / f"{name}.log" if log else None
        out = open(log_path, "wb") if log_path is not None else subprocess.DEVNULL
        try:
            # cwd: the work folder, so whatever a child writes to a relative path (the
            # proxy's default audit database, ./data/audit.db) stays out of the project.
            proc = subprocess.Popen(
                [*wrap, *cmd], cwd=self.workdir, stdin=stdin,
                stdout=stdout if stdout is not None else out,
                stderr=out, env=env, start_new_session=True, preexec_fn=_child_setup)
        finally:
            if not isinstance(out, int):
                out.close()  # the child has its own copy
        child = Child(name, proc, log_path, port, set(tags))
        self.children.append(child)
        return child

    def simulator(self, name: str, model: str, *, words: int = 20, chunk_delay: float = 0.0,
                  faults: Sequence[str] = (), tags: Sequence[str] = ()) -> Child:
        """A simulator on a port of the kernel's choosing (known once `wait_ready` returns)."""
        cmd = [self.python, "-m", "proxy", "simulate", "--port", "0", "--model", model,
               "--words", str(words), "--chunk-delay", str(chunk_delay)]
        for fault in faults:
            cmd += ["--fault", fault]
        return self.spawn(name, cmd, tags=tags)

    def proxy(self, name: str, config_text: str, tags: Sequence[str] = (),
              log: bool = True, wrap: Sequence[str] = (), env: dict[str, str] | None = None
              ) -> Child:
        """A proxy on a port of the kernel's choosing (known once `wait_ready` returns).

        `log=False` sends its output (the structured log lines) to /dev/null.
        """
        cfg = self.workdir / f"{name}.json"
        cfg.write_text(config_text)
        cmd = [self.python, "-m", "proxy", "serve", "--config", str(cfg), "--port", "0"]
        return self.spawn(name, cmd, tags=tags, log=log, wrap=wrap, env=env)

    def passthrough(self, name: str, upstream_port: int, tags: Sequence[str] = (),
                    wrap: Sequence[str] = ()) -> Child:
        """The bare aiohttp pass-through (bench_lib/passthrough.py) in front of one backend,
        on a port of the kernel's choosing (known once `wait_ready` returns)."""
        script = Path(__file__).resolve().parent / "passthrough.py"
        cmd = [self.python, str(script), "--port", "0",
               "--upstream", f"http://{LOCALHOST}:{upstream_port}"]
        return self.spawn(name, cmd, tags=tags, wrap=wrap)

    def floor(self, name: str, upstream_port: int, model: str,
              tags: Sequence[str] = (), wrap: Sequence[str] = (), errors: bool = False
              ) -> Child:
        """The least routing proxy (bench_lib/floor.py: clients ask for `main`; `errors`:
        with the proxy's error middleware) in front of one backend serving `model`, on a
        port of the kernel's choosing."""
        script = Path(__file__).resolve().parent / "floor.py"
        cmd = [self.python, str(script), "--port", "0",
               "--upstream", f"http://{LOCALHOST}:{upstream_port}", "--model", model,
               *(["--errors"] if errors else [])]
        return self.spawn(name, cmd, tags=tags, wrap=wrap)

    def bench_simulators(self, model: str, stream_model: str) -> tuple[Child, Child]:
        """The two simulators bench_cpu.py and bench_instructions.py put servers in front
        of: `model` answering 20 words, `stream_model` 50; ready, with their ports."""
        sim = self.simulator("sim", model, words=20)
        stream = self.simulator("sim-stream", stream_model, words=50)
        self.wait_ready([sim, stream], "/v1/models")
        return sim, stream

    def wait_ready(self, children: Sequence[Child], path: str, timeout: float = 30.0) -> None:
        """Wait until every child answers GET `path` with 200 on a port it listens on.

        A child without a port gets the one of its listening ports that answers so.
        """
        deadline = time.monotonic() + timeout
        pending = list(children)
        while pending:
            for child in list(pending):
                if not child.alive():
                    raise StartError(f"{child.name} exited with code {child.proc.returncode}:\n"
                                     + child.log_tail())
                own = listening_ports(group_pids(child.pid))
                candidates = sorted(own) if child.port is None else \
                    [child.port] if child.port in own else []
                for port in candidates:
                    try:
                        status, _ = http_get(f"http://{LOCALHOST}:{port}{path}", 1.0)
                    except OSError:
                        status = 0
                    if status == 200:
                        child.port = port
                        pending.remove(child)
                        break
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                tails = "\n".join(f"--- {c.name}\n{c.log_tail()}" for c in pending)
                raise StartError(f"not ready after {timeout:g}s: {names}\n{tails}")
            time.sleep(0.05)

    # ------------------------------------------------------------------ stop

    def cpu_seconds(self) -> float:
        """CPU used by the benchmark and all its children, live or reaped, so far."""
        t = os.times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in self.children:
            if child.alive():
                try:
                    total += child.cpu_seconds()
                except (OSError, IndexError, ValueError):
                    pass
        return total

    def kill(self, child: Child, sig: int = signal.SIGKILL) -> None:
        """Kill one child's process group at once (a crash, from its peers' point of view)."""
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            pass
        try:
            child.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.proc.wait(timeout=5)

    def terminate(self, child: Child, timeout: float = 30.0) -> int | None:
        """SIGTERM one child and wait up to `timeout` for it to exit on its own (a proxy
        flushes its audit queue first); its exit code, or None if it had to be killed."""
        code: int | None = None
        try:
            os.kill(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            code = child.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        self.stop([child])  # sweeps the group (SIGKILL if still there), bookkeeping
        return code

    def stop(self, children: Sequence[Child], grace: float = 5.0) -> None:
        """SIGTERM each child's group, wait up to `grace`, then SIGKILL what is left."""
        for child in children:
            if child.alive():
                try:
                    os.killpg(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for child in children:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for child in children:
            # The leader may be gone while others in its group are not: always sweep it.
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if child.proc.poll() is None:
                child.proc.wait(timeout=5)
        for child in children:
            if child in self.children:
                self.children.remove(child)
            self._reaped.append(child)

    def stop_tagged(self, tag: str) -> None:
        self.stop([c for c in self.children if tag in c.tags])

    def stop_all(self) -> None:
        self.stop(list(reversed(self.children)))

    def leftovers(self) -> list[str]:
        """Process groups of ours that still have members (should be none after stop_all)."""
        left = []
        for child in self._reaped + self.children:
            try:
                os.killpg(child.pid, 0)
            except ProcessLookupError:
                continue
            except PermissionError:
                pass
            left.append(f"{child.name} (pgid {child.pid})")
        return left
