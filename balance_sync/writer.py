"""The application's writer: balances into Redis, marked so `balsync sync --incremental` finds
them, never invented, each adjustment applied at most once.

    from decimal import Decimal, InvalidOperation
    import redis
    from balance_sync.writer import BalanceWriter, database_loader

    loader = database_loader("postgresql://bot@db/bot")
    balances = BalanceWriter(redis.Redis(), prefix="balance:", loader=loader)
    balances.set(42, Decimal("1500.00"))      # SET balance:42 1500.00 + mark 42, atomically
    balances.adjust(42, "-20.50")             # exact, atomic, at most once: Decimal('1479.50')

A missing key is never taken as 0: with no loader `adjust` raises BalanceMissing; with one
it reads the persisted balance through and starts from it, as `SET NX` would (a value
another writer put meanwhile wins). A user PostgreSQL has no row for starts from 0 only
when the caller says so (`missing="zero"`). `AsyncBalanceWriter` and `async_database_loader`
do the same over redis.asyncio and psycopg's async pool. Amounts are Decimal or str, never
float. The README's "The application's writer" section documents the whole API.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import Any, Literal, TypedDict, Unpack

import psycopg
import psycopg_pool
import redis
import redis.asyncio as aioredis
from redis.cluster import RedisCluster

from balance_sync.errors import (
    AdjustmentUnknown,
    BalanceInvalid,
    BalanceMissing,
    PostgresUnavailable,
)
from balance_sync.settings import DEFAULT_TABLE, TableName, mask_url
from balance_sync.stores.postgres import balance_lookup, looked_up_balance
from balance_sync.stores.redis import (
    Adjustment,
    AdjustReply,
    AsyncTrackedWrites,
    ReplyLost,
    TrackedWrites,
)
from balance_sync.validation import ValueFormat, parse_balance, redis_value

__all__ = [
    "AdjustmentUnknown",
    "AsyncBalanceWriter",
    "AsyncDatabaseLoader",
    "BalanceInvalid",
    "BalanceMissing",
    "BalanceWriter",
    "DatabaseLoader",
    "LoaderOptions",
    "Missing",
    "async_database_loader",
    "database_loader",
]

Missing = Literal["raise", "zero"]
Loader = Callable[[int], Decimal | None]
"""Reads an id's persisted balance: a Decimal, or None where PostgreSQL has no row."""
AsyncLoader = Callable[[int], Awaitable[Decimal | None]]
RECORD_TTL = 600
"""Seconds an applied adjustment's id is remembered: a retry with the same id within this
time returns the first result instead of applying it again."""
_LIMIT_CENTS = 10**20  # |balance| < 10^18 with two decimals
# A balance found absent is read through again when it was written meanwhile (and removed
# again: synced, then cleared); each try reads PostgreSQL once more.
READ_THROUGH_TRIES = 5


