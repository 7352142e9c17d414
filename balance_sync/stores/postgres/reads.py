"""Reads of the target table: its totals, the balances it persists, and the application's
read-through (balance_sync.writer)."""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg
from psycopg import sql

from balance_sync import retry
from balance_sync.errors import BalanceInvalid, PostgresUnavailable
from balance_sync.settings import TableName, mask_url
from balance_sync.stores.postgres.connection import (
    _LOGIN_REFUSED,
    Part,
    _first_line,
    _ident,
    _Watchdog,
)
from balance_sync.stores.postgres.schema import TargetTable


class Reads(Part):
    """What PostgreSQL holds for the target table."""

    def is_empty(self, target: TargetTable) -> bool:
        """True when the target table has no row at all (before a first sync)."""
        row = self.call(
            lambda conn: conn.execute(
                sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(target.ident)
            ).fetchone()
        )
        return bool(row and row[0])

    def table_totals(self, target: TargetTable) -> tuple[int, Decimal]:
        """Rows of the target table and the exact sum of its balances, as an amount of money."""
        row = self.call(
            lambda conn: conn.execute(
                sql.SQL("SELECT count(*), coalesce(sum({bal}), 0) FROM {table}").format(
                    bal=sql.Identifier(target.balance_column), table=target.ident
                )
            ).fetchone()
        )
        assert row is not None
        # str() first: an application table may keep money in a float column.
        return int(row[0]), target.balance_type.amount(Decimal(str(row[1])))

    def persisted_balances(
        self, target: TargetTable, ids: Sequence[int]
    ) -> dict[int, Decimal | None]:
        """The amount PostgreSQL holds for each of `ids` that has a row (in money, whatever
        the column's unit).

        None where the row holds no number (NULL, text that is none) or where two rows of an
        application table disagree: nothing there can vouch for a Redis value.
        """
        if not ids:
            return {}
        query = sql.SQL("SELECT {id}, {bal} FROM {table} WHERE {id} = ANY(%s)").format(
            id=sql.Identifier(target.id_column),
            bal=sql.Identifier(target.balance_column),
            table=target.ident,
        )
        rows = self.call(lambda conn: conn.execute(query, (list(ids),)).fetchall())
        found: dict[int, Decimal | None] = {}
        for telegram_id, balance in rows:
            value = _exact_decimal(balance)
            if value is not None:
                value = target.balance_type.amount(value)
            key = int(telegram_id)
            found[key] = value if found.get(key, value) == value else None
        return found

    def stream_balances(
        self, target: TargetTable, ids: Sequence[int] | None, batch_size: int
    ) -> Generator[list[tuple[int, str | None]], None, None]:
        """Each row's id and balance as PostgreSQL's text, in id order, `batch_size` at a time.

        The balance is the column's value, in its unit (`BalanceType.amount_text` gives the
        amount).

        A server-side (named) cursor streams the rows, so memory stays constant whatever the
        table's size. Ids below 1 can have no Redis key and are left out; with `ids`, only
        those rows are read. When the connection breaks, the stream reopens after the last
        id it yielded, within the retry budget, so no row is yielded twice.

        Every round trip is bounded as in `call`: the stretch between two batches (a FETCH,
        and the BEGIN and DECLARE before the first one) is one attempt under the same
        deadline, so a silent server or a table locked by another session cannot hang the
        stream. Raises PostgresUnavailable once the budget is spent.
        """
        id_col = sql.Identifier(target.id_column)
        only = sql.SQL(" AND {} = ANY(%s)").format(id_col) if ids is not None else sql.SQL("")
        query = sql.SQL(
            "SELECT {id}, {bal}::text FROM {table} WHERE {id} > %s{only} ORDER BY {id}"
        ).format(
            id=id_col, bal=sql.Identifier(target.balance_column), table=target.ident, only=only
        )
        after = 0
        failing_since: float | None = None  # start of the first failed attempt since a fetch
        while True:
            # Each attempt is one stretch of round trips between two yields (BEGIN, DECLARE and
            # the first FETCH; then each FETCH; the last with CLOSE and COMMIT), under
            # Database.call's deadline. The watchdog sleeps while the consumer works: an
            # attempt is PostgreSQL's time, not the time Redis takes to write a batch.
            started = time.monotonic()
            params: tuple[object, ...] = (after,) if ids is None else (after, list(ids))
            guard: _Watchdog | None = None
            stream: psycopg.ServerCursor[Any] | None = None
            try:
                conn = self.db.connection()
                guard = _Watchdog(conn, self.db.deadline)
                guard.arm()
                with conn.transaction(), conn.cursor(name="balsync_stream") as cursor:
                    stream = cursor
                    cursor.execute(query, params)
                    while rows := cursor.fetchmany(batch_size):
                        failing_since = None
                        after = int(rows[-1][0])
                        guard.disarm()
                        try:
                            yield [(int(i), None if b is None else str(b)) for i, b in rows]
                        finally:
                            # The next FETCH, or the CLOSE and ROLLBACK of a consumer that
                            # stops early, is the next attempt.
                            started = time.monotonic()
                            guard.arm()
                return
            except psycopg.Error as exc:
                if isinstance(exc.__context__, GeneratorExit):
                    # The consumer is closing the stream (often over a fault of its own, which
                    # must stay the error it reports): a read-only transaction that cannot be
                    # ended politely ends with its connection.
                    self.db.close()
                    if stream is not None:
                        stream.close()  # on a closed connection: only marks it closed
                    return
                transient = retry.is_transient_postgres(exc)
                if not transient and exc.sqlstate not in _LOGIN_REFUSED:
                    raise
                # As in Database.call, the budget runs from the start of the first failed
                # attempt: an attempt cut at the deadline (never shorter than the budget) has
                # spent it, so a silent server or a locked table ends the run after one deadline.
                failing_since = started if failing_since is None else failing_since
                if not transient or time.monotonic() - failing_since > self.db.retry_timeout:
                    raise PostgresUnavailable(
                        f"PostgreSQL at {mask_url(self.db.url) or '(libpq defaults)'} is"
                        " unavailable:"
                        f" the stream of {target.table} did not resume within"
                        f" {self.db.retry_timeout:g}s of retries: {_first_line(exc)}",
                        "rerunning is safe: a restore keeps the keys it already wrote",
                    ) from exc
                time.sleep(0.5)
            finally:
                if guard is not None:
                    guard.disarm()


