"""The checks of PostgreSQL: reachable, balsync's schema, the last sync, the size of
balsync's own tables, and the table's lock."""

from __future__ import annotations

import logging

from balance_sync.errors import (
    SchemaMissing,
)
from balance_sync.ops.health.probe import ProbeState, age_s, sentence, timed_ms
from balance_sync.ops.health.report import (
    Check,
    format_duration,
)
from balance_sync.ops.retention import bookkeeping_size, format_bytes
from balance_sync.stores.postgres import Ledger, Schema, TableLock

# Every part of health logs as `balance_sync.ops.health`.
log = logging.getLogger(__package__)


class PostgresChecks(ProbeState):
    """Checks that read PostgreSQL."""

    def postgres_reachable(self) -> Check:
        self.db.ping()
        latency_ms = timed_ms(self.db.ping)
        version = self.db.server_version()
        return Check(
            "postgres",
            ok=True,
            detail=f"{self.settings.database_display}: PostgreSQL {version}",
            latency_ms=latency_ms,
        )

    # -- PostgreSQL -----------------------------------------------------------------------

    def schema(self) -> Check:
        if self.postgres_error is not None:
            raise self.postgres_error
        try:
            Schema(self.db).require_schema()
            Schema(self.db).describe_target(self.settings)
        except SchemaMissing as exc:
            self.schema_error = exc
            return Check("schema", ok=False, detail=sentence(exc))
        return Check(
            "schema",
            ok=True,
            detail=f"schema balsync and table {self.settings.table} are present",
        )

    def last_sync(self) -> Check:
        self._require_schema()
        table = self.settings.table
        self.last = last = Ledger(self.db).last_success(table)
        if last is None or last.age_s is None:
            return Check(
                "last_sync",
                ok=False,
                detail=f"no successful sync of {table} is recorded; run `balsync sync`",
            )
        ago = format_duration(last.age_s)
        if last.age_s > self.max_age:
            return Check(
                "last_sync",
                ok=False,
                detail=f"the last successful sync (run {last.id}, {last.status}) finished "
                f"{ago} ago, more than --max-age {format_duration(self.max_age)}: "
                "is cron starting balsync? (`balsync status`)",
            )
        return Check(
            "last_sync",
            ok=True,
            detail=f"the last successful sync (run {last.id}, {last.status}) finished {ago} ago",
        )

    def bookkeeping(self) -> Check:
        self._require_schema()
        size = bookkeeping_size(self.db, self.settings)
        detail = (
            f"balsync's tables hold about {size.rows:,} rows in {format_bytes(size.bytes)}; "
            f"retention: {size.retention.describe()}"
        )
        if size.warning:
            return Check("bookkeeping", ok=False, detail=f"{detail}: {size.warning}")
        return Check("bookkeeping", ok=True, detail=detail)

    def sync_lock(self) -> Check:
        self._require_schema()
        table = self.settings.table
        holder = TableLock(self.db).lock_holder(table)
        if holder is None:
            return Check("sync_lock", ok=True, detail=f"no run holds the lock on {table}")
        run = Ledger(self.db).running_run(table)
        session = (
            f"backend pid {holder.backend_pid} ({holder.application_name or 'no application'}"
            f" from {holder.client_addr or 'a local socket'}, {holder.state or 'state hidden'})"
        )
        what = (
            f"run {run.id} (host {run.host}, pid {run.pid}, started "
            f"{format_duration(age_s(run.started_at, holder.state_change, holder.quiet_s))} "
            "ago)"
            if run is not None
            else "a session with no running sync recorded (restore, clear-cache, or another client)"
        )
        if holder.quiet_s is None:
            return Check(
                "sync_lock",
                ok=True,
                detail=f"{what} holds the lock on {table} through {session}; how long it has "
                "been quiet is hidden from this role (grant pg_read_all_stats to tell)",
            )
        quiet = format_duration(holder.quiet_s)
        if holder.quiet_s <= self.stale_lock_after:
            return Check(
                "sync_lock",
                ok=True,
                detail=f"{what} holds the lock on {table} through {session}, last active "
                f"{quiet} ago",
            )
        where = f" on host {run.host}" if run is not None else ""
        pid = f"process {run.pid}{where}" if run is not None else "its client"
        return Check(
            "sync_lock",
            ok=False,
            detail=f"{what} holds the lock on {table} through {session}, but that session "
            f"has done nothing for {quiet}, more than {format_duration(self.stale_lock_after)}"
            ": a sync that makes progress touches it every batch, and every run skips while "
            f"it is held. If {pid} is gone or hung, end the session: SELECT "
            f"pg_terminate_backend({holder.backend_pid}); else wait: PostgreSQL ends a dead "
            "client's balsync session by itself within minutes (keepalives, "
            "idle_session_timeout)",
        )
