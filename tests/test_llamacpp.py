"""End to end against real llama.cpp: `llama-server` processes (built by `make llama`) loading
tiny random-weight GGUF models (scripts/make_tiny_gguf.py), the proxy started through the
CLI in front of them, and the official `openai` SDK as the client.

The models' text is gibberish but deterministic: with `temperature: 0` two servers loading
the same file write the same answer, so "what the client got" can be compared with "what
a server writes alone". Every request sets `max_tokens` (without it a server fills its
context).

`make test` builds the server first; run `make llama` before running this file alone
(`LLAMA_SERVER=/path/to/llama-server` uses another binary). tiny-a and tiny-b load in
milliseconds; tiny-slow and tiny-slow-utf8 take about a second to load (so /health answers
503 for a while) and about 6 ms a token (so a stream can be cut mid-answer).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.cluster import ROOT, Cluster, free_port, wait_until

pytestmark = pytest.mark.e2e

BUILD_SCRIPT = ROOT / "scripts" / "build_llama_server.sh"
PROMPT = "tell me about failover"
#: Models written by `make llama` into the cache, beside the server binary.
MODELS = ("tiny-a", "tiny-b", "tiny-slow", "tiny-slow-utf8")


@dataclass(frozen=True)
class Llama:
    binary: Path
    models: Path

    def model(self, name: str) -> Path:
        return self.models / f"{name}.gguf"


def _script(arg: str) -> str:
    return subprocess.run(["bash", str(BUILD_SCRIPT), arg], check=True, capture_output=True,
                          text=True, timeout=30).stdout.strip()


@pytest.fixture(scope="module")
def llama() -> Llama:
    """The server binary and models; a clear failure (never a skip) when they are missing."""
    binary = Path(os.environ.get("LLAMA_SERVER") or _script("--path"))
    found = Llama(binary, Path(_script("--cache")) / "models")
    missing = [str(p) for p in (binary, *(found.model(m) for m in MODELS)) if not p.exists()]
    if missing:
        pytest.fail("llama.cpp is not built or its test models are missing "
                    f"({', '.join(missing)}): run `make llama` (`make test` runs it first)",
                    pytrace=False)
    return found


class LlamaServer:
    """One `llama-server` process on a fixed port (it can be restarted on the same port)."""

    def __init__(self, llama: Llama, tmp: Path, name: str) -> None:
        self.llama = llama
        self.tmp = tmp
        self.name = name
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, model: str, alias: str | None = None, *extra: str,
              wait: bool = True) -> subprocess.Popen[bytes]:
        args = [str(self.llama.binary), "-m", str(self.llama.model(model)),
                "--host", "127.0.0.1", "--port", str(self.port),
                "-c", "1024", "-np", "1", "-t", "1", "--no-webui", *extra]
        if alias is not None:
            args += ["--alias", alias]
        self.starts += 1
        log = open(self.tmp / f"llama-{self.name}-{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        if wait:
            self.wait_ready()
        return self.proc

    def log(self) -> str:
        return (self.tmp / f"llama-{self.name}-{self.starts}.log").read_text(errors="replace")

    def health(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return None

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"llama-server {self.name} exited with "
                                     f"{self.proc.returncode}:\n{self.log()[-3000:]}")
            return self.health() == 200

        try:
            wait_until(ready, timeout, f"llama-server {self.name} to be ready", 0.02)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.log()[-3000:]}") from None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def props(self) -> dict[str, Any]:
        return dict(get_json(self.url + "/props"))

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                             timeout=30)


class Bench:
    """llama servers plus the proxy (a tests.cluster.Cluster) in front of them."""

    def __init__(self, llama: Llama, tmp: Path) -> None:
        self.llama = llama
        self.tmp = tmp
        self.cluster = Cluster(tmp)
        self.servers: dict[str, LlamaServer] = {}

    def server(self, name: str) -> LlamaServer:
        srv = LlamaServer(self.llama, self.tmp, name)
        self.servers[name] = srv
        return srv

    def start_proxy(self, order: list[str], *, models: dict[str, str] | None = None,
                    prefill: tuple[str, ...] = (), **sections: object) -> None:
        """The proxy with these servers in this order, probed as llama.cpp every 0.3 s."""
        models = models or {}
        extra: dict[str, dict[str, Any]] = {}
        for name in order:
            meta: dict[str, Any] = {}
            if name in models:
                meta["model"] = models[name]
            if name in prefill:
                meta["capabilities"] = ["prefill"]
            extra[name] = {"server": "llamacpp", "fingerprint": "auto", "metadata": meta}
            self.cluster.sims[name] = (self.servers[name].port, None)
        doc: dict[str, object] = {
            "health": {"interval_s": 0.3, "timeout_s": 1.0},
            "timeouts": {"connect_s": 1, "first_byte_s": 10, "idle_s": 5, "total_s": 60},
        }
        doc.update(sections)
        self.cluster.start_proxy([(n, models.get(n, "")) for n in order],
                                 instance_extra=extra, **doc)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.cluster.base_url, api_key="unused", max_retries=0,
                             timeout=30)

    def admin(self, path: str) -> Any:
        return get_json(f"http://127.0.0.1:{self.cluster.proxy_port}{path}")

    def instance(self, name: str) -> dict[str, Any]:
        for inst in self.admin("/admin/instances")["instances"]:
            if inst["id"] == f"local:{name}":
                return dict(inst)
        raise AssertionError(f"no instance local:{name}")

    def wait_instance(self, name: str, predicate: Any, what: str,
                      timeout: float = 10.0) -> dict[str, Any]:
        seen = [self.instance(name)]

        def matches() -> bool:
            seen[0] = self.instance(name)
            return bool(predicate(seen[0]))

        try:
            wait_until(matches, timeout, f"local:{name}: {what}", 0.02)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen {json.dumps(seen[0])}\n"
                                 f"{self.cluster.log()[-3000:]}") from None
        return seen[0]

    def close(self) -> None:
        self.cluster.close()
        for srv in self.servers.values():
            srv.stop()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


@pytest.fixture
def bench(llama: Llama, tmp_path: Path) -> Iterator[Bench]:
    b = Bench(llama, tmp_path)
    yield b
    b.close()


def chat_args(prompt: str = PROMPT, max_tokens: int = 24, **extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": max_tokens, **extra}


def ask(client: openai.OpenAI, stream: bool, **kw: Any) -> tuple[str, str | None]:
    """(answer text, x-route-instance) of one chat request."""
    raw = client.chat.completions.with_raw_response.create(**chat_args(**kw), stream=stream)
    parsed = raw.parse()
    if isinstance(parsed, openai.Stream):
        text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
    else:
        text = parsed.choices[0].message.content or ""
    return text, raw.headers.get("x-route-instance")


# --- 1. a server killed between two requests of a session ---------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_primary_killed_mid_session_next_request_served_by_second(bench: Bench,
                                                                   stream: bool) -> None:
    primary, secondary = bench.server("primary"), bench.server("secondary")
    primary.start("tiny-a", "tiny-a")
    secondary.start("tiny-b", "tiny-b")
    bench.start_proxy(["primary", "secondary"], models={"primary": "tiny-a",
                                                         "secondary": "tiny-b"})
    client = bench.client()
    session = {"extra_headers": {"x-session-id": "s1"}}

    text1, first = ask(client, stream, prompt="first question", **session)
    assert first == "local:primary"
    assert text1 == ask(primary.client(), stream, prompt="first question")[0]

    primary.kill()
    text2, second = ask(client, stream, prompt="second question", **session)
    assert second == "local:secondary"
    assert text2 and text2 == ask(secondary.client(), stream, prompt="second question")[0]
    assert text2 != text1


# --- 2. a server restarted with another model at the same address -------------------------

@pytest.mark.parametrize("alias", ["named", "unnamed", "same-alias"])
def test_restart_with_other_model_is_mismatch_and_traffic_moves(bench: Bench,
                                                                alias: str) -> None:
    """The primary is restarted on its port with another model file. `named`: each model
    served under its own --alias; `unnamed`: no --alias, the server names the model by
    the path it loaded; `same-alias`: the new file is served under the old alias (a
    service whose command line keeps `--alias` while the file behind it changes), where
    only /props' model_path tells the models apart."""
    aliases = {"named": ("tiny-a", "tiny-b"), "unnamed": (None, None),
               "same-alias": ("local-llm", "local-llm")}[alias]
    primary, secondary = bench.server("primary"), bench.server("secondary")
    primary.start("tiny-a", aliases[0])
    secondary.start("tiny-a", aliases[0])
    bench.start_proxy(["primary", "secondary"])
    pinned_inst = bench.wait_instance("primary", lambda i: i["fingerprint"] is not None,
                                      "a pinned fingerprint")
    pinned = pinned_inst["fingerprint"]
    assert pinned == primary.props()["model_alias"]
    client = bench.client()
    assert ask(client, False)[1] == "local:primary"

    primary.kill()
    primary.start("tiny-b", aliases[1])  # same port, another model file
    props = primary.props()
    assert props["model_path"].endswith("tiny-b.gguf")
    try:
        inst = bench.wait_instance("primary", lambda i: i["state"] == "MISMATCH", "MISMATCH",
                                   timeout=3)
    except AssertionError as exc:
        now = bench.instance("primary")
        raise AssertionError(
            f"/props now says model_alias={props['model_alias']!r}, "
            f"model_path={props['model_path']!r} (was {pinned_inst['fingerprint_detail']!r}); "
            f"the proxy pinned {pinned!r} and still has local:primary {now['state']} "
            f"({now['last_probe_error'] or 'no probe error'})") from exc
    reason = inst["last_probe_error"]
    assert reason and pinned in reason and props["model_alias"] in reason, inst
    assert inst["routable"] is False

    for stream in (False, True):
        text, instance = ask(client, stream)
        assert instance == "local:secondary"
        assert text == ask(secondary.client(), stream)[0]


