"""`balsync restore`: PostgreSQL's balances back into missing Redis keys, never overwriting one."""

from __future__ import annotations

import json
from decimal import Decimal

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from balance_sync.ops.restore import RestoreOptions, parse_ids, run_restore
from balance_sync.settings import TableName, resolve_settings
from balance_sync.stores.postgres import Database, TableLock
from balance_sync.stores.redis import RedisStore
from balance_sync.validation import parse_balance, redis_value
from tests.helpers import insert_rows
from tests.support.devservers import ValkeyServer, free_port
from tests.support.locked_table import BUDGET, ENDS_WITHIN, ends_in_time, short_deadline, table_lock

Pg = psycopg.Connection[tuple[object, ...]]
JSON_KEYS = {"status", "dry_run", "total", "restored", "already_present", "invalid", "not_found"}


def _json(result: object) -> dict[str, object]:
    assert result.exit_code in (0, 1), (result.exit_code, result.stderr)  # type: ignore[attr-defined]
    data = json.loads(result.stdout)  # type: ignore[attr-defined]
    assert set(data) == JSON_KEYS
    return data  # type: ignore[no-any-return]


def test_restores_missing_keys_and_never_overwrites_one(initialized, rds, pg, key_prefix):
    """Missing keys get PostgreSQL's text; a key the application wrote keeps its value (NX)."""
    insert_rows(pg, {1: "1500.00", 2: "42.50", 3: "-3.50"})
    rds.set(f"{key_prefix}2", "99")
    result = initialized("restore", "--json")
    data = _json(result)
    assert result.exit_code == 0
    assert data == {
        "status": "success",
        "dry_run": False,
        "total": 3,
        "restored": 2,
        "already_present": 1,
        "invalid": 0,
        "not_found": 0,
    }
    assert rds.mget([f"{key_prefix}{i}" for i in (1, 2, 3)]) == [b"1500.00", b"99", b"-3.50"]
    again = _json(initialized("restore", "--json"))
    assert (again["restored"], again["already_present"]) == (0, 3)


def test_a_key_of_another_type_counts_as_present(initialized, rds, pg, key_prefix):
    """SET NX leaves a key of another type alone, and says so."""
    insert_rows(pg, {1: "1.00"})
    rds.hset(f"{key_prefix}1", "x", "1")
    assert _json(initialized("restore", "--json"))["already_present"] == 1
    assert rds.type(f"{key_prefix}1") == b"hash"


def test_dry_run_counts_and_writes_nothing(initialized, rds, pg, key_prefix):
    """--dry-run says how many keys are missing; Redis is left as it was."""
    insert_rows(pg, {1: "1.00", 2: "2.00", 3: "3.00"})
    rds.set(f"{key_prefix}3", "3.00")
    data = _json(initialized("restore", "--dry-run", "--json"))
    assert data["dry_run"] is True
    assert (data["total"], data["restored"], data["already_present"]) == (3, 2, 1)
    assert rds.exists(f"{key_prefix}1", f"{key_prefix}2") == 0
    human = initialized("restore", "--dry-run")
    assert "Dry run" in human.stdout
    assert "would be restored" in human.stdout


def test_ids_restores_only_those_and_counts_ids_without_a_row(initialized, rds, pg, key_prefix):
    """--ids 1,3,7: only those keys; 7 has no row and is counted as not found."""
    insert_rows(pg, {1: "1.00", 2: "2.00", 3: "3.00"})
    data = _json(initialized("restore", "--ids", "1, 3,7,1", "--json"))
    assert (data["total"], data["restored"], data["not_found"]) == (2, 2, 1)
    assert rds.exists(f"{key_prefix}1", f"{key_prefix}3") == 2
    assert rds.exists(f"{key_prefix}2") == 0
    assert "ids without a row" in initialized("restore", "--ids", "9", "--dry-run").stdout


@pytest.mark.parametrize(
    "ids", ["", "1,,2", "abc", "0", "-1", "01", "1.5", "9223372036854775808", "1;2"]
)
def test_a_bad_id_list_is_exit_2(initialized, rds, pg, key_prefix, ids):
    """--ids takes only telegram ids (1..2^63-1, canonical): else exit 2, nothing written."""
    insert_rows(pg, {1: "1.00"})
    result = initialized("restore", "--ids", ids)
    assert result.exit_code == 2
    assert "invalid --ids" in result.stderr
    assert rds.exists(f"{key_prefix}1") == 0