class _Writer:
    """What both writers share: amounts, value formats, and the rules for a missing key."""

    def __init__(self, value_format: ValueFormat, record_ttl: int) -> None:
        if record_ttl <= 0:
            raise ValueError("record_ttl must be a positive number of seconds")
        self.value_format: ValueFormat = value_format
        self.record_ttl = record_ttl

    def _encode(self, amount: Decimal) -> bytes:
        value = redis_value(str(amount), self.value_format)
        if isinstance(value, str):
            raise ValueError(f"{amount} cannot be stored: {value}")
        return value

    def _decode(self, raw: bytes) -> Decimal:
        parsed = parse_balance(raw, value_format=self.value_format, allow_negative=True)
        if isinstance(parsed, str):
            raise BalanceInvalid(f"the stored balance {raw!r} is invalid: {parsed}")
        return Decimal(parsed.decode())

    @staticmethod
    def _check_missing(missing: Missing, loader: object) -> None:
        if missing not in ("raise", "zero"):
            raise ValueError(f"missing must be 'raise' or 'zero', not {missing!r}")
        if missing == "zero" and loader is None:
            # Without PostgreSQL nothing tells a new user from a key Redis lost.
            raise ValueError("missing='zero' needs a loader: only PostgreSQL knows a new user")

    def _base(self, telegram_id: int, persisted: Decimal | None, missing: Missing) -> bytes:
        """The value to start from where the key is absent: the persisted balance, or 0 for
        an id PostgreSQL has no row for when the caller said it is new."""
        if persisted is None:
            if missing != "zero":
                raise BalanceMissing(telegram_id, looked_up=True)
            persisted = Decimal(0)
        try:
            return self._encode(persisted)
        except ValueError as exc:
            raise BalanceInvalid(
                f"the persisted balance of {telegram_id} cannot be stored: {exc}",
                "correct the row; until then the balance cannot be read through",
            ) from exc

    def _result(self, telegram_id: int, reply: AdjustReply) -> Decimal:
        if reply.status == "missing":
            raise BalanceInvalid(
                f"the balance of {telegram_id} kept being written and removed while it was "
                f"read through PostgreSQL ({READ_THROUGH_TRIES} tries); it was not changed",
                "retry the adjustment with the same adjustment_id",
            )
        detail = reply.detail.decode("utf-8", "backslashreplace")
        if reply.status in ("applied", "done"):
            return self._decode(reply.detail)
        if reply.status == "invalid":
            raise BalanceInvalid(
                f"the balance of {telegram_id} in Redis is invalid ({detail!r}); it was not "
                "changed",
                "set() a valid balance, or correct the key",
            )
        if reply.status == "range":
            raise BalanceInvalid(
                f"adjusting {telegram_id} from {detail} would leave the valid range "
                "(|balance| < 10^18); it was not changed"
            )
        assert reply.status == "reused", reply
        raise ValueError(
            f"this adjustment id was already used for {telegram_id} with another amount "
            f"({detail} cents): an id names one adjustment"
        )

    def _adjustment(
        self,
        tracking: TrackedWrites | AsyncTrackedWrites,
        telegram_id: int,
        delta: Decimal | str,
        adjustment_id: str,
        base: bytes | None = None,
        *,
        absent: AdjustReply | None = None,
    ) -> Adjustment:
        cents = int(_decimal(delta).scaleb(2))
        if abs(cents) >= _LIMIT_CENTS:
            raise ValueError(f"{delta!r} is out of range (|amount| must be below 10^18)")
        return tracking.adjustment(
            _telegram_id(telegram_id),
            cents,
            adjustment_id,
            self.value_format,
            record_ttl=self.record_ttl,
            base=base,
            absent=absent,
        )


