"""The fake provider itself: its lifecycle (a server thread on 127.0.0.1), its addresses, what
it has been asked, and the failures and replies that tests script."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from ._script import FakeToolCall, FakeUsage, Reply, Script
from ._server import Server

__all__ = ["FakeProvider"]

_SERVER_POLL_S = 0.01  # serve_forever's poll interval bounds how long stop() takes


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
        self._script = Script(self)  # what the handlers read: counts, log, failures, replies
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def start(self) -> FakeProvider:
        """Bind and serve in a background thread; returns self."""
        if self._server is not None:
            raise RuntimeError("FakeProvider is already running")
        self._script.stopping.clear()
        self._server = Server((self._host, self._port), self._script)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(_SERVER_POLL_S,),
                                        name=f"FakeProvider:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and join every server thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._script.stopping.set()  # wakes handlers sleeping in delay()
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
        return self._script.requests

    @property
    def request_log(self) -> list[dict[str, Any]]:
        """A copy of the log: one dict per request with ``path``, ``model``, ``stream``, ``headers``
        (lower-cased names; credential values replaced by ``"***"``) and the parsed JSON ``body``."""
        return self._script.request_log()

    # -- failure modes --

    def fail_next(self, n: int = 1, *, status: int = 500, body: dict[str, Any] | None = None) -> None:
        """Answer the next ``n`` requests with HTTP ``status`` and ``body`` (default: an
        OpenAI- or Anthropic-style error JSON, by path)."""
        self._script.fail_next(n, status, body)

    def delay(self, seconds: float) -> None:
        """Make every response wait ``seconds`` before being sent (0 turns it off)."""
        self._script.delay(seconds)

    def cut_stream_after(self, chunks: int | None) -> None:
        """Drop streamed responses' connections after ``chunks`` content chunks, with no
        ``[DONE]`` / ``message_stop`` and an unterminated chunked body. ``None`` turns it off.

        Clients get the first ``chunks`` chunks, then an error: the openai SDK raises
        ``openai.APIConnectionError`` (cause ``httpx.RemoteProtocolError``: incomplete chunked
        read), LiteLLM raises ``litellm.exceptions.MidStreamFallbackError`` (a
        ``ServiceUnavailableError``), httpx raises ``RemoteProtocolError``."""
        self._script.cut_stream_after(chunks)

    def queue_replies(self, *replies: str | Sequence[FakeToolCall]) -> None:
        """Script the next chat answers (OpenAI chat completions and Anthropic messages, streamed
        or not), one per request in order; then ``reply`` again. Each is a text, or a list of
        :class:`FakeToolCall` for an answer that calls tools (``finish_reason="tool_calls"`` /
        ``stop_reason="tool_use"``)::

            fp.queue_replies([FakeToolCall("get_weather", {"city": "Paris"})], "It is sunny.")
        """
        items: list[Reply] = []
        for reply in replies:
            if isinstance(reply, str):
                items.append(reply)
            else:
                calls = tuple(reply)
                if not calls or not all(isinstance(call, FakeToolCall) for call in calls):
                    raise TypeError(f"a reply is a str or a non-empty list of FakeToolCall, not {reply!r}")
                items.append(calls)
        self._script.queue(items)

    def reset(self) -> None:
        """Zero the counter, clear the log, drop queued replies and turn off every failure mode.
        ``usage``, ``reply`` and ``resolved_model`` are kept."""
        self._script.reset()
