"""balsync behind a real PgBouncer: everything works in session pooling; transaction pooling,
where a session-level advisory lock cannot be held for a run, is refused at start (exit 2)
with nothing written."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import psycopg
import pytest
import redis

from balance_sync.stores.postgres import LOCK_CLASS
from balance_sync.writer import BalanceWriter
from tests.helpers import Balsync, balances, lock_held
from tests.support.pgbouncer import PgBouncer

Conn = psycopg.Connection[tuple[object, ...]]
REFUSAL = "transaction pooling"
FIX = "a direct or session-pooled URL"


@pytest.fixture
def session_pooled(database_url: str) -> Iterator[PgBouncer]:
    """PgBouncer in session mode in front of the test's database."""
    bouncer = PgBouncer(database_url, "session").start()
    yield bouncer
    bouncer.stop()


@pytest.fixture(params=["lifo", "round-robin"])
def transaction_pooled(database_url: str, request: pytest.FixtureRequest) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode, several server connections per pool, handed out
    last-used first (the default) or in turn (server_round_robin)."""
    bouncer = PgBouncer(
        database_url, "transaction", pool_size=4, round_robin=request.param == "round-robin"
    ).start()
    yield bouncer
    bouncer.stop()


def _lock_pids(pg: Conn) -> list[object]:
    """The server pids holding a balsync table lock in the test's database."""
    rows = pg.execute(
        """SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())""",
        (LOCK_CLASS,),
    ).fetchall()
    return [pid for (pid,) in rows]


def _json(balsync: Balsync, *args: str, url: str) -> dict[str, object]:
    result = balsync(*args, "--json", env={"BALSYNC_DATABASE_URL": url})
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_every_command_works_through_session_pooling(
    balsync: Balsync, session_pooled: PgBouncer, rds: redis.Redis, key_prefix: str, pg: Conn
) -> None:
    """sync (twice), --incremental, clear-cache --yes, restore, verify and status, pooled."""
    url = session_pooled.url
    balsync.ok("init-db", env={"BALSYNC_DATABASE_URL": url})
    rds.mset({f"{key_prefix}{i}": f"{i}.50" for i in range(1, 51)})
    first = _json(balsync, "sync", "--force", url=url)
    assert (first["status"], first["inserted"]) == ("success", 50)
    again = _json(balsync, "sync", "--force", url=url)
    assert (again["status"], again["unchanged"]) == ("success", 50)
    BalanceWriter(rds, prefix=key_prefix).set(7, "70.00")
    changed = _json(balsync, "sync", "--incremental", "--min-interval", "0", url=url)
    assert (changed["processed"], changed["updated"]) == (1, 1)
    assert balances(pg)[7] == "70.00"
    cleared = balsync("clear-cache", "--yes", env={"BALSYNC_DATABASE_URL": url})
    assert cleared.exit_code == 0, (cleared.stdout, cleared.stderr)
    assert rds.exists(*[f"{key_prefix}{i}" for i in range(1, 51)]) == 0
    restored = _json(balsync, "restore", url=url)
    assert (restored["status"], restored["restored"]) == ("success", 50)
    assert rds.get(f"{key_prefix}7") == b"70.00"
    verified = balsync("verify", env={"BALSYNC_DATABASE_URL": url})
    assert verified.exit_code == 0, (verified.stdout, verified.stderr)
    status = _json(balsync, "status", url=url)
    assert status["running"] is False
    assert len(balances(pg)) == 50


def test_status_names_the_pooled_lock_holder_by_its_server_pid(
    balsync: Balsync, session_pooled: PgBouncer, pg: Conn
) -> None:
    """The holder a pooled run reports is the server's backend, the one pg_locks shows."""
    balsync.ok("init-db", env={"BALSYNC_DATABASE_URL": session_pooled.url})
    with lock_held(session_pooled.url) as lock:
        pid = lock.holder_pid()
        status = _json(balsync, "status", url=session_pooled.url)
    assert _lock_pids(pg) == []  # released
    assert status["running"] is True
    assert status["lock_holder"]["backend_pid"] == pid  # type: ignore[index]


def test_a_pooled_run_skips_while_another_holds_the_lock(
    balsync: Balsync, session_pooled: PgBouncer, rds: redis.Redis, key_prefix: str, pg: Conn
) -> None:
    """Through session pooling the lock still keeps two runs apart."""
    balsync.ok("init-db", env={"BALSYNC_DATABASE_URL": session_pooled.url})
    rds.set(f"{key_prefix}1", "1.00")
    with lock_held(session_pooled.url):
        data = _json(balsync, "sync", "--force", url=session_pooled.url)
    assert data["status"] == "skipped"
    assert balances(pg) == {}


def _nothing_written(pg: Conn) -> None:
    assert balances(pg) == {}
    assert pg.execute("SELECT count(*) FROM balsync.sync_runs").fetchone() == (0,)
    assert _lock_pids(pg) == []


