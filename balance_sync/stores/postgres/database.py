"""Every SQL statement balsync runs lives here.

Table and column names are always composed with psycopg.sql identifiers, never formatted
into SQL text, so a hostile name cannot change the statement.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, LiteralString, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow, class_row

from balance_sync import __version__, retry
from balance_sync.errors import (
    BalanceInvalid,
    BalsyncError,
    ConfigError,
    LockLost,
    PostgresUnavailable,
    SchemaMissing,
)
from balance_sync.settings import ColumnUnit, Settings, TableName, mask_url
from balance_sync.validation import MAX_INTEGER_DIGITS, InvalidRecord, ValidRecord, redis_value

T = TypeVar("T")
log = logging.getLogger(__name__)
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
# Server-side limits for balsync's own sessions. Without them a run whose host died keeps
# its session, and the table's advisory lock, until the server's kernel gives up on the
# TCP connection (about two hours by default), and every run meanwhile skips with exit 0.
# Keepalives end a dead client's session within about a minute; the idle limits end one
# that a hung process, or a pooler's still-open server connection, keeps alive.
SESSION_KEEPALIVES: dict[str, str] = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "60000",  # ms: data sent to a dead client is not retransmitted for hours
}
# A healthy run's lock connection is idle between batches, and a batch waits at most a few
# retry budgets (Redis reads, a writer's retried merge): the limit is far above that.
MIN_IDLE_SESSION_S = 900.0
# balsync's transactions wait on Redis only between statements (the restart guard's check,
# conflict resolution), each under the retry budget.
MIN_IDLE_IN_TRANSACTION_S = 300.0
RAW_VALUE_LIMIT = 200
# The least time one attempt (a statement, a batch's transaction) may go unanswered; the
# retry budget raises it. Far above a healthy batch merge, short enough that a silent
# server becomes exit 4 instead of a hung cron job.
MIN_ATTEMPT_DEADLINE = 30.0
LOCK_POLL_S = 0.5  # between tries to take a table's lock while --wait lasts
PROBE_ROUNDS = 32  # a second connection's tries to reach the lock's session: a pool's length
START_CHECKS = 5  # transactions that must find the lock's own session before a run writes
SHARED_UNLOCK_TRIES = 20  # transactions that look for the lock's session in a pool to free it
_LOGIN_REFUSED = ("28P01", "28000")  # a password or pg_hba refused: exit 4, never retried
UNKNOWN_ID = "unknown id: no such row, and the table takes no inserts"
# How a row of balsync.written is replaced: its last written value, whoever wrote it first.
_REMEMBER: LiteralString = (
    "ON CONFLICT (target_table, telegram_id) DO UPDATE SET balance = EXCLUDED.balance,"
    " cleared = false"
)

# sync_runs.target_table as a regclass: `name` or `schema.name`, each part as written.
_QUOTED_RUN_TABLE: LiteralString = """CASE WHEN strpos(r.target_table, '.') > 0
    THEN quote_ident(split_part(r.target_table, '.', 1)) || '.'
         || quote_ident(split_part(r.target_table, '.', 2))
    ELSE quote_ident(r.target_table) END"""

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
        conflicts integer NOT NULL DEFAULT 0,
        PRIMARY KEY (run_id, batch_no)
    )""",
    # The last balance balsync wrote for each id: a row that differs from it was changed
    # behind balsync's back (an admin correction, the application's fallback path).
    """CREATE TABLE IF NOT EXISTS balsync.written (
        target_table text NOT NULL,
        telegram_id bigint NOT NULL,
        balance numeric(20,2) NOT NULL,
        PRIMARY KEY (target_table, telegram_id)
    )""",
    """CREATE TABLE IF NOT EXISTS balsync.conflicts (
        id bigserial PRIMARY KEY,
        run_id bigint NOT NULL REFERENCES balsync.sync_runs (id) ON DELETE CASCADE,
        telegram_id bigint NOT NULL,
        db_value numeric(20,2),
        redis_value numeric(20,2) NOT NULL,
        last_written numeric(20,2),
        kind text NOT NULL CHECK (kind IN ('changed_in_db', 'redis_restarted')),
        resolution text NOT NULL CHECK (resolution IN ('kept', 'redis', 'db')),
        recorded_at timestamptz NOT NULL DEFAULT now()
    )""",
    "CREATE INDEX IF NOT EXISTS conflicts_run ON balsync.conflicts (run_id)",
    # The Redis server (INFO run_id) a run read from: a new one means Redis restarted.
    "ALTER TABLE balsync.sync_runs ADD COLUMN IF NOT EXISTS redis_run_id text",
    "ALTER TABLE balsync.run_batches ADD COLUMN IF NOT EXISTS conflicts integer NOT NULL DEFAULT 0",
    # Room on every page for a new version of each row: a sync that changes a balance
    # updates its memory on the same page, without touching the index (measured: a third
    # faster when every value changes). Pages written before this setting keep theirs.
    "ALTER TABLE balsync.written SET (fillfactor = 50)",
    # Keys clear-cache deleted on purpose: after a Redis restart their absence is no loss.
    "ALTER TABLE balsync.written ADD COLUMN IF NOT EXISTS cleared boolean NOT NULL DEFAULT false",
    # The Redis server balsync trusts for each target table, and why: a server with
    # another identity is trusted only on evidence that nothing persisted was lost.
    """CREATE TABLE IF NOT EXISTS balsync.redis_trust (
        target_table text PRIMARY KEY,
        redis_id text NOT NULL,
        reason text NOT NULL,
        trusted_at timestamptz NOT NULL DEFAULT now()
    )""",
    # Where the trusted server's replication history stood after the last batch balsync
    # committed from it: a replica promoted past that point holds everything balsync read.
    "ALTER TABLE balsync.redis_trust ADD COLUMN IF NOT EXISTS replid text",
    "ALTER TABLE balsync.redis_trust ADD COLUMN IF NOT EXISTS repl_offset bigint",
    # The token of the trust marker balsync left in Redis: gone after FLUSHALL, absent from
    # another database. NULL (trust migrated from an older version): to be verified.
    "ALTER TABLE balsync.redis_trust ADD COLUMN IF NOT EXISTS token text",
    "ALTER TABLE balsync.redis_trust ADD COLUMN IF NOT EXISTS flushes text",
    # The Redis server each run read (run_id/replid/flushes): --accept-redis-restart accepts
    # only the server the operator saw the last run hold rows for.
    "ALTER TABLE balsync.sync_runs ADD COLUMN IF NOT EXISTS redis_seen text",
    # The ids a run found agreeing while a restart was pending: the evidence, counted at
    # the end of the run against every id balsync remembers. Unlogged: it lives one run.
    """CREATE UNLOGGED TABLE IF NOT EXISTS balsync.restart_seen (
        run_id bigint NOT NULL REFERENCES balsync.sync_runs (id) ON DELETE CASCADE,
        telegram_id bigint NOT NULL,
        PRIMARY KEY (run_id, telegram_id)
    )""",
    # Bookkeeping is keyed by the table as the catalog names it (schema.name), so every
    # spelling of one table shares it; runs recorded under another spelling are renamed.
    """UPDATE balsync.sync_runs r SET target_table = n.nspname || '.' || c.relname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = to_regclass("""
    + _QUOTED_RUN_TABLE
    + """)
          AND r.target_table <> n.nspname || '.' || c.relname""",
    # Before redis_trust, the last finished run recorded the server it trusted.
    """INSERT INTO balsync.redis_trust (target_table, redis_id, reason)
       SELECT DISTINCT ON (target_table) target_table, redis_run_id, 'migrated'
       FROM balsync.sync_runs
       WHERE status IN ('success', 'partial') AND redis_run_id IS NOT NULL
       ORDER BY target_table, id DESC
       ON CONFLICT (target_table) DO NOTHING""",
    # Retention deletes the oldest skipped records and conflicts first, a batch at a time:
    # by these indexes a batch reads only what it deletes, and a prune with nothing to do
    # reads nothing.
    """CREATE INDEX IF NOT EXISTS skipped_records_recorded
        ON balsync.skipped_records (recorded_at)""",
    "CREATE INDEX IF NOT EXISTS conflicts_recorded ON balsync.conflicts (recorded_at)",
]
# The newest object of balsync's schema: where it is missing, init-db must run again.
_NEWEST = TableName("redis_trust", "balsync")


