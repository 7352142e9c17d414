"""AsyncBalanceWriter and async_database_loader: the sync writer's semantics over asyncio."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal

import psycopg
import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis

from balance_sync.errors import PostgresUnavailable
from balance_sync.stores.redis import dirty_keys
from balance_sync.writer import (
    AsyncBalanceWriter,
    AsyncDatabaseLoader,
    BalanceInvalid,
    BalanceMissing,
    BalanceWriter,
    async_database_loader,
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

pytestmark = pytest.mark.asyncio
Pg = psycopg.Connection[tuple[object, ...]]


@pytest_asyncio.fixture
async def ards(servers: Servers) -> AsyncIterator[aioredis.Redis]:
    """An asyncio Redis client, as an aiogram or python-telegram-bot handler holds one."""
    client = aioredis.Redis.from_url(servers.redis)
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def aloader(initialized: Balsync, database_url: str) -> AsyncIterator[AsyncDatabaseLoader]:
    """An async read-through to the test's user_balances (after init-db)."""
    async with async_database_loader(database_url) as load:
        yield load


@pytest.fixture
def awriter(ards: aioredis.Redis, key_prefix: str) -> AsyncBalanceWriter:
    """An async writer with no loader."""
    return AsyncBalanceWriter(ards, prefix=key_prefix)


@pytest.fixture
def areading(
    ards: aioredis.Redis, key_prefix: str, aloader: AsyncDatabaseLoader
) -> AsyncBalanceWriter:
    """An async writer that reads missing balances through to PostgreSQL."""
    return AsyncBalanceWriter(ards, prefix=key_prefix, loader=aloader)


async def test_async_adjust_of_a_missing_key_without_a_loader_raises(awriter, rds, key_prefix):
    """No key, no loader: BalanceMissing, nothing written."""
    with pytest.raises(BalanceMissing):
        await awriter.adjust(42, "5")
    assert own_keys(rds, key_prefix) == set()


async def test_async_read_through_starts_from_the_persisted_balance(areading, pg, rds, key_prefix):
    """A missing key starts from the row, then is adjusted and marked."""
    insert_rows(pg, {5: "1500.00"})
    assert await areading.adjust(5, "5") == Decimal("1505.00")
    assert rds.get(f"{key_prefix}5") == b"1505.00"
    assert rds.smembers(dirty_keys(key_prefix)[0]) == {b"5"}


async def test_async_new_user_starts_from_zero_only_when_asked(areading, rds, key_prefix):
    """No key and no row: BalanceMissing unless missing='zero'."""
    with pytest.raises(BalanceMissing) as caught:
        await areading.adjust(77, "5")
    assert caught.value.looked_up is True
    assert await areading.adjust(77, "5", missing="zero") == Decimal("5.00")


async def test_async_value_written_while_postgresql_is_read_wins(
    ards, rds, key_prefix, aloader, pg
):
    """SET NX race: a value another writer puts during the read-through is the one adjusted."""
    insert_rows(pg, {9: "1500.00"})

    async def racing(telegram_id: int) -> Decimal | None:
        value: Decimal | None = await aloader(telegram_id)
        await ards.set(f"{key_prefix}{telegram_id}", "7.00")
        return value

    writer = AsyncBalanceWriter(ards, prefix=key_prefix, loader=racing)
    assert await writer.adjust(9, "1.00") == Decimal("8.00")


async def test_async_concurrent_adjustments_of_a_missing_key_all_land_once(
    areading, rds, key_prefix, pg
):
    """50 concurrent tasks adjust one missing key 4 times each: the sum is exact."""
    insert_rows(pg, {11: "100.00"})

    async def task() -> None:
        for _ in range(4):
            await areading.adjust(11, "1.00")

    await asyncio.gather(*(task() for _ in range(50)))
    assert rds.get(f"{key_prefix}11") == b"300.00"


async def test_async_same_adjustment_id_is_applied_once(awriter, rds, key_prefix):
    """A retry with the same id returns the first result and changes nothing."""
    await awriter.set(1, "10.00")
    assert await awriter.adjust(1, "2.50", adjustment_id="p") == Decimal("12.50")
    assert await awriter.adjust(1, "2.50", adjustment_id="p") == Decimal("12.50")
    assert rds.get(f"{key_prefix}1") == b"12.50"


async def test_sync_and_async_writers_share_records_and_marks(awriter, rds, key_prefix) -> None:
    """An id applied by one writer is not applied again by the other: the same script, keys
    and record."""
    sync_writer = BalanceWriter(rds, prefix=key_prefix)
    sync_writer.set(1, "1.00")
    assert sync_writer.adjust(1, "1", adjustment_id="both") == Decimal("2.00")
    assert await awriter.adjust(1, "1", adjustment_id="both") == Decimal("2.00")
    assert rds.get(f"{key_prefix}1") == b"2.00"


async def test_async_invalid_stored_balance_is_never_overwritten(awriter, rds, key_prefix):
    """A float tail left by INCRBYFLOAT is refused and stays."""
    rds.set(f"{key_prefix}1", "0.30000000000000004")
    with pytest.raises(BalanceInvalid):
        await awriter.adjust(1, "1")
    assert rds.get(f"{key_prefix}1") == b"0.30000000000000004"


async def test_both_writers_feed_sync_incremental(
    initialized, areading, rds: redis.Redis, key_prefix, pg, database_url
):
    """Writes of the sync and the async writer, read-throughs included, are what the next
    `sync --incremental` persists, and only those."""
    insert_rows(pg, {1: "1500.00", 2: "10.00", 3: "3.00"})
    rds.set(f"{key_prefix}3", "3.00")
    BalanceWriter(rds, prefix=key_prefix).set(4, "4.00")
    await areading.adjust(1, "-0.50")  # read through
    await areading.set(5, "5.00")
    await areading.mark([3])  # unchanged
    rds.set(f"{key_prefix}2", "99.00")  # behind the tracking's back: left for a full scan
    data = incremental(initialized)
    assert (data["processed"], data["inserted"], data["updated"], data["unchanged"]) == (
        4,
        2,
        1,
        1,
    )
    assert balances(pg) == {1: "1499.50", 2: "10.00", 3: "3.00", 4: "4.00", 5: "5.00"}
    assert json.loads(initialized("sync", "--json", "--force").stdout)["updated"] == 1


async def test_async_postgresql_unreachable_writes_nothing(ards, rds, key_prefix):
    """An async loader that cannot reach PostgreSQL raises PostgresUnavailable; Redis is
    untouched."""
    async with async_database_loader("postgresql://postgres@127.0.0.1:1/none", timeout=1) as load:
        writer = AsyncBalanceWriter(ards, prefix=key_prefix, loader=load)
        with pytest.raises(PostgresUnavailable):
            await writer.adjust(3, "1")
    assert own_keys(rds, key_prefix) == set()


async def test_async_loader_holds_no_transaction_open(areading, pg):
    """After a lookup the async pool's connection is idle, not idle in transaction."""
    insert_rows(pg, {5: "1.00"})
    await areading.adjust(5, "1")
    assert_loader_idle(pg)


async def test_async_writer_refuses_a_cluster_client() -> None:
    """The asyncio cluster client is refused by name rather than failing later."""
    from redis.asyncio.cluster import RedisCluster as AsyncCluster

    client = AsyncCluster(host="127.0.0.1", port=1)
    with pytest.raises(TypeError, match=r"redis\.asyncio\.Redis"):
        AsyncBalanceWriter(client)  # type: ignore[arg-type]
    await client.aclose()
