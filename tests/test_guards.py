"""Guards against silent loss: rows changed behind balsync's back, Redis restarts, rounding."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from tests.helpers import Balsync, balances, seed
from tests.support.devservers import ValkeyServer


def sync_json(balsync: Balsync, *args: str) -> tuple[int, dict[str, object]]:
    result = balsync("sync", "--json", "--force", *args)
    assert result.stdout, result.stderr
    return result.exit_code, json.loads(result.stdout)


def conflicts_json(balsync: Balsync, *args: str) -> dict[str, Any]:
    result = balsync.ok("conflicts", "--json", *args)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def synced(initialized: Balsync, rds: redis.Redis, key_prefix: str) -> Balsync:
    """Ids 1..5 synced once, so balsync remembers what it wrote."""
    rds.mset({f"{key_prefix}{i}": f"{i}.00" for i in range(1, 6)})
    code, data = sync_json(initialized)
    assert (code, data["inserted"]) == (0, 5)
    return initialized


def test_row_changed_in_postgres_is_kept_and_reported(synced, rds, key_prefix, pg):
    """An admin correction is not overwritten by a stale or newer Redis value: exit 1."""
    pg.execute("UPDATE user_balances SET balance = 100 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}2", "20.00")  # an ordinary change elsewhere still goes through
    code, data = sync_json(synced)
    assert code == 1
    assert data["status"] == "partial"
    assert (data["updated"], data["skipped"], data["invalid"]) == (1, 1, 0)
    assert balances(pg)[1] == "100.00"
    assert balances(pg)[2] == "20.00"
    listed = conflicts_json(synced)
    assert listed["run_id"] == data["run_id"]
    assert listed["conflicts"] == [
        {
            "telegram_id": 1,
            "db_value": "100.00",
            "redis_value": "1.00",
            "last_written": "1.00",
            "kind": "changed_in_db",
            "resolution": "kept",
        }
    ]


def test_conflict_is_reported_again_until_resolved(synced, pg):
    """A kept conflict stays a conflict on the next run; nothing drifts silently."""
    pg.execute("UPDATE user_balances SET balance = 100 WHERE telegram_id = 1")
    assert sync_json(synced)[0] == 1
    assert sync_json(synced)[0] == 1
    assert balances(pg)[1] == "100.00"


def test_on_conflict_redis_overwrites_and_records(synced, pg):
    """--on-conflict redis: Redis wins, the conflict is listed as resolved, exit 0."""
    pg.execute("UPDATE user_balances SET balance = 100 WHERE telegram_id = 1")
    code, data = sync_json(synced, "--on-conflict", "redis")
    assert (code, data["updated"], data["skipped"]) == (0, 1, 0)
    assert balances(pg)[1] == "1.00"
    assert conflicts_json(synced)["conflicts"][0]["resolution"] == "redis"
    assert sync_json(synced)[0] == 0  # and it is no conflict any more


def test_on_conflict_db_keeps_postgres_and_gives_redis_its_value(synced, rds, key_prefix, pg):
    """--on-conflict db: PostgreSQL wins and Redis is set to its value, exit 0."""
    pg.execute("UPDATE user_balances SET balance = 100 WHERE telegram_id = 1")
    code, data = sync_json(synced, "--on-conflict", "db")
    assert (code, data["updated"], data["skipped"]) == (0, 0, 0)
    assert balances(pg)[1] == "100.00"
    assert rds.get(f"{key_prefix}1") == b"100.00"
    code, data = sync_json(synced)
    assert (code, data["unchanged"]) == (0, 5)


def test_on_conflict_db_writes_cents_in_cents(initialized, rds, key_prefix, pg):
    """The database's value goes back to Redis in the configured value format."""
    rds.set(f"{key_prefix}1", "150")
    assert sync_json(initialized, "--value-format", "cents")[0] == 0
    pg.execute("UPDATE user_balances SET balance = 2.05 WHERE telegram_id = 1")
    code, _ = sync_json(initialized, "--value-format", "cents", "--on-conflict", "db")
    assert code == 0
    assert rds.get(f"{key_prefix}1") == b"205"


