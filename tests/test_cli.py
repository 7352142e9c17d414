"""The command line: help, exit codes, one-line errors, --json, --quiet, --verbose and logs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import psycopg
import pytest
import redis
from click.testing import CliRunner, Result

from balance_sync import __version__
from balance_sync.cli import cli
from balance_sync.monitoring.logs import LOGGER
from balance_sync.settings import TableName
from balance_sync.stores.postgres import Database, TableLock
from tests.helpers import Balsync, balances, sync_json_keys
from tests.support.devservers import free_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret"  # noqa: S105 - a test password that output must never show

Pg = psycopg.Connection[tuple[object, ...]]


@pytest.fixture(autouse=True)
def _close_log_handlers() -> Iterator[None]:
    """Each CLI run configures the package logger; close its files when the test ends."""
    yield
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _command_paths(command, (*prefix, name))


COMMANDS = list(_command_paths(cli))


def _command(path: tuple[str, ...]) -> click.Command:
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


LEAF_COMMANDS = [p for p in COMMANDS if not isinstance(_command(p), click.Group)]


def _everything(result: Result) -> str:
    return result.stdout + result.stderr


def _assert_one_error_line(result: Result, *words: str) -> str:
    """stderr is exactly one `balsync: error:` line naming the problem; no traceback."""
    assert "Traceback" not in _everything(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("balsync: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _error_line(result: Result) -> str:
    """The final `balsync: error:` line of a run that may have logged retries before it."""
    assert "Traceback" not in _everything(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("balsync: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _sync_json(result: Result) -> dict[str, object]:
    """stdout holds exactly one JSON object with exactly SPEC's sync keys, and those its
    status adds (a skipped run's reason, a failed run's error and exit code)."""
    assert result.stdout.endswith("\n")
    assert result.stdout.count("\n") == 1, result.stdout
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    assert set(data) == sync_json_keys(data.get("status"))
    counters = ("processed", "inserted", "updated", "unchanged", "skipped", "invalid")
    assert all(isinstance(data[name], int) for name in counters)
    assert data["processed"] == (
        data["inserted"] + data["updated"] + data["unchanged"] + data["skipped"]
    )
    assert isinstance(data["duration_s"], int | float)
    assert isinstance(data["dry_run"], bool)
    return data


# -- help and version ---------------------------------------------------------------------


def test_cli_has_the_spec_commands() -> None:
    """The commands SPEC names first are all there (the meta-test walks whatever exists)."""
    assert {"init-db", "sync"} <= set(cli.commands)


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_every_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    """`balsync CMD --help` exits 0 and shows at least one Example, for every command."""
    result = CliRunner().invoke(cli, [*path, "--help"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout
    assert "Example" in result.stdout


@pytest.mark.parametrize("path", LEAF_COMMANDS, ids=[" ".join(p) for p in LEAF_COMMANDS])
def test_every_command_takes_json_verbose_quiet(path: tuple[str, ...]) -> None:
    """SPEC: every command takes --json, -v/--verbose and -q/--quiet."""
    flags = {opt for param in _command(path).params for opt in param.opts}
    assert {"--json", "-v", "--verbose", "-q", "--quiet"} <= flags


def test_top_level_help_lists_every_command() -> None:
    """`balsync --help` exits 0 and names each command."""
    result = CliRunner().invoke(cli, ["--help"], catch_exceptions=False)
    assert result.exit_code == 0
    for name in cli.commands:
        assert name in result.stdout


def test_short_help_option_works() -> None:
    """-h is --help."""
    result = CliRunner().invoke(cli, ["sync", "-h"], catch_exceptions=False)
    assert result.exit_code == 0
    assert "--dry-run" in result.stdout


def test_version_prints_the_package_version() -> None:
    """`balsync --version` prints the installed version and exits 0."""
    result = CliRunner().invoke(cli, ["--version"], catch_exceptions=False)
    assert result.exit_code == 0
    assert result.stdout == f"balsync, version {__version__}\n"


def test_python_m_balance_sync_is_the_same_cli() -> None:
    """`python -m balance_sync --help` runs the CLI under the name balsync."""
    done = subprocess.run(
        [sys.executable, "-m", "balance_sync", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Usage: balsync" in done.stdout
    for name in cli.commands:
        assert name in done.stdout


# -- exit 2: usage and configuration errors -------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        pytest.param(["--batch-size", "0"], "--batch-size", id="batch-size-0"),
        pytest.param(["--batch-size", "many"], "--batch-size", id="batch-size-word"),
        pytest.param(["--retry-timeout", "abc"], "--retry-timeout", id="retry-timeout-word"),
        pytest.param(["--value-format", "dollars"], "--value-format", id="value-format"),
        pytest.param(["--log-format", "xml"], "--log-format", id="log-format"),
        pytest.param(["--wait", "-1"], "--wait", id="negative-wait"),
        pytest.param(["--no-such-option"], "--no-such-option", id="unknown-option"),
    ],
)
def test_click_usage_error_exits_2_with_one_error_line(
    balsync: Balsync, args: list[str], named: str
) -> None:
    """A usage error exits 2 with one `Error:` line naming the option, no traceback."""
    result = balsync("sync", *args)
    assert result.exit_code == 2
    assert "Traceback" not in _everything(result)
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert named in errors[0]


def test_unknown_command_exits_2(balsync: Balsync) -> None:
    """A misspelt command exits 2 with one error line."""
    result = balsync("snyc")
    assert result.exit_code == 2
    assert "Traceback" not in _everything(result)
    assert [line for line in result.stderr.splitlines() if line.startswith("Error:")]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        pytest.param(["--table", "a.b.c"], "a.b.c", id="table-three-parts"),
        pytest.param(["--table", "users; drop table x"], "users; drop table x", id="table-sql"),
        pytest.param(["--redis-url", "ftp://x"], "Redis URL", id="redis-scheme"),
        pytest.param(["--redis-url", "redis://h:notaport/0"], "Redis URL", id="redis-port"),
        pytest.param(["--database-url", "host=x port"], "PostgreSQL", id="database-garbage"),
        pytest.param(
            ["--database-url", "host=127.0.0.1 port=notaport"],
            "port",
            id="database-port-not-a-number",
        ),
        pytest.param(["--key-prefix", ""], "prefix", id="empty-prefix"),
        pytest.param(["--key-prefix", "balance:*"], "prefix", id="prefix-with-star"),
        pytest.param(
            ["--id-column", "amount", "--balance-column", "amount"], "column", id="same-columns"
        ),
        pytest.param(["--retry-timeout", "nan"], "retry timeout", id="retry-timeout-nan"),
        pytest.param(["--retry-timeout", "-1"], "retry timeout", id="retry-timeout-negative"),
        pytest.param(["--ping-url", "ftp://x/ping"], "ping URL", id="ping-url-scheme"),
    ],
)
def test_bad_setting_exits_2_with_one_clear_line(
    balsync: Balsync, args: list[str], named: str
) -> None:
    """A malformed setting exits 2 with one `balsync: error:` line naming it."""
    result = balsync("sync", "--retry-timeout", "1", *args)
    assert result.exit_code == 2, _everything(result)
    assert result.stdout == ""
    _assert_one_error_line(result, named)


def test_bad_setting_from_the_environment_exits_2(balsync: Balsync) -> None:
    """A malformed BALSYNC_TABLE is the same one-line exit 2 as the option."""
    result = balsync("sync", env={"BALSYNC_TABLE": "a.b.c"})
    assert result.exit_code == 2
    _assert_one_error_line(result, "a.b.c")


def test_missing_redis_url_file_exits_2(balsync: Balsync, tmp_path: Path) -> None:
    """A BALSYNC_REDIS_URL_FILE that does not exist exits 2 naming the variable."""
    missing = tmp_path / "no-such-file"
    env = {"BALSYNC_REDIS_URL": "", "BALSYNC_REDIS_URL_FILE": str(missing)}
    result = balsync("sync", env=env)
    assert result.exit_code == 2
    _assert_one_error_line(result, "BALSYNC_REDIS_URL_FILE")


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"ftp://:{SECRET}@x/0", id="bad-scheme"),
        pytest.param(f"redis://:{SECRET}@x:notaport/0", id="bad-port"),
        pytest.param(f"redis://:{SECRET}@[::1/0", id="bad-ipv6-host"),
    ],
)
def test_bad_redis_url_error_masks_its_password(balsync: Balsync, url: str) -> None:
    """A malformed Redis URL is reported (exit 2) without the password it carries."""
    result = balsync("sync", "--redis-url", url)
    assert result.exit_code == 2
    _assert_one_error_line(result, "Redis URL")
    assert SECRET not in _everything(result)


def test_log_file_that_cannot_be_opened_exits_2(balsync: Balsync, tmp_path: Path) -> None:
    """--log-file under a regular file cannot be opened: exit 2, one line naming the log file."""
    regular = tmp_path / "not-a-dir"
    regular.write_text("")
    result = balsync("sync", "--log-file", str(regular / "balsync.log"))
    assert result.exit_code == 2
    _assert_one_error_line(result, "log file")


# -- exit 3, 4, 5 ---------------------------------------------------------------------------


def test_redis_unreachable_exits_3_and_writes_nothing(
    initialized: Balsync, rds: redis.Redis, key_prefix: str, pg: Pg
) -> None:
    """Redis down after the retry budget: exit 3, a line naming Redis, the password masked."""
    rds.set(f"{key_prefix}1", "10")
    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    result = initialized("sync", "--redis-url", url, "--retry-timeout", "1")
    assert result.exit_code == 3, _everything(result)
    line = _error_line(result)
    assert "Redis" in line
    assert SECRET not in _everything(result)
    assert balances(pg) == {}
    assert pg.execute("SELECT count(*) FROM balsync.sync_runs").fetchone() == (0,)


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("postgresql://postgres:{secret}@127.0.0.1:{port}/app", id="url"),
        pytest.param(
            "host=127.0.0.1 port={port} user=postgres password={secret} dbname=app", id="conninfo"
        ),
    ],
)
def test_postgres_unreachable_exits_4(balsync: Balsync, template: str) -> None:
    """PostgreSQL down after the retry budget: exit 4, a line naming it, the password masked."""
    url = template.format(secret=SECRET, port=free_port())
    result = balsync("sync", "--database-url", url, "--retry-timeout", "1")
    assert result.exit_code == 4, _everything(result)
    line = _error_line(result)
    assert "PostgreSQL" in line
    assert SECRET not in _everything(result)


def test_sync_before_init_db_exits_5_with_a_clear_line(balsync: Balsync) -> None:
    """`sync` on a database where init-db never ran: exit 5, one line saying to run init-db."""
    result = balsync("sync")
    assert result.exit_code == 5
    assert result.stdout == ""
    _assert_one_error_line(result, "balsync init-db")


# -- --json ------------------------------------------------------------------------------------


def test_json_success_is_one_object_with_spec_keys(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """`sync --json` on success: one JSON object on stdout with exactly SPEC's keys."""
    rds.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "20"})
    result = initialized("sync", "--json")
    assert result.exit_code == 0, result.stderr
    data = _sync_json(result)
    assert data["status"] == "success"
    assert data["dry_run"] is False
    assert (data["processed"], data["inserted"], data["skipped"], data["invalid"]) == (2, 2, 0, 0)
    assert isinstance(data["run_id"], int)


