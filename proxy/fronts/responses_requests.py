"""Responses API requests (`POST /v1/responses`) as chat completion requests: pure
translation (`to_chat`), every malformed or untranslatable request a BadRequest in
OpenAI's shape. What is translated and what refused: see proxy.fronts.responses.
"""

from __future__ import annotations

from typing import Any

from proxy.api.errors import BadRequest
from proxy.api.inbound import MAX_MESSAGES
from proxy.fronts.base import Json, number, positive_int

#: Fields that need response state kept by the server: refused, never ignored.
_STATEFUL = {
    "previous_response_id": "continues a stored response",
    "conversation": "adds to a stored conversation",
    "prompt": "names a stored prompt template",
}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TOOL_CHOICES = ("auto", "none", "required")


def _bad(message: str, param: str | None, code: str = "invalid_value") -> BadRequest:
    return BadRequest(message, param=param, code=code)


def _unsupported(message: str, param: str) -> BadRequest:
    return BadRequest(message, param=param, code="unsupported_parameter")


# --------------------------------------------------------------------------- requests


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"Invalid type for '{param}': expected a string.", param, "invalid_type")
    return value


def _parts(content: Any, role: str, param: str) -> str | list[Json]:
    """Chat content from a Responses message's content (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"Invalid type for '{param}': expected a string or an array of content "
                   "parts.", param, "invalid_type")
    parts: list[Json] = []
    for n, part in enumerate(content):
        where = f"{param}[{n}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": _text(part.get("text"), where + ".text")})
        elif kind == "refusal":
            parts.append({"type": "text", "text": _text(part.get("refusal"), where + ".refusal")})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise _unsupported("Only images given by 'image_url' (an http(s) or data: URL) "
                                   "are supported; file_id needs the Files API.",
                                   where + ".image_url")
            image: Json = {"url": url}
            if isinstance(part.get("detail"), str):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise _unsupported(f"Content parts of type {kind!r} are not supported here "
                               "(input_text, output_text, input_image, refusal are).", where)
    if role != "user" or all(p["type"] == "text" for p in parts):
        # Only user turns may carry images; text alone travels as one string, which every
        # server's chat template takes.
        if any(p["type"] != "text" for p in parts):
            raise _unsupported(f"Images are only accepted in user messages, not {role}.",
                               param)
        return "".join(p["text"] for p in parts)
    return parts


def _output(value: Any, param: str) -> str:
    """A function_call_output's `output` as the text of a chat tool message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for n, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") not in ("input_text",
                                                                      "output_text"):
                raise _unsupported("A function_call_output may hold text only here.",
                                   f"{param}[{n}]")
            texts.append(_text(part.get("text"), f"{param}[{n}].text"))
        return "".join(texts)
    raise _bad(f"Invalid type for '{param}': expected a string.", param, "invalid_type")


def _messages(items: Any) -> list[Json]:
    """Chat messages from a Responses `input`."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise _bad("Invalid type for 'input': expected a string or an array of input items.",
                   "input", "invalid_type")
    if len(items) > MAX_MESSAGES:
        raise _bad(f"'input' has {len(items)} items; at most {MAX_MESSAGES} are accepted.",
                   "input")
    messages: list[Json] = []
    for n, item in enumerate(items):
        where = f"input[{n}]"
        if not isinstance(item, dict):
            raise _bad(f"Invalid type for '{where}': expected an object.", where,
                       "invalid_type")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "function_call":
            _add_call(messages, item, where)
        elif kind != "reasoning":  # (the model's own earlier thinking: chat has no place)
            messages.append(_item(kind, item, where))
    if not messages:
        raise _bad("'input' has no message to answer.", "input")
    return messages


def _item(kind: Any, item: Json, where: str) -> Json:
    """The chat message of an input item: a message or a function call's output."""
    if kind == "message":
        role = item.get("role")
        role = _ROLES.get(role) if isinstance(role, str) else None  # any JSON may come
        if role is None:
            raise _bad(f"Invalid value for '{where}.role': expected one of user, assistant, "
                       "system, developer.", where + ".role")
        return {"role": role, "content": _parts(item.get("content"), role, where + ".content")}
    if kind == "function_call_output":
        return {"role": "tool", "tool_call_id": _text(item.get("call_id"), where + ".call_id"),
                "content": _output(item.get("output"), where + ".output")}
    if kind == "item_reference":
        raise _unsupported("Item references need stored responses; this proxy is "
                           "stateless: send the items themselves.", where)
    raise _unsupported(f"Input items of type {kind!r} are not supported here "
                       "(message, function_call, function_call_output, reasoning "
                       "are).", where + ".type")


