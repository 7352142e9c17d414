"""One run from start to record: the gate, the lock, the restart guard, the writing, the end."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from balance_sync.errors import BalsyncError, PostgresUnavailable
from balance_sync.monitoring.logs import begin_run, bind_run_id
from balance_sync.ops.retention import prune_after_sync
from balance_sync.ops.sync.model import BatchReport, SyncOptions, SyncResult
from balance_sync.ops.sync.writing import Writing
from balance_sync.restart_guard import RestartGuard
from balance_sync.settings import Settings, TableName, mask_text
from balance_sync.stores.postgres import (
    Database,
    Ledger,
    MergePolicy,
    Reads,
    RunLock,
    Schema,
    TargetTable,
)
from balance_sync.stores.redis import RedisStore

# The run logs as one logger, `balance_sync.ops.sync`, whichever part of it speaks.
log = logging.getLogger(__package__)


def run_sync(
    settings: Settings,
    options: SyncOptions,
    on_batch: Callable[[BatchReport], None] | None = None,
) -> SyncResult:
    """Run one sync as SPEC describes it, and say what it did.

    Raises RedisUnavailable (nothing more is written), PostgresUnavailable (rerunning is
    safe), or another BalsyncError; every batch committed before a failure holds exact
    values.
    """
    begin_run(str(settings.table))  # nothing of an earlier run in this process carries over
    started = time.monotonic()
    redis = RedisStore(settings.redis_url, settings.retry_timeout)
    control = Database(settings.database_url, settings.retry_timeout)
    writers = [
        Database(settings.database_url, settings.retry_timeout) for _ in range(options.writers)
    ]
    lock: RunLock | None = None
    result = SyncResult(status="success", dry_run=options.dry_run)
    try:
        redis.ping()
        if not options.dry_run:
            Schema(control).require_schema()
        target = Schema(writers[0]).describe_target(settings)
        # Keyed by the table's oid: `user_balances` and `public.user_balances` share it.
        lock = RunLock(control, target.table)
        if not options.dry_run:
            result.reason = _gate(options, control, lock, target.table)
            if result.reason:
                return _skipped(result, started)
            # Again, now that the table is ours: init-db may have moved its memory into
            # the rows while this run waited for the lock.
            target = Schema(writers[0]).describe_target(settings)
            result.run_id = Ledger(control).start_run(settings)
            bind_run_id(result.run_id)  # every log line from here on names its run
        try:
            guard = RestartGuard.open(
                redis,
                control,
                target,
                options,
                key_prefix=settings.key_prefix,
                run_id=result.run_id,
            )
            policy = _merge_policy(options, control, target, guard)
            if not options.dry_run:
                # Every run claims the ids marked dirty: a full scan covers them too.
                claimed = redis.claim_dirty(settings.key_prefix)
                if not options.full_scan:
                    log.info("incremental sync of %d changed id(s)", claimed)
            Writing(
                settings, options, redis, lock, target, result, on_batch, policy, guard, writers
            ).copy_all()
            if not options.dry_run:
                guard.finish()
                redis.release_claim(settings.key_prefix)  # only now: PostgreSQL has them all
        except BaseException as exc:
            result.status = "failed"
            _record_failure(control, result, started, exc)
            raise
        result.status = "partial" if result.skipped else "success"
        result.restart_pending, result.missing_keys = guard.conclude(result.held, result.run_id)
        _finish(result, started)
        _explain(result)
        if result.run_id is not None:
            Ledger(control).finish_run(
                result.run_id, result.status, result.counters(), result.duration_s, None
            )
            # Still under the table's lock; bounded in time, and never fails the sync.
            result.pruned = prune_after_sync(control, settings, lock)
        log.info(
            "sync %s: %d processed, %d inserted, %d updated, %d unchanged, %d skipped",
            result.status,
            result.processed,
            result.inserted,
            result.updated,
            result.unchanged,
            result.skipped,
        )
        return result
    finally:
        if lock is not None:
            lock.release()
        redis.close()
        for db in (control, *writers):
            db.close()


def _skipped(result: SyncResult, started: float) -> SyncResult:
    result.status = "skipped"
    log.info("sync skipped: %s", result.reason)
    return _finish(result, started)


def _gate(options: SyncOptions, control: Database, lock: RunLock, table: TableName) -> str:
    """Why this run must not go ahead (another one runs, or one finished recently), or ''."""
    if not lock.acquire(options.wait, options.stop.pause):
        return f"another run holds the lock on {table}"
    if not options.force:
        age = Ledger(control).last_success_age(table)
        if age is not None and age < options.min_interval:
            return (
                f"a sync finished {age:.0f}s ago, within --min-interval "
                f"{options.min_interval:g}s (use --force to run anyway)"
            )
    return ""


def _merge_policy(
    options: SyncOptions, control: Database, target: TargetTable, guard: RestartGuard
) -> MergePolicy:
    """Hold every overwrite while a Redis restart is pending; insert first when the table is
    empty and takes inserts (a first sync)."""
    return MergePolicy(
        on_conflict=options.on_conflict,
        hold_updates=guard.pending,
        resolve_ids=options.resolve_ids,
        insert_first=not options.dry_run and target.can_insert and Reads(control).is_empty(target),
    )


def _explain(result: SyncResult) -> None:
    if result.restart_pending:
        missing = (
            f"; {result.missing_keys} remembered key(s) are missing from Redis or invalid"
            if result.missing_keys
            else ""
        )
        log.warning(
            "Redis restart pending: %d balance(s) differ from PostgreSQL and were not "
            "overwritten%s. Redis may have come back empty or from an old snapshot. "
            "PostgreSQL is right: `balsync restore` puts its balances into keys missing from "
            "Redis (SET NX, no existing key changes), and `balsync sync --on-conflict db "
            "[--ids ID,…]` gives the differing keys PostgreSQL's value (compare-and-set); "
            "the next full sync that finds every key agreeing trusts this Redis. Redis is "
            "right: `balsync sync --accept-redis-restart` overwrites the held rows with "
            "Redis's values and trusts it. See `balsync conflicts`.",
            result.held,
            missing,
        )
    kept = result.kept_changes
    if kept:
        log.warning(
            "%d row(s) were changed in PostgreSQL since balsync last wrote them and were kept "
            "(see `balsync conflicts`; `--on-conflict redis` or `db` decides for them)",
            kept,
        )


def _finish(result: SyncResult, started: float) -> SyncResult:
    result.duration_s = time.monotonic() - started
    return result


def _record_failure(
    control: Database, result: SyncResult, started: float, exc: BaseException
) -> None:
    """Mark the run failed, if PostgreSQL can still hear it; a killed run is marked later."""
    if result.run_id is None or isinstance(exc, PostgresUnavailable):
        return
    _finish(result, started)
    try:
        Ledger(control).finish_run(
            result.run_id,
            "failed",
            result.counters(),
            result.duration_s,
            mask_text(str(exc))[:2000],  # a library's text may quote a URL with its password
        )
    except BalsyncError:
        log.warning("could not record the failure of run %s", result.run_id)
