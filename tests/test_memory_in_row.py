"""balsync's memory in the rows of init-db's table: how it is set up and migrated, and
what keeps it when rows, columns or triggers go."""

from __future__ import annotations

import json
import os
from typing import Any

import psycopg
import pytest

from balance_sync.stores.postgres import Schema
from tests.helpers import PG, Balsync, balances, lock_held


def sync_json(balsync: Balsync, *args: str) -> tuple[int, dict[str, Any]]:
    result = balsync("sync", "--json", "--force", *args)
    assert result.stdout, result.stderr
    return result.exit_code, json.loads(result.stdout)


def memory(pg: PG, table: str = "user_balances") -> dict[int, str | None]:
    """What each row of the table remembers, by id."""
    return {
        int(str(i)): None if m is None else str(m)
        for i, m in pg.execute(f"SELECT telegram_id, balsync_written::text FROM {table}")
    }


def aside(pg: PG, table: str = "public.user_balances") -> dict[int, str]:
    """What balsync.written remembers for a table (init-db's by default)."""
    return {
        int(str(i)): str(b)
        for i, b in pg.execute(
            """SELECT w.telegram_id, w.balance::text FROM balsync.written w
               JOIN balsync.targets t ON t.id = w.target_id
               WHERE t.target_table = %s""",
            (table,),
        )
    }


def as_before_this_version(pg: PG) -> None:
    """Turn an installation into what the previous version left: no memory columns, no
    triggers, no balsync.targets, memory in balsync.written keyed by the table's name."""
    rows = pg.execute(
        "SELECT telegram_id, balsync_written FROM user_balances WHERE balsync_written IS NOT NULL"
    ).fetchall()
    pg.execute(
        """ALTER TABLE user_balances DROP COLUMN balsync_written CASCADE,
           DROP COLUMN balsync_cleared CASCADE"""
    )
    pg.execute("DROP TRIGGER IF EXISTS balsync_keep_memory_truncated ON user_balances")
    pg.execute("DROP TABLE balsync.targets")
    pg.execute("DROP FUNCTION balsync.keep_memory()")
    pg.execute("DROP FUNCTION balsync.target_id(text, oid)")
    pg.execute("DROP TABLE balsync.written")
    pg.execute(
        """CREATE TABLE balsync.written (
               target_table text NOT NULL, telegram_id bigint NOT NULL,
               balance numeric(20,2) NOT NULL, cleared boolean NOT NULL DEFAULT false,
               PRIMARY KEY (target_table, telegram_id))"""
    )
    for telegram_id, written in [*rows, (77, "7.00")]:
        pg.execute(
            """INSERT INTO balsync.written (target_table, telegram_id, balance)
               VALUES ('public.user_balances', %s, %s)""",
            (telegram_id, written),
        )
    pg.execute(  # an application table's memory, which must survive the new key
        """INSERT INTO balsync.written (target_table, telegram_id, balance)
           VALUES ('public.wallets', 5, 5)"""
    )


@pytest.fixture
def synced(initialized: Balsync, rds: Any, key_prefix: str) -> Balsync:
    """Three keys synced into init-db's table."""
    for i, value in {1: "10.00", 2: "20.00", 3: "30.00"}.items():
        rds.set(f"{key_prefix}{i}", value)
    assert sync_json(initialized)[0] == 0
    return initialized


def test_a_sync_remembers_in_the_row_and_nothing_aside(synced, pg):
    """Every row balsync wrote remembers its value; balsync.written holds nothing."""
    assert memory(pg) == {1: "10.00", 2: "20.00", 3: "30.00"}
    assert aside(pg) == {}


def test_a_deleted_row_leaves_its_memory_aside(synced, pg):
    """DELETE keeps what balsync wrote, for a row inserted again later."""
    pg.execute("DELETE FROM user_balances WHERE telegram_id IN (1, 2)")
    assert aside(pg) == {1: "10.00", 2: "20.00"}


def test_a_truncated_table_leaves_its_memory_aside(synced, pg):
    """TRUNCATE keeps what balsync wrote for every row."""
    pg.execute("TRUNCATE user_balances")
    assert aside(pg) == {1: "10.00", 2: "20.00", 3: "30.00"}


