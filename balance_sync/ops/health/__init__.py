"""Health: can balsync reach both stores, is its schema there, is the last sync recent, is
money at risk in Redis (eviction, expiring keys, memory, a restart since the last sync, a
server that keeps nothing on disk), and does a run hold the table's lock without progress.

Every check only reads. A store that cannot be reached within the retry budget is a failing
check in the report, not an exception, so a monitor always gets the whole picture; the
checks that need it are reported as not checked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from balance_sync.errors import PostgresUnavailable, RedisUnavailable, SchemaMissing
from balance_sync.ops.health.postgres_checks import PostgresChecks
from balance_sync.ops.health.probe import NotChecked, sentence
from balance_sync.ops.health.redis_checks import RedisChecks
from balance_sync.ops.health.report import (
    DEFAULT_MAX_AGE,
    STALE_LOCK_AFTER,
    Check,
    HealthReport,
    Status,
    format_duration,
)
from balance_sync.settings import Settings
from balance_sync.stores.postgres import Database
from balance_sync.stores.redis import RedisStore

__all__ = [
    "DEFAULT_MAX_AGE",
    "STALE_LOCK_AFTER",
    "Check",
    "HealthReport",
    "Status",
    "check_health",
    "format_duration",
]

# Every part of health logs as `balance_sync.ops.health`.
log = logging.getLogger(__package__)


class _Probe(RedisChecks, PostgresChecks):
    """One health run: every check in SPEC's order, each guarded."""

    def run(self) -> HealthReport:
        checks = tuple(
            self._guard(name, check)
            for name, check in (
                ("redis", self.redis_reachable),
                ("postgres", self.postgres_reachable),
                ("schema", self.schema),
                ("last_sync", self.last_sync),
                ("eviction_policy", self.eviction_policy),
                ("key_ttl", self.key_ttl),
                ("invalid_values", self.invalid_values),
                ("memory", self.memory),
                ("redis_restart", self.redis_restart),
                ("persistence", self.persistence),
                ("bookkeeping", self.bookkeeping),
                ("sync_lock", self.sync_lock),
                *((("sentinel", self.sentinel),) if self.redis.sentinel is not None else ()),
            )
        )
        return HealthReport(checks, self.redis_error, self.postgres_error)

    def _guard(self, name: str, check: Callable[[], Check]) -> Check:
        """Run one check; an unreachable store or a broken check becomes a failing line."""
        try:
            return check()
        except RedisUnavailable as exc:
            if exc is self.redis_error:
                detail = "not checked: Redis is unreachable"
            else:
                self.redis_error, detail = exc, sentence(exc)
        except PostgresUnavailable as exc:
            if exc is self.postgres_error:
                detail = "not checked: PostgreSQL is unreachable"
            else:
                self.postgres_error, detail = exc, sentence(exc)
        except SchemaMissing as exc:
            detail = f"not checked: {exc.message}"
        except NotChecked as exc:
            detail = f"not checked: {exc}"
        except Exception as exc:  # a check that breaks fails, and the others still run
            log.warning("health check %s failed: %s", name, exc, exc_info=True)
            detail = f"check failed: {type(exc).__name__}: {exc}"
        return Check(name, ok=False, detail=detail)


def check_health(
    settings: Settings, max_age: float = DEFAULT_MAX_AGE, stale_lock_after: float | None = None
) -> HealthReport:
    """Run every check once, changing nothing, and report.

    `max_age` is how many seconds ago the last successful sync may have finished;
    `stale_lock_after` (default STALE_LOCK_AFTER) how long the session holding the
    table's lock may go without a statement. An unreachable store costs at most one retry
    budget (`settings.retry_timeout`), not one per check.
    """
    redis = RedisStore(settings.redis_url, settings.retry_timeout)
    db = Database(settings.database_url, settings.retry_timeout)
    stale = STALE_LOCK_AFTER if stale_lock_after is None else stale_lock_after
    try:
        return _Probe(settings, max_age, redis, db, stale).run()
    finally:
        redis.close()
        db.close()
