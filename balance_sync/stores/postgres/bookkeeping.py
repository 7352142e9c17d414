"""Retention of balsync's own records: the sizes of its tables, and pruning a table's runs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import LiteralString

from psycopg import sql

from balance_sync.settings import TableName
from balance_sync.stores.postgres.connection import Connection, Database
from balance_sync.stores.postgres.schema import SCHEMA, _relation_exists

# The tables that hang off a run (ON DELETE CASCADE from balsync.sync_runs): retention deletes
# them itself, a batch at a time, so that deleting a run never cascades into a huge statement.
RUN_CHILDREN = ("skipped_records", "conflicts", "run_batches", "restart_seen")
AGED_CHILDREN = ("skipped_records", "conflicts")  # those with a recorded_at of their own
RETENTION_INDEXES = ("skipped_records_recorded", "conflicts_recorded")  # see _BOOKKEEPING

# The runs of a target table that are never pruned, whatever their age: the ones health,
# stats, status, `--min-interval`, the restart guard and the default views of `skipped`
# and `conflicts` read (the queries of ledger.py that they use pick them the same way).
_KEPT_RUNS: LiteralString = """
    SELECT id FROM balsync.sync_runs WHERE target_table = %(table)s AND status = 'running'
    UNION SELECT max(id) FROM balsync.sync_runs WHERE target_table = %(table)s GROUP BY status
    UNION (SELECT id FROM balsync.sync_runs
           WHERE target_table = %(table)s AND status IN ('success', 'partial')
             AND finished_at IS NOT NULL
           ORDER BY finished_at DESC LIMIT 1)
    -- The run that recorded the trusted Redis before balsync.redis_trust held it: init-db
    -- migrates the trust from there.
    UNION (SELECT id FROM balsync.sync_runs
           WHERE target_table = %(table)s AND status IN ('success', 'partial')
             AND redis_run_id IS NOT NULL
           ORDER BY id DESC LIMIT 1)
    UNION (SELECT r.id FROM balsync.sync_runs r
           WHERE r.target_table = %(table)s
             AND EXISTS (SELECT 1 FROM balsync.skipped_records s WHERE s.run_id = r.id)
           ORDER BY r.id DESC LIMIT 1)
    UNION (SELECT r.id FROM balsync.sync_runs r
           WHERE r.target_table = %(table)s
             AND EXISTS (SELECT 1 FROM balsync.conflicts c WHERE c.run_id = r.id)
           ORDER BY r.id DESC LIMIT 1)"""
# Foreign keys to balsync.sync_runs from tables other than a run's own records.
_REFERRING: LiteralString = """
    SELECT n.nspname, t.relname, a.attname
    FROM pg_constraint c
    JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
    WHERE c.contype = 'f' AND c.confrelid = 'balsync.sync_runs'::regclass
      AND cardinality(c.conkey) = 1
      AND NOT (n.nspname = 'balsync' AND t.relname = ANY(%s::text[]))"""
_OLD_RUNS: LiteralString = """SELECT id FROM balsync.sync_runs
    WHERE target_table = %(table)s AND started_at < %(cutoff)s AND id <> ALL(%(kept)s::bigint[])"""
# Records older than the cutoff of the table's runs that are not kept, oldest first.
_AGED: LiteralString = """FROM {child} c JOIN balsync.sync_runs r ON r.id = c.run_id
    WHERE c.recorded_at < %(cutoff)s AND r.target_table = %(table)s
      AND c.run_id <> ALL(%(kept)s::bigint[])"""


@dataclass(frozen=True)
class TableSize:
    """One of balsync's own tables: its live rows (as statistics count them) and bytes on disk."""

    name: str
    rows: int
    bytes: int


def bookkeeping_sizes(db: Database) -> list[TableSize]:
    """Every table of balsync's schema with its size, indexes and TOAST included.

    Rows come from the statistics (live tuples), not count(*): exact enough to see a
    table grow, and free however large it is.
    """
    rows = db.call(
        lambda conn: conn.execute(
            """SELECT c.relname,
                      coalesce(s.n_live_tup, greatest(c.reltuples, 0)::bigint),
                      pg_total_relation_size(c.oid)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid
               WHERE n.nspname = %s AND c.relkind IN ('r', 'p')
               ORDER BY c.relname""",
            (SCHEMA,),
        ).fetchall()
    )
    return [TableSize(str(name), int(count), int(size)) for name, count, size in rows]


