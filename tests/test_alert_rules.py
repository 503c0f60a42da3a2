"""Alert rules evaluated from the ledger (real SQLite file and real PostgreSQL): each kind fires
on the calls that should fire it and not on those just short of it, each alert is sent once per
cool-down however many Tallies evaluate it, a rule that cannot be evaluated is refused at start,
and ``llmtally status`` / ``llmtally alerts`` read the same ledger."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone

import pytest
from conftest import Clock

from llmtally import AlertRule, ConfigError, Tally
from llmtally._alerts.status import channel_status

NOW = datetime(2026, 11, 25, 10, 7, tzinfo=timezone.utc)
AUTH = "litellm.AuthenticationError"
LIMITED = "litellm.RateLimitError"


def _calls(tally, count, *, errors=0, error_type="litellm.InternalServerError", minutes_ago=5,
           **fields):
    fields.setdefault("provider", "openai")
    fields.setdefault("model", "gpt-4o-mini")
    for number in range(count):
        failed = number < errors
        tally.record(input_tokens=100, output_tokens=10, latency_ms=fields.pop("latency_ms", 500),
                     status="error" if failed else "ok",
                     error_type=error_type if failed else None,
                     ts=NOW - timedelta(minutes=minutes_ago, seconds=number), **fields)


def _tally(make_tally, url, rules, received=None, **kwargs):
    sink = received.append if received is not None else (lambda alert: None)
    return make_tally(url, clock=kwargs.pop("clock", Clock(NOW)), alert_rules=rules,
                      alerts=[sink], **kwargs)


def test_error_rate_fires_at_the_threshold_with_enough_calls(ledger_url, make_tally):
    received: list[dict] = []
    tally = _tally(make_tally, ledger_url,
                   [AlertRule("error_rate", threshold=0.25, min_calls=20, window="15m")], received)
    _calls(tally, 20, errors=5)                                     # 25 % of 20: fires
    _calls(tally, 19, errors=19, provider="anthropic", model="claude-haiku-4-5")  # 19 < 20
    _calls(tally, 40, errors=9, provider="gemini", model="gemini-2.5-flash")     # 22.5 %
    _calls(tally, 30, errors=30, provider="deepseek", model="deepseek-chat",
           minutes_ago=20)                                          # outside the window
    fired = tally.check_alerts()
    assert [(a.subject, a.value, a.calls) for a in fired] == [("openai", 0.25, 20)]
    assert received == [{**received[0], "rule_kind": "error_rate", "subject": "openai",
                         "value": 0.25, "calls": 20, "severity": "warning"}]
    assert tally.check_alerts() == []  # within its cool-down: not again


def test_blocked_calls_are_not_sent_calls(ledger_url, make_tally):
    tally = _tally(make_tally, ledger_url, [AlertRule("error_rate", threshold=0.5, min_calls=4)])
    _calls(tally, 4, errors=2)
    for number in range(10):
        tally.record(provider="openai", model="gpt-4o-mini", status="blocked",
                     ts=NOW - timedelta(minutes=1, seconds=number))
    assert [a.value for a in tally.check_alerts()] == [0.5]


def test_a_revoked_key_alerts_on_the_first_failure(ledger_url, make_tally):
    received: list[dict] = []
    tally = _tally(make_tally, ledger_url, [AlertRule("auth_failure")], received)
    _calls(tally, 50, provider="anthropic", model="claude-haiku-4-5")
    _calls(tally, 1, errors=1, error_type=AUTH)
    fired = tally.check_alerts()
    assert [(a.subject, a.severity, a.value) for a in fired] == [("openai", "critical", 1.0)]
    assert fired[0].details == {"error_types": {AUTH: 1}}


def test_rate_limits_clustering_on_a_provider(ledger_url, make_tally):
    tally = _tally(make_tally, ledger_url, [AlertRule("rate_limited", threshold=5)])
    _calls(tally, 10, errors=5, error_type=LIMITED, provider="deepseek", model="deepseek-chat")
    _calls(tally, 10, errors=4, error_type=LIMITED)                       # 4 < 5
    _calls(tally, 10, errors=10, error_type="openai.RateLimitError", provider="moonshot",
           model="kimi-k2", minutes_ago=30)                               # long ago
    assert [(a.subject, a.value) for a in tally.check_alerts()] == [("deepseek", 5.0)]


def test_latency_p95_of_a_model(ledger_url, make_tally):
    rule = AlertRule("latency_p95", threshold=9000, min_calls=50, window="3h")
    tally = _tally(make_tally, ledger_url, [rule])
    durations = [100.0 * (n + 1) for n in range(100)]  # p95 (nearest rank) is 9,500 ms
    for number, latency in enumerate(durations):  # over whole hours and edges alike
        tally.record(provider="openai", model="gpt-4o", input_tokens=1, output_tokens=1,
                     latency_ms=latency, ts=NOW - timedelta(minutes=number + 1, seconds=30))
    for number in range(100):
        tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1, output_tokens=1,
                     latency_ms=800, ts=NOW - timedelta(minutes=number + 1))
    fired = tally.check_alerts()
    assert [(a.subject, a.calls) for a in fired] == [("gpt-4o", 100)]
    assert math.isclose(fired[0].value, 9500, rel_tol=0.01)


def test_a_spend_spike_against_the_same_hour_of_previous_days(ledger_url, make_tally):
    rule = AlertRule("spend_spike", threshold=3, min_cost=0.5, per="project", baseline_days=7)
    tally = _tally(make_tally, ledger_url, [rule])
    last_hour = NOW.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    price = 1_000_000  # input tokens of gpt-4o-mini: $0.15
    for day in range(1, 8):  # 2 calls ($0.30) a day at that hour for both projects
        for project in ("etl", "chat"):
            for n in range(2):
                tally.record(provider="openai", model="gpt-4o-mini", input_tokens=price,
                             project=project, ts=last_hour - timedelta(days=day, minutes=-n - 1))
    for n in range(7):   # etl: $1.05 in the last hour, 3.5× its usual $0.30
        tally.record(provider="openai", model="gpt-4o-mini", input_tokens=price, project="etl",
                     ts=last_hour + timedelta(minutes=n + 1))
    for n in range(5):   # chat: $0.75, 2.5×: no
        tally.record(provider="openai", model="gpt-4o-mini", input_tokens=price, project="chat",
                     ts=last_hour + timedelta(minutes=n + 1))
    fired = tally.check_alerts()
    assert [a.subject for a in fired] == ["etl"]
    assert fired[0].value == pytest.approx(1.05, abs=1e-9)
    assert fired[0].details["baseline_average"] == pytest.approx(0.30, abs=1e-9)


def test_a_spike_is_alerted_once_for_the_hour_it_measured(ledger_url, make_tally):
    clock = Clock(NOW.replace(minute=5))
    tally = _tally(make_tally, ledger_url,
                   [AlertRule("spend_spike", threshold=3, min_cost=0.1, cooldown="1m")], clock=clock)
    last_hour = NOW.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1_000_000,
                 ts=last_hour + timedelta(minutes=10))
    assert len(tally.check_alerts()) == 1
    for minute in (10, 30, 55):  # the same finished hour, evaluated again and again
        clock.now = NOW.replace(minute=minute)
        assert tally.check_alerts() == []


def test_a_model_without_a_price_alerts_once_ever(ledger_url, make_tally):
    clock = Clock(NOW)
    tally = _tally(make_tally, ledger_url, [AlertRule("unpriced_model", cooldown="1m")],
                   clock=clock)
    tally.record(provider="internal", model="acme-llm-7b", input_tokens=10, output_tokens=5,
                 ts=NOW - timedelta(minutes=1))
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=10, output_tokens=5,
                 ts=NOW - timedelta(minutes=1))
    assert [a.subject for a in tally.check_alerts()] == ["internal/acme-llm-7b"]
    clock.now = NOW + timedelta(minutes=10)
    tally.record(provider="internal", model="acme-llm-7b", input_tokens=10, output_tokens=5,
                 ts=clock.now - timedelta(minutes=1))
    assert tally.check_alerts() == []  # known by now, however long the cool-down


def test_the_cooldown_lets_the_same_alert_out_again_later(ledger_url, make_tally):
    clock = Clock(NOW)
    tally = _tally(make_tally, ledger_url, [AlertRule("auth_failure", cooldown="30m")],
                   clock=clock)
    _calls(tally, 1, errors=1, error_type=AUTH, minutes_ago=1)
    assert len(tally.check_alerts()) == 1
    clock.now = NOW + timedelta(minutes=5)
    assert tally.check_alerts() == []
    clock.now = NOW + timedelta(minutes=35)
    tally.record(provider="openai", model="gpt-4o-mini", status="error", error_type=AUTH,
                 ts=clock.now - timedelta(minutes=1))
    assert len(tally.check_alerts()) == 1


def test_many_tallies_on_one_ledger_send_each_alert_once(ledger_url, make_tally):
    received: list[dict] = []
    rule = AlertRule("error_rate", threshold=0.5, min_calls=5)
    tallies = [_tally(make_tally, ledger_url, [rule], received) for _ in range(4)]
    _calls(tallies[0], 10, errors=6)
    assert tallies[0].flush(20)
    barrier = threading.Barrier(len(tallies))
    sent: list[list] = [[] for _ in tallies]

    failures: list[BaseException] = []

    def run(index: int) -> None:
        barrier.wait()
        try:
            for _ in range(3):
                sent[index] += tallies[index].check_alerts()
        except BaseException as exc:  # SQLite "database is locked" was one, before BEGIN IMMEDIATE
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(tallies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    assert sum(len(found) for found in sent) == 1 and len(received) == 1


def test_the_background_round_runs_off_the_callers_thread(sqlite_url, make_tally):
    threads: list[str] = []
    done = threading.Event()

    def sink(alert: dict) -> None:
        threads.append(threading.current_thread().name)
        done.set()

    make_tally(sqlite_url, clock=Clock(NOW), alert_rules=[AlertRule("auth_failure", window="1m")],
               alert_interval_s=0.2, alerts=[sink]).record(
        provider="openai", model="gpt-4o-mini", status="error", error_type=AUTH,
        ts=NOW - timedelta(seconds=5))
    assert done.wait(20)
    assert threads == ["llmtally-alert-rules"]


@pytest.mark.parametrize("arguments, says", [
    ({"kind": "error_rates"}, "kind='error_rates'"),
    ({"kind": "error_rate", "threshold": 1.5}, "0 < threshold <= 1"),
    ({"kind": "error_rate", "threshold": -1}, "must be a positive number"),
    ({"kind": "error_rate", "threshold": float("nan")}, "must be a positive number"),
    ({"kind": "latency_p95"}, "threshold is required"),
    ({"kind": "error_rate", "per": "user"}, "per='user'"),
    ({"kind": "error_rate", "window": "10s"}, "use 1m to 7d"),
    ({"kind": "error_rate", "window": "soon"}, "is not a duration"),
    ({"kind": "error_rate", "scope": {"team": "x"}}, "scope key 'team'"),
    ({"kind": "error_rate", "min_calls": 0}, "min_calls=0"),
    ({"kind": "spend_spike", "baseline_days": 400}, "at most 90"),
    ({"kind": "auth_failure", "severity": "fatal"}, "severity='fatal'"),
])
def test_a_rule_that_cannot_be_evaluated_is_refused_naming_the_key(arguments, says):
    with pytest.raises(ConfigError, match=None) as caught:
        AlertRule(**arguments)
    assert says in str(caught.value)


def test_a_rule_refused_at_start(sqlite_url, make_tally):
    with pytest.raises(ConfigError, match=r"alert_rules\[0\].*shorter than the evaluation interval"):
        make_tally(sqlite_url, alert_rules=[AlertRule("error_rate", window="2m")],
                   alert_interval_s=300)
    with pytest.raises(ConfigError, match=r"scope provider 'opneai' is unknown \(did you mean 'openai'\?\)"):
        make_tally(sqlite_url, alert_rules=[AlertRule("error_rate", scope={"provider": "opneai"})])
    tally = make_tally(sqlite_url)
    tally.record(provider="internal", model="acme", input_tokens=1, output_tokens=1)
    tally.close()
    # a provider of one's own is fine once the ledger has seen it
    make_tally(sqlite_url, alert_rules=[AlertRule("error_rate", scope={"provider": "internal"})])


def test_rules_from_llmtally_toml(tmp_path, sqlite_url):
    config = tmp_path / "llmtally.toml"
    config.write_text(f'database_url = "{sqlite_url}"\n'
                      '[[alert_rules]]\nkind = "error_rate"\nthreshold = 0.2\nmin_calls = 20\n'
                      'window = "15m"\nscope = { provider = "openai" }\n'
                      '[[alert_rules]]\nkind = "latency_p95"\nthreshold = 8000\n')
    tally = Tally.from_config(config)
    try:
        rules = tally.alert_monitor.rules
        assert [(r.kind, r.group, r.limit, r.window_delta) for r in rules] == [
            ("error_rate", "provider", 0.2, timedelta(minutes=15)),
            ("latency_p95", "model", 8000.0, timedelta(minutes=15))]
    finally:
        tally.close()
    config.write_text('[[alert_rules]]\nkind = "error_rate"\nthreshhold = 0.2\n')
    with pytest.raises(ConfigError, match=r"alert_rules\[0\]: unknown key 'threshhold'"):
        Tally.from_config(config)


def test_channel_status_from_recent_calls(ledger_url, make_tally):
    tally = make_tally(ledger_url, clock=Clock(NOW))
    _calls(tally, 20)                                                            # ok
    _calls(tally, 20, errors=3, provider="anthropic", model="claude-haiku-4-5")  # 15 %: degraded
    _calls(tally, 20, errors=1, error_type=LIMITED, provider="gemini", model="gemini-2.5-flash")
    _calls(tally, 10, errors=6, provider="deepseek", model="deepseek-chat")      # 60 %: down
    _calls(tally, 2, errors=2, error_type=AUTH, provider="moonshot", model="kimi-k2")  # key refused
    assert tally.flush(20)
    with tally.store.connect() as conn:
        found = channel_status(conn, NOW.replace(tzinfo=None))
    assert [(s.provider, s.state, s.sent, s.errors) for s in found] == [  # worst first
        ("moonshot", "down", 2, 2), ("deepseek", "down", 10, 6),
        ("anthropic", "degraded", 20, 3), ("gemini", "degraded", 20, 1), ("openai", "ok", 20, 0)]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmtally.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_status_and_alerts_commands(sqlite_url, make_tally):
    now = datetime.now(timezone.utc)
    tally = make_tally(sqlite_url, alert_rules=[AlertRule("auth_failure")])
    tally.record(provider="openai", model="gpt-4o-mini", status="error", error_type=AUTH,
                 ts=now - timedelta(minutes=1))
    tally.record(provider="anthropic", model="claude-haiku-4-5", input_tokens=1, output_tokens=1,
                 ts=now - timedelta(minutes=1))
    fired = tally.check_alerts()
    tally.close()
    shown = _cli("status", "--db", sqlite_url, "--json")
    assert shown.returncode == 0, shown.stderr
    assert [(s["provider"], s["state"]) for s in json.loads(shown.stdout)] == \
        [("openai", "down"), ("anthropic", "ok")]
    listed = _cli("alerts", "--db", sqlite_url, "--open", "--json")
    assert [a["id"] for a in json.loads(listed.stdout)] == [fired[0].id]
    acked = _cli("alerts", "--db", sqlite_url, "--ack", fired[0].id[:8])
    assert acked.returncode == 0 and "acknowledged: 1" in acked.stdout
    assert json.loads(_cli("alerts", "--db", sqlite_url, "--open", "--json").stdout) == []
    again = _cli("alerts", "--db", sqlite_url, "--ack", "ffffffff")  # no such alert
    assert again.returncode == 1
    short = _cli("alerts", "--db", sqlite_url, "--ack", "ab")
    assert short.returncode == 2 and len(short.stderr.strip().splitlines()) == 1


def test_acknowledging_by_a_prefix_that_two_alerts_share_does_nothing(sqlite_url, make_tally):
    from llmtally._alerts.history import ALERTS, acknowledge, recent

    tally = make_tally(sqlite_url)
    row = {"rule_key": "k", "rule": "r", "kind": "auth_failure", "subject": "openai",
           "severity": "critical", "value": 1.0, "threshold": 1.0, "calls": 1,
           "window_start": datetime(2026, 11, 25), "fired_at": datetime(2026, 11, 25),
           "details": "{}"}
    with tally.store.write() as conn:
        conn.execute(ALERTS.insert(), [{**row, "id": "abcdef01" + "0" * 24},
                                       {**row, "id": "abcdef02" + "0" * 24}])
    with tally.store.write() as conn:
        assert acknowledge(conn, ["abcdef"], by="me", now=datetime(2026, 11, 26)) == 0
        assert acknowledge(conn, ["abcdef02"], by="me", now=datetime(2026, 11, 26)) == 1
    with tally.store.connect() as conn:
        assert [(a.id[:8], a.acknowledged_by) for a in recent(conn)] == \
            [("abcdef01", None), ("abcdef02", "me")]
