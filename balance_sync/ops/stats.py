"""Stats: what the recent runs did, and how much money each store holds right now.

Read-only. The run history comes from balsync.sync_runs; the live figures count balance
keys in Redis with SCAN (DBSIZE would count every key in the database) and sum the target
table in PostgreSQL exactly, as numeric, never through a float.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from balance_sync.ops.retention import BookkeepingSize, bookkeeping_size
from balance_sync.settings import Settings
from balance_sync.stores.postgres import Database, Ledger, Reads, RunRecord, RunWindow, Schema
from balance_sync.stores.redis import RedisStore

DEFAULT_RUNS = 10
WINDOW_HOURS = 24


@dataclass(frozen=True)
class StatsReport:
    """Recent runs of one target table and the live figures of both stores."""

    table: str
    key_prefix: str
    runs: tuple[RunRecord, ...]  # newest first
    window: RunWindow
    redis_keys: int
    redis_used_memory: int
    redis_used_memory_human: str
    pg_rows: int
    pg_balance_sum: Decimal
    bookkeeping: BookkeepingSize | None = None  # balsync's own tables, all targets together

    @property
    def last_run(self) -> RunRecord | None:
        """The newest run, whatever its status."""
        return self.runs[0] if self.runs else None

    def to_json(self) -> dict[str, object]:
        """The stats object; the balance sum is an exact decimal string."""
        return {
            "table": self.table,
            "last_run": None if self.last_run is None else self.last_run.to_json(),
            "runs": [run.to_json() for run in self.runs],
            "last_24h": {
                "runs": self.window.runs,
                "failures": self.window.failures,
                "p50_duration_s": _rounded(self.window.p50_duration_s),
                "p95_duration_s": _rounded(self.window.p95_duration_s),
            },
            "redis": {
                "key_prefix": self.key_prefix,
                "balance_keys": self.redis_keys,
                "used_memory": self.redis_used_memory,
                "used_memory_human": self.redis_used_memory_human,
            },
            "postgres": {"rows": self.pg_rows, "balance_sum": str(self.pg_balance_sum)},
            "bookkeeping": None if self.bookkeeping is None else self.bookkeeping.to_json(),
        }


def collect_stats(settings: Settings, runs: int = DEFAULT_RUNS) -> StatsReport:
    """Read the last `runs` runs, the last 24 h of runs, and the live figures of both stores.

    Raises SchemaMissing before `init-db`, PostgresUnavailable or RedisUnavailable when a
    store stays unreachable for the retry budget.
    """
    db = Database(settings.database_url, settings.retry_timeout)
    redis = RedisStore(settings.redis_url, settings.retry_timeout)
    try:
        Schema(db).require_schema()
        target = Schema(db).describe_target(settings)
        recent = tuple(Ledger(db).recent_runs(settings.table, runs))
        window = Ledger(db).run_window(settings.table, WINDOW_HOURS)
        rows, total = Reads(db).table_totals(target)
        books = bookkeeping_size(db, settings)
        info = redis.server_info()
        keys = redis.count_keys(settings.key_prefix)
    finally:
        db.close()
        redis.close()
    return StatsReport(
        table=str(settings.table),
        key_prefix=settings.key_prefix,
        runs=recent,
        window=window,
        redis_keys=keys,
        redis_used_memory=info.used_memory,
        redis_used_memory_human=info.used_memory_human,
        pg_rows=rows,
        pg_balance_sum=total,
        bookkeeping=books,
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