class Bookkeeping:
    """The run records of one target table and what hangs off them, as retention prunes them.

    Every DELETE takes at most `limit` rows, found by an index, in a statement of its own:
    no statement holds its locks long or writes much WAL, and a failed one is simply
    retried. balsync.written and any table not named here are never touched.
    """

    def __init__(self, db: Database, table: TableName) -> None:
        self.db = db
        self.table = table
        self.key = db.key(table)  # as sync_runs.target_table records it

    def target_exists(self) -> bool:
        """True while the target table exists (a dropped one has runs, but no lock)."""
        return self.db.call(lambda conn: _relation_exists(conn, self.table))

    def indexed(self) -> bool:
        """True when `init-db` has added the indexes retention deletes by; without them a
        batch would sort a whole table, every batch."""
        row = self.db.call(
            lambda conn: conn.execute(
                """SELECT bool_and(to_regclass(%s || '.' || name) IS NOT NULL)
                   FROM unnest(%s::text[]) AS name""",
                (SCHEMA, list(RETENTION_INDEXES)),
            ).fetchone()
        )
        return bool(row and row[0])

    def cutoff(self, seconds: float) -> datetime:
        """The server's time `seconds` ago: what is older than it may go."""
        row = self.db.call(
            lambda conn: conn.execute(
                "SELECT now() - make_interval(secs => %s)", (seconds,)
            ).fetchone()
        )
        assert row is not None
        return row[0]  # type: ignore[no-any-return]

    def kept_runs(self) -> list[int]:
        """The ids of the runs that are never pruned by age: those of _KEPT_RUNS, and any run
        a table other than a run's own records refers to (deleting it would cascade there or
        fail), such as a table of trusted Redis identities."""

        def run(conn: Connection) -> list[int]:
            kept = {int(r[0]) for r in conn.execute(_KEPT_RUNS, {"table": self.key})}
            for schema, table, column in conn.execute(_REFERRING, (list(RUN_CHILDREN),)):
                referred = sql.SQL("SELECT DISTINCT {c} FROM {t} WHERE {c} IS NOT NULL").format(
                    c=sql.Identifier(column), t=sql.Identifier(schema, table)
                )
                kept.update(int(r[0]) for r in conn.execute(referred))
            return sorted(kept)

        return self.db.call(run)

    def count_aged(self, child: str, cutoff: datetime, kept: list[int]) -> int:
        """Rows of `child` older than `cutoff`, of runs that are not kept."""
        query = sql.SQL("SELECT count(*) " + _AGED).format(child=_child(child))
        return self._count(query, {"cutoff": cutoff, "kept": kept})

    def count_of_old_runs(
        self, child: str, cutoff: datetime, kept: list[int], aged: datetime | None
    ) -> int:
        """Rows of `child` that belong to runs older than `cutoff` and are not older than
        `aged` (those are counted by `count_aged`)."""
        younger = sql.SQL(" AND NOT (c.recorded_at < %(aged)s)" if aged else "")
        query = sql.SQL(
            "SELECT count(*) FROM {child} c WHERE c.run_id IN (" + _OLD_RUNS + "){younger}"
        ).format(child=_child(child), younger=younger)
        return self._count(query, {"cutoff": cutoff, "kept": kept, "aged": aged})

    def count_old_runs(self, cutoff: datetime, kept: list[int]) -> int:
        """Runs of the table started before `cutoff` that are not kept."""
        query = sql.SQL("SELECT count(*) FROM (" + _OLD_RUNS + ") AS old")
        return self._count(query, {"cutoff": cutoff, "kept": kept})

    def delete_aged(self, child: str, cutoff: datetime, kept: list[int], limit: int) -> int:
        """Delete up to `limit` of the oldest rows `count_aged` counts; how many went."""
        query = sql.SQL(
            "DELETE FROM {child} WHERE ctid = ANY(ARRAY(SELECT c.ctid "
            + _AGED
            + " ORDER BY c.recorded_at LIMIT %(limit)s))"
        ).format(child=_child(child))
        return self._delete(query, {"cutoff": cutoff, "kept": kept, "limit": limit})

    def old_runs(self, cutoff: datetime, kept: list[int], limit: int) -> list[int]:
        """The ids of up to `limit` of the oldest runs `count_old_runs` counts."""
        rows = self.db.call(
            lambda conn: conn.execute(
                _OLD_RUNS + " ORDER BY started_at LIMIT %(limit)s",
                {"table": self.key, "cutoff": cutoff, "kept": kept, "limit": limit},
            ).fetchall()
        )
        return [int(r[0]) for r in rows]

    def delete_children(self, child: str, runs: list[int], limit: int) -> int:
        """Delete up to `limit` rows of `child` that belong to `runs`; how many went."""
        query = sql.SQL(
            "DELETE FROM {child} WHERE ctid = ANY(ARRAY("
            "SELECT ctid FROM {child} WHERE run_id = ANY(%(runs)s::bigint[]) LIMIT %(limit)s))"
        ).format(child=_child(child))
        return self._delete(query, {"runs": runs, "limit": limit})

    def delete_runs(self, runs: list[int]) -> int:
        """Delete these runs, whose children are gone already (a straggler cascades)."""
        return self._delete(
            sql.SQL("DELETE FROM balsync.sync_runs WHERE id = ANY(%(runs)s::bigint[])"),
            {"runs": runs},
        )

    def _count(self, query: sql.SQL | sql.Composed, params: dict[str, object]) -> int:
        row = self.db.call(
            lambda conn: conn.execute(query, {"table": self.key, **params}).fetchone()
        )
        return int(row[0]) if row else 0

    def _delete(self, query: sql.SQL | sql.Composed, params: dict[str, object]) -> int:
        return self.db.call(
            lambda conn: conn.execute(query, {"table": self.key, **params}).rowcount
        )


def _child(name: str) -> sql.Identifier:
    assert name in RUN_CHILDREN, name
    return sql.Identifier(SCHEMA, name)
