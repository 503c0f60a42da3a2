"""Tally.from_config(): llmtally.toml + LLMTALLY_* variables, and clear errors for bad values."""

from __future__ import annotations

import pytest
from conftest import fetch_events
from hypothesis import given, settings
from hypothesis import strategies as st

from llmtally import ConfigError, Tally
from llmtally._config import load_settings


def _write(tmp_path, text: str):
    path = tmp_path / "llmtally.toml"
    path.write_text(text)
    return path


def test_the_file_configures_database_scope_and_prices(tmp_path):
    db = tmp_path / "from-config.db"
    config = _write(tmp_path, f"""
database_url = "{db}"
currency = "usd"
price_map = "bundled"
spill_path = "{tmp_path / 'spill.jsonl'}"

[rates]
CNY = 0.14

[scope]
project = "search"
tags = ["prod"]

[prices."moonshot/kimi-k2.5"]
input = 4.0
output = 16.0
per = "1M"
currency = "CNY"
""")
    with Tally.from_config(config) as tally:
        tally.record(model="moonshot/kimi-k2.5", input_tokens=1_000_000, output_tokens=500_000)
    [row] = fetch_events(f"sqlite:///{db}")
    assert row["project"] == "search"
    assert row["cost"] == pytest.approx((4.0 + 0.5 * 16.0) * 0.14, abs=1e-9)
    assert row["price_source"].startswith("override:")


def test_environment_wins_over_the_file_and_arguments_over_both(tmp_path, monkeypatch):
    config = _write(tmp_path, f'database_url = "{tmp_path / "file.db"}"\n[scope]\nproject = "file"\n')
    monkeypatch.setenv("LLMTALLY_CONFIG", str(config))
    monkeypatch.setenv("LLMTALLY_PROJECT", "env-project")
    monkeypatch.setenv("LLMTALLY_TAGS", "a, b")
    monkeypatch.setenv("LLMTALLY_RATES", "CNY=0.14,EUR=1.08")
    settings_ = load_settings()
    assert settings_["database_url"] == str(tmp_path / "file.db")
    assert settings_["scope"] == {"project": "env-project", "tags": ["a", "b"]}
    assert settings_["rates"] == {"CNY": 0.14, "EUR": 1.08}
    monkeypatch.setenv("LLMTALLY_DATABASE_URL", str(tmp_path / "env.db"))
    assert load_settings()["database_url"] == str(tmp_path / "env.db")
    with Tally.from_config(database_url=str(tmp_path / "arg.db"), price_map="bundled",
                           spill_path=tmp_path / "s.jsonl") as tally:
        assert tally.database_url.endswith("arg.db")


def test_no_file_and_no_environment_means_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_settings() == {}


@pytest.mark.parametrize(("text", "message"), [
    ('databse_url = "x.db"', r"unknown key 'databse_url' \(did you mean 'database_url'\?\)"),
    ("currency = 5", r"currency = 5 must be a non-empty string"),
    ('[scope]\nteam = "x"', r"unknown key scope.'team'; allowed: project, user"),
    ('[scope]\ntags = "x"', r"scope.tags = 'x' must be a list of strings"),
    ("[rates]\nCNY = -1", r"rates.CNY = -1 must be a positive number"),
    ('[prices."m"]\noutput = 1', r"prices.'m' needs at least input"),
    ('[prices."m"]\ninput = 1\nprice = 2', r"unknown key prices.'m'.'price'"),
    ('[prices."m"]\ninput = -1', r"prices.'m'.*input"),
    ('[prices."m"]\ninput = 1\nper = "2M"', r"prices.'m'.*per"),
    ('[prices."m"]\ninput = 1\ncurrency = "XYZ"', r"prices.'m'.*XYZ"),
    ("alert = []", r"unknown key 'alert' \(did you mean 'alerts'\?\)"),
    ("alerts = [\"email\"]", r"alerts must be a list of \"log\" and webhook URLs"),
    ("[[budgets]]\nusd = -1", r"budgets\[1\]: Budget: usd=-1 must be a number >= 0"),
    ("[[budgets]]\nusd = 1\nper = \"fortnight\"", r"budgets\[1\].*per='fortnight'"),
    ("[[budgets]]\nusd = 1\nscope = { team = \"x\" }", r"budgets\[1\].*scope key 'team'"),
    ("[[budgets]]\nusd = 1\neach = \"colour\"", r"budgets\[1\].*each='colour'"),
    ("[[budgets]]\ndollars = 1", r"unknown key budgets\[1\].'dollars'"),
    ("budgets = 5", r"budgets must be an array of tables"),
    ("fail_closed = \"maybe\"", r"fail_closed = 'maybe' must be true or false"),
    ("this is = not toml", r"not valid TOML"),
])
def test_bad_values_name_the_key_the_value_and_the_fix(tmp_path, text, message):
    config = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(config)
    assert str(config) in str(info.value) or "TOML" in str(info.value)


def test_bad_environment_values_are_named(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMTALLY_RATES", "CNY:0.14")
    with pytest.raises(ConfigError, match="LLMTALLY_RATES"):
        load_settings()
    monkeypatch.delenv("LLMTALLY_RATES")
    monkeypatch.setenv("LLMTALLY_CURRENCY", "ZZZ")
    with pytest.raises(ConfigError, match="ZZZ"):
        Tally.from_config(database_url=str(tmp_path / "a.db"))


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


toml_values = st.one_of(
    st.integers(-5, 5).map(str), st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(alphabet="abcXYZ ./_-", max_size=8).map(lambda s: f'"{s}"'),
    st.just("[]"), st.just('["a", 1]'), st.just("true"), st.just("{}"),
)
toml_keys = st.sampled_from(["database_url", "currency", "price_map", "spill_path", "rates",
                             "scope", "prices", "budgets", "timezone", "fail_closed", "x"])


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.tuples(toml_keys, toml_values), max_size=4, unique_by=lambda e: e[0]))
def test_random_config_files_load_or_fail_with_one_clear_error(tmp_path_factory, entries):
    path = tmp_path_factory.mktemp("cfg") / "llmtally.toml"
    path.write_text("\n".join(f"{key} = {value}" for key, value in entries))
    try:
        load_settings(path, environ={})
    except ConfigError as exc:
        assert str(path) in str(exc) or "TOML" in str(exc)


def test_budgets_from_the_file_block_calls(tmp_path):
    config = _write(tmp_path, f"""
database_url = "{tmp_path / 'b.db'}"
timezone = "Europe/Berlin"
price_map = "bundled"

[prices.penny]
input = 0
output = 0.01
per = "token"

[[budgets]]
usd = 0.02
per = "day"
each = "user"
warn_at = [0.5]
""")
    from llmtally import Budget, BudgetExceeded

    with Tally.from_config(config, spill_path=tmp_path / "s.jsonl") as tally:
        assert tally.budgets is not None
        assert tally.budgets.budgets == (Budget(usd=0.02, per="day", each="user", warn_at=(0.5,)),)
        for _ in range(2):
            held = tally.reserve(model="penny", input_tokens=0, max_tokens=1, user="ann")
            tally.record(model="penny", output_tokens=1, user="ann", reservation=held)
        with pytest.raises(BudgetExceeded):
            tally.reserve(model="penny", input_tokens=0, max_tokens=1, user="ann")