# balsync's advisory locks: (LOCK_CLASS, oid of the target table) per table, so every
# spelling of one table (`user_balances`, `public.user_balances`) shares one lock; pg_locks
# shows them as classid = LOCK_CLASS, objid = the table's oid, objsubid = 2.
LOCK_CLASS = 1650551923  # "bals" in ASCII
_INIT_LOCK = 1650551924  # serialises concurrent `init-db`
# The server session that holds a table's lock for a run carries the run's token in this
# setting. Through a pooler that hands one server session to many clients (PgBouncer's
# transaction pooling) a session lock stays on a backend that any client may get next, and
# pg_try_advisory_lock grants a lock its session already holds: the token tells the run
# whose session it is, and tells another client that the session is not its own.
_OWNER = "balsync.lock_owner"
_SESSION: LiteralString = "SELECT pg_backend_pid(), current_setting('balsync.lock_owner', true)"
_LOCK_ROW = """locktype = 'advisory' AND classid = %s AND objid = to_regclass(%s)::oid
               AND objsubid = 2 AND database = (
                   SELECT oid FROM pg_database WHERE datname = current_database())"""


def text_of(data: bytes) -> str:
    """Bytes from Redis as text that PostgreSQL accepts (no NUL, invalid UTF-8 escaped)."""
    return data.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


@dataclass(frozen=True)
class BalanceType:
    """The balance column's capacity and unit: what it can hold without rounding or overflow,
    and what one means there (a unit of money, or a cent)."""

    name: str  # as PostgreSQL spells it, for messages
    integer_digits: int | None  # None: as wide as balsync's own numeric(20,2)
    scale: int
    unit: ColumnUnit = "units"

    @property
    def exact(self) -> bool:
        """True when every valid amount goes into the column as it is, unchecked."""
        return self.unit == "units" and self.integer_digits is None and self.scale >= 2

    def to_column(self, amount: bytes) -> bytes | str:
        """`amount` (a valid plain decimal) as the column holds it, or why it cannot be held
        exactly (never rounded)."""
        value = redis_value(amount.decode(), "cents") if self.unit == "cents" else amount
        if isinstance(value, str):
            return value
        integer, _, fraction = value.lstrip(b"-").partition(b".")
        if len(fraction.rstrip(b"0")) > self.scale:
            return f"value needs more decimals than the column's {self.name} (never rounded)"
        # Staging is numeric(20,2): a column in cents holds at most 18 digits through it too.
        digits = MAX_INTEGER_DIGITS if self.integer_digits is None else self.integer_digits
        if len(integer.lstrip(b"0")) > digits:
            shown = f"{self.name} in cents" if self.unit == "cents" else self.name
            return f"value out of range for the column's {shown}"
        return value

    def amount(self, value: Decimal) -> Decimal:
        """A value of the column as an amount of money, exactly."""
        return value.scaleb(-2) if self.unit == "cents" else value

    def amount_text(self, text: str) -> str:
        """A value of the column as PostgreSQL's text, as an amount's text, exactly."""
        if self.unit == "units":
            return text
        try:
            return format(self.amount(Decimal(text)), "f")
        except InvalidOperation:
            return text  # no number: whoever reads it refuses it as it stands


_INTEGER_DIGITS = {"int2": 4, "int4": 9, "int8": 18}  # digits that always fit


def _balance_type(
    settings: Settings, typname: str, precision: int | None, scale: int | None, spelled: str
) -> BalanceType:
    if typname in _INTEGER_DIGITS:
        digits, places = _INTEGER_DIGITS[typname], 0
    elif typname == "numeric":
        if precision is None or scale is None:  # unconstrained
            digits, places = None, 2
        else:
            digits, places = (None if precision - scale >= 18 else precision - scale), scale
    else:
        raise SchemaMissing(
            f"column {settings.balance_column!r} of {settings.table} is {spelled}, which cannot "
            "hold money exactly",
            "use numeric(20,2) (or another numeric, or an integer type with --column-unit)",
        )
    if places == 0 and settings.column_unit is None:
        # 150000 there is 150000.00 in units or 1500.00 in cents; a guess changes money.
        raise ConfigError(
            f"column {settings.balance_column!r} of {settings.table} is {spelled}, which holds "
            "whole numbers: balsync cannot tell whole units of money from cents",
            "state it with --column-unit units or --column-unit cents (BALSYNC_COLUMN_UNIT)",
        )
    return BalanceType(spelled, digits, places, settings.column_unit or "units")


@dataclass(frozen=True)
class TargetTable:
    """What balsync learned about the target table, and so which statements it can use."""

    table: TableName
    id_column: str
    balance_column: str
    has_updated_at: bool
    can_insert: bool
    balance_type: BalanceType = BalanceType("numeric(20,2)", None, 2)
    has_ctid: bool = True  # a table; a view has none, and rows are found by id instead

    @property
    def ident(self) -> sql.Identifier:
        """The table as a quoted, possibly schema-qualified identifier."""
        return _ident(self.table)


ConflictKind = Literal["changed_in_db", "redis_restarted"]
OnConflict = Literal["skip", "redis", "db"]
Resolution = Literal["kept", "redis", "db"]


@dataclass(frozen=True)
class Conflict:
    """A row balsync did not simply overwrite, and why."""

    telegram_id: int
    db_value: Decimal
    redis_value: Decimal
    last_written: Decimal | None
    kind: ConflictKind
    resolution: Resolution


@dataclass(frozen=True)
class Trust:
    """The Redis server trusted for a table: its run_id and, where it has one, the point of
    its replication history up to which balsync has read and committed."""

    redis_id: str
    replid: str | None = None
    repl_offset: int | None = None
    token: str | None = None  # the trust marker's value; None: migrated, unverified
    flushes: str | None = None  # the server's FLUSHALL/FLUSHDB count when it was trusted


@dataclass(frozen=True)
class MergePolicy:
    """How a batch treats rows that differ from what balsync last wrote."""

    on_conflict: OnConflict = "skip"
    hold_updates: bool = False  # Redis restarted: insert new ids, overwrite nothing
    # The ids whose conflicts --on-conflict resolves (--ids); None: every id.
    resolve_ids: frozenset[int] | None = None
    # The table was empty when the run began (a first sync) and takes inserts: a batch
    # inserts its rows straight from staging; only ids that turn out to exist are classified.
    insert_first: bool = False

    def resolution(self, telegram_id: int, kind: ConflictKind) -> Resolution:
        """What happens to a conflicting row: kept, or resolved for Redis or the database.

        A row held after a Redis restart is resolved only in PostgreSQL's favour here:
        letting Redis win is trusting the new server, which --accept-redis-restart decides.
        """
        chosen = self.resolve_ids is None or telegram_id in self.resolve_ids
        if not chosen or self.on_conflict == "skip":
            return "kept"
        if kind == "redis_restarted" and self.on_conflict != "db":
            return "kept"
        return self.on_conflict


