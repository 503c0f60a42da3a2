"""Offline token counting: tiktoken from local files only, and the heuristic when there are none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmtally._events import tokens as _tokens
from llmtally._events.tokens import count_messages, count_text, heuristic_count, tokenizer_name

SAMPLES = [
    "hello world",
    "The quick brown fox jumps over the lazy dog. 12345678 tokens, maybe; who knows?",
    "大型语言模型按照词元计费。Please answer in English, 谢谢！",
    "  leading and trailing whitespace \n\n\t ",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "Большие языковые модели тарифицируются по токенам.",
    "I'm sure they'll say WE'RE late",
    "emoji 🎉🚀 and accents: café, naïve",
]


@pytest.fixture
def fresh() -> Iterator[None]:
    """Forget loaded encodings before and after (tests that change where files are found)."""
    _tokens._reset()
    yield
    _tokens._reset()


@pytest.fixture
def no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: None) -> None:
    """The seam: look for encoding files in an empty directory only."""
    monkeypatch.setattr(_tokens, "_search_dirs", lambda: [str(tmp_path)])


def reference(name: str):  # type: ignore[no-untyped-def]
    """tiktoken's own encoding, built from the same local directory (skips if the file is not on disk)."""
    tiktoken = pytest.importorskip("tiktoken")
    path = _tokens._encoding_file(name)
    if path is None:
        pytest.skip(f"no local {name} file")
    env = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.dirname(
        path
    )  # the file is there: tiktoken reads, never fetches
    try:
        return tiktoken.get_encoding(name)
    finally:
        if env is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = env


@pytest.mark.parametrize(("model", "name"), [("gpt-4o-mini", "o200k_base"), ("gpt-4", "cl100k_base")])
def test_counts_match_tiktoken(model: str, name: str) -> None:
    encoding = reference(name)
    assert tokenizer_name(model) == f"tiktoken:{name}"
    for text in SAMPLES:
        assert count_text(text, model) == len(encoding.encode_ordinary(text)), text


def test_special_token_text_is_ordinary_text() -> None:
    assert count_text("<|endoftext|> is just text", "gpt-4o") >= 5


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("gpt-4o", "o200k_base"),
        ("openai/gpt-4o-mini", "o200k_base"),
        ("azure/gpt-4.1-nano", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5.1-codex", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini-2025-04-16", "o200k_base"),
        ("ft:gpt-4o-mini:acme::abc", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("claude-sonnet-4-5", "cl100k_base"),
        ("qwen-plus", "cl100k_base"),
        ("o1x", "cl100k_base"),
        (None, "cl100k_base"),
    ],
)
def test_encoding_choice(model: str | None, name: str) -> None:
    assert _tokens.encoding_for(model) == name


def test_heuristic_when_no_files(no_files: None) -> None:
    assert tokenizer_name("gpt-4o") == "heuristic"
    for text in SAMPLES:
        assert count_text(text, "gpt-4o") == heuristic_count(text) >= 1


def test_heuristic_rules() -> None:
    assert heuristic_count("") == 0
    assert heuristic_count(" ") == 1 and heuristic_count("a") == 1 and heuristic_count("中") == 1
    assert heuristic_count("hello world") == 2  # two short words
    assert heuristic_count("internationalization") == 3  # 20 letters: 1 + 1 per further 8
    assert heuristic_count("1234567") == 3  # digits in threes
    assert heuristic_count("大型语言模型") == 6  # one per CJK character
    assert heuristic_count("привет") == 3  # half a token per other non-ASCII character
    assert heuristic_count("a, b") == heuristic_count("a, b")  # deterministic


def test_heuristic_is_close_to_tiktoken() -> None:
    encoding = reference("cl100k_base")
    text = " ".join(SAMPLES) * 10
    assert abs(heuristic_count(text) / len(encoding.encode_ordinary(text)) - 1) < 0.25


@dataclass
class LangChainLike:
    type: str
    content: object
    name: str | None = None


def test_count_messages_follows_the_cookbook() -> None:
    encoding = reference("o200k_base")
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?", "name": "bob"},
    ]
    expected = (
        3
        + sum(
            3 + len(encoding.encode_ordinary(m["role"])) + len(encoding.encode_ordinary(m["content"]))
            for m in messages
        )
        + len(encoding.encode_ordinary("bob"))
        + 1
    )
    assert count_messages(messages, "gpt-4o") == expected


