"""The application's writer: never invents a balance, reads through to PostgreSQL, applies an
adjustment at most once, exactly, whatever the amount."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import balance_sync
from balance_sync.errors import PostgresUnavailable
from balance_sync.ops.sync import SyncOptions, run_sync
from balance_sync.settings import resolve_settings
from balance_sync.stores.redis import adjustment_key, dirty_keys
from balance_sync.writer import (
    BalanceInvalid,
    BalanceMissing,
    BalanceWriter,
    DatabaseLoader,
    database_loader,
)
from tests.helpers import (
    Balsync,
    Servers,
    assert_loader_idle,
    balances,
    incremental,
    insert_rows,
    own_keys,
)

Pg = psycopg.Connection[tuple[object, ...]]
LIMIT_CENTS = 10**20


@pytest.fixture
def loader(initialized: Balsync, database_url: str) -> Iterator[DatabaseLoader]:
    """A read-through to the test's user_balances (after init-db)."""
    with database_loader(database_url) as load:
        yield load


@pytest.fixture
def writer(rds: redis.Redis, key_prefix: str) -> BalanceWriter:
    """A writer with no loader."""
    return BalanceWriter(rds, prefix=key_prefix)


@pytest.fixture
def reading(rds: redis.Redis, key_prefix: str, loader: DatabaseLoader) -> BalanceWriter:
    """A writer that reads missing balances through to PostgreSQL."""
    return BalanceWriter(rds, prefix=key_prefix, loader=loader)


# -- never invent a balance ---------------------------------------------------------------


def test_adjust_of_a_missing_key_without_a_loader_raises_and_writes_nothing(
    writer, rds, key_prefix
):
    """No key, no loader: BalanceMissing, and no key, mark or record is made."""
    with pytest.raises(BalanceMissing) as caught:
        writer.adjust(42, "5")
    assert (caught.value.telegram_id, caught.value.looked_up) == (42, False)
    assert own_keys(rds, key_prefix) == set()


def test_cleared_key_is_never_overwritten_by_the_increment(
    initialized, rds, key_prefix, pg, writer, reading
):
    """After clear-cache removed a persisted key, adjust(42, 5) never syncs 5.00 over 1500.00:
    without a loader it raises; with one it reads 1500.00 through and syncs 1505.00."""
    writer.set(42, "1500.00")
    assert incremental(initialized)["inserted"] == 1
    assert json.loads(initialized("clear-cache", "--yes", "--json").stdout)["deleted"] == 1
    with pytest.raises(BalanceMissing):
        writer.adjust(42, "5")
    assert rds.get(f"{key_prefix}42") is None
    initialized.ok("sync", "--force", "--quiet")
    assert balances(pg) == {42: "1500.00"}
    assert reading.adjust(42, "5") == Decimal("1505.00")
    assert rds.get(f"{key_prefix}42") == b"1505.00"
    assert incremental(initialized)["updated"] == 1
    assert balances(pg) == {42: "1505.00"}


def test_set_needs_no_balance_before_it(writer, rds, key_prefix):
    """set() is unchanged: it writes the amount given, missing key or not."""
    writer.set(7, "2.50")
    assert rds.get(f"{key_prefix}7") == b"2.50"


# -- read-through to PostgreSQL -------------------------------------------------------------


def test_read_through_starts_from_the_persisted_balance_and_marks(reading, pg, rds, key_prefix):
    """A missing key starts from the row (in the value format in use), then is adjusted."""
    insert_rows(pg, {5: "1500.00"})
    assert reading.adjust(5, "-0.01") == Decimal("1499.99")
    assert rds.get(f"{key_prefix}5") == b"1499.99"
    assert rds.smembers(dirty_keys(key_prefix)[0]) == {b"5"}


def test_read_through_in_cents(rds, key_prefix, loader, pg):
    """In cents the persisted 1500.00 goes back as 150000, then the adjustment is added."""
    insert_rows(pg, {5: "1500.00"})
    cents = BalanceWriter(rds, prefix=key_prefix, loader=loader, value_format="cents")
    assert cents.adjust(5, "0.25") == Decimal("1500.25")
    assert rds.get(f"{key_prefix}5") == b"150025"


def test_a_value_written_while_postgresql_is_read_wins_and_is_adjusted(rds, key_prefix, loader, pg):
    """SET NX race: another writer puts 7.00 while the loader reads 1500.00; 7.00 wins and
    the adjustment lands on it, never on the stale persisted value."""
    insert_rows(pg, {9: "1500.00"})

    def racing(telegram_id: int) -> Decimal | None:
        value: Decimal | None = loader(telegram_id)
        rds.set(f"{key_prefix}{telegram_id}", "7.00")  # the other writer, meanwhile
        return value

    writer = BalanceWriter(rds, prefix=key_prefix, loader=racing)
    assert writer.adjust(9, "1.00") == Decimal("8.00")
    assert rds.get(f"{key_prefix}9") == b"8.00"


