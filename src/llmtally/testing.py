"""A loopback fake LLM provider for tests: OpenAI and Anthropic wire formats over real HTTP.

Real clients (the ``openai`` / ``anthropic`` SDKs, LiteLLM, LangChain) talk to it through their
normal ``base_url`` / ``api_base``, so tests exercise the same HTTP path that users hit::

    from llmtally.testing import FakeProvider, FakeUsage

    with FakeProvider(usage=FakeUsage(prompt_tokens=120, cached_tokens=100)) as fp:
        litellm.completion(model="openai/gpt-4o-mini", api_base=fp.openai_base,
                           api_key="sk-test", messages=[{"role": "user", "content": "hi"}])
        assert fp.requests == 1

Stdlib only. Run ``python -m llmtally.testing --port 8999`` to serve one by hand.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import re
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeProvider", "FakeUsage", "FakeToolCall"]


@dataclass
class FakeUsage:
    """Token counts that the next responses report.

    OpenAI semantics: ``cached_tokens`` is part of ``prompt_tokens`` and ``reasoning_tokens`` is
    part of ``completion_tokens``. Anthropic semantics: ``input_tokens`` = ``prompt_tokens`` and
    the two cache counts come *on top* of it, as the real API reports them.
    """

    prompt_tokens: int = 12
    completion_tokens: int = 5
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_creation_tokens: int = 0
    cache_read_tokens: int = 0

    def openai(self) -> dict[str, Any]:
        """The OpenAI ``usage`` object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens, "audio_tokens": 0},
        }

    def anthropic(self) -> dict[str, Any]:
        """The Anthropic Messages ``usage`` object."""
        return {
            "input_tokens": self.prompt_tokens,
            "output_tokens": self.completion_tokens,
            "cache_creation_input_tokens": self.cache_creation_tokens,
            "cache_read_input_tokens": self.cache_read_tokens,
        }


@dataclass(frozen=True)
class FakeToolCall:
    """A tool call in a scripted reply (:meth:`FakeProvider.queue_replies`): the fake model
    asks for tool ``name`` with ``arguments`` (sent as JSON), as OpenAI ``tool_calls`` or an
    Anthropic ``tool_use`` block."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str | None = None


_Reply = str | tuple[FakeToolCall, ...]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_REDACTED = {"authorization", "x-api-key", "api-key"}
_SERVER_POLL_S = 0.01  # serve_forever's poll interval bounds how long stop() takes

_Event = tuple[str, Any, bool]  # SSE (event name or "", data, is a content chunk)


def _error_body(path: str, status: int, message: str) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "api_error")
    if path.startswith("/v1/messages"):
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


def _split_reply(reply: str) -> list[str]:
    """Word-sized pieces that concatenate back to exactly ``reply`` (at least one piece)."""
    return [p for p in re.split(r"(?<=\s)(?=\S)", reply) if p] or [""]


def _embedding(text: str, dims: int) -> list[float]:
    """A small deterministic vector in [-1, 1) derived from the input's hash."""
    digest = hashlib.sha256(text.encode()).digest()
    while len(digest) < dims:
        digest += hashlib.sha256(digest).digest()
    return [round(b / 128.0 - 1.0, 6) for b in digest[:dims]]


