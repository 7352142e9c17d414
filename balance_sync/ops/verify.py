"""Verification: compare every balance key in Redis with its row in PostgreSQL, writing nothing.

Two streaming passes keep memory constant whatever the size of either side:
1. each SCAN page of Redis keys is validated as a sync would, and the rows of its valid ids
   are fetched in one query: keys missing in PostgreSQL and values that differ;
2. PostgreSQL's ids are streamed in id order from a server-side cursor, and each chunk is
   checked with one pipelined EXISTS per id: rows missing in Redis. Rows with an id below 1
   can have no key and are left out of the figures.

Money is compared as exact decimals parsed from text, never as floats. Both sides keep
changing while a bot runs, so a difference on a live system may only mean that a balance
moved since the last sync; a second verify right after a sync tells drift from motion.
"""

from __future__ import annotations

import contextlib
import decimal
import logging
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from balance_sync.settings import Settings
from balance_sync.stores.postgres import Database, Reads, Schema, TargetTable, text_of
from balance_sync.stores.redis import Page, RedisStore
from balance_sync.validation import InvalidRecord, validate

log = logging.getLogger(__name__)

Status = Literal["in_sync", "drift"]
DEFAULT_LIMIT = 20
PG_CHUNK = 1000

# Enough digits for any sum of numeric(20,2) values, and a trap instead of silent rounding
# should a sum ever outgrow them.
_EXACT = decimal.Context(
    prec=80, traps=[decimal.Inexact, decimal.Rounded, decimal.Overflow, decimal.InvalidOperation]
)
_CENT = Decimal("0.01")


@dataclass(frozen=True)
class VerifyOptions:
    """The flags of one `balsync verify`."""

    limit: int = DEFAULT_LIMIT
    allow_negative: bool = False


@dataclass(frozen=True)
class MissingInPostgres:
    """A valid key in Redis without a row in PostgreSQL."""

    telegram_id: int
    key: str
    redis: str


@dataclass(frozen=True)
class Differing:
    """A valid key whose value is not the row's balance (None: the row's balance is NULL)."""

    telegram_id: int
    key: str
    redis: str
    postgres: str | None


@dataclass(frozen=True)
class MissingInRedis:
    """A row in PostgreSQL whose key is absent from Redis."""

    telegram_id: int
    key: str
    postgres: str | None


@dataclass
class VerifyResult:
    """What a comparison found; `to_json` is the command's JSON object."""

    redis_keys: int = 0
    valid_keys: int = 0
    invalid_keys: int = 0
    pg_rows: int = 0
    redis_sum: Decimal = Decimal(0)
    pg_sum: Decimal = Decimal(0)
    missing_in_pg: int = 0
    differing: int = 0
    missing_in_redis: int = 0
    missing_in_pg_examples: list[MissingInPostgres] = field(default_factory=list)
    differing_examples: list[Differing] = field(default_factory=list)
    missing_in_redis_examples: list[MissingInRedis] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def status(self) -> Status:
        """`in_sync` when no key or row is missing on either side and no value differs."""
        drift = self.missing_in_pg or self.differing or self.missing_in_redis
        return "drift" if drift else "in_sync"

    def to_json(self) -> dict[str, object]:
        """The command's JSON object: counts, exact sums as strings, and the examples."""
        return {
            "status": self.status,
            "redis_keys": self.redis_keys,
            "valid_keys": self.valid_keys,
            "invalid_keys": self.invalid_keys,
            "pg_rows": self.pg_rows,
            "redis_sum": money_text(self.redis_sum),
            "pg_sum": money_text(self.pg_sum),
            "missing_in_pg": self.missing_in_pg,
            "differing": self.differing,
            "missing_in_redis": self.missing_in_redis,
            "examples": {
                "missing_in_pg": [
                    {"id": e.telegram_id, "key": e.key, "redis": e.redis}
                    for e in self.missing_in_pg_examples
                ],
                "differing": [
                    {"id": e.telegram_id, "key": e.key, "redis": e.redis, "postgres": e.postgres}
                    for e in self.differing_examples
                ],
                "missing_in_redis": [
                    {"id": e.telegram_id, "key": e.key, "postgres": e.postgres}
                    for e in self.missing_in_redis_examples
                ],
            },
        }


def failed_json() -> dict[str, object]:
    """The command's JSON object when the comparison could not finish: no figures, no examples."""
    empty = VerifyResult().to_json()
    return {**dict.fromkeys(empty), "status": "failed", "examples": empty["examples"]}


def money_text(amount: Decimal) -> str:
    """An exact amount in fixed-point notation with at least two decimals, never rounded."""
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent > -2:
        amount = _EXACT.quantize(amount, _CENT)
    return format(amount, "f")


