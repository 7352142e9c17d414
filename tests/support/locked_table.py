"""A target table another session holds locked, and a command that must end instead of hanging.

The deadline of one PostgreSQL attempt (`MIN_ATTEMPT_DEADLINE`, raised to `--retry-timeout`)
is made short in-process, so a command that obeys it ends within seconds. One that does not
would wait for the lock forever: the command runs in a thread under a hard timeout, after
which the lock is let go so the thread can finish, and the test fails cleanly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import psycopg
import pytest
from psycopg import sql

from balance_sync.stores.postgres import connection as pg_connection

T = TypeVar("T")
DEADLINE = 2.0  # one attempt's deadline in these tests: MIN_ATTEMPT_DEADLINE and --retry-timeout
BUDGET = "2"
ENDS_WITHIN = DEADLINE + float(BUDGET) + 6  # the deadline, the budget, and slack for 2 cores
HANG = 45.0  # the hard timeout that turns a hang into a failure


def short_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make one unanswered attempt end after DEADLINE seconds instead of 30."""
    monkeypatch.setattr(pg_connection, "MIN_ATTEMPT_DEADLINE", DEADLINE)


class TableLock:
    """Another session's ACCESS EXCLUSIVE lock on a table, held in an open transaction."""

    def __init__(self, database_url: str, table: str = "user_balances") -> None:
        self.conn = psycopg.connect(database_url)  # not autocommit: the lock lasts
        self.table = table
        self.held = False

    def take(self) -> None:
        """Lock the table (waiting for whoever reads it now)."""
        self.conn.execute(
            sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(self.table))
        )
        self.held = True

    def release(self) -> None:
        """End the holder's transaction, and with it the lock."""
        self.conn.rollback()
        self.held = False


@contextmanager
def table_lock(database_url: str, *, taken: bool = True) -> Iterator[TableLock]:
    """A TableLock (taken at once unless `taken` is False), released and closed at the end."""
    lock = TableLock(database_url)
    try:
        if taken:
            lock.take()
        yield lock
    finally:
        lock.release()
        lock.conn.close()


def ends_in_time(lock: TableLock, fn: Callable[[], T]) -> tuple[T, float]:
    """`fn()` and the seconds it took; fails when it is still waiting after HANG seconds
    (the lock is then released, so that the stuck call can finish and the test end)."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # re-raised in the test's thread
            failure.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=run, name="locked-table-command", daemon=True)
    worker.start()
    worker.join(HANG)
    took = time.monotonic() - started
    if worker.is_alive():
        lock.release()
        worker.join(60)
        pytest.fail(f"still waiting on the locked table after {took:.0f}s (hung)")
    if failure:
        raise failure[0]
    return outcome[0], took