class _Server(ThreadingHTTPServer):
    """Runs each connection in a daemon thread that it tracks, so stop() can close idle
    keep-alive sockets and join every handler (socketserver itself does not track daemon threads)."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], provider: FakeProvider) -> None:
        self.provider = provider
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        # touched only by the serve_forever thread, then stop()
        self._handler_threads: list[threading.Thread] = []
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._handler_threads = [t for t in self._handler_threads if t.is_alive()]
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name="FakeProvider-conn", daemon=True)
        self._handler_threads.append(thread)
        with self._open_lock:
            self._open.add(request)
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections_and_join(self, timeout: float) -> None:
        """Call after serve_forever() has returned, so no new connections start."""
        with self._open_lock:
            open_now = list(self._open)
        for sock in open_now:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked reading the next request
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread in self._handler_threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._handler_threads = []

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (timeouts, abandoned or cut streams) are expected; anything else is a bug.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms stalls
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle(body_expected=False)

    def do_POST(self) -> None:
        self._handle(body_expected=True)

    # -- plumbing ---------------------------------------------------------------------------

    def _handle(self, *, body_expected: bool) -> None:
        fp = self.server.provider
        path = self.path.split("?", 1)[0].rstrip("/")
        raw = self._read_body()
        try:
            body = json.loads(raw) if raw or body_expected else {}
            if not isinstance(body, dict):
                raise ValueError("body is not a JSON object")
        except ValueError:
            body = None
        failure = fp._on_request(path, body, self.headers)
        if not fp._wait_delay():
            self.close_connection = True  # stopped while delayed: hang up without answering
            return
        if failure is not None:
            status, err = failure
            if err is None:
                err = _error_body(path, status, f"Injected failure {status}")
            return self._send_json(status, err)
        if body is None:
            return self._send_json(400, _error_body(path, 400, "Request body is not valid JSON."))
        route = _ROUTES.get(path) if self.command == "POST" else None
        if route is None:
            return self._send_json(404, _error_body(path, 404, f"No route for {self.command} {path}"))
        route(self, fp, body)

    def _read_body(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(parts)

    def _send_json(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_sse(self, events: Iterator[_Event], cut_after: int | None) -> None:
        """Stream events as SSE over chunked encoding.

        After ``cut_after`` content events the connection is dropped with the chunked body
        unfinished, as when a provider connection breaks mid-stream.
        """
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent_content = 0
        for name, data, is_content in events:
            if is_content:
                if cut_after is not None and sent_content >= cut_after:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                sent_content += 1
            payload = data if isinstance(data, str) else json.dumps(data)
            frame = (f"event: {name}\n" if name else "") + f"data: {payload}\n\n"
            self._write_chunk(frame.encode())
        self.wfile.write(b"0\r\n\r\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


# -- OpenAI ----------------------------------------------------------------------------------


def _openai_tool_calls(calls: tuple[FakeToolCall, ...], fp: FakeProvider) -> list[dict[str, Any]]:
    return [{"id": call.id or fp._new_id("call_fake"), "type": "function",
             "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}
            for call in calls]


def _chat_tool_calls(h: _Handler, fp: FakeProvider, body: dict[str, Any],
                     calls: tuple[FakeToolCall, ...]) -> None:
    model, usage = fp._resolve(body), fp.usage.openai()
    rid, created = fp._new_id("chatcmpl-fake"), int(time.time())
    tool_calls = _openai_tool_calls(calls, fp)
    if not body.get("stream"):
        message = {"role": "assistant", "content": None, "tool_calls": tool_calls, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
        return h._send_json(200, {"id": rid, "object": "chat.completion", "created": created, "model": model,
                                  "choices": [choice], "usage": usage, "system_fingerprint": "fp_fake"})
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_fake"}
    extra = {"usage": None} if include_usage else {}

    def events() -> Iterator[_Event]:
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

    h._send_sse(events(), fp._cut_after)


def _chat_completions(h: _Handler, fp: FakeProvider, body: dict[str, Any]) -> None:
    scripted = fp._next_reply()
    if isinstance(scripted, tuple):
        return _chat_tool_calls(h, fp, body, scripted)
    model, usage, reply = fp._resolve(body), fp.usage.openai(), scripted
    rid, created = fp._new_id("chatcmpl-fake"), int(time.time())
    if not body.get("stream"):
        message = {"role": "assistant", "content": reply, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        return h._send_json(200, {"id": rid, "object": "chat.completion", "created": created, "model": model,
                                  "choices": [choice], "usage": usage, "system_fingerprint": "fp_fake"})
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_fake"}
    extra = {"usage": None} if include_usage else {}

    def events() -> Iterator[_Event]:
        pieces = _split_reply(reply)
        for i, piece in enumerate(pieces):
            delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            last = i == len(pieces) - 1
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": "stop" if last else None}
            yield "", {**head, "choices": [choice], **extra}, True
        if include_usage:
            yield "", {**head, "choices": [], "usage": usage}, False
        yield "", "[DONE]", False

    h._send_sse(events(), fp._cut_after)


def _completions(h: _Handler, fp: FakeProvider, body: dict[str, Any]) -> None:
    model, usage, reply = fp._resolve(body), fp.usage.openai(), fp.reply
    rid, created = fp._new_id("cmpl-fake"), int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": model}
    prompt = body.get("prompt")
    batched = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
    n_prompts = len(prompt) if batched and isinstance(prompt, list) else 1
    if not body.get("stream"):
        choices = [{"index": i, "text": reply, "logprobs": None, "finish_reason": "stop"}
                   for i in range(n_prompts)]
        return h._send_json(200, {**head, "choices": choices, "usage": usage})
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    extra = {"usage": None} if include_usage else {}

    def events() -> Iterator[_Event]:
        pieces = _split_reply(reply)
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": "stop" if last else None}
            yield "", {**head, "choices": [choice], **extra}, True
        if include_usage:
            yield "", {**head, "choices": [], "usage": usage}, False
        yield "", "[DONE]", False

    h._send_sse(events(), fp._cut_after)


def _embeddings(h: _Handler, fp: FakeProvider, body: dict[str, Any]) -> None:
    raw = body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        inputs = [raw]  # one string, or one list of token ids
    elif isinstance(raw, list) and raw:
        inputs = raw
    else:
        return h._send_json(400, _error_body(h.path, 400, "'input' must be a string or a non-empty list."))
    dims = body.get("dimensions") or 8
    as_b64 = body.get("encoding_format") == "base64"  # the openai SDK asks for base64 by default
    data = []
    for i, item in enumerate(inputs):
        vec = _embedding(item if isinstance(item, str) else json.dumps(item), int(dims))
        emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if as_b64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    tokens = fp.usage.prompt_tokens
    h._send_json(200, {"object": "list", "data": data, "model": fp._resolve(body),
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


# -- Anthropic -------------------------------------------------------------------------------


def _messages(h: _Handler, fp: FakeProvider, body: dict[str, Any]) -> None:
    scripted = fp._next_reply()
    model, usage = fp._resolve(body), fp.usage.anthropic()
    reply = scripted if isinstance(scripted, str) else ""
    calls = scripted if isinstance(scripted, tuple) else ()
    tool_blocks = [{"type": "tool_use", "id": call.id or fp._new_id("toolu_fake"), "name": call.name,
                    "input": call.arguments} for call in calls]
    stop_reason = "tool_use" if calls else "end_turn"
    mid = fp._new_id("msg_fake")
    message: dict[str, Any] = {"id": mid, "type": "message", "role": "assistant", "model": model}
    if not body.get("stream"):
        content = tool_blocks or [{"type": "text", "text": reply}]
        return h._send_json(200, {**message, "content": content,
                                  "stop_reason": stop_reason, "stop_sequence": None, "usage": usage})
    if calls:
        return h._send_sse(_anthropic_tool_events(message, usage, tool_blocks), fp._cut_after)

    def events() -> Iterator[_Event]:
        start_usage = {**usage, "output_tokens": 1}  # the real API reports a placeholder here
        start = {**message, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}
        yield "message_start", {"type": "message_start", "message": start}, False
        block = {"type": "text", "text": ""}
        yield ("content_block_start",
               {"type": "content_block_start", "index": 0, "content_block": block}, False)
        yield "ping", {"type": "ping"}, False
        for piece in _split_reply(reply):
            delta = {"type": "text_delta", "text": piece}
            yield "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}, True
        yield "content_block_stop", {"type": "content_block_stop", "index": 0}, False
        stop = {"stop_reason": "end_turn", "stop_sequence": None}
        # The real API's message_delta carries the cumulative usage, input and cache included.
        yield "message_delta", {"type": "message_delta", "delta": stop,
                                "usage": usage}, False
        yield "message_stop", {"type": "message_stop"}, False

    h._send_sse(events(), fp._cut_after)


def _anthropic_tool_events(message: dict[str, Any], usage: dict[str, Any],
                           blocks: list[dict[str, Any]]) -> Iterator[_Event]:
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


_ROUTES = {
    "/v1/chat/completions": _chat_completions,
    "/v1/completions": _completions,
    "/v1/embeddings": _embeddings,
    "/v1/messages": _messages,
}


# -- public API ------------------------------------------------------------------------------


class FakeProvider:
    """An HTTP server on 127.0.0.1 speaking OpenAI and Anthropic wire formats; counts requests;
    fails on demand.

    Endpoints: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` (OpenAI) and
    ``/v1/messages`` (Anthropic), each non-streamed and streamed (SSE, chunked encoding). Anything
    else answers 404; a body that is not a JSON object answers 400. Chat answers can be
    scripted, tool calls included, with :meth:`queue_replies`.

    Base URLs for clients:

    - ``openai_base`` (``url + "/v1"``): ``openai.OpenAI(base_url=...)``, ``ChatOpenAI(base_url=...)``,
      ``litellm.completion(model="openai/...", api_base=...)``.
    - ``anthropic_base`` (``url``): ``anthropic.Anthropic(base_url=...)`` and
      ``litellm.completion(model="anthropic/...", api_base=...)``. LiteLLM appends ``/v1/messages``
      unless the api_base already ends with it, so ``url`` and ``url + "/v1/messages"`` both work,
      while ``url + "/v1"`` does not (it would post to ``/v1/v1/messages``).

    Clients retry on their own: set ``max_retries=0`` on SDK clients (and pass ``max_retries=0``
    to ``litellm.completion`` on the ``openai/`` route, whose inner OpenAI client otherwise retries
    a 500 or 429 twice) when a test uses :meth:`fail_next` and expects to see the error.

    Usage as clients see it (checked with litellm 1.110, langchain-openai 1.7,
    langchain-anthropic 1.7): the OpenAI format passes through unchanged; on the Anthropic
    format LiteLLM and ``ChatAnthropic`` report ``prompt_tokens`` / ``input_tokens`` as
    ``prompt_tokens + cache_creation_tokens + cache_read_tokens``.
    """

    def __init__(
        self,
        *,
        usage: FakeUsage | None = None,
        reply: str = "Hello from the fake provider.",
        resolved_model: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.usage: FakeUsage = usage if usage is not None else FakeUsage()
        self.reply = reply
        self.resolved_model = resolved_model
        self._host, self._port = host, port
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._reset_state()

    def _reset_state(self) -> None:
        with self._lock:
            self._requests = 0
            self._log: list[dict[str, Any]] = []
            self._fail_left, self._fail_status = 0, 500
            self._fail_body: dict[str, Any] | None = None
            self._delay = 0.0
            self._cut_after: int | None = None
            self._queued: deque[_Reply] = deque()

    # -- lifecycle --

    def start(self) -> FakeProvider:
        """Bind and serve in a background thread; returns self."""
        if self._server is not None:
            raise RuntimeError("FakeProvider is already running")
        self._stopping.clear()
        self._server = _Server((self._host, self._port), self)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(_SERVER_POLL_S,),
                                        name=f"FakeProvider:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and join every server thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()  # wakes handlers sleeping in delay()
        server.shutdown()
        thread.join()
        server.close_connections_and_join(timeout=5.0)
        server.server_close()
        self._server = self._thread = None

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses --

    @property
    def port(self) -> int:
        """The bound port (the requested one before start())."""
        return self._server.server_address[1] if self._server is not None else self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self._host}:{self.port}"

    @property
    def openai_base(self) -> str:
        """Base URL for OpenAI-format clients: ``url + "/v1"``."""
        return self.url + "/v1"

    @property
    def anthropic_base(self) -> str:
        """Base URL for the anthropic SDK and LiteLLM's ``anthropic/`` route: ``url``."""
        return self.url

    # -- observation --

    @property
    def requests(self) -> int:
        """Number of HTTP requests received, on every path, including failed ones."""
        with self._lock:
            return self._requests

    @property
    def request_log(self) -> list[dict[str, Any]]:
        """A copy of the log: one dict per request with ``path``, ``model``, ``stream``, ``headers``
        (lower-cased names; credential values replaced by ``"***"``) and the parsed JSON ``body``."""
        with self._lock:
            return list(self._log)

    # -- failure modes --

    def fail_next(self, n: int = 1, *, status: int = 500, body: dict[str, Any] | None = None) -> None:
        """Answer the next ``n`` requests with HTTP ``status`` and ``body`` (default: an
        OpenAI- or Anthropic-style error JSON, by path)."""
        with self._lock:
            self._fail_left, self._fail_status, self._fail_body = n, status, body

    def delay(self, seconds: float) -> None:
        """Make every response wait ``seconds`` before being sent (0 turns it off)."""
        with self._lock:
            self._delay = max(0.0, float(seconds))

    def cut_stream_after(self, chunks: int | None) -> None:
        """Drop streamed responses' connections after ``chunks`` content chunks, with no
        ``[DONE]`` / ``message_stop`` and an unterminated chunked body. ``None`` turns it off.

        Clients get the first ``chunks`` chunks, then an error: the openai SDK raises
        ``openai.APIConnectionError`` (cause ``httpx.RemoteProtocolError``: incomplete chunked
        read), LiteLLM raises ``litellm.exceptions.MidStreamFallbackError`` (a
        ``ServiceUnavailableError``), httpx raises ``RemoteProtocolError``."""
        with self._lock:
            self._cut_after = chunks

    def queue_replies(self, *replies: str | Sequence[FakeToolCall]) -> None:
        """Script the next chat answers (OpenAI chat completions and Anthropic messages, streamed
        or not), one per request in order; then ``reply`` again. Each is a text, or a list of
        :class:`FakeToolCall` for an answer that calls tools (``finish_reason="tool_calls"`` /
        ``stop_reason="tool_use"``)::

            fp.queue_replies([FakeToolCall("get_weather", {"city": "Paris"})], "It is sunny.")
        """
        items: list[_Reply] = []
        for reply in replies:
            if isinstance(reply, str):
                items.append(reply)
            else:
                calls = tuple(reply)
                if not calls or not all(isinstance(call, FakeToolCall) for call in calls):
                    raise TypeError(f"a reply is a str or a non-empty list of FakeToolCall, not {reply!r}")
                items.append(calls)
        with self._lock:
            self._queued.extend(items)

    def reset(self) -> None:
        """Zero the counter, clear the log, drop queued replies and turn off every failure mode.
        ``usage``, ``reply`` and ``resolved_model`` are kept."""
        self._reset_state()

    # -- used by the handler --

    def _on_request(self, path: str, body: dict[str, Any] | None, headers: Any) -> tuple[int, Any] | None:
        """Count and log a request; return ``(status, body)`` if it must fail."""
        entry = {
            "path": path,
            "model": (body or {}).get("model"),
            "stream": bool((body or {}).get("stream")),
            "headers": {k.lower(): ("***" if k.lower() in _REDACTED else v) for k, v in headers.items()},
            "body": body,
        }
        with self._lock:
            self._requests += 1
            self._log.append(entry)
            if self._fail_left > 0:
                self._fail_left -= 1
                return self._fail_status, self._fail_body
        return None

    def _wait_delay(self) -> bool:
        """Sleep for the configured delay; False if stop() interrupted it."""
        with self._lock:
            seconds = self._delay
        return not (seconds and self._stopping.wait(seconds))

    def _next_reply(self) -> _Reply:
        with self._lock:
            return self._queued.popleft() if self._queued else self.reply

    def _resolve(self, body: dict[str, Any]) -> str:
        return self.resolved_model or str(body.get("model") or "fake-model")

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):06d}"


def main(argv: list[str] | None = None) -> None:
    """``python -m llmtally.testing [--host H] [--port P]``: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m llmtally.testing", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8999)
    parser.add_argument("--reply", default="Hello from the fake provider.")
    args = parser.parse_args(argv)
    with FakeProvider(host=args.host, port=args.port, reply=args.reply) as fp:
        print(f"Fake LLM provider on {fp.url}\n  OpenAI base:    {fp.openai_base}\n"
              f"  Anthropic base: {fp.anthropic_base}\n  usage: {asdict(fp.usage)}\n"
              "Ctrl-C to stop.", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
