"""Where balsync's memory of what it wrote lives, and what keeps it there.

In init-db's own table the memory is in the rows (two managed columns), so a sync writes
each changed row once. Everything else that can happen to a row must not lose it or fake
it: triggers move the memory of a row deleted, truncated or given another id into
`balsync.written` (where an application table's memory always lives), and reset memory
that anyone but balsync writes (a row restored from a backup, an ORM saving every column
it read). A view in balsync's schema depends on the table and its columns, so a plain
`DROP TABLE` or `DROP COLUMN` fails; what is forced through (CASCADE, a dropped or
disabled trigger) makes every command refuse the table until init-db sets it up again.
"""

from __future__ import annotations

from typing import LiteralString

from psycopg import sql

from balance_sync.errors import BalsyncError, SchemaMissing
from balance_sync.settings import TableName
from balance_sync.stores.postgres.connection import Connection, _ident
from balance_sync.stores.postgres.lock import LOCK_CLASS

WRITTEN_COLUMN = "balsync_written"  # the balance balsync last wrote; NULL: none
CLEARED_COLUMN = "balsync_cleared"  # clear-cache removed the key on purpose
# Set for its own transaction by every statement of balsync's that writes the memory
# columns: the guard triggers let those through and nothing else.
WRITING: LiteralString = "SELECT set_config('balsync.writing', 'on', true)"
_NOT_BALSYNC: LiteralString = "current_setting('balsync.writing', true) IS DISTINCT FROM 'on'"
# The shape init-db creates; only a table of exactly this shape gets memory columns.
_OWN_SHAPE = {
    "telegram_id": "bigint",
    "balance": "numeric(20,2)",
    "updated_at": "timestamp with time zone",
}
_FULL_SHAPE = {**_OWN_SHAPE, WRITTEN_COLUMN: "numeric(20,2)", CLEARED_COLUMN: "boolean"}

# Trigger name, timing and event, WHEN. ENABLE ALWAYS: they fire in replica sessions too
# (logical replication, bulk loaders setting session_replication_role). The WHEN clauses
# keep balsync's own writes, and the application's ordinary ones, off the function: it runs
# only where memory would be lost or faked. Naming both columns in a WHEN makes dropping
# either fail unless CASCADE.
_TRIGGERS: list[tuple[str, LiteralString, LiteralString]] = [
    (
        "balsync_keep_memory_deleted",
        "AFTER DELETE ON {} FOR EACH ROW",
        "OLD.balsync_written IS NOT NULL AND OLD.balsync_cleared IS NOT NULL",
    ),
    ("balsync_keep_memory_truncated", "BEFORE TRUNCATE ON {} FOR EACH STATEMENT", ""),
    (
        "balsync_keep_memory_inserted",
        "BEFORE INSERT ON {} FOR EACH ROW",
        _NOT_BALSYNC + " AND (NEW.balsync_written IS NOT NULL OR NEW.balsync_cleared)",
    ),
    (
        "balsync_keep_memory_updated",
        "BEFORE UPDATE ON {} FOR EACH ROW",
        _NOT_BALSYNC
        + """ AND (NEW.telegram_id IS DISTINCT FROM OLD.telegram_id
                   OR NEW.balsync_written IS DISTINCT FROM OLD.balsync_written
                   OR NEW.balsync_cleared IS DISTINCT FROM OLD.balsync_cleared)""",
    ),
]
TRIGGER_NAMES = [name for name, _, _ in _TRIGGERS]

