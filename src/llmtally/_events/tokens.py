"""Offline token counting, for streams without usage and for budget estimates before a call.

tiktoken is used only when its encoding file is already on disk (tiktoken's cache, or the
copy litellm ships); otherwise a deterministic heuristic answers. Nothing here ever reaches
the network: tiktoken is never asked to fetch anything.

Counts are exact for OpenAI models served by tiktoken and an approximation for every other
model (their tokenizers differ); callers mark such counts ``estimated``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

__all__ = ["count_messages", "count_text", "encoding_for", "heuristic_count", "tokenizer_name"]

HEURISTIC = "heuristic"
_BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"

# What tiktoken_ext.openai_public builds each encoding from (tiktoken 0.14). The encoding is
# built here from the local file rather than with tiktoken.get_encoding(): get_encoding would
# download the file when it is missing or fails its hash check (and delete the bad copy), and
# pointing it at a directory means changing TIKTOKEN_CACHE_DIR, which every thread shares.
_ENCODINGS: dict[str, tuple[str, str, dict[str, int]]] = {
    "cl100k_base": (
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
        r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
    "o200k_base": (
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
}

# Model names (after any "provider/" prefix) counted with o200k_base; everything else gets cl100k_base.
_O200K_PREFIXES = (
    "gpt-4o",
    "chatgpt-4o",
    "gpt-4.1",
    "gpt-4.5",
    "gpt-oss",
    "gpt-image",
    "gpt-realtime",
    "gpt-audio",
    "o1",
    "o3",
    "o4",
    "codex-",
)

# OpenAI cookbook ("How to count tokens with tiktoken"): every message costs 3 tokens of
# framing, a name 1 more, and every reply is primed with 3.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_PER_REPLY = 3

_lock = threading.Lock()
_loaded: dict[str, Any] = {}  # encoding name -> tiktoken.Encoding, or None if unavailable
_heuristic_re: tuple[Any, Any, Any, Any] | None = None


def encoding_for(model: str | None) -> str:
    """The tiktoken encoding for ``model``: ``o200k_base`` for GPT-4o and later, else ``cl100k_base``."""
    if not model:
        return "cl100k_base"
    name = str(model).strip().lower().rsplit("/", 1)[-1]
    name = name.removeprefix("ft:").removeprefix("openai.")  # fine-tunes; Bedrock's openai.gpt-oss
    for prefix in _O200K_PREFIXES:
        if name.startswith(prefix) and (
            prefix.endswith("-") or name[len(prefix) : len(prefix) + 1] in ("", "-", ".", ":", "@", "_")
        ):
            return "o200k_base"
    if name.startswith("gpt-"):  # gpt-5, gpt-5.1, gpt-6 ... (every GPT from 5 on uses o200k)
        digits = name[4:].split(".", 1)[0].split("-", 1)[0]
        if digits.isdigit() and int(digits) >= 5:
            return "o200k_base"
    return "cl100k_base"


def _search_dirs() -> list[str]:
    """Directories that may hold tiktoken encoding files, in the order tiktoken and litellm use them.

    This is the seam tests replace to force the heuristic.
    """
    dirs = [
        os.environ.get(var)
        for var in ("CUSTOM_TIKTOKEN_CACHE_DIR", "TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")
    ]
    import importlib.util

    try:
        spec = importlib.util.find_spec("litellm")  # finds the package without importing it
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        base = next(iter(spec.submodule_search_locations))
        dirs.append(os.path.join(base, "litellm_core_utils", "tokenizers"))
    import tempfile

    dirs.append(os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    return [d for d in dirs if d]


def _encoding_file(name: str) -> str | None:
    """The path of ``name``'s BPE file, named as tiktoken's cache names it or ``<name>.tiktoken``, if any."""
    import hashlib

    cache_name = hashlib.sha1(
        _BLOB_URL.format(name=name).encode()
    ).hexdigest()  # tiktoken's read_file_cached key
    for directory in _search_dirs():
        for file_name in (cache_name, f"{name}.tiktoken"):
            path = os.path.join(directory, file_name)
            if os.path.isfile(path):
                return path
    return None


def _build_encoding(name: str) -> Any:
    """A tiktoken.Encoding built from the local file only, or None (no tiktoken, no file, bad file)."""
    try:
        import tiktoken
    except ImportError:
        return None
    path = _encoding_file(name)
    if path is None:
        return None
    import base64
    import hashlib

    expected_hash, pat_str, special_tokens = _ENCODINGS[name]
    try:
        with open(path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != expected_hash:
            return None
        ranks = {
            base64.b64decode(token): int(rank)
            for token, rank in (line.split() for line in data.splitlines() if line)
        }
        return tiktoken.Encoding(
            name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens
        )
    except Exception:  # an unreadable file or an older tiktoken: count with the heuristic instead
        return None


def _encoding(name: str) -> Any:
    """The named encoding, loaded on first use (once, under a lock), or None."""
    try:
        return _loaded[name]
    except KeyError:
        pass
    with _lock:
        if name not in _loaded:
            _loaded[name] = _build_encoding(name)
        return _loaded[name]


def _reset() -> None:
    """Forget loaded encodings (for tests that change where files are looked for)."""
    with _lock:
        _loaded.clear()


def tokenizer_name(model: str | None = None) -> str:
    """What counts tokens for ``model``: ``tiktoken:o200k_base``, ``tiktoken:cl100k_base``, ``heuristic``."""
    name = encoding_for(model)
    return f"tiktoken:{name}" if _encoding(name) is not None else HEURISTIC


def _heuristic_patterns() -> tuple[Any, Any, Any, Any]:
    global _heuristic_re
    if _heuristic_re is None:
        import re

        _heuristic_re = (
            re.compile(r"[A-Za-z]+"),
            re.compile(r"[0-9]+"),
            re.compile(r"[!-/:-@\[-`{-~]+"),
            # CJK ideographs, kana, hangul and full-width forms: about one cl100k token each
            re.compile("[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00020000-\U0002ffff]"),
        )
    return _heuristic_re


def heuristic_count(text: str) -> int:
    """Estimate tokens without a tokenizer; deterministic, 0 for "" and >= 1 for any other text.

    Each run of ASCII letters is 1 token plus 1 per further 8 letters; each run of digits one
    token per 3 digits; each run of ASCII punctuation one per 2 characters; whitespace is free;
    a CJK, kana or hangul character is 1 token and any other non-ASCII character half of one.
    Measured against cl100k_base on 1 KB chunks of English prose, Python, JSON, Chinese,
    Japanese, Korean, Russian and mixed English/Chinese text, the mean per language is within
    10% of the real count (the plain "characters / 4" rule is 60% off for Russian). o200k_base
    needs 10-25% fewer tokens than cl100k_base for CJK and Cyrillic, so this overestimates there.
    """
    if not text:
        return 0
    letters, digits, punctuation, wide = _heuristic_patterns()
    halves = 2 * (  # counted in half tokens to stay in integers
        sum([(len(run) + 7) // 8 for run in letters.findall(text)])
        + sum([(len(run) + 2) // 3 for run in digits.findall(text)])
        + sum([(len(run) + 1) // 2 for run in punctuation.findall(text)])
    )
    if not text.isascii():
        non_ascii = len(text) - len(text.encode("ascii", "ignore"))
        halves += non_ascii + len(wide.findall(text))  # 1 half each, 1 more for wide ones
    return max(1, -(-halves // 2))


def count_text(text: str, model: str | None = None) -> int:
    """How many tokens ``text`` is for ``model``: tiktoken if its file is on disk, else the heuristic.

    Special-token text such as ``<|endoftext|>`` is counted as ordinary text, never rejected.
    """
    if not text:
        return 0
    if not isinstance(text, str):
        text = str(text)
    encoding = _encoding(encoding_for(model))
    if encoding is None:
        return heuristic_count(text)
    return len(encoding.encode_ordinary(text))


def _field(message: Any, name: str) -> Any:
    if isinstance(message, dict):
        return message.get(name)
    return getattr(message, name, None)


def _content_text(content: Any) -> list[str]:
    """The text of a message's content: a string, or the text parts of a list of parts (images ignored)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    texts = []
    if isinstance(content, (list, tuple)):
        for part in content:
            if isinstance(part, str):
                texts.append(part)
                continue
            part_type = _field(part, "type")
            text = _field(part, "text")
            if part_type in ("text", "input_text", "output_text") and isinstance(text, str):
                texts.append(text)
    return texts


