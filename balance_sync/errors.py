"""Typed failures of the core; the CLI turns each into one line and its exit code."""

from __future__ import annotations


class BalsyncError(Exception):
    """A failure an operator can act on; `hint` says what to do about it."""

    exit_code = 5

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(BalsyncError):
    """A setting is malformed or two settings contradict each other."""

    exit_code = 2


class RedisUnavailable(BalsyncError):
    """Redis could not be reached within the retry budget."""

    exit_code = 3


class PostgresUnavailable(BalsyncError):
    """PostgreSQL could not be reached within the retry budget."""

    exit_code = 4


class SchemaMissing(BalsyncError):
    """The target table or balsync's own schema is absent."""

    exit_code = 5


class LockLost(BalsyncError):
    """This run no longer holds the per-table advisory lock, so it stops writing."""

    exit_code = 5


class Stopped(BalsyncError):
    """A signal asked the run to stop, and it stopped at a safe point (exit 128 + signal)."""

    def __init__(self, message: str, hint: str = "", *, exit_code: int = 143) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code


class CrontabError(BalsyncError):
    """The user's crontab cannot be read or written: no crontab command, or a broken block."""

    exit_code = 5


class RedisChanged(BalsyncError):
    """The Redis server changed during a run (a restart or failover): it stopped writing."""

    exit_code = 3


# -- the application's writer (balance_sync.writer) ---------------------------------------


class BalanceMissing(BalsyncError):
    """`adjust` found no balance key and nothing it may start from; nothing was written.

    `telegram_id` is the id; `looked_up` tells whether a loader read PostgreSQL (and found no
    row) or there was no loader to ask.
    """

    def __init__(self, telegram_id: int, *, looked_up: bool) -> None:
        if looked_up:
            message = f"no balance for {telegram_id}: the key is absent and PostgreSQL has no row"
            hint = "a new user starts from 0 only when asked: adjust(..., missing='zero')"
        else:
            message = f"no balance for {telegram_id}: the key is absent from Redis"
            hint = (
                "give the writer a loader (database_loader) to read the persisted balance "
                "through, or set() the balance first"
            )
        super().__init__(message, hint)
        self.telegram_id = telegram_id
        self.looked_up = looked_up


class BalanceInvalid(BalsyncError, ValueError):
    """A balance cannot be adjusted: Redis or PostgreSQL holds no valid amount for it, or the
    result would leave the valid range. Nothing was written."""


class AdjustmentUnknown(BalsyncError):
    """The connection failed after an adjustment was sent: it may or may not have been applied.

    Retrying `adjust` with the same `adjustment_id` (and the same id and delta) is safe: an
    adjustment already applied is not applied again, and its result is returned.
    """

    def __init__(self, adjustment_id: str, cause: BaseException) -> None:
        super().__init__(
            f"the outcome of adjustment {adjustment_id} is unknown: {cause}",
            "retry with the same adjustment_id; it is applied at most once",
        )
        self.adjustment_id = adjustment_id
