"""What the checks of one health run share: the stores, what earlier checks learned."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime

from balance_sync.errors import (
    BalsyncError,
    PostgresUnavailable,
    RedisUnavailable,
    SchemaMissing,
)
from balance_sync.ops.health.report import RECENT_RUNS, STALE_LOCK_AFTER
from balance_sync.settings import Settings
from balance_sync.stores.postgres import Database, Ledger, RunRecord
from balance_sync.stores.redis import RedisStore, ServerInfo


class NotChecked(Exception):
    """A check could not run because an earlier one broke."""


class ProbeState:
    """The state one health run shares between its checks, and the helpers they share."""

    def __init__(
        self,
        settings: Settings,
        max_age: float,
        redis: RedisStore,
        db: Database,
        stale_lock_after: float = STALE_LOCK_AFTER,
    ) -> None:
        self.settings = settings
        self.max_age = max_age
        self.stale_lock_after = stale_lock_after
        self.redis = redis
        self.db = db
        self.info: ServerInfo | None = None
        self.redis_error: RedisUnavailable | None = None
        self.postgres_error: PostgresUnavailable | None = None
        self.schema_error: SchemaMissing | None = None
        self.last: RunRecord | None = None

    def _server(self) -> ServerInfo:
        if self.info is None:
            if self.redis_error is not None:
                raise self.redis_error
            raise NotChecked("Redis did not describe itself (INFO failed)")
        return self.info

    def _require_schema(self) -> None:
        if self.postgres_error is not None:
            raise self.postgres_error
        if self.schema_error is not None:
            raise self.schema_error

    def _sync_interval(self) -> tuple[float, str]:
        """How often syncs start: the median gap between the recent runs' starts, else
        --max-age (the longest the operator lets pass between syncs); and where it came from."""
        if self.postgres_error is None and self.schema_error is None:
            runs = Ledger(self.db).recent_runs(self.settings.table, RECENT_RUNS)
            gaps = sorted(
                (newer.started_at - older.started_at).total_seconds()
                for newer, older in itertools.pairwise(runs)
            )
            if gaps:
                return max(1.0, gaps[len(gaps) // 2]), "the recent runs' interval"
        return self.max_age, "--max-age"


def age_s(started: datetime, state_change: datetime | None, quiet_s: float | None) -> float:
    """Seconds since `started`, by the database's clock where the holder's figures give it."""
    if state_change is not None and quiet_s is not None:
        return max(0.0, (state_change - started).total_seconds() + quiet_s)
    return max(0.0, (datetime.now(UTC) - started).total_seconds())


def timed_ms(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def shown(raw: bytes) -> str:
    return repr(raw.decode("utf-8", "backslashreplace"))[:60]


def sentence(exc: BalsyncError) -> str:
    return f"{exc.message} — {exc.hint}" if exc.hint else exc.message