def test_concurrent_adjustments_of_a_missing_key_all_land_once(rds, key_prefix, loader, pg):
    """Eight threads adjust one missing key 25 times each: every one reads through or finds
    the key another put back, and the sum is exact."""
    insert_rows(pg, {11: "100.00"})
    writer = BalanceWriter(rds, prefix=key_prefix, loader=loader)
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(25):
            writer.adjust(11, "1.00")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert rds.get(f"{key_prefix}11") == b"300.00"


def test_a_new_user_starts_from_zero_only_when_asked(reading, rds, key_prefix):
    """No key and no row: BalanceMissing (nothing written) unless missing='zero'."""
    with pytest.raises(BalanceMissing) as caught:
        reading.adjust(77, "5")
    assert caught.value.looked_up is True
    assert rds.get(f"{key_prefix}77") is None
    assert reading.adjust(77, "5", missing="zero") == Decimal("5.00")
    assert rds.get(f"{key_prefix}77") == b"5.00"


def test_missing_zero_never_zeroes_a_persisted_balance(reading, pg, rds, key_prefix):
    """missing='zero' applies to ids with no row: a row that exists is the starting point."""
    insert_rows(pg, {78: "1500.00"})
    assert reading.adjust(78, "5", missing="zero") == Decimal("1505.00")


def test_missing_zero_needs_a_loader(writer, rds, key_prefix):
    """Without PostgreSQL a new user cannot be told from a lost key: refused, nothing written."""
    with pytest.raises(ValueError, match="needs a loader"):
        writer.adjust(79, "5", missing="zero")
    assert own_keys(rds, key_prefix) == set()


def test_loader_reads_an_application_table_with_its_own_columns(rds, key_prefix, pg, database_url):
    """table, id_column and balance_column name an application's own table, schema and all."""
    pg.execute("CREATE SCHEMA app")
    pg.execute("CREATE TABLE app.users (uid bigint, money numeric(12, 2))")
    pg.execute("INSERT INTO app.users VALUES (3, 12.50)")
    with database_loader(
        database_url, table="app.users", id_column="uid", balance_column="money"
    ) as load:
        assert load(3) == Decimal("12.50")
        assert load(4) is None
        assert BalanceWriter(rds, prefix=key_prefix, loader=load).adjust(3, "1") == Decimal("13.50")


@pytest.mark.parametrize(
    ("rows", "why"),
    [(["NULL"], "NULL"), (["1.00", "2.00"], "1.00, 2.00"), (["1.005"], "1.005")],
)
def test_a_row_that_vouches_for_no_single_balance_is_refused(
    rows, why, rds, key_prefix, pg, database_url
):
    """NULL, two rows that disagree, or a value that needs rounding: BalanceInvalid, nothing
    written, never 0."""
    pg.execute("CREATE TABLE users (uid bigint, money numeric)")
    for value in rows:
        pg.execute(f"INSERT INTO users VALUES (3, {value})")
    with database_loader(
        database_url, table="users", id_column="uid", balance_column="money"
    ) as load:
        writer = BalanceWriter(rds, prefix=key_prefix, loader=load)
        with pytest.raises(BalanceInvalid):
            writer.adjust(3, "1")
    assert own_keys(rds, key_prefix) == set()


def test_postgresql_unreachable_writes_nothing(rds, key_prefix):
    """A loader that cannot reach PostgreSQL raises PostgresUnavailable; Redis is untouched."""
    with database_loader("postgresql://postgres@127.0.0.1:1/none", timeout=1) as load:
        writer = BalanceWriter(rds, prefix=key_prefix, loader=load)
        with pytest.raises(PostgresUnavailable):
            writer.adjust(3, "1")
    assert own_keys(rds, key_prefix) == set()


def test_loader_holds_no_transaction_open(reading, pg, database_url):
    """After a lookup the pool's connection is idle, not idle in transaction."""
    insert_rows(pg, {5: "1.00"})
    reading.adjust(5, "1")
    assert_loader_idle(pg)


# -- at most once ---------------------------------------------------------------------------


def test_the_same_adjustment_id_is_applied_once(writer, rds, key_prefix):
    """A retry with the same id returns the first result and changes nothing."""
    writer.set(1, "10.00")
    assert writer.adjust(1, "2.50", adjustment_id="pay-1") == Decimal("12.50")
    writer.set(1, "20.00")  # the balance moves on
    assert writer.adjust(1, "2.50", adjustment_id="pay-1") == Decimal("12.50")
    assert rds.get(f"{key_prefix}1") == b"20.00"
    assert writer.adjust(1, "2.50", adjustment_id="pay-2") == Decimal("22.50")


