"""balsync's own schema (`init-db` and its migrations) and what balsync learns about the
target table."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import LiteralString

import psycopg
from psycopg import sql

from balance_sync.errors import BalsyncError, ConfigError, SchemaMissing
from balance_sync.settings import ColumnUnit, Settings, TableName
from balance_sync.stores.postgres import memory_layout
from balance_sync.stores.postgres.connection import (
    Connection,
    Part,
    _first_line,
    _ident,
    catalog_key,
)
from balance_sync.validation import MAX_INTEGER_DIGITS, redis_value

SCHEMA = "balsync"
_INIT_LOCK = 1650551924  # serialises concurrent `init-db`; the key after lock.LOCK_CLASS

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
    # Each table balsync synced, by a small id (balsync.written's key) and by name; and
    # whether init-db put its memory into the rows themselves: where those columns or their
    # triggers are gone, balsync refuses rather than forget what it wrote.
    # A table that keeps its memory in its rows is known by its oid too (`relid`), so a
    # rename or a move to another schema keeps what balsync.written holds for it.
    """CREATE TABLE IF NOT EXISTS balsync.targets (
        id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        target_table text NOT NULL UNIQUE,
        memory_in_row boolean NOT NULL DEFAULT false,
        relid oid UNIQUE
    )""",
    # The last balance balsync wrote for each id: a row that differs from it was changed
    # behind balsync's back (an admin correction, the application's fallback path). Keyed
    # by the target's id, not its name: a narrow index, a third of the key's width.
    """CREATE TABLE IF NOT EXISTS balsync.written (
        target_id integer NOT NULL,
        telegram_id bigint NOT NULL,
        balance numeric(20,2) NOT NULL,
        PRIMARY KEY (target_id, telegram_id)
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
_NEWEST = TableName("targets", "balsync")


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
    # balsync's memory lives in the rows (init-db's table), not only in balsync.written.
    memory_in_row: bool = False

    @property
    def ident(self) -> sql.Identifier:
        """The table as a quoted, possibly schema-qualified identifier."""
        return _ident(self.table)


class Schema(Part):
    """balsync's schema in the database, and the target table as the catalog describes it."""

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
                _narrow_memory_key(conn)
                for statement in memory_layout.FUNCTIONS:
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
                                updated_at timestamptz NOT NULL DEFAULT now(),
                                balsync_written numeric(20,2),
                                balsync_cleared boolean NOT NULL DEFAULT false
                            )"""
                        ).format(_ident(settings.table))
                    )
                    created.append(f"table {settings.table}")
                if settings.is_default_table and _relation_exists(conn, settings.table):
                    name = _ident(settings.table).as_string(conn)
                    key = catalog_key(conn, name)
                    assert key is not None
                    created += memory_layout.set_up(conn, settings.table, key)
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
                """SELECT n.nspname, c.relname, c.relkind IN ('r', 'p'), c.relkind = 'r'
                   FROM pg_class c
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
            key = f"{resolved[0]}.{resolved[1]}"
            return TargetTable(
                table=TableName(name=resolved[1], schema=resolved[0]),
                id_column=settings.id_column,
                balance_column=settings.balance_column,
                has_updated_at="updated_at" in columns,
                # Inserting needs a unique id (ON CONFLICT) and no other mandatory column.
                can_insert=bool(unique and unique[0]) and not others_required,
                balance_type=_balance_type(settings, *kind),
                has_ctid=bool(resolved[2]),
                # Not a partitioned table: its partitions' triggers name the partition.
                memory_in_row=bool(resolved[3]) and memory_layout.in_row(conn, name, key, columns),
            )

        return self.call(run)


def _narrow_memory_key(conn: Connection) -> None:
    """Key balsync.written by the target's id where an earlier version keyed it by name.

    In place, so the grants on the table stay; inside init-db's transaction, so a sync
    running meanwhile waits for it, and its next batch fails and retries on the new key.
    """
    named = conn.execute(
        """SELECT EXISTS (SELECT 1 FROM pg_attribute
                          WHERE attrelid = 'balsync.written'::regclass
                            AND attname = 'target_table' AND NOT attisdropped)"""
    ).fetchone()
    if not (named and named[0]):
        return
    conn.execute("LOCK TABLE balsync.written IN ACCESS EXCLUSIVE MODE")
    conn.execute(
        """INSERT INTO balsync.targets (target_table)
           SELECT DISTINCT target_table FROM balsync.written
           ON CONFLICT (target_table) DO NOTHING"""
    )
    conn.execute("ALTER TABLE balsync.written ADD COLUMN target_id integer")
    conn.execute(
        """UPDATE balsync.written w SET target_id = t.id FROM balsync.targets t
           WHERE t.target_table = w.target_table"""
    )
    primary = conn.execute(
        """SELECT conname FROM pg_constraint
           WHERE conrelid = 'balsync.written'::regclass AND contype = 'p'"""
    ).fetchone()
    if primary is not None:
        conn.execute(
            sql.SQL("ALTER TABLE balsync.written DROP CONSTRAINT {}").format(
                sql.Identifier(str(primary[0]))
            )
        )
    conn.execute("ALTER TABLE balsync.written DROP COLUMN target_table")
    conn.execute("ALTER TABLE balsync.written ALTER COLUMN target_id SET NOT NULL")
    conn.execute("ALTER TABLE balsync.written ADD PRIMARY KEY (target_id, telegram_id)")


def _relation_exists(conn: Connection, table: TableName) -> bool:
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (_ident(table).as_string(conn),)
    ).fetchone()
    return bool(row and row[0])
