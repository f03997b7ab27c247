"""`failover-proxy init`: find the model servers running here and write a starter config.

Each usual port is asked the way its server kind answers (the providers' own probes,
proxy/providers/): llama.cpp's `llama-server` on 8080 (`/health` + `/props`), Ollama on
11434 (`/api/tags`), LM Studio on 1234 and vLLM on 8000 (`/v1/models`). Those ports are
the servers' documented defaults (llama.cpp tools/server/README.md `--port`, Ollama's
`OLLAMA_HOST` default 127.0.0.1:11434, LM Studio's local server docs, vLLM's `vllm serve
--port`). A server that answers but lists no model is reported and left out.

The written YAML has one instance per model found (llama.cpp: one, it serves one model),
a commented cloud fallback reading `${OPENAI_API_KEY:-}`, and the proxy on the first free
port from 8081 (8080 is llama-server's default). When nothing answers, the file still
loads: it holds an example llama.cpp instance at port 8080 to start or edit.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
import yaml

from proxy.config import ConfigError, TimeoutsConfig, parse_config
from proxy.failures import UpstreamFailure

#: (server kind, port) probed by default, in this order.
DEFAULT_PORTS: tuple[tuple[str, int], ...] = (
    ("llamacpp", 8080), ("ollama", 11434), ("lmstudio", 1234), ("vllm", 8000))
#: For people.
KIND_NAMES = {"llamacpp": "llama.cpp", "ollama": "Ollama", "lmstudio": "LM Studio",
              "vllm": "vLLM", "openai": "OpenAI-compatible"}
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Probed:
    """What one port said. `models` is empty when nothing usable answered; `note` says
    why (`CONN_REFUSED: ...`, `lists no model`) or, for llama.cpp, the model file."""

    server: str
    host: str
    port: int
    models: tuple[str, ...]
    note: str = ""

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_ports(text: str) -> tuple[tuple[str, int], ...]:
    """`llamacpp=8080,ollama=11434` -> ((kind, port), ...); raises ValueError."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, sep, port = item.partition("=")
        if not sep or kind not in KIND_NAMES or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected KIND=PORT with KIND one of {', '.join(KIND_NAMES)}: "
                             f"{item!r}")
        pairs.append((kind, int(port)))
    return tuple(pairs)


async def discover(host: str, ports: Sequence[tuple[str, int]],
                   timeout_s: float = PROBE_TIMEOUT_S) -> list[Probed]:
    """Probe every (kind, port) on `host` at once; one `Probed` per pair, in order."""
    from proxy.providers.kinds import provider_for
    from proxy.providers.transport import Upstream, make_client

    url_host = f"[{host}]" if ":" in host else host
    config = parse_config({"providers": [
        {"provider_id": f"{kind}-{port}", "server": kind, "instances": [
            {"id": "probe", "base_url": f"http://{url_host}:{port}", "fingerprint": "off"}]}
        for kind, port in ports]}, "<init>") if ports else None
    if config is None:
        return []
    session = make_client(TimeoutsConfig(connect_s=timeout_s))
    upstream = Upstream(session, config.timeouts)

    async def one(index: int) -> Probed:
        kind, port = ports[index]
        inst = config.instances[index]
        try:
            result = await provider_for(inst).probe(upstream, inst, timeout_s)
        except UpstreamFailure as exc:
            return Probed(kind, host, port, (), f"{exc.code}: {exc}")
        served = result.served
        if served is None or not served.models:
            return Probed(kind, host, port, (), f"{result.state}: {result.reason}, lists no model")
        if served.identity:  # (llama.cpp: its alias and its file are one model)
            return Probed(kind, host, port, (served.identity,), served.detail or "")
        return Probed(kind, host, port, served.models)

    try:
        return list(await asyncio.gather(*(one(i) for i in range(len(ports)))))
    finally:
        await session.close()


def label_of(name: str) -> str:
    """A model label for people: llama.cpp's `-m` path becomes its file name without
    `.gguf` (the fingerprint treats both as one model)."""
    if "/" in name and name.endswith(".gguf"):
        name = name.rsplit("/", 1)[1]
    return name[:-5] if name.endswith(".gguf") else name


def slug(name: str) -> str:
    """An instance id from a model name (ids allow letters, digits, `.`, `_`, `-`, `/`)."""
    return re.sub(r"[^A-Za-z0-9._\-]+", "-", label_of(name)).strip("-") or "model"


def free_port(start: int = 8081, avoid: Sequence[int] = ()) -> int:
    """The first port from `start` that 127.0.0.1 can bind and is not in `avoid`."""
    for port in range(start, start + 100):
        if port in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return start


