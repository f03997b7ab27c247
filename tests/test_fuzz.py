"""Fuzzing the HTTP surface: bad input never gets a 500.

One simulator and the proxy run as real processes (`python -m proxy simulate` and
`python -m proxy serve`, as in test_e2e_cli.py), started once for the module; hypothesis
drives them from plain synchronous tests with a blocking HTTP client, so no event loop is
shared with the fuzzer.

The properties, for every request thrown at any endpoint:
- the status is never >= 500. The only legitimate 5xx would be a valid request that the
  upstream failed; there is one healthy simulator, so a valid request gets 200 (checked
  where the test knows the request is valid);
- every 4xx has an OpenAI-shaped JSON body `{"error": {message, type, param, code}}`;
- the proxy process stays up, and at the end still answers a normal request.

Explicit `@example`s pin inputs that once broke the proxy, so a regression fails at once
instead of whenever the generator happens to find it again.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import time
import urllib.parse
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.sim.text import answer_text
from tests.cluster import Cluster

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fuzz-model"
WORDS = 6
PROMPT = "fuzz me gently"
#: Small, so that bodies over the limit are cheap to send (the config minimum is 1024).
MAX_BODY = 64 * 1024
#: aiohttp's default limit for one header line (the proxy may raise it).
HEADER_LIMIT = 8190

_FUZZ = settings(deadline=None, database=None, print_blob=False,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.large_base_example])


def fuzz(max_examples: int) -> settings:
    """The module's hypothesis settings with an example budget, sized for a ~30 s file;
    FUZZ_SCALE=10 (in the environment) fuzzes ten times longer."""
    scale = float(os.environ.get("FUZZ_SCALE", "1"))
    return settings(_FUZZ, max_examples=max(1, int(max_examples * scale)))


# --------------------------------------------------------------------------- processes


class Target(Cluster):
    """The proxy process in front of one simulator process."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.port = self.proxy_port
        self.proxy_log = tmp / "proxy.log"

    def start(self) -> None:
        self.start_sim("s0", MODEL, options=("--words", str(WORDS)))
        self.start_proxy(
            [("s0", MODEL)],
            server={"host": "127.0.0.1", "port": self.port, "max_body_bytes": MAX_BODY},
            timeouts={"connect_s": 1, "first_byte_s": 5, "idle_s": 5, "total_s": 20},
            health={"interval_s": 1, "timeout_s": 1},
            logging={"format": "json", "level": "warning"})

    def log_tail(self, lines: int = 40) -> str:
        text = self.proxy_log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def alive(self) -> bool:
        return self.proxy is not None and self.proxy.poll() is None


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    t = Target(tmp_path_factory.mktemp("fuzz"))
    try:
        t.start()
        yield t
    finally:
        t.close()


# --------------------------------------------------------------------------- the client


@dataclass
class Sent:
    method: str
    target: str  # path and query, ASCII
    body: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    def describe(self) -> str:
        body = self.body
        shown = "None" if body is None else (repr(body[:600]) + (f" ... ({len(body)} bytes)"
                                                                  if len(body) > 600 else ""))
        heads = ", ".join(f"{k}: {v[:200]!r}{'...' if len(v) > 200 else ''} ({len(v)} bytes)"
                          for k, v in self.headers)
        return f"{self.method} {self.target[:600]}\n  headers: [{heads}]\n  body: {shown}"


@dataclass
class Got:
    status: int
    headers: dict[str, str]
    body: bytes