def test_a_row_reinserted_as_it_was_is_updated_and_remembered_again(synced, rds, key_prefix, pg):
    """A row deleted and inserted again with the value balsync wrote is no conflict: Redis'
    new value is written, and remembered in the row."""
    pg.execute("DELETE FROM user_balances WHERE telegram_id = 1")
    pg.execute("INSERT INTO user_balances (telegram_id, balance) VALUES (1, 10)")
    rds.set(f"{key_prefix}1", "12.00")
    code, data = sync_json(synced)
    assert (code, data["updated"]) == (0, 1)
    assert balances(pg)[1] == "12.00"
    assert memory(pg)[1] == "12.00"


def test_a_new_row_of_the_application_is_adopted(synced, rds, key_prefix, pg):
    """A row balsync never wrote (no memory anywhere) is updated as before."""
    pg.execute("INSERT INTO user_balances (telegram_id, balance) VALUES (9, 1)")
    rds.set(f"{key_prefix}9", "9.00")
    code, data = sync_json(synced)
    assert (code, data["updated"]) == (0, 1)
    assert (balances(pg)[9], memory(pg)[9]) == ("9.00", "9.00")


def test_dropping_a_memory_column_fails_without_cascade(synced, pg):
    """A schema tool's plain DROP COLUMN fails: the memory trigger depends on the columns."""
    for column in ("balsync_written", "balsync_cleared"):
        with pytest.raises(psycopg.errors.DependentObjectsStillExist):
            pg.execute(f"ALTER TABLE user_balances DROP COLUMN {column}")


def test_memory_columns_dropped_with_cascade_stop_every_sync(synced, rds, key_prefix, pg):
    """With CASCADE the columns (and the memory) are gone: sync refuses, exit 5, naming
    init-db, and writes nothing; init-db puts columns and triggers back."""
    pg.execute("UPDATE user_balances SET balance = 15 WHERE telegram_id = 1")  # a correction
    pg.execute("ALTER TABLE user_balances DROP COLUMN balsync_written CASCADE")
    rds.set(f"{key_prefix}1", "11.00")
    code, data = sync_json(synced)
    assert code == 5
    assert "balsync_written" in data["error"]
    assert "init-db" in data["error"]
    assert balances(pg)[1] == "15.00"
    health = synced("health", "--json")
    assert health.exit_code != 0
    created = json.loads(synced.ok("init-db", "--json").stdout)["created"]
    assert created == ["memory columns of table user_balances"]
    assert sync_json(synced)[0] == 0
    with pytest.raises(psycopg.errors.DependentObjectsStillExist):
        pg.execute("ALTER TABLE user_balances DROP COLUMN balsync_written")


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TRIGGER balsync_keep_memory_deleted ON user_balances",
        "DROP TRIGGER balsync_keep_memory_truncated ON user_balances",
        "ALTER TABLE user_balances DISABLE TRIGGER balsync_keep_memory_deleted",
        # no longer fires in ordinary sessions: as good as disabled
        "ALTER TABLE user_balances ENABLE REPLICA TRIGGER balsync_keep_memory_deleted",
        # fires in ordinary sessions only: not in a bulk loader's replica session
        "ALTER TABLE user_balances ENABLE TRIGGER balsync_keep_memory_updated",
        "ALTER TABLE user_balances RENAME COLUMN balsync_written TO written_before",
    ],
    ids=[
        "delete-trigger",
        "truncate-trigger",
        "disabled",
        "replica-only",
        "origin-only",
        "renamed-column",
    ],
)
def test_memory_that_rows_could_lose_stops_every_sync(synced, rds, key_prefix, pg, statement):
    """Without its triggers a deleted row would take its memory along: sync refuses until
    init-db has set them up again."""
    pg.execute(statement)
    rds.set(f"{key_prefix}1", "11.00")
    code, data = sync_json(synced)
    assert code == 5, data
    assert "init-db" in data["error"]
    assert balances(pg)[1] == "10.00"
    if "RENAME" in statement:
        pg.execute("ALTER TABLE user_balances RENAME COLUMN written_before TO balsync_written")
    synced.ok("init-db")
    assert sync_json(synced)[0] == 0
    assert balances(pg)[1] == "11.00"