def run_verify(settings: Settings, options: VerifyOptions) -> VerifyResult:
    """Compare Redis with PostgreSQL as described in the module docstring, writing nothing.

    Raises RedisUnavailable, PostgresUnavailable, or SchemaMissing when the target table or
    one of its columns is absent.
    """
    started = time.monotonic()
    redis = RedisStore(settings.redis_url, settings.retry_timeout)
    db = Database(settings.database_url, settings.retry_timeout)
    try:
        redis.ping()
        comparison = _Comparison(
            settings, options, redis, db, Schema(db).describe_target(settings), VerifyResult()
        )
        for page in redis.scan_pages(settings.key_prefix):
            comparison.compare_page(page)
        # Closed while its connection is open, even when Redis fails mid-way.
        with contextlib.closing(
            Reads(db).stream_balances(comparison.target, None, PG_CHUNK)
        ) as chunks:
            for rows in chunks:
                comparison.check_rows(rows)
    finally:
        db.close()
        redis.close()
    result = comparison.result
    result.duration_s = time.monotonic() - started
    log.info(
        "verify %s: %d keys (%d invalid), %d rows; %d missing in PostgreSQL, %d differing, "
        "%d missing in Redis",
        result.status,
        result.redis_keys,
        result.invalid_keys,
        result.pg_rows,
        result.missing_in_pg,
        result.differing,
        result.missing_in_redis,
    )
    return result


@dataclass
class _Comparison:
    """The collaborators of one verify, and the result it builds up."""

    settings: Settings
    options: VerifyOptions
    redis: RedisStore
    db: Database
    target: TargetTable
    result: VerifyResult

    def compare_page(self, page: Page) -> None:
        """Validate one SCAN page and compare its valid keys with their rows."""
        result, limit = self.result, self.options.limit
        result.redis_keys += len(page.wrong_type)
        result.invalid_keys += len(page.wrong_type)
        for key, kind in page.wrong_type:
            log.debug("ignored %s: key holds a %s, not a string", _show(key), kind)
        valid = self._valid_records(page)
        if not valid:
            return
        result.valid_keys += len(valid)
        rows = Reads(self.db).persisted_balances(self.target, list(valid))
        for telegram_id, (key, amount, text) in valid.items():
            result.redis_sum = _EXACT.add(result.redis_sum, amount)
            if telegram_id not in rows:
                result.missing_in_pg += 1
                if len(result.missing_in_pg_examples) < limit:
                    result.missing_in_pg_examples.append(
                        MissingInPostgres(telegram_id, text_of(key), text)
                    )
                continue
            stored = rows[telegram_id]
            if stored is None or stored != amount:
                result.differing += 1
                if len(result.differing_examples) < limit:
                    shown = None if stored is None else format(stored, "f")
                    result.differing_examples.append(
                        Differing(telegram_id, text_of(key), text, shown)
                    )

    def _valid_records(self, page: Page) -> dict[int, tuple[bytes, Decimal, str]]:
        """The page's valid records by id: key, exact amount, amount as text; others counted."""
        prefix_length = len(self.settings.key_prefix.encode())
        valid: dict[int, tuple[bytes, Decimal, str]] = {}
        # A key repeated within a page is compared once; a rehash can also repeat a key
        # across pages (see `scan_pages`), which then counts twice in the totals.
        seen: set[bytes] = set()
        for key, raw in page.values:
            if key in seen:
                continue
            seen.add(key)
            self.result.redis_keys += 1
            checked = validate(
                key,
                raw,
                prefix_length,
                value_format=self.settings.value_format,
                allow_negative=self.options.allow_negative,
            )
            if isinstance(checked, InvalidRecord):
                self.result.invalid_keys += 1
                log.debug("ignored %s: %s", _show(key), checked.reason)
                continue
            digits, amount = checked
            text = amount.decode("ascii")
            valid[int(digits)] = (key, Decimal(text), text)
        return valid

    def check_rows(self, rows: list[tuple[int, str | None]]) -> None:
        """Count one chunk of rows, add up their balances, and find those without a key."""
        result = self.result
        prefix = self.settings.key_prefix.encode()
        keys = [prefix + b"%d" % telegram_id for telegram_id, _ in rows]
        present = self.redis.existing(keys)
        result.pg_rows += len(rows)
        for (telegram_id, value), key, exists in zip(rows, keys, present, strict=True):
            balance = None if value is None else self.target.balance_type.amount_text(value)
            amount = _number(balance)
            if amount is not None:
                result.pg_sum = _EXACT.add(result.pg_sum, amount)
            if exists:
                continue
            result.missing_in_redis += 1
            if len(result.missing_in_redis_examples) < self.options.limit:
                result.missing_in_redis_examples.append(
                    MissingInRedis(telegram_id, text_of(key), balance)
                )


def _number(text: str | None) -> Decimal | None:
    """A balance PostgreSQL gave as text, as an exact Decimal; None for NULL or no number."""
    if text is None:
        return None
    try:
        return Decimal(text)
    except decimal.InvalidOperation:
        # An application table may keep money in a text column; such a row adds nothing.
        return None


def _show(key: bytes) -> str:
    return repr(key.decode("utf-8", "backslashreplace"))[:200]