def send(port: int, sent: Sent, timeout: float = 15.0, gap: float = 0.0) -> Got:
    """One request on a fresh connection, with headers and body exactly as given.

    With a `gap` the body follows the headers that many seconds later, in its own TCP
    segment, as from any client that streams its upload.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(sent.method, sent.target, skip_accept_encoding=True)
        for name, value in sent.headers:
            conn.putheader(name, value)
        if sent.body is not None:
            conn.putheader("Content-Length", str(len(sent.body)))
        if gap and sent.body:
            conn.endheaders()
            time.sleep(gap)
            conn.send(sent.body)
        else:
            conn.endheaders(sent.body)
        resp = conn.getresponse()
        data = resp.read()
        return Got(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def check(t: Target, sent: Sent, *, valid: bool = False, timeout: float = 15.0,
          gap: float = 0.0) -> Got:
    """Send `sent` and assert the properties; returns what came back."""
    try:
        got = send(t.port, sent, timeout, gap)
    except (OSError, http.client.HTTPException) as exc:
        raise AssertionError(f"no HTTP answer within {timeout:g}s ({exc!r}) to\n{sent.describe()}\n"
                             f"proxy alive: {t.alive()}\nproxy log:\n{t.log_tail()}") from None
    where = (f"\nrequest:\n{sent.describe()}\nresponse: {got.status} "
             f"{got.headers.get('content-type')} {got.body[:500]!r}")
    assert t.alive(), "the proxy process died" + where + "\nproxy log:\n" + t.log_tail()
    assert got.status < 500, "server error" + where + "\nproxy log:\n" + t.log_tail()
    if valid:
        assert got.status == 200, "a valid request was not answered" + where
    if 400 <= got.status < 500:
        if sent.target.startswith("/v1/messages"):
            assert_anthropic_error(got, where)
        else:
            assert_openai_error(got, where)
    return got


def assert_anthropic_error(got: Got, where: str = "") -> None:
    """`{"type": "error", "error": {"type": ..., "message": ...}}` (Anthropic's shape)."""
    assert got.headers.get("content-type", "").startswith("application/json"), \
        "a 4xx that is not JSON" + where
    try:
        doc = json.loads(got.body)
    except ValueError:
        raise AssertionError("a 4xx whose body does not parse as JSON" + where) from None
    assert isinstance(doc, dict) and doc.get("type") == "error", "not an error" + where
    error = doc.get("error")
    assert isinstance(error, dict) and isinstance(error.get("type"), str) and \
        isinstance(error.get("message"), str) and error["message"], "error keys missing" + where


def assert_openai_error(got: Got, where: str = "") -> None:
    ctype = got.headers.get("content-type", "")
    assert ctype.startswith("application/json"), "a 4xx that is not JSON" + where
    try:
        doc = json.loads(got.body)
    except ValueError:
        raise AssertionError("a 4xx whose body does not parse as JSON" + where) from None
    assert isinstance(doc, dict) and isinstance(doc.get("error"), dict), \
        "a 4xx without an error object" + where
    error = doc["error"]
    assert {"message", "type", "param", "code"} <= set(error), "error keys missing" + where
    assert isinstance(error["message"], str) and error["message"], "no error message" + where
    assert isinstance(error["type"], str) and error["type"], "no error type" + where


# --------------------------------------------------------------------------- JSON fragments


@dataclass(frozen=True)
class Raw:
    """JSON text inserted verbatim: nesting deeper than any encoder allows, numbers no
    float holds, and so on."""

    text: str

    def __repr__(self) -> str:
        return f"Raw({self.text[:40]!r}{'...' if len(self.text) > 40 else ''} len={len(self.text)})"


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()


def nested(depth: int, kind: str = "[") -> Raw:
    if kind == "[":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


def encode(value: Any, ascii_only: bool = False) -> str:
    """JSON text for `value`; str may keep lone surrogates (to become invalid UTF-8)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(str(k), ensure_ascii=ascii_only) + ":"
                              + encode(v, ascii_only) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(encode(v, ascii_only) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=ascii_only)
    return json.dumps(value)  # None, bool, int of any size, float (inf and nan as JS does)


def to_bytes(value: Any, ascii_only: bool = False) -> bytes:
    return encode(value, ascii_only).encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------- strategies

HUGE_NUMBERS = [0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70,
                -(2**63) - 1, 1e308, -1e308, 5e-324, -0.0, Raw("1e999"), Raw("-1e400"),
                Raw("1" + "0" * 4000), Raw("0." + "0" * 4000 + "1"), Raw("-0"), Raw("1E+2")]
DEPTHS = [2, 64, 200, 250, 254, 255, 256, 300, 500, 998, 1000, 1023, 1024, 1025, 5000, 10_000]
TEXTS = ["", " ", "auto", MODEL, "p:s0", "s0", "null", "0", "²", "١٢", "\u0000", "\ud800",
         "💥" * 3, "é", "\u202e", "\n\r\t"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(),
    st.sampled_from(HUGE_NUMBERS),
    st.text(max_size=40), st.sampled_from(TEXTS),
)
long_strings = st.builds(lambda ch, n: ch * n, st.sampled_from(["a", "é", "💥", " ", "\\", '"']),
                         st.sampled_from([1000, 20_000, 200_000]))
deep = st.builds(nested, st.sampled_from(DEPTHS), st.sampled_from(["[", "{"]))
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=12), children, max_size=4)),
    max_leaves=12,
)
weird = st.one_of(scalars, json_values, long_strings, deep)


def set_path(body: Any, path: Sequence[str | int], value: Any) -> Any:
    """`body` with the value at `path` replaced (or deleted); containers on the way are
    created or replaced as needed so the mutation always lands."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(key, int):
        items = list(body) if isinstance(body, list) else []
        while len(items) <= key:
            items.append({})
        if value is DELETE and not rest:
            del items[key]
        else:
            items[key] = set_path(items[key], rest, value)
        return items
    obj = dict(body) if isinstance(body, dict) else {}
    if value is DELETE and not rest:
        obj.pop(key, None)
    else:
        obj[key] = set_path(obj.get(key), rest, value)
    return obj


def chat_base(stream: bool, model: str, parts: bool, tools: bool) -> dict[str, Any]:
    content: Any = [{"type": "text", "text": PROMPT}] if parts else PROMPT
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}],
                            "stream": stream}
    if tools:
        body["tools"] = [{"type": "function", "function": {
            "name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}}]
    return body


CHAT_PATHS: list[tuple[str | int, ...]] = [
    ("model",), ("messages",), ("messages", 0), ("messages", 0, "role"),
    ("messages", 0, "content"), ("messages", 0, "content", 0),
    ("messages", 0, "content", 0, "type"), ("messages", 0, "content", 0, "text"),
    ("messages", 0, "content", 1, "image_url"), ("messages", 0, "name"),
    ("messages", 0, "tool_calls"), ("messages", 0, "tool_call_id"), ("messages", 1),
    ("messages", 1, "role"), ("messages", 1, "content"), ("stream",), ("stream_options",),
    ("stream_options", "include_usage"), ("max_tokens",), ("max_completion_tokens",), ("n",),
    ("tools",), ("tools", 0), ("tools", 0, "function"), ("tools", 0, "function", "parameters"),
    ("tool_choice",), ("functions",), ("function_call",), ("response_format",),
    ("response_format", "type"), ("response_format", "json_schema"), ("user",),
    ("temperature",), ("top_p",), ("stop",), ("seed",), ("logit_bias",), ("logprobs",),
    ("top_logprobs",), ("presence_penalty",), ("frequency_penalty",), ("metadata",),
    ("parallel_tool_calls",), ("x-unknown-field",),
]
COMPLETION_PATHS: list[tuple[str | int, ...]] = [
    ("model",), ("prompt",), ("prompt", 0), ("prompt", 1), ("stream",), ("stream_options",),
    ("stream_options", "include_usage"), ("max_tokens",), ("n",), ("best_of",), ("echo",),
    ("suffix",), ("logprobs",), ("temperature",), ("stop",), ("user",), ("x-unknown-field",),
]
EMBEDDING_PATHS: list[tuple[str | int, ...]] = [
    ("model",), ("input",), ("input", 0), ("input", 1), ("encoding_format",), ("dimensions",),
    ("user",), ("stream",), ("x-unknown-field",),
]
MODELS = st.sampled_from(["auto", MODEL, "p:s0", "s0", "unknown-model"])


def mutations(paths: list[tuple[str | int, ...]]) -> st.SearchStrategy[list[tuple[Any, Any]]]:
    return st.lists(st.tuples(st.sampled_from(paths), st.one_of(st.just(DELETE), weird)),
                    min_size=1, max_size=3)


def responses_base(stream: bool, model: str, items: bool, tools: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": stream, "instructions": "be brief",
                            "input": [{"role": "user", "content": [
                                {"type": "input_text", "text": PROMPT}]},
                                {"type": "function_call", "call_id": "c1", "name": "f",
                                 "arguments": "{}"},
                                {"type": "function_call_output", "call_id": "c1",
                                 "output": "ok"}] if items else PROMPT}
    if tools:
        body["tools"] = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
        body["tool_choice"] = "auto"
    return body


def messages_base(stream: bool, model: str, blocks: bool, tools: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": stream, "max_tokens": 20,
                            "system": [{"type": "text", "text": "be brief"}],
                            "messages": [{"role": "user", "content": PROMPT}]}
    if blocks:
        body["messages"] = [
            {"role": "user", "content": [{"type": "text", "text": PROMPT}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                               "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": "ok"}]}]
    if tools:
        body["tools"] = [{"name": "f", "input_schema": {"type": "object"}}]
        body["tool_choice"] = {"type": "auto"}
    return body


RESPONSES_PATHS: list[tuple[str | int, ...]] = [
    ("model",), ("input",), ("input", 0), ("input", 0, "role"), ("input", 0, "content"),
    ("input", 0, "content", 0), ("input", 0, "content", 0, "type"),
    ("input", 0, "content", 0, "text"), ("input", 1, "type"), ("input", 1, "call_id"),
    ("input", 1, "arguments"), ("input", 2, "output"), ("instructions",), ("tools",),
    ("tools", 0), ("tools", 0, "type"), ("tools", 0, "name"), ("tool_choice",),
    ("max_output_tokens",), ("temperature",), ("top_p",), ("text",), ("text", "format"),
    ("text", "format", "type"), ("text", "format", "schema"), ("stream",), ("store",),
    ("previous_response_id",), ("parallel_tool_calls",), ("user",), ("metadata",),
    ("x-unknown-field",),
]
MESSAGES_PATHS: list[tuple[str | int, ...]] = [
    ("model",), ("max_tokens",), ("messages",), ("messages", 0), ("messages", 0, "role"),
    ("messages", 0, "content"), ("messages", 0, "content", 0),
    ("messages", 0, "content", 0, "type"), ("messages", 1, "content", 0, "input"),
    ("messages", 1, "content", 0, "id"), ("messages", 2, "content", 0, "content"),
    ("messages", 2, "content", 0, "tool_use_id"), ("system",), ("system", 0),
    ("tools",), ("tools", 0), ("tools", 0, "input_schema"), ("tool_choice",),
    ("tool_choice", "type"), ("stop_sequences",), ("temperature",), ("top_p",),
    ("metadata",), ("stream",), ("thinking",), ("x-unknown-field",),
]


def valid_body(path: str, model: str = "auto", stream: bool = False) -> dict[str, Any]:
    """A valid request for the endpoint at `path` (/admin/route takes a chat body)."""
    if path == "/v1/responses":
        return responses_base(stream, model, items=False, tools=False)
    if path.startswith("/v1/messages"):
        return messages_base(stream and path == "/v1/messages", model, blocks=False,
                             tools=False)
    if path == "/v1/completions":
        return {"model": model, "prompt": PROMPT, "stream": stream}
    if path == "/v1/embeddings":
        return {"model": model, "input": PROMPT}
    return chat_base(stream, model, parts=False, tools=False)


def post(path: str, body: bytes, *headers: tuple[str, bytes]) -> Sent:
    return Sent("POST", path, body, [("Content-Type", b"application/json"), *headers])


# --------------------------------------------------------------------------- the tests

POST_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/admin/route",
              "/v1/responses", "/v1/messages", "/v1/messages/count_tokens"]


def invalid_utf8_json(junk: bytes) -> bytes:
    return (b'{"model": "auto", "messages": [{"role": "user", "content": "'
            + junk + b'"}]}')


random_bodies = st.one_of(
    st.binary(max_size=600),
    st.builds(invalid_utf8_json, st.binary(min_size=1, max_size=40).map(
        lambda b: b.replace(b'"', b"").replace(b"\\", b"") + b"\xff\xc3(\xed\xa0\x80")),
    st.builds(to_bytes, json_values, st.booleans()),
    st.builds(to_bytes, st.dictionaries(st.sampled_from(["model", "messages", "prompt", "input",
                                                         "stream", "n", "max_tokens"]),
                                        weird, max_size=5), st.booleans()),
)


@fuzz(500)
@given(path=st.sampled_from(POST_PATHS), body=random_bodies,
       content_type=st.sampled_from([None, b"application/json", b"text/plain",
                                     b"application/x-www-form-urlencoded",
                                     b"multipart/form-data; boundary=zz", b"\xff\xfe"]))
@example(path="/v1/chat/completions", body=b"\xff\xfe\x00garbage", content_type=b"application/json")
@example(path="/v1/embeddings", body=b"", content_type=None)
@example(path="/admin/route", body=b"[]", content_type=b"application/json")
def test_random_bodies_never_get_a_5xx(target: Target, path: str, body: bytes,
                                       content_type: bytes | None) -> None:
    headers = [] if content_type is None else [("Content-Type", content_type)]
    check(target, Sent("POST", path, body, headers))


@fuzz(700)
@given(changes=mutations(CHAT_PATHS), stream=st.booleans(), model=MODELS, parts=st.booleans(),
       tools=st.booleans(), dry_run=st.booleans(), ascii_only=st.booleans())
# Found by this test: a field nested past orjson's depth limit for dumps, with a model the
# proxy has to rewrite (`auto` -> the instance's), was a 500 (inbound.ClientRequest.body_for).
@example(changes=[(("tools",), nested(300))], stream=False, model="auto", parts=False,
         tools=False, dry_run=False, ascii_only=True)
# Found by this test: tool_calls nested ~1000 deep blew the recursion limit in
# requirements._chat_text (str(tool_calls)), on the proxy path and on /admin/route.
@example(changes=[(("messages", 0, "tool_calls"), nested(1000))], stream=False, model=MODEL,
         parts=False, tools=False, dry_run=False, ascii_only=True)
@example(changes=[(("messages", 0, "tool_calls"), nested(1000))], stream=False, model=MODEL,
         parts=False, tools=False, dry_run=True, ascii_only=True)
@example(changes=[(("max_tokens",), 2**70)], stream=True, model="auto", parts=False, tools=False,
         dry_run=False, ascii_only=True)
# Found by this test: max_tokens near 2**64 still parses as an integer, and the plan's
# ctx_needed (prompt + max_tokens) no longer fits orjson: /admin/route was a 500.
@example(changes=[(("max_tokens",), 2**64 - 1)], stream=False, model="auto", parts=False,
         tools=False, dry_run=True, ascii_only=True)
@example(changes=[(("max_tokens",), -1)], stream=False, model="auto", parts=False, tools=False,
         dry_run=False, ascii_only=True)
@example(changes=[(("temperature",), 1e308)], stream=True, model="auto", parts=True, tools=True,
         dry_run=False, ascii_only=True)
@example(changes=[(("messages", 0, "content"), nested(10_000))], stream=False, model="auto",
         parts=False, tools=False, dry_run=False, ascii_only=True)
def test_wrong_types_in_chat_requests_never_get_a_5xx(
        target: Target, changes: list[tuple[Any, Any]], stream: bool, model: str, parts: bool,
        tools: bool, dry_run: bool, ascii_only: bool) -> None:
    body: Any = chat_base(stream, model, parts, tools)
    for path, value in changes:
        body = set_path(body, path, value)
    check(target, post("/admin/route" if dry_run else "/v1/chat/completions",
                       to_bytes(body, ascii_only)))


@fuzz(400)
@given(endpoint=st.sampled_from(["completions", "embeddings"]),
       completion_changes=mutations(COMPLETION_PATHS), embedding_changes=mutations(EMBEDDING_PATHS),
       stream=st.booleans(), model=MODELS, ascii_only=st.booleans())
# Found by this test: a prompt/input nested ~1000 deep overflowed the recursion in
# requirements._text_length: a 500.
@example(endpoint="completions", completion_changes=[(("prompt",), nested(1000))],
         embedding_changes=[], stream=False, model=MODEL, ascii_only=True)
@example(endpoint="embeddings", completion_changes=[],
         embedding_changes=[(("input",), nested(1000))], stream=False, model=MODEL, ascii_only=True)
def test_wrong_types_in_completions_and_embeddings_never_get_a_5xx(
        target: Target, endpoint: str, completion_changes: list[tuple[Any, Any]],
        embedding_changes: list[tuple[Any, Any]], stream: bool, model: str,
        ascii_only: bool) -> None:
    key = "prompt" if endpoint == "completions" else "input"
    body: Any = {"model": model, key: PROMPT}
    if endpoint == "completions":
        body["stream"] = stream
    changes = completion_changes if endpoint == "completions" else embedding_changes
    for path, value in changes:
        body = set_path(body, path, value)
    check(target, post(f"/v1/{endpoint}", to_bytes(body, ascii_only)))


@fuzz(500)
@given(front=st.sampled_from(["/v1/responses", "/v1/messages", "/v1/messages/count_tokens"]),
       response_changes=mutations(RESPONSES_PATHS), message_changes=mutations(MESSAGES_PATHS),
       stream=st.booleans(), model=MODELS, shaped=st.booleans(), tools=st.booleans(),
       ascii_only=st.booleans())
# Found by this test: a role that is a list or an object was looked up in a dict (unhashable):
# a 500 from responses_api._messages.
@example(front="/v1/responses", response_changes=[(("input", 0, "role"), [])],
         message_changes=[], stream=False, model="auto", shaped=True, tools=False,
         ascii_only=True)
@example(front="/v1/messages", response_changes=[],
         message_changes=[(("messages", 0, "role"), {})], stream=False, model="auto",
         shaped=True, tools=True, ascii_only=True)
@example(front="/v1/messages", response_changes=[],
         message_changes=[(("tool_choice", "type"), [])], stream=True, model="auto",
         shaped=True, tools=True, ascii_only=True)
def test_wrong_types_in_responses_and_messages_requests_never_get_a_5xx(
        target: Target, front: str, response_changes: list[tuple[Any, Any]],
        message_changes: list[tuple[Any, Any]], stream: bool, model: str, shaped: bool,
        tools: bool, ascii_only: bool) -> None:
    body: Any
    if front == "/v1/responses":
        body, changes = responses_base(stream, model, shaped, tools), response_changes
    else:
        body, changes = messages_base(stream, model, shaped, tools), message_changes
    for path, value in changes:
        body = set_path(body, path, value)
    check(target, post(front, to_bytes(body, ascii_only)))


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("shaped", [False, True])
def test_valid_responses_and_messages_requests_are_served(target: Target, path: str,
                                                          stream: bool, shaped: bool) -> None:
    body = (responses_base if path == "/v1/responses" else messages_base)(
        stream, "auto", shaped, shaped)
    check(target, post(path, to_bytes(body)), valid=True)


@fuzz(250)
@given(path=st.sampled_from(POST_PATHS),
       field_path=st.sampled_from(CHAT_PATHS + COMPLETION_PATHS + EMBEDDING_PATHS
                                  + RESPONSES_PATHS + MESSAGES_PATHS),
       depth=st.sampled_from(DEPTHS), kind=st.sampled_from(["[", "{"]), model=MODELS,
       stream=st.booleans())
def test_deep_nesting_anywhere_never_gets_a_5xx(target: Target, path: str,
                                                 field_path: tuple[Any, ...], depth: int,
                                                 kind: str, model: str, stream: bool) -> None:
    body = set_path(valid_body(path, model, stream), field_path, nested(depth, kind))
    check(target, post(path, to_bytes(body)))
    # And the whole body as one deep structure.
    check(target, post(path, nested(depth, kind).text.encode()))


def padded(size: int) -> bytes:
    """A valid chat body of exactly `size` bytes."""
    base = chat_base(False, "auto", False, False)
    body = to_bytes({**base, "pad": "x" * (size - len(to_bytes({**base, "pad": ""})))})
    assert len(body) == size
    return body


@pytest.mark.parametrize("path", POST_PATHS)
@pytest.mark.parametrize("size", [MAX_BODY + 1, 4 * MAX_BODY])
def test_bodies_over_the_limit_get_413(target: Target, path: str, size: int) -> None:
    body = padded(size)
    got = check(target, post(path, body))
    assert got.status == 413


def test_a_body_at_the_limit_is_served(target: Target) -> None:
    check(target, post("/v1/chat/completions", padded(MAX_BODY)), valid=True)


# Header values: any text without control characters (those are not HTTP), sent as UTF-8,
# or raw bytes 0x80-0xFF (obs-text: valid HTTP, not valid UTF-8); up to a few KiB.
header_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=60)
header_values = st.one_of(
    header_text.map(lambda s: s.strip().encode()),
    st.binary(min_size=1, max_size=40).map(lambda b: bytes(0x80 | (c & 0x7F) for c in b)),
    st.builds(lambda s, n: (s * n)[:4000].encode()[:4000],
              st.sampled_from(["a", "é", "💥", ",", " ,", "coding,"]), st.integers(1, 4000)),
    st.sampled_from([b"", b",,,", b"local", b"cloud", b"cheap", b"fast", b"LOCAL ", b"coding",
                     b"frontend,coding", b"req-123", b"a" * 128, b"a" * 129, b"x:y.z-_"]),
).map(lambda b: b.strip(b" \t"))
# Each at most once: aiohttp refuses a repeated User-Agent or Content-Type before the app runs.
ROUTING_HEADERS = ["x-route-tags", "x-route-prefer", "x-session-id", "x-request-id",
                   "Authorization", "User-Agent", "Accept", "Content-Type", "x-forwarded-for"]