def test_a_copy_of_the_table_is_an_application_table(synced, rds, key_prefix, pg):
    """CREATE TABLE ... LIKE copies the columns, not the triggers: balsync keeps its memory
    of the copy aside, as for any application table, and a correction there is a conflict."""
    pg.execute("CREATE TABLE wallets (LIKE user_balances INCLUDING ALL)")
    wallets = Balsync({**synced.env, "BALSYNC_TABLE": "wallets"})
    assert sync_json(wallets)[0] == 0
    assert aside(pg, "public.wallets") == {1: "10.00", 2: "20.00", 3: "30.00"}
    pg.execute("UPDATE wallets SET balance = 25 WHERE telegram_id = 2")
    rds.set(f"{key_prefix}2", "21.00")
    code, data = sync_json(wallets)
    assert (code, data["skipped"]) == (1, 1)
    assert balances(pg, "wallets")[2] == "25.00"


def test_init_db_moves_the_memory_of_an_earlier_version_into_the_rows(synced, rds, key_prefix, pg):
    """An installation of the previous version: sync asks for init-db; init-db moves the
    memory into the rows, keeps no copy aside, and a correction made before it is still a
    conflict afterwards. A second init-db changes nothing."""
    as_before_this_version(pg)
    pg.execute("UPDATE user_balances SET balance = 15 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "11.00")
    rds.set(f"{key_prefix}2", "22.00")
    code, data = sync_json(synced)
    assert code == 5
    assert "init-db" in data["error"]
    created = json.loads(synced.ok("init-db", "--json").stdout)["created"]
    assert created == ["memory columns of table user_balances"]
    assert memory(pg) == {1: "10.00", 2: "20.00", 3: "30.00"}
    assert aside(pg) == {77: "7.00"}  # an id with no row keeps its memory aside
    assert aside(pg, "public.wallets") == {5: "5.00"}
    code, data = sync_json(synced)
    assert (code, data["updated"], data["skipped"]) == (1, 1, 1)
    assert balances(pg) == {1: "15.00", 2: "22.00", 3: "30.00"}
    assert json.loads(synced.ok("init-db", "--json").stdout)["created"] == []
    assert memory(pg) == {1: "10.00", 2: "22.00", 3: "30.00"}


def test_init_db_does_not_migrate_under_a_running_sync(synced, pg, database_url):
    """A sync holding the table would go on remembering aside: init-db refuses, changes
    nothing, and says to run it again."""
    as_before_this_version(pg)
    with lock_held(database_url):
        result = synced("init-db")
    assert result.exit_code != 0
    assert "again" in result.stderr
    columns = pg.execute(
        """SELECT count(*) FROM pg_attribute
           WHERE attrelid = 'user_balances'::regclass AND attname LIKE 'balsync%'
             AND NOT attisdropped"""
    ).fetchone()
    assert columns == (0,)
    synced.ok("init-db")
    assert memory(pg) == {1: "10.00", 2: "20.00", 3: "30.00"}


def test_an_application_table_is_never_given_memory_columns(balsync, pg):
    """init-db alters only a table of exactly the shape it creates."""
    pg.execute(
        """CREATE TABLE user_balances (
               telegram_id bigint PRIMARY KEY, balance numeric(20,2) NOT NULL,
               updated_at timestamptz NOT NULL DEFAULT now(), nickname text)"""
    )
    assert json.loads(balsync.ok("init-db", "--json").stdout)["created"] == ["balsync schema"]
    columns = pg.execute(
        """SELECT count(*) FROM pg_attribute
           WHERE attrelid = 'user_balances'::regclass AND attname LIKE 'balsync%'"""
    ).fetchone()
    assert columns == (0,)


def test_a_role_without_rights_on_balsync_can_delete_and_the_memory_is_kept(synced, pg):
    """The application's role deletes a row; the trigger (security definer) keeps the
    memory although that role may not touch balsync's schema."""
    role = f"balsync_test_deleter_{os.getpid()}"
    pg.execute(f"DROP ROLE IF EXISTS {role}")
    pg.execute(f"CREATE ROLE {role}")
    try:
        pg.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        pg.execute(f"GRANT SELECT, DELETE ON user_balances TO {role}")
        with pg.transaction():
            pg.execute(f"SET LOCAL ROLE {role}")
            pg.execute("DELETE FROM user_balances WHERE telegram_id = 3")
        assert aside(pg) == {3: "30.00"}
    finally:
        pg.execute(f"REVOKE ALL ON user_balances FROM {role}")
        pg.execute(f"REVOKE ALL ON SCHEMA public FROM {role}")
        pg.execute(f"DROP ROLE {role}")


# -- what the application and the operator do to rows, ids and the table -----------------


def kept(tool: Balsync, pg: PG, expected: str, table: str = "user_balances") -> None:
    """The next sync keeps row 1 at `expected` as a conflict, exit 1."""
    code, data = sync_json(tool)
    assert balances(pg, table)[1] == expected, (code, data)
    assert code == 1


def test_swapping_two_ids_is_a_correction_not_reverted(synced, pg):
    """An admin swaps the balances of ids 1 and 2 by swapping ids: the memory belongs to
    the id, not the row, so both rows differ from what balsync wrote: conflicts, kept."""
    with pg.transaction():
        pg.execute("UPDATE user_balances SET telegram_id = 999 WHERE telegram_id = 1")
        pg.execute("UPDATE user_balances SET telegram_id = 1 WHERE telegram_id = 2")
        pg.execute("UPDATE user_balances SET telegram_id = 2 WHERE telegram_id = 999")
    code, data = sync_json(synced)
    assert balances(pg) == {1: "20.00", 2: "10.00", 3: "30.00"}, (code, data)
    assert code == 1


def test_a_moved_row_leaves_the_memory_of_its_old_id_behind(synced, rds, key_prefix, pg):
    """Row 1 moves to id 7 and a corrected row 1 is inserted: id 1 is still remembered."""
    pg.execute("UPDATE user_balances SET telegram_id = 7 WHERE telegram_id = 1")
    pg.execute("INSERT INTO user_balances (telegram_id, balance) VALUES (1, 15)")
    rds.set(f"{key_prefix}1", "11.00")
    kept(synced, pg, "15.00")
    assert memory(pg)[7] is None


def test_restoring_rows_from_a_backup_is_a_correction_not_overwritten(synced, rds, key_prefix, pg):
    """A row restored with every column of an old backup brings stale memory along; it is
    reset, and what balsync wrote since (kept aside by the delete) makes it a conflict."""
    pg.execute("CREATE TABLE backup AS SELECT * FROM user_balances")
    rds.set(f"{key_prefix}1", "12.00")
    assert sync_json(synced)[0] == 0
    with pg.transaction():
        pg.execute("DELETE FROM user_balances WHERE telegram_id = 1")
        pg.execute("INSERT INTO user_balances SELECT * FROM backup WHERE telegram_id = 1")
    assert memory(pg)[1] is None
    kept(synced, pg, "10.00")


def test_a_full_row_save_of_a_stale_read_is_a_correction(synced, rds, key_prefix, pg):
    """An ORM saves every column it read before balsync wrote 12.00: the memory columns it
    writes back are ignored, so the admin's 10.00 is a conflict, not overwritten."""
    loaded = pg.execute(
        "SELECT balance, balsync_written, balsync_cleared FROM user_balances WHERE telegram_id = 1"
    ).fetchone()
    rds.set(f"{key_prefix}1", "12.00")
    assert sync_json(synced)[0] == 0
    pg.execute(
        """UPDATE user_balances SET balance = %s, balsync_written = %s, balsync_cleared = %s,
           updated_at = now() WHERE telegram_id = 1""",
        loaded,
    )
    assert memory(pg)[1] == "12.00"
    kept(synced, pg, "10.00")


def test_init_db_on_a_copy_takes_the_memory_kept_aside(synced, rds, key_prefix, pg):
    """A copy (LIKE, INSERT SELECT *) synced as an application table, then set up by
    init-db: balsync.written's memory wins over the values copied into its columns."""
    pg.execute("CREATE SCHEMA ledger")
    pg.execute("CREATE TABLE ledger.user_balances (LIKE public.user_balances INCLUDING ALL)")
    pg.execute("INSERT INTO ledger.user_balances SELECT * FROM public.user_balances")
    ledger = Balsync({**synced.env, "BALSYNC_TABLE": "ledger.user_balances"})
    assert sync_json(ledger)[0] == 0
    rds.set(f"{key_prefix}1", "12.00")
    assert sync_json(ledger)[0] == 0
    pg.execute("UPDATE ledger.user_balances SET balance = 10 WHERE telegram_id = 1")
    assert sync_json(ledger)[0] == 1
    ledger.ok("init-db")
    assert memory(pg, "ledger.user_balances")[1] == "12.00"
    kept(ledger, pg, "10.00", "ledger.user_balances")


@pytest.mark.parametrize("role", ["origin", "replica"])
def test_a_row_deleted_and_inserted_in_one_transaction_is_a_conflict(
    synced, rds, key_prefix, pg, role
):
    """Also in a replica session (bulk loaders, logical replication set
    session_replication_role = replica), where ordinary triggers do not fire."""
    with pg.transaction():
        pg.execute(f"SET LOCAL session_replication_role = {role}")
        pg.execute("DELETE FROM user_balances WHERE telegram_id = 1")
        pg.execute("INSERT INTO user_balances (telegram_id, balance) VALUES (1, 15)")
    rds.set(f"{key_prefix}1", "11.00")
    kept(synced, pg, "15.00")


def test_dropping_the_table_fails_without_cascade(synced, pg):
    """A rebuild that drops the table would drop its memory: balsync's view over it makes
    DROP TABLE fail, naming that view; with CASCADE it is the operator's explicit choice."""
    with pytest.raises(psycopg.errors.DependentObjectsStillExist, match="balsync"):
        pg.execute("DROP TABLE user_balances")


def test_dropping_balsyncs_view_stops_every_sync(synced, rds, key_prefix, pg):
    """Without the view a DROP TABLE would go through: refused until init-db."""
    view = pg.execute(
        """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'balsync' AND c.relkind = 'v'"""
    ).fetchone()
    assert view is not None
    pg.execute(f'DROP VIEW balsync."{view[0]}"')
    rds.set(f"{key_prefix}1", "11.00")
    assert sync_json(synced)[0] == 5
    synced.ok("init-db")
    assert sync_json(synced)[0] == 0


def test_an_upsert_by_the_application_is_a_conflict(synced, rds, key_prefix, pg):
    pg.execute(
        """INSERT INTO user_balances (telegram_id, balance) VALUES (1, 15)
           ON CONFLICT (telegram_id) DO UPDATE SET balance = EXCLUDED.balance"""
    )
    rds.set(f"{key_prefix}1", "11.00")
    kept(synced, pg, "15.00")


def test_a_truncate_cascading_from_another_table_keeps_the_memory(synced, rds, key_prefix, pg):
    pg.execute("CREATE TABLE accounts (id bigint PRIMARY KEY)")
    pg.execute("INSERT INTO accounts VALUES (1), (2), (3)")
    pg.execute("ALTER TABLE user_balances ADD FOREIGN KEY (telegram_id) REFERENCES accounts")
    pg.execute("TRUNCATE accounts CASCADE")
    pg.execute("INSERT INTO accounts VALUES (1), (2), (3)")
    pg.execute("INSERT INTO user_balances (telegram_id, balance) VALUES (1, 15), (2, 20)")
    rds.set(f"{key_prefix}1", "11.00")
    kept(synced, pg, "15.00")


def test_a_value_kept_aside_that_balsync_wrote_over_is_not_the_memory(synced, rds, key_prefix, pg):
    """Row 1 deleted (10.00 aside), balsync inserts it again (12.00 in the row); the admin
    sets it back to 10.00: the row's own memory stands, so it is a conflict."""
    pg.execute("DELETE FROM user_balances WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "12.00")
    assert sync_json(synced)[0] == 0
    pg.execute("UPDATE user_balances SET balance = 10 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "13.00")
    kept(synced, pg, "10.00")


def test_on_conflict_db_is_remembered_in_the_row(synced, rds, key_prefix, pg):
    pg.execute("UPDATE user_balances SET balance = 15 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "11.00")
    sync_json(synced, "--on-conflict", "db")
    assert rds.get(f"{key_prefix}1") == b"15.00"
    assert memory(pg)[1] == "15.00"
    code, data = sync_json(synced)
    assert (code, data["updated"], balances(pg)[1]) == (0, 0, "15.00")


def test_a_dry_run_changes_no_memory(synced, rds, key_prefix, pg):
    pg.execute("UPDATE user_balances SET balance = 15 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "11.00")
    rds.set(f"{key_prefix}2", "22.00")
    assert synced("sync", "--dry-run", "--json").exit_code == 1
    assert memory(pg) == {1: "10.00", 2: "20.00", 3: "30.00"}
    kept(synced, pg, "15.00")
    assert balances(pg)[2] == "22.00"


def test_init_db_migrating_while_a_sync_waits_for_its_lock(
    balsync, rds, key_prefix, pg, monkeypatch
):
    """A sync describes an earlier version's table (memory aside), then init-db moves the
    memory into the rows before the sync has its lock: the sync looks again once it has
    it, and the correction made before is still a conflict."""
    pg.execute(
        """CREATE TABLE user_balances (
               telegram_id bigint PRIMARY KEY CHECK (telegram_id > 0),
               balance numeric(20,2) NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"""
    )
    pg.execute("CREATE TABLE wallets (LIKE user_balances INCLUDING ALL)")
    Balsync({**balsync.env, "BALSYNC_TABLE": "wallets"}).ok("init-db")  # no memory columns
    for i, value in {1: "10.00", 2: "20.00"}.items():
        rds.set(f"{key_prefix}{i}", value)
    assert sync_json(balsync)[0] == 0  # memory aside: the table is not init-db's yet
    pg.execute("UPDATE user_balances SET balance = 15 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "11.00")
    original = Schema.describe_target
    ran: list[int] = []

    def describe_then_init_db(self: Any, settings: Any) -> Any:
        target = original(self, settings)
        if not ran:
            ran.append(-1)  # init-db itself must not start another one
            ran[0] = balsync("init-db").exit_code
        return target

    monkeypatch.setattr(Schema, "describe_target", describe_then_init_db)
    code, data = sync_json(balsync)
    assert ran == [0]
    assert balances(pg)[1] == "15.00", (code, data)
    assert code == 1


def test_a_partitioned_table_keeps_its_memory_aside(balsync, rds, key_prefix, pg):
    """A partitioned user_balances: partition triggers would name the partition, and a
    partition's TRUNCATE fires no trigger of the parent; balsync keeps its memory aside, as
    for an application table, and a corrected row is still a conflict."""
    pg.execute(
        """CREATE TABLE user_balances (
               telegram_id bigint PRIMARY KEY CHECK (telegram_id > 0),
               balance numeric(20,2) NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())
           PARTITION BY HASH (telegram_id)"""
    )
    for r in range(2):
        pg.execute(
            f"""CREATE TABLE user_balances_p{r} PARTITION OF user_balances
                FOR VALUES WITH (MODULUS 2, REMAINDER {r})"""
        )
    assert json.loads(balsync.ok("init-db", "--json").stdout)["created"] == ["balsync schema"]
    for i, value in {1: "10.00", 2: "20.00"}.items():
        rds.set(f"{key_prefix}{i}", value)
    assert sync_json(balsync)[0] == 0
    assert aside(pg) == {1: "10.00", 2: "20.00"}
    part = pg.execute("SELECT tableoid::regclass::text FROM user_balances WHERE telegram_id = 1")
    pg.execute(f"TRUNCATE {part.fetchone()[0]}")
    pg.execute("INSERT INTO user_balances (telegram_id, balance) VALUES (1, 15)")
    rds.set(f"{key_prefix}1", "11.00")
    kept(balsync, pg, "15.00")


def test_a_table_rebuilt_by_renaming_the_old_one_away_keeps_its_memory(synced, rds, key_prefix, pg):
    """The old table renamed away, init-db creates a new one, the rows are copied back
    (their memory columns reset on the way in): the old table's memory is set aside for
    the new one, so a correction made before the rebuild is still a conflict."""
    pg.execute("UPDATE user_balances SET balance = 15 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "11.00")
    kept(synced, pg, "15.00")
    rebuild_by_rename(synced, pg)
    assert aside(pg) == {1: "10.00", 2: "20.00", 3: "30.00"}
    kept(synced, pg, "15.00")
    assert aside(pg, "public.user_balances_old") == {}  # its memory stays in its rows


def test_a_table_moved_to_another_schema_keeps_the_memory_it_had_aside(synced, rds, key_prefix, pg):
    """Memory set aside under the old name (a row deleted and inserted again) follows the
    table to its new schema: known by its oid, not its name."""
    pg.execute("DELETE FROM user_balances WHERE telegram_id = 1")
    pg.execute("INSERT INTO user_balances (telegram_id, balance) VALUES (1, 15)")
    pg.execute("CREATE SCHEMA ledger")
    pg.execute("ALTER TABLE user_balances SET SCHEMA ledger")
    ledger = Balsync({**synced.env, "BALSYNC_TABLE": "ledger.user_balances"})
    rds.set(f"{key_prefix}1", "11.00")
    code, data = sync_json(ledger, "--accept-redis-restart")  # a new name: not trusted yet
    assert balances(pg, "ledger.user_balances")[1] == "15.00", (code, data)
    assert code == 1
    ledger.ok("init-db")
    assert aside(pg, "ledger.user_balances") == {1: "10.00"}
    kept(ledger, pg, "15.00", "ledger.user_balances")


def rebuild_by_rename(tool: Balsync, pg: PG) -> None:
    """A DBA's rebuild: the old table renamed away, init-db, every row copied back."""
    pg.execute("ALTER TABLE user_balances RENAME TO user_balances_old")
    tool.ok("init-db")
    pg.execute("INSERT INTO user_balances SELECT * FROM user_balances_old")


def test_a_rebuild_after_a_rolled_back_rebuild_inherits_the_right_tables_memory(
    synced, rds, key_prefix, pg
):
    """A rebuild, rolled back by renames (the new table aside, the old one back), then a
    second rebuild: the table renamed away the second time is the one whose memory the new
    table gets, so a correction made in between is still a conflict."""
    rebuild_by_rename(synced, pg)
    pg.execute("ALTER TABLE user_balances RENAME TO user_balances_failed")
    pg.execute("ALTER TABLE user_balances_old RENAME TO user_balances")
    synced.ok("init-db")
    rds.set(f"{key_prefix}4", "40.00")
    assert sync_json(synced)[0] == 0
    assert memory(pg)[4] == "40.00"
    pg.execute("UPDATE user_balances SET balance = 45 WHERE telegram_id = 4")
    rds.set(f"{key_prefix}4", "41.00")
    code, _ = sync_json(synced)
    assert (code, balances(pg)[4]) == (1, "45.00")
    rebuild_by_rename(synced, pg)
    code, data = sync_json(synced)
    assert balances(pg)[4] == "45.00", (code, data)
    assert code == 1


def test_a_second_rebuild_after_the_first_old_table_was_dropped(synced, rds, key_prefix, pg):
    """The old table of a first rebuild keeps its own view (DROP needs CASCADE); dropped so,
    a second rebuild still works and keeps a correction made in between."""
    rebuild_by_rename(synced, pg)
    with pytest.raises(psycopg.errors.DependentObjectsStillExist):
        pg.execute("DROP TABLE user_balances_old")
    pg.execute("DROP TABLE user_balances_old CASCADE")
    pg.execute("UPDATE user_balances SET balance = 15 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "11.00")
    kept(synced, pg, "15.00")
    rebuild_by_rename(synced, pg)
    kept(synced, pg, "15.00")
