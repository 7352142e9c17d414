"""Status: is a sync running right now, how did the last one end, and when do cron or the
systemd timers start the next ones.

A running sync is recognised by its per-table advisory lock, as PostgreSQL sees it in
pg_locks, and described by its backend (pg_stat_activity) and its run record (host, pid,
start). A run record still marked running that nobody holds the lock for belongs to a
process that died; the next sync marks it failed. Read-only; Redis is asked only whether it is the
server balsync trusts (a restart pending), and status works without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from balance_sync.errors import RedisUnavailable
from balance_sync.ops.schedule import Crontab, InstalledSchedule, installed_schedule
from balance_sync.ops.systemd import Systemctl, Timer
from balance_sync.restart_guard import restart_pending
from balance_sync.settings import Settings
from balance_sync.stores.postgres import Database, Ledger, LockHolder, RunRecord, Schema, TableLock
from balance_sync.stores.redis import RedisStore

NEXT_RUNS = 3


@dataclass(frozen=True)
class StatusReport:
    """What is going on with one target table."""

    table: str
    holder: LockHolder | None  # the backend holding the table's lock: a sync is running
    current_run: RunRecord | None  # its run record, once it has written one
    abandoned_run: RunRecord | None  # marked running, but nobody holds the lock
    last_run: RunRecord | None  # the newest run that ended
    schedule: InstalledSchedule
    redis_restart_pending: bool | None = None  # None: Redis could not be asked
    timers: tuple[Timer, ...] = ()  # balsync's systemd timers, the next to fire first

    @property
    def running(self) -> bool:
        """True while a sync holds the table's lock."""
        return self.holder is not None

    def to_json(self) -> dict[str, object]:
        """The status object; timestamps in ISO 8601."""
        holder = self.holder
        return {
            "table": self.table,
            "running": self.running,
            "lock_holder": None
            if holder is None
            else {
                "backend_pid": holder.backend_pid,
                "application_name": holder.application_name,
                "client_addr": holder.client_addr,
                "backend_start": _iso(holder.backend_start),
                "state_change": _iso(holder.state_change),
                "state": holder.state,
            },
            "current_run": _run(self.current_run),
            "abandoned_run": _run(self.abandoned_run),
            "last_run": _run(self.last_run),
            "redis_restart_pending": self.redis_restart_pending,
            "schedule": {
                "crontab": self.schedule.crontab,
                "detail": self.schedule.detail,
                "entries": [
                    {
                        "line": entry.line,
                        "schedule": entry.schedule,
                        "managed": entry.managed,
                        "timezone": entry.timezone,
                    }
                    for entry in self.schedule.entries
                ],
                "next_runs": [
                    {"at": fire.at.isoformat(), "line": fire.entry.line}
                    for fire in self.schedule.next_runs
                ],
            },
            "systemd_timers": [timer.to_json() for timer in self.timers],
        }


def collect_status(
    settings: Settings,
    crontab: Crontab,
    now: datetime | None = None,
    systemctl: Systemctl | None = None,
) -> StatusReport:
    """Look at the lock, the run records, the crontab and the systemd timers of balsync.

    Raises SchemaMissing before `init-db` and PostgresUnavailable when PostgreSQL stays
    unreachable; a missing crontab or systemd is reported in the result, not raised.
    """
    db = Database(settings.database_url, settings.retry_timeout)
    try:
        Schema(db).require_schema()
        holder = TableLock(db).lock_holder(settings.table)
        running = Ledger(db).running_run(settings.table)
        if running is not None and holder is None:
            # A sync takes the lock before it writes its record: one that started between
            # the two reads holds the lock by now.
            holder = TableLock(db).lock_holder(settings.table)
        # At most one run record is ever 'running': each start marks the earlier ones failed.
        recent = Ledger(db).recent_runs(settings.table, 2)
        pending = _restart_pending(settings, db)
    finally:
        db.close()
    last = next((run for run in recent if run.status != "running"), None)
    schedule = installed_schedule(crontab, now or datetime.now(UTC), NEXT_RUNS)
    timers = (systemctl or Systemctl()).balsync_timers()
    return StatusReport(
        table=str(settings.table),
        holder=holder,
        current_run=running if holder is not None else None,
        abandoned_run=running if holder is None else None,
        last_run=last,
        schedule=schedule,
        redis_restart_pending=pending,
        timers=timers,
    )


def _restart_pending(settings: Settings, db: Database) -> bool | None:
    """Whether a Redis restart is pending; None when Redis does not answer (status still
    reports the rest: it is often asked while something is down)."""
    redis = RedisStore(settings.redis_url, min(settings.retry_timeout, 5))
    try:
        return restart_pending(redis, db, settings.table, settings.key_prefix)
    except RedisUnavailable:
        return None
    finally:
        redis.close()


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _run(run: RunRecord | None) -> dict[str, object] | None:
    return None if run is None else run.to_json()
