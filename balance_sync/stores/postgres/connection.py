"""The connection to PostgreSQL: connecting, the limits of balsync's own sessions, the
deadline of each attempt, and the retry budget every statement runs under.

Table and column names are always composed with psycopg.sql identifiers, never formatted
into SQL text, so a hostile name cannot change the statement.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from balance_sync import retry
from balance_sync.errors import PostgresUnavailable
from balance_sync.settings import TableName, mask_url

T = TypeVar("T")
log = logging.getLogger(__name__)
Connection = psycopg.Connection[TupleRow]

CONNECT_OPTIONS: dict[str, Any] = {
    "application_name": "balsync",
    "connect_timeout": 10,
    # A blackholed connection must fail instead of hanging the run forever.
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30000,
}
# Server-side limits for balsync's own sessions. Without them a run whose host died keeps
# its session, and the table's advisory lock, until the server's kernel gives up on the
# TCP connection (about two hours by default), and every run meanwhile skips with exit 0.
# Keepalives end a dead client's session within about a minute; the idle limits end one
# that a hung process, or a pooler's still-open server connection, keeps alive.
SESSION_KEEPALIVES: dict[str, str] = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "60000",  # ms: data sent to a dead client is not retransmitted for hours
}
# A healthy run's lock connection is idle between batches, and a batch waits at most a few
# retry budgets (Redis reads, a writer's retried merge): the limit is far above that.
MIN_IDLE_SESSION_S = 900.0
# balsync's transactions wait on Redis only between statements (the restart guard's check,
# conflict resolution), each under the retry budget.
MIN_IDLE_IN_TRANSACTION_S = 300.0
# The least time one attempt (a statement, a batch's transaction) may go unanswered; the
# retry budget raises it. Far above a healthy batch merge, short enough that a silent
# server becomes exit 4 instead of a hung cron job.
MIN_ATTEMPT_DEADLINE = 30.0
_LOGIN_REFUSED = ("28P01", "28000")  # a password or pg_hba refused: exit 4, never retried


class Database:
    """A PostgreSQL connection with balsync's retry budget and its own reconnects."""

    def __init__(self, url: str, retry_timeout: float) -> None:
        self.url = url
        self.retry_timeout = retry_timeout
        self.deadline = max(MIN_ATTEMPT_DEADLINE, retry_timeout)
        self._conn: Connection | None = None
        self._keys: dict[TableName, str] = {}
        # Connections opened so far: a server session that changes while this count does
        # not was changed by a pooler, not by a reconnect.
        self.connects = 0

    def connection(self) -> Connection:
        """The open connection, opened (again) if needed; callers run under `call`."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            conn = psycopg.connect(self.url, autocommit=True, **CONNECT_OPTIONS)
            try:
                self._limit_session(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            self.connects += 1
        return self._conn

    def session_settings(self) -> dict[str, str]:
        """The server settings each of balsync's sessions sets for itself, in their units
        (the timeouts in milliseconds), scaled to the retry budget."""
        return {
            **SESSION_KEEPALIVES,
            "idle_session_timeout": str(int(max(MIN_IDLE_SESSION_S, 10 * self.deadline) * 1000)),
            "idle_in_transaction_session_timeout": str(
                int(max(MIN_IDLE_IN_TRANSACTION_S, 4 * self.deadline) * 1000)
            ),
        }

    def _limit_session(self, conn: Connection) -> None:
        """Apply `session_settings` to a new session, so no server configuration is needed.

        set_config after connecting, not libpq's `options` startup parameter: PgBouncer
        refuses a startup parameter it does not know unless told to ignore it, while a
        statement passes any pooler. A setting the server lacks (idle_session_timeout
        before PostgreSQL 14) is left out; a server that refuses the rest is logged and
        used as it is: the limits shorten a dead run's hold, the sync is correct without.
        """
        settings = self.session_settings()
        try:
            with _watchdog(conn, self.deadline):
                conn.execute(
                    """SELECT set_config(v.name, v.setting, false)
                       FROM unnest(%s::text[], %s::text[]) AS v(name, setting)
                       WHERE v.name IN (SELECT name FROM pg_settings)""",
                    (list(settings), list(settings.values())),
                )
        except psycopg.Error as exc:
            if retry.is_transient_postgres(exc) or conn.broken:
                raise
            log.warning("PostgreSQL refused balsync's session limits: %s", _first_line(exc))

    def close(self) -> None:
        """Close the connection; a session-level advisory lock goes with it."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def connected(self) -> Connection | None:
        """The connection while it is open and sound, else None; never reconnects."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return None
        return conn

    @property
    def backend_pid(self) -> int:
        """The server process of the current connection, as the server itself reports it.

        The pid a connection learns at startup (`conn.info.backend_pid`) is whatever its peer
        sent: behind PgBouncer that is the pooler's invention, which pg_locks never shows.
        """
        # Never prepared: a prepared statement lives in one server session, and this question
        # must reach whichever session a pooler hands over.
        row = self.call(
            lambda conn: conn.execute("SELECT pg_backend_pid()", prepare=False).fetchone()
        )
        assert row is not None
        return int(row[0])

    def call(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn` on the connection under the retry policy, reconnecting between tries.

        The connection is in autocommit mode; `fn` wraps its writes in `conn.transaction()`,
        so a failed attempt leaves nothing behind and is safe to run again from the start.
        """

        def attempt() -> T:
            conn = self.connection()
            with _watchdog(conn, self.deadline):
                return fn(conn)

        try:
            return retry.call(
                "PostgreSQL", self.retry_timeout, retry.is_transient_postgres, attempt
            )
        except psycopg.Error as exc:
            if retry.is_transient_postgres(exc) or exc.sqlstate in _LOGIN_REFUSED:
                raise PostgresUnavailable(
                    f"PostgreSQL at {mask_url(self.url) or '(libpq defaults)'} is unavailable"
                    f" after {self.retry_timeout:g}s of retries: {_first_line(exc)}",
                    "check that the server runs, and the URL, credentials and sslmode",
                ) from exc
            raise

    def key(self, table: TableName) -> str:
        """The name balsync's bookkeeping knows `table` by: schema.name as the catalog spells
        it, so `user_balances` and `public.user_balances` share runs, trust and memory.

        A table that does not exist (yet) keeps its spelling.
        """
        known = self._keys.get(table)
        if known is not None:
            return known
        found = self.call(lambda conn: catalog_key(conn, _ident(table).as_string(conn)))
        if found is None:
            return str(table)
        self._keys[table] = found
        return found

    def ping(self) -> None:
        """One round trip to the server."""
        self.call(lambda conn: conn.execute("SELECT 1").fetchone())

    def server_version(self) -> str:
        """The server's version, as `SHOW server_version` gives it."""
        row = self.call(
            lambda conn: conn.execute("SELECT current_setting('server_version')").fetchone()
        )
        return str(row[0]) if row else ""


