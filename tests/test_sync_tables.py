"""`balsync sync` and `init-db` on real servers: application tables, schema-qualified tables and
hostile names."""

from __future__ import annotations

import json
import time

import pytest
import redis

from tests.helpers import (
    LEDGER,
    MAX_ID,
    OLD,
    PG,
    balances,
    counts_of,
    exact,
    seed,
    skipped_records,
    sync_json,
    sync_run,
    table_rows,
)

# -- application tables --------------------------------------------------------------------

USERS = """CREATE TABLE users (
    id bigint PRIMARY KEY,
    username text NOT NULL,
    balance numeric(12,2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(){extra}
)"""
# A statement-level trigger fires for every INSERT statement, even one that inserts no row.
INSERT_AUDIT = """
CREATE TABLE insert_audit (at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION note_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO insert_audit DEFAULT VALUES; RETURN NULL; END $$;
CREATE TRIGGER users_insert AFTER INSERT ON users
    FOR EACH STATEMENT EXECUTE FUNCTION note_insert();
"""


def arrange_users(pg: PG, rds: redis.Redis, key_prefix: str, *, with_updated_at: bool) -> None:
    extra = ",\n    updated_at timestamptz NOT NULL DEFAULT now()" if with_updated_at else ""
    pg.execute(USERS.format(extra=extra).encode())
    pg.execute(INSERT_AUDIT.encode())
    with pg.cursor() as cur:
        cur.executemany(
            "INSERT INTO users (id, username, balance, created_at) VALUES (%s, %s, %s, %s)",
            [
                (1, "alice", "10.00", OLD),
                (2, "bob", "20.00", OLD),
                (3, "carol", "30.00", OLD),
                (4, "dave", "40.00", OLD),
                (5, "erin", "0", OLD),
            ],
        )
    pg.execute("TRUNCATE insert_audit")
    if with_updated_at:
        pg.execute("UPDATE users SET updated_at = %s", (OLD,))
    # 1 and 3 change, 2 is the same amount, 100/101/MAX_ID have no row.
    seed(rds, key_prefix, {1: "11.50", 2: "20", 3: "0.10", 100: "5.00", 101: "6", MAX_ID: "1"})


USERS_COUNTS = {
    "processed": 6,
    "inserted": 0,
    "updated": 2,
    "unchanged": 1,
    "skipped": 3,
    "invalid": 0,
}


def test_application_table_updates_existing_rows_and_skips_unknown_ids(
    balsync, rds, key_prefix, pg
):
    """--table users: existing rows updated, unknown ids skipped as 'unknown id', no INSERT."""
    arrange_users(pg, rds, key_prefix, with_updated_at=False)
    init = balsync("init-db", "--json", "--table", "users", "--id-column", "id")
    assert init.exit_code == 0, init.stderr
    before = table_rows(pg, "users", "id", extra=("username", "created_at"))

    data = sync_json(balsync, "--table", "users", "--id-column", "id", code=1)
    assert data["status"] == "partial"
    assert counts_of(data) == USERS_COUNTS
    after = table_rows(pg, "users", "id", extra=("username", "created_at"))
    assert after == {
        **before,
        1: ("11.50", "alice", OLD),
        3: ("0.10", "carol", OLD),
    }
    assert pg.execute("SELECT count(*) FROM insert_audit").fetchone() == (0,)
    recorded = skipped_records(pg, data["run_id"])
    assert {key for key, _, _ in recorded} == {f"{key_prefix}{i}" for i in (100, 101, MAX_ID)}
    assert all("unknown id" in reason for _, _, reason in recorded)