# Run by init-db with balsync's bookkeeping. Security definer: whoever may delete or move
# a balance keeps its memory, without rights on balsync's schema. The key is the table as
# the catalog names it at that moment, so a renamed table keeps its memory too.
FUNCTIONS: list[LiteralString] = [
    # The id balsync.written knows a table by: by its oid where it keeps memory in its rows
    # (whatever it is called now), else by its name (schema.name); given on first use.
    """CREATE OR REPLACE FUNCTION balsync.target_id(name text, rel oid) RETURNS integer
        LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
    DECLARE
        found integer;
    BEGIN
        IF rel IS NOT NULL THEN
            SELECT id INTO found FROM balsync.targets WHERE relid = rel;
            IF found IS NOT NULL THEN
                RETURN found;
            END IF;
        END IF;
        SELECT id INTO found FROM balsync.targets WHERE target_table = name;
        IF found IS NULL THEN
            INSERT INTO balsync.targets (target_table) VALUES (name)
            ON CONFLICT (target_table) DO NOTHING;
            SELECT id INTO found FROM balsync.targets WHERE target_table = name;
        END IF;
        RETURN found;
    END $$""",
    """CREATE OR REPLACE FUNCTION balsync.keep_memory() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    DECLARE
        target integer := balsync.target_id(TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_RELID);
    BEGIN
        IF TG_OP = 'INSERT' THEN
            -- Memory comes from balsync only: a row restored or copied brings none.
            NEW.balsync_written := NULL;
            NEW.balsync_cleared := false;
            RETURN NEW;
        END IF;
        IF TG_OP = 'UPDATE' AND NEW.telegram_id IS NOT DISTINCT FROM OLD.telegram_id THEN
            -- A stale read saved whole (every column) must not rewrite the memory.
            NEW.balsync_written := OLD.balsync_written;
            NEW.balsync_cleared := OLD.balsync_cleared;
            RETURN NEW;
        END IF;
        IF TG_OP IN ('UPDATE', 'DELETE') THEN
            -- The memory belongs to the id, not to the row: left aside for the old id.
            IF OLD.balsync_written IS NOT NULL THEN
                INSERT INTO balsync.written (target_id, telegram_id, balance, cleared)
                VALUES (target, OLD.telegram_id, OLD.balsync_written, OLD.balsync_cleared)
                ON CONFLICT (target_id, telegram_id)
                DO UPDATE SET balance = EXCLUDED.balance, cleared = EXCLUDED.cleared;
            END IF;
            IF TG_OP = 'DELETE' THEN
                RETURN OLD;
            END IF;
            NEW.balsync_written := NULL;
            NEW.balsync_cleared := false;
            RETURN NEW;
        END IF;
        EXECUTE format(
            'INSERT INTO balsync.written (target_id, telegram_id, balance, cleared)
             SELECT $1, telegram_id, balsync_written, balsync_cleared FROM %I.%I
             WHERE balsync_written IS NOT NULL
             ON CONFLICT (target_id, telegram_id)
             DO UPDATE SET balance = EXCLUDED.balance, cleared = EXCLUDED.cleared',
            TG_TABLE_SCHEMA, TG_TABLE_NAME)
        USING target;
        RETURN NULL;
    END $$""",
]


def target_id(conn: Connection, key: str, relation: str | None = None) -> int:
    """The id balsync.written knows the table `key` (schema.name) by; given on first use.
    `relation` (its quoted name), for a table that keeps its memory in its rows."""
    row = conn.execute(
        "SELECT balsync.target_id(%s, to_regclass(%s)::oid)", (key, relation)
    ).fetchone()
    assert row is not None
    return int(row[0])


def set_up(conn: Connection, table: TableName, key: str) -> list[str]:
    """Give init-db's table its memory columns, triggers and view (idempotent).

    Only a table of exactly the shape init-db creates is touched: anything else is the
    application's. A table that did not keep its memory in its rows until now (an earlier
    version's, a copy, one whose columns were dropped) takes what balsync.written holds
    for its ids, under the table's run lock.
    """
    name = _ident(table).as_string(conn)
    shape: dict[str, str] = dict(
        conn.execute(
            """SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
               WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped""",
            (name,),
        ).fetchall()
    )
    kind = conn.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", (name,))
    if kind.fetchone() != ("r",) or not _OWN_SHAPE.items() <= shape.items() <= _FULL_SHAPE.items():
        return []  # a partitioned table's partitions would set memory aside under their names
    done: list[str] = []
    memory = _claim(conn, key, name)
    if shape != _FULL_SHAPE or not _intact(conn, name):
        _adopt(conn, table, memory, add_columns=shape != _FULL_SHAPE)
        if shape != _FULL_SHAPE:
            done.append(f"memory columns of table {table}")
    ident = _ident(table)
    for trigger, when_on, condition in _TRIGGERS:
        named = sql.Identifier(trigger)
        # Dropped and created again: PostgreSQL 13 has no CREATE OR REPLACE TRIGGER.
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(named, ident))
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {} " + when_on + "{} EXECUTE FUNCTION balsync.keep_memory()"
            ).format(
                named,
                ident,
                sql.SQL(" WHEN (" + condition + ")") if condition else sql.SQL(""),
            )
        )
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(ident, named))
    conn.execute(
        sql.SQL(
            """CREATE OR REPLACE VIEW {} AS
               SELECT telegram_id, balsync_written, balsync_cleared FROM {}"""
        ).format(_view(memory), ident)
    )
    conn.execute("UPDATE balsync.targets SET memory_in_row = true WHERE id = %s", (memory,))
    return done


