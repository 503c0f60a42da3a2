"""The fake provider's Anthropic route: ``/v1/messages`` (text or tool use), non-streamed and
streamed (SSE events as the real API sends them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._script import Script
from ._wire import SseEvent, split_reply

if TYPE_CHECKING:
    from ._server import Handler

__all__ = ["messages"]


def messages(h: Handler, script: Script, body: dict[str, Any]) -> None:
    scripted = script.next_reply()
    model, usage = script.resolve(body), script.usage.anthropic()
    reply = scripted if isinstance(scripted, str) else ""
    calls = scripted if isinstance(scripted, tuple) else ()
    tool_blocks = [{"type": "tool_use", "id": call.id or script.new_id("toolu_fake"), "name": call.name,
                    "input": call.arguments} for call in calls]
    stop_reason = "tool_use" if calls else "end_turn"
    mid = script.new_id("msg_fake")
    message: dict[str, Any] = {"id": mid, "type": "message", "role": "assistant", "model": model}
    if not body.get("stream"):
        content = tool_blocks or [{"type": "text", "text": reply}]
        return h.send_json(200, {**message, "content": content,
                                 "stop_reason": stop_reason, "stop_sequence": None, "usage": usage})
    if calls:
        return h.send_sse(_anthropic_tool_events(message, usage, tool_blocks), script.cut_after)

    def events() -> Iterator[SseEvent]:
        start_usage = {**usage, "output_tokens": 1}  # the real API reports a placeholder here
        start = {**message, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}
        yield "message_start", {"type": "message_start", "message": start}, False
        block = {"type": "text", "text": ""}
        yield ("content_block_start",
               {"type": "content_block_start", "index": 0, "content_block": block}, False)
        yield "ping", {"type": "ping"}, False
        for piece in split_reply(reply):
            delta = {"type": "text_delta", "text": piece}
            yield "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}, True
        yield "content_block_stop", {"type": "content_block_stop", "index": 0}, False
        stop = {"stop_reason": "end_turn", "stop_sequence": None}
        # The real API's message_delta carries the cumulative usage, input and cache included.
        yield "message_delta", {"type": "message_delta", "delta": stop,
                                "usage": usage}, False
        yield "message_stop", {"type": "message_stop"}, False

    h.send_sse(events(), script.cut_after)


def _anthropic_tool_events(message: dict[str, Any], usage: dict[str, Any],
                           blocks: list[dict[str, Any]]) -> Iterator[SseEvent]:
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**usage, "output_tokens": 1}}
    yield "message_start", {"type": "message_start", "message": start}, False
    for index, block in enumerate(blocks):
        opening = {**block, "input": {}}
        yield "content_block_start", {"type": "content_block_start", "index": index,
                                      "content_block": opening}, False
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}, True
        yield "content_block_stop", {"type": "content_block_stop", "index": index}, False
    stop = {"stop_reason": "tool_use", "stop_sequence": None}
    yield "message_delta", {"type": "message_delta", "delta": stop,
                            "usage": usage}, False
    yield "message_stop", {"type": "message_stop"}, False
