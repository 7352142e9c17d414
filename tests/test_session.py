"""table_session: the stores, target and lock clear-cache and restore open, and close again."""

from __future__ import annotations

import time

import psycopg
import pytest

from balance_sync.errors import RedisUnavailable
from balance_sync.ops.session import table_session
from balance_sync.settings import Settings, TableName, resolve_settings
from balance_sync.stores.postgres import Database, Schema, TableLock
from tests.support.devservers import free_port

Pg = psycopg.Connection[tuple[object, ...]]
TABLE = TableName("user_balances")


def _lock_is_free(database_url: str) -> bool:
    probe = Database(database_url, retry_timeout=5)
    try:
        return TableLock(probe).try_lock(TABLE, 0)
    finally:
        probe.close()


def _open_connections(pg: Pg) -> int:
    """balsync's connections to the test database, once closed ones have gone: a backend
    leaves pg_stat_activity a moment after its client closed the socket."""
    deadline = time.monotonic() + 5
    while True:
        row = pg.execute(
            """SELECT count(*) FROM pg_stat_activity
               WHERE application_name = 'balsync' AND datname = current_database()"""
        ).fetchone()
        assert row is not None
        count = int(str(row[0]))
        if count == 0 or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return resolve_settings({}, env)


def test_holds_the_lock_inside_and_releases_and_closes_after(
    initialized, settings, database_url, pg
):
    """With take_lock: the target is described, the lock held; afterwards free, all closed."""
    with table_session(settings, take_lock=True) as session:
        assert session.skip_reason == ""
        assert session.lock is not None
        assert session.target.table == TableName("user_balances", "public")
        assert not _lock_is_free(database_url)
    assert _lock_is_free(database_url)
    assert _open_connections(pg) == 0


def test_without_take_lock_no_lock_is_taken(initialized, settings, database_url):
    """A dry run's session holds no lock: another run may take it meanwhile."""
    with table_session(settings, take_lock=False) as session:
        assert (session.lock, session.skip_reason) == (None, "")
        assert _lock_is_free(database_url)


def test_says_why_to_skip_while_another_run_holds_the_lock(initialized, settings, database_url):
    """The lock is tried without waiting; held elsewhere, the session says so and holds none."""
    holder = Database(database_url, retry_timeout=5)
    try:
        assert TableLock(holder).try_lock(TABLE, 0)
        with table_session(settings, take_lock=True) as session:
            assert (session.lock, session.skip_reason) == (None, "another run holds the lock")
    finally:
        holder.close()


def test_an_error_inside_still_releases_the_lock_and_closes(
    initialized, settings, database_url, pg
):
    """An exception from the command's work passes through, after release and close."""
    with pytest.raises(ZeroDivisionError), table_session(settings, take_lock=True):
        _ = 1 / 0
    assert _lock_is_free(database_url)
    assert _open_connections(pg) == 0


def test_the_balsync_schema_is_not_required(settings, pg, database_url):
    """Only the target table is needed (no init-db): the session opens and takes the lock."""
    pg.execute("CREATE TABLE user_balances (telegram_id bigint PRIMARY KEY, balance numeric)")
    with table_session(settings, take_lock=True) as session:
        assert session.lock is not None
        assert not Schema(session.control).schema_present()


def test_redis_is_asked_before_postgresql(env):
    """Both stores down: the error names Redis, so PostgreSQL was not asked first."""
    down = {
        **env,
        "BALSYNC_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "BALSYNC_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
        "BALSYNC_RETRY_TIMEOUT": "0",
    }
    with (
        pytest.raises(RedisUnavailable),
        table_session(resolve_settings({}, down), take_lock=True),
    ):
        pytest.fail("the session must not open")