def test_application_table_updated_at_moves_only_for_changed_rows(balsync, rds, key_prefix, pg):
    """--table users with an updated_at column: it moves for changed rows only."""
    arrange_users(pg, rds, key_prefix, with_updated_at=True)
    balsync.ok("init-db", "--table", "users", "--id-column", "id")
    data = sync_json(balsync, "--table", "users", "--id-column", "id", code=1)
    assert counts_of(data) == USERS_COUNTS
    after = table_rows(pg, "users", "id")
    assert {i for i, (_, at) in after.items() if at != OLD} == {1, 3}
    assert {i: b for i, (b, _) in after.items()} == {
        1: "11.50",
        2: "20.00",
        3: "0.10",
        4: "40.00",
        5: "0.00",
    }
    assert pg.execute("SELECT count(*) FROM insert_audit").fetchone() == (0,)


def test_application_table_value_too_wide_for_its_column_is_skipped_not_fatal(
    balsync, rds, key_prefix, pg
):
    """A valid balance that the table's numeric(12,2) cannot hold is skipped; the rest syncs."""
    arrange_users(pg, rds, key_prefix, with_updated_at=False)
    seed(rds, key_prefix, {4: "99999999999999.00"})  # valid per SPEC, wider than numeric(12,2)
    balsync.ok("init-db", "--table", "users", "--id-column", "id")
    data = sync_json(balsync, "--table", "users", "--id-column", "id", code=1)
    assert (data["updated"], data["skipped"], data["invalid"]) == (2, 4, 0)
    assert balances(pg, "users", "id") == {
        1: "11.50",
        2: "20.00",
        3: "0.10",
        4: "40.00",
        5: "0.00",
    }
    assert f"{key_prefix}4" in {key for key, _, _ in skipped_records(pg, data["run_id"])}


# -- schema-qualified tables and init-db ---------------------------------------------------


def regclass(pg: PG, name: str) -> object:
    row = pg.execute("SELECT to_regclass(%s)::text", (name,)).fetchone()
    return None if row is None else row[0]


def test_schema_qualified_table_syncs(balsync, rds, key_prefix, pg):
    """--table ledger.balances: rows land there, updated_at moves only for changes."""
    pg.execute("CREATE SCHEMA ledger")
    pg.execute(LEDGER)
    init = balsync("init-db", "--json", "--table", "ledger.balances")
    assert init.exit_code == 0, init.stderr
    assert json.loads(init.stdout) == {"status": "success", "created": ["balsync schema"]}
    assert regclass(pg, "user_balances") is None

    values = {1: "1.00", 2: "2.50", MAX_ID: "999999999999999999.99"}
    seed(rds, key_prefix, values)
    data = sync_json(balsync, "--table", "ledger.balances")
    assert (data["inserted"], data["status"]) == (3, "success")
    assert balances(pg, "ledger.balances") == {i: exact(v) for i, v in values.items()}
    assert sync_run(pg, data["run_id"])["target_table"] == "ledger.balances"

    pg.execute("UPDATE ledger.balances SET updated_at = %s", (OLD,))
    seed(rds, key_prefix, {2: "2.51"})
    data = sync_json(balsync, "--table", "ledger.balances", "--force")
    assert (data["updated"], data["unchanged"]) == (1, 2)
    after = table_rows(pg, "ledger.balances")
    assert {i for i, (_, at) in after.items() if at != OLD} == {2}
    assert after[2][0] == "2.51"


def default_table_columns(pg: PG, table: str) -> list[tuple[object, ...]]:
    return pg.execute(
        """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull
           FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0
             AND NOT a.attisdropped ORDER BY a.attnum""",
        (table,),
    ).fetchall()


DEFAULT_COLUMNS = [
    ("telegram_id", "bigint", True),
    ("balance", "numeric(20,2)", True),
    ("updated_at", "timestamp with time zone", True),
    # balsync's memory of what it wrote, beside the balance (SPEC's table gains these)
    ("balsync_written", "numeric(20,2)", False),
    ("balsync_cleared", "boolean", True),
]


