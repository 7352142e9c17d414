"""sync: copy every balance from Redis into PostgreSQL, stopping cleanly on a signal."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

import click

from balance_sync.cli.options import (
    KEYS,
    MONITORING,
    POSTGRES,
    REDIS,
    RETENTION,
    TARGET,
    VALUES,
    command,
    tuned,
)
from balance_sync.cli.output import Output, emit, json_on_failure
from balance_sync.cli.render.sync import SyncProgress, sync_views
from balance_sync.errors import ConfigError
from balance_sync.monitoring.report import SyncFailure, failed_json, failed_result, run_reported
from balance_sync.ops.estimate import expected_keys
from balance_sync.ops.restore import parse_ids
from balance_sync.ops.sync import DEFAULT_BATCH_SIZE, DEFAULT_MIN_INTERVAL, SyncOptions
from balance_sync.settings import Settings
from balance_sync.stopping import StopRequest
from balance_sync.stores.postgres import OnConflict

# How a stop signal is named in the run record, and its exit code (128 + the signal).
_STOP_SIGNALS = {
    signal.SIGTERM: ("terminated by SIGTERM", 143),
    signal.SIGINT: ("interrupted by SIGINT", 130),
}


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT ask `stop` to stop the run at its next safe
    point instead of killing it; a second signal ends the process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may handle signals (an embedding program's worker)
        return

    def handler(signum: int, _frame: object) -> None:
        if stop.requested:  # asked twice: the operator wants out now; guarantee 4 holds
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        stop.request(*_STOP_SIGNALS[signal.Signals(signum)])

    previous = {number: signal.signal(number, handler) for number in _STOP_SIGNALS}
    try:
        yield
    finally:
        for number, action in previous.items():
            signal.signal(number, action)


@click.command("sync")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Read both sides and report what would change; write nothing anywhere.",
)
@click.option("--force", is_flag=True, help="Run even if a sync finished within --min-interval.")
@tuned(
    "--batch-size",
    type=click.IntRange(min=1, max=1_000_000),
    default=DEFAULT_BATCH_SIZE,
    metavar="N",
    help="Valid records merged per transaction.",
)
@tuned(
    "--wait",
    type=click.FloatRange(min=0),
    default=0,
    metavar="SECONDS",
    help="Wait this long for a running sync to finish instead of skipping.",
)
@click.option("--allow-negative", is_flag=True, help="Accept negative balances.")
@tuned(
    "--min-interval",
    type=click.FloatRange(min=0),
    default=DEFAULT_MIN_INTERVAL,
    metavar="SECONDS",
    help="Skip when a sync finished this recently (cron's hourly and daily entries meet at 02:00).",
)
@tuned(
    "--on-conflict",
    type=click.Choice(["skip", "redis", "db"]),
    default="skip",
    help="A row changed in PostgreSQL since balsync last wrote it: keep it and report it "
    "(skip), overwrite it with Redis (redis), or keep it and give Redis its value (db).",
)
@click.option(
    "--incremental",
    is_flag=True,
    help="Sync only the ids the application marked as changed (balance_sync.writer); "
    "--force still scans every key.",
)
@click.option(
    "--ids",
    metavar="ID,ID,...",
    help="With --on-conflict: resolve only these ids' conflicts; the others stay held.",
)
@click.option(
    "--accept-redis-restart",
    is_flag=True,
    help="Redis restarted and you checked that it holds the right balances: Redis wins "
    "for the held rows, and this Redis is trusted from now on.",
)
@command(REDIS, POSTGRES, TARGET, KEYS, VALUES, RETENTION, MONITORING)
def sync(
    *,
    settings: Settings,
    output: Output,
    dry_run: bool,
    force: bool,
    batch_size: int,
    wait: float,
    allow_negative: bool,
    min_interval: float,
    on_conflict: OnConflict,
    accept_redis_restart: bool,
    incremental: bool,
    ids: str | None,
) -> int:
    """Copy every balance from Redis into PostgreSQL, in batches.

    New ids are inserted, changed balances updated (updated_at only then), rows whose
    key is absent from Redis never touched. Invalid records are skipped, reported and
    kept in balsync.skipped_records; the run goes on. Only one run per table at a time:
    a run that finds another one going exits 0 as skipped.

    \b
    Examples:
      balsync sync                    # one run, a summary table
      balsync sync --dry-run -v       # what would change, batch by batch
      balsync sync --quiet            # from cron: silent unless something is wrong
      balsync sync --json | jq .status

    A row changed in PostgreSQL behind balsync's back (an admin correction) is a conflict:
    kept and listed by `balsync conflicts` (exit 1) unless --on-conflict says otherwise.

    After a Redis restart or failover no row that differs is overwritten (new ids are
    still inserted), since Redis may have come back empty or from an old snapshot. The
    restart stays pending, across runs, until a full sync finds every balance balsync
    remembers agreeing, or the operator decides:

    \b
      balsync restore                   # PostgreSQL's value into keys missing from Redis
      balsync sync --on-conflict db     # PostgreSQL wins: its value into each held key
      balsync sync --accept-redis-restart   # Redis wins: trust it, overwrite held rows

    SIGTERM (exit 143) or Ctrl-C (exit 130) stops the run after the batch in progress; it
    is recorded failed, and metrics and the fail ping go out.
    """
    started = time.monotonic()

    def failed(exc: Exception) -> dict[str, object]:
        result = failed_result(dry_run=dry_run, duration_s=time.monotonic() - started)
        return failed_json(result, SyncFailure.of(exc))

    with json_on_failure(output, failed):  # a usage error too leaves one JSON object
        if ids is not None and on_conflict == "skip":
            raise ConfigError(
                "--ids without --on-conflict does nothing",
                "--ids chooses the conflicts that --on-conflict redis|db resolves",
            )
        options = SyncOptions(
            dry_run=dry_run,
            force=force,
            batch_size=batch_size,
            wait=wait,
            allow_negative=allow_negative,
            min_interval=min_interval,
            on_conflict=on_conflict,
            accept_redis_restart=accept_redis_restart,
            incremental=incremental,
            resolve_ids=None if ids is None else frozenset(parse_ids(ids)),
        )
        progress = SyncProgress(enabled=not (output.json or output.quiet))
        if progress.enabled:  # a person watches: worth two quick reads for a total and time left
            progress.total = expected_keys(settings, options)
        with stop_on_signals(options.stop), progress.show():
            result = run_reported(settings, options, on_batch=progress.update)
    code = 1 if result.status == "partial" else 0
    return emit(output, result, sync_views(result, str(settings.table)), code=code)
