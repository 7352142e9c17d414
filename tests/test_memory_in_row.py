"""balsync's memory in the rows of init-db's table: how it is set up and migrated, and
what keeps it when rows, columns or triggers go."""

from __future__ import annotations

import json
import os
from typing import Any

import psycopg
import pytest

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
    pg.execute("DROP FUNCTION balsync.target_id(text)")
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
        "ALTER TABLE user_balances RENAME COLUMN balsync_written TO written_before",
    ],
    ids=["delete-trigger", "truncate-trigger", "disabled", "renamed-column"],
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