def test_json_dry_run_reports_what_it_would_do(
    initialized: Balsync, rds: redis.Redis, key_prefix: str, pg: Pg
) -> None:
    """`sync --dry-run --json`: SPEC's keys, dry_run true, no run id, nothing written."""
    rds.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "20"})
    result = initialized("sync", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    data = _sync_json(result)
    assert (data["dry_run"], data["inserted"], data["run_id"]) == (True, 2, None)
    assert balances(pg) == {}


def test_json_partial_counts_the_invalid_record(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """`sync --json` with an invalid value: exit 1, status partial, skipped and invalid 1."""
    rds.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "1e5"})
    result = initialized("sync", "--json")
    assert result.exit_code == 1, result.stderr
    data = _sync_json(result)
    assert data["status"] == "partial"
    assert (data["processed"], data["inserted"], data["skipped"], data["invalid"]) == (2, 1, 1, 1)


def test_json_skipped_after_a_recent_sync(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """A sync right after a successful one is skipped: exit 0, status skipped, no run id."""
    rds.set(f"{key_prefix}1", "10.00")
    initialized.ok("sync", "--quiet")
    result = initialized("sync", "--json")
    assert result.exit_code == 0, result.stderr
    data = _sync_json(result)
    assert (data["status"], data["run_id"]) == ("skipped", None)
    assert "finished" in str(data["reason"]), data["reason"]


def test_json_skipped_when_another_run_holds_the_lock(
    initialized: Balsync, rds: redis.Redis, key_prefix: str, pg: Pg, database_url: str
) -> None:
    """A run that finds the table's advisory lock taken: exit 0, status skipped, nothing done."""
    rds.set(f"{key_prefix}1", "10.00")
    other_run = Database(database_url, 5)
    try:
        assert TableLock(other_run).try_lock(TableName("user_balances"), 0)
        result = initialized("sync", "--json")
    finally:
        other_run.close()
    assert result.exit_code == 0, result.stderr
    data = _sync_json(result)
    assert (data["status"], data["processed"]) == ("skipped", 0)
    assert "lock" in str(data["reason"]), data["reason"]
    assert balances(pg) == {}


def test_json_failed_when_redis_is_down(initialized: Balsync) -> None:
    """`sync --json` with Redis down: exit 3, status failed, still one object on stdout."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = initialized("sync", "--json", "--redis-url", url, "--retry-timeout", "1")
    assert result.exit_code == 3
    data = _sync_json(result)
    assert data["status"] == "failed"
    assert "Redis" in _error_line(result)


def test_json_failed_before_init_db(balsync: Balsync) -> None:
    """`sync --json` before init-db: exit 5, status failed in SPEC's shape."""
    result = balsync("sync", "--json")
    assert result.exit_code == 5
    data = _sync_json(result)
    assert (data["status"], data["exit_code"]) == ("failed", 5)
    assert "init-db" in str(data["error"])


def test_json_failure_carries_its_error_and_exit_code_masked(initialized: Balsync) -> None:
    """Redis unreachable: exit 3; the object says `exit_code` 3 and the error in one line,
    the password masked."""
    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    result = initialized("sync", "--json", "--redis-url", url, "--retry-timeout", "1")
    assert result.exit_code == 3
    data = _sync_json(result)
    assert (data["status"], data["exit_code"], data["run_id"]) == ("failed", 3, None)
    error = data["error"]
    assert isinstance(error, str)
    assert "Redis" in error
    assert "\n" not in error
    assert error.strip() == error
    assert SECRET not in _everything(result)


def test_json_usage_failure_still_prints_the_object(initialized: Balsync) -> None:
    """`sync --json --ids 1` without --on-conflict: exit 2, and still one object saying so."""
    result = initialized("sync", "--json", "--ids", "1")
    assert result.exit_code == 2
    data = _sync_json(result)
    assert (data["status"], data["exit_code"]) == ("failed", 2)
    assert "--ids" in str(data["error"])


# -- --quiet and --verbose -------------------------------------------------------------------


def test_quiet_success_prints_nothing(
    initialized: Balsync, rds: redis.Redis, key_prefix: str, pg: Pg
) -> None:
    """`sync --quiet` that succeeds prints nothing at all (cron mails nothing)."""
    rds.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "20"})
    result = initialized("sync", "--quiet")
    assert result.exit_code == 0
    assert (result.stdout, result.stderr) == ("", "")
    assert balances(pg) == {1: "10.00", 2: "20.00"}


