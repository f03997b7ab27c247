"""Messages API requests (`POST /v1/messages`, `/v1/messages/count_tokens`) as chat
completion requests: pure translation (`to_chat`), every malformed or untranslatable
request a BadRequest. What is translated and what refused: see proxy.fronts.messages.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.api.errors import BadRequest
from proxy.api.inbound import MAX_MESSAGES
from proxy.fronts.base import Json, number, positive_int
from proxy.providers.anthropic_requests import TOOL_CHOICE_NAMES

_USER_BLOCKS = ("text", "image", "tool_result")
_ASSISTANT_BLOCKS = ("text", "tool_use", "thinking", "redacted_thinking")


def _bad(message: str, param: str | None = None) -> BadRequest:
    return BadRequest(message, param=param)


# --------------------------------------------------------------------------- requests


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{where}: Input should be a valid string", where)
    return value


def _blocks(content: Any, where: str) -> list[Json]:
    """A message's content as a list of blocks (a string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _bad(f"{where}: Input should be a valid string or list of content blocks", where)
    for n, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _bad(f"{where}.{n}: Input should be a content block with a type",
                       f"{where}.{n}")
    return content


def _image(block: Json, where: str) -> Json:
    """An OpenAI image_url part from an Anthropic image block (base64 or URL source)."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        assert isinstance(source, dict)
        media = _text(source.get("media_type"), where + ".source.media_type")
        data = _text(source.get("data"), where + ".source.data")
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if kind == "url":
        assert isinstance(source, dict)
        return {"type": "image_url", "image_url": {"url": _text(source.get("url"),
                                                                where + ".source.url")}}
    raise _bad(f"{where}.source: only base64 and url image sources are supported here",
               where + ".source")


def _tool_result_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for n, block in enumerate(_blocks(content, where)):
        if block["type"] != "text":
            raise _bad(f"{where}.{n}: only text is supported inside a tool_result here "
                       f"(not {block['type']})", f"{where}.{n}")
        texts.append(_text(block.get("text"), f"{where}.{n}.text"))
    return "".join(texts)


def _user_turn(content: Any, where: str) -> list[Json]:
    """Chat messages for one user turn: its tool results (as tool messages), then its text
    and images (as one user message)."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out: list[Json] = []
    parts: list[Json] = []
    for n, block in enumerate(_blocks(content, where)):
        at = f"{where}.{n}"
        kind = block["type"]
        if kind == "text":
            parts.append({"type": "text", "text": _text(block.get("text"), at + ".text")})
        elif kind == "image":
            parts.append(_image(block, at))
        elif kind == "tool_result":
            out.append({"role": "tool",
                        "tool_call_id": _text(block.get("tool_use_id"), at + ".tool_use_id"),
                        "content": _tool_result_text(block.get("content"), at + ".content")})
        else:
            raise _bad(f"{at}: content blocks of type {kind!r} are not supported here "
                       f"({', '.join(_USER_BLOCKS)} are)", at + ".type")
    if parts:
        text_only = all(p["type"] == "text" for p in parts)
        out.append({"role": "user",
                    "content": "".join(p["text"] for p in parts) if text_only else parts})
    return out


