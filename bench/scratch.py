"""A scratch key prefix in Redis and a scratch database in PostgreSQL, always cleaned up.

Balances are a pure function of (key index, generation), so the harness can change every
value, or 1 % of them, without remembering what Redis holds: a new generation always gives a
new value.

balsync keeps its own memory of what it wrote (schema `balsync`) and treats a row changed
behind its back as a conflict, so nothing but balsync may write its table. Each floor script
therefore has a table of its own in schema `bench`, with the same definition as balsync's
`user_balances`; every contestant starts a run from the same state of its own table.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql

from balance_sync.stores.redis import dirty_keys
from balance_sync.writer import BalanceWriter

log = logging.getLogger("bench")

BASE_ID = 5_000_000_000  # telegram ids of today's users are about this large
MSET_PAIRS = 1_000  # pairs per MSET
PIPELINE_DEPTH = 100  # MSETs per round trip: 100 000 keys
DELETE_CHUNK = 10_000
TRACKED_PIPELINE_DEPTH = 1_000  # tracked writes per round trip
BALSYNC_TABLE = "user_balances"
FLOOR_SCHEMA = "bench"
_TABLE_DDL = """CREATE TABLE {} (
    telegram_id bigint PRIMARY KEY CHECK (telegram_id > 0),
    balance numeric(20,2) NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)"""


def balance(index: int, generation: int) -> bytes:
    """The balance of key `index` at `generation`: a new generation never repeats a value."""
    cents = (index * 2_654_435_761 + generation * 40_503 + 12_345) % 100_000_000
    return b"%d.%02d" % divmod(cents, 100)


def with_database(url: str, dbname: str) -> str:
    """The same server URL, another database."""
    params = psycopg.conninfo.conninfo_to_dict(url)
    params["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})


def emptiest_database(url: str) -> tuple[str, int, int]:
    """(URL, number, keys) of the Redis server's emptiest database; the URL's own on a tie.

    A full sync SCANs every key of its database, not only its prefix's: on a shared server
    a sync of 10 000 keys would otherwise wade through whatever else lives there.
    """
    client = redis.Redis.from_url(url)
    try:
        own = int(client.connection_pool.connection_kwargs.get("db") or 0)
        sizes = {int(name[2:]): int(db["keys"]) for name, db in client.info("keyspace").items()}
        try:
            configured = client.config_get("databases").get("databases")
        except redis.ResponseError:  # CONFIG renamed or forbidden (managed servers)
            configured = None
    finally:
        client.close()
    count = int(configured) if configured else own + 1
    best = min(range(count), key=lambda db: (sizes.get(db, 0), db != own))
    return (url if best == own else with_redis_db(url, best)), best, sizes.get(best, 0)


def with_redis_db(url: str, db: int) -> str:
    """The same Redis server URL, database `db` (a path for TCP, `?db=` for a socket)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "db"]
    if parts.scheme == "unix":  # urlunsplit would drop the empty host: unix:/path
        return f"{url.partition('?')[0]}?{urlencode([*query, ('db', str(db))])}"
    return urlunsplit(parts._replace(path=f"/{db}", query=urlencode(query)))