def _add_call(messages: list[Json], item: Json, where: str) -> None:
    """A function_call item: a tool call of the assistant turn before it, else a turn."""
    call = {"id": _text(item.get("call_id"), where + ".call_id"), "type": "function",
            "function": {"name": _text(item.get("name"), where + ".name"),
                         "arguments": _text(item.get("arguments", "{}"),
                                            where + ".arguments")}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)  # one turn: text, then calls
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _tools(tools: Any) -> list[Json]:
    if not isinstance(tools, list):
        raise _bad("Invalid type for 'tools': expected an array.", "tools", "invalid_type")
    out = []
    for n, tool in enumerate(tools):
        where = f"tools[{n}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise _unsupported(f"Tools of type {kind!r} are not supported here: only "
                               "function tools are (hosted tools run on OpenAI's side).",
                               where + ".type")
        function: Json = {"name": _text(tool.get("name"), where + ".name")}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in _TOOL_CHOICES:
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _unsupported("Unsupported 'tool_choice': expected auto, none, required or "
                       "{\"type\": \"function\", \"name\": ...}.", "tool_choice")


def _response_format(text: Any) -> Json | None:
    """A chat `response_format` from the Responses `text` parameter, or None."""
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("'text.format.schema' must be a JSON schema object.",
                       "text.format.schema")
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description")
                  if fmt.get(k) is not None}
        schema.setdefault("name", "response")
        return {"type": "json_schema", "json_schema": schema}
    raise _bad("Invalid 'text.format.type': expected text, json_object or json_schema.",
               "text.format.type")


def to_chat(body: Json) -> Json:
    """The chat completion request for a Responses request; raises BadRequest (OpenAI's
    shape, naming the parameter) for what is malformed or cannot be served statelessly."""
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("You must provide a model parameter.", "model",
                   "missing_required_parameter")
    _stateless(body)
    if "input" not in body:
        raise _bad("Missing required parameter: 'input'.", "input",
                   "missing_required_parameter")
    messages = _messages(body["input"])
    instructions = body.get("instructions")
    if instructions is not None:
        messages.insert(0, {"role": "system",
                            "content": _text(instructions, "instructions")})
    chat: Json = {"model": model, "messages": messages}
    _tooling(body, chat)
    _sampling(body, chat)
    fmt = _response_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    if isinstance(body.get("user"), str):
        chat["user"] = body["user"]
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise _bad("Invalid type for 'stream': expected a boolean.", "stream", "invalid_type")
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # for response.completed's usage
    return chat


def _stateless(body: Json) -> None:
    """Refuse what needs response state kept by the server."""
    for key, why in _STATEFUL.items():
        if body.get(key) is not None:
            raise _unsupported(f"'{key}' is not supported: it {why}, and this proxy keeps no "
                               "response state. Send the whole conversation in 'input'.", key)
    if body.get("store") is True:
        raise _unsupported("'store: true' is not supported: this proxy keeps no response "
                           "state. Leave 'store' out (or false) and send the whole "
                           "conversation in 'input'.", "store")
    if body.get("background") is True:
        raise _unsupported("'background: true' is not supported: it needs stored responses.",
                           "background")


def _tooling(body: Json, chat: Json) -> None:
    """`tools`, `tool_choice` and `parallel_tool_calls`, into `chat`."""
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.get("parallel_tool_calls") is not None:
        if not isinstance(body["parallel_tool_calls"], bool):
            raise _bad("Invalid type for 'parallel_tool_calls': expected a boolean.",
                       "parallel_tool_calls", "invalid_type")
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]


def _sampling(body: Json, chat: Json) -> None:
    """`max_output_tokens`, `temperature` and `top_p`, into `chat`."""
    limit = body.get("max_output_tokens")
    if limit is not None:
        if not positive_int(limit):
            raise _bad("Invalid 'max_output_tokens': expected a positive integer.",
                       "max_output_tokens")
        chat["max_tokens"] = limit
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            if not number(body[key]):
                raise _bad(f"Invalid type for '{key}': expected a number.", key,
                           "invalid_type")
            chat[key] = body[key]
