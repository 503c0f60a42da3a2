"""The fake provider's HTTP server: a thread per connection (tracked, so that stop() closes idle
keep-alive sockets and joins every handler), request parsing, JSON and SSE answers; each path
is answered by its route (the OpenAI and Anthropic modules beside this one)."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ._anthropic import messages
from ._openai import chat_completions, completions, embeddings
from ._script import Script
from ._wire import SseEvent, error_body

__all__ = ["Server", "Handler", "ROUTES"]


class Server(ThreadingHTTPServer):
    """Runs each connection in a daemon thread that it tracks, so stop() can close idle
    keep-alive sockets and join every handler (socketserver itself does not track daemon threads)."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], script: Script) -> None:
        self.script = script
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        # touched only by the serve_forever thread, then stop()
        self._handler_threads: list[threading.Thread] = []
        super().__init__(addr, Handler)

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


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms stalls
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle(body_expected=False)

    def do_POST(self) -> None:
        self._handle(body_expected=True)

    # -- plumbing ---------------------------------------------------------------------------

    def _handle(self, *, body_expected: bool) -> None:
        script = self.server.script
        path = self.path.split("?", 1)[0].rstrip("/")
        raw = self._read_body()
        try:
            body = json.loads(raw) if raw or body_expected else {}
            if not isinstance(body, dict):
                raise ValueError("body is not a JSON object")
        except ValueError:
            body = None
        failure = script.on_request(path, body, self.headers)
        if not script.wait_delay():
            self.close_connection = True  # stopped while delayed: hang up without answering
            return
        if failure is not None:
            status, err = failure
            if err is None:
                err = error_body(path, status, f"Injected failure {status}")
            return self.send_json(status, err)
        if body is None:
            return self.send_json(400, error_body(path, 400, "Request body is not valid JSON."))
        route = ROUTES.get(path) if self.command == "POST" else None
        if route is None:
            return self.send_json(404, error_body(path, 404, f"No route for {self.command} {path}"))
        route(self, script, body)

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

    def send_json(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_sse(self, events: Iterator[SseEvent], cut_after: int | None) -> None:
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


ROUTES: dict[str, Callable[[Handler, Script, dict[str, Any]], None]] = {
    "/v1/chat/completions": chat_completions,
    "/v1/completions": completions,
    "/v1/embeddings": embeddings,
    "/v1/messages": messages,
}
