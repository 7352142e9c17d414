"""The sync's progress bar: only on a terminal, with an estimated total, % and time left."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import redis

from balance_sync.ops.estimate import expected_keys
from balance_sync.ops.sync import SyncOptions
from balance_sync.settings import resolve_settings
from balance_sync.writer import BalanceWriter
from tests.helpers import terminal_output

KEYS = 6_000


@pytest.fixture
def seeded(initialized, rds, key_prefix):
    """6 000 balances, synced in batches of 50 so the bar has time to draw."""
    rds.mset({f"{key_prefix}{i}": f"{i}.00" for i in range(1, KEYS + 1)})
    return initialized


ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def on_terminal(env: dict[str, str], *args: str) -> str:
    """What a person at a terminal sees of balsync's stderr, escape sequences removed."""
    return ESCAPE.sub("", terminal_output(env, *args))


def test_bar_shows_percentage_and_time_left_against_the_last_runs_count(seeded, env):
    """After a run of 6 000 keys, the next one's bar counts toward ~6,000, with % and ETA."""
    seeded.ok("sync")
    shown = on_terminal(env, "sync", "--force", "--batch-size", "50")
    assert f"of ~{KEYS:,} keys" in shown
    assert re.search(r"\b\d{1,3}%", shown), shown
    assert re.search(r"elapsed, \d+:\d\d:\d\d left", shown), shown  # the time left
    assert "?" not in shown


def test_first_run_counts_toward_the_database_size(seeded, env, rds):
    """No run recorded yet: the total is DBSIZE, every key of the database, never fewer."""
    shown = on_terminal(env, "sync", "--batch-size", "50")
    totals = [int(t.replace(",", "")) for t in re.findall(r"of ~([\d,]+) keys", shown)]
    assert totals
    assert all(total >= KEYS for total in totals)
    assert re.search(r"\b\d{1,3}%", shown), shown


def test_no_bar_without_a_terminal(seeded, env):
    """stderr to a pipe (cron, CI, a log): no bar, no estimate."""
    run = subprocess.run(
        [sys.executable, "-m", "balance_sync", "sync", "--batch-size", "50"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "keys" not in run.stderr
    assert "syncing" not in run.stderr


def test_estimate_is_the_largest_recent_run(seeded, env, key_prefix):
    """A full run's estimate: what the largest recent run read (a day of runs), within DBSIZE."""
    settings = resolve_settings({}, env)
    estimate = expected_keys(settings, SyncOptions())
    assert estimate is not None
    assert estimate >= KEYS  # no run yet: DBSIZE
    seeded.ok("sync")
    assert expected_keys(settings, SyncOptions()) == KEYS


def test_incremental_estimate_is_the_marked_ids(initialized, env, rds: redis.Redis, key_prefix):
    """An incremental run reads the ids marked changed: the estimate is their count."""
    BalanceWriter(rds, prefix=key_prefix).mark([1, 2, 3])
    settings = resolve_settings({}, env)
    assert expected_keys(settings, SyncOptions(incremental=True)) == 3
    forced = expected_keys(settings, SyncOptions(incremental=True, force=True))
    assert forced is not None
    assert forced >= 3


def test_unreachable_stores_give_no_estimate(env):
    """Neither store answers: no total, and no delay (one attempt each)."""
    settings = resolve_settings(
        {"redis_url": "redis://127.0.0.1:1/0", "database_url": "postgresql://127.0.0.1:1/x"}, env
    )
    assert expected_keys(settings, SyncOptions()) is None