def test_quiet_partial_prints_a_summary(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """`sync --quiet` with a skipped record exits 1 and does print a summary."""
    rds.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "NaN"})
    result = initialized("sync", "--quiet")
    assert result.exit_code == 1
    output = _everything(result)
    assert "partial" in output
    assert "skipped" in output
    assert "Traceback" not in output


def test_default_output_is_a_summary_on_stdout(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """Without flags a successful sync shows its summary on stdout and nothing on stderr."""
    rds.set(f"{key_prefix}1", "10.00")
    result = initialized("sync")
    assert result.exit_code == 0
    assert "success" in result.stdout
    assert "inserted" in result.stdout
    assert result.stderr == ""


def test_verbose_shows_each_batch_and_each_skipped_key(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """`sync -v` logs every batch and every skipped key with its reason on stderr."""
    rds.mset(
        {
            f"{key_prefix}1": "10.00",
            f"{key_prefix}2": "20.00",
            f"{key_prefix}0": "5",
            f"{key_prefix}3": "1.234",
        }
    )
    result = initialized("sync", "--verbose", "--batch-size", "1")
    assert result.exit_code == 1, result.stderr
    assert "batch 1" in result.stderr
    assert "batch 2" in result.stderr
    bad_id = [line for line in result.stderr.splitlines() if f"{key_prefix}0" in line]
    bad_value = [line for line in result.stderr.splitlines() if f"{key_prefix}3" in line]
    assert bad_id
    assert any("telegram id" in line for line in bad_id), bad_id
    assert bad_value
    assert any("decimal places" in line for line in bad_value), bad_value


def test_without_verbose_batches_are_not_shown(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """Batch lines are verbose-only: a plain run keeps stderr free of them."""
    rds.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "20.00"})
    result = initialized("sync", "--batch-size", "1")
    assert result.exit_code == 0
    assert "batch 1" not in result.stderr


# -- log file -------------------------------------------------------------------------------------


def test_log_file_receives_log_lines(
    initialized: Balsync, rds: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    """--log-file gets the run's log lines, text by default; a missing folder is created."""
    rds.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "oops"})
    log_file = tmp_path / "logs" / "balsync.log"
    result = initialized("sync", "--quiet", "--log-file", str(log_file))
    assert result.exit_code == 1
    text = log_file.read_text()
    assert "sync partial" in text
    assert f"{key_prefix}2" in text
    first = text.splitlines()[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)


