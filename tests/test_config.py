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
    ('[scope]\nteam = "x"', r"unknown key 'team' in scope; allowed: project, user"),
    ('[scope]\ntags = [1]', r"scope\['tags'\] = \[1\] must be a list of strings"),
    ("[rates]\nCNY = -1", r"rates\['CNY'\] = -1 must be a number > 0"),
    ('[prices."m"]\noutput = 1', r"prices\['m'\] = \{'output': 1\} needs at least input"),
    ('[prices."m"]\ninput = 1\nprice = 2', r"unknown key 'price' in prices\['m'\]"),
    ('[prices."m"]\ninput = -1', r"prices.'m'.*input"),
    ('[prices."m"]\ninput = 1\nper = "2M"', r"prices.'m'.*per"),
    ('[prices."m"]\ninput = 1\ncurrency = "XYZ"', r"prices.'m'.*XYZ"),
    ("alert = []", r"unknown key 'alert' \(did you mean 'alerts'\?\)"),
    ("alerts = [\"email\"]", r"alerts\[0\] = 'email' is not allowed; use \"log\", a webhook URL"),
    ("[[budgets]]\nusd = -1", r"budgets\[1\]: Budget: usd=-1 must be a number >= 0"),
    ("[[budgets]]\nusd = 1\nper = \"fortnight\"", r"budgets\[1\].*per='fortnight'"),
    ("[[budgets]]\nusd = 1\nscope = { team = \"x\" }", r"budgets\[1\].*scope key 'team'"),
    ("[[budgets]]\nusd = 1\neach = \"colour\"", r"budgets\[1\].*each='colour'"),
    ("[[budgets]]\ndollars = 1", r"unknown key 'dollars' in budgets\[1\]"),
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


# -- Tally(...) arguments: as strict as the same keys in the file ------------------------------

_WRONG_ARGUMENTS = [
    ("fail_closed", "false", "must be true or false (a bool, not str)"),
    ("fail_closed", 0, "must be true or false (a bool, not int)"),
    ("database_url", 5, "must be a non-empty string"),
    ("database_url", b"llmtally.db", "must be a non-empty string"),
    ("prices", ["gpt-4o"], "must be a table of model name"),
    ("prices", {"m": 0.5}, "prices['m'] = 0.5 must be a llmtally.Price"),
    ("prices", {"m": {"input": "0.5"}}, "prices['m']['input'] = '0.5' must be a number"),
    ("currency", 978, "must be a non-empty string"),
    ("rates", {"CNY": "0.14"}, "rates['CNY'] = '0.14' must be a number > 0"),
    ("rates", {"CNY": True}, "rates['CNY'] = True must be a number > 0"),
    ("rates", [("CNY", 0.14)], "must be a table of currency code"),
    ("price_map", 1, "must be a path"),
    ("scope", "project=search", "must be a table such as"),
    ("scope", {"project": 7}, "scope['project'] = 7 must be a string"),
    ("scope", {"tags": "a,b".split(",") + [3]}, "scope['tags']"),
    ("scope", {"metadata": "x"}, "scope['metadata'] = 'x' must be a table"),
    ("scope", {"team": "x"}, "unknown key 'team' in scope"),
    ("spill_path", 5, "must be a path"),
    ("batch_size", "500", "must be a whole number > 0"),
    ("batch_size", True, "must be a whole number > 0"),
    ("batch_size", 2.5, "must be a whole number > 0"),
    ("flush_interval_s", True, "must be a number of seconds > 0"),
    ("flush_interval_s", "0.2", "must be a number of seconds > 0"),
    ("flush_interval_s", float("nan"), "must be a number of seconds > 0"),
    ("max_queue", 1.5, "must be a whole number > 0"),
    ("max_queue", 0, "must be a whole number > 0"),
    ("budgets", "usd=50", "must be a list of llmtally.Budget"),
    ("budgets", {"usd": 50, "per": "day"}, "must be a list of llmtally.Budget"),
    ("budgets", [{"usd": 50, "per": "day"}], "is not a llmtally.Budget"),
    ("timezone", 1, "must be a non-empty string"),
    ("durability", "Sync!", "use \"batched\""),
    ("durability", True, "use \"batched\""),
    ("alerts", "email", "'email' is not allowed"),
    ("alerts", {"log": True}, "must be a list of \"log\""),
    ("alerts", ["log", 5], "5 is not allowed"),
    ("reservation_ttl_s", "900", "must be a number of seconds > 0"),
    ("reservation_ttl_s", False, "must be a number of seconds > 0"),
    ("reservation_ttl_s", -1, "must be a number of seconds > 0"),
    ("max_output_estimate", "4096", "must be a whole number > 0"),
    ("max_output_estimate", 4096.0, "must be a whole number > 0"),
    ("clock", "now", "must be a callable"),
]