def _claim(conn: Connection, key: str, name: str) -> int:
    """The id of this table in balsync.targets, known by its oid.

    The table that had this name when balsync last looked may have been renamed away (a
    rebuild: rename the old table, init-db, copy the rows back): what it remembers, in its
    rows and aside, is set aside for this one, whose rows then find it.
    """
    found = conn.execute("SELECT to_regclass(%s)::oid", (name,)).fetchone()
    assert found is not None
    oid = int(found[0])
    before = conn.execute(
        """SELECT id FROM balsync.targets
           WHERE target_table = %s AND relid IS NOT NULL AND relid <> %s""",
        (key, oid),
    ).fetchone()
    _follow_names(conn)
    mine = conn.execute("SELECT id FROM balsync.targets WHERE relid = %s", (oid,)).fetchone()
    if mine is not None:
        return int(mine[0])
    named = conn.execute(
        "SELECT id FROM balsync.targets WHERE target_table = %s AND relid IS NULL", (key,)
    ).fetchone()
    if named is not None:  # known by name only (an earlier version's, or memory aside)
        conn.execute("UPDATE balsync.targets SET relid = %s WHERE id = %s", (oid, named[0]))
        memory = int(named[0])
    else:
        created = conn.execute(
            "INSERT INTO balsync.targets (target_table, relid) VALUES (%s, %s) RETURNING id",
            (key, oid),
        ).fetchone()
        assert created is not None
        memory = int(created[0])
    if before is not None:
        _inherit(conn, int(before[0]), memory)
    return memory


def _follow_names(conn: Connection) -> None:
    """Record every table known by its oid under its name of today (renames, moves to
    another schema, swaps); a table that is gone keeps a name no table can have, and no oid
    (one may be given to another relation later)."""
    # In two steps, through names of their own, so names can swap between targets.
    conn.execute(
        """UPDATE balsync.targets t SET target_table = '#' || t.id || ' ' || t.target_table
           WHERE t.relid IS NOT NULL AND t.target_table IS DISTINCT FROM (
               SELECT n.nspname || '.' || c.relname FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.oid = t.relid AND c.relkind = 'r')"""
    )
    conn.execute(
        """UPDATE balsync.targets t SET target_table = n.nspname || '.' || c.relname
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE c.oid = t.relid AND c.relkind = 'r' AND t.target_table LIKE '#%'
             AND NOT EXISTS (SELECT 1 FROM balsync.targets o
                             WHERE o.target_table = n.nspname || '.' || c.relname)"""
    )
    conn.execute(
        """UPDATE balsync.targets t SET relid = NULL
           WHERE t.relid IS NOT NULL
             AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.relid AND c.relkind = 'r')"""
    )


def _inherit(conn: Connection, old: int, new: int) -> None:
    """Set aside for target `new` what target `old` remembers: in its rows (where its table
    still exists, with its memory columns), and aside."""
    row = conn.execute(
        """SELECT n.nspname, c.relname FROM balsync.targets t
           JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE t.id = %s
             AND (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid
                  AND a.attname = ANY(%s) AND NOT a.attisdropped) = 2""",
        (old, [WRITTEN_COLUMN, CLEARED_COLUMN]),
    ).fetchone()
    if row is not None:
        table = sql.Identifier(str(row[0]), str(row[1]))
        conn.execute(
            sql.SQL(
                """INSERT INTO balsync.written (target_id, telegram_id, balance, cleared)
                   SELECT %s, telegram_id, balsync_written, balsync_cleared FROM {}
                   WHERE balsync_written IS NOT NULL
                   ON CONFLICT (target_id, telegram_id)
                   DO UPDATE SET balance = EXCLUDED.balance, cleared = EXCLUDED.cleared"""
            ).format(table),
            (new,),
        )
    conn.execute(
        """INSERT INTO balsync.written (target_id, telegram_id, balance, cleared)
           SELECT %s, telegram_id, balance, cleared FROM balsync.written WHERE target_id = %s
           ON CONFLICT (target_id, telegram_id) DO NOTHING""",
        (new, old),
    )