def _chunks(items: Iterable[int], size: int) -> Iterator[list[int]]:
    chunk: list[int] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class Scratch:
    """A scratch prefix `bench:<random>:balance:` and database `balsync_bench_<random>`.

    Use it as a context manager: the keys are deleted and the database dropped on the way
    out, whatever happened (an exception, Ctrl-C, SIGTERM turned into KeyboardInterrupt).
    """

    admin_url: str
    redis_url: str
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    keys: int = 0  # keys 0..keys-1 exist under the prefix
    generation: int = 0
    can_checkpoint: bool = True
    client: redis.Redis = field(init=False)

    def __post_init__(self) -> None:
        self.client = redis.Redis.from_url(self.redis_url)

    @property
    def prefix(self) -> str:
        """The key prefix balsync is pointed at."""
        return f"bench:{self.tag}:balance:"

    @property
    def dbname(self) -> str:
        """The scratch database's name."""
        return f"balsync_bench_{self.tag}"

    @property
    def database_url(self) -> str:
        """The scratch database's URL."""
        return with_database(self.admin_url, self.dbname)

    def key(self, index: int) -> bytes:
        """The Redis key of `index`."""
        return b"%s%d" % (self.prefix.encode(), BASE_ID + index)

    # -- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> Scratch:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def create(self) -> None:
        """Create the scratch database, with balsync's schema (`balsync init-db`)."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)))
        self.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(FLOOR_SCHEMA)))
        self.init_db()

    def init_db(self) -> None:
        """`balsync init-db`, as an operator runs it."""
        subprocess.run(
            [sys.executable, "-m", "balance_sync", "init-db", "--quiet"],
            env=balsync_env(self),
            check=True,
        )

    def floor_table(self, name: str) -> str:
        """`bench.<name>`, created like balsync's table when it does not exist yet."""
        table = f"{FLOOR_SCHEMA}.{name}"
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            row = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
            if row is None or row[0] is None:
                conn.execute(sql.SQL(_TABLE_DDL).format(ident(table)))
        return table

    def cleanup(self) -> None:
        """Delete every key under the prefix and drop the database; a second Ctrl-C waits."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self._delete_keys()
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(self.dbname)
                    )
                )
            self.client.close()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _delete_keys(self) -> None:
        # SCAN, not the known index range: a run interrupted while seeding leaves keys the
        # counters do not know about.
        pending: list[bytes] = []
        for key in self.client.scan_iter(match=f"bench:{self.tag}:*", count=1000):
            pending.append(key)
            if len(pending) == DELETE_CHUNK:
                self.client.unlink(*pending)
                pending = []
        if pending:
            self.client.unlink(*pending)
        # The change-tracking set and claim are named after the prefix but outside it.
        self.client.unlink(*dirty_keys(self.prefix))

    # -- Redis side ---------------------------------------------------------------------

    def _write(self, indices: Iterable[int]) -> None:
        pipe = self.client.pipeline(transaction=False)
        depth = 0
        for chunk in _chunks(indices, MSET_PAIRS):
            pipe.mset({self.key(i): balance(i, self.generation) for i in chunk})
            depth += 1
            if depth == PIPELINE_DEPTH:
                pipe.execute()
                depth = 0
        if depth:
            pipe.execute()

    def seed(self, count: int) -> None:
        """Make keys 0..count-1 exist (adding only the missing ones), at a new generation."""
        self.generation += 1
        self._write(range(self.keys, count))
        self.keys = max(self.keys, count)

    def change_all(self) -> None:
        """Give every key a new value."""
        self.generation += 1
        self._write(range(self.keys))

    def change_share(self, share: float, rng: random.Random) -> int:
        """Give a random `share` of the keys a new value; how many."""
        self.generation += 1
        chosen = rng.sample(range(self.keys), max(1, int(self.keys * share)))
        self._write(chosen)
        return len(chosen)

    def change_tracked(self, count: int, rng: random.Random) -> int:
        """Give `count` random keys a new value as an application with change tracking
        does: through `BalanceWriter`, each SET and its dirty mark one atomic script.

        Pipelined, which only saves round trips: each script still runs whole. How many.
        """
        self.generation += 1
        chosen = rng.sample(range(self.keys), min(count, self.keys))
        pipe = self.client.pipeline(transaction=False)
        writer = BalanceWriter(pipe, prefix=self.prefix)
        for chunk in _chunks(chosen, TRACKED_PIPELINE_DEPTH):
            for i in chunk:
                writer.set(BASE_ID + i, balance(i, self.generation).decode())
            pipe.execute()
        return len(chosen)

    # -- PostgreSQL side ----------------------------------------------------------------

    def execute(self, statement: sql.Composable | str) -> None:
        """Run one statement on the scratch database (autocommit: VACUUM needs it)."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    def truncate(self, table: str) -> None:
        """Empty a floor table, as before a first sync."""
        self.execute(sql.SQL("TRUNCATE {}").format(ident(table)))

    def reset_balsync(self) -> None:
        """balsync as just installed: no table, no memory of earlier runs, then `init-db`."""
        # CASCADE: balsync's view over the table holds on to it (and goes with the schema next)
        self.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(ident(BALSYNC_TABLE)))
        self.execute("DROP SCHEMA IF EXISTS balsync CASCADE")
        self.init_db()

    def settle(self) -> None:
        """VACUUM ANALYZE every table but the catalogs, then CHECKPOINT (when allowed).

        Before every timed run: each contestant meets a vacuumed table (as autovacuum would
        leave it between hourly runs) and a fresh checkpoint, so the full-page writes after
        it fall on every contestant alike instead of on whoever runs after a timed one.
        Every table, because balsync's own bookkeeping tables churn too.
        """
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            # Not temporary tables: those of a connection that just closed vanish while we
            # list them (its backend drops them on its way out).
            tables = conn.execute(
                """SELECT n.nspname, c.relname FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE c.relkind = 'r' AND c.relpersistence <> 't'
                     AND n.nspname NOT IN ('pg_catalog', 'information_schema')"""
            ).fetchall()
            if tables:
                names = sql.SQL(", ").join(sql.Identifier(s, t) for s, t in tables)
                conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(names))
        if not self.can_checkpoint:
            return
        try:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            log.warning("the admin role may not CHECKPOINT; runs start at any WAL position")
            self.can_checkpoint = False

    def count_rows(self, table: str = BALSYNC_TABLE) -> int:
        """Rows in a table."""
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident(table))).fetchone()
        return int(row[0]) if row else 0

    def server_versions(self) -> tuple[str, str]:
        """(Redis version, PostgreSQL version) as the servers report them."""
        info = self.client.info("server")
        with psycopg.connect(self.admin_url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(info.get("redis_version", "?")), str(row[0]) if row else "?"


def ident(table: str) -> sql.Identifier:
    """`name` or `schema.name` as a quoted identifier."""
    return sql.Identifier(*table.split("."))


SCRUBBED = ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_DB", "DATABASE_URL")


def balsync_env(scratch: Scratch) -> dict[str, str]:
    """The environment balsync runs with: the scratch servers and nothing of the caller's.

    Every BALSYNC_* variable of the caller's shell is dropped (a log file or a metrics file
    there would add work that the floor does not do).
    """
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("BALSYNC_") and k not in SCRUBBED
    }
    env.update(
        BALSYNC_DATABASE_URL=scratch.database_url,
        BALSYNC_REDIS_URL=scratch.redis_url,
        BALSYNC_KEY_PREFIX=scratch.prefix,
    )
    return env


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so `kill` cleans up like Ctrl-C does."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
