"""The OpenAI <-> Anthropic Messages translation layer (pure functions, no server)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.config import parse_config
from proxy.providers.anthropic import Anthropic
from proxy.providers.anthropic_requests import TranslationError, to_messages_request
from proxy.providers.anthropic_responses import (
    AnthropicStreamError,
    StreamTranslator,
    from_messages_response,
)
from proxy.providers.base import PassThrough

Json = dict[str, Any]

WEATHER_TOOL: Json = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def req(messages: list[Json], **extra: Any) -> Json:
    """An OpenAI chat request with `messages`."""
    return {"model": "gpt-x", "messages": messages, **extra}


def user(text: str) -> Json:
    return {"role": "user", "content": text}


def translate(body: Json, model: str | None = "claude-test", default: int = 1024) -> Json:
    return to_messages_request(body, model, default)


# --------------------------------------------------------------------------- requests


def test_headers() -> None:
    config = parse_config({"providers": [{"provider_id": "a", "kind": "anthropic", "instances": [
        {"id": "d", "base_url": "https://api.anthropic.com/v1", "api_key": "sk-ant-1"}]}]})
    assert Anthropic().headers(config.instances[0], "Bearer client-key") == {
        "x-api-key": "sk-ant-1",
        "anthropic-version": "2023-06-01",
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",
    }


def test_minimal_request() -> None:
    out = translate(req([user("hi")]))
    assert out == {
        "model": "claude-test",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    }


def test_model_falls_back_to_body_and_is_required() -> None:
    assert translate(req([user("hi")]), model=None)["model"] == "gpt-x"
    with pytest.raises(TranslationError):
        translate({"messages": [user("hi")]}, model=None)


def test_system_messages_joined() -> None:
    body = req(
        [
            {"role": "system", "content": "Be brief."},
            {
                "role": "system",
                "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "kind."}],
            },
            user("hi"),
        ]
    )
    out = translate(body)
    assert out["system"] == "Be brief.\n\nBe kind."
    assert [m["role"] for m in out["messages"]] == ["user"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, 1024),
        ({"max_tokens": 50}, 50),
        ({"max_completion_tokens": 70}, 70),
        ({"max_tokens": 5, "max_completion_tokens": 70}, 5),
    ],
)
def test_max_tokens(extra: Json, expected: int) -> None:
    assert translate(req([user("hi")], **extra))["max_tokens"] == expected


def test_bad_max_tokens() -> None:
    with pytest.raises(TranslationError):
        translate(req([user("hi")], max_tokens=0))


@pytest.mark.parametrize(
    ("stop", "expected"),
    [("END", ["END"]), (["a", "b"], ["a", "b"])],
)
def test_stop_sequences(stop: Any, expected: list[str]) -> None:
    assert translate(req([user("hi")], stop=stop))["stop_sequences"] == expected


def test_sampling_and_stream() -> None:
    out = translate(req([user("hi")], temperature=0.2, top_p=0.9, stream=True))
    assert (out["temperature"], out["top_p"], out["stream"]) == (0.2, 0.9, True)
    plain = translate(req([user("hi")], stream=False))
    assert "stream" not in plain and "temperature" not in plain and "stop_sequences" not in plain


@pytest.mark.parametrize(
    ("url", "source"),
    [
        (
            "data:image/png;base64,iVBORw0KGgo=",
            {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        ),
        ("https://example.com/cat.jpg", {"type": "url", "url": "https://example.com/cat.jpg"}),
        ("http://example.com/cat.jpg", {"type": "url", "url": "http://example.com/cat.jpg"}),
    ],
)
def test_image_parts(url: str, source: Json) -> None:
    content = [{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": url}}]
    out = translate(req([{"role": "user", "content": content}]))
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "what is it?"},
        {"type": "image", "source": source},
    ]


@pytest.mark.parametrize("url", ["ftp://x/y.png", "data:image/png,notbase64", "data:;base64,AAAA"])
def test_bad_image_urls(url: str) -> None:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    with pytest.raises(TranslationError):
        translate(req([{"role": "user", "content": content}]))


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
    ],
)
def test_tool_choice(choice: Any, expected: Json) -> None:
    assert translate(req([user("hi")], tools=[WEATHER_TOOL], tool_choice=choice))["tool_choice"] == expected


def test_parallel_tool_calls_false() -> None:
    out = translate(req([user("hi")], tools=[WEATHER_TOOL], parallel_tool_calls=False))
    assert out["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}


def test_unsupported_tool_choice() -> None:
    with pytest.raises(TranslationError):
        translate(req([user("hi")], tools=[WEATHER_TOOL], tool_choice="sometimes"))


def test_consecutive_same_role_messages_merged() -> None:
    out = translate(req([user("a"), user("b"), {"role": "assistant", "content": "c"}, user("d")]))
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "c"}]},
        {"role": "user", "content": [{"type": "text", "text": "d"}]},
    ]


def test_final_assistant_prefill_stays_last() -> None:
    out = translate(req([user("Give JSON"), {"role": "assistant", "content": "{ "}]))
    assert out["messages"][-1] == {"role": "assistant", "content": [{"type": "text", "text": "{"}]}


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "system", "content": "only system"}], [{"role": "wizard", "content": "x"}]],
)
def test_unusable_messages(messages: list[Json]) -> None:
    with pytest.raises(TranslationError):
        translate(req(messages))


def test_bad_tool_call_arguments() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
    with pytest.raises(TranslationError):
        translate(req([user("hi"), {"role": "assistant", "content": None, "tool_calls": [call]}, user("x")]))


# --------------------------------------------------------------------------- tool round trip


def test_tool_call_round_trip() -> None:
    first = req([user("Weather in Paris and Rome?")], tools=[WEATHER_TOOL], tool_choice="auto")
    out = translate(first)
    assert out["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        }
    ]
    assert out["tool_choice"] == {"type": "auto"}

    answer = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 30, "output_tokens": 12},
    }
    completion = from_messages_response(answer, created=1700000000)
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    assert [c["id"] for c in calls] == ["toolu_1", "toolu_2"]
    assert all(c["type"] == "function" and c["function"]["name"] == "get_weather" for c in calls)
    assert [orjson.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert choice["message"]["content"] == "Checking."

    follow_up = req(
        [
            *first["messages"],
            choice["message"],
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C sunny"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "22C"}]},
        ],
        tools=[WEATHER_TOOL],
    )
    again = translate(follow_up)
    assert [m["role"] for m in again["messages"]] == ["user", "assistant", "user"]
    assert again["messages"][1]["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}},
    ]
    assert again["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C sunny"},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": "22C"},
    ]


def test_tool_only_response_has_null_content() -> None:
    answer = {
        "id": "msg_2",
        "model": "m",
        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    message = from_messages_response(answer, 1)["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"][0]["function"]["arguments"] == "{}"


# --------------------------------------------------------------------------- responses


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("max_tokens", "length"),
        ("stop_sequence", "stop"),
        ("tool_use", "tool_calls"),
        (None, None),
    ],
)
def test_stop_reason_mapping(stop_reason: str | None, finish: str | None) -> None:
    resp: Json = {"id": "m", "model": "c", "content": [], "stop_reason": stop_reason, "usage": {}}
    assert from_messages_response(resp, 1)["choices"][0]["finish_reason"] == finish


def test_text_response() -> None:
    resp = {
        "id": "msg_9",
        "model": "claude-test",
        "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world."}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 7, "output_tokens": 3},
    }
    assert from_messages_response(resp, 123) == {
        "id": "msg_9",
        "object": "chat.completion",
        "created": 123,
        "model": "claude-test",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello, world."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }


# --------------------------------------------------------------------------- streams


def start_event(input_tokens: int = 11) -> Json:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_s",
            "type": "message",
            "role": "assistant",
            "model": "claude-test",
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        },
    }


def run(events: list[tuple[str, Json]], include_usage: bool = False) -> tuple[StreamTranslator, list[Json]]:
    translator = StreamTranslator(created=42, include_usage=include_usage)
    chunks: list[Json] = []
    for kind, data in events:
        chunks.extend(translator.feed(kind, data))
    return translator, chunks


TEXT_STREAM: list[tuple[str, Json]] = [
    ("message_start", start_event()),
    ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
    ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "lo"}}),
    ("content_block_stop", {"index": 0}),
    ("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}}),
    ("message_stop", {"type": "message_stop"}),
]


def test_streamed_text() -> None:
    translator, chunks = run(TEXT_STREAM)
    assert translator.done
    assert all(
        c["id"] == "msg_s"
        and c["created"] == 42
        and c["model"] == "claude-test"
        and c["object"] == "chat.completion.chunk"
        for c in chunks
    )
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]


def test_usage_chunk() -> None:
    _, chunks = run(TEXT_STREAM, include_usage=True)
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
    assert last["id"] == "msg_s" and last["object"] == "chat.completion.chunk"
    assert all("usage" not in c for c in chunks[:-1])


def test_streamed_tool_call() -> None:
    pieces = ['{"ci', 'ty": "Par', 'is"}']
    events: list[tuple[str, Json]] = [
        ("message_start", start_event()),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Let me check."}}),
        ("content_block_stop", {"index": 0}),
        (
            "content_block_start",
            {
                "index": 1,
                "content_block": {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {}},
            },
        ),
        *[
            ("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": p}})
            for p in pieces
        ],
        ("content_block_stop", {"index": 1}),
        ("message_delta", {"delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 20}}),
        ("message_stop", {}),
    ]
    _, chunks = run(events)
    tool_deltas = [
        c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if "tool_calls" in c["choices"][0]["delta"]
    ]
    head, *rest = tool_deltas
    assert head == {
        "index": 0,
        "id": "toolu_9",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert all(d["index"] == 0 and set(d) == {"index", "function"} for d in rest)
    arguments = "".join(d["function"]["arguments"] for d in tool_deltas)
    assert arguments == "".join(pieces)
    assert orjson.loads(arguments) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_second_tool_block_gets_next_index() -> None:
    events: list[tuple[str, Json]] = [("message_start", start_event())]
    for block, tool_id in ((0, "a"), (1, "b")):
        events.append(
            (
                "content_block_start",
                {"index": block, "content_block": {"type": "tool_use", "id": tool_id, "name": "f"}},
            )
        )
        events.append(
            (
                "content_block_delta",
                {"index": block, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
            )
        )
    _, chunks = run(events)
    indexes = [c["choices"][0]["delta"]["tool_calls"][0]["index"] for c in chunks[1:]]
    assert indexes == [0, 0, 1, 1]


@pytest.mark.parametrize("kind", ["ping", "content_block_stop", "some_future_event"])
def test_quiet_events(kind: str) -> None:
    translator = StreamTranslator(created=1, include_usage=True)
    assert translator.feed(kind, {"index": 0}) == []


def test_stream_error_event() -> None:
    translator = StreamTranslator(created=1, include_usage=False)
    translator.feed("message_start", start_event())
    with pytest.raises(AnthropicStreamError, match="Overloaded") as info:
        translator.feed(
            "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        )
    assert info.value.error_type == "overloaded_error"


# --------------------------------------------------------------------------- errors


def err(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, err("rate_limit_error", "slow down"), ("RATE_LIMITED", "slow down")),
        (529, err("overloaded_error", "Overloaded"), ("UPSTREAM_5XX", "Overloaded")),
        (500, err("api_error", "boom"), ("UPSTREAM_5XX", "boom")),
        (503, b"<html>bad gateway</html>", ("UPSTREAM_5XX", "<html>bad gateway</html>")),
        (401, err("authentication_error", "invalid x-api-key"), ("UPSTREAM_AUTH", "invalid x-api-key")),
        (403, err("permission_error", "no"), ("UPSTREAM_AUTH", "no")),
        (
            400,
            err("invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"),
            ("CONTEXT_TOO_LONG", "prompt is too long: 210000 tokens > 200000 maximum"),
        ),
        (
            400,
            err("invalid_request_error", "messages: field required"),
            ("CLIENT_ERROR", "messages: field required"),
        ),
        (404, err("not_found_error", "model: nope"), ("CLIENT_ERROR", "model: nope")),
        (422, b"", ("CLIENT_ERROR", "HTTP 422")),
    ],
)
def test_error_answers_map_to_reason_codes(status: int, body: bytes,
                                           expected: tuple[str, str]) -> None:
    code, message = expected
    outcome = Anthropic().error_for(status, body, {})
    if code == "CLIENT_ERROR":  # the client's own error, passed through in OpenAI's shape
        assert isinstance(outcome, PassThrough) and outcome.status == status
        assert orjson.loads(outcome.body)["error"]["message"] == message
    else:
        assert not isinstance(outcome, PassThrough) and outcome.code == code
