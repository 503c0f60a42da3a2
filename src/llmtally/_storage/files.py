"""Files written for the user (reports, exports, archives): created beside their final name and
renamed into place, with the permissions a plain ``open(path, "w")`` would give them."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
          | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))


def create_beside(target: Path, suffix: str) -> tuple[int, Path]:
    """A new, empty temporary file in ``target``'s directory, open for writing: its descriptor
    and path. Its mode is 0666 less the process umask, like any file the user makes
    (``tempfile.mkstemp`` would force 0600; forcing 0644 would ignore a private umask)."""
    for _ in range(100):
        temporary = target.parent / f".{target.name}.{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(temporary, _FLAGS, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")
