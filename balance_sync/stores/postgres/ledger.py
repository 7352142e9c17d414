"""The run ledger: each run of a target table, what it skipped, and its conflicts."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import LiteralString

from psycopg.rows import class_row

from balance_sync import __version__
from balance_sync.settings import Settings, TableName
from balance_sync.stores.postgres.connection import Connection, Part
from balance_sync.stores.postgres.merge import Conflict


class Ledger(Part):
    """balsync.sync_runs and the records that hang off each run."""

    def start_run(self, settings: Settings) -> int:
        """Record a run that is starting; runs left 'running' by a killed process end as failed."""
        table = self.key(settings.table)

        def run(conn: Connection) -> int:
            with conn.transaction():
                conn.execute(
                    """UPDATE balsync.sync_runs
                       SET status = 'failed', finished_at = now(),
                           error = 'abandoned: the process ended without finishing'
                       WHERE target_table = %s AND status = 'running'""",
                    (table,),
                )
                row = conn.execute(
                    """INSERT INTO balsync.sync_runs (target_table, key_prefix, host, pid, version)
                       VALUES (%s, %s, %s, %s, %s) RETURNING id""",
                    (
                        table,
                        settings.key_prefix,
                        socket.gethostname(),
                        os.getpid(),
                        __version__,
                    ),
                ).fetchone()
            assert row is not None
            return int(row[0])

        return self.call(run)

    def finish_run(
        self,
        run_id: int,
        status: str,
        counters: dict[str, int],
        duration_s: float,
        error: str | None,
    ) -> None:
        """Record how a run ended, and drop its per-batch ledger."""

        def run(conn: Connection) -> None:
            with conn.transaction():
                conn.execute(
                    """UPDATE balsync.sync_runs
                       SET status = %(status)s, finished_at = now(), duration_s = %(duration)s,
                           error = %(error)s, processed = %(processed)s,
                           inserted = %(inserted)s, updated = %(updated)s,
                           unchanged = %(unchanged)s, skipped = %(skipped)s,
                           invalid = %(invalid)s
                       WHERE id = %(id)s""",
                    {
                        "status": status,
                        "duration": duration_s,
                        "error": error,
                        "id": run_id,
                        **counters,
                    },
                )
                conn.execute("DELETE FROM balsync.run_batches WHERE run_id = %s", (run_id,))
                conn.execute("DELETE FROM balsync.restart_seen WHERE run_id = %s", (run_id,))

        self.call(run)

    def last_success_age(self, table: TableName) -> float | None:
        """Seconds since the last run that finished (success or partial), or None."""
        key = self.key(table)
        row = self.call(
            lambda conn: conn.execute(
                """SELECT extract(epoch FROM now() - max(finished_at))::float8
                   FROM balsync.sync_runs
                   WHERE target_table = %s AND status IN ('success', 'partial')""",
                (key,),
            ).fetchone()
        )
        return None if row is None or row[0] is None else float(row[0])

    def conflicts(
        self, table: TableName, run_id: int | None, limit: int
    ) -> tuple[int | None, list[Conflict]]:
        """The conflicts of a run (default: the last run that had any) of a target table."""
        key = self.key(table)

        def run(conn: Connection) -> tuple[int | None, list[Conflict]]:
            chosen = run_id
            if chosen is None:
                row = conn.execute(
                    """SELECT max(c.run_id) FROM balsync.conflicts c
                       JOIN balsync.sync_runs r ON r.id = c.run_id
                       WHERE r.target_table = %s""",
                    (key,),
                ).fetchone()
                chosen = None if row is None or row[0] is None else int(row[0])
            if chosen is None:
                return None, []
            rows = conn.execute(
                """SELECT telegram_id, db_value, redis_value, last_written, kind, resolution
                   FROM balsync.conflicts WHERE run_id = %s ORDER BY id LIMIT %s""",
                (chosen, limit),
            ).fetchall()
            return chosen, [Conflict(int(r[0]), r[1], r[2], r[3], r[4], r[5]) for r in rows]

        return self.call(run)

    def last_success(self, table: TableName) -> RunRecord | None:
        """The run of `table` that finished last with status success or partial, if any."""
        key = self.key(table)
        runs = self._runs(
            _SELECT_RUNS
            + """ WHERE target_table = %s AND status IN ('success', 'partial')
                    AND finished_at IS NOT NULL
                  ORDER BY finished_at DESC LIMIT 1""",
            (key,),
        )
        return runs[0] if runs else None

    def recent_runs(self, table: TableName, limit: int) -> list[RunRecord]:
        """The last `limit` runs of `table`, newest first."""
        key = self.key(table)
        return self._runs(
            _SELECT_RUNS + " WHERE target_table = %s ORDER BY started_at DESC, id DESC LIMIT %s",
            (key, limit),
        )

    def running_run(self, table: TableName) -> RunRecord | None:
        """The newest run of `table` still recorded as running (alive, or killed unrecorded)."""
        key = self.key(table)
        runs = self._runs(
            _SELECT_RUNS
            + """ WHERE target_table = %s AND status = 'running'
                  ORDER BY started_at DESC, id DESC LIMIT 1""",
            (key,),
        )
        return runs[0] if runs else None

    def run_window(self, table: TableName, hours: int = 24) -> RunWindow:
        """Runs and failures of `table` started in the last `hours`, with duration percentiles."""
        key = self.key(table)
        row = self.call(
            lambda conn: conn.execute(
                """SELECT count(*), count(*) FILTER (WHERE status = 'failed'),
                          percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_s),
                          percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_s)
                   FROM balsync.sync_runs
                   WHERE target_table = %s AND started_at > now() - make_interval(hours => %s)""",
                (key, hours),
            ).fetchone()
        )
        assert row is not None
        return RunWindow(
            hours=hours,
            runs=int(row[0]),
            failures=int(row[1]),
            p50_duration_s=None if row[2] is None else float(row[2]),
            p95_duration_s=None if row[3] is None else float(row[3]),
        )

    def _runs(self, query: LiteralString, params: tuple[object, ...]) -> list[RunRecord]:
        def run(conn: Connection) -> list[RunRecord]:
            with conn.cursor(row_factory=class_row(RunRecord)) as cur:
                return cur.execute(query, params).fetchall()

        return self.call(run)

    def newest_skipping_run(self, table: TableName) -> int | None:
        """The newest run of `table` that skipped records, else its newest run, else None."""
        key = self.key(table)
        row = self.call(
            lambda conn: conn.execute(
                """SELECT r.id FROM balsync.sync_runs r
                   WHERE r.target_table = %s
                   ORDER BY EXISTS (SELECT 1 FROM balsync.skipped_records s
                                    WHERE s.run_id = r.id) DESC,
                            r.id DESC
                   LIMIT 1""",
                (key,),
            ).fetchone()
        )
        return None if row is None else int(row[0])

    def run_exists(self, run_id: int) -> bool:
        """True when balsync.sync_runs holds a run with this id."""
        row = self.call(
            lambda conn: conn.execute(
                "SELECT EXISTS (SELECT 1 FROM balsync.sync_runs WHERE id = %s)", (run_id,)
            ).fetchone()
        )
        return bool(row and row[0])

    def skipped_records(self, run_id: int, limit: int) -> tuple[int, list[SkippedRecord]]:
        """The first `limit` records a run skipped, in the order it met them, and their total."""

        def run(conn: Connection) -> tuple[int, list[SkippedRecord]]:
            total = conn.execute(
                "SELECT count(*) FROM balsync.skipped_records WHERE run_id = %s", (run_id,)
            ).fetchone()
            with conn.cursor(row_factory=class_row(SkippedRecord)) as cur:
                records = cur.execute(
                    """SELECT key, raw_value, reason, recorded_at
                       FROM balsync.skipped_records WHERE run_id = %s ORDER BY id LIMIT %s""",
                    (run_id, limit),
                ).fetchall()
            return (int(total[0]) if total else 0), records

        return self.call(run)


_SELECT_RUNS: LiteralString = """SELECT id, status, started_at, finished_at, duration_s,
        processed, inserted, updated, unchanged, skipped, invalid, error, host, pid, version,
        extract(epoch FROM now() - finished_at)::float8 AS age_s
    FROM balsync.sync_runs"""


@dataclass(frozen=True)
class RunRecord:
    """One row of balsync.sync_runs; `age_s` is seconds since it finished (None: unfinished)."""

    id: int
    status: str
    started_at: datetime
    finished_at: datetime | None
    duration_s: float | None
    processed: int
    inserted: int
    updated: int
    unchanged: int
    skipped: int
    invalid: int
    error: str | None
    host: str
    pid: int
    version: str
    age_s: float | None

    def to_json(self) -> dict[str, object]:
        """The run as JSON: timestamps in ISO 8601, durations in seconds."""
        return {
            "id": self.id,
            "status": self.status,
            "started_at": self.started_at.isoformat(),
            "finished_at": None if self.finished_at is None else self.finished_at.isoformat(),
            "duration_s": None if self.duration_s is None else round(self.duration_s, 3),
            "processed": self.processed,
            "inserted": self.inserted,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "skipped": self.skipped,
            "invalid": self.invalid,
            "error": self.error,
            "host": self.host,
            "pid": self.pid,
            "version": self.version,
        }


@dataclass(frozen=True)
class RunWindow:
    """Runs of a target table over the last `hours`; percentiles over runs that finished."""

    hours: int
    runs: int
    failures: int
    p50_duration_s: float | None
    p95_duration_s: float | None


@dataclass(frozen=True)
class SkippedRecord:
    """One row of balsync.skipped_records; `raw_value` is None for a key of another type."""

    key: str
    raw_value: str | None
    reason: str
    recorded_at: datetime