def test_parse_ids_keeps_order_and_drops_repeats():
    """parse_ids: '3,1,3' is (3, 1); the largest id is accepted."""
    assert parse_ids("3,1,3") == (3, 1)
    assert parse_ids("9223372036854775807") == (9223372036854775807,)


def test_cents_format_writes_integer_minor_units(initialized, rds, pg, key_prefix):
    """--value-format cents: 1500.00 becomes '150000', exactly."""
    insert_rows(pg, {1: "1500.00", 2: "0.05", 3: "-3.50", 4: "0.00"})
    data = _json(initialized("restore", "--json", "--value-format", "cents"))
    assert data["restored"] == 4
    values = rds.mget([f"{key_prefix}{i}" for i in (1, 2, 3, 4)])
    assert values == [b"150000", b"5", b"-350", b"0"]


@pytest.mark.parametrize(
    ("text", "value_format", "expected"),
    [
        ("1500.00", "decimal", b"1500.00"),
        ("1500", "decimal", b"1500"),
        ("1500.5", "decimal", b"1500.5"),
        ("1500.500", "decimal", b"1500.50"),
        ("-0.01", "decimal", b"-0.01"),
        ("1500.00", "cents", b"150000"),
        ("1500.5", "cents", b"150050"),
        ("1500", "cents", b"150000"),
        ("0.00", "cents", b"0"),
        ("-0.05", "cents", b"-5"),
        ("999999999999999999.99", "cents", b"99999999999999999999"),
    ],
)
def test_redis_value_is_exact(text, value_format, expected):
    """PostgreSQL's text becomes the value format's text by string arithmetic, no rounding."""
    assert redis_value(text, value_format) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1500.001", "more than 2 decimal places"),
        ("NaN", "not a plain decimal"),
        ("Infinity", "not a plain decimal"),
        ("1e+20", "not a plain decimal"),
        ("", "not a plain decimal"),
        ("1000000000000000000", "out of range"),
    ],
)
def test_redis_value_refuses_what_it_cannot_write_exactly(text, reason):
    """A balance that needs rounding, or is no plain number, or too big, is refused with why."""
    for value_format in ("decimal", "cents"):
        refused = redis_value(text, value_format)
        assert isinstance(refused, str)
        assert reason in refused


@given(st.integers(min_value=-(10**20) + 1, max_value=10**20 - 1))
def test_redis_value_round_trips_through_validation(cents):
    """Whatever restore writes, sync reads back as the same amount, in both formats."""
    sign = "-" if cents < 0 else ""
    text = f"{sign}{abs(cents) // 100}.{abs(cents) % 100:02d}"
    for value_format in ("decimal", "cents"):
        written = redis_value(text, value_format)
        assert isinstance(written, bytes)
        amount = parse_balance(written, value_format=value_format, allow_negative=True)
        assert isinstance(amount, bytes)
        assert Decimal(amount.decode()) == Decimal(text)


def test_rows_that_cannot_be_written_exactly_are_exit_1(balsync, rds, pg, key_prefix):
    """An application table with 3 decimals or NULL: those rows are logged, the rest restored."""
    pg.execute("CREATE TABLE users (id bigint PRIMARY KEY, money numeric)")
    pg.execute("INSERT INTO users VALUES (1, 5), (2, 1.234), (3, NULL), (4, 7.10)")
    args = ("--table", "users", "--id-column", "id", "--balance-column", "money")
    result = balsync("restore", "--json", *args)
    assert result.exit_code == 1
    data = _json(result)
    assert data["status"] == "partial"
    assert (data["total"], data["restored"], data["invalid"]) == (4, 2, 2)
    assert rds.mget([f"{key_prefix}{i}" for i in (1, 2, 3, 4)]) == [b"5", None, None, b"7.10"]
    assert "more than 2 decimal places" in result.stderr
    assert "balance is NULL" in result.stderr
    human = balsync("restore", "--quiet", *args)
    assert human.exit_code == 1
    assert "could not be restored" in human.stderr