# --- 3. a stream cut mid-answer, continued on a twin ----------------------------------------

def sse_events(lines: Iterator[str]) -> Iterator[str]:
    """`data:` payloads of a server-sent event stream."""
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


def cut_and_continue(bench: Bench, model: str, kill_after: int) -> dict[str, Any]:
    """Stream through the proxy from `primary`, SIGKILL it after `kill_after` content chunks
    have reached the client, and read the rest (continued by `twin`, same model file,
    `prefill` declared). Then ask the twin alone the same request. Returns what was seen."""
    primary, twin = bench.server("primary"), bench.server("twin")
    primary.start(model, model, wait=False)  # about a second each: load them in parallel
    twin.start(model, model, wait=False)
    primary.wait_ready()
    twin.wait_ready()
    bench.start_proxy(["primary", "twin"], models={"primary": model, "twin": model},
                      prefill=("twin",))
    bench.wait_instance("twin", lambda i: i["fingerprint"] is not None, "a pinned fingerprint")
    args = chat_args("a long story please", max_tokens=200, stream=True,
                     stream_options={"include_usage": True})

    payloads: list[str] = []
    delivered: str | None = None
    pieces: list[str] = []
    with bench.client().chat.completions.with_streaming_response.create(**args) as resp:
        instance = resp.headers["x-route-instance"]
        for payload in sse_events(resp.iter_lines()):
            payloads.append(payload)
            pieces += _contents([payload])
            if delivered is None and len(pieces) == kill_after:
                delivered = "".join(pieces)
                primary.kill()
    assert delivered is not None, f"the stream ended before {kill_after} content chunks"

    # The reference: the twin alone, same request (no prompt cache, to be independent).
    alone = list(twin.client().chat.completions.create(
        **{**args, "model": model, "extra_body": {"cache_prompt": False}}))
    return {
        "instance": instance,
        "payloads": payloads,
        "chunks": [json.loads(p) for p in payloads if p != "[DONE]"],
        "text": "".join(_contents(payloads)),
        "delivered": delivered,
        "alone": "".join(c.choices[0].delta.content or "" for c in alone if c.choices),
        "alone_usage": next(c.usage for c in alone if c.usage is not None),
        "alone_roles": sum(1 for c in alone if c.choices and c.choices[0].delta.role),
        "resumed": _events(bench, "STREAM_RESUMED"),
    }


