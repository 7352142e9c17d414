"""kill -9 at random instants while the application keeps writing Redis: nothing is lost."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

import pytest
import redis

from tests.faults.conftest import Bench
from tests.faults.helpers import (
    MAX_ID,
    assert_converged,
    assert_ledger_consistent,
    make_balances,
    random_balance,
    seed,
    snapshot,
    sync_runs,
)

pytestmark = pytest.mark.faults

KEYS = 200_000
KILLS = 20
Snapshot = dict[int, tuple[Decimal, datetime]]


class Writer(threading.Thread):
    """The bot: SETs valid balances on random keys, now and then a new one, until stopped."""

    def __init__(self, redis_url: str, prefix: str, ids: list[int], seed_value: int) -> None:
        super().__init__(name="fault-writer", daemon=True)
        self.redis_url = redis_url
        self.prefix = prefix
        self.ids = list(ids)
        self.rng = random.Random(seed_value)
        self.history: dict[int, set[Decimal]] = {}  # every value a key was ever given
        self.touched: set[int] = set()
        self.lock = threading.Lock()
        self.writes = 0
        self.created = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        client = redis.Redis.from_url(self.redis_url)
        try:
            while not self._halt.is_set():
                pipe = client.pipeline(transaction=False)
                for _ in range(20):
                    if self.rng.random() < 0.05:
                        telegram_id = self.rng.randrange(1, MAX_ID + 1)
                        self.ids.append(telegram_id)
                        self.created += 1
                    else:
                        telegram_id = self.rng.choice(self.ids)
                    value = random_balance(self.rng)
                    with self.lock:  # known before it is in Redis, so before balsync sees it
                        self.history.setdefault(telegram_id, set()).add(Decimal(value))
                        self.touched.add(telegram_id)
                    pipe.set(f"{self.prefix}{telegram_id}", value)
                pipe.execute()
                self.writes += 20
                time.sleep(0.02)
        except BaseException as exc:  # raised again by the test
            self.error = exc
        finally:
            client.close()

    def stop(self) -> None:
        """Stop writing and wait; raise what went wrong, if anything."""
        self._halt.set()
        self.join(timeout=30)
        if self.error is not None:
            raise self.error


def _check_checkpoint(
    before: Snapshot, after: Snapshot, seeded: dict[int, Decimal], writer: Writer
) -> None:
    """SPEC 2-4 between two checkpoints, for every row."""
    lost = set(before) - set(after)
    assert not lost, f"{len(lost)} rows vanished, e.g. {sorted(lost)[:5]}"
    with writer.lock:
        for telegram_id, (balance, at) in after.items():
            known = writer.history.get(telegram_id, set())
            if telegram_id in seeded:
                known = known | {seeded[telegram_id]}
            assert balance in known, f"row {telegram_id} holds {balance}, never in Redis"
            if telegram_id not in before:
                continue
            old_balance, old_at = before[telegram_id]
            assert at >= old_at, f"row {telegram_id}: updated_at went back {old_at} -> {at}"
            if balance != old_balance:
                assert at > old_at, f"row {telegram_id} changed without moving updated_at"
            elif telegram_id not in writer.touched:
                assert at == old_at, f"row {telegram_id}: updated_at moved, balance did not"


def test_kill_9_at_random_instants_while_redis_changes_loses_nothing(
    bench: Bench, figures: Callable[[str], None]
) -> None:
    """20 runs killed -9 at random instants under live writes: old-or-new rows, then exact."""
    rng = random.Random(9)
    balances = make_balances(KEYS, 9)
    seed(bench.redis_url, bench.prefix, balances)
    seeded = {i: Decimal(v) for i, v in balances.items()}
    bench.init_db()
    writer = Writer(bench.redis_url, bench.prefix, list(balances), 10)
    writer.start()
    cli = bench.cli(retry_timeout=30)
    # --wait: a killed run's PostgreSQL session may hold the lock for a moment more.
    args = ("sync", "--json", "--force", "--wait", "30")
    duration = 8.0  # an upper bound until a run completes and is measured
    killed: list[int] = []
    completed: list[float] = []
    before: Snapshot = {}
    started = time.monotonic()
    try:
        while len(killed) < KILLS:
            assert len(killed) + len(completed) < 3 * KILLS, "too few runs were killed"
            running = cli.start(*args)
            done, was_killed = running.kill_at(rng.uniform(0.05, duration))
            if was_killed:
                killed.append(running.pid)
            else:
                assert done.code == 0, done
                assert done.data["status"] == "success", done
                completed.append(done.seconds)
                duration = done.seconds
            after = snapshot(bench.db_url)
            _check_checkpoint(before, after, seeded, writer)
            before = after
    finally:
        writer.stop()
    final = cli.sync("--wait", "30")
    assert final.code == 0, final
    after = snapshot(bench.db_url)
    _check_checkpoint(before, after, seeded, writer)
    valid = assert_converged(bench.redis_url, bench.db_url, bench.prefix)
    assert valid == len(after) == KEYS + writer.created

    runs = sync_runs(bench.db_url)
    assert not [r for r in runs if r.status == "running"]
    # A kill that lands after the run recorded its end (while the interpreter exits) finds
    # a finished run; every other killed run was marked abandoned by the next one.
    finished_anyway = [r for r in runs if r.pid in killed and r.status == "success"]
    dead = [r for r in runs if r.pid in killed and r.status != "success"]
    assert len(dead) >= KILLS // 2, "most kills should land after the run was recorded"
    for run in dead:
        assert run.status == "failed", run
        assert (run.error or "").startswith("abandoned"), run
        assert run.finished_at is not None, run
    assert all(r.status == "success" for r in runs if r.pid not in killed)
    ledger = assert_ledger_consistent(bench.db_url)
    figures(
        f"{KEYS} keys; {len(killed)} runs killed -9 at random instants in [0.05 s, run "
        f"duration], {len(completed)} runs completed between them, {len(dead)} killed runs "
        f"marked abandoned by the next ({len(finished_anyway)} killed just after recording "
        f"success); writer: {writer.writes} SETs, {writer.created} new "
        f"keys; final sync exit 0 in {final.seconds:.1f}s, {valid} rows exact; "
        f"{ledger['batches']} batches committed, none twice; "
        f"{time.monotonic() - started:.0f}s in all"
    )
