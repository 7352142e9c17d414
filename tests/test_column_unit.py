"""The unit of the balance column: stated for a column without decimals, never guessed.

An application table may keep money in an integer (or numeric(p,0)) column, in whole units or
in cents. balsync cannot tell which, so such a column needs `--column-unit units|cents`;
without it every command that reads or writes the column refuses with exit 2 before writing.
Every combination of Redis value format, column type and unit is checked on real servers,
with values that fit and values that do not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from decimal import Decimal
from typing import cast

import psycopg
import pytest
import redis
from click.testing import Result

from tests import helpers
from tests.helpers import Balsync

PG = psycopg.Connection[tuple[object, ...]]
TABLE = ("--table", "users", "--id-column", "id", "--balance-column", "money")

# The amounts in Redis, by id: ordinary, a fraction of a unit, wider than smallint,
# wider than integer once in cents, and one below 10^16 units (10^18 cents, int8's edge).
AMOUNTS = {
    1: Decimal("1501.00"),
    2: Decimal("0.05"),
    3: Decimal("70000"),
    4: Decimal("30000000.00"),
    5: Decimal("9999999999999999.99"),
}
# Each column type: (digits before the point that always fit, decimal places); None: any.
COLUMNS: dict[str, tuple[int | None, int]] = {
    "numeric": (None, 2),
    "numeric(20,2)": (18, 2),
    "numeric(12,2)": (10, 2),
    "numeric(12,0)": (12, 0),
    "bigint": (18, 0),
    "integer": (9, 0),
    "smallint": (4, 0),
}
STAGING_DIGITS = 18  # what balsync stages (numeric(20,2)) bounds every column


def redis_text(amount: Decimal, value_format: str) -> str:
    """The amount as the application writes it in Redis."""
    if value_format == "cents":
        return str(int(amount.scaleb(2)))
    return format(amount, "f")


def stored(amount: Decimal, column: str, unit: str) -> Decimal | None:
    """What the column must hold for `amount` in `unit`; None: the run must skip it."""
    digits, scale = COLUMNS[column]
    value = amount.scaleb(2) if unit == "cents" else amount
    if value != round(value, scale):
        return None
    whole = len(str(abs(int(value)))) if int(value) else 0
    if whole > min(digits or STAGING_DIGITS, STAGING_DIGITS):
        return None
    return value


def needs_unit(column: str) -> bool:
    """A column without decimal places: whole units and cents look alike there."""
    return COLUMNS[column][1] == 0


@pytest.fixture
def users(pg: PG, balsync: Balsync, request: pytest.FixtureRequest) -> str:
    """An application table `users(id, money <type>)` after init-db; the type is the param."""
    column: str = request.param
    pg.execute(f"CREATE TABLE users (id bigint PRIMARY KEY, money {column})".encode())
    balsync.ok("init-db", *TABLE)
    return column


def seed(rds: redis.Redis, prefix: str, amounts: dict[int, Decimal], value_format: str) -> None:
    """Each amount as the application writes it in `value_format`."""
    helpers.seed(rds, prefix, {i: redis_text(a, value_format) for i, a in amounts.items()})


def money(pg: PG) -> dict[int, Decimal]:
    rows = cast(
        "Iterable[tuple[int, Decimal | int]]",  # id bigint, money numeric or an integer type
        pg.execute("SELECT id, money FROM users"),
    )
    return {int(i): Decimal(m) for i, m in rows}


def runs(pg: PG) -> int:
    row = pg.execute("SELECT count(*) FROM balsync.sync_runs").fetchone()
    assert row is not None
    return int(cast(int, row[0]))  # count(*): a bigint


def unit_args(unit: str | None) -> tuple[str, ...]:
    return () if unit is None else ("--column-unit", unit)


def assert_refused(result: Result) -> None:
    """Exit 2, one line naming the option."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert "--column-unit" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("users", list(COLUMNS), indirect=True)
@pytest.mark.parametrize("value_format", ["decimal", "cents"])
@pytest.mark.parametrize("unit", [None, "units", "cents"])
def test_sync_writes_the_stated_unit_exactly_or_refuses(
    users: str, value_format: str, unit: str | None, balsync: Balsync, rds, key_prefix, pg
):
    """Every value format, column type and unit: the exact amount in the column's unit, a value
    the column cannot hold skipped, and a column without decimals refused without a unit."""
    seed(rds, key_prefix, AMOUNTS, value_format)
    args = ("sync", "--json", "--value-format", value_format, *TABLE, *unit_args(unit))
    result = balsync(*args)
    if unit is None and needs_unit(users):
        assert_refused(result)
        assert money(pg) == {}
        assert runs(pg) == 0
        return
    expected = {i: stored(a, users, unit or "units") for i, a in AMOUNTS.items()}
    written = {i: v for i, v in expected.items() if v is not None}
    assert result.exit_code == (1 if len(written) < len(AMOUNTS) else 0), result.stderr
    data = json.loads(result.stdout)
    assert (data["inserted"], data["skipped"], data["invalid"]) == (
        len(written),
        len(AMOUNTS) - len(written),
        0,
    )
    assert money(pg) == written
    # A second run finds every written row equal: nothing moves.
    again = json.loads(balsync(*args, "--force").stdout)
    assert (again["updated"], again["unchanged"]) == (0, len(written))


