"""PostgreSQL failing under a run: a crash-restart mid-batch, and a commit whose answer is lost."""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal

import psycopg
import pytest

from tests.faults.conftest import Bench
from tests.faults.helpers import (
    assert_converged,
    assert_ledger_consistent,
    install_ledger,
    make_balances,
    seed,
    skipped_records,
    snapshot,
    sync_runs,
    wait_for_batches,
)
from tests.faults.proxy import Proxy

pytestmark = pytest.mark.faults

KEYS = 300_000
BATCH = "2000"
INVALID = 50
ORPHANS = 1000  # rows whose keys are absent from Redis
COMMIT_REPLY = b"C\x00\x00\x00\x0bCOMMIT\x00"  # CommandComplete "COMMIT"


def _seed_invalid(bench: Bench) -> None:
    """Ids 1..INVALID with three decimals: invalid, never rounded."""
    seed(bench.redis_url, bench.prefix, {n: f"{n}.123" for n in range(1, INVALID + 1)})


def test_postgres_crash_restart_mid_batch_is_retried_to_an_exact_state(
    bench: Bench, figures: Callable[[str], None]
) -> None:
    """PostgreSQL stopped 'immediate' mid-run and restarted: exit 1 (invalid keys), exact."""
    balances = make_balances(KEYS, 3)
    balances = {i: v for i, v in balances.items() if i > INVALID}
    seed(bench.redis_url, bench.prefix, balances)
    _seed_invalid(bench)
    bench.init_db(ledger=False)
    orphans = {i: Decimal(i) / 100 for i in range(10**12, 10**12 + ORPHANS)}
    with psycopg.connect(bench.db_url, autocommit=True) as conn:
        conn.cursor().executemany(
            "INSERT INTO user_balances (telegram_id, balance, updated_at) "
            "VALUES (%s, %s, now() - interval '1 day')",
            list(orphans.items()),
        )
    install_ledger(bench.db_url)
    before = snapshot(bench.db_url)

    running = bench.cli(retry_timeout=60).start("sync", "--json", "--force", "--batch-size", BATCH)
    wait_for_batches(bench.db_url, 30, running)
    bench.pg.stop("immediate")
    down = time.monotonic()
    time.sleep(1)
    bench.pg.start()
    restarted = time.monotonic() - down
    done = running.wait(timeout=180)

    assert done.code == 1, done
    assert "PostgreSQL: transient fault" in done.stderr, "the restart was never felt"
    result = done.data
    assert result["status"] == "partial"
    valid = len(balances)
    assert (result["processed"], result["inserted"], result["updated"]) == (
        valid + INVALID,
        valid,
        0,
    )
    assert (result["skipped"], result["invalid"]) == (INVALID, INVALID)
    assert assert_converged(bench.redis_url, bench.db_url, bench.prefix, untouched=orphans) == valid
    after = snapshot(bench.db_url)
    assert all(after[i] == before[i] for i in orphans), "a row absent from Redis was touched"
    ledger = assert_ledger_consistent(bench.db_url)
    assert (ledger["inserted"], ledger["updated"]) == (valid, 0)

    # SPEC 3: nothing changed in Redis, so a second run writes nothing.
    again = bench.cli().sync("--batch-size", "20000")
    assert again.code == 1, again
    assert (again.data["inserted"], again.data["updated"]) == (0, 0)
    assert snapshot(bench.db_url) == after
    assert assert_ledger_consistent(bench.db_url)["inserted"] == valid
    runs = sync_runs(bench.db_url)
    assert [r.status for r in runs] == ["partial", "partial"]
    for run in runs:
        kept = sorted(k for k, _, _ in skipped_records(bench.db_url, run.id))
        assert kept == sorted(f"{bench.prefix}{n}" for n in range(1, INVALID + 1)), (
            f"run {run.id} kept {len(kept)} of its {INVALID} skipped records"
        )
    figures(
        f"{valid} valid + {INVALID} invalid keys, {ORPHANS} rows absent from Redis, batch "
        f"{BATCH}; PostgreSQL stopped 'immediate' after 30 batches, back {restarted:.1f}s "
        f"later; exit 1 in {done.seconds:.1f}s (retry budget 60s), {ledger['batches']} batches "
        f"none twice; second run wrote 0 rows in {again.seconds:.1f}s"
    )


def test_a_commit_whose_answer_is_lost_is_recognised_not_applied_twice(
    bench: Bench, figures: Callable[[str], None]
) -> None:
    """Three batch COMMITs land but their answers are lost (connection reset): counted once."""
    keys = 100_000
    balances = make_balances(keys, 4)
    seed(bench.redis_url, bench.prefix, balances)
    bench.init_db(ledger=False)
    # Half the rows exist with other balances, so batches both insert and update.
    with psycopg.connect(bench.db_url, autocommit=True) as conn:
        old = list(balances.items())[::2]
        with conn.cursor().copy("COPY user_balances (telegram_id, balance) FROM STDIN") as copy:
            for i, v in old:
                copy.write_row((i, Decimal(v) + 1))
    install_ledger(bench.db_url)
    with Proxy(bench.pg.port) as proxy:
        running = bench.cli(pg_port=proxy.port, retry_timeout=30).start(
            "sync", "--json", "--force", "--batch-size", BATCH
        )
        for batches in (5, 15, 30):
            wait_for_batches(bench.db_url, batches, running)
            lost = proxy.lost_replies
            proxy.lose_reply(COMMIT_REPLY)
            while proxy.lost_replies == lost and running.process.poll() is None:
                time.sleep(0.01)
        done = running.wait(timeout=120)
    assert done.code == 0, done
    assert proxy.lost_replies == 3
    result = done.data
    # Any lost batch recounted as 'unchanged' (or applied again) would break these sums.
    assert (result["inserted"], result["updated"], result["unchanged"]) == (
        keys - len(old),
        len(old),
        0,
    )
    assert assert_converged(bench.redis_url, bench.db_url, bench.prefix) == keys
    ledger = assert_ledger_consistent(bench.db_url)
    assert (ledger["inserted"], ledger["updated"]) == (keys - len(old), len(old))
    figures(
        f"{keys} keys (half inserts, half updates), batch {BATCH}; 3 COMMIT answers lost at "
        f"5/15/30 batches; exit 0 in {done.seconds:.1f}s, {ledger['batches']} batches, "
        "counts exact"
    )