def assert_one_answer(seen: dict[str, Any]) -> None:
    """What must hold whatever the text: one stream, cut on the primary, resumed on the twin."""
    payloads, chunks = seen["payloads"], seen["chunks"]
    assert seen["instance"] == "local:primary"
    assert len(seen["resumed"]) == 1, seen["resumed"]
    assert payloads.count("[DONE]") == 1 and payloads[-1] == "[DONE]"
    assert len({c["id"] for c in chunks}) == 1
    # llama-server stamps each chunk with the current second, so the primary's own chunks
    # (relayed as they are) may differ; the twin's, spliced in, carry the first one's.
    carried, spliced, n = seen["resumed"][0]["detail"]["chars_carried"], [], 0
    for c in chunks:
        if n >= carried:
            spliced.append(c)
        n += sum(len(ch.get("delta", {}).get("content") or "") for ch in c["choices"])
    assert spliced and {c["created"] for c in spliced} == {chunks[0]["created"]}
    # llama-server sends no role chunk at all when its answer starts with a character
    # of several tokens (it drops the first, held-back, partial result): as many as alone.
    roles = [ch for c in chunks for ch in c["choices"] if ch.get("delta", {}).get("role")]
    assert len(roles) == seen["alone_roles"] <= 1
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"]
                if ch.get("finish_reason")]
    assert finishes == ["length"]
    assert sum(1 for c in chunks if c.get("usage")) == 1
    # The primary was really cut mid-answer, and the twin continued by prefill.
    assert seen["text"].startswith(seen["delivered"])
    assert len(seen["text"]) > len(seen["delivered"])
    resumed = seen["resumed"]
    assert resumed[0]["from_instance"] == "local:primary"
    assert resumed[0]["to_instance"] == "local:twin"
    assert resumed[0]["detail"]["mode"] == "prefill"