def test_count_messages_shapes() -> None:
    model = "gpt-4o"
    text_only = [{"role": "user", "content": "describe this"}]
    with_image = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "describe this"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 5000}},
            ],
        }
    ]
    assert count_messages(with_image, model) == count_messages(text_only, model)
    objects = [LangChainLike("human", "describe this")]
    assert (
        count_messages(objects, model)
        == 3 + count_text("human", model) + count_text("describe this", model) + 3
    )
    tool_call = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
            ],
        }
    ]
    assert count_messages(tool_call, model) == (
        3 + count_text("assistant", model) + count_text("lookup", model) + count_text('{"q": "x"}', model) + 3
    )
    langchain_call = [
        {"role": "assistant", "content": "", "tool_calls": [{"name": "lookup", "args": {"q": "x"}}]}
    ]
    assert count_messages(langchain_call, model) == count_messages(tool_call, model)
    assert count_messages([], model) == 0
    assert count_messages("just a prompt", model) == count_text("just a prompt", model)
    assert count_text("", model) == 0


def test_encodings_load_once_across_threads(fresh: None) -> None:
    reference("o200k_base")  # skip without the file
    found: list[object] = []
    threads = [
        threading.Thread(target=lambda: found.append(_tokens._encoding("o200k_base"))) for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 6 and found[0] is not None and all(item is found[0] for item in found)


def _run(code: str, env: dict[str, str]) -> dict:
    """Run ``code`` in a fresh interpreter with every socket refused; it prints one JSON line."""
    guard = (
        "import socket\n"
        "def _refuse(*a, **k):\n"
        "    raise RuntimeError('network used')\n"
        "socket.socket = _refuse\n"
        "socket.create_connection = _refuse\n"
        "socket.getaddrinfo = _refuse\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", guard + code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_offline_without_files_falls_back_instead_of_downloading(tmp_path: Path) -> None:
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(empty),
        "CUSTOM_TIKTOKEN_CACHE_DIR": str(empty),
        "DATA_GYM_CACHE_DIR": str(empty),
        "TMPDIR": str(tmp_path),
    }
    code = (
        "import json\n"
        "from llmtally._events import tokens as _tokens\n"
        f"_tokens._search_dirs = lambda: [{str(empty)!r}]  # as if litellm were not installed\n"
        "n = _tokens.count_text('hello offline world', 'gpt-4o')\n"
        "print(json.dumps({'n': n, 'name': _tokens.tokenizer_name('gpt-4o'),\n"
        "                  'h': _tokens.heuristic_count('hello offline world')}))\n"
    )
    result = _run(code, env)
    assert result["name"] == "heuristic"
    assert result["n"] == result["h"]
    assert list(empty.iterdir()) == []  # nothing was fetched into the cache


def test_offline_with_local_files_uses_tiktoken(tmp_path: Path) -> None:
    reference("o200k_base")  # skip without the file
    env = {
        k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "CUSTOM_TIKTOKEN_CACHE_DIR")
    }
    code = (
        "import json, sys\n"
        "from llmtally._events import tokens as _tokens\n"
        "n = _tokens.count_text('hello offline world', 'gpt-4o')\n"
        "print(json.dumps({'n': n, 'name': _tokens.tokenizer_name('gpt-4o'),\n"
        "                  'litellm': 'litellm' in sys.modules,\n"
        "                  'env': 'TIKTOKEN_CACHE_DIR' in __import__('os').environ}))\n"
    )
    result = _run(code, env)
    assert result == {"n": 3, "name": "tiktoken:o200k_base", "litellm": False, "env": False}


def test_import_loads_nothing_heavy() -> None:
    code = (
        "import json, sys\n"
        "import llmtally\n"  # the package's own imports are not this module's cost
        "before = set(sys.modules)\n"
        "import llmtally._events.tokens\n"
        "heavy = [m for m in ('tiktoken', 'litellm', 'hashlib', 'base64')\n"
        "         if m in sys.modules and m not in before]\n"
        "print(json.dumps({'heavy': heavy}))\n"
    )
    result = _run(code, dict(os.environ))
    assert result["heavy"] == []  # its cost is measured in benchmarks/pricing_tokens.py
