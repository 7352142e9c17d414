"""The Redis server balsync trusts for each target table, and the servers its runs read."""

from __future__ import annotations

from dataclasses import dataclass

from balance_sync.settings import TableName
from balance_sync.stores.postgres.connection import Part


@dataclass(frozen=True)
class Trust:
    """The Redis server trusted for a table: its run_id and, where it has one, the point of
    its replication history up to which balsync has read and committed."""

    redis_id: str
    replid: str | None = None
    repl_offset: int | None = None
    token: str | None = None  # the trust marker's value; None: migrated, unverified
    flushes: str | None = None  # the server's FLUSHALL/FLUSHDB count when it was trusted


class RedisTrust(Part):
    """The restart guard's records: the trusted server, and those that runs held rows for."""

    def trusted_redis(self, table: TableName) -> Trust | None:
        """The Redis server balsync trusts for `table`, or None before any."""
        key = self.key(table)
        row = self.call(
            lambda conn: conn.execute(
                """SELECT redis_id, replid, repl_offset, token, flushes FROM balsync.redis_trust
                   WHERE target_table = %s""",
                (key,),
            ).fetchone()
        )
        return None if row is None else Trust(str(row[0]), *row[1:])

    def trust_redis(self, table: TableName, trust: Trust, reason: str) -> None:
        """Trust this Redis server for `table` from now on; `reason` says on what evidence."""
        key = self.key(table)
        self.call(
            lambda conn: conn.execute(
                """INSERT INTO balsync.redis_trust
                       (target_table, redis_id, replid, repl_offset, token, flushes, reason)
                   VALUES (%s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (target_table) DO UPDATE
                   SET redis_id = EXCLUDED.redis_id, replid = EXCLUDED.replid,
                       repl_offset = EXCLUDED.repl_offset, token = EXCLUDED.token,
                       flushes = EXCLUDED.flushes, reason = EXCLUDED.reason,
                       trusted_at = now()""",
                (
                    key,
                    trust.redis_id,
                    trust.replid,
                    trust.repl_offset,
                    trust.token,
                    trust.flushes,
                    reason,
                ),
            )
        )

    def record_seen(self, run_id: int, seen: str) -> None:
        """Record which Redis server this run read while it held rows back."""
        self.call(
            lambda conn: conn.execute(
                "UPDATE balsync.sync_runs SET redis_seen = %s WHERE id = %s", (seen, run_id)
            )
        )

    def last_seen_redis(self, table: TableName, before_run: int | None) -> str | None:
        """The Redis server the last earlier run of `table` that held rows back read, since
        balsync last trusted one; None when no such run."""
        key = self.key(table)
        row = self.call(
            lambda conn: conn.execute(
                """SELECT r.redis_seen FROM balsync.sync_runs r
                   WHERE r.target_table = %(key)s AND r.redis_seen IS NOT NULL
                     AND (%(run)s::bigint IS NULL OR r.id < %(run)s::bigint)
                     AND r.started_at > coalesce(
                         (SELECT trusted_at FROM balsync.redis_trust
                          WHERE target_table = %(key)s), '-infinity')
                   ORDER BY r.id DESC LIMIT 1""",
                {"key": key, "run": before_run},
            ).fetchone()
        )
        return None if row is None else str(row[0])
