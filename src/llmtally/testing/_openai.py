"""The fake provider's OpenAI routes: ``/v1/chat/completions`` (text or tool calls),
``/v1/completions`` and ``/v1/embeddings``, each non-streamed and streamed (SSE)."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._script import FakeToolCall, Script
from ._wire import SseEvent, error_body, split_reply

if TYPE_CHECKING:
    from ._server import Handler

__all__ = ["chat_completions", "completions", "embeddings"]


def _openai_tool_calls(calls: tuple[FakeToolCall, ...], script: Script) -> list[dict[str, Any]]:
    return [{"id": call.id or script.new_id("call_fake"), "type": "function",
             "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}
            for call in calls]


def _chat_tool_calls(h: Handler, script: Script, body: dict[str, Any],
                     calls: tuple[FakeToolCall, ...]) -> None:
    model, usage = script.resolve(body), script.usage.openai()
    rid, created = script.new_id("chatcmpl-fake"), int(time.time())
    tool_calls = _openai_tool_calls(calls, script)
    if not body.get("stream"):
        message = {"role": "assistant", "content": None, "tool_calls": tool_calls, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
        return h.send_json(200, {"id": rid, "object": "chat.completion", "created": created, "model": model,
                                 "choices": [choice], "usage": usage, "system_fingerprint": "fp_fake"})
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_fake"}
    extra = {"usage": None} if include_usage else {}

    def events() -> Iterator[SseEvent]:
        for i, call in enumerate(tool_calls):
            opening = {"index": i, "id": call["id"], "type": "function",
                       "function": {"name": call["function"]["name"], "arguments": ""}}
            delta: dict[str, Any] = {"tool_calls": [opening]}
            if i == 0:
                delta = {"role": "assistant", "content": None, **delta}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            yield "", {**head, "choices": [choice], **extra}, True
            arguments = {"tool_calls": [
                {"index": i, "function": {"arguments": call["function"]["arguments"]}}]}
            choice = {"index": 0, "delta": arguments, "logprobs": None, "finish_reason": None}
            yield "", {**head, "choices": [choice], **extra}, True
        choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
        yield "", {**head, "choices": [choice], **extra}, False
        if include_usage:
            yield "", {**head, "choices": [], "usage": usage}, False
        yield "", "[DONE]", False

    h.send_sse(events(), script.cut_after)


def chat_completions(h: Handler, script: Script, body: dict[str, Any]) -> None:
    scripted = script.next_reply()
    if isinstance(scripted, tuple):
        return _chat_tool_calls(h, script, body, scripted)
    model, usage, reply = script.resolve(body), script.usage.openai(), scripted
    rid, created = script.new_id("chatcmpl-fake"), int(time.time())
    if not body.get("stream"):
        message = {"role": "assistant", "content": reply, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        return h.send_json(200, {"id": rid, "object": "chat.completion", "created": created, "model": model,
                                 "choices": [choice], "usage": usage, "system_fingerprint": "fp_fake"})
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_fake"}

    def chunk(i: int, piece: str, finish: str | None) -> dict[str, Any]:
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    _stream_text(h, script, body, head, reply, usage, chunk)


def completions(h: Handler, script: Script, body: dict[str, Any]) -> None:
    model, usage, reply = script.resolve(body), script.usage.openai(), script.reply
    rid, created = script.new_id("cmpl-fake"), int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": model}
    prompt = body.get("prompt")
    batched = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
    n_prompts = len(prompt) if batched and isinstance(prompt, list) else 1
    if not body.get("stream"):
        choices = [{"index": i, "text": reply, "logprobs": None, "finish_reason": "stop"}
                   for i in range(n_prompts)]
        return h.send_json(200, {**head, "choices": choices, "usage": usage})

    def chunk(_i: int, piece: str, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}

    _stream_text(h, script, body, head, reply, usage, chunk)


def _stream_text(h: Handler, script: Script, body: dict[str, Any], head: dict[str, Any],
                 reply: str, usage: dict[str, Any],
                 choice: Callable[[int, str, str | None], dict[str, Any]]) -> None:
    """A text reply as OpenAI streams it: one chunk per piece (``choice`` shapes each: a chat
    delta or a completion's text), the usage chunk if asked for, then ``[DONE]``."""
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    extra = {"usage": None} if include_usage else {}

    def events() -> Iterator[SseEvent]:
        pieces = split_reply(reply)
        for i, piece in enumerate(pieces):
            finish = "stop" if i == len(pieces) - 1 else None
            yield "", {**head, "choices": [choice(i, piece, finish)], **extra}, True
        if include_usage:
            yield "", {**head, "choices": [], "usage": usage}, False
        yield "", "[DONE]", False

    h.send_sse(events(), script.cut_after)


def embeddings(h: Handler, script: Script, body: dict[str, Any]) -> None:
    raw = body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        inputs = [raw]  # one string, or one list of token ids
    elif isinstance(raw, list) and raw:
        inputs = raw
    else:
        return h.send_json(400, error_body(h.path, 400, "'input' must be a string or a non-empty list."))
    dims = body.get("dimensions") or 8
    as_b64 = body.get("encoding_format") == "base64"  # the openai SDK asks for base64 by default
    data = []
    for i, item in enumerate(inputs):
        vec = _embedding(item if isinstance(item, str) else json.dumps(item), int(dims))
        emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if as_b64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    tokens = script.usage.prompt_tokens
    h.send_json(200, {"object": "list", "data": data, "model": script.resolve(body),
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _embedding(text: str, dims: int) -> list[float]:
    """A small deterministic vector in [-1, 1) derived from the input's hash."""
    digest = hashlib.sha256(text.encode()).digest()
    while len(digest) < dims:
        digest += hashlib.sha256(digest).digest()
    return [round(b / 128.0 - 1.0, 6) for b in digest[:dims]]
