"""Each command offers the settings it reads and no other; help shows variables and defaults;
command options that operators tune from an environment file have variables too."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import click
import psycopg
import pytest
import redis
from click.testing import CliRunner

import balance_sync.cli.options
from balance_sync.cli import cli
from balance_sync.cli.options import SETTING_OPTIONS, SettingOption, setting_default
from balance_sync.settings import SETTING_ENV, Settings, resolve_settings
from tests.helpers import Balsync

Pg = psycopg.Connection[tuple[object, ...]]
FIELDS = frozenset(f.name for f in dataclasses.fields(Settings))
# resolve_settings folds --cluster into the URL's scheme: what reads the URL reads it.
FOLDED = {"cluster": "redis_url"}
# How each command runs in the meta-test, over a synced table with a valid key, an invalid
# one and a conflict; conflicts in a table, which names the keys.
RUNS: dict[str, tuple[str, ...]] = {
    "init-db": ("--json",),
    "sync": ("--json", "--force"),
    "conflicts": (),
    "verify": ("--json",),
    "clear-cache": ("--json", "--dry-run"),
    "restore": ("--json", "--dry-run"),
    "skipped": ("--json",),
    "prune": ("--json", "--dry-run"),
    "health": ("--json",),
    "stats": ("--json",),
    "status": ("--json",),
    "schedule": ("--json",),
}


def _setting_params(command: click.Command) -> dict[str, SettingOption]:
    return {p.setting: p for p in command.params if isinstance(p, SettingOption)}


class _Recorder:
    """Stands in for resolve_settings: the real settings, in an object that notes each read."""

    def __init__(self) -> None:
        self.read: set[str] = set()

    def __call__(
        self, options: Mapping[str, object | None], environ: Mapping[str, str]
    ) -> Settings:
        real = resolve_settings(options, environ)
        read = self.read

        class Recording(Settings):
            def __getattribute__(self, name: str) -> object:
                if name in FIELDS:
                    read.add(name)
                return super().__getattribute__(name)

        return Recording(**{name: getattr(real, name) for name in FIELDS})


@pytest.fixture
def synced(balsync: Balsync, rds: redis.Redis, key_prefix: str, tmp_path: Path, pg: Pg) -> Balsync:
    """A table synced from a valid and an invalid key, with a row changed behind balsync's
    back (a conflict); no crontab, no systemd."""
    balsync.env.update(
        {
            "BALSYNC_CRONTAB_COMMAND": str(tmp_path / "no" / "crontab"),
            "BALSYNC_SYSTEMCTL_COMMAND": str(tmp_path / "no" / "systemctl"),
        }
    )
    balsync.ok("init-db")
    rds.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "oops"})
    assert balsync("sync", "--quiet").exit_code == 1
    pg.execute("UPDATE user_balances SET balance = 99 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "11.00")
    assert balsync("sync", "--quiet", "--force").exit_code == 1
    return balsync


def test_every_command_has_a_run_in_the_meta_test() -> None:
    """A new command must say how the meta-test below runs it."""
    assert set(RUNS) == set(cli.commands)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_command_offers_exactly_the_settings_it_reads(
    name: str, synced: Balsync, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every setting option of a command is read when it runs (none accepted and ignored),
    and every setting it reads is an option of it (SPEC: each setting is an option)."""
    recorder = _Recorder()
    monkeypatch.setattr(balance_sync.cli.options, "resolve_settings", recorder)
    # sync: with both monitoring outputs set, so that reading one does not hide the other
    env = {"BALSYNC_METRICS_FILE": str(tmp_path / "m.prom")} if name == "sync" else {}
    result = synced(name, *RUNS[name], env=env)
    assert result.exit_code in (0, 1), (result.stdout, result.stderr)
    offered = {FOLDED.get(s, s) for s in _setting_params(cli.commands[name])}
    assert offered == recorder.read


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("verify", "--metrics-file", "x.prom"), "--metrics-file"),
        (("status", "--ping-url", "https://hc.example/x"), "--ping-url"),
        (("schedule", "--cluster"), "--cluster"),
        (("skipped", "--redis-url", "redis://localhost/0"), "--redis-url"),
        (("prune", "--value-format", "cents"), "--value-format"),
    ],
)
def test_an_option_the_command_does_not_use_is_a_usage_error(
    args: tuple[str, ...], option: str
) -> None:
    """A setting the command never reads is no option of it: click's usage error, exit 2."""
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 2
    assert f"No such option '{option}'" in result.stderr