def _exact_decimal(value: object) -> Decimal | None:
    """A balance as PostgreSQL returned it, as an exact Decimal, or None if it is no number."""
    if value is None or isinstance(value, Decimal):
        return value
    try:
        # str() first: an application table may keep money in a float or text column.
        return Decimal(str(value))
    except InvalidOperation:
        return None


# -- the application's read-through (balance_sync.writer) ---------------------------------


def balance_lookup(table: TableName, id_column: str, balance_column: str) -> sql.Composed:
    """One id's persisted balance as text: exact whatever the column's type, and every row,
    since an application table need not make the id unique."""
    return sql.SQL("SELECT {bal}::text FROM {table} WHERE {id} = %s").format(
        bal=sql.Identifier(balance_column), table=_ident(table), id=sql.Identifier(id_column)
    )


def looked_up_balance(telegram_id: int, rows: Sequence[tuple[str | None, ...]]) -> Decimal | None:
    """The balance `balance_lookup` found, or None where there is no row.

    Raises BalanceInvalid where the rows hold no number or disagree: nothing there can
    vouch for a balance, and 0 would invent one.
    """
    values = {_exact_decimal(row[0]) for row in rows}
    if not values:
        return None
    if len(values) > 1 or None in values:
        raise BalanceInvalid(
            f"PostgreSQL holds no single valid balance for {telegram_id} "
            f"({', '.join(sorted(str(row[0]) for row in rows))})",
            "correct the row; until then the balance cannot be read through",
        )
    (value,) = values
    assert value is not None
    return value