@dataclass(frozen=True)
class BatchCounts:
    """What PostgreSQL reported for one batch."""

    inserted: int
    updated: int
    unknown_ids: list[int]
    conflicts: list[Conflict] = field(default_factory=list)

    @property
    def kept(self) -> int:
        """Rows left as they were because of a conflict: skipped records of the run."""
        return sum(1 for c in self.conflicts if c.resolution == "kept")


class Database:
    """A PostgreSQL connection with balsync's retry budget and its own reconnects."""

    def __init__(self, url: str, retry_timeout: float) -> None:
        self.url = url
        self.retry_timeout = retry_timeout
        self.deadline = max(MIN_ATTEMPT_DEADLINE, retry_timeout)
        self._conn: Connection | None = None
        self._keys: dict[TableName, str] = {}
        # Connections opened so far: a server session that changes while this count does
        # not was changed by a pooler, not by a reconnect.
        self.connects = 0

    # -- connection -------------------------------------------------------------------

    def connection(self) -> Connection:
        """The open connection, opened (again) if needed; callers run under `call`."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            conn = psycopg.connect(self.url, autocommit=True, **CONNECT_OPTIONS)
            try:
                self._limit_session(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            self.connects += 1
        return self._conn

    def session_settings(self) -> dict[str, str]:
        """The server settings each of balsync's sessions sets for itself, in their units
        (the timeouts in milliseconds), scaled to the retry budget."""
        return {
            **SESSION_KEEPALIVES,
            "idle_session_timeout": str(int(max(MIN_IDLE_SESSION_S, 10 * self.deadline) * 1000)),
            "idle_in_transaction_session_timeout": str(
                int(max(MIN_IDLE_IN_TRANSACTION_S, 4 * self.deadline) * 1000)
            ),
        }

    def _limit_session(self, conn: Connection) -> None:
        """Apply `session_settings` to a new session, so no server configuration is needed.

        set_config after connecting, not libpq's `options` startup parameter: PgBouncer
        refuses a startup parameter it does not know unless told to ignore it, while a
        statement passes any pooler. A setting the server lacks (idle_session_timeout
        before PostgreSQL 14) is left out; a server that refuses the rest is logged and
        used as it is: the limits shorten a dead run's hold, the sync is correct without.
        """
        settings = self.session_settings()
        try:
            with _watchdog(conn, self.deadline):
                conn.execute(
                    """SELECT set_config(v.name, v.setting, false)
                       FROM unnest(%s::text[], %s::text[]) AS v(name, setting)
                       WHERE v.name IN (SELECT name FROM pg_settings)""",
                    (list(settings), list(settings.values())),
                )
        except psycopg.Error as exc:
            if retry.is_transient_postgres(exc) or conn.broken:
                raise
            log.warning("PostgreSQL refused balsync's session limits: %s", _first_line(exc))

    def close(self) -> None:
        """Close the connection; a session-level advisory lock goes with it."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def backend_pid(self) -> int:
        """The server process of the current connection, as the server itself reports it.

        The pid a connection learns at startup (`conn.info.backend_pid`) is whatever its peer
        sent: behind PgBouncer that is the pooler's invention, which pg_locks never shows.
        """
        return self.call(lambda conn: _session(conn)[0])

    def call(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn` on the connection under the retry policy, reconnecting between tries.

        The connection is in autocommit mode; `fn` wraps its writes in `conn.transaction()`,
        so a failed attempt leaves nothing behind and is safe to run again from the start.
        """

        def attempt() -> T:
            conn = self.connection()
            with _watchdog(conn, self.deadline):
                return fn(conn)

        try:
            return retry.call(
                "PostgreSQL", self.retry_timeout, retry.is_transient_postgres, attempt
            )
        except psycopg.Error as exc:
            if retry.is_transient_postgres(exc) or exc.sqlstate in _LOGIN_REFUSED:
                raise PostgresUnavailable(
                    f"PostgreSQL at {mask_url(self.url) or '(libpq defaults)'} is unavailable"
                    f" after {self.retry_timeout:g}s of retries: {_first_line(exc)}",
                    "check that the server runs, and the URL, credentials and sslmode",
                ) from exc
            raise

    def key(self, table: TableName) -> str:
        """The name balsync's bookkeeping knows `table` by: schema.name as the catalog spells
        it, so `user_balances` and `public.user_balances` share runs, trust and memory.

        A table that does not exist (yet) keeps its spelling.
        """
        known = self._keys.get(table)
        if known is not None:
            return known
        row = self.call(
            lambda conn: conn.execute(
                """SELECT n.nspname || '.' || c.relname FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE c.oid = to_regclass(%s)""",
                (_ident(table).as_string(conn),),
            ).fetchone()
        )
        if row is None:
            return str(table)
        self._keys[table] = str(row[0])
        return self._keys[table]

    # -- schema -----------------------------------------------------------------------

    def init_db(self, settings: Settings) -> list[str]:
        """Create balsync's schema and, for the default target, the table; idempotent."""

        def run(conn: Connection) -> list[str]:
            created: list[str] = []
            with conn.transaction():
                # Two init-db at once would race on the catalog; serialise them.
                conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_INIT_LOCK,))
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

        try:
            return self.call(run)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise BalsyncError(
                f"init-db is not allowed for this user: {_first_line(exc)}",
                "run it once as the database owner; balsync's own role needs no DDL rights",
            ) from exc

    def schema_present(self) -> bool:
        """True when `init-db` has created balsync's own tables, in this version's form."""
        return self.call(lambda conn: _relation_exists(conn, _NEWEST))

    def require_schema(self) -> None:
        """Fail with a clear message when `init-db` has not been run (again, after an upgrade)."""
        if self.schema_present():
            return
        if self.call(lambda conn: _relation_exists(conn, TableName("sync_runs", SCHEMA))):
            raise SchemaMissing(
                "balsync's schema in this database is from an older version",
                "run `balsync init-db` once to upgrade it (idempotent, keeps every record)",
            )
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
            resolved = conn.execute(
                """SELECT n.nspname, c.relname, c.relkind IN ('r', 'p') FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE c.oid = to_regclass(%s)""",
                (name,),
            ).fetchone()
            assert resolved is not None
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
            kind = conn.execute(
                """SELECT t.typname,
                          information_schema._pg_numeric_precision(a.atttypid, a.atttypmod),
                          information_schema._pg_numeric_scale(a.atttypid, a.atttypmod),
                          format_type(a.atttypid, a.atttypmod)
                   FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                   WHERE a.attrelid = to_regclass(%s) AND a.attname = %s""",
                (name, settings.balance_column),
            ).fetchone()
            assert kind is not None
            return TargetTable(
                table=TableName(name=resolved[1], schema=resolved[0]),
                id_column=settings.id_column,
                balance_column=settings.balance_column,
                has_updated_at="updated_at" in columns,
                # Inserting needs a unique id (ON CONFLICT) and no other mandatory column.
                can_insert=bool(unique and unique[0]) and not others_required,
                balance_type=_balance_type(settings, *kind),
                has_ctid=bool(resolved[2]),
            )

        return self.call(run)

    # -- the per-table lock -------------------------------------------------------------

    def prove_own_session(self, table: TableName, owner: str) -> None:
        """Mark the connection's server session as `owner`'s and prove that it stays this
        connection's alone between transactions, as a session lock needs; else ConfigError.

        A direct connection and session pooling pass. Transaction pooling fails: the marked
        session goes back to the pool after each transaction, so a second connection's
        transactions reach it (at once where the pool reuses the server used last, within a
        pool's length where it takes them in turn), or this connection's next transaction,
        asked while the second one holds a session, reaches another one.
        """

        def mark(conn: Connection) -> int:
            with conn.transaction():
                pid, held_for = _session(conn)
                if held_for not in ("", owner):
                    raise _shared_sessions(table)
                conn.execute("SELECT set_config(%s, %s, false)", (_OWNER, owner))
            return pid

        pid = self.call(mark)
        probe = Database(self.url, self.retry_timeout)

        def look(conn: Connection) -> bool:
            with conn.transaction():  # keeps its server session while this one is asked again
                other_pid, other_owner = _session(conn)
                if other_pid == pid or other_owner == owner:
                    return False
                return self.call(_session) == (pid, owner)

        try:
            own = all(probe.call(look) for _ in range(PROBE_ROUNDS))
        finally:
            probe.close()
        if not own:
            raise _shared_sessions(table)

    def try_lock(
        self,
        table: TableName,
        wait: float,
        pause: Callable[[float], None] = time.sleep,
        owner: str = "",
    ) -> bool:
        """Take the table's session-level advisory lock, waiting up to `wait` seconds.

        The wait is a series of short tries, each a statement under the watchdog, with
        `pause` between them: one blocking call that outlasts the watchdog would be cut as
        a silent server, and a --wait longer than it would end as exit 4.
        """
        return self.take_lock(table, wait, pause, owner) is not None

    def take_lock(
        self,
        table: TableName,
        wait: float,
        pause: Callable[[float], None] = time.sleep,
        owner: str = "",
    ) -> int | None:
        """`try_lock` that returns the server pid holding the lock, None when not taken.

        The session is marked with `owner`; one marked by another owner already is a server
        session shared between clients, where a granted lock would be that owner's own:
        ConfigError.
        """

        def attempt(conn: Connection) -> int | None:
            with conn.transaction():  # one transaction: one server session, even pooled
                pid, held_for = _session(conn)
                if held_for not in ("", owner):
                    raise _shared_sessions(table)
                row = conn.execute(
                    "SELECT pg_try_advisory_lock(%s, to_regclass(%s)::oid::int4)",
                    (LOCK_CLASS, _ident(table).as_string(conn)),
                ).fetchone()
                if not (row and row[0]):
                    return None
                if owner:
                    conn.execute("SELECT set_config(%s, %s, false)", (_OWNER, owner))
                return pid

        give_up = time.monotonic() + wait
        while (pid := self.call(attempt)) is None:
            left = give_up - time.monotonic()
            if left <= 0:
                return None
            pause(min(LOCK_POLL_S, left))
        return pid

    def unlock(self, table: TableName, owner: str = "") -> bool:
        """Release the table's advisory lock (closing the connection would too), where the
        connection's server session is `owner`'s: a pooled session may be someone else's.
        False when this transaction reached another session (or none)."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return False
        # Trivial statements; the lock dies with the session anyway.
        with _watchdog(conn, 5.0), conn.transaction():
            if _session(conn)[1] != owner:
                return False
            conn.execute(
                """SELECT pg_advisory_unlock(%s, to_regclass(%s)::oid::int4),
                          set_config(%s, '', false)""",
                (LOCK_CLASS, _ident(table).as_string(conn), _OWNER),
            )
        return True

    # -- run records --------------------------------------------------------------------

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

    def is_empty(self, target: TargetTable) -> bool:
        """True when the target table has no row at all (before a first sync)."""
        row = self.call(
            lambda conn: conn.execute(
                sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(target.ident)
            ).fetchone()
        )
        return bool(row and row[0])

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
        policy: MergePolicy = MergePolicy(),
        key_prefix: str = "",
        reserve: Callable[[str, int], int] = lambda kind, wanted: 0,
        before_commit: Callable[[], Trust | None] | None = None,
        resolve_in_redis: Callable[[list[Conflict]], set[int]] | None = None,
    ) -> BatchCounts:
        """Write one batch in one transaction: COPY into staging, then a set-based merge.

        Existing ids are updated only where the balance differs and nobody else changed the
        row since balsync last wrote it (else: a conflict, handled by `policy`); new ids are
        inserted when the table allows it and reported as unknown otherwise. With `run_id`
        None (a dry run) the transaction only counts and is rolled back. Skipped records
        (invalid first, then unknown ids) and conflicts are stored in the same transaction,
        as many as `reserve("skipped"|"conflicts", wanted)` grants: a run's caps are shared by
        parallel writers. `before_commit` runs last inside the transaction: raising there
        (Redis changed under the run) commits nothing of the batch; the position it returns
        (how far the trusted server's history had come) is recorded with the batch.
        `resolve_in_redis` gives Redis the database's value for the conflicts resolved for
        it and says which keys it really set: only those are remembered; the others stay
        conflicts, kept.
        """
        payload = b"".join([b"\n".join(map(b"\t".join, records)), b"\n"]) if records else b""

        def run(conn: Connection) -> BatchCounts:
            with conn.transaction(force_rollback=run_id is None):
                if lock is not None:
                    _check_lock(conn, target.table, lock.holder_pid())
                _stage(conn, payload)
                if run_id is not None:
                    done = _batch_done(conn, target, run_id, batch_no)
                    if done is not None:
                        return done
                if policy.insert_first:
                    counts = _insert_first(conn, target, policy, len(records))
                else:
                    counts = _merge(conn, target, policy, dry_run=run_id is None)
                if run_id is None:
                    return counts
                if resolve_in_redis is not None:
                    counts = _resolved_for_db(conn, target.table, counts, resolve_in_redis)
                conn.execute(
                    """INSERT INTO balsync.run_batches
                           (run_id, batch_no, inserted, updated, unknown, conflicts)
                       VALUES (%s, %s, %s, %s, %s, %s)""",
                    (
                        run_id,
                        batch_no,
                        counts.inserted,
                        counts.updated,
                        len(counts.unknown_ids),
                        len(counts.conflicts),
                    ),
                )
                # Reserved only now that every count is known; a retried attempt reserves
                # again, so a retry can only lower what is kept, never exceed the cap.
                keep = reserve("skipped", len(invalid) + len(counts.unknown_ids))
                prefix = key_prefix.encode()
                skipped = list(invalid[:keep]) + [
                    InvalidRecord(prefix + b"%d" % telegram_id, None, UNKNOWN_ID)
                    for telegram_id in counts.unknown_ids[: max(0, keep - len(invalid))]
                ]
                if skipped:
                    _store_skipped(conn, run_id, skipped)
                if counts.conflicts:
                    room = reserve("conflicts", len(counts.conflicts))
                    _store_conflicts(conn, run_id, counts.conflicts[:room])
                if policy.hold_updates:
                    # Found in Redis with a valid value; a held row is counted as held too.
                    conn.execute(
                        """INSERT INTO balsync.restart_seen (run_id, telegram_id)
                           SELECT %s, s.id FROM pg_temp.balsync_stage s
                           ON CONFLICT DO NOTHING""",
                        (run_id,),
                    )
                if before_commit is not None:
                    _read_up_to(conn, target.table, before_commit())
                return counts

        return self.call(run)

    def remember(self, table: TableName, pairs: Sequence[tuple[int, str]]) -> None:
        """Record that Redis now holds these values, as if balsync had written them.

        `restore` calls it for the keys it put back: their next change in Redis is then an
        ordinary update, not a conflict with an outside write balsync never saw.
        """
        self.call(lambda conn: _remember(conn, table, pairs))

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

    # -- operator views: health, stats, status --------------------------------------------

    def ping(self) -> None:
        """One round trip to the server."""
        self.call(lambda conn: conn.execute("SELECT 1").fetchone())

    def server_version(self) -> str:
        """The server's version, as `SHOW server_version` gives it."""
        row = self.call(
            lambda conn: conn.execute("SELECT current_setting('server_version')").fetchone()
        )
        return str(row[0]) if row else ""

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

    def table_totals(self, target: TargetTable) -> tuple[int, Decimal]:
        """Rows of the target table and the exact sum of its balances, as an amount of money."""
        row = self.call(
            lambda conn: conn.execute(
                sql.SQL("SELECT count(*), coalesce(sum({bal}), 0) FROM {table}").format(
                    bal=sql.Identifier(target.balance_column), table=target.ident
                )
            ).fetchone()
        )
        assert row is not None
        # str() first: an application table may keep money in a float column.
        return int(row[0]), target.balance_type.amount(Decimal(str(row[1])))

    def lock_holder(self, table: TableName) -> LockHolder | None:
        """The backend that holds the advisory lock of `table` in this database, if any."""
        # pg_stat_activity shares no column name with _LOCK_ROW's, so they need no prefix.
        query: LiteralString = (
            """SELECT l.pid AS backend_pid, a.application_name,
                      host(a.client_addr) AS client_addr, a.backend_start,
                      a.state_change, a.state,
                      extract(epoch FROM now() - a.state_change)::float8 AS quiet_s
               FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE l.granted AND l."""
            + _LOCK_ROW
            + " LIMIT 1"
        )

        def run(conn: Connection) -> LockHolder | None:
            with conn.cursor(row_factory=class_row(LockHolder)) as cur:
                return cur.execute(query, (LOCK_CLASS, _ident(table).as_string(conn))).fetchone()

        return self.call(run)

    def _runs(self, query: LiteralString, params: tuple[object, ...]) -> list[RunRecord]:
        def run(conn: Connection) -> list[RunRecord]:
            with conn.cursor(row_factory=class_row(RunRecord)) as cur:
                return cur.execute(query, params).fetchall()

        return self.call(run)

    # -- clear-cache, restore, skipped ----------------------------------------------------

    def persisted_balances(
        self, target: TargetTable, ids: Sequence[int]
    ) -> dict[int, Decimal | None]:
        """The amount PostgreSQL holds for each of `ids` that has a row (in money, whatever
        the column's unit).

        None where the row holds no number (NULL, text that is none) or where two rows of an
        application table disagree: nothing there can vouch for a Redis value.
        """
        if not ids:
            return {}
        query = sql.SQL("SELECT {id}, {bal} FROM {table} WHERE {id} = ANY(%s)").format(
            id=sql.Identifier(target.id_column),
            bal=sql.Identifier(target.balance_column),
            table=target.ident,
        )
        rows = self.call(lambda conn: conn.execute(query, (list(ids),)).fetchall())
        found: dict[int, Decimal | None] = {}
        for telegram_id, balance in rows:
            value = _exact_decimal(balance)
            if value is not None:
                value = target.balance_type.amount(value)
            key = int(telegram_id)
            found[key] = value if found.get(key, value) == value else None
        return found

    def stream_balances(
        self, target: TargetTable, ids: Sequence[int] | None, batch_size: int
    ) -> Generator[list[tuple[int, str | None]], None, None]:
        """Each row's id and balance as PostgreSQL's text, in id order, `batch_size` at a time.

        The balance is the column's value, in its unit (`BalanceType.amount_text` gives the
        amount).

        A server-side (named) cursor streams the rows, so memory stays constant whatever the
        table's size. Ids below 1 can have no Redis key and are left out; with `ids`, only
        those rows are read. When the connection breaks, the stream reopens after the last
        id it yielded, within the retry budget, so no row is yielded twice.

        Every round trip is bounded as in `call`: the stretch between two batches (a FETCH,
        and the BEGIN and DECLARE before the first one) is one attempt under the same
        deadline, so a silent server or a table locked by another session cannot hang the
        stream. Raises PostgresUnavailable once the budget is spent.
        """
        id_col = sql.Identifier(target.id_column)
        only = sql.SQL(" AND {} = ANY(%s)").format(id_col) if ids is not None else sql.SQL("")
        query = sql.SQL(
            "SELECT {id}, {bal}::text FROM {table} WHERE {id} > %s{only} ORDER BY {id}"
        ).format(
            id=id_col, bal=sql.Identifier(target.balance_column), table=target.ident, only=only
        )
        after = 0
        failing_since: float | None = None  # start of the first failed attempt since a fetch
        while True:
            # Each attempt is one stretch of round trips between two yields (BEGIN, DECLARE and
            # the first FETCH; then each FETCH; the last with CLOSE and COMMIT), under
            # Database.call's deadline. The watchdog sleeps while the consumer works: an
            # attempt is PostgreSQL's time, not the time Redis takes to write a batch.
            started = time.monotonic()
            params: tuple[object, ...] = (after,) if ids is None else (after, list(ids))
            guard: _Watchdog | None = None
            try:
                conn = self.connection()
                guard = _Watchdog(conn, self.deadline)
                guard.arm()
                with conn.transaction(), conn.cursor(name="balsync_stream") as cursor:
                    cursor.execute(query, params)
                    while rows := cursor.fetchmany(batch_size):
                        failing_since = None
                        after = int(rows[-1][0])
                        guard.disarm()
                        try:
                            yield [(int(i), None if b is None else str(b)) for i, b in rows]
                        finally:
                            # The next FETCH, or the CLOSE and ROLLBACK of a consumer that
                            # stops early, is the next attempt.
                            started = time.monotonic()
                            guard.arm()
                return
            except psycopg.Error as exc:
                if isinstance(exc.__context__, GeneratorExit):
                    # The consumer is closing the stream (often over a fault of its own, which
                    # must stay the error it reports): a read-only transaction that cannot be
                    # ended politely ends with its connection.
                    self.close()
                    return
                transient = retry.is_transient_postgres(exc)
                if not transient and exc.sqlstate not in _LOGIN_REFUSED:
                    raise
                # As in Database.call, the budget runs from the start of the first failed
                # attempt: an attempt cut at the deadline (never shorter than the budget) has
                # spent it, so a silent server or a locked table ends the run after one deadline.
                failing_since = started if failing_since is None else failing_since
                if not transient or time.monotonic() - failing_since > self.retry_timeout:
                    raise PostgresUnavailable(
                        f"PostgreSQL at {mask_url(self.url) or '(libpq defaults)'} is unavailable:"
                        f" the stream of {target.table} did not resume within"
                        f" {self.retry_timeout:g}s of retries: {_first_line(exc)}",
                        "rerunning is safe: a restore keeps the keys it already wrote",
                    ) from exc
                time.sleep(0.5)
            finally:
                if guard is not None:
                    guard.disarm()

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
class LockHolder:
    """The PostgreSQL backend holding a table's advisory lock; None where stats are hidden."""

    backend_pid: int
    application_name: str | None
    client_addr: str | None
    backend_start: datetime | None
    state_change: datetime | None
    state: str | None
    # Seconds since the session last started or ended a statement, by the server's clock:
    # a running sync's lock session touches the lock every batch.
    quiet_s: float | None = None


@dataclass(frozen=True)
class SkippedRecord:
    """One row of balsync.skipped_records; `raw_value` is None for a key of another type."""

    key: str
    raw_value: str | None
    reason: str
    recorded_at: datetime


def _exact_decimal(value: object) -> Decimal | None:
    """A balance as PostgreSQL returned it, as an exact Decimal, or None if it is no number."""
    if value is None or isinstance(value, Decimal):
        return value
    try:
        # str() first: an application table may keep money in a float or text column.
        return Decimal(str(value))
    except InvalidOperation:
        return None


class RunLock:
    """The per-table advisory lock, held by a connection of its own for the whole run.

    A session lock dies with its connection. After a reconnect the lock is taken again
    without waiting; if another run got it meanwhile, this run stops writing.
    """

    def __init__(self, db: Database, table: TableName) -> None:
        self.db = db
        self.table = table
        self._pid: int | None = None
        self._connects = 0  # the connections db had opened when the lock was (re)taken
        self._token = uuid.uuid4().hex  # marks the server session that holds the lock
        self._shared = False  # a pooler was seen handing this connection another session
        self._mutex = threading.Lock()  # writer threads share the lock's connection

    def acquire(self, wait: float, pause: Callable[[float], None] = time.sleep) -> bool:
        """Take the lock, waiting up to `wait` seconds (`pause` between tries); False if
        another run holds it. ConfigError, before the caller writes anything, where the
        server session does not stay this run's own (transaction pooling)."""
        try:
            self.db.prove_own_session(self.table, self._token)
            self._pid = self.db.take_lock(self.table, wait, pause, self._token)
            self._connects = self.db.connects
            if self._pid is None:
                return False
            # Each check is one more transaction that a transaction pool may hand to another
            # server session; among busy clients one of them does, long before a first write.
            for _ in range(START_CHECKS):
                self.holder_pid()
        except ConfigError:
            self._shared = True
            raise
        return True

    def holder_pid(self) -> int:
        """The server process that holds the lock for this run, re-taking it if needed.

        ConfigError when the server session changed under the same client connection: a
        pooler in transaction mode, where the lock cannot be held.
        """
        with self._mutex:
            pid, held_for = self.db.call(_session)
            if (pid, held_for) != (self._pid, self._token):
                if self.db.connects == self._connects:
                    raise _shared_sessions(self.table)
                # A reconnect: the lock went with the old session.
                self._pid = self.db.take_lock(self.table, 0, owner=self._token)
                self._connects = self.db.connects
                if self._pid is None:
                    raise LockLost(
                        f"this run lost the advisory lock on {self.table} and another run took it",
                        "the other run finishes the work; nothing needs doing",
                    )
                pid = self._pid
            return pid

    def release(self) -> None:
        """Let the next run in."""
        # If the connection is gone, the lock went with it. Through a transaction pool the
        # session holding it is one of several: a few more tries reach it most likely, and a
        # lock left behind keeps out runs, it never lets two in.
        with contextlib.suppress(psycopg.Error):
            for _ in range(SHARED_UNLOCK_TRIES if self._shared else 1):
                if self.db.unlock(self.table, self._token):
                    break


class _Watchdog:
    """Cuts a connection when one attempt outlasts `seconds`: armed for each attempt, disarmed
    between attempts.

    Keepalives and tcp_user_timeout notice a dead peer, not a live one that never answers
    (a hung server, a stuck pooler or load balancer, a lock that is never granted): there
    psycopg would wait forever. Shutting the socket down wakes it with an error that the
    retry policy handles.
    """

    def __init__(self, conn: Connection, seconds: float) -> None:
        self.conn = conn
        self.seconds = seconds
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        """Start the clock of an attempt (again)."""
        self.disarm()
        self._timer = threading.Timer(self.seconds, self._cut)
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        """Stop the clock: the attempt is over."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _cut(self) -> None:
        log.warning("PostgreSQL did not answer within %.0fs; dropping the connection", self.seconds)
        with contextlib.suppress(OSError, psycopg.Error):
            fd = os.dup(self.conn.pgconn.socket)
            with socket.socket(fileno=fd) as sock:
                sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def _watchdog(conn: Connection, seconds: float) -> Iterator[None]:
    """One attempt on `conn` under a `_Watchdog` of `seconds`."""
    guard = _Watchdog(conn, seconds)
    guard.arm()
    try:
        yield
    finally:
        guard.disarm()


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


def _session(conn: Connection) -> tuple[int, str]:
    """The server pid of this transaction and the lock owner its server session carries."""
    # Never prepared: a prepared statement lives in one server session, and this question
    # must reach whichever session a pooler hands over.
    row = conn.execute(_SESSION, prepare=False).fetchone()
    assert row is not None
    return int(row[0]), str(row[1] or "")


def _shared_sessions(table: TableName) -> ConfigError:
    return ConfigError(
        "PostgreSQL is reached through a pooler in transaction pooling (PgBouncer pool_mode ="
        " transaction), where server sessions pass between clients: the advisory lock on"
        f" {table} cannot be held for a run, so balsync writes nothing",
        "give balsync a direct or session-pooled URL (PgBouncer pool_mode = session)",
    )


def _check_lock(conn: Connection, table: TableName, holder_pid: int) -> None:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = %s AND granted AND " + _LOCK_ROW + ")",
        (holder_pid, LOCK_CLASS, _ident(table).as_string(conn)),
    ).fetchone()
    if not (row and row[0]):
        raise LockLost(
            f"this run lost the advisory lock on {table}",
            "another run may be writing; the next run converges",
        )


def _stage(conn: Connection, payload: bytes) -> None:
    # Temporary tables of this connection; ON COMMIT DELETE ROWS empties them per batch.
    # A batch is a few thousand ids: index lookups into the target and balsync.written cost
    # milliseconds, while a hash join reads the whole table, every batch (measured: 290 ms
    # against 27 ms per 10 000 ids at a million rows). Scans are ruled out too, not left to
    # statistics: a table analyzed while empty (a first sync) gets plans that scan it whole
    # for every row while it grows, and a prepared statement keeps such a plan.
    # Forcing plans inflates their cost past the JIT threshold, and compiling would cost
    # more than the few milliseconds the statements run.
    conn.execute(
        """SELECT set_config('enable_hashjoin', 'off', true),
                  set_config('enable_mergejoin', 'off', true),
                  set_config('enable_seqscan', 'off', true),
                  set_config('enable_bitmapscan', 'off', true),
                  set_config('jit', 'off', true)"""
    )
    conn.execute(
        """CREATE TEMP TABLE IF NOT EXISTS balsync_stage (
               id bigint NOT NULL, balance numeric(20,2) NOT NULL
           ) ON COMMIT DELETE ROWS"""
    )
    # `tid` and `wtid` locate the rows of the target and of balsync.written that the delta
    # was read from, so writing them back costs no second index lookup.
    conn.execute(
        """CREATE TEMP TABLE IF NOT EXISTS balsync_delta (
               id bigint NOT NULL, new numeric(20,2) NOT NULL, old numeric,
               present boolean NOT NULL, tid tid, written numeric(20,2), wtid tid
           ) ON COMMIT DELETE ROWS"""
    )
    with conn.cursor().copy("COPY pg_temp.balsync_stage (id, balance) FROM STDIN") as copy:
        copy.write(payload)


def _batch_done(
    conn: Connection, target: TargetTable, run_id: int, batch_no: int
) -> BatchCounts | None:
    """The counts of this batch if an earlier attempt committed it (its answer was lost)."""
    done = conn.execute(
        """SELECT inserted, updated, unknown FROM balsync.run_batches
           WHERE run_id = %s AND batch_no = %s""",
        (run_id, batch_no),
    ).fetchone()
    if done is None:
        return None
    conflicts = [
        Conflict(int(r[0]), r[1], r[2], r[3], r[4], r[5])
        for r in conn.execute(
            """SELECT c.telegram_id, c.db_value, c.redis_value, c.last_written, c.kind,
                      c.resolution
               FROM balsync.conflicts c JOIN pg_temp.balsync_stage s ON s.id = c.telegram_id
               WHERE c.run_id = %s""",
            (run_id,),
        )
    ]
    unknown = _unknown_ids(conn, target) if done[2] else []
    return BatchCounts(int(done[0]), int(done[1]), unknown, conflicts)


def _insert_first(
    conn: Connection, target: TargetTable, policy: MergePolicy, staged: int
) -> BatchCounts:
    """Insert the staged batch into a table that was empty when the run began, with memory.

    Skipping the classification saves about a sixth of a first sync. An id that exists now
    (the application inserted it meanwhile, or SCAN returned it twice) is left alone here
    and classified as usual afterwards.
    """
    columns, values = _touch_on_insert(target)
    inserted = conn.execute(
        sql.SQL(
            """WITH ins AS (
                   INSERT INTO {table} ({id}, {bal}{columns})
                   SELECT s.id, s.balance{values} FROM pg_temp.balsync_stage s
                   ON CONFLICT ({id}) DO NOTHING
                   RETURNING {id} AS id, {bal} AS balance
               )
               INSERT INTO balsync.written (target_table, telegram_id, balance)
               SELECT %s, id, balance FROM ins """
            + _REMEMBER
        ).format(columns=columns, values=values, **_names(target)),
        (str(target.table),),
    ).rowcount
    if inserted == staged:
        return BatchCounts(inserted, 0, [])
    rest = _merge(conn, target, policy, dry_run=False)
    return BatchCounts(inserted + rest.inserted, rest.updated, rest.unknown_ids, rest.conflicts)


def _names(target: TargetTable) -> dict[str, sql.Composable]:
    """The target table and its id and balance columns, as the merge statements name them."""
    return {
        "table": target.ident,
        "id": sql.Identifier(target.id_column),
        "bal": sql.Identifier(target.balance_column),
    }


def _touch_on_insert(target: TargetTable) -> tuple[sql.Composable, sql.Composable]:
    """The column list and values an INSERT adds for `updated_at`, if the table has one."""
    if target.has_updated_at:
        return sql.SQL(", updated_at"), sql.SQL(", now()")
    return sql.SQL(""), sql.SQL("")


def _merge(
    conn: Connection, target: TargetTable, policy: MergePolicy, *, dry_run: bool
) -> BatchCounts:
    """Classify the staged batch against the table and balsync's memory, then write.

    One pass over the batch finds the few rows that need anything (the delta): new ids,
    changed balances, and rows that agree with Redis but whose memory is missing or stale
    (an adopted table, a value someone else wrote), with what balsync last wrote for
    them. Everything after that touches only the delta.
    """
    names = _names(target)
    key = str(target.table)
    # Each lookup is a LATERAL subquery behind OFFSET 0, so it runs once per row and by
    # index whatever the statistics say: tables that were empty when last analyzed (a first
    # sync) otherwise get plans that scan them whole for every row, while they grow.
    delta = conn.execute(
        sql.SQL(
            """INSERT INTO pg_temp.balsync_delta
               SELECT d.id, d.new, d.old, d.present, d.tid, w.balance, w.ctid
               FROM (SELECT s.id, s.balance AS new, t.balance AS old, t.tid,
                            t.id IS NOT NULL AS present
                     FROM pg_temp.balsync_stage s LEFT JOIN LATERAL (
                         SELECT x.{id} AS id, x.{bal} AS balance, {tid} AS tid FROM {table} x
                         WHERE x.{id} = s.id OFFSET 0) t ON true
                     OFFSET 0) AS d
               LEFT JOIN LATERAL (
                   SELECT m.balance, m.ctid FROM balsync.written m
                   WHERE m.target_table = %s AND m.telegram_id = d.id OFFSET 0) w ON true
               WHERE d.old IS DISTINCT FROM d.new OR w.balance IS DISTINCT FROM d.new"""
        ).format(tid=sql.SQL("x.ctid" if target.has_ctid else "NULL::tid"), **names),
        (key,),
    ).rowcount
    if delta == 0:
        return BatchCounts(0, 0, [])
    conflicts = _conflicts(conn, policy)
    set_aside = [c.telegram_id for c in conflicts if c.resolution != "redis"]
    if set_aside:
        conn.execute("DELETE FROM pg_temp.balsync_delta WHERE id = ANY(%s)", (set_aside,))
    unknown: list[int] = []
    if not target.can_insert:
        unknown = [
            int(r[0])
            for r in conn.execute("SELECT id FROM pg_temp.balsync_delta WHERE NOT present")
        ]
        conn.execute("DELETE FROM pg_temp.balsync_delta WHERE NOT present")
    if dry_run:
        row = conn.execute(
            """SELECT count(*) FILTER (WHERE NOT present),
                      count(*) FILTER (WHERE present AND old IS DISTINCT FROM new)
               FROM pg_temp.balsync_delta"""
        ).fetchone()
        assert row is not None
        return BatchCounts(int(row[0]), int(row[1]), unknown, conflicts)
    touch = sql.SQL(", updated_at = now()") if target.has_updated_at else sql.SQL("")
    insert_touch = _touch_on_insert(target)
    # `t.bal IS NOT DISTINCT FROM d.old` is checked again under the row lock: a row someone
    # changes between our look and our write is left alone and found as a conflict by the
    # next run. An id the application inserts meanwhile is left alone too (DO NOTHING).
    inserting = (
        sql.SQL(
            """, ins AS (
                   INSERT INTO {table} ({id}, {bal}{cols})
                   SELECT d.id, d.new{vals} FROM pg_temp.balsync_delta d WHERE NOT d.present
                   ON CONFLICT ({id}) DO NOTHING
                   RETURNING {id} AS id, {bal} AS balance
               )"""
        ).format(cols=insert_touch[0], vals=insert_touch[1], **names)
        if target.can_insert
        else sql.SQL("")
    )
    # Rows are found again by their ctid, not a second index lookup (10-15 % of the merge
    # when every value changed). The id is checked too, as a slot freed by pruning may hold
    # another row by now; `IS TRUE` keeps the planner from turning that check back into an
    # index lookup. What balsync remembers is updated in place where it had a memory of the
    # row (the update stays on its page: balsync.written's fillfactor) and inserted where
    # it had none. A row that already agrees is remembered as it stands, unwritten.
    row = conn.execute(
        sql.SQL(
            """WITH upd AS (
                   UPDATE {table} AS t SET {bal} = d.new{touch}
                   FROM pg_temp.balsync_delta d
                   WHERE {found} AND d.present AND d.old IS DISTINCT FROM d.new
                     AND t.{bal} IS NOT DISTINCT FROM d.old
                   RETURNING t.{id} AS id, d.new AS balance, d.wtid
               ){inserting}, seen AS (
                   SELECT id, balance, wtid FROM upd
                   UNION ALL
                   SELECT id, new, wtid FROM pg_temp.balsync_delta
                   WHERE present AND old IS NOT DISTINCT FROM new
               ), remembered AS (
                   UPDATE balsync.written w SET balance = u.balance, cleared = false
                   FROM seen u
                   WHERE w.ctid = u.wtid AND w.target_table = %(key)s AND w.telegram_id = u.id
               ), written AS (
                   INSERT INTO balsync.written (target_table, telegram_id, balance)
                   SELECT %(key)s, id, balance FROM {written_rows} {remember}
               )
               SELECT (SELECT count(*) FROM upd), {inserted}"""
        ).format(
            touch=touch,
            inserting=inserting,
            found=(
                sql.SQL("t.ctid = d.tid AND (t.{} = d.id) IS TRUE")
                if target.has_ctid
                else sql.SQL("t.{} = d.id")
            ).format(sql.Identifier(target.id_column)),
            written_rows=sql.SQL(
                "(SELECT id, balance FROM seen WHERE wtid IS NULL"
                " UNION ALL SELECT id, balance FROM ins) AS w"
                if target.can_insert
                else "seen WHERE wtid IS NULL"
            ),
            inserted=sql.SQL("(SELECT count(*) FROM ins)" if target.can_insert else "0"),
            remember=sql.SQL(_REMEMBER),
            **names,
        ),
        {"key": key},
    ).fetchone()
    assert row is not None
    # A conflict resolved for the database is remembered only once Redis holds its value
    # (`Database.remember`, after the compare-and-set): never on the hope that it will.
    return BatchCounts(int(row[1]), int(row[0]), unknown, conflicts)


def _remember(
    conn: Connection, table: TableName, pairs: Sequence[tuple[int, Decimal | str]]
) -> None:
    """Record values as what balsync last wrote (or saw agree) for these ids."""
    if pairs:
        conn.execute(
            """INSERT INTO balsync.written (target_table, telegram_id, balance)
               SELECT %s, i, b FROM unnest(%s::bigint[], %s::numeric[]) AS u(i, b) """
            + _REMEMBER,
            (str(table), [i for i, _ in pairs], [str(b) for _, b in pairs]),
        )


def _read_up_to(conn: Connection, table: TableName, position: Trust | None) -> None:
    """Record, with the batch, that balsync read the trusted server up to this point."""
    if position is not None and position.replid:
        conn.execute(
            """UPDATE balsync.redis_trust SET repl_offset = greatest(repl_offset, %s)
               WHERE target_table = %s AND redis_id = %s AND replid = %s""",
            (position.repl_offset, str(table), position.redis_id, position.replid),
        )


def _resolved_for_db(
    conn: Connection,
    table: TableName,
    counts: BatchCounts,
    resolve_in_redis: Callable[[list[Conflict]], set[int]],
) -> BatchCounts:
    """Give Redis the database's value where the database won; remember only what was set.

    Inside the batch's transaction, which writes no target row for these conflicts: if it
    rolls back after Redis was set, Redis and PostgreSQL agree anyway.
    """
    wanted = [c for c in counts.conflicts if c.resolution == "db"]
    if not wanted:
        return counts
    done = resolve_in_redis(wanted)
    _remember(conn, table, [(c.telegram_id, c.db_value) for c in wanted if c.telegram_id in done])
    conflicts = [
        c if c.resolution != "db" or c.telegram_id in done else replace(c, resolution="kept")
        for c in counts.conflicts
    ]
    return replace(counts, conflicts=conflicts)


def _conflicts(conn: Connection, policy: MergePolicy) -> list[Conflict]:
    """Rows of the delta that differ and must not simply be overwritten."""
    rows = conn.execute(
        """SELECT id, old, new, written FROM pg_temp.balsync_delta
           WHERE present AND old IS DISTINCT FROM new
             AND ((written IS NOT NULL AND written IS DISTINCT FROM old) OR %s)""",
        (policy.hold_updates,),
    ).fetchall()
    # After a Redis restart Redis may be the stale side: nothing is overwritten.
    kind: ConflictKind = "redis_restarted" if policy.hold_updates else "changed_in_db"
    return [
        Conflict(int(i), old, new, written, kind, policy.resolution(int(i), kind))
        for i, old, new, written in rows
    ]


def _unknown_ids(conn: Connection, target: TargetTable) -> list[int]:
    rows = conn.execute(
        sql.SQL(
            """SELECT s.id FROM pg_temp.balsync_stage s
               WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE t.{id} = s.id)"""
        ).format(table=target.ident, id=sql.Identifier(target.id_column))
    ).fetchall()
    return [int(r[0]) for r in rows]


def _store_conflicts(conn: Connection, run_id: int, conflicts: Sequence[Conflict]) -> None:
    with conn.cursor().copy(
        """COPY balsync.conflicts
               (run_id, telegram_id, db_value, redis_value, last_written, kind, resolution)
           FROM STDIN"""
    ) as copy:
        for c in conflicts:
            copy.write_row(
                (
                    run_id,
                    c.telegram_id,
                    c.db_value,
                    c.redis_value,
                    c.last_written,
                    c.kind,
                    c.resolution,
                )
            )


def _store_skipped(conn: Connection, run_id: int, records: Sequence[InvalidRecord]) -> None:
    with conn.cursor().copy(
        "COPY balsync.skipped_records (run_id, key, raw_value, reason) FROM STDIN"
    ) as copy:
        for record in records:
            raw = None if record.raw is None else text_of(record.raw[:RAW_VALUE_LIMIT])
            copy.write_row((run_id, text_of(record.key), raw, record.reason))


# -- the application's read-through (balance_sync.writer) ---------------------------------


def balance_lookup(table: TableName, id_column: str, balance_column: str) -> sql.Composed:
    """One id's persisted balance as text: exact whatever the column's type, and every row,
    since an application table need not make the id unique."""
    return sql.SQL("SELECT {bal}::text FROM {table} WHERE {id} = %s").format(
        bal=sql.Identifier(balance_column), table=_ident(table), id=sql.Identifier(id_column)
    )


def looked_up_balance(telegram_id: int, rows: Sequence[tuple[str | None, ...]]) -> Decimal | None:
    """The balance `balance_lookup` found, or None where there is no row.

    Raises BalanceInvalid where the rows hold no number or disagree: nothing there can
    vouch for a balance, and 0 would invent one.
    """
    values = {_exact_decimal(row[0]) for row in rows}
    if not values:
        return None
    if len(values) > 1 or None in values:
        raise BalanceInvalid(
            f"PostgreSQL holds no single valid balance for {telegram_id} "
            f"({', '.join(sorted(str(row[0]) for row in rows))})",
            "correct the row; until then the balance cannot be read through",
        )
    (value,) = values
    assert value is not None
    return value


# -- retention: balsync's own records ----------------------------------------------------------

# The tables that hang off a run (ON DELETE CASCADE from balsync.sync_runs): retention deletes
# them itself, a batch at a time, so that deleting a run never cascades into a huge statement.
RUN_CHILDREN = ("skipped_records", "conflicts", "run_batches", "restart_seen")
AGED_CHILDREN = ("skipped_records", "conflicts")  # those with a recorded_at of their own
RETENTION_INDEXES = ("skipped_records_recorded", "conflicts_recorded")  # see _BOOKKEEPING

# The runs of a target table that are never pruned, whatever their age: the ones health,
# stats, status, `--min-interval`, the restart guard and the default views of `skipped`
# and `conflicts` read (the queries above that they use pick them the same way).
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