def test_log_format_json_writes_json_lines(
    initialized: Balsync, rds: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    """--log-format json writes one JSON object per line to the log file."""
    rds.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "oops"})
    log_file = tmp_path / "balsync.log"
    result = initialized("sync", "--quiet", "--log-file", str(log_file), "--log-format", "json")
    assert result.exit_code == 1
    lines = log_file.read_text().splitlines()
    assert lines
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) and "message" in r and "level" in r for r in records)
    messages = [str(r["message"]) for r in records]
    assert any(m.startswith("sync partial") for m in messages), messages
    assert any(f"{key_prefix}2" in m for m in messages), messages


def _json_lines(text: str) -> list[dict[str, object]]:
    """Every line of `text` is one JSON object."""
    records = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(r, dict) for r in records)
    return records


def test_log_format_json_writes_json_lines_on_stderr_with_run_id_and_table(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """With --log-format json and no log file (a container), stderr holds only JSON lines,
    each naming the table, and those of the recorded run its run id."""
    rds.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "oops"})
    result = initialized("sync", "--json", "-v", "--log-format", "json")
    assert result.exit_code == 1
    run_id = _sync_json(result)["run_id"]
    assert isinstance(run_id, int)
    records = _json_lines(result.stderr)
    assert records
    assert all(r["table"] == "user_balances" for r in records), records
    skipped = [r for r in records if f"{key_prefix}2" in str(r["message"])]
    assert skipped
    assert all(r["run_id"] == run_id for r in skipped)
    assert any(str(r["message"]).startswith("sync partial") for r in records)


