"""Fixtures for the fault suite: a TCP proxy to PostgreSQL that a test cuts and restores, worker
processes that make real LiteLLM calls against the loopback fake provider, and id reconciliation.

Nothing here stops or restarts the real PostgreSQL server (other tests share it): an outage is
the proxy refusing connections and dropping the open ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from conftest import MSGS, PG_URL, wait_until  # noqa: E402,F401  (wait_until: the fault tests import it from here)

WORKER = Path(__file__).resolve().parent / "_worker.py"


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target address; ``cut()`` refuses new connections and
    drops the open ones (as a database host that went away), ``restore()`` serves again on
    the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.port = 0
        self.connections = 0
        self.restore()

    def restore(self) -> None:
        """Listen (again) on the proxy's port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True,
                         name="fault-proxy-accept").start()

    def cut(self) -> None:
        """Stop listening and reset every open connection."""
        listener, self._listener = self._listener, None
        if listener is not None:
            _close(listener)
        with self._lock:
            open_now, self._sockets = list(self._sockets), set()
        for sock in open_now:
            _close(sock)

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _close(client), _close(upstream)
                    return
                self._sockets.update((client, upstream))
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True,
                                 name="fault-proxy-pipe").start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.discard(src), self._sockets.discard(dst)
            _close(src), _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.fixture
def pg_proxy(pg_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A proxy to the test PostgreSQL and ``pg_url`` (this test's schema) rewritten to go
    through it."""
    parts = urlsplit(pg_url)
    target = (parts.hostname or "127.0.0.1", parts.port or 5432)
    proxy = TcpProxy(target)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    netloc = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
    try:
        yield proxy, urlunsplit(parts._replace(netloc=netloc))
    finally:
        proxy.close()


def run_workers(config: dict, count: int, timeout: float = 600) -> list[dict]:
    """Run ``count`` worker processes (tests/faults/_worker.py) with ``config``; return what
    each reported (the ids its application code saw, and more)."""
    procs = []
    for number in range(count):
        out = Path(config["workdir"]) / f"worker-{number}.json"
        args = [sys.executable, str(WORKER), json.dumps({**config, "worker": number, "out": str(out)})]
        procs.append((subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=worker_env()), out))
    reports = []
    for proc, out in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{stdout}\n{stderr[-4000:]}"
        reports.append(json.loads(out.read_text()))
    return reports


def worker_env() -> dict[str, str]:
    """The environment of a worker process: this one, no developer ledger settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTALLY_")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["LLMTALLY_TEST_POSTGRES_URL"] = PG_URL
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS.parent / "src"),
                                                      env.get("PYTHONPATH")]))
    return env


class CallLoop:
    """Threads of an application making real LiteLLM calls (plain and streamed, with usage)
    to ``base`` until stopped; ``done`` holds (id, when it returned) for each call, ``failures``
    every exception a call raised (there must be none: llmtally never breaks a call)."""

    def __init__(self, base: str, threads: int = 4, pause_s: float = 0.01) -> None:
        self.base, self.pause_s = base, pause_s
        self.done: list[tuple[str, float]] = []
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._active = 0
        self._active_lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> CallLoop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No call in flight inside the block (the calls made so far have all returned)."""
        self._go.clear()
        try:
            while True:
                with self._active_lock:
                    if self._active == 0:
                        break
                time.sleep(0.005)
            yield
        finally:
            self._go.set()

    @property
    def ids(self) -> list[str]:
        return [call_id for call_id, _ in self.done]

    def ids_after(self, moment: float) -> list[str]:
        return [call_id for call_id, when in self.done if when > moment]

    def _run(self) -> None:
        import uuid

        import litellm

        number = 0
        while not self._stop.is_set():
            self._go.wait()
            with self._active_lock:
                if not self._go.is_set():
                    continue
                self._active += 1
            args = {"model": "openai/gpt-4o-mini", "api_base": self.base, "api_key": "sk-x",
                    "messages": MSGS}
            try:
                if number % 3 == 2:  # every third call is a stream, read to the end
                    call_id = str(uuid.uuid4())
                    for _ in litellm.completion(**args, stream=True, litellm_call_id=call_id,
                                                stream_options={"include_usage": True}):
                        pass
                else:
                    call_id = litellm.completion(**args)._hidden_params["litellm_call_id"]
                self.done.append((call_id, time.time()))
            except BaseException as exc:
                self.failures.append(exc)
            finally:
                with self._active_lock:
                    self._active -= 1
            number += 1
            time.sleep(self.pause_s)

