"""A health report: its checks, its status and exit code, and the thresholds it applies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from balance_sync.errors import (
    PostgresUnavailable,
    RedisUnavailable,
)

Status = Literal["healthy", "degraded", "unhealthy"]
DEFAULT_MAX_AGE = 7200.0  # two hourly runs missed
TTL_SAMPLE_SIZE = 1000
VALUE_SAMPLE_SIZE = 1000
MEMORY_WARN_RATIO = 0.9
# A running sync's lock session runs a statement every batch; one quiet for this long
# belongs to a run that died or hangs, and every run meanwhile skips.
STALE_LOCK_AFTER = 600.0
RECENT_RUNS = 10  # run starts whose gaps tell the sync interval
PERSISTENCE_ADVICE = (
    "set `appendonly yes` with `appendfsync everysec`, or `save` rules that snapshot more "
    "often than balsync syncs (e.g. `save 60 1`), in redis.conf (or CONFIG SET, then CONFIG "
    "REWRITE)"
)
# uptime_in_seconds is truncated to whole seconds; without this slack a sync that finished
# within the server's first second would look older than the server.
UPTIME_SLACK_S = 1.0


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, whether it passed, and in words why."""

    name: str
    ok: bool
    detail: str
    latency_ms: float | None = None

    def to_json(self) -> dict[str, object]:
        """SPEC's check object."""
        return {
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
        }


@dataclass(frozen=True)
class HealthReport:
    """Every check, and whether a store could not be reached at all."""

    checks: tuple[Check, ...]
    redis_error: RedisUnavailable | None = None
    postgres_error: PostgresUnavailable | None = None

    @property
    def status(self) -> Status:
        """unhealthy: a store is unreachable; degraded: another check failed; else healthy."""
        if self.redis_error is not None or self.postgres_error is not None:
            return "unhealthy"
        return "healthy" if all(check.ok for check in self.checks) else "degraded"

    @property
    def exit_code(self) -> int:
        """SPEC's code: 0 healthy, 1 degraded, 3 Redis unreachable, 4 PostgreSQL unreachable.

        With both unreachable Redis wins: it is checked first, and it holds the money.
        """
        if self.redis_error is not None:
            return self.redis_error.exit_code
        if self.postgres_error is not None:
            return self.postgres_error.exit_code
        return 0 if self.status == "healthy" else 1

    def to_json(self) -> dict[str, object]:
        """SPEC's health object."""
        return {"status": self.status, "checks": [check.to_json() for check in self.checks]}


def format_duration(seconds: float) -> str:
    """A duration as a person reads it: 42 s, 12 min, 3.5 h, 2.1 d."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
