"""balsync's PostgreSQL sessions set their own keepalives and idle timeouts, so that a run
whose host died or whose process hangs stops holding the table's lock within minutes; set
after connecting, so they work through PgBouncer and need no server configuration."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from balance_sync.settings import TableName
from balance_sync.stores.postgres import Database, RunLock
from balance_sync.stores.postgres import connection as pg_connection
from tests.helpers import Balsync
from tests.support.devservers import free_port
from tests.support.tools import require_tool

NAMES = (
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "tcp_user_timeout",
    "idle_session_timeout",
    "idle_in_transaction_session_timeout",
)


def settings_of(db: Database) -> dict[str, str]:
    """The named settings as balsync's session has them, in the server's base units."""
    rows = db.call(
        lambda conn: conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(NAMES),)
        ).fetchall()
    )
    return {str(name): str(setting) for name, setting in rows}


def test_every_session_sets_keepalives_and_idle_timeouts(database_url: str) -> None:
    """Keepalives probe after 30 s, every 10 s, 3 times; idle 15 min and idle in a
    transaction 5 min end the session, with the default retry budget."""
    db = Database(database_url, retry_timeout=60)
    try:
        assert settings_of(db) == {
            "tcp_keepalives_idle": "30",
            "tcp_keepalives_interval": "10",
            "tcp_keepalives_count": "3",
            "tcp_user_timeout": "60000",
            "idle_session_timeout": "900000",
            "idle_in_transaction_session_timeout": "300000",
        }
    finally:
        db.close()


def test_idle_limits_grow_with_the_retry_budget(database_url: str) -> None:
    """A budget of 10 min keeps a healthy run's waits (a few budgets) far below the limits."""
    db = Database(database_url, retry_timeout=600)
    try:
        found = settings_of(db)
        assert found["idle_session_timeout"] == str(6000 * 1000)
        assert found["idle_in_transaction_session_timeout"] == str(2400 * 1000)
    finally:
        db.close()


def test_a_reconnected_session_sets_them_again(
    database_url: str, pg: psycopg.Connection[tuple[object, ...]]
) -> None:
    """After its backend is terminated, the session balsync reconnects carries the limits."""
    db = Database(database_url, retry_timeout=5)
    try:
        first = db.backend_pid
        pg.execute("SELECT pg_terminate_backend(%s)", (first,))
        time.sleep(0.2)
        found = settings_of(db)
        assert db.backend_pid != first
        assert found["idle_session_timeout"] == "900000"
        assert found["tcp_keepalives_idle"] == "30"
    finally:
        db.close()


def test_a_setting_the_server_lacks_is_left_out(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older server without one of the settings still gets the others."""
    monkeypatch.setattr(
        pg_connection,
        "SESSION_KEEPALIVES",
        {"no_such_setting": "1", **pg_connection.SESSION_KEEPALIVES},
    )
    db = Database(database_url, retry_timeout=5)
    try:
        assert settings_of(db)["tcp_keepalives_idle"] == "30"
    finally:
        db.close()


def test_a_refused_setting_is_logged_and_the_session_still_works(
    database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The limits shorten a dead run's hold; a server that refuses them still serves."""
    monkeypatch.setattr(pg_connection, "SESSION_KEEPALIVES", {"tcp_keepalives_idle": "soon"})
    db = Database(database_url, retry_timeout=5)
    try:
        with caplog.at_level(logging.WARNING, logger="balance_sync.stores.postgres.connection"):
            db.ping()
        assert "refused balsync's session limits" in caplog.text
        assert db.server_version()
    finally:
        db.close()


# -- through PgBouncer ------------------------------------------------------------------------


@pytest.fixture
def pgbouncer(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A PgBouncer in session mode in front of the test's database; its URL."""
    binary = require_tool("pgbouncer", "pgbouncer")
    params = psycopg.conninfo.conninfo_to_dict(database_url)
    port = free_port()
    # Not under pytest's own temp root, which only root may enter: PgBouncer refuses to
    # run as root and reads its config as `nobody`.
    folder = Path(tempfile.mkdtemp(prefix="balsync-pgbouncer-"))
    os.chmod(folder, 0o755)  # noqa: S103 - `nobody` must read the config in it
    config = folder / "pgbouncer.ini"
    config.write_text(
        f"""[databases]
app = host={params.get("host", "127.0.0.1")} port={params.get("port", 5432)} \
dbname={params["dbname"]} user={params.get("user", "postgres")}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = session
"""
    )
    config.chmod(0o644)
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    log = (tmp_path / "pgbouncer.log").open("wb")
    process = subprocess.Popen([binary, *user, str(config)], stdout=log, stderr=log)
    url = f"postgresql://postgres@127.0.0.1:{port}/app"
    deadline = time.monotonic() + 20
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            break
        except psycopg.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"pgbouncer did not start: {(tmp_path / 'pgbouncer.log').read_text()}")
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=10)
    log.close()
    shutil.rmtree(folder, ignore_errors=True)


def test_the_limits_are_set_through_pgbouncer(pgbouncer: str) -> None:
    """PgBouncer refuses an unknown startup parameter (`options`); a statement passes it, so
    the server session behind the pooler carries the limits."""
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter"):
        psycopg.connect(pgbouncer, options="-c idle_session_timeout=1000").close()
    db = Database(pgbouncer, retry_timeout=5)
    try:
        found = settings_of(db)
        assert found["idle_session_timeout"] == "900000"
        assert found["idle_in_transaction_session_timeout"] == "300000"
        assert found["tcp_keepalives_idle"] == "30"
    finally:
        db.close()


def test_a_hung_runs_lock_ends_with_its_idle_session_and_a_live_run_takes_it_back(
    initialized: Balsync,
    database_url: str,
    pg: psycopg.Connection[tuple[object, ...]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """idle_session_timeout (made 1 s here) ends a lock session that runs no statement, so
    the table's lock is free for the next run; a run that was only slow takes it again at
    its next batch, as after any reconnect."""
    monkeypatch.setattr(pg_connection, "MIN_ATTEMPT_DEADLINE", 0.1)
    monkeypatch.setattr(pg_connection, "MIN_IDLE_SESSION_S", 1.0)
    db = Database(database_url, retry_timeout=0.1)
    lock = RunLock(db, TableName("user_balances"))
    try:
        assert lock.acquire(0)
        first = db.backend_pid
        assert settings_of(db)["idle_session_timeout"] == "1000"
        held = """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1650551923
                  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""
        assert pg.execute(held).fetchone() == (1,)
        time.sleep(2.5)
        assert pg.execute(held).fetchone() == (0,)  # the server ended the quiet session
        monkeypatch.setattr(pg_connection, "MIN_IDLE_SESSION_S", 900.0)
        db.retry_timeout, db.deadline = 5, 30  # the slow run's next batch, as usual
        assert lock.holder_pid() != first
        assert pg.execute(held).fetchone() == (1,)
    finally:
        lock.release()
        db.close()