def test_log_format_json_failure_is_a_json_line_on_stderr(initialized: Balsync) -> None:
    """A failure with --log-format json: stderr holds JSON lines only, the failure one of
    them at level error with its exit code, the password masked; no text line."""
    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    result = initialized("sync", "--redis-url", url, "--retry-timeout", "1", "--log-format", "json")
    assert result.exit_code == 3
    records = _json_lines(result.stderr)
    errors = [r for r in records if r["level"] == "error"]
    assert [r.get("exit_code") for r in errors] == [3]
    assert str(errors[0]["message"]).startswith("error: ")
    assert errors[0]["table"] == "user_balances"
    assert SECRET not in _everything(result)


def test_quiet_partial_with_json_logs_prints_no_table_among_the_json_lines(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """`sync --quiet --log-format json` with a skipped record: exit 1, and stderr holds JSON
    lines only (the table cron mails in text mode would break a log reader)."""
    rds.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "oops"})
    result = initialized("sync", "--quiet", "--log-format", "json")
    assert result.exit_code == 1
    assert result.stdout == ""
    _json_lines(result.stderr)


def test_a_setting_that_cannot_resolve_is_one_text_line_even_with_json_logs(
    initialized: Balsync,
) -> None:
    """A bad setting fails before the log format is known: one `balsync: error:` line."""
    result = initialized(
        "status", "--json", env={"BALSYNC_LOG_FORMAT": "json", "BALSYNC_REDIS_URL": "x://"}
    )
    assert result.exit_code == 2
    _assert_one_error_line(result, "invalid Redis URL")


def test_log_file_from_environment(
    initialized: Balsync, rds: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    """BALSYNC_LOG_FILE works like --log-file."""
    rds.set(f"{key_prefix}1", "10.00")
    log_file = tmp_path / "env.log"
    result = initialized("sync", "--quiet", env={"BALSYNC_LOG_FILE": str(log_file)})
    assert result.exit_code == 0
    assert "sync success" in log_file.read_text()


def test_log_file_never_holds_a_password(initialized: Balsync, tmp_path: Path) -> None:
    """A failure logged to the file (with its traceback) never contains the Redis password."""
    log_file = tmp_path / "balsync.log"
    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    result = initialized(
        "sync", "-v", "--redis-url", url, "--retry-timeout", "1", "--log-file", str(log_file)
    )
    assert result.exit_code == 3
    assert log_file.read_text()
    assert SECRET not in log_file.read_text()
    assert SECRET not in _everything(result)
