"""The application's writer when an adjustment's reply is lost: applied at most once.

The writer's client goes through the fault proxy, which lets the script's reply vanish and
resets the connection after Valkey ran it. The client keeps redis-py's own retries on, as
an application's client may: they must not resend the adjustment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal

import psycopg
import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from balance_sync.writer import (
    AdjustmentUnknown,
    AsyncBalanceWriter,
    BalanceWriter,
    database_loader,
)
from tests.faults.conftest import Bench
from tests.faults.proxy import Proxy

pytestmark = pytest.mark.faults

RETRIES = 3  # redis-py's retries on the application's client: a plain command is resent
REPLY = b"applied"  # in the script's reply only


def test_lost_adjust_reply_is_unknown_and_its_retry_applies_nothing_more(
    bench: Bench, figures: Callable[[str], None]
) -> None:
    """The reply of an adjust (plain, then read through to PostgreSQL) is lost after Valkey
    ran it: AdjustmentUnknown with its id, no resend by redis-py, and a retry with that id
    returns the same balance; each adjustment landed exactly once."""
    bench.init_db(ledger=False)
    with psycopg.connect(bench.db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO user_balances (telegram_id, balance) VALUES (2, 1500.00)")
    direct = redis.Redis.from_url(bench.redis_url)
    with Proxy(bench.vk.port) as proxy, database_loader(bench.db_url) as loader:
        client = redis.Redis(port=proxy.port, retry=Retry(NoBackoff(), RETRIES))
        # The fault is real: a plain command under redis-py's retries is applied twice.
        proxy.lose_reply(b":1\r\n")
        client.incrby("plain", 1)
        assert direct.get("plain") == b"2"

        writer = BalanceWriter(client, prefix=bench.prefix, loader=loader)
        writer.set(1, "10.00")
        proxy.lose_reply(REPLY)
        with pytest.raises(AdjustmentUnknown) as caught:
            writer.adjust(1, "2.50")
        lost = caught.value.adjustment_id
        assert proxy.lost_replies == 2
        assert direct.get(f"{bench.prefix}1") == b"12.50"  # applied once, not resent
        assert writer.adjust(1, "2.50", adjustment_id=lost) == Decimal("12.50")
        assert direct.get(f"{bench.prefix}1") == b"12.50"

        # A missing key read through: the reply of the adjustment after the load is lost.
        proxy.lose_reply(REPLY)
        with pytest.raises(AdjustmentUnknown) as caught:
            writer.adjust(2, "-0.50", adjustment_id="refund-2")
        assert direct.get(f"{bench.prefix}2") == b"1499.50"
        assert writer.adjust(2, "-0.50", adjustment_id="refund-2") == Decimal("1499.50")
        assert direct.get(f"{bench.prefix}2") == b"1499.50"
        assert direct.smembers("{balsync:dirty:" + bench.prefix + "}") == {b"1", b"2"}
        client.close()
    direct.close()
    figures(f"{proxy.lost_replies} replies lost, {proxy.resets} resets; each adjustment once")


def test_lost_async_adjust_reply_is_unknown_and_its_retry_applies_nothing_more(
    bench: Bench,
) -> None:
    """AsyncBalanceWriter: the same lost reply, the same AdjustmentUnknown, the same single
    application."""
    direct = redis.Redis.from_url(bench.redis_url)

    async def scenario(port: int, proxy: Proxy) -> None:
        # The asyncio client's own Retry: the synchronous one would hand back the command's
        # coroutine unawaited, and so never resend anything.
        client = aioredis.Redis(port=port, retry=AsyncRetry(NoBackoff(), RETRIES))
        writer = AsyncBalanceWriter(client, prefix=bench.prefix)
        await writer.set(1, "10.00")
        proxy.lose_reply(REPLY)
        with pytest.raises(AdjustmentUnknown) as caught:
            await writer.adjust(1, "2.50")
        assert direct.get(f"{bench.prefix}1") == b"12.50"
        again = await writer.adjust(1, "2.50", adjustment_id=caught.value.adjustment_id)
        assert again == Decimal("12.50")
        assert direct.get(f"{bench.prefix}1") == b"12.50"
        await client.aclose()

    with Proxy(bench.vk.port) as proxy:
        asyncio.run(scenario(proxy.port, proxy))
        assert proxy.lost_replies == 1
    direct.close()