@fuzz(500)
@given(headers=st.lists(st.tuples(st.sampled_from(ROUTING_HEADERS), header_values), max_size=6,
                       unique_by=lambda h: h[0]),
       endpoint=st.sampled_from(["chat", "completions", "embeddings", "route"]),
       stream=st.booleans(), model=MODELS)
@example(headers=[("x-route-tags", "💥".encode() * 900), ("x-session-id", "é".encode() * 2000)],
         endpoint="chat", stream=True, model="auto")
@example(headers=[("x-route-tags", b"\xff\xfe\xc3"), ("x-session-id", b"\xed\xa0\x80")],
         endpoint="chat", stream=False, model="auto")
# Found by this test: header bytes that are not UTF-8 reach the plan as lone surrogates,
# which orjson refuses: /admin/route was a 500.
@example(headers=[("x-session-id", b"\x9d")], endpoint="route", stream=False, model="auto")
def test_odd_headers_never_break_a_valid_request(target: Target, headers: list[tuple[str, bytes]],
                                                 endpoint: str, stream: bool, model: str) -> None:
    path = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
            "embeddings": "/v1/embeddings", "route": "/admin/route"}[endpoint]
    got = check(target, Sent("POST", path, to_bytes(valid_body(path, model, stream)), headers),
                valid=True)
    if endpoint != "route":
        given_ids = [v for k, v in headers if k == "x-request-id"]
        returned = got.headers.get("x-request-id", "")
        assert returned, "no x-request-id on the answer"
        if given_ids and given_ids[0] and len(given_ids[0]) <= 128 and all(
                chr(c).isalnum() and c < 128 or chr(c) in "._:-" for c in given_ids[0]):
            assert returned == given_ids[0].decode()


