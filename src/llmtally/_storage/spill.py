"""The spill file: events that could not reach the database wait here, one JSON object a line.

Appends are whole lines under an exclusive ``flock`` (several processes may share one file);
a line cut short by a power cut is skipped on replay and never glued to the next event.
A replayer first *claims* the file by renaming it to ``<name>.replaying.<pid>``, so two
processes never replay the same file, and a claim left by a dead process is taken over.
It then holds the claimed file's lock from reading it to deleting it; an appender that opened
the file before it was claimed finds, once it has the lock, that the path now names another
file, and appends there instead (without that check, its events could land in a file that was
already read, and be deleted with it). Event ids make a replay idempotent, so replaying twice
adds nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: appends are still serialised by the thread lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["SpillFile", "encode_event", "decode_event"]

_CLAIM_MARK = ".replaying."


def encode_event(row: Mapping[str, Any]) -> str:
    """One event as a JSON line (``ts`` as ISO 8601), plain ASCII: any text, even invalid
    UTF-8 (a lone surrogate), is escaped, so writing the line never fails."""
    out = dict(row)
    ts = out.get("ts")
    if isinstance(ts, datetime):
        out["ts"] = ts.isoformat()
    return json.dumps(out, separators=(",", ":"), default=str)


def decode_event(line: str) -> dict[str, Any]:
    """Inverse of :func:`encode_event`; raises ValueError on anything that is not an event."""
    row = json.loads(line)
    if not isinstance(row, dict) or not isinstance(row.get("id"), str) or "ts" not in row:
        raise ValueError("not an llmtally event")
    row["ts"] = datetime.fromisoformat(row["ts"])
    return row


class SpillFile:
    """A JSONL file next to the ledger holding events the database could not take yet."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def reset_lock(self) -> None:
        """A new lock, for a forked child (the parent's may have been held at the fork)."""
        self._lock = threading.Lock()

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append events durably (fsync). Raises OSError if the disk refuses, and whatever
        :func:`encode_event` raises for a row that cannot be encoded (then nothing is written)."""
        self.append_lines([encode_event(row) for row in rows])

    def append_lines(self, lines: Sequence[str]) -> None:
        """Append lines made by :func:`encode_event` durably (fsync). Raises OSError if the
        disk refuses."""
        if not lines:
            return
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    if fcntl is not None:
                        fcntl.flock(fd, fcntl.LOCK_EX)
                        if not _still_at(fd, self.path):
                            continue  # claimed by a replayer meanwhile: append to the new file
                    size = os.fstat(fd).st_size
                    if size and os.pread(fd, 1, size - 1) != b"\n":
                        data = b"\n" + data  # a previous writer died mid-line: keep its stub apart
                    os.write(fd, data)
                    os.fsync(fd)
                    return
                finally:
                    os.close(fd)

    @contextlib.contextmanager
    def replaying(self, path: Path) -> Iterator[None]:
        """Hold a claimed file's lock while it is read, written to the ledger and deleted, so
        that no append can slip in after it was read."""
        fd = os.open(path, os.O_RDONLY)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def has_backlog(self) -> bool:
        """True if there is a spill file, or a claim left by a process that is gone."""
        return self.path.exists() or any(True for _ in self._orphaned_claims())

    def claim(self) -> list[Path]:
        """Take the spill file (and orphaned claims) for replay; returns the claimed files."""
        own_pid = os.getpid()
        claimed: list[Path] = []
        for source in [self.path, *self._orphaned_claims()]:
            if source.name.startswith(f"{self.path.name}{_CLAIM_MARK}{own_pid}."):
                claimed.append(source)  # ours already, from a replay that did not finish
                continue
            target = source.with_name(f"{self.path.name}{_CLAIM_MARK}{own_pid}.{uuid.uuid4().hex[:12]}")
            try:
                os.rename(source, target)  # atomic: of two claimants only one succeeds
            except FileNotFoundError:
                continue
            claimed.append(target)
        return claimed

    def read(self, path: Path) -> tuple[list[dict[str, Any]], list[int]]:
        """The events in a claimed file, and the line numbers that could not be read."""
        rows: list[dict[str, Any]] = []
        bad_lines: list[int] = []
        for number, line in _lines(path):
            if not line.strip():
                continue
            try:
                rows.append(decode_event(line))
            except (ValueError, TypeError, KeyError, RecursionError):  # RecursionError: nesting
                bad_lines.append(number)
        return rows, bad_lines

    def _orphaned_claims(self) -> Iterator[Path]:
        own_pid = os.getpid()
        for path in self.path.parent.glob(f"{self.path.name}{_CLAIM_MARK}*"):
            pid_text = path.name[len(self.path.name) + len(_CLAIM_MARK):].split(".", 1)[0]
            if not pid_text.isdigit():
                continue
            pid = int(pid_text)
            if pid == own_pid or not _process_alive(pid):
                yield path


def _still_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the one named ``path``."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            yield number, raw.decode("utf-8", errors="replace")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