_CLOUD = """\
  # A cloud fallback, tried only when no local server can answer: uncomment, and export
  # OPENAI_API_KEY before `serve` (the key is read from the environment, never stored here).
  # - provider_id: openai
  #   local: false
  #   instances:
  #     - id: default
  #       base_url: https://api.openai.com/v1
  #       api_key: ${OPENAI_API_KEY:-}
  #       metadata: {model: gpt-4o-mini, ctx: 128000, capabilities: [tools, json, vision],
  #                  cost: {input_per_mtok: 0.15, output_per_mtok: 0.6}}
"""


def _q(text: str) -> str:
    """A YAML scalar: JSON's quoted string is a valid YAML double-quoted one."""
    return orjson.dumps(text).decode()


def render(found: Sequence[Probed], host: str, proxy_port: int) -> str:
    """The starter config's YAML text for the servers that listed models (`found`)."""
    lines = [
        f"# Written by `failover-proxy init` on {time.strftime('%Y-%m-%d %H:%M')}.",
        "# Check it: failover-proxy check --config THIS_FILE",
        "# Run it:   failover-proxy serve --config THIS_FILE",
        f"# Clients use http://127.0.0.1:{proxy_port}/v1 with model \"auto\" or a "
        "metadata.model below.",
        "server:",
        "  host: 127.0.0.1",
        f"  port: {proxy_port}",
        "providers:",
    ]
    if not found:
        url_host = f"[{host}]" if ":" in host else host
        lines += [
            "  # Nothing answered when init ran. This example expects llama.cpp's server:",
            "  #   llama-server -m MODEL.gguf --port 8080",
            "  # Edit base_url and model for another server (server: ollama, lmstudio, vllm).",
            "  - provider_id: llamacpp",
            "    server: llamacpp",
            "    instances:",
            "      - id: local",
            f"        base_url: http://{url_host}:8080/v1",
            "        metadata: {model: local-model, capabilities: [prefill]}",
        ]
    for server in dict.fromkeys(p.server for p in found):
        group = [p for p in found if p.server == server]
        lines += [f"  - provider_id: {server}", f"    server: {server}", "    instances:"]
        used: set[str] = set()
        for probed in group:
            for model in probed.models:
                ident = slug(model)
                if len(group) > 1 or ident in used:
                    ident = f"{ident}-{probed.port}"
                used.add(ident)
                # llama.cpp continues a final assistant message (a cut stream's prefill);
                # other servers start a new answer, so only it declares prefill.
                caps = ", capabilities: [prefill]" if server == "llamacpp" else ""
                lines += [f"      - id: {_q(ident)}",
                          f"        base_url: {probed.base_url}/v1",
                          f"        metadata: {{model: {_q(label_of(model))}{caps}}}"]
    return "\n".join(lines) + "\n" + _CLOUD


def describe(probed: Probed) -> str:
    """One line of what a port said, for people."""
    where = f"{KIND_NAMES[probed.server]} on {probed.host}:{probed.port}"
    if not probed.models:
        return f"  {where}: not found ({probed.note})"
    # llama.cpp's note is its model file: said once when it is also the name it serves
    extra = f" ({probed.note})" if probed.note and probed.note not in probed.models else ""
    return f"  {where}: {', '.join(probed.models)}{extra}"


def run(out: str, host: str, force: bool, ports: Sequence[tuple[str, int]]) -> int:
    """The `init` command: probe, print what answered, write `out`. Exit status: 0 when
    written (also when nothing was found), 1 when `out` exists without `force` or cannot
    be written."""
    path = Path(out)
    if path.exists() and not force:
        print(f"init: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    print(f"init: probing {host} ({', '.join(f'{KIND_NAMES[k]} :{p}' for k, p in ports)})",
          flush=True)
    probed = asyncio.run(discover(host, ports))
    for line in map(describe, probed):
        print(line)
    found = [p for p in probed if p.models]
    text = render(found, host, free_port(avoid=[p for _, p in ports]))
    try:
        parse_config(yaml.safe_load(text), out)
    except ConfigError as exc:  # a bug of render(), never the user's
        raise AssertionError(f"init wrote an invalid config: {exc}") from exc
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w" if force else "x", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        print(f"init: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    count = sum(len(p.models) for p in found)
    if found:
        print(f"init: wrote {out} with {count} instance{'s' * (count != 1)} and a commented "
              "cloud fallback.")
    else:
        print(f"init: no model server answered; wrote {out} with an example llama.cpp "
              "instance at port 8080 (start llama-server there or edit it) and a commented "
              "cloud fallback.")
    print(f"next: failover-proxy check --config {out} && failover-proxy serve --config {out}")
    return 0