def _assistant_turn(content: Any, where: str) -> Json:
    """The chat assistant message for one assistant turn (text, then its tool calls)."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[Json] = []
    for n, block in enumerate(_blocks(content, where)):
        at = f"{where}.{n}"
        kind = block["type"]
        if kind == "text":
            texts.append(_text(block.get("text"), at + ".text"))
        elif kind == "tool_use":
            arguments = block.get("input")
            if not isinstance(arguments, dict):
                raise _bad(f"{at}.input: Input should be an object", at + ".input")
            calls.append({"id": _text(block.get("id"), at + ".id"), "type": "function",
                          "function": {"name": _text(block.get("name"), at + ".name"),
                                       "arguments": orjson.dumps(arguments).decode()}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # Anthropic's signed thinking: no chat server can take it back
        else:
            raise _bad(f"{at}: content blocks of type {kind!r} are not supported here "
                       f"({', '.join(_ASSISTANT_BLOCKS)} are)", at + ".type")
    message: Json = {"role": "assistant", "content": "".join(texts) if texts or not calls
                     else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _system(system: Any) -> str:
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise _bad("system: Input should be a valid string or list of text blocks", "system")
    texts = []
    for n, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _bad(f"system.{n}: only text blocks are accepted in system", f"system.{n}")
        texts.append(_text(block.get("text"), f"system.{n}.text"))
    return "\n".join(texts)


def _tools(tools: Any) -> list[Json]:
    if not isinstance(tools, list):
        raise _bad("tools: Input should be a valid list", "tools")
    out = []
    for n, tool in enumerate(tools):
        at = f"tools.{n}"
        if not isinstance(tool, dict):
            raise _bad(f"{at}: Input should be an object", at)
        if tool.get("type") not in (None, "custom"):
            raise _bad(f"{at}: tools of type {tool.get('type')!r} (Anthropic-defined or server "
                       "tools) are not supported here; custom tools with an input_schema are",
                       at + ".type")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise _bad(f"{at}.input_schema: Field required", at + ".input_schema")
        function: Json = {"name": _text(tool.get("name"), at + ".name"), "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, chat: Json) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    assert kind is None or isinstance(choice, dict)
    if kind == "tool":
        assert isinstance(choice, dict)
        chat["tool_choice"] = {"type": "function", "function": {
            "name": _text(choice.get("name"), "tool_choice.name")}}
    elif isinstance(kind, str) and kind in TOOL_CHOICE_NAMES:
        chat["tool_choice"] = TOOL_CHOICE_NAMES[kind]
    else:
        raise _bad("tool_choice: expected {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}",
                   "tool_choice")
    assert isinstance(choice, dict)
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        chat["parallel_tool_calls"] = False


def to_chat(body: Json, counting: bool = False) -> Json:
    """The chat completion request for a Messages request (`counting`: a count_tokens
    request, which has no max_tokens); raises BadRequest for what is malformed or cannot be
    translated, worded as the Messages API words its own 400s."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model: Field required", "model")
    if body.get("mcp_servers"):
        raise _bad("mcp_servers: MCP servers are not supported here", "mcp_servers")
    chat: Json = {"model": model, "messages": _messages(body)}
    max_tokens = body.get("max_tokens")
    if not counting or max_tokens is not None:
        if not positive_int(max_tokens):
            raise _bad("max_tokens: Field required (a positive integer)", "max_tokens")
        chat["max_tokens"] = max_tokens
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], chat)
    _sampling(body, chat)
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise _bad("stream: Input should be a valid boolean", "stream")
    if stream and not counting:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # for message_delta's usage
    return chat


def _messages(body: Json) -> list[Json]:
    """The chat messages of a Messages request: its `system`, then each turn."""
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _bad("messages: Field required (a non-empty list of messages)", "messages")
    if len(raw_messages) > MAX_MESSAGES:
        raise _bad(f"messages: at most {MAX_MESSAGES} messages are accepted", "messages")
    messages: list[Json] = []
    if body.get("system") is not None:
        system = _system(body["system"])
        if system:
            messages.append({"role": "system", "content": system})
    for n, message in enumerate(raw_messages):
        at = f"messages.{n}"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise _bad(f"{at}.role: Input should be 'user' or 'assistant'", at + ".role")
        assert isinstance(message, dict)
        if "content" not in message:
            raise _bad(f"{at}.content: Field required", at + ".content")
        if role == "user":
            messages.extend(_user_turn(message["content"], at + ".content"))
        else:
            messages.append(_assistant_turn(message["content"], at + ".content"))
    return messages


def _sampling(body: Json, chat: Json) -> None:
    """`stop_sequences`, `temperature`, `top_p` and `metadata.user_id`, into `chat`."""
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop_sequences: Input should be a list of strings", "stop_sequences")
        if stops:
            chat["stop"] = stops
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            if not number(body[key]):
                raise _bad(f"{key}: Input should be a valid number", key)
            chat[key] = body[key]
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]


def _unsigned(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") == "thinking" \
        and not block.get("signature")


def signed_only(body: Json) -> Json:
    """The request for an Anthropic instance: as it came, less the thinking blocks this
    proxy made from another server's reasoning (they have no signature, and Anthropic
    refuses a thinking block whose signature it cannot verify)."""
    messages = body["messages"]
    if not any(isinstance(m.get("content"), list) and any(map(_unsigned, m["content"]))
               for m in messages):
        return body
    return {**body, "messages": [
        {**m, "content": [b for b in m["content"] if not _unsigned(b)]}
        if isinstance(m.get("content"), list) else m for m in messages]}
