"""--log-file and --log-format: appended lines, logrotate-safe reopening, JSON lines, no secrets."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest

from balance_sync.monitoring.logs import LOGGER, setup_logging
from tests.support.netutil import closed_port

# Made-up passwords the tests look for in the output.
REDIS_PASSWORD = "redis-pw-Zq81"  # noqa: S105
PG_PASSWORD = "pg-pw-Kx42"  # noqa: S105


@pytest.fixture
def core_logging() -> Iterator[logging.Logger]:
    """The package logger, configured by a test; reset to stderr only afterwards."""
    yield logging.getLogger(LOGGER)
    setup_logging(log_file=None, log_format="text", verbose=False, quiet=False)


def test_sync_appends_its_lines_to_the_log_file(initialized, rds, key_prefix, tmp_path):
    """Each run appends to the log file; what was there stays."""
    rds.set(f"{key_prefix}1", "1.00")
    log = tmp_path / "logs" / "balsync.log"
    log.parent.mkdir()
    log.write_text("an earlier line\n")
    initialized.ok("sync", "--log-file", str(log))
    initialized.ok("sync", "--log-file", str(log))
    lines = log.read_text().splitlines()
    assert lines[0] == "an earlier line"
    assert any("INFO balance_sync.ops.sync sync success: 1 processed" in line for line in lines)
    assert any("sync skipped:" in line for line in lines)


def test_log_file_and_format_from_the_environment(initialized, tmp_path):
    """BALSYNC_LOG_FILE and BALSYNC_LOG_FORMAT work like the options."""
    log = tmp_path / "balsync.log"
    initialized.ok("sync", env={"BALSYNC_LOG_FILE": str(log), "BALSYNC_LOG_FORMAT": "json"})
    messages = [json.loads(line)["message"] for line in log.read_text().splitlines()]
    assert any(m.startswith("sync success") for m in messages)


def test_renamed_log_file_is_reopened_at_the_same_path(tmp_path, core_logging):
    """After logrotate moves the file, the next line goes to a new file at the old path."""
    log = tmp_path / "balsync.log"
    setup_logging(log_file=log, log_format="text", verbose=False, quiet=True)
    core_logging.info("before rotation")
    rotated = log.rename(tmp_path / "balsync.log.1")
    core_logging.info("after rotation")
    assert "before rotation" in rotated.read_text()
    assert "after rotation" not in rotated.read_text()
    assert "after rotation" in log.read_text()
    assert "before rotation" not in log.read_text()


def test_json_lines_parse_with_ts_level_and_message(initialized, rds, key_prefix, tmp_path):
    """--log-format json: every line is a JSON object with an ISO ts, a level and a message."""
    rds.mset({f"{key_prefix}1": "1.00", f"{key_prefix}2": "oops"})
    log = tmp_path / "balsync.log"
    result = initialized("sync", "--log-file", str(log), "--log-format", "json", "-v")
    assert result.exit_code == 1
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) >= 3
    for record in records:
        assert {"ts", "level", "message"} <= record.keys()
        assert datetime.fromisoformat(record["ts"]).tzinfo is not None
        assert record["level"] in {"debug", "info", "warning", "error"}
    messages = [r["message"] for r in records]
    assert any("oops" in m or "skipped" in m for m in messages)
    assert any(m.startswith("sync partial") for m in messages)


def test_json_lines_in_the_file_carry_the_table_and_once_recorded_the_run_id(
    initialized, rds, key_prefix, tmp_path
):
    """Each file line names the table; from the run's record on, its run id (one run)."""
    rds.mset({f"{key_prefix}1": "1.00", f"{key_prefix}2": "oops"})
    log = tmp_path / "balsync.log"
    result = initialized("sync", "--json", "--log-file", str(log), "--log-format", "json")
    run_id = json.loads(result.stdout)["run_id"]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["table"] for r in records} == {"user_balances"}
    assert {r["run_id"] for r in records} <= {None, run_id}
    assert records[-1]["run_id"] == run_id


def test_a_new_command_starts_with_no_run_id(initialized, rds, key_prefix, tmp_path):
    """The run id of one command never leaks into the next one's lines (tests run many)."""
    rds.set(f"{key_prefix}1", "1.00")
    initialized.ok("sync", "--quiet", "--log-format", "json")
    log = tmp_path / "verify.log"
    initialized.ok("verify", "--quiet", "--log-file", str(log), "--log-format", "json")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records
    assert all(r["run_id"] is None for r in records)


def test_unexpected_failure_puts_the_traceback_in_the_log_only(initialized, tmp_path, monkeypatch):
    """Exit 5: one line on stderr, the traceback in the log file."""

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr("balance_sync.monitoring.report.run_sync", broken)
    log = tmp_path / "balsync.log"
    result = initialized("sync", "--log-file", str(log))
    assert result.exit_code == 5
    assert "Traceback" not in result.stderr
    assert "Traceback" in log.read_text()
    assert "RuntimeError: injected" in log.read_text()


def test_log_file_that_cannot_be_opened_is_exit_2(balsync, tmp_path):
    """A log path under a regular file is a configuration error."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = balsync("sync", "--log-file", str(blocker / "balsync.log"))
    assert result.exit_code == 2
    assert "cannot open log file" in result.stderr


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize(
    ("server_args", "exit_code"),
    [
        pytest.param(
            ("--redis-url", f"redis://:{REDIS_PASSWORD}@127.0.0.1:{closed_port()}/0"), 3, id="redis"
        ),
        pytest.param(
            (
                "--database-url",
                f"postgresql://balsync:{PG_PASSWORD}@127.0.0.1:{closed_port()}/app",
            ),
            4,
            id="postgres-url",
        ),
        pytest.param(
            (
                "--database-url",
                f"host=127.0.0.1 port={closed_port()} user=balsync password={PG_PASSWORD}",
            ),
            4,
            id="postgres-conninfo",
        ),
    ],
)
def test_no_password_reaches_the_log(balsync, tmp_path, log_format, server_args, exit_code):
    """Failing to reach a server whose URL holds a password never writes that password."""
    log = tmp_path / "balsync.log"
    result = balsync(
        "sync",
        "-v",
        "--log-file",
        str(log),
        "--log-format",
        log_format,
        *server_args,
        env={"BALSYNC_RETRY_TIMEOUT": "0"},
    )
    assert result.exit_code == exit_code, result.stderr
    text = log.read_text()
    assert "refused" in text  # the failure, traceback included, did reach the log
    for secret in (REDIS_PASSWORD, PG_PASSWORD):
        assert secret not in text
        assert secret not in result.stderr
        assert secret not in result.stdout
