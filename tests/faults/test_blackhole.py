"""A connection that goes silent (no reset, no answer): the run must end, not hang.

The proxy keeps the TCP connection up, so its kernel answers keepalive probes: only the
client's own timeouts can end the wait. The budget is 5 s; the run must end well within a
minute, with Redis's exit 3 or PostgreSQL's exit 4.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.faults.conftest import Bench
from tests.faults.helpers import (
    Finished,
    assert_converged,
    assert_ledger_consistent,
    make_balances,
    seed,
    wait_for_batches,
)
from tests.faults.proxy import Proxy

pytestmark = pytest.mark.faults

KEYS = 100_000
BATCH = "2000"
BUDGET = 5
DEADLINE = 60  # seconds from the blackhole to the exit
HANG = DEADLINE + 15  # the subprocess timeout that fails the test instead of hanging it


def _blackhole_mid_run(bench: Bench, proxy: Proxy, side: str) -> tuple[Finished | None, float]:
    """Start a sync through the proxy, blackhole it after 5 batches; (outcome, seconds)."""
    port = {"redis_port": proxy.port} if side == "redis" else {"pg_port": proxy.port}
    running = bench.cli(retry_timeout=BUDGET, **port).start(
        "sync", "--json", "--force", "--batch-size", BATCH
    )
    wait_for_batches(bench.db_url, 5, running)
    proxy.set_mode("blackhole")
    cut = time.monotonic()
    try:
        done: Finished | None = running.wait(timeout=HANG)
    except AssertionError:
        done = None  # killed after HANG seconds; reported below, after the state is checked
    return done, time.monotonic() - cut


def _converges_afterwards(bench: Bench) -> None:
    """A rerun on direct connections finishes the job exactly."""
    rerun = bench.cli().sync("--batch-size", "20000")
    assert rerun.code == 0, rerun
    assert assert_converged(bench.redis_url, bench.db_url, bench.prefix) == KEYS
    assert_ledger_consistent(bench.db_url)


def test_blackholed_redis_ends_the_run_with_exit_3_instead_of_hanging(
    bench: Bench, figures: Callable[[str], None]
) -> None:
    """Redis goes silent mid-scan: the run ends with exit 3 within a minute, naming Redis."""
    seed(bench.redis_url, bench.prefix, make_balances(KEYS, 5))
    bench.init_db()
    with Proxy(bench.vk.port) as proxy:
        done, took = _blackhole_mid_run(bench, proxy, "redis")
    _converges_afterwards(bench)
    figures(
        f"{KEYS} keys, batch {BATCH}, budget {BUDGET}s; Redis blackholed after 5 batches: "
        + (f"exit {done.code} after {took:.1f}s" if done else f"still running after {took:.0f}s")
    )
    assert done is not None, f"balsync hung for {HANG}s on a silent Redis"
    assert done.code == 3, done
    assert "Redis" in done.stderr.splitlines()[-1], done
    assert took < DEADLINE, f"took {took:.1f}s"


def test_blackholed_postgres_ends_the_run_with_exit_4_instead_of_hanging(
    bench: Bench, figures: Callable[[str], None]
) -> None:
    """PostgreSQL goes silent mid-run: the run ends with exit 4 within a minute."""
    seed(bench.redis_url, bench.prefix, make_balances(KEYS, 6))
    bench.init_db()
    with Proxy(bench.pg.port) as proxy:
        done, took = _blackhole_mid_run(bench, proxy, "postgres")
    _converges_afterwards(bench)
    figures(
        f"{KEYS} keys, batch {BATCH}, budget {BUDGET}s; PostgreSQL blackholed after 5 "
        "batches: "
        + (f"exit {done.code} after {took:.1f}s" if done else f"still running after {took:.0f}s")
    )
    assert done is not None, f"balsync hung for {HANG}s on a silent PostgreSQL"
    assert done.code == 4, done
    assert "PostgreSQL" in done.stderr.splitlines()[-1], done
    assert took < DEADLINE, f"took {took:.1f}s"