def test_rows_never_written_by_balsync_are_updated(initialized, rds, key_prefix, pg):
    """Rows that predate balsync carry no memory: they are updated, not conflicts."""
    initialized.ok("sync", "--force", "--quiet")  # creates nothing, but records a run
    pg.execute("INSERT INTO user_balances (telegram_id, balance) VALUES (1, 5), (2, 6)")
    rds.mset({f"{key_prefix}1": "50", f"{key_prefix}2": "6"})
    code, data = sync_json(initialized)
    assert (code, data["updated"], data["unchanged"]) == (0, 1, 1)


def test_dry_run_reports_conflicts_without_writing(synced, pg):
    """A dry run counts a conflict as skipped and changes nothing."""
    pg.execute("UPDATE user_balances SET balance = 100 WHERE telegram_id = 1")
    code, data = sync_json(synced, "--dry-run")
    assert (code, data["skipped"], data["run_id"]) == (1, 1, None)
    assert conflicts_json(synced)["conflicts"] == []


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[ValkeyServer]:
    """A Redis of this test's own, to restart."""
    server = ValkeyServer(tmp_path / "valkey").start()
    yield server
    server.stop()


def test_redis_restart_holds_overwrites_until_accepted(initialized, own_redis, key_prefix, pg):
    """After Redis restarts, differing rows are held (exit 1), new ids still inserted; a run
    with --accept-redis-restart overwrites them and trusts the new Redis from then on."""
    env = {"BALSYNC_REDIS_URL": own_redis.url}
    client = redis.Redis.from_url(own_redis.url)
    client.mset({f"{key_prefix}1": "1500.00", f"{key_prefix}2": "20.00"})
    code, _ = sync_json(Balsync({**initialized.env, **env}))
    assert code == 0
    client.close()
    own_redis.stop()
    own_redis.start()  # nothing on disk: it comes back empty
    client = redis.Redis.from_url(own_redis.url)
    # The application increments a missing key: 1500 becomes the increment.
    client.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "20.00", f"{key_prefix}3": "3"})
    tool = Balsync({**initialized.env, **env})
    code, data = sync_json(tool)
    assert code == 1
    assert (data["inserted"], data["updated"], data["skipped"]) == (1, 0, 1)
    assert balances(pg) == {1: "1500.00", 2: "20.00", 3: "3.00"}
    held = conflicts_json(tool)["conflicts"]
    assert [(c["telegram_id"], c["kind"]) for c in held] == [(1, "redis_restarted")]
    assert sync_json(tool)[0] == 1  # still held on the next run
    code, data = sync_json(tool, "--accept-redis-restart")
    assert (code, data["updated"]) == (0, 1)
    assert balances(pg)[1] == "10.00"
    client.set(f"{key_prefix}2", "21")
    code, data = sync_json(tool)
    assert (code, data["updated"]) == (0, 1)
    client.close()


def test_redis_restart_with_nothing_differing_is_trusted(initialized, own_redis, key_prefix, pg):
    """A restart that lost nothing (every row still equals Redis) needs no operator."""
    env = {**initialized.env, "BALSYNC_REDIS_URL": own_redis.url}
    client = redis.Redis.from_url(own_redis.url)
    client.set(f"{key_prefix}1", "5")
    assert sync_json(Balsync(env))[0] == 0
    client.close()
    own_redis.stop()
    own_redis.start()
    client = redis.Redis.from_url(own_redis.url)
    client.set(f"{key_prefix}1", "5")
    assert sync_json(Balsync(env))[0] == 0
    client.set(f"{key_prefix}1", "6")
    code, data = sync_json(Balsync(env))
    assert (code, data["updated"]) == (0, 1)
    client.close()