def catalog_key(conn: Connection, name: str) -> str | None:
    """schema.name of the relation `name` (quoted) as the catalog spells it; None if absent."""
    row = conn.execute(
        """SELECT n.nspname || '.' || c.relname FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)""",
        (name,),
    ).fetchone()
    return None if row is None else str(row[0])


class Part:
    """One family of balsync's statements (the schema, the lock, the ledger, the merge...),
    run on a Database's connection under its retry budget."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def call(self, fn: Callable[[Connection], T]) -> T:
        """`Database.call` on the database this part runs on."""
        return self.db.call(fn)

    def key(self, table: TableName) -> str:
        """`Database.key` on the database this part runs on."""
        return self.db.key(table)


class _Watchdog:
    """Cuts a connection when one attempt outlasts `seconds`: armed for each attempt, disarmed
    between attempts.

    Keepalives and tcp_user_timeout notice a dead peer, not a live one that never answers
    (a hung server, a stuck pooler or load balancer, a lock that is never granted): there
    psycopg would wait forever. Shutting the socket down wakes it with an error that the
    retry policy handles.
    """

    def __init__(self, conn: Connection, seconds: float) -> None:
        self.conn = conn
        self.seconds = seconds
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        """Start the clock of an attempt (again)."""
        self.disarm()
        self._timer = threading.Timer(self.seconds, self._cut)
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        """Stop the clock: the attempt is over."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _cut(self) -> None:
        log.warning("PostgreSQL did not answer within %.0fs; dropping the connection", self.seconds)
        with contextlib.suppress(OSError, psycopg.Error):
            fd = os.dup(self.conn.pgconn.socket)
            with socket.socket(fileno=fd) as sock:
                sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def _watchdog(conn: Connection, seconds: float) -> Iterator[None]:
    """One attempt on `conn` under a `_Watchdog` of `seconds`."""
    guard = _Watchdog(conn, seconds)
    guard.arm()
    try:
        yield
    finally:
        guard.disarm()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _ident(table: TableName) -> sql.Identifier:
    return sql.Identifier(table.schema, table.name) if table.schema else sql.Identifier(table.name)
