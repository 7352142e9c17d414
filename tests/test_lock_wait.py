"""`sync --wait S` waits as long as it says, however short the watchdog of one statement.

The daily `--force --wait 1800` meets an hourly run that holds the table for longer than the
watchdog (`--retry-timeout`, at least MIN_ATTEMPT_DEADLINE): it must wait and then run, not
take the wait for a silent server (exit 4).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from balance_sync.stores.postgres import LOCK_CLASS
from balance_sync.stores.postgres import connection as pg_connection
from tests.helpers import Balsync

WATCHDOG = 2.0  # seconds one statement may go unanswered in these tests
HOLD = 3 * WATCHDOG  # how long "the hourly run" holds the table


@pytest.fixture(autouse=True)
def short_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog cuts a statement after WATCHDOG seconds (the retry budget is below it)."""
    monkeypatch.setattr(pg_connection, "MIN_ATTEMPT_DEADLINE", WATCHDOG)


@contextmanager
def table_held(database_url: str, seconds: float, table: str = "user_balances") -> Iterator[None]:
    """Hold the table's advisory lock as a running sync does, for `seconds`, on a thread."""
    conn = psycopg.connect(database_url, autocommit=True)
    conn.execute("SELECT pg_advisory_lock(%s, to_regclass(%s)::oid::int4)", (LOCK_CLASS, table))

    def release() -> None:
        time.sleep(seconds)
        conn.execute(
            "SELECT pg_advisory_unlock(%s, to_regclass(%s)::oid::int4)", (LOCK_CLASS, table)
        )

    holder = threading.Thread(target=release, daemon=True)
    holder.start()
    try:
        yield
    finally:
        holder.join()
        conn.close()


def test_wait_outlasts_the_watchdog_and_then_runs(
    initialized: Balsync, rds, key_prefix, database_url
):
    """A hold three watchdogs long, --wait 30: the sync waits it out and runs (exit 0)."""
    rds.set(f"{key_prefix}1", "15.00")
    started = time.monotonic()
    with table_held(database_url, HOLD):
        result = initialized("sync", "--json", "--force", "--wait", "30", "--retry-timeout", "1")
    took = time.monotonic() - started
    assert result.exit_code == 0, (result.exit_code, result.stderr)
    data = json.loads(result.stdout)
    assert (data["status"], data["inserted"]) == ("success", 1)
    assert HOLD - 0.5 <= took < HOLD + 10, took


def test_a_wait_shorter_than_the_hold_skips(initialized: Balsync, rds, key_prefix, database_url):
    """--wait 1 behind a longer hold: exit 0 as skipped, after about a second."""
    rds.set(f"{key_prefix}1", "15.00")
    with table_held(database_url, WATCHDOG + 1):
        started = time.monotonic()
        result = initialized("sync", "--json", "--force", "--wait", "1", "--retry-timeout", "1")
        took = time.monotonic() - started
    assert result.exit_code == 0, (result.exit_code, result.stderr)
    assert json.loads(result.stdout)["status"] == "skipped"
    assert 1 <= took < WATCHDOG + 1, took
