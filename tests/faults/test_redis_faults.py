"""Redis failing mid-scan: connections reset (retried), or the server gone past the budget."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from decimal import Decimal

import pytest

from tests.faults.conftest import Bench
from tests.faults.helpers import (
    assert_converged,
    assert_ledger_consistent,
    make_balances,
    rows,
    seed,
    sync_runs,
    wait_for_batches,
)
from tests.faults.proxy import Proxy

pytestmark = pytest.mark.faults

KEYS = 300_000
BATCH = "2000"


def test_redis_connections_reset_mid_scan_are_retried_to_an_exact_state(
    bench: Bench, figures: Callable[[str], None]
) -> None:
    """Redis connections reset (RST) mid-scan, idle and mid-reply: retried, exit 0, exact."""
    seed(bench.redis_url, bench.prefix, make_balances(KEYS, 1))
    bench.init_db()
    with Proxy(bench.vk.port) as proxy:
        running = bench.cli(redis_port=proxy.port).start(
            "sync", "--json", "--force", "--batch-size", BATCH
        )
        idle = mid_reply = 0
        for batches in (10, 40, 70, 100):
            wait_for_batches(bench.db_url, batches, running)
            # The reader mostly waits for the writer, so a reset usually finds the connection
            # idle (the client notices on its next command); losing the next reply resets it
            # while a SCAN+MGET is in flight.
            idle += proxy.reset_all()
            proxy.lose_reply(b"")
            while proxy.lost_replies == mid_reply and running.process.poll() is None:
                time.sleep(0.01)
            mid_reply = proxy.lost_replies
        done = running.wait(timeout=180)
    assert done.code == 0, done
    assert mid_reply == 4
    assert done.stderr.count("Redis: transient fault") >= mid_reply, done.stderr
    result = done.data
    assert result["status"] == "success"
    # A fresh table: every key is an insert, counted once, however often a read was retried.
    assert (result["processed"], result["inserted"], result["updated"]) == (KEYS, KEYS, 0)
    assert (result["unchanged"], result["skipped"]) == (0, 0)
    assert assert_converged(bench.redis_url, bench.db_url, bench.prefix) == KEYS
    ledger = assert_ledger_consistent(bench.db_url)
    assert (ledger["inserted"], ledger["updated"]) == (KEYS, 0)
    figures(
        f"{KEYS} keys, batch {BATCH}, {ledger['batches']} batches; Redis connections reset "
        f"{idle} times idle and {mid_reply} times mid-reply, at 10/40/70/100 batches; "
        f"exit 0 in {done.seconds:.1f}s"
    )


def test_redis_down_past_the_retry_budget_exits_3_and_the_rerun_converges(
    bench: Bench, figures: Callable[[str], None]
) -> None:
    """Redis SIGKILLed mid-scan, down past the budget: exit 3 naming Redis; the rerun is exact."""
    balances = make_balances(KEYS, 2)
    seed(bench.redis_url, bench.prefix, balances)
    bench.init_db()
    cli = bench.cli(retry_timeout=3)
    running = cli.start("sync", "--json", "--force", "--batch-size", BATCH)
    wait_for_batches(bench.db_url, 20, running)
    bench.vk.stop(signal.SIGKILL)
    killed = time.monotonic()
    done = running.wait(timeout=60)
    gave_up = time.monotonic() - killed

    assert done.code == 3, done
    assert "Redis" in done.stderr.splitlines()[-1], done
    assert done.data["status"] == "failed"
    assert gave_up < 3 + 15, f"gave up {gave_up:.1f}s after Redis died, budget 3s"
    [failed] = sync_runs(bench.db_url)
    assert failed.status == "failed"
    assert "Redis" in (failed.error or "")
    # Every batch committed before Redis died holds exact values; the counters say so too.
    written = rows(bench.db_url)
    assert 0 < len(written) < KEYS
    assert all(Decimal(balances[i]) == v for i, v in written.items())
    assert (failed.counters["inserted"], failed.counters["updated"]) == (len(written), 0)

    # Valkey keeps nothing on disk: it comes back empty on the same port, and is reseeded,
    # with 1000 of the committed balances changed meanwhile.
    bench.vk.start()
    changed = {i: balances[i] for i in list(written)[:1000]}
    balances.update({i: f"{Decimal(v) + 1}" for i, v in changed.items()})
    seed(bench.redis_url, bench.prefix, balances)
    # Another Redis: the rows it changed are held, the rest inserted, until someone decides.
    held = cli.sync("--batch-size", BATCH)
    assert held.code == 1, held
    assert (held.data["inserted"], held.data["skipped"]) == (KEYS - len(written), 1000)
    rerun = cli.sync("--batch-size", BATCH, "--accept-redis-restart")
    assert rerun.code == 0, rerun
    assert assert_converged(bench.redis_url, bench.db_url, bench.prefix) == KEYS
    ledger = assert_ledger_consistent(bench.db_url)
    assert ledger["inserted"] == KEYS
    first = next(r for r in sync_runs(bench.db_url) if r.id == failed.id)
    assert first.status == "failed"
    figures(
        f"{KEYS} keys, batch {BATCH}; Redis SIGKILLed after {len(written)} rows committed, "
        f"retry budget 3s: exit 3 {gave_up:.1f}s after the kill; "
        f"restart + reseed, rerun exit 0 in {rerun.seconds:.1f}s, {ledger['batches']} batches "
        "in all, none twice"
    )