def test_stream_cut_by_killed_server_is_continued_on_twin(bench: Bench) -> None:
    """One character is one token in this model, so the delivered text, sent back as a
    prefill, is exactly the token sequence the primary had generated."""
    seen = cut_and_continue(bench, "tiny-slow", kill_after=5)
    assert_one_answer(seen)
    # Nothing delivered twice, nothing lost: exactly the twin's own answer.
    text, alone = seen["text"], seen["alone"]
    assert text == alone, _divergence(text, alone, seen["delivered"])
    usage = next(c["usage"] for c in seen["chunks"] if c.get("usage"))
    assert usage["completion_tokens"] == seen["alone_usage"].completion_tokens == 200
    assert usage["prompt_tokens"] == seen["alone_usage"].prompt_tokens


def test_stream_cut_with_multi_token_characters_keeps_the_token_budget(bench: Bench) -> None:
    """Here é, 世 and 🙂 are written as 2, 3 and 4 byte tokens, and llama-server holds an
    incomplete character back and sends it in one chunk once complete (it never splits a
    character across chunks): one chunk can be several tokens. The continued answer must
    still be the twin's own answer, no longer than `max_tokens` allows."""
    seen = cut_and_continue(bench, "tiny-slow-utf8", kill_after=60)
    assert_one_answer(seen)
    text, alone, delivered = seen["text"], seen["alone"], seen["delivered"]
    assert any(ch in TOKENS_PER_CHAR for ch in delivered), \
        f"no multi-token character before the cut: {delivered!r}"
    carried = text[:seen["resumed"][0]["detail"]["chars_carried"]]
    tokens = sum(TOKENS_PER_CHAR.get(ch, 1) for ch in carried)
    usage = next(c["usage"] for c in seen["chunks"] if c.get("usage"))
    assert text == alone, (
        f"{_divergence(text, alone, delivered)}\n"
        f"The primary had sent {len(carried)} content chunks holding {tokens} tokens; the "
        f"continuation was asked for max_tokens={200 - len(carried)} (200 minus chunks), so "
        f"{tokens + 200 - len(carried)} tokens were generated for max_tokens=200: the "
        f"client got {len(text) - len(alone)} characters more than the twin's own answer. "
        f"Usage sent to the client: {usage} (the twin alone: {seen['alone_usage']}).")


