"""OpenAI's Responses API (`POST /v1/responses`) in front of the chat-completions path.

Stateless: every request carries its whole conversation in `input`. A request is
translated into a chat completion request (`to_chat`, in proxy.fronts.responses_requests),
so any instance kind serves it with the same route plan, failover, continuation, audit
and metrics as `/v1/chat/completions`; the answer comes back as a Response object
(`ResponsesExchange.answer`) or, streamed, as the Responses events (`ResponsesSink`).
Shapes follow OpenAI's API reference ("Responses", "Streaming events") and the `openai`
Python SDK's types (`openai.types.responses`).

Translated: `input` (a string, or items: messages with `input_text`/`output_text`/
`input_image` parts, `function_call`, `function_call_output`; `reasoning` items are
dropped), `instructions`, function `tools`, `tool_choice`, `parallel_tool_calls`,
`max_output_tokens`, `temperature`, `top_p`, `text.format` (`json_object`, `json_schema`),
`user`, `stream`. Refused with an OpenAI-shaped 400: `previous_response_id`,
`store: true`, `background: true`, `conversation`, `prompt` and `item_reference` items
(each needs response state the proxy does not keep), hosted tools (web search, file
search, computer use, MCP, ...) and file inputs. Errors are OpenAI's shape, as on
`/v1/chat/completions`.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from proxy.api.errors import ProxyError
from proxy.api.inbound import CHAT, ClientRequest, load_object
from proxy.config import Config
from proxy.engine.chunks import delta_reasoning
from proxy.engine.relay import StreamSink
from proxy.fronts.base import Json, TranslatingSink, count, first_message, listed, sse
from proxy.fronts.responses_requests import to_chat

#: finish_reason -> (status, incomplete_details.reason)
_ENDINGS: dict[str, tuple[str, str | None]] = {
    "length": ("incomplete", "max_output_tokens"),
    "content_filter": ("incomplete", "content_filter"),
}


def _usage(usage: Any) -> Json | None:
    """A Responses usage object from a chat one (None when the server sent none)."""
    if not isinstance(usage, dict):
        return None
    prompt = count(usage.get("prompt_tokens"))
    completion = count(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    cached = prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else 0
    thought = (completion_details.get("reasoning_tokens")
               if isinstance(completion_details, dict) else 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": count(cached)},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": count(thought)},
            "total_tokens": count(usage.get("total_tokens")) or prompt + completion}


def _text_part(text: str) -> Json:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _refusal_part(text: str) -> Json:
    return {"type": "refusal", "refusal": text}


def _message_item(item_id: str, parts: list[Json], status: str) -> Json:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": parts}


def _reasoning_item(item_id: str, text: str, status: str) -> Json:
    return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}] if text else []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> Json:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


class ResponsesExchange:
    """One Responses request on its way through the engine and back."""

    def __init__(self, body: Json, request: ClientRequest) -> None:
        self.body = body
        self.request = request
        self.id = "resp_" + request.request_id
        self.created = int(time.time())

    def item_id(self, prefix: str, index: int) -> str:
        return f"{prefix}_{self.request.request_id}_{index}"

    def response(self, status: str, output: list[Json], usage: Json | None, model: str | None,
                 error: Json | None = None, incomplete: str | None = None) -> Json:
        """The Response object, echoing the request's settings as OpenAI's API does."""
        body = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": status, "background": False, "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": model or self.request.model, "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "store": False, "temperature": body.get("temperature"),
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
            "top_p": body.get("top_p"), "truncation": "disabled", "usage": usage,
            "user": body.get("user"), "metadata": body.get("metadata") or {},
        }

    def answer(self, status: int, body: bytes) -> tuple[int, bytes]:
        """A chat.completion as a Response; an upstream's error (OpenAI's shape) as it is."""
        if status >= 300:
            return status, body
        completion = orjson.loads(body)
        message, choice = first_message(completion)
        output: list[Json] = []
        thought = delta_reasoning(message)[0]
        if thought:
            output.append(_reasoning_item(self.item_id("rs", len(output)), thought,
                                          "completed"))
        parts = []
        if isinstance(message.get("content"), str) and message["content"]:
            parts.append(_text_part(message["content"]))
        if isinstance(message.get("refusal"), str) and message["refusal"]:
            parts.append(_refusal_part(message["refusal"]))
        if parts:
            output.append(_message_item(self.item_id("msg", len(output)), parts, "completed"))
        for call in listed(message.get("tool_calls")):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                continue
            index = len(output)
            output.append(_call_item(self.item_id("fc", index),
                                     str(call.get("id") or self.item_id("call", index)),
                                     str(function.get("name") or ""),
                                     str(function.get("arguments") or ""), "completed"))
        state, why = _ENDINGS.get(str(choice.get("finish_reason")), ("completed", None))
        model = completion.get("model")
        return status, orjson.dumps(self.response(
            state, output, _usage(completion.get("usage")),
            model if isinstance(model, str) and model else None, incomplete=why))

    def stream(self, sink: StreamSink) -> StreamSink:
        return ResponsesSink(sink, self)


class ResponsesSink(TranslatingSink):
    """Chat completion chunks -> the Responses streaming events.

    response.created and response.in_progress open the stream; then, per output item,
    response.output_item.added, response.content_part.added, the deltas
    (response.output_text.delta, response.refusal.delta, response.reasoning_text.delta,
    response.function_call_arguments.delta), their .done events and
    response.output_item.done; response.completed (response.incomplete when the answer was
    cut by max_output_tokens or a content filter) ends a whole answer, and an `error`
    event followed by response.failed ends one the proxy could not complete.
    """

    def __init__(self, sink: StreamSink, exchange: ResponsesExchange) -> None:
        super().__init__(sink)
        self.x = exchange
        self.seq = 0
        self.model: str | None = None
        self.output: list[Json] = []  # items as they stand (text and arguments so far)
        self.current: int | None = None  # the open message or reasoning item
        self.calls: dict[int, int] = {}  # chat tool-call index -> output index

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return sse(kind, data)

    def chunk(self, obj: Json) -> list[bytes]:
        out: list[bytes] = []
        if self.seq == 0:
            model = obj.get("model")
            self.model = model if isinstance(model, str) and model else None
            opening = self.x.response("in_progress", [], None, self.model)
            out.append(self._event("response.created", response=opening))
            out.append(self._event("response.in_progress", response=opening))
        return self.answer(out, obj)

    def usage_of(self, usage: Json) -> Json | None:
        return _usage(usage)

    def deltas(self, out: list[bytes], delta: Json) -> None:
        """A chat delta's reasoning, text, refusal and tool calls as output items."""
        thought = delta_reasoning(delta)[0]
        if thought:
            self._add_text(out, "reasoning", thought)
        content = delta.get("content")
        if isinstance(content, str) and content:
            self._add_text(out, "output_text", content)
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            self._add_text(out, "refusal", refusal)
        for call in listed(delta.get("tool_calls")):
            if isinstance(call, dict):
                self._add_call(out, call)

    def _add_text(self, out: list[bytes], kind: str, text: str) -> None:
        """Append text to the open item of its kind, opening one (and closing the open
        item of another kind) when needed."""
        item = self.output[self.current] if self.current is not None else None
        wanted = "reasoning" if kind == "reasoning" else "message"
        if item is None or item["type"] != wanted:
            self._close_current(out)
            index = len(self.output)
            if wanted == "reasoning":
                item = _reasoning_item(self.x.item_id("rs", index), "", "in_progress")
            else:
                item = _message_item(self.x.item_id("msg", index), [], "in_progress")
            self.output.append(item)
            self.current = index
            out.append(self._event("response.output_item.added", output_index=index,
                                   item={**item, "content": []}))
        assert self.current is not None
        index = self.current
        parts: list[Json] = item["content"]
        part_type = "reasoning_text" if kind == "reasoning" else kind
        if not parts or parts[-1]["type"] != part_type:
            part = (_text_part("") if kind == "output_text" else _refusal_part("")
                    if kind == "refusal" else {"type": "reasoning_text", "text": ""})
            parts.append(part)
            out.append(self._event("response.content_part.added", item_id=item["id"],
                                   output_index=index, content_index=len(parts) - 1,
                                   part=dict(part)))
        part = parts[-1]
        field = "refusal" if kind == "refusal" else "text"
        part[field] += text
        extra: Json = {"logprobs": []} if kind == "output_text" else {}
        name = {"output_text": "response.output_text.delta", "refusal": "response.refusal.delta",
                "reasoning": "response.reasoning_text.delta"}[kind]
        out.append(self._event(name, item_id=item["id"], output_index=index,
                               content_index=len(parts) - 1, delta=text, **extra))

    def _close_current(self, out: list[bytes]) -> None:
        """Finish the open message or reasoning item (its parts' .done events, then the
        item's)."""
        index = self.current
        if index is None:
            return
        self.current = None
        item = self.output[index]
        for n, part in enumerate(item["content"]):
            common = {"item_id": item["id"], "output_index": index, "content_index": n}
            if part["type"] == "output_text":
                out.append(self._event("response.output_text.done", **common,
                                       text=part["text"], logprobs=[]))
            elif part["type"] == "refusal":
                out.append(self._event("response.refusal.done", **common,
                                       refusal=part["refusal"]))
            else:
                out.append(self._event("response.reasoning_text.done", **common,
                                       text=part["text"]))
            out.append(self._event("response.content_part.done", **common, part=dict(part)))
        item["status"] = "completed"
        out.append(self._event("response.output_item.done", output_index=index,
                               item=dict(item)))

    def _add_call(self, out: list[bytes], call: Json) -> None:
        number_ = count(call.get("index"))
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        assert isinstance(function, dict)
        index = self.calls.get(number_)
        if index is None:
            self._close_current(out)
            index = self.calls[number_] = len(self.output)
            item = _call_item(self.x.item_id("fc", index),
                              str(call.get("id") or self.x.item_id("call", index)),
                              str(function.get("name") or ""), "", "in_progress")
            self.output.append(item)
            out.append(self._event("response.output_item.added", output_index=index,
                                   item=dict(item)))
        item = self.output[index]
        piece = function.get("arguments")
        if isinstance(piece, str) and piece:
            item["arguments"] += piece
            out.append(self._event("response.function_call_arguments.delta",
                                   item_id=item["id"], output_index=index, delta=piece))

    def _close_calls(self, out: list[bytes]) -> None:
        for index in self.calls.values():
            item = self.output[index]
            if item["status"] == "completed":
                continue
            item["status"] = "completed"
            out.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                   output_index=index, name=item["name"],
                                   arguments=item["arguments"]))
            out.append(self._event("response.output_item.done", output_index=index,
                                   item=dict(item)))

    def done(self) -> list[bytes]:
        out: list[bytes] = []
        self._close_current(out)
        self._close_calls(out)
        state, why = _ENDINGS.get(self.finish or "stop", ("completed", None))
        response = self.x.response(state, self.output, self.usage, self.model, incomplete=why)
        out.append(self._event("response.completed" if state == "completed"
                               else "response.incomplete", response=response))
        return out

    def failed(self, error: Json) -> list[bytes]:
        message = str(error.get("message") or "the answer could not be completed")
        code = str(error.get("code") or "server_error")
        for item in self.output:
            if item["status"] == "in_progress":
                item["status"] = "incomplete"
        out = [self._event("error", code=code, message=message, param=None)]
        out.append(self._event("response.failed", response=self.x.response(
            "failed", self.output, self.usage, self.model,
            error={"code": "server_error", "message": message})))
        return out


class ResponsesFront:
    """`POST /v1/responses`: the Front for OpenAI's Responses API."""

    def exchange(self, raw: bytes, request_id: str, config: Config) -> ResponsesExchange:
        body = load_object(raw)
        chat = to_chat(body)
        request = ClientRequest(request_id=request_id, endpoint=CHAT, body=chat,
                                raw=orjson.dumps(chat), model=chat["model"],
                                stream=chat.get("stream") is True,
                                include_usage=chat.get("stream") is True)
        return ResponsesExchange(body, request)

    def error_body(self, exc: ProxyError) -> bytes:
        return exc.body()  # OpenAI's shape, as on every OpenAI endpoint


RESPONSES = ResponsesFront()
