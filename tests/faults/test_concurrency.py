"""Eight syncs started at once: one advisory lock per table, so runs never overlap."""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal

import pytest

from tests.faults.conftest import Bench
from tests.faults.helpers import (
    Finished,
    assert_converged,
    assert_ledger_consistent,
    make_balances,
    overlaps,
    seed,
    sync_runs,
)

pytestmark = pytest.mark.faults

KEYS = 50_000
RUNS = 8


def _eight_at_once(bench: Bench, *args: str) -> tuple[list[Finished], float]:
    cli = bench.cli()
    started = time.monotonic()
    running = [cli.start("sync", "--json", "--force", *args) for _ in range(RUNS)]
    finished = [r.wait(timeout=150) for r in running]
    return finished, time.monotonic() - started


def test_eight_syncs_at_once_never_overlap_and_the_rest_skip(
    bench: Bench, figures: Callable[[str], None]
) -> None:
    """Eight `sync --force` at once: all exit 0, runs never overlap, the losers skip."""
    balances = make_balances(KEYS, 11)
    seed(bench.redis_url, bench.prefix, balances)
    bench.init_db()
    finished, took = _eight_at_once(bench)
    assert [f.code for f in finished] == [0] * RUNS, [str(f) for f in finished]
    statuses = [str(f.data["status"]) for f in finished]
    assert set(statuses) <= {"success", "skipped"}, statuses
    ran = statuses.count("success")
    assert ran >= 1
    runs = sync_runs(bench.db_url)
    assert len(runs) == ran, "a skipped run left a record, or a run is missing"
    assert all(r.status == "success" for r in runs)
    assert not overlaps(runs), f"runs overlapped: {overlaps(runs)}"
    assert sum(int(f.data["inserted"]) for f in finished) == KEYS  # type: ignore[call-overload]
    assert assert_converged(bench.redis_url, bench.db_url, bench.prefix) == KEYS
    assert_ledger_consistent(bench.db_url)
    figures(
        f"{KEYS} keys; {RUNS} `sync --force` at once: {ran} ran, {RUNS - ran} skipped, "
        f"all exit 0, no overlap, {took:.1f}s"
    )


def test_eight_syncs_with_wait_all_run_one_after_another(
    bench: Bench, figures: Callable[[str], None]
) -> None:
    """Eight `sync --force --wait 60` at once: all eight run, one at a time, all exit 0."""
    balances = make_balances(KEYS, 12)
    seed(bench.redis_url, bench.prefix, balances)
    bench.init_db()
    first = bench.cli().sync()
    assert first.code == 0, first
    changed = {i: f"{Decimal(v) + 1}" for i, v in list(balances.items())[:5000]}
    seed(bench.redis_url, bench.prefix, changed)

    finished, took = _eight_at_once(bench, "--wait", "60")
    assert [f.code for f in finished] == [0] * RUNS, [str(f) for f in finished]
    assert [f.data["status"] for f in finished] == ["success"] * RUNS
    assert [f.data["processed"] for f in finished] == [KEYS] * RUNS  # --force reads every key
    # Exactly one of them found the changes; the others found nothing left to do.
    assert sorted(int(f.data["updated"]) for f in finished) == [0] * (RUNS - 1) + [5000]  # type: ignore[call-overload]
    runs = sync_runs(bench.db_url)[1:]
    assert len(runs) == RUNS
    assert sorted(int(f.data["run_id"]) for f in finished) == [r.id for r in runs]  # type: ignore[call-overload]
    assert all(r.status == "success" for r in runs)
    assert not overlaps(runs), f"runs overlapped: {overlaps(runs)}"
    assert assert_converged(bench.redis_url, bench.db_url, bench.prefix) == KEYS
    assert_ledger_consistent(bench.db_url)
    spans = [(r.finished_at - r.started_at).total_seconds() for r in runs if r.finished_at]
    figures(
        f"{KEYS} keys, 5000 changed; {RUNS} `sync --force --wait 60` at once: all ran, one "
        f"after another, no overlap, runs of {min(spans):.1f}-{max(spans):.1f}s, "
        f"{took:.1f}s in all"
    )