def _refused(balsync: Balsync, url: str, *args: str) -> None:
    result = balsync(*args, env={"BALSYNC_DATABASE_URL": url})
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert REFUSAL in result.stderr
    assert FIX in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("sync", "--force"),
        ("sync", "--incremental"),
        ("clear-cache", "--yes"),
        ("restore",),
        ("prune",),
    ],
)
def test_transaction_pooling_is_refused_at_start_writing_nothing(
    balsync: Balsync,
    transaction_pooled: PgBouncer,
    rds: redis.Redis,
    key_prefix: str,
    pg: Conn,
    command: tuple[str, ...],
) -> None:
    """Every command that takes the lock exits 2 naming the fix; no row, no run, no lock."""
    balsync.ok("init-db")
    rds.mset({f"{key_prefix}{i}": "1.00" for i in range(1, 11)})
    _refused(balsync, transaction_pooled.url, *command)
    _nothing_written(pg)
    assert rds.exists(*[f"{key_prefix}{i}" for i in range(1, 11)]) == 10


def test_transaction_pooling_is_refused_while_other_clients_keep_the_pool_busy(
    balsync: Balsync, transaction_pooled: PgBouncer, rds: redis.Redis, key_prefix: str, pg: Conn
) -> None:
    """With concurrent clients, so that consecutive transactions reach different backends."""
    balsync.ok("init-db")
    rds.set(f"{key_prefix}1", "1.00")
    stop = threading.Event()
    backends: set[object] = set()

    def busy() -> None:
        # Unprepared: PgBouncer 1.18 keeps no prepared statement across transactions.
        with psycopg.connect(
            transaction_pooled.url, autocommit=True, prepare_threshold=None
        ) as conn:
            while not stop.is_set():
                row = conn.execute("SELECT pg_backend_pid(), pg_sleep(0.01)").fetchone()
                assert row is not None
                backends.add(row[0])

    clients = [threading.Thread(target=busy) for _ in range(3)]
    for client in clients:
        client.start()
    try:
        for _ in range(3):
            _refused(balsync, transaction_pooled.url, "sync", "--force")
    finally:
        stop.set()
        for client in clients:
            client.join()
    assert len(backends) > 1  # the pool really handed out several server sessions
    _nothing_written(pg)


def test_a_backend_carrying_another_clients_lock_is_never_shared(
    balsync: Balsync, transaction_pooled: PgBouncer, rds: redis.Redis, key_prefix: str, pg: Conn
) -> None:
    """pg_try_advisory_lock would grant a pooled backend's lock again; balsync refuses it."""
    balsync.ok("init-db")
    rds.set(f"{key_prefix}1", "1.00")
    with psycopg.connect(transaction_pooled.url, autocommit=True) as holder:
        # Taken as a run in transaction pooling would, the backend then back in the pool.
        assert holder.execute(
            """SELECT set_config('balsync.lock_owner', 'another run', false),
                      pg_try_advisory_lock(%s, 'user_balances'::regclass::oid::int4)""",
            (LOCK_CLASS,),
        ).fetchone() == ("another run", True)
        for _ in range(3):
            result = balsync(
                "sync", "--force", env={"BALSYNC_DATABASE_URL": transaction_pooled.url}
            )
            assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
        assert balances(pg) == {}
        assert pg.execute("SELECT count(*) FROM balsync.sync_runs").fetchone() == (0,)


def test_read_only_commands_work_through_transaction_pooling(
    balsync: Balsync, transaction_pooled: PgBouncer, rds: redis.Redis, key_prefix: str, pg: Conn
) -> None:
    """status, verify and health take no lock: they answer through transaction pooling."""
    balsync.ok("init-db")
    rds.mset({f"{key_prefix}{i}": f"{i}.00" for i in range(1, 10001)})
    balsync.ok("sync", "--force")
    status = _json(balsync, "status", url=transaction_pooled.url)
    assert status["running"] is False
    verified = _json(balsync, "verify", url=transaction_pooled.url)
    assert (verified["missing_in_pg"], verified["differing"]) == (0, 0), verified
    health = balsync("health", "--json", env={"BALSYNC_DATABASE_URL": transaction_pooled.url})
    report = json.loads(health.stdout)
    # The shared Redis keeps nothing on disk: its persistence check is the only one failing.
    failing = [c["name"] for c in report["checks"] if not c["ok"]]
    assert failing in ([], ["persistence"]), (health.stdout, health.stderr)


def test_a_pooled_run_whose_server_session_dies_takes_the_lock_again(
    balsync: Balsync, session_pooled: PgBouncer, pg: Conn
) -> None:
    """A reconnect through session pooling is a new session, not a pooler's sharing: the
    lock is taken again on the new backend instead of refusing."""
    balsync.ok("init-db", env={"BALSYNC_DATABASE_URL": session_pooled.url})
    with lock_held(session_pooled.url) as lock:
        before = lock.holder_pid()
        pg.execute("SELECT pg_terminate_backend(%s)", (before,))
        after = lock.holder_pid()
        holders = _lock_pids(pg)
    assert after != before
    assert holders == [after]
