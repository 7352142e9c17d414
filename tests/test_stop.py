"""A stop request (the CLI's answer to SIGTERM or SIGINT) ends a run at its next safe point.

The signals themselves are sent to real processes in tests/faults/test_signals.py; here the
request is made in-process after the first batch, deterministically.
"""

from __future__ import annotations

import pytest

from balance_sync.errors import Stopped
from balance_sync.ops.sync import BatchReport, SyncOptions, run_sync
from balance_sync.settings import resolve_settings
from balance_sync.stopping import StopRequest
from balance_sync.stores.redis import dirty_keys
from balance_sync.writer import BalanceWriter
from tests.helpers import Balsync, balances


def test_a_stopped_incremental_run_is_recorded_failed_and_keeps_its_claim(
    initialized: Balsync, env, rds, key_prefix, pg
):
    """Stop after batch 1 of 5: Stopped (exit 143), whole batches only, the run failed as
    'terminated', the claimed ids kept; the next incremental run syncs the rest."""
    writer = BalanceWriter(rds, prefix=key_prefix)
    for telegram_id in range(1, 51):
        writer.set(telegram_id, f"{telegram_id}.50")
    stop = StopRequest()

    def after_batch(report: BatchReport) -> None:
        stop.request("terminated by SIGTERM", 143)

    settings = resolve_settings({}, env)
    options = SyncOptions(incremental=True, batch_size=10, writers=1, stop=stop)
    with pytest.raises(Stopped) as raised:
        run_sync(settings, options, on_batch=after_batch)
    assert raised.value.exit_code == 143
    assert "terminated" in str(raised.value)
    written = balances(pg)
    assert 0 < len(written) < 50
    assert len(written) % 10 == 0
    assert all(value == f"{telegram_id}.50" for telegram_id, value in written.items())
    row = pg.execute("SELECT status, error FROM balsync.sync_runs").fetchone()
    assert row is not None
    assert row[0] == "failed"
    assert "terminated" in str(row[1])
    assert rds.scard(dirty_keys(key_prefix)[1]) == 50  # the claim, for the next run

    run_sync(settings, SyncOptions(incremental=True, min_interval=0))
    assert balances(pg) == {i: f"{i}.50" for i in range(1, 51)}
    assert rds.exists(*dirty_keys(key_prefix)) == 0
