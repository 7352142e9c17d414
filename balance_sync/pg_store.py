"""Every SQL statement balsync runs lives here.

Table and column names are always composed with psycopg.sql identifiers, never formatted
into SQL text, so a hostile name cannot change the statement.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, LiteralString, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from balance_sync import __version__, retry
from balance_sync.errors import LockLost, PostgresUnavailable, SchemaMissing
from balance_sync.settings import Settings, TableName, mask_url
from balance_sync.validation import InvalidRecord, ValidRecord

T = TypeVar("T")
Connection = psycopg.Connection[TupleRow]

SCHEMA = "balsync"
CONNECT_OPTIONS: dict[str, Any] = {
    "application_name": "balsync",
    "connect_timeout": 10,
    # A blackholed connection must fail instead of hanging the run forever.
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30000,
}
RAW_VALUE_LIMIT = 200
UNKNOWN_ID = "unknown id: no such row, and the table takes no inserts"

_BOOKKEEPING: list[LiteralString] = [
    "CREATE SCHEMA IF NOT EXISTS balsync",
    """CREATE TABLE IF NOT EXISTS balsync.sync_runs (
        id bigserial PRIMARY KEY,
        target_table text NOT NULL,
        key_prefix text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        finished_at timestamptz,
        status text NOT NULL DEFAULT 'running'
            CHECK (status IN ('running', 'success', 'partial', 'failed')),
        processed bigint NOT NULL DEFAULT 0,
        inserted bigint NOT NULL DEFAULT 0,
        updated bigint NOT NULL DEFAULT 0,
        unchanged bigint NOT NULL DEFAULT 0,
        skipped bigint NOT NULL DEFAULT 0,
        invalid bigint NOT NULL DEFAULT 0,
        duration_s double precision,
        error text,
        host text NOT NULL,
        pid integer NOT NULL,
        version text NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS sync_runs_target_started
        ON balsync.sync_runs (target_table, started_at DESC)""",
    """CREATE TABLE IF NOT EXISTS balsync.skipped_records (
        id bigserial PRIMARY KEY,
        run_id bigint NOT NULL REFERENCES balsync.sync_runs (id) ON DELETE CASCADE,
        key text NOT NULL,
        raw_value text,
        reason text NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now()
    )""",
    "CREATE INDEX IF NOT EXISTS skipped_records_run ON balsync.skipped_records (run_id)",
    # One row per committed batch, written in the batch's own transaction: a batch whose
    # commit was lost in transit is recognised on retry and never applied twice.
    """CREATE TABLE IF NOT EXISTS balsync.run_batches (
        run_id bigint NOT NULL REFERENCES balsync.sync_runs (id) ON DELETE CASCADE,
        batch_no integer NOT NULL,
        inserted integer NOT NULL,
        updated integer NOT NULL,
        unknown integer NOT NULL,
        PRIMARY KEY (run_id, batch_no)
    )""",
]


def lock_key(table: TableName) -> int:
    """The advisory lock key of a target table: stable across hosts and versions."""
    digest = hashlib.blake2b(f"balsync:{table}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _lock_parts(key: int) -> tuple[int, int]:
    # pg_locks shows a bigint advisory key as classid (high half) and objid (low half).
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF


def text_of(data: bytes) -> str:
    """Bytes from Redis as text that PostgreSQL accepts (no NUL, invalid UTF-8 escaped)."""
    return data.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


@dataclass(frozen=True)
class TargetTable:
    """What balsync learned about the target table, and so which statements it can use."""

    table: TableName
    id_column: str
    balance_column: str
    has_updated_at: bool
    can_insert: bool

    @property
    def ident(self) -> sql.Identifier:
        """The table as a quoted, possibly schema-qualified identifier."""
        return _ident(self.table)


@dataclass(frozen=True)
class BatchCounts:
    """What PostgreSQL reported for one batch."""

    inserted: int
    updated: int
    unknown_ids: list[int]


class Database:
    """A PostgreSQL connection with balsync's retry budget and its own reconnects."""

    def __init__(self, url: str, retry_timeout: float) -> None:
        self.url = url
        self.retry_timeout = retry_timeout
        self._conn: Connection | None = None

    # -- connection -------------------------------------------------------------------

    def connection(self) -> Connection:
        """The open connection, opened (again) if needed; callers run under `call`."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = psycopg.connect(self.url, autocommit=True, **CONNECT_OPTIONS)
        return self._conn

    def close(self) -> None:
        """Close the connection; a session-level advisory lock goes with it."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def backend_pid(self) -> int:
        """The server process of the current connection."""
        return self.connection().info.backend_pid

    def call(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn` on the connection under the retry policy, reconnecting between tries.

        The connection is in autocommit mode; `fn` wraps its writes in `conn.transaction()`,
        so a failed attempt leaves nothing behind and is safe to run again from the start.
        """

        def attempt() -> T:
            return fn(self.connection())

        try:
            return retry.call(
                "PostgreSQL", self.retry_timeout, retry.is_transient_postgres, attempt
            )
        except psycopg.Error as exc:
            if retry.is_transient_postgres(exc) or exc.sqlstate in ("28P01", "28000"):
                raise PostgresUnavailable(
                    f"PostgreSQL at {mask_url(self.url) or '(libpq defaults)'} is unavailable"
                    f" after {self.retry_timeout:g}s of retries: {_first_line(exc)}",
                    "check that the server runs, and the URL, credentials and sslmode",
                ) from exc
            raise

    # -- schema -----------------------------------------------------------------------

    def init_db(self, settings: Settings) -> list[str]:
        """Create balsync's schema and, for the default target, the table; idempotent."""

        def run(conn: Connection) -> list[str]:
            created: list[str] = []
            with conn.transaction():
                # Two init-db at once would race on the catalog; serialise them.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(TableName(SCHEMA)),))
                if not _relation_exists(conn, TableName("sync_runs", SCHEMA)):
                    created.append(f"{SCHEMA} schema")
                for statement in _BOOKKEEPING:
                    conn.execute(statement)
                if settings.is_default_table and not _relation_exists(conn, settings.table):
                    if settings.table.schema:
                        conn.execute(
                            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                                sql.Identifier(settings.table.schema)
                            )
                        )
                    conn.execute(
                        sql.SQL(
                            """CREATE TABLE IF NOT EXISTS {} (
                                telegram_id bigint PRIMARY KEY CHECK (telegram_id > 0),
                                balance numeric(20,2) NOT NULL,
                                updated_at timestamptz NOT NULL DEFAULT now()
                            )"""
                        ).format(_ident(settings.table))
                    )
                    created.append(f"table {settings.table}")
            return created

        return self.call(run)

    def schema_present(self) -> bool:
        """True when `init-db` has created balsync's own tables."""
        return self.call(lambda conn: _relation_exists(conn, TableName("run_batches", SCHEMA)))

    def require_schema(self) -> None:
        """Fail with a clear message when `init-db` has not been run."""
        if not self.schema_present():
            raise SchemaMissing(
                "balsync's schema is missing in this database", "run `balsync init-db` first"
            )

    def describe_target(self, settings: Settings) -> TargetTable:
        """Inspect the target table: its columns, and whether new ids can be inserted."""

        def run(conn: Connection) -> TargetTable:
            name = _ident(settings.table).as_string(conn)
            rows = conn.execute(
                """SELECT a.attname, a.attnotnull AND NOT a.atthasdef
                          AND a.attidentity = '' AND a.attgenerated = ''
                   FROM pg_attribute a
                   WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped""",
                (name,),
            ).fetchall()
            if not rows:
                raise SchemaMissing(
                    f"table {settings.table} does not exist",
                    "run `balsync init-db` for the default table, or check --table",
                )
            columns: dict[str, bool] = dict(rows)
            for column in (settings.id_column, settings.balance_column):
                if column not in columns:
                    raise SchemaMissing(
                        f"table {settings.table} has no column {column!r}",
                        "check --id-column and --balance-column",
                    )
            unique = conn.execute(
                """SELECT EXISTS (
                       SELECT 1 FROM pg_index i JOIN pg_attribute a
                         ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                       WHERE i.indrelid = to_regclass(%s) AND i.indisunique
                         AND i.indnkeyatts = 1 AND i.indpred IS NULL AND i.indexprs IS NULL
                         AND a.attname = %s)""",
                (name, settings.id_column),
            ).fetchone()
            others_required = any(
                required
                for column, required in columns.items()
                if column not in (settings.id_column, settings.balance_column, "updated_at")
            )
            return TargetTable(
                table=settings.table,
                id_column=settings.id_column,
                balance_column=settings.balance_column,
                has_updated_at="updated_at" in columns,
                # Inserting needs a unique id (ON CONFLICT) and no other mandatory column.
                can_insert=bool(unique and unique[0]) and not others_required,
            )

        return self.call(run)

    # -- the per-table lock -------------------------------------------------------------

    def try_lock(self, table: TableName, wait: float) -> bool:
        """Take the table's session-level advisory lock, waiting up to `wait` seconds."""

        def run(conn: Connection) -> bool:
            key = lock_key(table)
            if wait <= 0:
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
                return bool(row and row[0])
            conn.execute(
                sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{int(wait * 1000)}ms"))
            )
            try:
                conn.execute("SELECT pg_advisory_lock(%s)", (key,))
                return True
            except psycopg.errors.LockNotAvailable:
                return False
            finally:
                conn.execute("RESET lock_timeout")

        return self.call(run)

    def unlock(self, table: TableName) -> None:
        """Release the table's advisory lock (closing the connection would too)."""
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            self._conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key(table),))

    # -- run records --------------------------------------------------------------------

    def start_run(self, settings: Settings) -> int:
        """Record a run that is starting; runs left 'running' by a killed process end as failed."""

        def run(conn: Connection) -> int:
            with conn.transaction():
                conn.execute(
                    """UPDATE balsync.sync_runs
                       SET status = 'failed', finished_at = now(),
                           error = 'abandoned: the process ended without finishing'
                       WHERE target_table = %s AND status = 'running'""",
                    (str(settings.table),),
                )
                row = conn.execute(
                    """INSERT INTO balsync.sync_runs (target_table, key_prefix, host, pid, version)
                       VALUES (%s, %s, %s, %s, %s) RETURNING id""",
                    (
                        str(settings.table),
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

        self.call(run)

    def last_success_age(self, table: TableName) -> float | None:
        """Seconds since the last run that finished (success or partial), or None."""
        row = self.call(
            lambda conn: conn.execute(
                """SELECT extract(epoch FROM now() - max(finished_at))::float8
                   FROM balsync.sync_runs
                   WHERE target_table = %s AND status IN ('success', 'partial')""",
                (str(table),),
            ).fetchone()
        )
        return None if row is None or row[0] is None else float(row[0])

    # -- writing balances ---------------------------------------------------------------

    def apply_batch(
        self,
        target: TargetTable,
        records: Sequence[ValidRecord],
        invalid: Sequence[InvalidRecord],
        *,
        run_id: int | None,
        batch_no: int,
        lock: RunLock | None,
        key_prefix: str = "",
        keep_skipped: int = 0,
    ) -> BatchCounts:
        """Write one batch in one transaction: COPY into staging, then a set-based merge.

        Existing ids are updated only where the balance differs; new ids are inserted when
        the table allows it and reported as unknown otherwise. With `run_id` None (a dry
        run) the transaction only counts and is rolled back. Skipped records of the batch
        are stored in the same transaction.
        """
        payload = b"".join(b"%s\t%s\n" % record for record in records)
        dry_run = run_id is None

        def run(conn: Connection) -> BatchCounts:
            with conn.transaction(force_rollback=dry_run):
                if lock is not None:
                    _check_lock(conn, target.table, lock.holder_pid())
                conn.execute(
                    """CREATE TEMP TABLE IF NOT EXISTS balsync_stage (
                           id bigint NOT NULL, balance numeric(20,2) NOT NULL
                       ) ON COMMIT DELETE ROWS"""
                )
                with conn.cursor().copy(
                    "COPY pg_temp.balsync_stage (id, balance) FROM STDIN"
                ) as copy:
                    copy.write(payload)
                if run_id is None:
                    return _dry_counts(conn, target)
                done = conn.execute(
                    """SELECT inserted, updated, unknown FROM balsync.run_batches
                       WHERE run_id = %s AND batch_no = %s""",
                    (run_id, batch_no),
                ).fetchone()
                if done is not None:
                    # An earlier attempt committed but its answer was lost in transit.
                    unknown = _unknown_ids(conn, target) if done[2] else []
                    return BatchCounts(done[0], done[1], unknown)
                counts = _merge(conn, target)
                conn.execute(
                    """INSERT INTO balsync.run_batches
                           (run_id, batch_no, inserted, updated, unknown)
                       VALUES (%s, %s, %s, %s, %s)""",
                    (run_id, batch_no, counts.inserted, counts.updated, len(counts.unknown_ids)),
                )
                skipped = list(invalid[:keep_skipped])
                prefix = key_prefix.encode()
                skipped += [
                    InvalidRecord(prefix + b"%d" % telegram_id, None, UNKNOWN_ID)
                    for telegram_id in counts.unknown_ids[: keep_skipped - len(skipped)]
                ]
                if skipped:
                    _store_skipped(conn, run_id, skipped)
                return counts

        return self.call(run)


class RunLock:
    """The per-table advisory lock, held by a connection of its own for the whole run.

    A session lock dies with its connection. After a reconnect the lock is taken again
    without waiting; if another run got it meanwhile, this run stops writing.
    """

    def __init__(self, db: Database, table: TableName) -> None:
        self.db = db
        self.table = table
        self._pid: int | None = None

    def acquire(self, wait: float) -> bool:
        """Take the lock, waiting up to `wait` seconds; False if another run holds it."""
        if self.db.try_lock(self.table, wait):
            self._pid = self.db.backend_pid
            return True
        return False

    def holder_pid(self) -> int:
        """The server process that holds the lock for this run, re-taking it if needed."""
        pid = self.db.call(lambda conn: (conn.execute("SELECT 1"), conn.info.backend_pid)[1])
        if pid != self._pid:
            if not self.db.try_lock(self.table, 0):
                raise LockLost(
                    f"this run lost the advisory lock on {self.table} and another run took it",
                    "the other run finishes the work; nothing needs doing",
                )
            self._pid = pid
        return pid

    def release(self) -> None:
        """Let the next run in."""
        # If the connection is gone, the lock went with it.
        with contextlib.suppress(psycopg.Error):
            self.db.unlock(self.table)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _ident(table: TableName) -> sql.Identifier:
    return sql.Identifier(table.schema, table.name) if table.schema else sql.Identifier(table.name)


def _relation_exists(conn: Connection, table: TableName) -> bool:
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (_ident(table).as_string(conn),)
    ).fetchone()
    return bool(row and row[0])


def _check_lock(conn: Connection, table: TableName, holder_pid: int) -> None:
    classid, objid = _lock_parts(lock_key(table))
    row = conn.execute(
        """SELECT EXISTS (SELECT 1 FROM pg_locks
               WHERE locktype = 'advisory' AND classid = %s AND objid = %s AND objsubid = 1
                 AND pid = %s AND granted AND database = (
                     SELECT oid FROM pg_database WHERE datname = current_database()))""",
        (classid, objid, holder_pid),
    ).fetchone()
    if not (row and row[0]):
        raise LockLost(
            f"this run lost the advisory lock on {table}",
            "another run may be writing; the next run converges",
        )


def _merge(conn: Connection, target: TargetTable) -> BatchCounts:
    t, ident = sql.Identifier("t"), target.ident
    id_col, bal_col = sql.Identifier(target.id_column), sql.Identifier(target.balance_column)
    touch = sql.SQL(", updated_at = now()") if target.has_updated_at else sql.SQL("")
    updated = conn.execute(
        sql.SQL(
            """UPDATE {table} AS t SET {bal} = s.balance{touch}
               FROM pg_temp.balsync_stage s
               WHERE {t}.{id} = s.id AND {t}.{bal} IS DISTINCT FROM s.balance"""
        ).format(table=ident, bal=bal_col, touch=touch, t=t, id=id_col)
    ).rowcount
    if not target.can_insert:
        return BatchCounts(0, updated, _unknown_ids(conn, target))
    insert_cols = sql.SQL(", updated_at") if target.has_updated_at else sql.SQL("")
    insert_vals = sql.SQL(", now()") if target.has_updated_at else sql.SQL("")
    # Only ids absent a moment ago reach ON CONFLICT, so its per-row cost is paid only when
    # the application inserts the same id concurrently; then the newer Redis value wins.
    inserted = conn.execute(
        sql.SQL(
            """INSERT INTO {table} ({id}, {bal}{cols})
               SELECT s.id, s.balance{vals} FROM pg_temp.balsync_stage s
               WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE t.{id} = s.id)
               ON CONFLICT ({id}) DO UPDATE SET {bal} = EXCLUDED.{bal}{touch}
               WHERE {table}.{bal} IS DISTINCT FROM EXCLUDED.{bal}"""
        ).format(
            table=ident, id=id_col, bal=bal_col, cols=insert_cols, vals=insert_vals, touch=touch
        )
    ).rowcount
    return BatchCounts(inserted, updated, [])


def _unknown_ids(conn: Connection, target: TargetTable) -> list[int]:
    rows = conn.execute(
        sql.SQL(
            """SELECT s.id FROM pg_temp.balsync_stage s
               WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE t.{id} = s.id)"""
        ).format(table=target.ident, id=sql.Identifier(target.id_column))
    ).fetchall()
    return [int(r[0]) for r in rows]


def _dry_counts(conn: Connection, target: TargetTable) -> BatchCounts:
    row = conn.execute(
        sql.SQL(
            """SELECT count(*) FILTER (WHERE t.{id} IS NOT NULL
                                        AND t.{bal} IS DISTINCT FROM s.balance)
               FROM pg_temp.balsync_stage s LEFT JOIN {table} t ON t.{id} = s.id"""
        ).format(
            table=target.ident,
            id=sql.Identifier(target.id_column),
            bal=sql.Identifier(target.balance_column),
        )
    ).fetchone()
    updated = int(row[0]) if row else 0
    new_ids = _unknown_ids(conn, target)
    if target.can_insert:
        return BatchCounts(len(new_ids), updated, [])
    return BatchCounts(0, updated, new_ids)


def _store_skipped(conn: Connection, run_id: int, records: Sequence[InvalidRecord]) -> None:
    with conn.cursor().copy(
        "COPY balsync.skipped_records (run_id, key, raw_value, reason) FROM STDIN"
    ) as copy:
        for record in records:
            raw = None if record.raw is None else text_of(record.raw[:RAW_VALUE_LIMIT])
            copy.write_row((run_id, text_of(record.key), raw, record.reason))
