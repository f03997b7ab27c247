"""OpenAI chat completion requests as Anthropic Messages API requests: pure translation,
no I/O (system messages, roles, text and image parts, `max_tokens`, stop sequences,
temperature, top_p, tools and `tool_choice`, tool calls and tool results; Anthropic
"Messages" API reference, `anthropic-version: 2023-06-01`).
"""

from __future__ import annotations

from typing import Any

import orjson

Json = dict[str, Any]

#: OpenAI tool_choice string -> Anthropic tool_choice; `TOOL_CHOICE_NAMES` is its inverse
#: (Anthropic's `{"type": "tool", "name": ...}` is OpenAI's `{"type": "function", ...}`).
TOOL_CHOICES: dict[str, Json] = {
    "auto": {"type": "auto"},
    "required": {"type": "any"},
    "none": {"type": "none"},
}
TOOL_CHOICE_NAMES: dict[str, str] = {v["type"]: k for k, v in TOOL_CHOICES.items()}


class TranslationError(ValueError):
    """The OpenAI request cannot be expressed as a Messages API request (a client error)."""


def _text_of(content: Any, what: str) -> str:
    """The text of a string content or of a list of text parts (other parts are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise TranslationError(f"{what} content may only hold text parts")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise TranslationError(f"{what} content must be a string or a list of parts")


def _image_block(part: Json) -> Json:
    """An Anthropic image block from an OpenAI `image_url` part (data: or http(s) URL)."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise TranslationError("image_url part without a url")
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not sep or encoding != "base64" or not media_type:
            raise TranslationError("image data URLs must be base64 with a media type")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError("image_url must be a data: or http(s) URL")


def _content_blocks(content: Any) -> list[Json]:
    """Anthropic content blocks from OpenAI message content; empty text is dropped."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError("message content must be a string or a list of parts")
    blocks: list[Json] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = str(part.get("text", ""))
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            blocks.append(_image_block(part))
        else:
            raise TranslationError(f"unsupported content part type: {kind!r}")
    return blocks


def _tool_use_block(call: Any) -> Json:
    """An Anthropic tool_use block from one OpenAI assistant tool call."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise TranslationError("tool_calls entries must be function calls")
    function: Json = call["function"]
    raw = function.get("arguments") or "{}"
    try:
        arguments = orjson.loads(raw) if isinstance(raw, str | bytes) else raw
    except orjson.JSONDecodeError as exc:
        raise TranslationError(f"tool call arguments are not JSON: {exc}") from exc
    if not isinstance(arguments, dict):
        raise TranslationError("tool call arguments must be a JSON object")
    return {"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": arguments}


def _tool_result_block(message: Json) -> Json:
    """An Anthropic tool_result block from an OpenAI `role: tool` message."""
    tool_use_id = message.get("tool_call_id")
    if not isinstance(tool_use_id, str):
        raise TranslationError("tool messages need a tool_call_id")
    return {
        "type": "tool_result",
        "tool_use_id": tool_use_id,
        "content": _text_of(message.get("content"), "tool"),
    }


def _turn(message: Json) -> tuple[str, list[Json]]:
    """The Anthropic role and content blocks of one non-system OpenAI message."""
    role = message.get("role")
    if role == "user":
        return "user", _content_blocks(message.get("content"))
    if role == "assistant":
        blocks = _content_blocks(message.get("content"))
        blocks.extend(_tool_use_block(call) for call in message.get("tool_calls") or [])
        return "assistant", blocks
    if role == "tool":
        return "user", [_tool_result_block(message)]
    raise TranslationError(f"unsupported message role: {role!r}")


def _merge_turns(turns: list[tuple[str, list[Json]]]) -> list[Json]:
    """Messages with consecutive same-role turns merged, as the API requires alternation."""
    merged: list[Json] = []
    for role, blocks in turns:
        if not blocks:
            continue
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"].extend(blocks)
        else:
            merged.append({"role": role, "content": list(blocks)})
    return merged


def _trim_prefill(messages: list[Json]) -> None:
    """Strip trailing whitespace of a final assistant prefill (the API refuses it)."""
    if not messages or messages[-1]["role"] != "assistant":
        return
    last = messages[-1]["content"][-1]
    if last.get("type") == "text":
        last["text"] = last["text"].rstrip()
        if not last["text"]:
            messages[-1]["content"].pop()
            if not messages[-1]["content"]:
                messages.pop()


def _split_messages(raw: Any) -> tuple[str, list[Json]]:
    """The joined system prompt and the alternating Anthropic messages of an OpenAI request."""
    if not isinstance(raw, list) or not raw:
        raise TranslationError("messages must be a non-empty list")
    system: list[str] = []
    turns: list[tuple[str, list[Json]]] = []
    for message in raw:
        if not isinstance(message, dict):
            raise TranslationError("each message must be an object")
        if message.get("role") in ("system", "developer"):
            text = _text_of(message.get("content"), "system")
            if text:
                system.append(text)
        else:
            turns.append(_turn(message))
    messages = _merge_turns(turns)
    _trim_prefill(messages)
    if not messages:
        raise TranslationError("the request has no user or assistant content")
    return "\n\n".join(system), messages


def _tool(tool: Any) -> Json:
    """An Anthropic tool definition from an OpenAI function tool."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise TranslationError("only function tools are supported")
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise TranslationError("function tools need a name")
    out: Json = {
        "name": function["name"],
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        out["description"] = function["description"]
    return out


def _tool_choice(choice: Any) -> Json:
    """An Anthropic tool_choice from an OpenAI one."""
    if isinstance(choice, str) and choice in TOOL_CHOICES:
        return dict(TOOL_CHOICES[choice])
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return {"type": "tool", "name": function["name"]}
    raise TranslationError(f"unsupported tool_choice: {choice!r}")


def _stop_sequences(stop: Any) -> list[str]:
    """Anthropic stop_sequences from OpenAI `stop` (a string or a list of strings)."""
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise TranslationError("stop must be a string or a list of strings")


def _max_tokens(body: Json, default: int) -> int:
    """`max_tokens` (or `max_completion_tokens`) of the request, else `default`."""
    value = body.get("max_tokens")
    if value is None:
        value = body.get("max_completion_tokens")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TranslationError("max_tokens must be a positive integer")
    return value


def _add_tools(body: Json, out: Json) -> None:
    """Copy tools, tool_choice and parallel_tool_calls of `body` into `out`."""
    if body.get("tools"):
        out["tools"] = [_tool(t) for t in body["tools"]]
    choice = _tool_choice(body["tool_choice"]) if body.get("tool_choice") is not None else None
    if body.get("parallel_tool_calls") is False and out.get("tools"):
        choice = choice or {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    if choice is not None:
        out["tool_choice"] = choice


def to_messages_request(body: Json, model: str | None, default_max_tokens: int) -> Json:
    """An Anthropic Messages request from an OpenAI chat completion request.

    `model` overrides the request's model when given (the instance's upstream model name).
    Raises :class:`TranslationError` for what the Messages API cannot express.
    """
    name = model or body.get("model")
    if not isinstance(name, str) or not name:
        raise TranslationError("no model to send upstream")
    system, messages = _split_messages(body.get("messages"))
    out: Json = {"model": name, "max_tokens": _max_tokens(body, default_max_tokens), "messages": messages}
    if system:
        out["system"] = system
    if body.get("stop") is not None:
        out["stop_sequences"] = _stop_sequences(body["stop"])
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stream"):
        out["stream"] = True
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    _add_tools(body, out)
    return out

