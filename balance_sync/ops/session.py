"""The opening and closing steps that clear-cache and restore share around their work.

Both open Redis and PostgreSQL, describe the target table, and take its advisory lock
(skipping when another run holds it) so that a sync cannot move the other store under
them. sync opens its own variant: it requires the schema, may wait for the lock, and
runs several writers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from balance_sync.settings import Settings
from balance_sync.stores.postgres import Database, RunLock, Schema, TargetTable
from balance_sync.stores.redis import RedisStore

LOCK_HELD = "another run holds the lock"


@dataclass(frozen=True)
class TableSession:
    """The opened stores and target table of one command, and the lock it holds."""

    redis: RedisStore
    control: Database  # holds the lock; bookkeeping goes here too
    db: Database
    target: TargetTable
    lock: RunLock | None  # held for the whole command; None in a dry run or when skipping
    skip_reason: str  # why the command must not go ahead, or ''


@contextlib.contextmanager
def table_session(settings: Settings, *, take_lock: bool) -> Iterator[TableSession]:
    """Open both stores, describe the target table and, with `take_lock`, take its lock.

    Redis is pinged before PostgreSQL is asked; the balsync schema is not required. The
    lock is tried without waiting: when another run holds it, the session's `skip_reason`
    says so and the caller skips. On the way out, also on an error, the lock is released
    and every connection closed.
    """
    redis = RedisStore(settings.redis_url, settings.retry_timeout)
    control = Database(settings.database_url, settings.retry_timeout)
    db = Database(settings.database_url, settings.retry_timeout)
    lock = RunLock(control, settings.table)
    try:
        redis.ping()
        target = Schema(db).describe_target(settings)
        held = take_lock and lock.acquire(0)
        if held:  # init-db may have moved the memory into the rows before the lock was ours
            target = Schema(db).describe_target(settings)
        skip_reason = LOCK_HELD if take_lock and not held else ""
        yield TableSession(redis, control, db, target, lock if held else None, skip_reason)
    finally:
        lock.release()
        for closable in (control, db, redis):
            closable.close()