def test_skips_while_another_run_holds_the_table_lock(
    initialized, rds, pg, key_prefix, database_url
):
    """A sync or clear-cache holds the lock: exit 0, status skipped, nothing written."""
    insert_rows(pg, {1: "1.00"})
    holder = Database(database_url, retry_timeout=5)
    try:
        assert TableLock(holder).try_lock(TableName("user_balances"), 0)
        result = initialized("restore", "--json")
        human = initialized("restore")
    finally:
        holder.close()
    assert result.exit_code == 0
    assert _json(result)["status"] == "skipped"
    assert "another run holds the lock" in human.stdout
    assert rds.exists(f"{key_prefix}1") == 0


def test_yes_is_accepted_and_nothing_is_asked(initialized, rds, pg, key_prefix):
    """restore never prompts, with or without --yes, even when stdin is not a terminal."""
    insert_rows(pg, {1: "1.00", 2: "2.00"})
    plain = initialized("restore", "--ids", "1")
    assert plain.exit_code == 0, plain.stderr
    assert "restored" in plain.stdout
    assert "?" not in plain.stderr
    yes = _json(initialized("restore", "--yes", "--json"))
    assert (yes["restored"], yes["already_present"]) == (1, 1)


def test_quiet_prints_nothing(initialized, pg):
    """--quiet: a successful restore says nothing."""
    insert_rows(pg, {1: "1.00"})
    result = initialized("restore", "--quiet")
    assert result.exit_code == 0
    assert result.stdout == ""


def test_streams_in_batches(env, initialized, rds, pg, key_prefix):
    """Rows come a batch at a time from a server-side cursor; every one arrives once."""
    insert_rows(pg, {i: f"{i}.00" for i in range(1, 12)})
    result = run_restore(resolve_settings({}, env), RestoreOptions(batch_size=3))
    assert (result.total, result.restored, result.already_present) == (11, 11, 0)
    assert rds.get(f"{key_prefix}11") == b"11.00"


def test_a_broken_stream_resumes_after_the_last_row(
    env, initialized, rds, pg, key_prefix, monkeypatch
):
    """PostgreSQL drops the streaming connection mid-run: it reopens after the last id, once."""
    insert_rows(pg, {i: f"{i}.00" for i in range(1, 11)})
    write = RedisStore.set_missing
    calls = []

    def write_then_cut(self: RedisStore, items: list[tuple[bytes, bytes]]) -> list[bool]:
        calls.append(len(items))
        if len(calls) == 1:  # a real fault: the server ends the streaming backend
            killed = pg.execute(
                """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                   WHERE datname = current_database() AND pid <> pg_backend_pid()
                     AND state = 'idle in transaction'"""
            ).fetchall()
            assert killed == [(True,)]
        return write(self, items)

    monkeypatch.setattr(RedisStore, "set_missing", write_then_cut)
    result = run_restore(resolve_settings({}, env), RestoreOptions(batch_size=4))
    assert (result.total, result.restored, result.already_present) == (10, 10, 0)
    assert calls == [4, 4, 2]
    assert rds.get(f"{key_prefix}10") == b"10.00"


def test_missing_target_table_is_exit_5_naming_init_db(balsync):
    """No target table: one line saying to run init-db, exit 5."""
    result = balsync("restore")
    assert result.exit_code == 5
    assert "init-db" in result.stderr


