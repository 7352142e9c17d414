"""The per-table advisory lock that lets one run at a time write a target table."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import LiteralString

import psycopg
from psycopg.rows import class_row

from balance_sync.errors import ConfigError, LockLost
from balance_sync.settings import TableName
from balance_sync.stores.postgres.connection import Connection, Database, Part, _ident, _watchdog

LOCK_POLL_S = 0.5  # between tries to take a table's lock while --wait lasts
PROBE_ROUNDS = 32  # a second connection's tries to reach the lock's session: a pool's length
START_CHECKS = 5  # transactions that must find the lock's own session before a run writes
SHARED_UNLOCK_TRIES = 20  # transactions that look for the lock's session in a pool to free it

# balsync's advisory locks: (LOCK_CLASS, oid of the target table) per table, so every
# spelling of one table (`user_balances`, `public.user_balances`) shares one lock; pg_locks
# shows them as classid = LOCK_CLASS, objid = the table's oid, objsubid = 2.
LOCK_CLASS = 1650551923  # "bals" in ASCII
# The server session that holds a table's lock for a run carries the run's token in this
# setting. Through a pooler that hands one server session to many clients (PgBouncer's
# transaction pooling) a session lock stays on a backend that any client may get next, and
# pg_try_advisory_lock grants a lock its session already holds: the token tells the run
# whose session it is, and tells another client that the session is not its own.
_OWNER = "balsync.lock_owner"
_SESSION: LiteralString = "SELECT pg_backend_pid(), current_setting('balsync.lock_owner', true)"
_LOCK_ROW = """locktype = 'advisory' AND classid = %s AND objid = to_regclass(%s)::oid
               AND objsubid = 2 AND database = (
                   SELECT oid FROM pg_database WHERE datname = current_database())"""


class TableLock(Part):
    """The advisory lock of a target table, as a connection takes, frees and inspects it."""

    def prove_own_session(self, table: TableName, owner: str) -> None:
        """Mark the connection's server session as `owner`'s and prove that it stays this
        connection's alone between transactions, as a session lock needs; else ConfigError.

        A direct connection and session pooling pass. Transaction pooling fails: the marked
        session goes back to the pool after each transaction, so a second connection's
        transactions reach it (at once where the pool reuses the server used last, within a
        pool's length where it takes them in turn), or this connection's next transaction,
        asked while the second one holds a session, reaches another one.
        """

        def mark(conn: Connection) -> int:
            with conn.transaction():
                pid, held_for = _session(conn)
                if held_for not in ("", owner):
                    raise _shared_sessions(table)
                conn.execute("SELECT set_config(%s, %s, false)", (_OWNER, owner))
            return pid

        pid = self.call(mark)
        probe = Database(self.db.url, self.db.retry_timeout)

        def look(conn: Connection) -> bool:
            with conn.transaction():  # keeps its server session while this one is asked again
                other_pid, other_owner = _session(conn)
                if other_pid == pid or other_owner == owner:
                    return False
                return self.call(_session) == (pid, owner)

        try:
            own = all(probe.call(look) for _ in range(PROBE_ROUNDS))
        finally:
            probe.close()
        if not own:
            raise _shared_sessions(table)

    def try_lock(
        self,
        table: TableName,
        wait: float,
        pause: Callable[[float], None] = time.sleep,
        owner: str = "",
    ) -> bool:
        """Take the table's session-level advisory lock, waiting up to `wait` seconds.

        The wait is a series of short tries, each a statement under the watchdog, with
        `pause` between them: one blocking call that outlasts the watchdog would be cut as
        a silent server, and a --wait longer than it would end as exit 4.
        """
        return self.take_lock(table, wait, pause, owner) is not None

    def take_lock(
        self,
        table: TableName,
        wait: float,
        pause: Callable[[float], None] = time.sleep,
        owner: str = "",
    ) -> int | None:
        """`try_lock` that returns the server pid holding the lock, None when not taken.

        The session is marked with `owner`; one marked by another owner already is a server
        session shared between clients, where a granted lock would be that owner's own:
        ConfigError.
        """

        def attempt(conn: Connection) -> int | None:
            with conn.transaction():  # one transaction: one server session, even pooled
                pid, held_for = _session(conn)
                if held_for not in ("", owner):
                    raise _shared_sessions(table)
                row = conn.execute(
                    "SELECT pg_try_advisory_lock(%s, to_regclass(%s)::oid::int4)",
                    (LOCK_CLASS, _ident(table).as_string(conn)),
                ).fetchone()
                if not (row and row[0]):
                    return None
                if owner:
                    conn.execute("SELECT set_config(%s, %s, false)", (_OWNER, owner))
                return pid

        give_up = time.monotonic() + wait
        while (pid := self.call(attempt)) is None:
            left = give_up - time.monotonic()
            if left <= 0:
                return None
            pause(min(LOCK_POLL_S, left))
        return pid

    def unlock(self, table: TableName, owner: str = "") -> bool:
        """Release the table's advisory lock (closing the connection would too), where the
        connection's server session is `owner`'s: a pooled session may be someone else's.
        False when this transaction reached another session (or none)."""
        conn = self.db.connected()
        if conn is None:
            return False
        # Trivial statements; the lock dies with the session anyway.
        with _watchdog(conn, 5.0), conn.transaction():
            if _session(conn)[1] != owner:
                return False
            conn.execute(
                """SELECT pg_advisory_unlock(%s, to_regclass(%s)::oid::int4),
                          set_config(%s, '', false)""",
                (LOCK_CLASS, _ident(table).as_string(conn), _OWNER),
            )
        return True

    def lock_holder(self, table: TableName) -> LockHolder | None:
        """The backend that holds the advisory lock of `table` in this database, if any."""
        # pg_stat_activity shares no column name with _LOCK_ROW's, so they need no prefix.
        query: LiteralString = (
            """SELECT l.pid AS backend_pid, a.application_name,
                      host(a.client_addr) AS client_addr, a.backend_start,
                      a.state_change, a.state,
                      extract(epoch FROM now() - a.state_change)::float8 AS quiet_s
               FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE l.granted AND l."""
            + _LOCK_ROW
            + " LIMIT 1"
        )

        def run(conn: Connection) -> LockHolder | None:
            with conn.cursor(row_factory=class_row(LockHolder)) as cur:
                return cur.execute(query, (LOCK_CLASS, _ident(table).as_string(conn))).fetchone()

        return self.call(run)


@dataclass(frozen=True)
class LockHolder:
    """The PostgreSQL backend holding a table's advisory lock; None where stats are hidden."""

    backend_pid: int
    application_name: str | None
    client_addr: str | None
    backend_start: datetime | None
    state_change: datetime | None
    state: str | None
    # Seconds since the session last started or ended a statement, by the server's clock:
    # a running sync's lock session touches the lock every batch.
    quiet_s: float | None = None


class RunLock:
    """The per-table advisory lock, held by a connection of its own for the whole run.

    A session lock dies with its connection. After a reconnect the lock is taken again
    without waiting; if another run got it meanwhile, this run stops writing.
    """

    def __init__(self, db: Database, table: TableName) -> None:
        self.db = db
        self.lock = TableLock(db)
        self.table = table
        self._pid: int | None = None
        self._connects = 0  # the connections db had opened when the lock was (re)taken
        self._token = uuid.uuid4().hex  # marks the server session that holds the lock
        self._shared = False  # a pooler was seen handing this connection another session
        self._mutex = threading.Lock()  # writer threads share the lock's connection

    def acquire(self, wait: float, pause: Callable[[float], None] = time.sleep) -> bool:
        """Take the lock, waiting up to `wait` seconds (`pause` between tries); False if
        another run holds it. ConfigError, before the caller writes anything, where the
        server session does not stay this run's own (transaction pooling)."""
        try:
            self.lock.prove_own_session(self.table, self._token)
            self._pid = self.lock.take_lock(self.table, wait, pause, self._token)
            self._connects = self.db.connects
            if self._pid is None:
                return False
            # Each check is one more transaction that a transaction pool may hand to another
            # server session; among busy clients one of them does, long before a first write.
            for _ in range(START_CHECKS):
                self.holder_pid()
        except ConfigError:
            self._shared = True
            raise
        return True

    def holder_pid(self) -> int:
        """The server process that holds the lock for this run, re-taking it if needed.

        ConfigError when the server session changed under the same client connection: a
        pooler in transaction mode, where the lock cannot be held.
        """
        with self._mutex:
            pid, held_for = self.db.call(_session)
            if (pid, held_for) != (self._pid, self._token):
                if self.db.connects == self._connects:
                    raise _shared_sessions(self.table)
                # A reconnect: the lock went with the old session.
                self._pid = self.lock.take_lock(self.table, 0, owner=self._token)
                self._connects = self.db.connects
                if self._pid is None:
                    raise LockLost(
                        f"this run lost the advisory lock on {self.table} and another run took it",
                        "the other run finishes the work; nothing needs doing",
                    )
                pid = self._pid
            return pid

    def release(self) -> None:
        """Let the next run in."""
        # If the connection is gone, the lock went with it. Through a transaction pool the
        # session holding it is one of several: a few more tries reach it most likely, and a
        # lock left behind keeps out runs, it never lets two in.
        with contextlib.suppress(psycopg.Error):
            for _ in range(SHARED_UNLOCK_TRIES if self._shared else 1):
                if self.lock.unlock(self.table, self._token):
                    break


def _session(conn: Connection) -> tuple[int, str]:
    """The server pid of this transaction and the lock owner its server session carries."""
    # Never prepared: a prepared statement lives in one server session, and this question
    # must reach whichever session a pooler hands over.
    row = conn.execute(_SESSION, prepare=False).fetchone()
    assert row is not None
    return int(row[0]), str(row[1] or "")


def _shared_sessions(table: TableName) -> ConfigError:
    return ConfigError(
        "PostgreSQL is reached through a pooler in transaction pooling (PgBouncer pool_mode ="
        " transaction), where server sessions pass between clients: the advisory lock on"
        f" {table} cannot be held for a run, so balsync writes nothing",
        "give balsync a direct or session-pooled URL (PgBouncer pool_mode = session)",
    )