@pytest.mark.parametrize(("name", "value", "message"), _WRONG_ARGUMENTS,
                         ids=[f"{n}={v!r}" for n, v, _ in _WRONG_ARGUMENTS])
def test_each_tally_argument_of_the_wrong_type_is_a_config_error(tmp_path, name, value, message):
    db = tmp_path / "never-made.db"
    arguments = {"spill_path": tmp_path / "s.jsonl", "price_map": "bundled", name: value}
    arguments.setdefault("database_url", f"sqlite:///{db}")
    with pytest.raises(ConfigError) as caught:
        Tally(**arguments)
    assert str(caught.value).startswith(f"Tally({name}=")
    assert message in str(caught.value)
    assert not db.exists()  # refused before the ledger file was created


def test_fail_closed_string_false_no_longer_fails_closed(tmp_path):
    """The reported bug: a truthy string made the Tally fail closed."""
    with pytest.raises(ConfigError, match=r"Tally\(fail_closed='false'\): must be true or false"):
        Tally(f"sqlite:///{tmp_path / 'l.db'}", fail_closed="false", price_map="bundled")


def test_right_types_in_every_form_are_accepted(tmp_path):
    from datetime import datetime, timezone

    from llmtally import Budget, Price

    with Tally(f"sqlite:///{tmp_path / 'ok.db'}", spill_path=tmp_path / "s.jsonl",
               price_map="bundled", fail_closed=True, currency="USD", rates={"CNY": 0.14},
               prices={"a": Price(input=1.0), "b": {"input": 1, "output": 2.5, "per": "1M"}},
               scope={"project": "p", "tags": ("x", "y"), "metadata": {"k": 1}},
               batch_size=10, flush_interval_s=1, max_queue=1000,
               budgets=(Budget(usd=5, per="day"),), timezone="Europe/Berlin",
               durability="sync", alerts="log", reservation_ttl_s=60.5,
               max_output_estimate=100, clock=lambda: datetime.now(timezone.utc)) as tally:
        tally.record(model="b", input_tokens=1_000_000, output_tokens=1_000_000)
    [row] = fetch_events(f"sqlite:///{tmp_path / 'ok.db'}")
    assert row["cost"] == pytest.approx(3.5) and row["project"] == "p"


# -- one settings model: the same rule and words wherever a key is set -------------------------

# (key, the file's TOML value, the same value in Python, the variable that sets it, its text)
_SAME_VALUE_EVERYWHERE = [
    ("durability", '"eventually"', "eventually", "LLMTALLY_DURABILITY", "eventually"),
    ("unpriced", '"maybe"', "maybe", "LLMTALLY_UNPRICED", "maybe"),
    ("timezone", '"Mars/Olympus"', "Mars/Olympus", "LLMTALLY_TIMEZONE", "Mars/Olympus"),
    ("currency", '" "', " ", "LLMTALLY_CURRENCY", " "),
    ("rates", "{ CNY = -1 }", {"CNY": -1}, "LLMTALLY_RATES", "CNY=-1"),
    ("batch_size", "0", 0, None, None),
    ("reservation_ttl_s", "-5", -5, None, None),
    ("scope", "{ team = \"x\" }", {"team": "x"}, None, None),
    ("prices", "{ m = { input = 1, per = \"2M\" } }", {"m": {"input": 1, "per": "2M"}}, None, None),
    ("alerts", '["log", "email"]', ["log", "email"], None, None),
]


