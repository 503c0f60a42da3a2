"""Alert texts and the CLI's status and alert lists in English, Chinese and Korean, from
gettext catalogs: every message marked in the code is translated in each catalog, each
compiled ``.mo`` is the compile of its ``.po`` (so neither can drift), and the language comes
from ``language=`` or ``LLMTALLY_LANGUAGE``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from llmtally import AlertRule, Budget, ConfigError, Tally
from llmtally._i18n import LANGUAGES, LOCALE_DIR

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 25, 10, 7, tzinfo=timezone.utc)


def _scripts():
    spec = importlib.util.spec_from_file_location("i18n_script", ROOT / "scripts" / "i18n.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("language", [code for code in LANGUAGES if code != "en"])
def test_every_marked_message_is_translated_and_compiled(language):
    from babel.messages.pofile import read_po

    script = _scripts()
    wanted = {message.id for message in script.template() if message.id}
    assert len(wanted) > 40
    po_path = LOCALE_DIR / language / "LC_MESSAGES" / "llmtally.po"
    with open(po_path, "rb") as handle:
        catalog = read_po(handle, locale=language)
    have = {message.id: message for message in catalog if message.id}
    assert wanted - set(have) == set(), "run python scripts/i18n.py, then translate"
    assert set(have) - wanted == set(), "messages no longer in the code: run scripts/i18n.py"
    for message_id, message in have.items():
        assert message.string and not message.fuzzy, message_id
        placeholders = sorted(part.split("}")[0] for part in message_id.split("{")[1:])
        assert sorted(part.split("}")[0] for part in message.string.split("{")[1:]) == \
            placeholders, message_id  # the same {fields}, with the same formats
    assert (po_path.with_suffix(".mo")).read_bytes() == script.compiled(po_path)


def _auth_alert(make_tally, url, language, received):
    tally = make_tally(url, clock=lambda: NOW, language=language,
                       alert_rules=[AlertRule("auth_failure")], alerts=[received.append, "log"])
    tally.record(provider="openai", model="gpt-4o-mini", status="error",
                 error_type="litellm.AuthenticationError", ts=NOW - timedelta(minutes=1))
    return tally


@pytest.mark.parametrize("language, title, line", [
    ("en", "[CRITICAL] authentication failures (invalid or revoked key): openai",
     "1 failed calls of 1 (alert at 1)"),
    ("zh", "[严重] 鉴权失败（密钥无效或已吊销）: openai", "1 次调用中 1 次失败（告警阈值 1）"),
    ("ko", "[심각] 인증 실패 (잘못되었거나 폐기된 키): openai", "호출 1건 중 1건 실패 (알림 기준 1)"),
])
def test_an_alert_in_each_language(sqlite_url, make_tally, language, title, line):
    from llmtally._alerts.message import from_fired

    received: list = []
    tally = _auth_alert(make_tally, sqlite_url, language, received)
    fired = tally.check_alerts()
    message = from_fired(fired[0], language=language)
    assert message.title == title
    assert message.lines[0].startswith(line)
    assert received[0]["subject"] == "openai"  # the data stays the same in any language


def test_a_budget_warning_in_korean():
    from llmtally._budgets.guard import budget_message

    budget = Budget(requests=2, per="day", warn_at=(0.5,))
    message = budget_message("threshold", budget, {}, {"threshold": 0.5, "used": 1.0}, "ko")
    assert message.title == "[경고] 예산 requests 2/day: 50% 도달 (모든 호출)"
    assert message.lines == ("2 requests 중 1 requests 사용", "초기화 없음")


def test_language_is_checked_and_read_from_the_environment(sqlite_url, tmp_path):
    with pytest.raises(ConfigError, match="language"):
        Tally(sqlite_url, language="fr")
    assert Tally(sqlite_url, language="zh-CN").language == "zh"
    tally = Tally(sqlite_url)
    tally.record(provider="openai", model="gpt-4o-mini", status="error",
                 error_type="litellm.RateLimitError")
    tally.close()
    done = subprocess.run([sys.executable, "-m", "llmtally.cli", "status", "--db", sqlite_url],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LLMTALLY_LANGUAGE": "ko"})
    assert done.returncode == 0, done.stderr
    header = done.stdout.splitlines()[0].split()
    assert header[:3] == ["제공자", "상태", "전송"]
    assert "저하" in done.stdout  # degraded: one call, rate limited
    as_json = subprocess.run([sys.executable, "-m", "llmtally.cli", "status", "--db", sqlite_url,
                              "--json"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "LLMTALLY_LANGUAGE": "zh"})
    assert json.loads(as_json.stdout)[0]["state"] == "degraded"  # data is never translated