def test_an_adjustment_id_reused_with_another_amount_is_refused(writer, rds, key_prefix):
    """An id names one adjustment: another amount under it is an error, not a silent no-op."""
    writer.set(1, "10.00")
    writer.adjust(1, "1", adjustment_id="x")
    with pytest.raises(ValueError, match="another amount"):
        writer.adjust(1, "2", adjustment_id="x")
    assert rds.get(f"{key_prefix}1") == b"11.00"


def test_an_adjustment_record_expires(rds, key_prefix):
    """The record of an applied id lives record_ttl seconds, outside the key prefix."""
    writer = BalanceWriter(rds, prefix=key_prefix, record_ttl=30)
    writer.set(1, "1")
    writer.adjust(1, "1", adjustment_id="r")
    record = adjustment_key(f"{key_prefix}1", "r")
    assert not record.startswith(key_prefix)
    assert 0 < rds.ttl(record) <= 30


# -- exact, or refused ----------------------------------------------------------------------


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    start=st.integers(-(LIMIT_CENTS - 1), LIMIT_CENTS - 1)
    | st.sampled_from([0, 2**53, 2**53 + 1, -(2**53) - 1, LIMIT_CENTS - 1, 10**10, -(10**10)]),
    change=st.integers(-(LIMIT_CENTS - 1), LIMIT_CENTS - 1)
    | st.sampled_from([1, -1, 10**10 - 1, 1 - 10**10, 2**53]),
    cents=st.booleans(),
)
def test_adjust_is_exact_over_the_whole_range(writer, rds, key_prefix, start, change, cents):
    """Any start and change below 10^20 cents: the exact sum, or BalanceInvalid and the key
    unchanged when the sum leaves the range (never a double's rounding)."""
    if cents:
        writer = BalanceWriter(rds, prefix=key_prefix, value_format="cents")
    amount = Decimal(start).scaleb(-2)
    writer.set(1, amount)
    before = rds.get(f"{key_prefix}1")
    delta = Decimal(change).scaleb(-2)
    if abs(start + change) < LIMIT_CENTS:
        assert writer.adjust(1, delta) == Decimal(start + change).scaleb(-2)
        expected = (
            str(start + change)
            if cents
            else f"{'-' if start + change < 0 else ''}{Decimal(abs(start + change)).scaleb(-2)}"
        )
        assert rds.get(f"{key_prefix}1") == expected.encode()
    else:
        with pytest.raises(BalanceInvalid, match="valid range"):
            writer.adjust(1, delta)
        assert rds.get(f"{key_prefix}1") == before


@pytest.mark.parametrize(
    ("stored", "delta", "after"),
    [
        ("0.10", "0.20", b"0.30"),
        ("5", "0.5", b"5.50"),
        ("007.5", "-7.5", b"0.00"),
        ("-0.01", "0.01", b"0.00"),
        ("-3.5", "1", b"-2.50"),
        ("999999999999999999.98", "0.01", b"999999999999999999.99"),
        ("-999999999999999999.99", "999999999999999999.99", b"0.00"),
        ("90071992547409.93", "0.01", b"90071992547409.94"),  # 2^53 + 2 cents
    ],
)
def test_decimal_adjustments_are_exact_and_written_with_two_decimals(
    writer, rds, key_prefix, stored, delta, after
):
    """Every decimal form the sync accepts is adjusted exactly and written as PostgreSQL shows
    numeric(20,2)."""
    rds.set(f"{key_prefix}1", stored)
    assert writer.adjust(1, delta) == Decimal(after.decode())
    assert rds.get(f"{key_prefix}1") == after


@pytest.mark.parametrize(
    "stored",
    ["0.30000000000000004", "1e5", " 1", "1.", "abc", "1000000000000000000", "", "+1"],
)
def test_an_invalid_stored_balance_is_never_overwritten(writer, rds, key_prefix, stored):
    """A value the sync would refuse (a float tail, an exponent, 10^18) raises BalanceInvalid
    and stays as it is."""
    rds.set(f"{key_prefix}1", stored)
    with pytest.raises(BalanceInvalid, match="invalid"):
        writer.adjust(1, "1")
    assert rds.get(f"{key_prefix}1") == stored.encode()
    assert not rds.exists(dirty_keys(key_prefix)[0])


def test_a_key_of_another_type_is_refused(writer, rds, key_prefix):
    """A hash under a balance key is invalid: refused, untouched."""
    rds.hset(f"{key_prefix}1", "balance", "1")
    with pytest.raises(BalanceInvalid, match="another type"):
        writer.adjust(1, "1")
    assert rds.type(f"{key_prefix}1") == b"hash"


