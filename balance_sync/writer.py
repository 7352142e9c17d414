"""Change tracking for applications: write balances so an incremental sync finds them.

    from decimal import Decimal
    import redis
    from balance_sync.writer import BalanceWriter

    balances = BalanceWriter(redis.Redis(), prefix="balance:")
    balances.set(42, Decimal("1500.00"))      # SET balance:42 1500.00 + mark 42 dirty
    balances.adjust(42, Decimal("-20.50"))    # exact, atomic; returns the new balance

On one server each write and its mark are one atomic step, so `balsync sync --incremental`
syncs exactly the ids that changed; in a Redis Cluster the mark follows the write (see
`TrackedWrites`), and the daily full scan covers the rare crash between the two. Amounts
are Decimal or str, never float.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

import redis
from redis.cluster import RedisCluster

from balance_sync.redis_store import TrackedWrites
from balance_sync.validation import ValueFormat, parse_balance, redis_value


class BalanceWriter:
    """Set or adjust balances in Redis and mark them for `balsync sync --incremental`."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        prefix: str = "balance:",
        value_format: ValueFormat = "decimal",
    ) -> None:
        self.value_format = value_format
        self._writes = TrackedWrites(client, prefix)

    def set(self, telegram_id: int, amount: Decimal | str) -> None:
        """Set a balance exactly (at most two decimals; more is an error, never rounded)."""
        self._writes.set(telegram_id, self._encode(_decimal(amount)))

    def adjust(self, telegram_id: int, delta: Decimal | str) -> Decimal:
        """Add `delta` (negative to subtract) atomically; a missing balance counts as 0."""
        change = _decimal(delta)
        if self.value_format == "cents":
            cents = self._writes.incrby(telegram_id, int(change.scaleb(2)))
            return Decimal(cents).scaleb(-2)

        def add(current: bytes | None) -> bytes:
            base = Decimal(0) if current is None else _parse(current)
            return self._encode(base + change)

        return _parse(self._writes.replace(telegram_id, add))

    def mark(self, telegram_ids: Sequence[int]) -> None:
        """Mark ids whose balances were written by other means."""
        self._writes.mark(telegram_ids)

    def _encode(self, amount: Decimal) -> bytes:
        value = redis_value(str(amount), self.value_format)
        if isinstance(value, str):
            raise ValueError(f"{amount} cannot be stored: {value}")
        return value


def _decimal(amount: Decimal | str) -> Decimal:
    if isinstance(amount, float):
        raise TypeError("money is never a float: pass a Decimal or a str")
    value = Decimal(amount)
    if not value.is_finite() or value != value.quantize(Decimal("0.01")):
        raise ValueError(f"{amount!r} is not an amount with at most two decimals")
    return value


def _parse(raw: bytes) -> Decimal:
    parsed = parse_balance(raw, allow_negative=True)
    if isinstance(parsed, str):
        raise ValueError(f"the stored balance {raw!r} is invalid: {parsed}")
    return Decimal(parsed.decode())