#: Characters of the tiny-slow-utf8 model written with several (byte) tokens.
TOKENS_PER_CHAR = {"é": 2, "世": 3, "🙂": 4}


def _contents(payloads: list[str]) -> Iterator[str]:
    for p in payloads:
        if p == "[DONE]":
            continue
        for ch in json.loads(p).get("choices", []):
            content = ch.get("delta", {}).get("content")
            if content:
                yield content


def _events(bench: Bench, type_: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        events = bench.admin(f"/admin/events?type={type_}")["events"]
        if events or time.monotonic() > deadline:
            return list(events)
        time.sleep(0.05)


def _divergence(got: str, want: str, delivered: str) -> str:
    n = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
             min(len(got), len(want)))
    return (f"client text differs from the twin's own answer at char {n} (the primary had "
            f"delivered {len(delivered)} chars): got {got[max(0, n - 20):n + 40]!r}, "
            f"want {want[max(0, n - 20):n + 40]!r}")


# --- 4. LOADING while a server loads its model ----------------------------------------------

def test_loading_state_while_server_loads_then_ready(bench: Bench) -> None:
    """The proxy is up first (the instance DOWN), then the server starts: it listens at once
    and answers /health 503 while it loads tiny-slow's 300,000-token vocabulary."""
    slow = bench.server("slow")
    bench.start_proxy(["slow"])
    bench.wait_instance("slow", lambda i: i["state"] == "DOWN", "DOWN before start")
    seen: list[str] = []
    reasons: list[str | None] = []
    health: list[int | None] = []
    stop = threading.Event()

    def watch_health() -> None:
        while not stop.is_set():
            health.append(slow.health())
            time.sleep(0.01)

    slow.start("tiny-slow", "tiny-slow", wait=False)
    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            inst = bench.instance("slow")
            state = inst["state"]
            if not seen or seen[-1] != state:
                seen.append(state)
                reasons.append(inst["last_probe_error"])
            if state == "READY":
                break
            time.sleep(0.01)
    finally:
        stop.set()
        watcher.join()
    assert 503 in health, f"the server never answered /health 503 while loading: {health}"
    assert "LOADING" in seen and seen[-1] == "READY", seen
    assert seen.index("LOADING") < seen.index("READY")
    assert "503" in str(reasons[seen.index("LOADING")]), list(zip(seen, reasons, strict=True))
    text, instance = ask(bench.client(), True)
    assert instance == "local:slow" and text


# --- 5. a prompt too long for one server's context --------------------------------------------

