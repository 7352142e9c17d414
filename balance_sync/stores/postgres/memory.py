"""balsync's memory of the balances it wrote: what tells an outside change from its own, and
what a Redis restart may have lost."""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import sql

from balance_sync.settings import TableName
from balance_sync.stores.postgres.connection import Part
from balance_sync.stores.postgres.merge import _read_up_to, _remember
from balance_sync.stores.postgres.schema import TargetTable
from balance_sync.stores.postgres.trust import Trust


class Memory(Part):
    """The last balance balsync wrote (or saw agree) for each id of a target table."""

    def remember(self, table: TableName, pairs: Sequence[tuple[int, str]]) -> None:
        """Record that Redis now holds these values, as if balsync had written them.

        `restore` calls it for the keys it put back: their next change in Redis is then an
        ordinary update, not a conflict with an outside write balsync never saw.
        """
        self.call(lambda conn: _remember(conn, table, pairs))

    def forget_history(self, table: TableName) -> None:
        """No replication history can vouch for the trusted server any more: a run that was
        not sure of Redis is about to commit values from it."""
        key = self.key(table)
        self.call(
            lambda conn: conn.execute(
                """UPDATE balsync.redis_trust SET replid = NULL, repl_offset = NULL
                   WHERE target_table = %s AND repl_offset IS NOT NULL""",
                (key,),
            )
        )

    def record_read(self, table: TableName, position: Trust) -> None:
        """Record how far balsync has read the trusted server's replication history."""
        self.call(lambda conn: _read_up_to(conn, table, position))

    def remembers_any(self, table: TableName, key_prefix: str) -> bool:
        """True when balsync remembers a written value for some row of `table`, or of any
        table synced from the same Redis keys (a view over it, its name before a rename)."""
        key = self.key(table)
        row = self.call(
            lambda conn: conn.execute(
                """SELECT EXISTS (SELECT 1 FROM balsync.written WHERE target_table = %s)
                       OR EXISTS (SELECT 1 FROM balsync.written w
                                  WHERE w.target_table IN (SELECT target_table
                                                           FROM balsync.sync_runs
                                                           WHERE key_prefix = %s))""",
                (key, key_prefix),
            ).fetchone()
        )
        return bool(row and row[0])

    def missing_after_restart(self, target: TargetTable, run_id: int, key_prefix: str) -> int:
        """How many ids balsync remembers, for this table or any table synced from the same
        Redis keys (a view over it, its name before a rename), whose key this run did not
        find in Redis with a valid value. Keys that clear-cache removed on purpose, and ids
        with no row in the target, do not count."""
        query = sql.SQL(
            """SELECT count(DISTINCT w.telegram_id) FROM balsync.written w
               WHERE (w.target_table = %(table)s
                      OR w.target_table IN (SELECT target_table FROM balsync.sync_runs
                                            WHERE key_prefix = %(prefix)s))
                 AND NOT w.cleared
                 AND NOT EXISTS (SELECT 1 FROM balsync.restart_seen s
                                 WHERE s.run_id = %(run)s AND s.telegram_id = w.telegram_id)
                 AND EXISTS (SELECT 1 FROM {table} t WHERE t.{id} = w.telegram_id)"""
        ).format(table=target.ident, id=sql.Identifier(target.id_column))
        params = {"table": self.key(target.table), "prefix": key_prefix, "run": run_id}
        row = self.call(lambda conn: conn.execute(query, params).fetchone())
        return int(row[0]) if row else 0

    def mark_cleared(self, table: TableName, ids: Sequence[int]) -> None:
        """Remember that clear-cache deleted these keys on purpose (their values persisted)."""
        if ids:
            key = self.key(table)
            self.call(
                lambda conn: conn.execute(
                    """UPDATE balsync.written SET cleared = true
                       WHERE target_table = %s AND telegram_id = ANY(%s)""",
                    (key, list(ids)),
                )
            )