def test_redis_unavailable_is_exit_3(initialized):
    """Redis down: exit 3."""
    env = {"BALSYNC_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "BALSYNC_RETRY_TIMEOUT": "0"}
    result = initialized("restore", env=env)
    assert result.exit_code == 3
    assert "Redis" in result.stderr


def test_postgres_unavailable_is_exit_4(balsync):
    """PostgreSQL down: exit 4."""
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    result = balsync("restore", env={"BALSYNC_DATABASE_URL": url, "BALSYNC_RETRY_TIMEOUT": "0"})
    assert result.exit_code == 4
    assert "PostgreSQL" in result.stderr


def test_help_says_why_no_confirmation_is_asked(balsync):
    """--help documents the NX guarantee, the absence of a prompt, and examples."""
    result = balsync("restore", "--help")
    assert result.exit_code == 0
    for text in ("NX", "asks no confirmation", "--ids", "--dry-run", "Example"):
        assert text in result.stdout


def test_redis_lost_mid_run_is_exit_3(initialized, pg, tmp_path, monkeypatch):
    """Redis dies after the first batch: exit 3, the stream is closed cleanly."""
    server = ValkeyServer(tmp_path / "valkey").start()
    pg.execute(  # more rows than one batch holds
        """INSERT INTO user_balances (telegram_id, balance)
           SELECT g, g FROM generate_series(1, 2500) g"""
    )
    write = RedisStore.set_missing

    def write_then_die(self: RedisStore, items: list[tuple[bytes, bytes]]) -> list[bool]:
        written = write(self, items)
        server.stop()
        return written

    monkeypatch.setattr(RedisStore, "set_missing", write_then_die)
    env = {"BALSYNC_REDIS_URL": server.url, "BALSYNC_RETRY_TIMEOUT": "0"}
    try:
        result = initialized("restore", env=env)
    finally:
        server.stop()
    assert result.exit_code == 3
    assert "Redis" in result.stderr


def test_a_locked_table_ends_restore_with_exit_4_and_releases_the_lock(
    initialized, rds, pg, key_prefix, database_url, monkeypatch
):
    """Another session holds the table ACCESS EXCLUSIVE: exit 4 after about one deadline
    instead of waiting forever, and balsync's own lock goes, so the next sync runs."""
    insert_rows(pg, {1: "1.00", 2: "2.00"})
    short_deadline(monkeypatch)
    with table_lock(database_url) as lock:
        result, took = ends_in_time(lock, lambda: initialized("restore", "--retry-timeout", BUDGET))
    assert result.exit_code == 4, (result.stdout, result.stderr)
    assert "PostgreSQL" in result.stderr
    assert took < ENDS_WITHIN, f"took {took:.1f}s"
    sync = initialized("sync", "--json", "--force")
    assert json.loads(sync.stdout)["status"] == "success", sync.stdout
    assert _json(initialized("restore", "--json"))["restored"] == 2


def test_a_table_locked_mid_stream_keeps_the_keys_written_and_a_rerun_converges(
    initialized, rds, pg, key_prefix, database_url, monkeypatch
):
    """The stream breaks after its first batch and the table is locked before it reopens:
    exit 4 within the deadline and budget; that batch's keys stay, and a rerun restores the
    rest exactly."""
    pg.execute(  # three batches of restore's 1000
        """INSERT INTO user_balances (telegram_id, balance)
           SELECT g, g / 100.0 FROM generate_series(1, 2500) g"""
    )
    short_deadline(monkeypatch)
    write = RedisStore.set_missing
    with table_lock(database_url, taken=False) as lock:

        def write_then_lock(self: RedisStore, items: list[tuple[bytes, bytes]]) -> list[bool]:
            if not lock.held:  # the first batch: end the stream's backend, lock the table
                killed = pg.execute(
                    """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                       WHERE datname = current_database() AND pid <> pg_backend_pid()
                         AND state = 'idle in transaction'"""
                ).fetchall()
                assert killed == [(True,)]
                lock.take()
            return write(self, items)

        monkeypatch.setattr(RedisStore, "set_missing", write_then_lock)
        result, took = ends_in_time(lock, lambda: initialized("restore", "--retry-timeout", BUDGET))
    monkeypatch.setattr(RedisStore, "set_missing", write)
    assert result.exit_code == 4, (result.stdout, result.stderr)
    # Stopped where it next meets the locked table: reopening the stream, or remembering
    # the first batch's keys in their rows.
    assert "did not resume" in result.stderr or "did not answer" in result.stderr
    assert took < ENDS_WITHIN, f"took {took:.1f}s"
    first = [f"{key_prefix}{i}" for i in range(1, 1001)]
    assert rds.mget(first) == [format(Decimal(i) / 100, ".2f").encode() for i in range(1, 1001)]
    assert rds.exists(f"{key_prefix}1001") == 0
    rerun = _json(initialized("restore", "--json"))
    assert (rerun["total"], rerun["restored"], rerun["already_present"]) == (2500, 1500, 1000)
    persisted = dict(pg.execute("SELECT telegram_id, balance::text FROM user_balances"))
    keys = [f"{key_prefix}{i}" for i in persisted]
    assert dict(zip(persisted, rds.mget(keys), strict=True)) == {
        i: b.encode() for i, b in persisted.items()
    }