def _adopt(conn: Connection, table: TableName, memory: int, *, add_columns: bool) -> None:
    """Move what balsync.written remembers for the table's ids into its rows."""
    name = _ident(table).as_string(conn)
    # A sync writing meanwhile would go on remembering aside, behind the rows.
    locked = conn.execute(
        "SELECT pg_try_advisory_xact_lock(%s, to_regclass(%s)::oid::int4)", (LOCK_CLASS, name)
    ).fetchone()
    if not (locked and locked[0]):
        raise BalsyncError(
            f"a balsync run is writing {table}: init-db would move its memory under it",
            "run `balsync init-db` again once that run has finished",
        )
    ident = _ident(table)
    if add_columns:
        conn.execute(
            sql.SQL(
                """ALTER TABLE {} ADD COLUMN IF NOT EXISTS balsync_written numeric(20,2),
                   ADD COLUMN IF NOT EXISTS balsync_cleared boolean NOT NULL DEFAULT false"""
            ).format(ident)
        )
    conn.execute(WRITING)
    # What balsync.written holds wins over values a copied row brought along.
    conn.execute(
        sql.SQL(
            """UPDATE {} t SET balsync_written = w.balance, balsync_cleared = w.cleared
               FROM balsync.written w WHERE w.target_id = %s AND w.telegram_id = t.telegram_id"""
        ).format(ident),
        (memory,),
    )
    conn.execute(
        sql.SQL(
            """DELETE FROM balsync.written w USING {} t
               WHERE w.target_id = %s AND w.telegram_id = t.telegram_id"""
        ).format(ident),
        (memory,),
    )


def _view(memory: int) -> sql.Identifier:
    """The view in balsync's schema that holds on to the table and its memory columns: one
    per table, so a table renamed away keeps its own."""
    return sql.Identifier("balsync", f"memory of target {memory}")


def _intact(conn: Connection, name: str) -> bool:
    """Every memory trigger present and always enabled, and balsync's view over the table."""
    row = conn.execute(
        """SELECT (SELECT count(*) FROM pg_trigger
                   WHERE tgrelid = to_regclass(%s) AND tgname = ANY(%s) AND tgenabled = 'A')
                  = %s,
                  EXISTS (SELECT 1 FROM pg_depend d
                          JOIN pg_rewrite r ON r.oid = d.objid
                          JOIN pg_class v ON v.oid = r.ev_class
                          JOIN pg_namespace n ON n.oid = v.relnamespace
                          WHERE d.classid = 'pg_rewrite'::regclass
                            AND d.refobjid = to_regclass(%s) AND n.nspname = 'balsync'
                            AND v.relkind = 'v')""",
        (name, TRIGGER_NAMES, len(TRIGGER_NAMES), name),
    ).fetchone()
    return bool(row and row[0] and row[1])


def in_row(conn: Connection, name: str, key: str, columns: dict[str, bool]) -> bool:
    """Whether the target keeps balsync's memory in its rows. Refuses a table init-db set
    up so whose columns, triggers or view are gone or disabled: the memory they keep."""
    has_columns = WRITTEN_COLUMN in columns and CLEARED_COLUMN in columns
    schema = conn.execute("SELECT to_regclass('balsync.targets') IS NOT NULL").fetchone()
    expected = False
    if schema and schema[0]:
        row = conn.execute(
            """SELECT bool_or(memory_in_row) FROM balsync.targets
               WHERE target_table = %s OR relid = to_regclass(%s)""",
            (key, name),
        ).fetchone()
        expected = bool(row and row[0])
    if expected and not has_columns:
        raise SchemaMissing(
            f"table {key} lost balsync's memory columns ({WRITTEN_COLUMN}, {CLEARED_COLUMN}):"
            " without them balsync cannot tell an outside change from its own",
            "put them back with `balsync init-db`; rows then count as never written by"
            " balsync, so check for corrections made since the columns went",
        )
    if not has_columns:
        return False
    if _intact(conn, name):
        return True
    if not expected:
        # A copy of init-db's table (CREATE TABLE ... LIKE), not set up by init-db: an
        # application's table, with its memory beside it like any other.
        return False
    raise SchemaMissing(
        f"table {key} keeps balsync's memory in its rows, but a trigger or the view in"
        " balsync's schema that keep that memory is missing or not always enabled",
        "run `balsync init-db` to set them up again",
    )