@pytest.mark.parametrize(
    ("raw", "fmt", "stored"),
    [
        ("0.30", "decimal", "0.30"),  # 0.1 + 0.2, which a float makes 0.30000000000000004
        ("99999999999999999.99", "decimal", "99999999999999999.99"),  # 10^17 - 0.01
        ("999999999999999999.99", "decimal", "999999999999999999.99"),
        ("-0.01", "decimal", "-0.01"),
        ("30", "cents", "0.30"),
        ("9999999999999999999", "cents", "99999999999999999.99"),
        ("99999999999999999999", "cents", "999999999999999999.99"),
    ],
)
def test_values_reach_postgres_exactly(initialized, rds, key_prefix, pg, raw, fmt, stored):
    """No value is rounded or passed through a float on its way to PostgreSQL."""
    rds.set(f"{key_prefix}42", raw)
    code, _ = sync_json(initialized, "--value-format", fmt, "--allow-negative")
    assert code == 0
    assert balances(pg) == {42: stored}
    assert Decimal(stored) == (Decimal(raw) / 100 if fmt == "cents" else Decimal(raw))


def test_conflicts_needs_init_db(balsync):
    """`balsync conflicts` before init-db says what to do, exit 5."""
    result = balsync("conflicts")
    assert result.exit_code == 5
    assert "init-db" in result.stderr


def test_conflicts_of_a_run_without_any(synced):
    """A run with no conflicts lists none."""
    assert conflicts_json(synced, "--run", "1") == {"run_id": 1, "conflicts": []}
    assert "no conflicts" in synced.ok("conflicts").stdout


def test_written_memory_is_kept_in_the_rows_of_init_dbs_table(synced, database_url):
    """In init-db's table what balsync remembers lives beside each balance it wrote; its
    own schema holds none of it (one tuple and one index per write)."""
    with psycopg.connect(database_url) as conn:
        remembered = conn.execute(
            "SELECT count(*) FROM user_balances WHERE balsync_written = balance"
        ).fetchone()
        aside = conn.execute("SELECT count(*) FROM balsync.written").fetchone()
    assert (remembered, aside) == ((5,), (0,))


def test_written_memory_of_an_application_table_is_kept_in_balsync_schema(
    balsync, rds, key_prefix, pg, database_url
):
    """balsync never alters an application's table: its memory lives in balsync.written."""
    pg.execute("CREATE TABLE wallets (telegram_id bigint PRIMARY KEY, balance numeric(20,2))")
    balsync.ok("init-db", "--table", "wallets")
    seed(rds, key_prefix, {1: "1.00", 2: "2.00"})
    sync_json(balsync, "--table", "wallets")
    with psycopg.connect(database_url) as conn:
        count = conn.execute(
            """SELECT count(*) FROM balsync.written w JOIN balsync.targets t ON t.id = w.target_id
               WHERE t.target_table = 'public.wallets'"""
        ).fetchone()
        columns = conn.execute(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'wallets'::regclass"
            " AND attname LIKE 'balsync%'"
        ).fetchone()
    assert (count, columns) == ((2,), (0,))


def test_restored_keys_are_no_conflict_later(synced, rds, key_prefix, pg):
    """The outage path: the application wrote PostgreSQL directly, Redis lost the key,
    `balsync restore` put PostgreSQL's value back; the next change in Redis is an update."""
    pg.execute("UPDATE user_balances SET balance = 70 WHERE telegram_id = 1")
    rds.delete(f"{key_prefix}1")
    restored = json.loads(synced.ok("restore", "--json").stdout)
    assert restored["restored"] == 1
    assert rds.get(f"{key_prefix}1") == b"70.00"
    rds.set(f"{key_prefix}1", "75")
    code, data = sync_json(synced)
    assert (code, data["updated"], data["skipped"]) == (0, 1, 0)
    assert balances(pg)[1] == "75.00"