@pytest.mark.parametrize("header", ["x-route-tags", "x-session-id", "x-request-id"])
@pytest.mark.parametrize("length", [HEADER_LIMIT - 100, HEADER_LIMIT + 100, 64 * 1024,
                                    256 * 1024])
def test_very_long_header_values_get_an_answer_in_openai_shape(target: Target, header: str,
                                                               length: int) -> None:
    """A header too long for the server is refused, but in the shape SDKs understand."""
    got = check(target, post("/v1/chat/completions",
                             to_bytes(chat_base(False, "auto", False, False)),
                             (header, "é".encode() * (length // 2))))
    if length < HEADER_LIMIT - 50:
        assert got.status == 200


def _compressed(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return gzip.compress(data)
    if kind == "deflate":
        return zlib.compress(data)
    return data


@fuzz(80)
@given(encoding=st.sampled_from([b"gzip", b"deflate", b"br", b"zstd", b"identity", b"x-junk",
                                 b"gzip, gzip", b"GZIP"]),
       payload=st.sampled_from(["plain", "compressed", "junk"]), path=st.sampled_from(POST_PATHS),
       junk=st.binary(max_size=64))
# Found by this test: a body that does not decode as its Content-Encoding says is a 500
# (aiohttp's RequestPayloadError escapes endpoints._read_body) ...
@example(encoding=b"gzip", payload="plain", path="/v1/chat/completions", junk=b"")
# ... or, for deflate, no answer at all: the handler waits on the body forever and the
# request stays in flight (also for br/zstd, which this server cannot decode).
@example(encoding=b"deflate", payload="junk", path="/v1/chat/completions", junk=b"+")
@example(encoding=b"br", payload="plain", path="/admin/route", junk=b"")
def test_content_encoding_never_gets_a_5xx(target: Target, encoding: bytes, payload: str,
                                           path: str, junk: bytes) -> None:
    valid = to_bytes(valid_body(path))
    kind = encoding.decode().lower()
    body = {"plain": valid, "compressed": _compressed(kind, valid), "junk": junk}[payload]
    # The body in a segment of its own (after 20 ms), as a streaming client sends it.
    got = check(target, post(path, body, ("Content-Encoding", encoding)), timeout=5, gap=0.02)
    if kind == "identity" and payload != "junk":
        assert got.status == 200
    elif kind != "identity":
        # Compressed request bodies are refused outright (no OpenAI SDK sends one), which
        # also avoids aiohttp's decoder leaving a bad deflate body's read hanging.
        assert got.status == 415


GET_PATHS = ["/v1/models", "/v1/models/auto", "/v1/models/no-such", "/healthz", "/readyz",
             "/metrics", "/admin/events"]
EVENT_KEYS = ["request_id", "type", "instance", "since", "limit"]
query_values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["15m", "2h", "1d", "0.5s", "1.5.5m", "²m", "١٢", "1e999", "nan", "inf", "-1",
                     "0", "1", "10000", "10001", "99999999999999999999999", "1_000", " 5 ",
                     "2026-11-28T05:00:00Z", "0001-01-01T00:00:00+23:59",
                     "9999-12-31T23:59:59-23:59", "REROUTED", "rerouted", "p:s0", "\x00", ""]),
    st.integers().map(str), st.floats().map(repr),
)
raw_queries = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789%&=+;._-~!$'()*,/?:@"),
                      max_size=60)


def _query(params: list[tuple[str, str]]) -> str:
    return "&".join(urllib.parse.quote(k, safe="", errors="surrogatepass") + "="
                    + urllib.parse.quote(v, safe="", errors="surrogatepass") for k, v in params)


@fuzz(500)
@given(path=st.sampled_from(GET_PATHS + POST_PATHS),
       params=st.lists(st.tuples(st.one_of(st.sampled_from(EVENT_KEYS), st.text(max_size=8)),
                                 query_values), max_size=5),
       raw=st.one_of(st.none(), raw_queries),
       method=st.sampled_from(["GET", "GET", "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
# Found by this test: `since` of a Unicode digit plus a unit (`²m`) passed str.isdigit and
# then failed float(): a 500 from admin.parse_since.
@example(path="/admin/events", params=[("since", "²m")], raw=None, method="GET")
@example(path="/admin/events", params=[("limit", "١٢"), ("since", "1e999")], raw=None, method="GET")
@example(path="/admin/events", params=[], raw="since=%ZZ&type=%ff%fe&limit=%", method="GET")
def test_get_endpoints_and_query_strings_never_get_a_5xx(
        target: Target, path: str, params: list[tuple[str, str]], raw: str | None,
        method: str) -> None:
    query = raw if raw is not None else _query(params)
    body = None if method in ("GET", "OPTIONS", "DELETE") else b"{}"
    got = check(target, Sent(method, path + ("?" + query if query else ""), body))
    if method == "GET" and path in ("/v1/models", "/healthz", "/readyz", "/metrics"):
        assert got.status == 200


@pytest.mark.parametrize("odd", ["header-bytes", "max-tokens"])
def test_odd_requests_are_recorded_in_the_audit_trail(target: Target, odd: str) -> None:
    """A request that is served is recorded like any other, even when its routing headers
    are not UTF-8 or its max_tokens is the largest accepted (both end up in the plan, which
    the audit store writes as JSON)."""
    request_id = "fuzz-audit-" + os.urandom(4).hex()
    body = chat_base(False, "auto", False, False)
    headers = [("x-request-id", request_id.encode())]
    if odd == "header-bytes":
        headers += [("x-route-tags", b"\xff\xfe"), ("x-session-id", b"caf\xe9")]
    else:
        body["max_tokens"] = 2**31 - 1
    check(target, post("/v1/chat/completions", to_bytes(body), *headers), valid=True)
    deadline = time.monotonic() + 5
    events: list[Any] = []
    while time.monotonic() < deadline:
        got = check(target, Sent("GET", f"/admin/events?request_id={request_id}"))
        assert got.status == 200
        events = json.loads(got.body)["events"]
        if any(e["type"] == "REQUEST_COMPLETED" for e in events):
            break
        time.sleep(0.1)
    types = [e["type"] for e in events]
    assert "REQUEST_COMPLETED" in types, (
        f"the audit lost the request (events: {types})\nproxy log:\n{target.log_tail(15)}")
    assert "ROUTE_PLANNED" in types


def test_the_proxy_still_answers_normally_after_the_fuzzing(target: Target) -> None:
    assert target.alive()
    got = check(target, post("/v1/chat/completions", to_bytes(chat_base(False, "auto", False, False))),
                valid=True)
    assert json.loads(got.body)["choices"][0]["message"]["content"] == answer_text(MODEL, PROMPT, WORDS)
    got = check(target, post("/v1/chat/completions", to_bytes(chat_base(True, "auto", False, False))),
                valid=True)
    assert got.body.rstrip().endswith(b"data: [DONE]")
    assert check(target, Sent("GET", "/readyz")).status == 200


def test_the_proxy_logged_no_unhandled_errors(target: Target) -> None:
    """Nothing thrown at it during this module made the proxy log an unhandled exception
    (aiohttp's "Error handling request", a traceback, a failed audit write)."""
    markers = ("Error handling request", "Traceback", "Task exception", '"unhandled_error"',
               '"audit_write_failed"', '"probe_failed"')
    bad = [line for line in target.proxy_log.read_text(errors="replace").splitlines()
           if any(m in line for m in markers)]
    assert not bad, f"{len(bad)} internal error lines, e.g.:\n" + "\n".join(bad[:10])