def _problem(message: str) -> str:
    """What a message says after the prefix naming where the value came from."""
    head, _, rest = message.partition("): " if message.startswith("Tally(") else ": ")
    return rest


@pytest.mark.parametrize(("key", "toml", "python", "variable", "text"), _SAME_VALUE_EVERYWHERE,
                         ids=[case[0] for case in _SAME_VALUE_EVERYWHERE])
def test_a_bad_value_is_refused_in_the_same_words_wherever_it_is_set(tmp_path, key, toml, python,
                                                                      variable, text):
    config = _write(tmp_path, f"{key} = {toml}\n")
    with pytest.raises(ConfigError) as from_file:
        load_settings(config, environ={})
    db = tmp_path / "never.db"
    with pytest.raises(ConfigError) as from_argument:
        Tally(f"sqlite:///{db}", price_map="bundled", **{key: python})
    assert not db.exists()
    assert str(from_file.value).startswith(f"{config}: ")
    assert str(from_argument.value).startswith(f"Tally({key}=")
    file_says, argument_says = _problem(str(from_file.value)), _problem(str(from_argument.value))
    # the argument's prefix shows the value, so a top-level key's value is not said twice
    assert file_says in (argument_says, f"{key} = {python!r} {argument_says}")
    if variable:
        with pytest.raises(ConfigError) as from_environment:
            load_settings(None, environ={variable: text})
        assert str(from_environment.value).startswith(f"{variable}: ")
        # LLMTALLY_RATES=CNY=-1 reads as the float -1.0
        assert _problem(str(from_environment.value)).replace("-1.0", "-1") == file_says


def test_the_file_sets_the_tuning_keys_and_they_reach_the_tally(tmp_path):
    config = _write(tmp_path, f"""
database_url = "{tmp_path / 't.db'}"
price_map = "bundled"
batch_size = 7
flush_interval_s = 0.05
max_queue = 70
reservation_ttl_s = 30
max_output_estimate = 100
""")
    settings_ = load_settings(config, environ={})
    assert settings_ == {"database_url": str(tmp_path / "t.db"), "price_map": "bundled",
                         "batch_size": 7, "flush_interval_s": 0.05, "max_queue": 70,
                         "reservation_ttl_s": 30, "max_output_estimate": 100}
    with Tally.from_config(config, spill_path=tmp_path / "s.jsonl") as tally:
        assert (tally._writer.batch_size, tally._writer.max_queue) == (7, 70)


def test_environment_values_name_their_variable(tmp_path):
    with pytest.raises(ConfigError, match=r"^LLMTALLY_FAIL_CLOSED='maybe' must be true or false"):
        load_settings(None, environ={"LLMTALLY_FAIL_CLOSED": "maybe"})
    assert load_settings(None, environ={"LLMTALLY_FAIL_CLOSED": "yes"}) == {"fail_closed": True}
    config = _write(tmp_path, 'durability = "sync"\n')
    # the variable wins over the file, and a bad one is named, not the file
    with pytest.raises(ConfigError, match=r"^LLMTALLY_DURABILITY: durability = 'later' is not allowed"):
        load_settings(config, environ={"LLMTALLY_DURABILITY": "later"})


def test_a_flag_in_the_file_is_a_toml_boolean(tmp_path):
    config = _write(tmp_path, 'fail_closed = "false"\n')
    with pytest.raises(ConfigError, match=r"fail_closed = 'false' must be true or false \(a bool, not str\)"):
        load_settings(config, environ={})
    assert load_settings(_write(tmp_path, "fail_closed = false\n"), environ={}) == {"fail_closed": False}