class BalanceWriter(_Writer):
    """Set or adjust balances in Redis and mark them for `balsync sync --incremental`.

    `client` is a redis.Redis (one server, Sentinel) or a redis.cluster.RedisCluster;
    `loader` reads a missing balance through (see `database_loader`); `value_format` is
    the one the sync reads (`decimal` or `cents`); `record_ttl` is how long an applied
    adjustment's id is remembered.
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        prefix: str = "balance:",
        *,
        loader: Loader | None = None,
        value_format: ValueFormat = "decimal",
        record_ttl: int = RECORD_TTL,
    ) -> None:
        super().__init__(value_format, record_ttl)
        self.loader = loader
        self._writes = TrackedWrites(client, prefix)

    def set(self, telegram_id: int, amount: Decimal | str) -> None:
        """Set a balance exactly (at most two decimals; more is an error, never rounded)."""
        self._writes.set(_telegram_id(telegram_id), self._encode(_decimal(amount)), self.record_ttl)

    def adjust(
        self,
        telegram_id: int,
        delta: Decimal | str,
        *,
        adjustment_id: str | None = None,
        missing: Missing = "raise",
    ) -> Decimal:
        """Add `delta` (negative to subtract) exactly and atomically; the new balance.

        Applied at most once per `adjustment_id` (a fresh one when None): a retry with the
        same id returns the balance the first application left. A missing key is read
        through the loader; with no loader, or no row and `missing="raise"`, BalanceMissing
        is raised and nothing is written. `missing="zero"` starts an id PostgreSQL has no
        row for at 0. AdjustmentUnknown (carrying the id) means the reply was lost.
        """
        self._check_missing(missing, self.loader)
        adjustment_id = adjustment_id or uuid.uuid4().hex
        adjustment = self._adjustment(self._writes, telegram_id, delta, adjustment_id)
        reply = self._run(adjustment, adjustment_id)
        for _ in range(READ_THROUGH_TRIES):
            if reply.status != "missing":
                return self._result(telegram_id, reply)
            if self.loader is None:
                raise BalanceMissing(telegram_id, looked_up=False)
            base = self._base(telegram_id, self.loader(telegram_id), missing)
            adjustment = self._adjustment(
                self._writes, telegram_id, delta, adjustment_id, base, absent=reply
            )
            reply = self._run(adjustment, adjustment_id)
        return self._result(telegram_id, reply)

    def mark(self, telegram_ids: Sequence[int]) -> None:
        """Mark ids whose balances were written by other means."""
        self._writes.mark([_telegram_id(i) for i in telegram_ids])

    def _run(self, adjustment: Adjustment, adjustment_id: str) -> AdjustReply:
        try:
            return self._writes.adjust(adjustment)
        except ReplyLost as exc:
            raise AdjustmentUnknown(adjustment_id, exc) from exc


class AsyncBalanceWriter(_Writer):
    """BalanceWriter over redis.asyncio.Redis, for asyncio bots: the same semantics, Lua
    scripts and change-tracking marks; `loader` is an `async_database_loader`."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str = "balance:",
        *,
        loader: AsyncLoader | None = None,
        value_format: ValueFormat = "decimal",
        record_ttl: int = RECORD_TTL,
    ) -> None:
        super().__init__(value_format, record_ttl)
        self.loader = loader
        self._writes = AsyncTrackedWrites(client, prefix)

    async def set(self, telegram_id: int, amount: Decimal | str) -> None:
        """Set a balance exactly (at most two decimals; more is an error, never rounded)."""
        await self._writes.set(
            _telegram_id(telegram_id), self._encode(_decimal(amount)), self.record_ttl
        )

    async def adjust(
        self,
        telegram_id: int,
        delta: Decimal | str,
        *,
        adjustment_id: str | None = None,
        missing: Missing = "raise",
    ) -> Decimal:
        """BalanceWriter.adjust, awaited.

        A task cancelled while the script's reply is awaited leaves the outcome unknown:
        pass your own `adjustment_id` where a handler can time out, to retry with it.
        """
        self._check_missing(missing, self.loader)
        adjustment_id = adjustment_id or uuid.uuid4().hex
        adjustment = self._adjustment(self._writes, telegram_id, delta, adjustment_id)
        reply = await self._run(adjustment, adjustment_id)
        for _ in range(READ_THROUGH_TRIES):
            if reply.status != "missing":
                return self._result(telegram_id, reply)
            if self.loader is None:
                raise BalanceMissing(telegram_id, looked_up=False)
            base = self._base(telegram_id, await self.loader(telegram_id), missing)
            adjustment = self._adjustment(
                self._writes, telegram_id, delta, adjustment_id, base, absent=reply
            )
            reply = await self._run(adjustment, adjustment_id)
        return self._result(telegram_id, reply)

    async def mark(self, telegram_ids: Sequence[int]) -> None:
        """Mark ids whose balances were written by other means."""
        await self._writes.mark([_telegram_id(i) for i in telegram_ids])

    async def _run(self, adjustment: Adjustment, adjustment_id: str) -> AdjustReply:
        try:
            return await self._writes.adjust(adjustment)
        except ReplyLost as exc:
            raise AdjustmentUnknown(adjustment_id, exc) from exc


# -- read-through to PostgreSQL -----------------------------------------------------------

POOL_MAX_SIZE = 4
POOL_TIMEOUT = 10.0


class LoaderOptions(TypedDict, total=False):
    """A loader's settings besides the URL; the first three are the CLI's of the same names."""

    table: str  # --table, default user_balances (may be schema-qualified)
    id_column: str  # --id-column, default telegram_id
    balance_column: str  # --balance-column, default balance
    max_size: int  # connections in the pool at most (default 4)
    timeout: float  # seconds to wait for a connection (default 10)


class _Lookup:
    """The query of one target table, the pool's settings, and how a failure reads."""

    def __init__(self, url: str, options: LoaderOptions) -> None:
        self.url = url
        self.query = balance_lookup(
            TableName.parse(options.get("table", DEFAULT_TABLE)),
            options.get("id_column", "telegram_id"),
            options.get("balance_column", "balance"),
        )
        # Autocommit: a lookup never leaves a transaction open. No prepared statements:
        # they break behind PgBouncer in transaction mode.
        self.pool_args: dict[str, Any] = {
            "min_size": 1,
            "max_size": options.get("max_size", POOL_MAX_SIZE),
            "timeout": options.get("timeout", POOL_TIMEOUT),
            "kwargs": {"autocommit": True, "prepare_threshold": None},
        }

    def unavailable(self, exc: Exception) -> PostgresUnavailable:
        return PostgresUnavailable(
            f"PostgreSQL at {mask_url(self.url) or '(libpq defaults)'} could not be read "
            f"through: {exc}",
            "nothing was written to Redis; retry when PostgreSQL answers",
        )


