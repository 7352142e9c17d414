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
