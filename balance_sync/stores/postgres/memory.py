"""balsync's memory of the balances it wrote: what tells an outside change from its own, and
what a Redis restart may have lost."""

from __future__ import annotations

from collections.abc import Sequence
from typing import LiteralString

from psycopg import sql

from balance_sync.settings import TableName
from balance_sync.stores.postgres.connection import Connection, Part, _ident
from balance_sync.stores.postgres.memory_layout import (
    CLEARED_COLUMN,
    WRITING,
    WRITTEN_COLUMN,
    target_id,
)
from balance_sync.stores.postgres.merge import _read_up_to, _remember
from balance_sync.stores.postgres.schema import TargetTable
from balance_sync.stores.postgres.trust import Trust

# The ids of a table and of the tables synced from the same Redis keys (a view over it,
# its name before a rename): whose memory speaks for its rows.
_KNOWN_AS: LiteralString = """SELECT t.id FROM balsync.targets t
    WHERE t.target_table = %(table)s OR t.relid = to_regclass(%(relation)s)
       OR t.target_table IN (SELECT target_table FROM balsync.sync_runs
                             WHERE key_prefix = %(prefix)s)"""


class Memory(Part):
    """The last balance balsync wrote (or saw agree) for each id of a target table."""

    def remember(self, target: TargetTable, pairs: Sequence[tuple[int, str]]) -> None:
        """Record that Redis now holds these values, as if balsync had written them.

        `restore` calls it for the keys it put back: their next change in Redis is then an
        ordinary update, not a conflict with an outside write balsync never saw.
        """

        def run(conn: Connection) -> None:
            with conn.transaction():  # one transaction: WRITING holds for its statements
                _remember(conn, target, pairs)

        self.call(run)

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

        def run(conn: Connection) -> bool:
            row = conn.execute(
                """SELECT EXISTS (SELECT 1 FROM balsync.written w
                                  WHERE w.target_id IN ("""
                + _KNOWN_AS
                + """))""",
                {"table": key, "relation": _ident(table).as_string(conn), "prefix": key_prefix},
            ).fetchone()
            if row and row[0]:
                return True
            for in_row in _in_row_tables(conn, table, key_prefix):
                found = conn.execute(
                    sql.SQL(
                        "SELECT EXISTS (SELECT 1 FROM {} WHERE balsync_written IS NOT NULL)"
                    ).format(in_row)
                ).fetchone()
                if found and found[0]:
                    return True
            return False

        return self.call(run)

    def missing_after_restart(self, target: TargetTable, run_id: int, key_prefix: str) -> int:
        """How many ids balsync remembers, for this table or any table synced from the same
        Redis keys (a view over it, its name before a rename), whose key this run did not
        find in Redis with a valid value. Keys that clear-cache removed on purpose, and ids
        with no row in the target, do not count."""
        names = {"table": target.ident, "id": sql.Identifier(target.id_column)}
        # A row's own memory stands; balsync.written speaks for the target's rows only
        # where they have none.
        aside = sql.SQL(
            """SELECT w.telegram_id FROM balsync.written w
               WHERE w.target_id IN ("""
            + _KNOWN_AS
            + """)
                 AND NOT w.cleared
                 AND NOT EXISTS (SELECT 1 FROM balsync.restart_seen s
                                 WHERE s.run_id = %(run)s AND s.telegram_id = w.telegram_id)
                 AND EXISTS (SELECT 1 FROM {table} t WHERE t.{id} = w.telegram_id{no_memory})"""
        ).format(
            no_memory=sql.SQL(" AND t.balsync_written IS NULL" if target.memory_in_row else ""),
            **names,
        )
        in_row = sql.SQL(
            """SELECT m.telegram_id FROM {memory} m
               WHERE m.balsync_written IS NOT NULL AND NOT m.balsync_cleared
                 AND NOT EXISTS (SELECT 1 FROM balsync.restart_seen s
                                 WHERE s.run_id = %(run)s AND s.telegram_id = m.telegram_id)
                 AND EXISTS (SELECT 1 FROM {table} t WHERE t.{id} = m.telegram_id)"""
        )
        params = {
            "table": self.key(target.table),
            "relation": target.ident.as_string(),
            "prefix": key_prefix,
            "run": run_id,
        }

        def run(conn: Connection) -> int:
            parts = [aside] + [
                in_row.format(memory=memory, **names)
                for memory in _in_row_tables(conn, target.table, key_prefix)
            ]
            query = sql.SQL("SELECT count(*) FROM ({}) AS remembered").format(
                sql.SQL(" UNION ").join(parts)
            )
            row = conn.execute(query, params).fetchone()
            return int(row[0]) if row else 0

        return self.call(run)

    def mark_cleared(self, target: TargetTable, ids: Sequence[int]) -> None:
        """Remember that clear-cache deleted these keys on purpose (their values persisted)."""
        if not ids:
            return
        key = self.key(target.table)

        def run(conn: Connection) -> None:
            relation = target.ident.as_string(conn) if target.memory_in_row else None
            with conn.transaction():
                if target.memory_in_row:
                    conn.execute(WRITING)
                    conn.execute(
                        sql.SQL(
                            """UPDATE {} SET balsync_cleared = true
                               WHERE {} = ANY(%s) AND balsync_written IS NOT NULL"""
                        ).format(target.ident, sql.Identifier(target.id_column)),
                        (list(ids),),
                    )
                conn.execute(
                    """UPDATE balsync.written SET cleared = true
                       WHERE target_id = %s AND telegram_id = ANY(%s)""",
                    (target_id(conn, key, relation), list(ids)),
                )

        self.call(run)


def _in_row_tables(conn: Connection, table: TableName, key_prefix: str) -> list[sql.Identifier]:
    """The tables that keep balsync's memory in their rows among `table` and the tables
    synced from the same Redis keys (init-db's table behind a view, say)."""
    rows = conn.execute(
        """SELECT n.nspname, c.relname FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE c.relkind = 'r'
             AND (c.oid = to_regclass(%s)
                  OR n.nspname || '.' || c.relname IN (SELECT target_table FROM balsync.sync_runs
                                                       WHERE key_prefix = %s))
             AND EXISTS (SELECT 1 FROM pg_attribute a
                         WHERE a.attrelid = c.oid AND a.attname = %s AND NOT a.attisdropped)
             AND EXISTS (SELECT 1 FROM pg_attribute a
                         WHERE a.attrelid = c.oid AND a.attname = %s AND NOT a.attisdropped)""",
        (_ident(table).as_string(conn), key_prefix, WRITTEN_COLUMN, CLEARED_COLUMN),
    ).fetchall()
    return [sql.Identifier(schema, name) for schema, name in rows]
