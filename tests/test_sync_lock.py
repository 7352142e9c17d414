"""`balsync sync` on real servers: the advisory lock, --min-interval and run records."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

import balance_sync
from tests.helpers import (
    COUNTERS,
    balances,
    counts_of,
    lock_held,
    seed,
    sync_json,
    sync_run,
)

# -- the advisory lock ---------------------------------------------------------------------


def test_sync_skips_at_once_while_another_run_holds_the_lock(
    initialized, rds, key_prefix, pg, database_url
):
    """Guarantee 5: lock taken → exit 0, status skipped, quickly, nothing written."""
    seed(rds, key_prefix, {1: "1.00"})
    with lock_held(database_url):
        started = time.monotonic()
        data = sync_json(initialized)
        elapsed = time.monotonic() - started
    assert data["status"] == "skipped"
    assert data["run_id"] is None
    assert elapsed < 3
    assert balances(pg) == {}
    assert pg.execute("SELECT count(*) FROM balsync.sync_runs").fetchone() == (0,)


def test_wait_1_still_skips_after_about_a_second(initialized, rds, key_prefix, pg, database_url):
    """--wait 1 waits for the lock about a second, then skips with exit 0."""
    seed(rds, key_prefix, {1: "1.00"})
    with lock_held(database_url):
        started = time.monotonic()
        data = sync_json(initialized, "--wait", "1")
        elapsed = time.monotonic() - started
    assert data["status"] == "skipped"
    assert 0.9 <= elapsed < 4
    assert balances(pg) == {}


def test_wait_10_runs_once_the_lock_is_released(initialized, rds, key_prefix, pg, database_url):
    """--wait 10 succeeds when the holder lets go after a second."""
    seed(rds, key_prefix, {1: "1.00", 2: "2.00"})
    with lock_held(database_url) as lock:
        timer = threading.Timer(1.0, lock.release)
        started = time.monotonic()
        timer.start()
        try:
            data = sync_json(initialized, "--wait", "10")
        finally:
            timer.join()
        elapsed = time.monotonic() - started
    assert data["status"] == "success"
    assert 0.9 <= elapsed < 8
    assert balances(pg) == {1: "1.00", 2: "2.00"}


def test_lock_covers_the_table_however_it_is_named(initialized, rds, key_prefix, pg, database_url):
    """Guarantee 5: a run on public.user_balances waits for a run on user_balances."""
    seed(rds, key_prefix, {1: "1.00"})
    with lock_held(database_url, "user_balances"):
        data = sync_json(initialized, "--table", "public.user_balances")
    assert data["status"] == "skipped"
    assert balances(pg) == {}


# -- --min-interval ------------------------------------------------------------------------


def test_min_interval_skips_a_redundant_run_unless_forced(initialized, rds, key_prefix, pg):
    """Right after a success the next sync is skipped (exit 0); --force and 0 run it."""
    seed(rds, key_prefix, {1: "1.00"})
    assert sync_json(initialized)["status"] == "success"
    seed(rds, key_prefix, {1: "2.00"})
    skipped = sync_json(initialized)
    assert skipped["status"] == "skipped"
    assert skipped["run_id"] is None
    assert balances(pg) == {1: "1.00"}
    forced = sync_json(initialized, "--force")
    assert (forced["status"], forced["updated"]) == ("success", 1)
    assert balances(pg) == {1: "2.00"}
    seed(rds, key_prefix, {1: "3.00"})
    assert sync_json(initialized)["status"] == "skipped"
    zero = sync_json(initialized, "--min-interval", "0")
    assert (zero["status"], zero["updated"]) == ("success", 1)
    assert balances(pg) == {1: "3.00"}


# -- run records ---------------------------------------------------------------------------


def test_each_run_records_times_status_counters_host_pid_version(initialized, rds, key_prefix, pg):
    """balsync.sync_runs: one row per non-dry run with times, status, counters, origin."""
    seed(rds, key_prefix, {1: "1.00", 2: "2.00", "bad": "1.00"})
    partial = sync_json(initialized, code=1)
    seed(rds, key_prefix, {1: "1.50"})
    sync_json(initialized, "--dry-run", code=1)
    rds.delete(f"{key_prefix}bad")
    success = sync_json(initialized, "--force")
    ids = [row[0] for row in pg.execute("SELECT id FROM balsync.sync_runs ORDER BY id")]
    assert ids == [partial["run_id"], success["run_id"]]
    for data in (partial, success):
        run = sync_run(pg, data["run_id"])
        assert run["status"] == data["status"]
        assert {name: run[name] for name in COUNTERS} == counts_of(data)
        assert run["started_at"] <= run["finished_at"]  # type: ignore[operator]
        assert run["duration_s"] == pytest.approx(data["duration_s"], abs=0.01)
        assert (run["host"], run["pid"]) == (socket.gethostname(), os.getpid())
        assert run["version"] == balance_sync.__version__
        assert (run["target_table"], run["key_prefix"]) == ("public.user_balances", key_prefix)
        assert run["error"] is None
    first, second = sync_run(pg, partial["run_id"]), sync_run(pg, success["run_id"])
    assert first["finished_at"] <= second["started_at"]  # type: ignore[operator]


def test_a_run_left_running_is_marked_abandoned_by_the_next(initialized, rds, key_prefix, pg):
    """A 'running' row of a dead process becomes failed/abandoned when the next run starts."""
    insert = """INSERT INTO balsync.sync_runs
                    (target_table, key_prefix, started_at, status, host, pid, version)
                VALUES (%s, %s, now() - interval '1 hour', 'running', 'gone', 1, '0')
                RETURNING id"""
    dead = pg.execute(insert, ("public.user_balances", key_prefix)).fetchone()
    other = pg.execute(insert, ("other_table", key_prefix)).fetchone()
    assert dead is not None
    assert other is not None
    seed(rds, key_prefix, {1: "1.00"})
    data = sync_json(initialized)
    assert data["status"] == "success"
    run = sync_run(pg, dead[0])
    assert run["status"] == "failed"
    assert run["finished_at"] is not None
    assert "abandoned" in str(run["error"])
    assert sync_run(pg, other[0])["status"] == "running"  # another table's run is not ours