# -- found by a hostile review ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [
    ("flush_interval_s", 10**400), ("flush_interval_s", 1e308), ("reservation_ttl_s", 1e308),
    ("reservation_ttl_s", 10**400), ("rates", {"CNY": 10**400}), ("max_output_estimate", 10**13),
    ("batch_size", 10**400), ("max_queue", 10**12),
])
def test_out_of_range_numbers_are_a_config_error_before_anything_is_made(tmp_path, name, value):
    db = tmp_path / "never.db"
    with pytest.raises(ConfigError, match=rf"^Tally\({name}="):
        Tally(f"sqlite:///{db}", price_map="bundled", **{name: value})
    assert not db.exists()
    config = _write(tmp_path, f"{name} = {value}\n" if name != "rates" else f"[rates]\nCNY = {10**400}\n")
    with pytest.raises(ConfigError, match=rf"^{config}: "):
        load_settings(config, environ={})


def test_currency_codes_are_checked_by_the_settings_model_and_named_where_they_came_from():
    with pytest.raises(ConfigError, match=r"^LLMTALLY_CURRENCY: currency = 'xyz' is not an ISO 4217"):
        load_settings(None, environ={"LLMTALLY_CURRENCY": "xyz"})
    with pytest.raises(ConfigError, match=r"^Tally\(rates=\{'usdollar': 1.0\}\): rates\['usdollar'\] = "
                                          r"1.0 is not under an ISO 4217 currency code"):
        Tally("never.db", rates={"usdollar": 1.0})
    assert load_settings(None, environ={"LLMTALLY_CURRENCY": " eur "}) == {"currency": "EUR"}


def test_paths_are_kept_exactly_as_given(tmp_path):
    spill = tmp_path / "spill.jsonl "
    with Tally(f"sqlite:///{tmp_path / 'l.db'}", price_map="bundled", spill_path=spill) as tally:
        assert tally.spill_path == spill


def test_a_clock_cannot_come_from_a_file(tmp_path):
    config = _write(tmp_path, 'clock = "now"\n')
    with pytest.raises(ConfigError, match=r"clock cannot be set in a file"):
        load_settings(config, environ={})


def test_llmtallys_tables_stay_out_of_the_applications_sqlmodel_metadata(tmp_path):
    """An application's own ``SQLModel.metadata.create_all()`` creates its tables only, and its
    model names never clash with llmtally's."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        from sqlmodel import Field, Relationship, Session, SQLModel, create_engine, select
        import llmtally, llmtally._budgets.tables
        from llmtally import UsageEvent

        class BudgetCounter(SQLModel, table=True):          # the app's own model of that name
            __tablename__ = "app_budget_counter"
            id: int | None = Field(default=None, primary_key=True)
            team_id: int | None = Field(default=None, foreign_key="team.id")
            team: "Team" = Relationship(back_populates="counters")

        class Team(SQLModel, table=True):
            id: int | None = Field(default=None, primary_key=True)
            counters: list["BudgetCounter"] = Relationship(back_populates="team")

        engine = create_engine("sqlite:///{tmp_path / 'app.db'}")
        SQLModel.metadata.create_all(engine)
        with Session(engine) as session:
            session.add(Team(id=1)); session.commit()
            print(sorted(SQLModel.metadata.tables), session.exec(select(Team)).all())
        print(UsageEvent.__tablename__ in UsageEvent.metadata.tables)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["['app_budget_counter', 'team'] [Team(id=1)]", "True"]


def test_a_subclass_close_runs_at_exit(tmp_path):
    import subprocess
    import sys

    script = (
        "from llmtally import Tally\n"
        "class Mine(Tally):\n"
        "    def close(self, timeout=10.0):\n"
        "        print('Mine.close ran', flush=True)\n"
        "        super().close(timeout)\n"
        f"t = Mine('sqlite:///{tmp_path / 'x.db'}', price_map='bundled')\n"
        "t.record(model='gpt-4o-mini', input_tokens=1)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "Mine.close ran\n"
    from conftest import fetch_events

    assert len(fetch_events(f"sqlite:///{tmp_path / 'x.db'}")) == 1
