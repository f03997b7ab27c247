"""wrk: make sure it is installed, run it with a POST body, parse its --latency report."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench_lib.procs import Supervisor

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TIME = re.compile(r"^([\d.]+)(us|ms|s|m|h)$")


def ensure_tool(name: str) -> str:
    """Path of the program `name`; installs the Debian package of that name when it is
    missing (we are root)."""
    path = shutil.which(name)
    if path:
        return path
    print(f"bench: {name} not found; installing it with apt-get", flush=True)
    cmd = ["apt-get", "install", "-y", "-q", name]
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if subprocess.run(cmd, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
        subprocess.run(cmd, env=env, check=True)
    path = shutil.which(name)
    if not path:
        raise RuntimeError(f"{name} is still missing after apt-get install -y {name}")
    return path


def ensure_wrk() -> str:
    """Path of wrk (installed when missing)."""
    return ensure_tool("wrk")


def wrk_version(path: str) -> str:
    out = subprocess.run([path, "-v"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].split(" [")[0] if first else "wrk (unknown version)"


def write_post_script(path: Path, body: bytes, headers: dict[str, str] | None = None) -> Path:
    """A wrk Lua script sending `body` as a JSON POST on every request."""
    text = body.decode()
    extra = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        + extra
        + f"wrk.body = [{eq}[{text}]{eq}]\n"
    )
    return path


@dataclass
class WrkResult:
    url: str
    connections: int
    duration_s: float
    requests: int = 0
    #: How long the run really lasted, as wrk reports it ("N requests in 10.01s").
    elapsed_s: float = 0.0
    rps: float = 0.0
    p50_ms: float | None = None
    p75_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    returncode: int = 0
    stderr: str = ""
    #: CPU seconds a watched process (the server under test) used during the run.
    cpu_s: float = 0.0
    raw: str = ""

    @property
    def error_count(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def problems(self) -> str:
        """Non-empty when wrk reported something other than clean 2xx answers."""
        parts = []
        if self.returncode != 0:
            parts.append(f"wrk exit {self.returncode}")
        if self.non_2xx:
            parts.append(f"{self.non_2xx} non-2xx")
        errs = {k: v for k, v in self.socket_errors.items() if v}
        if errs:
            parts.append("socket errors " + ", ".join(f"{k} {v}" for k, v in errs.items()))
        if self.requests == 0:
            parts.append("no requests completed")
        if self.stderr.strip():
            parts.append("stderr: " + self.stderr.strip().splitlines()[-1][:120])
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("raw")
        return data


def _seconds(token: str) -> float:
    m = _TIME.match(token.strip())
    if not m:
        raise ValueError(f"unparsable wrk time {token!r}")
    return float(m.group(1)) * _UNITS_S[m.group(2)]


def parse_wrk(text: str, result: WrkResult) -> WrkResult:
    """Fill `result` from wrk's --latency report."""
    result.raw = text
    in_dist = False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("Latency Distribution"):
            in_dist = True
            continue
        if in_dist:
            m = re.match(r"^(\d+)%\s+(\S+)$", s)
            if m:
                if m.group(1) in ("50", "75", "90", "99"):
                    setattr(result, f"p{m.group(1)}_ms", _seconds(m.group(2)) * 1e3)
                continue
            in_dist = False
        if s.startswith("Latency"):
            parts = s.split()
            if len(parts) >= 4:
                result.max_ms = _seconds(parts[3]) * 1e3
        _summary_line(s, result)
    return result


def _summary_line(s: str, result: WrkResult) -> None:
    """Fill `result` from one of the report's summary lines (any other line is left)."""
    m = re.match(r"^(\d+) requests in ([\d.]+\w+),", s)
    if m:
        result.requests = int(m.group(1))
        result.elapsed_s = _seconds(m.group(2))
    m = re.match(r"^Socket errors: (.*)$", s)
    if m:
        for item in m.group(1).split(","):
            name, _, count = item.strip().partition(" ")
            result.socket_errors[name] = int(count)
    m = re.match(r"^Non-2xx or 3xx responses: (\d+)$", s)
    if m:
        result.non_2xx = int(m.group(1))
    m = re.match(r"^Requests/sec:\s+([\d.]+)$", s)
    if m:
        result.rps = float(m.group(1))


def run_wrk(sup: Supervisor, wrk: str, url: str, script: Path, connections: int,
            duration_s: int, threads: int = 1, timeout_s: float = 10.0) -> WrkResult:
    """One wrk run against `url`; wrk is a child of `sup`, so Ctrl-C stops it too."""
    import subprocess as sp

    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", f"--timeout={timeout_s:g}s",
           "--latency", "-s", str(script), url]
    child = sup.spawn(f"wrk-c{connections}", cmd, stdout=sp.PIPE, log=True)
    result = WrkResult(url=url, connections=connections, duration_s=duration_s)
    try:
        out, _ = child.proc.communicate(timeout=duration_s + 30)
    except sp.TimeoutExpired:
        sup.stop([child])
        result.returncode = -1
        result.stderr = "wrk did not finish in time"
        return result
    sup.stop([child])
    result.returncode = child.proc.returncode or 0
    result.stderr = child.log_tail(5)
    return parse_wrk(out.decode(errors="replace"), result)