def test_init_db_creates_default_table_and_is_idempotent(balsync, pg):
    """init-db creates user_balances and the balsync schema; a second run creates nothing."""
    first = balsync.ok("init-db", "--json")
    assert json.loads(first.stdout) == {
        "status": "success",
        "created": ["balsync schema", "table user_balances"],
    }
    assert default_table_columns(pg, "user_balances") == DEFAULT_COLUMNS
    for table in ("balsync.sync_runs", "balsync.skipped_records", "balsync.run_batches"):
        assert regclass(pg, table) == table
    second = balsync.ok("init-db", "--json")
    assert json.loads(second.stdout) == {"status": "success", "created": []}


@pytest.mark.parametrize(
    "args",
    [
        ("--table", "wallets"),
        ("--table", "ledger.balances"),
        ("--id-column", "id"),
        ("--balance-column", "amount"),
        ("--table", "users", "--id-column", "id"),
    ],
    ids=["other-name", "other-schema-and-name", "other-id", "other-balance", "application"],
)
def test_init_db_creates_no_table_for_a_target_that_is_not_user_balances(balsync, pg, args):
    """init-db for another table name or other columns creates only balsync's schema."""
    result = balsync.ok("init-db", "--json", *args)
    assert json.loads(result.stdout) == {"status": "success", "created": ["balsync schema"]}
    for table in ("wallets", "ledger.balances", "users", "user_balances"):
        assert regclass(pg, table) is None, table
    assert regclass(pg, "balsync.sync_runs") == "balsync.sync_runs"


@pytest.mark.parametrize("table", ["app.user_balances", "public.user_balances"])
def test_init_db_creates_user_balances_in_any_schema(balsync, rds, key_prefix, pg, table):
    """init-db --table SCHEMA.user_balances creates the schema and the default table in it."""
    result = balsync.ok("init-db", "--json", "--table", table)
    assert json.loads(result.stdout)["created"] == ["balsync schema", f"table {table}"]
    assert default_table_columns(pg, table) == DEFAULT_COLUMNS
    seed(rds, key_prefix, {7: "7.70"})
    data = sync_json(balsync, "--table", table)
    assert data["inserted"] == 1
    assert balances(pg, table) == {7: "7.70"}
    again = balsync.ok("init-db", "--json", "--table", table)
    assert json.loads(again.stdout)["created"] == []


def test_init_db_leaves_an_existing_target_table_alone(balsync, pg):
    """init-db where user_balances already exists neither recreates nor alters it."""
    pg.execute("CREATE TABLE user_balances (telegram_id bigint PRIMARY KEY, balance numeric(9,2))")
    pg.execute("INSERT INTO user_balances VALUES (1, 1.00)")
    result = balsync.ok("init-db", "--json")
    assert json.loads(result.stdout)["created"] == ["balsync schema"]
    assert default_table_columns(pg, "user_balances") == [
        ("telegram_id", "bigint", True),
        ("balance", "numeric(9,2)", False),
    ]
    assert balances(pg) == {1: "1.00"}


# -- hostile names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("--table", 'users"; drop table x; --'),
        ("--table", "a.b.c"),
        ("--id-column", 'id"; drop table x; --'),
        ("--balance-column", "balance; drop table x"),
    ],
    ids=["table", "three-part-table", "id-column", "balance-column"],
)
def test_hostile_names_exit_2_before_any_sql(initialized, pg, rds, key_prefix, args):
    """A table or column name that is not an identifier is a usage error (exit 2), no SQL."""
    pg.execute("CREATE TABLE x (i int)")
    seed(rds, key_prefix, {1: "1.00"})
    result = initialized("sync", "--json", *args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "invalid" in result.stderr
    assert regclass(pg, "x") == "x"
    assert pg.execute("SELECT count(*) FROM balsync.sync_runs").fetchone() == (0,)
    assert balances(pg) == {}
    # With an unreachable PostgreSQL the answer is the same, at once: nothing was tried.
    started = time.monotonic()
    offline = initialized(
        "sync", *args, env={"BALSYNC_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    )
    assert offline.exit_code == 2, offline.stderr
    assert time.monotonic() - started < 2
