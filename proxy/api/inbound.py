"""A client's request, parsed and checked once, as plain data for the rest of the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.api.errors import BadRequest

CHAT = "chat"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"

#: Deepest JSON nesting accepted (real requests: under 10; tool schemas a little more).
MAX_DEPTH = 64
#: Largest token count or choice count accepted (what any server could mean by it).
MAX_INT = 2**31 - 1
#: Most messages in one chat request.
MAX_MESSAGES = 10_000

# The field each endpoint cannot do without.
_REQUIRED = {CHAT: "messages", COMPLETIONS: "prompt", EMBEDDINGS: "input"}


@dataclass(slots=True)
class ClientRequest:
    """What the client asked for. `raw` is forwarded as is when nothing needs rewriting."""

    request_id: str
    endpoint: str
    body: dict[str, Any]
    raw: bytes
    model: str
    stream: bool
    include_usage: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    #: The client's request in an upstream protocol's own shape (the Messages front sets
    #: its Messages API request): an instance speaking that protocol is sent it as it
    #: came, not a translation of `body`, so what chat cannot carry (cache_control,
    #: thinking blocks, documents) reaches it. None for requests in OpenAI's shape.
    native: dict[str, Any] | None = None
    _bodies: dict[str, bytes] = field(default_factory=dict, repr=False)

    def body_for(self, upstream_model: str | None) -> bytes:
        """The bytes to send to an instance that serves `upstream_model` (None: as sent)."""
        if upstream_model is None or upstream_model == self.model:
            return self.raw
        cached = self._bodies.get(upstream_model)
        if cached is None:
            cached = orjson.dumps({**self.body, "model": upstream_model})
            self._bodies[upstream_model] = cached
        return cached


def _type_error(param: str, expected: str) -> BadRequest:
    return BadRequest(f"Invalid type for '{param}': expected {expected}.", param=param,
                      code="invalid_type")


def parse_request(endpoint: str, raw: bytes, request_id: str,
                  headers: dict[str, str] | None = None) -> ClientRequest:
    """Decode and check a client's body; raises BadRequest with an OpenAI-style message."""
    body = load_object(raw)
    model = body.get("model")
    if model is None:
        raise BadRequest("You must provide a model parameter.", param="model",
                         code="missing_required_parameter")
    if not isinstance(model, str):
        raise _type_error("model", "a string")
    _check_input(endpoint, body)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _type_error("stream", "a boolean")
    if stream and endpoint == EMBEDDINGS:
        raise BadRequest("Embeddings cannot be streamed.", param="stream")
    _check_counts(body)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _type_error("stream_options", "an object")
        include_usage = options.get("include_usage") is True
    # In the order of the fields (keywords cost more than the construction itself).
    return ClientRequest(request_id, endpoint, body, raw, model, stream, include_usage,
                         headers or {})


def load_object(raw: bytes) -> dict[str, Any]:
    """A request body decoded as a JSON object, nested at most MAX_DEPTH deep; raises
    BadRequest (empty, not JSON, not an object, too deep). Every endpoint's first step."""
    if not raw:
        raise BadRequest("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc.msg} "
                         f"(line {exc.lineno}, column {exc.colno}).") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    # Only a body that could be that deep is walked. Counting its brackets is C-speed, but
    # it reads the body twice: a chat of more than MAX_DEPTH messages (objects, each a
    # bracket) is walked without (100 messages: the count took 12 us, the walk 23).
    messages = body.get("messages")
    many = messages.__class__ is list and MAX_DEPTH < len(messages) <= MAX_MESSAGES
    if (many or raw.count(b"[") + raw.count(b"{") > MAX_DEPTH) and _too_deep(body, MAX_DEPTH):
        raise BadRequest(f"The request body is nested more than {MAX_DEPTH} levels deep.",
                         code="too_deep")
    return body


def _check_input(endpoint: str, body: dict[str, Any]) -> None:
    """The field the endpoint cannot do without: `messages`, `prompt` or `input`."""
    required = _REQUIRED[endpoint]
    value = body.get(required)
    if value is None:
        raise BadRequest(f"Missing required parameter: '{required}'.", param=required,
                         code="missing_required_parameter")
    if endpoint == CHAT:
        _check_messages(value)
    elif not isinstance(value, (str, list)):
        raise _type_error(required, "a string or an array")


def _check_counts(body: dict[str, Any]) -> None:
    """Token and choice counts are integers any server could mean."""
    for name in ("max_tokens", "max_completion_tokens", "n"):
        number = body.get(name)
        if number is None:
            continue
        if isinstance(number, bool) or not isinstance(number, int):
            raise _type_error(name, "an integer")
        if not 0 <= number <= MAX_INT:
            raise BadRequest(f"Invalid value for '{name}': expected an integer from 0 to "
                             f"{MAX_INT}.", param=name, code="invalid_value")


def _too_deep(value: Any, limit: int) -> bool:
    """Whether `value` (parsed JSON) nests lists and objects more than `limit` levels deep.

    Every chat of more than MAX_DEPTH messages is walked: the loop does as little per
    container as it can (parsed JSON has no subclasses, so a class is compared, not
    checked with isinstance)."""
    stack = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        item, depth = pop()
        if depth > limit:
            return True
        for child in item.values() if item.__class__ is dict else item:
            kind = child.__class__
            if kind is dict or kind is list:
                push((child, depth + 1))
    return False


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise _type_error("messages", "an array")
    if not messages:
        raise BadRequest("'messages' must contain at least one message.", param="messages",
                         code="empty_array")
    if len(messages) > MAX_MESSAGES:
        raise BadRequest(f"'messages' has {len(messages)} messages; at most {MAX_MESSAGES} "
                         "are accepted.", param="messages", code="too_many_messages")
    for message in messages:  # (parsed JSON: no subclasses; the index only for an error)
        if message.__class__ is not dict or message.get("role").__class__ is not str:
            _bad_message(messages)


def _bad_message(messages: list[Any]) -> None:
    """Raises BadRequest for the first message that is not an object with a `role`."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _type_error(f"messages[{i}]", "an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise BadRequest(f"Missing or invalid 'role' in messages[{i}].",
                             param=f"messages[{i}].role", code="invalid_value")