def test_an_outside_write_that_matches_redis_is_adopted(synced, rds, key_prefix, pg):
    """A row that agrees with Redis is remembered as it stands, whoever wrote it: the next
    change in Redis is an ordinary update, not a false conflict."""
    pg.execute("UPDATE user_balances SET balance = 7 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "7")
    assert sync_json(synced)[0] == 0
    rds.set(f"{key_prefix}1", "8")
    code, data = sync_json(synced)
    assert (code, data["updated"], data["skipped"]) == (0, 1, 0)
    assert balances(pg)[1] == "8.00"


def test_an_adopted_table_guards_an_admin_correction(initialized, rds, key_prefix, pg):
    """An application table whose rows already agree with Redis: balsync remembers them
    on its first run, so a later admin correction is a conflict, not overwritten."""
    pg.execute("CREATE TABLE users (id bigint PRIMARY KEY, balance numeric(20,2) NOT NULL)")
    pg.execute("INSERT INTO users VALUES (1, 1500), (2, 20)")
    rds.mset({f"{key_prefix}1": "1500.00", f"{key_prefix}2": "20.00"})
    tool = Balsync({**initialized.env, "BALSYNC_TABLE": "users", "BALSYNC_ID_COLUMN": "id"})
    code, data = sync_json(tool)
    assert (code, data["unchanged"]) == (0, 2)
    pg.execute("UPDATE users SET balance = 1400 WHERE id = 1")  # the admin's correction
    code, data = sync_json(tool)
    assert (code, data["skipped"]) == (1, 1)
    rows = dict(pg.execute("SELECT id, balance::text FROM users").fetchall())
    assert rows == {1: "1400.00", 2: "20.00"}


def test_a_correction_redis_cannot_hold_is_not_remembered(initialized, rds, key_prefix, pg):
    """--on-conflict db whose value cannot go back to Redis (more decimals than Redis
    keeps) leaves Redis as it is, and balsync does not pretend it did: still a conflict."""
    pg.execute(
        "CREATE TABLE wallets (telegram_id bigint PRIMARY KEY, balance numeric(20,4) NOT NULL)"
    )
    rds.set(f"{key_prefix}1", "10.00")
    tool = Balsync({**initialized.env, "BALSYNC_TABLE": "wallets"})
    assert sync_json(tool)[0] == 0
    pg.execute("UPDATE wallets SET balance = 12.3456 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "11.00")
    code, _ = sync_json(tool, "--on-conflict", "db")
    assert code == 1  # nothing was resolved
    assert rds.get(f"{key_prefix}1") == b"11.00"
    code, data = sync_json(tool)
    assert (code, data["skipped"]) == (1, 1)
    rows = dict(pg.execute("SELECT telegram_id, balance::text FROM wallets").fetchall())
    assert rows == {1: "12.3456"}


def test_a_correction_the_bot_overtook_is_not_remembered(synced, rds, key_prefix, pg, monkeypatch):
    """The bot writes between balsync's read and its compare-and-set: Redis keeps the bot's
    value, and the admin's correction stays guarded (a conflict again next run)."""
    from balance_sync.stores.redis import RedisStore

    real = RedisStore.set_if_equal

    def bot_writes_first(self: RedisStore, items: list[tuple[bytes, bytes, bytes]]) -> object:
        for key, _, _ in items:
            rds.set(key, "99.00")
        return real(self, items)

    pg.execute("UPDATE user_balances SET balance = 100 WHERE telegram_id = 1")
    monkeypatch.setattr(RedisStore, "set_if_equal", bot_writes_first)
    code, _ = sync_json(synced, "--on-conflict", "db")
    monkeypatch.undo()
    assert code == 1
    assert rds.get(f"{key_prefix}1") == b"99.00"
    code, data = sync_json(synced)
    assert (code, data["skipped"]) == (1, 1)
    assert balances(pg)[1] == "100.00"


# -- sequences in which the memory must outlive what happens to the row ---------------------


def test_a_row_deleted_and_inserted_again_with_another_balance_is_a_conflict(
    initialized, rds, key_prefix, pg
):
    """An admin replaces a row (DELETE, then INSERT with 50.00) after balsync wrote 100.00;
    Redis then holds 110.00. The row differs from what balsync last wrote: kept, reported,
    exit 1. Memory that died with the row would let 110.00 overwrite the correction."""
    rds.set(f"{key_prefix}1", "100.00")
    assert sync_json(initialized)[0] == 0
    pg.execute("DELETE FROM user_balances WHERE telegram_id = 1")
    pg.execute("INSERT INTO user_balances (telegram_id, balance) VALUES (1, 50)")
    rds.set(f"{key_prefix}1", "110.00")
    code, data = sync_json(initialized)
    assert balances(pg) == {1: "50.00"}
    assert (code, data["updated"], data["skipped"]) == (1, 0, 1)
    listed = conflicts_json(initialized)["conflicts"]
    assert [(c["telegram_id"], c["last_written"]) for c in listed] == [(1, "100.00")]


def test_a_correction_under_the_other_spelling_of_the_table_is_a_conflict(
    initialized, rds, key_prefix, pg
):
    """`public.user_balances` and `user_balances` are one table: after a sync under one
    spelling, a correction is a conflict under the other."""
    qualified = Balsync({**initialized.env, "BALSYNC_TABLE": "public.user_balances"})
    rds.set(f"{key_prefix}1", "10.00")
    assert sync_json(qualified)[0] == 0
    pg.execute("UPDATE user_balances SET balance = 15 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "11.00")
    code, data = sync_json(initialized)
    assert (code, data["skipped"]) == (1, 1)
    assert balances(pg) == {1: "15.00"}


def test_after_on_conflict_db_redis_changes_update_and_corrections_conflict_again(
    initialized, rds, key_prefix, pg
):
    """--on-conflict db gives Redis the database's value and remembers it: the next change
    in Redis is an ordinary update, and a later correction is a conflict again."""
    rds.set(f"{key_prefix}1", "10.00")
    assert sync_json(initialized)[0] == 0
    pg.execute("UPDATE user_balances SET balance = 15 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "11.00")
    assert sync_json(initialized, "--on-conflict", "db")[0] == 0
    assert rds.get(f"{key_prefix}1") == b"15.00"
    rds.set(f"{key_prefix}1", "16.00")
    assert sync_json(initialized)[0] == 0
    assert balances(pg) == {1: "16.00"}
    pg.execute("UPDATE user_balances SET balance = 2 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "17.00")
    assert sync_json(initialized)[0] == 1
    assert balances(pg) == {1: "2.00"}


def test_after_on_conflict_redis_the_written_value_is_what_is_remembered(
    initialized, rds, key_prefix, pg
):
    """--on-conflict redis overwrites the correction and remembers Redis's value: a new
    change in Redis is an update, a new correction a conflict."""
    rds.set(f"{key_prefix}1", "10.00")
    assert sync_json(initialized)[0] == 0
    pg.execute("UPDATE user_balances SET balance = 15 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "11.00")
    assert sync_json(initialized, "--on-conflict", "redis")[0] == 0
    assert balances(pg) == {1: "11.00"}
    rds.set(f"{key_prefix}1", "12.00")
    assert sync_json(initialized)[0] == 0
    assert balances(pg) == {1: "12.00"}
    pg.execute("UPDATE user_balances SET balance = 3 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "13.00")
    assert sync_json(initialized)[0] == 1
    assert balances(pg) == {1: "3.00"}


def test_a_row_the_application_inserted_is_guarded_once_it_agreed(initialized, rds, key_prefix, pg):
    """A row the application inserted, agreeing with Redis, is remembered by the next sync:
    a correction after that is a conflict."""
    pg.execute("INSERT INTO user_balances (telegram_id, balance) VALUES (1, 10)")
    rds.set(f"{key_prefix}1", "10.00")
    code, data = sync_json(initialized)
    assert (code, data["updated"]) == (0, 0)
    pg.execute("UPDATE user_balances SET balance = 15 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "11.00")
    assert sync_json(initialized)[0] == 1
    assert balances(pg) == {1: "15.00"}


def test_a_correction_in_a_renamed_table_is_a_conflict(initialized, rds, key_prefix, pg):
    """ALTER TABLE user_balances RENAME, then a correction: synced under the new name, the
    row is not overwritten (exit 1)."""
    rds.set(f"{key_prefix}1", "10.00")
    assert sync_json(initialized)[0] == 0
    pg.execute("ALTER TABLE user_balances RENAME TO balances_v2")
    renamed = Balsync({**initialized.env, "BALSYNC_TABLE": "balances_v2"})
    pg.execute("UPDATE balances_v2 SET balance = 15 WHERE telegram_id = 1")
    rds.set(f"{key_prefix}1", "11.00")
    code, data = sync_json(renamed)
    assert (code, data["skipped"]) == (1, 1)
    assert balances(pg, "balances_v2") == {1: "15.00"}