def test_context_overflow_reroutes_to_a_larger_context_and_the_window_is_learned(
        bench: Bench) -> None:
    """llama-server answers a prompt over its `-c` with 400 `exceed_context_size_error`
    (n_ctx stated): the proxy goes on to the larger server, and, the config declaring no
    `ctx`, plans the next such prompt without the small one."""
    small, large = bench.server("small"), bench.server("large")
    small.start("tiny-a", "tiny-a", "-c", "256")
    large.start("tiny-a", "tiny-a")  # -c 1024
    bench.start_proxy(["small", "large"])
    # About 500 prompt tokens in tiny-a's vocabulary (over 256; under 1024 with the answer);
    # 325 by the planner's estimate (500 characters / 4 + max_tokens), which plans compare.
    prompt, budget = "word " * 100, 200
    with pytest.raises(openai.BadRequestError) as direct:
        small.client().chat.completions.create(**chat_args(prompt, max_tokens=budget))
    assert "exceeds the available context size (256 tokens)" in str(direct.value)

    raw = bench.client().chat.completions.with_raw_response.create(
        **chat_args(prompt, max_tokens=budget))
    assert raw.headers["x-route-instance"] == "local:large"
    assert raw.headers["x-route-attempts"] == "2"
    assert raw.parse().choices[0].message.content == \
        large.client().chat.completions.create(**chat_args(prompt, max_tokens=budget)) \
        .choices[0].message.content
    learned = bench.instance("small")
    assert (learned["ctx"], learned["ctx_source"]) == (256, "learned")

    request = urllib.request.Request(
        f"http://127.0.0.1:{bench.cluster.proxy_port}/admin/route",
        json.dumps(chat_args(prompt, max_tokens=budget)).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        plan = json.loads(resp.read())
    assert plan["rejected"]["local:small"] == \
        f"ctx=256(learned)<{plan['requirements']['ctx_needed']}"
    raw = bench.client().chat.completions.with_raw_response.create(
        **chat_args(prompt, max_tokens=budget))
    assert (raw.headers["x-route-instance"], raw.headers["x-route-attempts"]) == \
        ("local:large", "1")


# --- 6. the Responses and Messages APIs in front of real llama.cpp servers -------------------

def test_responses_and_messages_clients_get_the_servers_answer_and_fail_over(
        bench: Bench) -> None:
    """`client.responses` and the `anthropic` SDK, through the proxy, get exactly what the
    server writes for the same chat request (greedy decoding), whole and streamed; its
    `/v1/messages/count_tokens` counts with the server's tokenizer; and with the primary
    killed, both are served by the second server."""
    import anthropic

    primary, secondary = bench.server("primary"), bench.server("secondary")
    primary.start("tiny-a", "tiny-a")
    secondary.start("tiny-b", "tiny-b")
    bench.start_proxy(["primary", "secondary"], models={"primary": "tiny-a",
                                                         "secondary": "tiny-b"})
    proxy = bench.client()
    claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{bench.cluster.proxy_port}",
                                 api_key="unused", max_retries=0, timeout=30)
    server_text = ask(primary.client(), False, max_tokens=16)[0]
    assert server_text

    raw = proxy.responses.with_raw_response.create(model="auto", input=PROMPT,
                                                   max_output_tokens=16, temperature=0)
    assert raw.headers["x-route-instance"] == "local:primary"
    assert raw.parse().output_text == server_text
    events = list(proxy.responses.create(model="auto", input=PROMPT, max_output_tokens=16,
                                         temperature=0, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    # 16 tokens are not the whole answer: incomplete (the SDK's stream helper wants a
    # response.completed, as with OpenAI's own API).
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == deltas == server_text

    ask_claude = {"model": "auto", "max_tokens": 16, "extra_body": {"temperature": 0},
                  "messages": [{"role": "user", "content": PROMPT}]}
    message = claude.messages.create(**ask_claude)  # type: ignore[call-overload]
    assert message.content[0].text == server_text and message.stop_reason == "max_tokens"
    with claude.messages.stream(**ask_claude) as stream:  # type: ignore[arg-type]
        assert "".join(stream.text_stream) == server_text

    counted = claude.messages.count_tokens(model="auto", system="be brief",
                                           messages=[{"role": "user", "content": PROMPT}])
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": PROMPT}]}
    prompt = _post_json(primary.url + "/apply-template", chat)["prompt"]
    tokens = _post_json(primary.url + "/tokenize", {"content": prompt})["tokens"]
    assert counted.input_tokens == len(tokens) > 0

    primary.kill()
    raw = proxy.responses.with_raw_response.create(model="auto", input=PROMPT,
                                                   max_output_tokens=16, temperature=0)
    assert raw.headers["x-route-instance"] == "local:secondary"
    assert raw.parse().output_text == ask(secondary.client(), False, max_tokens=16)[0]
    message = claude.messages.with_raw_response.create(**ask_claude)  # type: ignore[call-overload]
    assert message.headers["x-route-instance"] == "local:secondary"


def _post_json(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read())