def test_amounts_out_of_range_or_ids_out_of_range_are_refused(writer):
    """A delta of 10^18 or more, a float, or an id outside 1..2^63-1 never reaches Redis."""
    with pytest.raises(ValueError, match="out of range"):
        writer.adjust(1, "1000000000000000000")
    with pytest.raises(ValueError, match="two decimals"):
        writer.adjust(1, "1e40")
    with pytest.raises(ValueError, match="two decimals"):
        writer.adjust(1, "lots")
    with pytest.raises(TypeError):
        writer.adjust(1, 0.1)
    with pytest.raises(ValueError, match="telegram id"):
        writer.adjust(0, "1")
    with pytest.raises(ValueError, match="telegram id"):
        writer.set(2**63, "1")


# -- a library for applications ----------------------------------------------------------


def test_writer_and_an_in_process_sync_feed_each_other(
    initialized, servers: Servers, database_url, key_prefix, rds, pg, reading
):
    """An application writes through the writer and runs the sync in-process with
    resolve_settings and run_sync, both reading the same settings names."""
    reading.set(1, "10.00")
    insert_rows(pg, {2: "20.00"})
    reading.adjust(2, "1.00")
    environ = {
        "BALSYNC_DATABASE_URL": database_url,
        "BALSYNC_REDIS_URL": servers.redis,
        "BALSYNC_KEY_PREFIX": key_prefix,
    }
    result = run_sync(resolve_settings({}, environ), SyncOptions(incremental=True, min_interval=0))
    assert (result.status, result.processed, result.inserted, result.updated) == (
        "success",
        2,
        1,
        1,
    )
    assert balances(pg) == {1: "10.00", 2: "21.00"}


def test_the_writer_imports_none_of_the_cli(tmp_path: Path):
    """A bot importing the writer, the sync and the settings loads no click, rich, croniter or
    prometheus_client."""
    code = (
        "import sys, balance_sync.writer, balance_sync.ops.sync, balance_sync.settings; "
        "print(sorted(m for m in ('click', 'rich', 'croniter', 'prometheus_client') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert done.stdout.strip() == "[]"


def test_the_package_is_typed():
    """balance_sync ships py.typed, so a bot's type checker reads the writer's annotations."""
    assert (Path(balance_sync.__file__).parent / "py.typed").is_file()


def test_a_client_that_decodes_responses_works_the_same(servers: Servers, key_prefix, rds):
    """An application's client with decode_responses=True gets the same Decimal results."""
    client = redis.Redis.from_url(servers.redis, decode_responses=True)
    writer = BalanceWriter(client, prefix=key_prefix)
    writer.set(1, "1.00")
    assert writer.adjust(1, "0.50", adjustment_id="d") == Decimal("1.50")
    assert writer.adjust(1, "0.50", adjustment_id="d") == Decimal("1.50")
    assert rds.get(f"{key_prefix}1") == b"1.50"
    client.close()


def test_a_read_through_never_starts_from_a_base_older_than_the_last_write(
    initialized, rds, key_prefix, database_url, pg
):
    """Worker A misses and reads 100.00 through; meanwhile worker B adjusts (110.00), a
    sync persists it and clear-cache frees the key again. A's stale 100.00 is refused:
    A reads through again and adds to 110.00, so both adjustments count (115.00)."""
    tool = initialized
    rds.set(f"{key_prefix}1", "100.00")
    assert _synced(tool)[0] == 0
    tool.ok("clear-cache", "--yes", "--json")
    assert rds.get(f"{key_prefix}1") is None
    with database_loader(database_url) as real:
        b = BalanceWriter(rds, prefix=key_prefix, loader=real)
        interleaved: list[Decimal] = []

        def slow_loader(telegram_id: int) -> Decimal | None:
            value = real(telegram_id)
            if not interleaved:  # meanwhile: worker B, the cron sync, clear-cache
                interleaved.append(b.adjust(1, "10.00"))
                assert _synced(tool)[0] == 0
                tool.ok("clear-cache", "--yes", "--json")
            return value

        a = BalanceWriter(rds, prefix=key_prefix, loader=slow_loader)
        a.adjust(1, "5.00")
        assert interleaved == [Decimal("110.00")]
    assert _synced(tool)[0] == 0
    assert (rds.get(f"{key_prefix}1"), balances(pg)[1]) == (b"115.00", "115.00")


def _synced(tool: Balsync) -> tuple[int, dict[str, object]]:
    result = tool("sync", "--json", "--force")
    assert result.stdout, result.stderr
    return result.exit_code, json.loads(result.stdout)