class DatabaseLoader:
    """Reads a persisted balance for BalanceWriter, through a small pool of connections.

    Callable with an id: the balance as a Decimal, or None where the table has no row.
    Raises PostgresUnavailable where PostgreSQL cannot be reached within `timeout`, and
    BalanceInvalid where the rows hold no single valid balance. Close it (or use it as a
    context manager) to release the pool.
    """

    def __init__(self, url: str = "", **options: Unpack[LoaderOptions]) -> None:
        self._lookup = _Lookup(url, options)
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[tuple[str | None]]]
        self._pool = psycopg_pool.ConnectionPool(url, open=True, **self._lookup.pool_args)

    def __call__(self, telegram_id: int) -> Decimal | None:
        """The persisted balance of `telegram_id`, or None where it has no row."""
        try:
            with self._pool.connection() as conn:
                rows = conn.execute(self._lookup.query, (telegram_id,)).fetchall()
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise self._lookup.unavailable(exc) from exc
        return looked_up_balance(telegram_id, rows)

    def close(self) -> None:
        """Close the pool's connections."""
        self._pool.close()

    def __enter__(self) -> DatabaseLoader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncDatabaseLoader:
    """DatabaseLoader over psycopg's async pool, for AsyncBalanceWriter; awaited with an id.

    The pool opens on the first lookup (an async pool needs a running loop). Close it with
    `await loader.close()` or `async with`.
    """

    def __init__(self, url: str = "", **options: Unpack[LoaderOptions]) -> None:
        self._lookup = _Lookup(url, options)
        self._pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[tuple[str | None]]]
        self._pool = psycopg_pool.AsyncConnectionPool(url, open=False, **self._lookup.pool_args)
        self._opening = asyncio.Lock()

    async def __call__(self, telegram_id: int) -> Decimal | None:
        """The persisted balance of `telegram_id`, or None where it has no row."""
        try:
            if self._pool.closed:
                async with self._opening:
                    if self._pool.closed:
                        await self._pool.open()
            async with self._pool.connection() as conn:
                cursor = await conn.execute(self._lookup.query, (telegram_id,))
                rows = await cursor.fetchall()
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise self._lookup.unavailable(exc) from exc
        return looked_up_balance(telegram_id, rows)

    async def close(self) -> None:
        """Close the pool's connections."""
        await self._pool.close()

    async def __aenter__(self) -> AsyncDatabaseLoader:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def database_loader(url: str = "", **options: Unpack[LoaderOptions]) -> DatabaseLoader:
    """A loader for BalanceWriter: the target table's balance of an id, read through a pool.

    `url`, `table`, `id_column` and `balance_column` are the CLI's settings of the same
    names, with the same defaults; `url` may be a libpq conninfo, and empty means libpq's
    defaults and PG* variables. `max_size` and `timeout` size the pool.
    """
    return DatabaseLoader(url, **options)


def async_database_loader(url: str = "", **options: Unpack[LoaderOptions]) -> AsyncDatabaseLoader:
    """database_loader for AsyncBalanceWriter, over psycopg's async connection pool."""
    return AsyncDatabaseLoader(url, **options)


def _decimal(amount: Decimal | str) -> Decimal:
    if isinstance(amount, float):
        raise TypeError("money is never a float: pass a Decimal or a str")
    try:
        value = Decimal(amount)
        exact = value.is_finite() and value == value.quantize(Decimal("0.01"))
    except InvalidOperation as exc:  # not a number, or too long for any balance
        raise ValueError(f"{amount!r} is not an amount with at most two decimals") from exc
    if not exact:
        raise ValueError(f"{amount!r} is not an amount with at most two decimals")
    return value


def _telegram_id(telegram_id: int) -> int:
    if isinstance(telegram_id, bool) or not isinstance(telegram_id, int):
        raise TypeError(f"a telegram id is an int, not {type(telegram_id).__name__}")
    if not 0 < telegram_id < 2**63:
        raise ValueError(f"{telegram_id} is not a telegram id (1..9223372036854775807)")
    return telegram_id