def _tool_call_text(tool_calls: Any) -> list[str]:
    """Names and arguments of an assistant message's tool calls (OpenAI or LangChain shape)."""
    texts: list[str] = []
    for call in tool_calls if isinstance(tool_calls, (list, tuple)) else ():
        function = _field(call, "function") or call
        name, arguments = _field(function, "name"), _field(function, "arguments")
        if arguments is None:
            arguments = _field(call, "args")
        if not isinstance(arguments, (str, type(None))):
            import json

            arguments = json.dumps(arguments, ensure_ascii=False, default=str)
        texts.extend(text for text in (name, arguments) if isinstance(text, str))
    return texts


def count_messages(messages: Iterable[Any], model: str | None = None) -> int:
    """Prompt tokens of a chat request, the way OpenAI's cookbook counts them.

    ``messages`` are OpenAI-style dicts or objects with ``.content`` and ``.role`` (or
    LangChain's ``.type``). Content is a string or a list of parts, of which text parts are
    counted and images ignored; tool calls count by name and arguments. Each message adds 3
    tokens, a ``name`` 1 more, and the reply primer 3. No messages is 0; a bare string is
    counted as text.
    """
    if isinstance(messages, str):
        return count_text(messages, model)
    total = 0
    seen = False
    for message in messages or ():
        seen = True
        total += TOKENS_PER_MESSAGE
        role = _field(message, "role") or _field(message, "type")
        texts = [role] if isinstance(role, str) else []
        texts += _content_text(_field(message, "content"))
        texts += _tool_call_text(_field(message, "tool_calls"))
        name = _field(message, "name")
        if isinstance(name, str) and name:
            texts.append(name)
            total += TOKENS_PER_NAME
        total += sum(count_text(text, model) for text in texts)
    return total + TOKENS_PER_REPLY if seen else 0
