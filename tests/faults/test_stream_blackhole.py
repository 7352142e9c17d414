"""restore and verify stream PostgreSQL's rows: a stream that goes silent must end the run.

The proxy keeps the TCP connection up, so keepalives see a live peer: only the deadline of
one attempt (`--retry-timeout`, at least 30 s) can end the wait. The budget is 5 s; the run
must end with exit 4 within the deadline and the budget, leave the table's lock free for the
next sync, and keep what restore already wrote.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
import pytest
import redis

from tests.faults.conftest import Bench
from tests.faults.helpers import Finished, Running, assert_converged
from tests.faults.proxy import Proxy

pytestmark = pytest.mark.faults

ROWS = 200_000
BUDGET = 5
DEADLINE = 30 + BUDGET + 10  # seconds from the silence to the exit: the deadline, the budget, slack
HANG = DEADLINE + 30  # the subprocess timeout that fails the test instead of hanging it


def _arrange(bench: Bench) -> None:
    """init-db, and ROWS rows in PostgreSQL with no key in Redis."""
    bench.init_db(ledger=False)
    with psycopg.connect(bench.db_url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO user_balances (telegram_id, balance)
               SELECT g, (g %% 100000) / 100.0 FROM generate_series(1, %s) g""",
            (ROWS,),
        )


def _stream_port(bench: Bench, running: Running, timeout: float = 60) -> int:
    """The client port of the backend that serves the stream, once it is under way."""
    give_up = time.monotonic() + timeout
    with psycopg.connect(bench.db_url, autocommit=True) as conn:
        while time.monotonic() < give_up:
            assert running.process.poll() is None, "balsync ended before its stream was cut"
            row = conn.execute(
                """SELECT client_port FROM pg_stat_activity
                   WHERE query LIKE 'FETCH%%balsync_stream%%' AND pid <> pg_backend_pid()"""
            ).fetchone()
            if row is not None:
                return int(row[0])
            time.sleep(0.02)
    raise AssertionError(f"no stream within {timeout:g}s")


def _keys(bench: Bench) -> int:
    client = redis.Redis.from_url(bench.redis_url)
    try:
        return int(client.dbsize())
    finally:
        client.close()


def _outcome(running: Running) -> tuple[Finished | None, float]:
    cut = time.monotonic()
    try:
        done: Finished | None = running.wait(timeout=HANG)
    except AssertionError:
        done = None  # killed after HANG seconds; reported after the state is checked
    return done, time.monotonic() - cut


def _shown(done: Finished | None, took: float) -> str:
    return f"exit {done.code} after {took:.1f}s" if done else f"still running after {took:.0f}s"


def _assert_exit_4_in_time(done: Finished | None, took: float, command: str) -> Finished:
    assert done is not None, f"{command} hung for {HANG}s on a silent PostgreSQL"
    assert done.code == 4, done
    assert "PostgreSQL" in done.stderr.splitlines()[-1], done
    assert took < DEADLINE, f"took {took:.1f}s"
    return done


def _next_sync_runs(bench: Bench) -> None:
    """The table's lock is free: a sync right afterwards runs instead of skipping."""
    sync = bench.cli().sync()
    assert sync.code == 0, sync
    assert sync.data["status"] == "success", sync


def test_a_silent_stream_ends_restore_with_exit_4_and_a_rerun_converges(
    bench: Bench, figures: Callable[[str], None]
) -> None:
    """The stream's connection alone goes silent mid-restore (the lock's connection still
    answers, so only the stream's deadline can end it): exit 4, the keys written stay."""
    _arrange(bench)
    with Proxy(bench.pg.port) as proxy:
        running = bench.cli(pg_port=proxy.port, retry_timeout=BUDGET).start("restore", "--json")
        while _keys(bench) < 5 * 1000 and running.process.poll() is None:
            time.sleep(0.02)  # five of restore's batches written
        port = _stream_port(bench, running)
        assert proxy.silence(port), "the stream's connection is not the proxy's"
        done, took = _outcome(running)
    kept = _keys(bench)
    _next_sync_runs(bench)
    rerun = bench.cli().run("restore", "--json")
    figures(
        f"{ROWS} rows, budget {BUDGET}s; the stream's connection silenced mid-restore: "
        + f"{_shown(done, took)}, {kept} keys kept; the rerun restored {rerun.data.get('restored')}"
    )
    _assert_exit_4_in_time(done, took, "restore")
    assert 0 < kept < ROWS
    assert rerun.code == 0, rerun
    assert (rerun.data["restored"], rerun.data["already_present"]) == (ROWS - kept, kept)
    assert assert_converged(bench.redis_url, bench.db_url, bench.prefix) == ROWS


def test_a_blackholed_postgres_ends_verify_with_exit_4_instead_of_hanging(
    bench: Bench, figures: Callable[[str], None]
) -> None:
    """PostgreSQL goes silent while verify streams its rows: exit 4 naming PostgreSQL."""
    _arrange(bench)
    with Proxy(bench.pg.port) as proxy:
        running = bench.cli(pg_port=proxy.port, retry_timeout=BUDGET).start("verify", "--json")
        _stream_port(bench, running)
        proxy.set_mode("blackhole")
        done, took = _outcome(running)
    _next_sync_runs(bench)
    figures(
        f"{ROWS} rows, budget {BUDGET}s; PostgreSQL blackholed mid-stream: " + _shown(done, took)
    )
    assert _assert_exit_4_in_time(done, took, "verify").data["status"] == "failed", done