@pytest.mark.parametrize("users", ["bigint"], indirect=True)
def test_dry_run_refuses_an_integer_column_without_a_unit(users, balsync: Balsync, rds, key_prefix):
    """--dry-run refuses too: the report would count the wrong amounts."""
    seed(rds, key_prefix, {1: AMOUNTS[1]}, "cents")
    assert_refused(balsync("sync", "--dry-run", "--value-format", "cents", *TABLE))


def test_the_unit_comes_from_the_environment_too(pg: PG, balsync: Balsync, rds, key_prefix):
    """BALSYNC_COLUMN_UNIT=cents works like --column-unit cents."""
    pg.execute("CREATE TABLE users (id bigint PRIMARY KEY, money bigint)")
    balsync.ok("init-db", *TABLE)
    seed(rds, key_prefix, {1: AMOUNTS[1]}, "cents")
    balsync.ok("sync", "--value-format", "cents", *TABLE, env={"BALSYNC_COLUMN_UNIT": "cents"})
    assert money(pg) == {1: Decimal(150100)}


def test_an_unknown_unit_is_exit_2(pg: PG, balsync: Balsync):
    """Only units and cents exist."""
    pg.execute("CREATE TABLE users (id bigint PRIMARY KEY, money bigint)")
    result = balsync("sync", *TABLE, env={"BALSYNC_COLUMN_UNIT": "pennies"})
    assert result.exit_code == 2
    assert "column unit" in result.stderr


# -- the commands that read the column back ------------------------------------------------


@pytest.fixture
def cents_column(pg: PG, balsync: Balsync) -> None:
    """users.money is a bigint in cents, holding 1501.00 for id 1 and 0.05 for id 2."""
    pg.execute("CREATE TABLE users (id bigint PRIMARY KEY, money bigint)")
    pg.execute("INSERT INTO users VALUES (1, 150100), (2, 5)")
    balsync.ok("init-db", *TABLE)


CENTS = ("--column-unit", "cents", *TABLE)
FORMATS = pytest.mark.parametrize("value_format", ["decimal", "cents"])


@FORMATS
def test_restore_reads_a_cents_column_as_amounts(
    cents_column, value_format, balsync: Balsync, rds, key_prefix
):
    """restore puts 1501.00 back, not 150100.00, in the Redis value format."""
    balsync.ok("restore", "--value-format", value_format, *CENTS)
    assert rds.get(f"{key_prefix}1") == redis_text(AMOUNTS[1], value_format).encode()
    assert rds.get(f"{key_prefix}2") == redis_text(AMOUNTS[2], value_format).encode()


@FORMATS
def test_verify_compares_a_cents_column_as_amounts(
    cents_column, value_format, balsync: Balsync, rds, key_prefix
):
    """verify finds Redis 1501.00 equal to 150100 cents, and sums amounts."""
    seed(rds, key_prefix, {1: AMOUNTS[1], 2: AMOUNTS[2]}, value_format)
    data = json.loads(balsync.ok("verify", "--json", "--value-format", value_format, *CENTS).stdout)
    assert (data["status"], data["pg_sum"], data["redis_sum"]) == ("in_sync", "1501.05", "1501.05")


@FORMATS
def test_clear_cache_compares_a_cents_column_as_amounts(
    cents_column, value_format, balsync: Balsync, rds, key_prefix
):
    """clear-cache deletes a key whose amount the cents column holds, keeps one that differs."""
    seed(rds, key_prefix, {1: AMOUNTS[1], 2: Decimal("0.06")}, value_format)
    data = json.loads(
        balsync.ok("clear-cache", "--yes", "--json", "--value-format", value_format, *CENTS).stdout
    )
    assert data["deleted"] == 1
    assert rds.exists(f"{key_prefix}1") == 0
    assert rds.exists(f"{key_prefix}2") == 1


def test_stats_sums_a_cents_column_as_amounts(cents_column, balsync: Balsync):
    """stats shows the balance sum in money, not cents."""
    data = json.loads(balsync.ok("stats", "--json", *CENTS).stdout)
    assert data["postgres"]["balance_sum"] == "1501.05"


@FORMATS
def test_on_conflict_db_gives_redis_the_amount_of_a_cents_column(
    cents_column, value_format, balsync: Balsync, rds, key_prefix, pg
):
    """--on-conflict db writes PostgreSQL's 1600.00 back to Redis, not 160000."""
    seed(rds, key_prefix, {1: Decimal("1550.00")}, value_format)
    args = ("sync", "--force", "--value-format", value_format, *CENTS)
    balsync.ok(*args)  # balsync writes 155000 and remembers it
    pg.execute("UPDATE users SET money = 160000 WHERE id = 1")  # an admin correction
    seed(rds, key_prefix, {1: Decimal("1700.00")}, value_format)
    balsync.ok(*args, "--on-conflict", "db")
    assert rds.get(f"{key_prefix}1") == redis_text(Decimal("1600.00"), value_format).encode()
    assert money(pg)[1] == Decimal(160000)


@pytest.mark.parametrize(
    "command", [("restore",), ("verify",), ("clear-cache", "--yes"), ("stats",)]
)
def test_every_command_refuses_an_integer_column_without_a_unit(
    cents_column, command, balsync: Balsync, rds, key_prefix, pg
):
    """restore, verify, clear-cache and stats refuse like sync; Redis and the table stay."""
    seed(rds, key_prefix, {1: AMOUNTS[1]}, "decimal")
    assert_refused(balsync(*command, *TABLE))
    assert rds.get(f"{key_prefix}1") == b"1501.00"
    assert rds.exists(f"{key_prefix}2") == 0
    assert money(pg) == {1: Decimal(150100), 2: Decimal(5)}