def test_sync_takes_metrics_file(
    initialized: Balsync, rds: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    """`sync --metrics-file` still works: sync is the command that writes metrics."""
    rds.set(f"{key_prefix}1", "10.00")
    metrics = tmp_path / "balsync.prom"
    initialized.ok("sync", "--quiet", "--metrics-file", str(metrics))
    assert "balsync_" in metrics.read_text()


def test_a_setting_variable_still_works_where_the_command_uses_it(initialized: Balsync) -> None:
    """The variables are unchanged: BALSYNC_TABLE still names verify's table."""
    result = initialized("verify", "--json", env={"BALSYNC_TABLE": "absent_table"})
    assert result.exit_code == 5
    assert "absent_table" in result.stderr


def _flat_help(*path: str) -> str:
    """A command's help with all whitespace removed, so a wrapped line cannot split a name."""
    result = CliRunner().invoke(cli, [*path, "--help"], catch_exceptions=False)
    assert result.exit_code == 0
    return "".join(result.stdout.split())


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_help_shows_each_settings_variables_and_default(name: str) -> None:
    """`--help` lists, for each setting option, the variables resolve_settings reads, in
    order, and the default of Settings itself."""
    text = _flat_help(name)
    for setting in _setting_params(cli.commands[name]):
        assert "envvar:" + ",".join(SETTING_ENV[setting]) in text, setting
        default = setting_default(setting)
        if default is not None:
            assert f"default:{default}" in text, setting


def test_setting_defaults_in_help_are_the_ones_settings_resolve_to() -> None:
    """The help's defaults are what an empty environment resolves to."""
    resolved = resolve_settings({}, {})
    assert setting_default("table") == str(resolved.table) == "user_balances"
    assert setting_default("retry_timeout") == "60"
    assert resolved.retry_timeout == 60
    assert setting_default("keep_runs") == "90d"
    assert resolved.keep_runs == 90 * 86400
    assert setting_default("redis_url") == resolved.redis_url
    assert setting_default("database_url") is None  # libpq's defaults


def test_every_setting_has_one_option_and_its_variables() -> None:
    """The option table covers every field of Settings, each with its variables."""
    assert set(SETTING_OPTIONS) == set(SETTING_ENV) == FIELDS


@pytest.mark.parametrize(
    ("command", "option", "variable", "default"),
    [
        ("sync", "--batch-size", "BALSYNC_BATCH_SIZE", "25000"),
        ("sync", "--min-interval", "BALSYNC_MIN_INTERVAL", "300"),
        ("sync", "--on-conflict", "BALSYNC_ON_CONFLICT", "skip"),
        ("sync", "--wait", "BALSYNC_WAIT", "0"),
        ("health", "--max-age", "BALSYNC_MAX_AGE", "7200"),
    ],
)
def test_help_shows_command_option_variables_and_defaults(
    command: str, option: str, variable: str, default: str
) -> None:
    """An operator's tunable command option names its variable and its default in --help."""
    text = _flat_help(command)
    assert f"envvar:{variable};default:{default}" in text.split(option, 1)[1]


# -- the command options' variables, and the option winning over them ----------------------


def _batches(stderr: str) -> int:
    return sum(1 for line in stderr.splitlines() if "batch " in line and "keys," in line)


def test_batch_size_from_the_environment_and_the_option_wins(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """BALSYNC_BATCH_SIZE=1 syncs 3 keys in 3 batches; --batch-size 100 beside it in one."""
    rds.mset({f"{key_prefix}{i}": "1.00" for i in (1, 2, 3)})
    env = {"BALSYNC_BATCH_SIZE": "1"}
    assert _batches(initialized.ok("sync", "-v", "--force", env=env).stderr) == 3
    result = initialized.ok("sync", "-v", "--force", "--batch-size", "100", env=env)
    assert _batches(result.stderr) == 1


def test_min_interval_from_the_environment_and_the_option_wins(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """BALSYNC_MIN_INTERVAL=0 lets a sync run right after another; --min-interval 3600 skips."""
    rds.set(f"{key_prefix}1", "1.00")
    initialized.ok("sync", "--quiet")
    env = {"BALSYNC_MIN_INTERVAL": "0"}
    assert json.loads(initialized.ok("sync", "--json", env=env).stdout)["status"] == "success"
    again = initialized.ok("sync", "--json", "--min-interval", "3600", env=env)
    assert json.loads(again.stdout)["status"] == "skipped"


def test_on_conflict_from_the_environment_is_checked_like_the_option(
    initialized: Balsync,
) -> None:
    """A bad BALSYNC_ON_CONFLICT is a usage error naming the variable; the option wins."""
    result = initialized("sync", "--json", env={"BALSYNC_ON_CONFLICT": "maybe"})
    assert result.exit_code == 2
    assert "BALSYNC_ON_CONFLICT" in result.stderr
    result = initialized(
        "sync", "--json", "--on-conflict", "skip", env={"BALSYNC_ON_CONFLICT": "x"}
    )
    assert result.exit_code == 0, result.stderr


def test_wait_from_the_environment_is_checked_like_the_option(initialized: Balsync) -> None:
    """A negative BALSYNC_WAIT is a usage error naming the variable; --wait beside it wins."""
    result = initialized("sync", env={"BALSYNC_WAIT": "-1"})
    assert result.exit_code == 2
    assert "BALSYNC_WAIT" in result.stderr
    assert initialized("sync", "--quiet", "--wait", "0", env={"BALSYNC_WAIT": "-1"}).exit_code == 0


def _last_sync_check(result_stdout: str) -> dict[str, object]:
    checks = json.loads(result_stdout)["checks"]
    found = [c for c in checks if "sync" in str(c["name"])]
    assert found, checks
    return found[0]  # type: ignore[no-any-return]


def test_max_age_from_the_environment_and_the_option_wins(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """BALSYNC_MAX_AGE=0 makes the last sync too old; --max-age 3600 beside it, young enough."""
    rds.set(f"{key_prefix}1", "1.00")
    initialized.ok("sync", "--quiet")
    env = {"BALSYNC_MAX_AGE": "0"}
    assert _last_sync_check(initialized("health", "--json", env=env).stdout)["ok"] is False
    fresh = initialized("health", "--json", "--max-age", "3600", env=env)
    assert _last_sync_check(fresh.stdout)["ok"] is True
