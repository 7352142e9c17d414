"""What the tests share besides fixtures: the CLI runner, the servers' addresses, seeding Redis
and reading and writing target rows, SPEC's `sync --json` object, the run lock, the writer's
keys and a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import random
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TypeVar, cast

import psycopg
import redis
from click.testing import CliRunner, Result
from psycopg import sql
from redis.cluster import RedisCluster

from balance_sync.cli import cli
from balance_sync.settings import TableName
from balance_sync.stores.postgres import Database, RunLock
from balance_sync.stores.redis import dirty_keys

PG = psycopg.Connection[tuple[object, ...]]
_Suffix = TypeVar("_Suffix")  # seed() takes any suffix a key may end with: ids, names
COUNTERS = ("processed", "inserted", "updated", "unchanged", "skipped", "invalid")
OLD = datetime.fromisoformat("2001-02-03T04:05:06+00:00")
MAX_ID = 9223372036854775807
# The default table shape, under another name.
LEDGER = """CREATE TABLE ledger.balances (
    telegram_id bigint PRIMARY KEY CHECK (telegram_id > 0),
    balance numeric(20,2) NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)"""

# SPEC's `sync --json` object: exactly these keys.
SYNC_JSON_KEYS = {
    "status",
    "dry_run",
    "processed",
    "inserted",
    "updated",
    "unchanged",
    "skipped",
    "invalid",
    "duration_s",
    "run_id",
}
# What a sync object adds to SPEC's keys, by status: why it was skipped, how it failed.
SYNC_JSON_EXTRA = {"skipped": {"reason"}, "failed": {"error", "exit_code"}}


def sync_json_keys(status: object) -> set[str]:
    """The keys of a `sync --json` object of this status."""
    return SYNC_JSON_KEYS | SYNC_JSON_EXTRA.get(str(status), set())


@dataclass(frozen=True)
class Servers:
    """Where the run's servers are: a superuser PostgreSQL URL and a Redis URL."""

    postgres_admin: str
    redis: str


def with_database(url: str, dbname: str) -> str:
    """The same server URL, another database."""
    params = psycopg.conninfo.conninfo_to_dict(url)
    params["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})


class Balsync:
    """Runs the CLI in-process, as a user would, with the test's environment."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)

    def __call__(
        self, *args: str, env: Mapping[str, str] | None = None, input: str | None = None
    ) -> Result:
        runner = CliRunner()
        merged = {**self.env, **(env or {})}
        return runner.invoke(cli, list(args), env=merged, input=input, catch_exceptions=False)

    def ok(self, *args: str, **kwargs: object) -> Result:
        """Run and insist on exit 0."""
        result = self(*args, **kwargs)  # type: ignore[arg-type]
        assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
        return result


def tmp_file(tmp_path: Path, name: str, text: str) -> Path:
    """Write a small file for a test."""
    path = tmp_path / name
    path.write_text(text)
    return path


# -- Redis ---------------------------------------------------------------------------------


def seed(
    client: redis.Redis | RedisCluster,
    prefix: str,
    values: Mapping[_Suffix, str | bytes],
    chunk: int = 5000,
) -> None:
    """SET prefix+suffix to each value, `chunk` keys per MSET; a cluster client splits each
    chunk by slot (MSET cannot span slots)."""
    items = [(f"{prefix}{suffix}", value) for suffix, value in values.items()]
    if isinstance(client, RedisCluster):
        for start in range(0, len(items), chunk):
            client.mset_nonatomic(dict(items[start : start + chunk]))
        return
    with client.pipeline(transaction=False) as pipe:
        for start in range(0, len(items), chunk):
            pipe.mset(dict(items[start : start + chunk]))
        pipe.execute()


def seed_wrong_type(rds: redis.Redis, key: str | bytes, kind: str) -> None:
    """Make `key` a Redis key of type `kind` (not a string)."""
    if kind == "hash":
        rds.hset(key, mapping={"balance": "1.00"})
    elif kind == "list":
        rds.rpush(key, "1.00")
    elif kind == "set":
        rds.sadd(key, "1.00")
    elif kind == "zset":
        rds.zadd(key, {"1.00": 1})
    else:
        rds.xadd(key, {"balance": "1.00"})


def random_values(rng: random.Random, ids: range) -> dict[int, str]:
    """Valid decimal strings of every shape SPEC allows (no sign: --allow-negative is off)."""
    values = {}
    for i in ids:
        integer = str(rng.randrange(10 ** rng.randint(1, 18)))
        shape = rng.randrange(3)
        values[i] = integer if shape == 0 else f"{integer}.{rng.randrange(10**shape):0{shape}d}"
    return values


def redis_state(rds: redis.Redis, prefix: str) -> dict[bytes, tuple[object, object]]:
    """Every key under `prefix` with its serialized value (any type) and its TTL."""
    keys = sorted(rds.scan_iter(match=prefix.encode() + b"*", count=1000))
    with rds.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.dump(key)
            pipe.pttl(key)
        answers = pipe.execute()
    return {key: (answers[2 * i], answers[2 * i + 1]) for i, key in enumerate(keys)}


def own_keys(rds: redis.Redis, prefix: str) -> set[bytes | str]:
    """Every key the writer may have made under a prefix: balances, marks, adjustment records."""
    keys = set(rds.scan_iter(match=f"{prefix}*"))
    keys |= set(rds.scan_iter(match="balsync:adj:{" + prefix + "*"))
    return keys | {k for k in dirty_keys(prefix) if rds.exists(k)}


# -- PostgreSQL ----------------------------------------------------------------------------


def insert_rows(
    pg: PG,
    rows: Mapping[int, object],
    table: str = "user_balances",
    updated_at: datetime | None = None,
) -> None:
    """Pre-existing rows of the default table shape, {id: balance} as given; updated_at is
    the column's default unless named."""
    target = sql.Identifier(*table.split("."))
    with pg.cursor() as cur:
        if updated_at is None:
            cur.executemany(
                sql.SQL("INSERT INTO {} (telegram_id, balance) VALUES (%s, %s)").format(target),
                list(rows.items()),
            )
        else:
            cur.executemany(
                sql.SQL(
                    "INSERT INTO {} (telegram_id, balance, updated_at) VALUES (%s, %s, %s)"
                ).format(target),
                [(i, value, updated_at) for i, value in rows.items()],
            )


def table_rows(
    pg: PG,
    table: str = "user_balances",
    id_column: str = "telegram_id",
    extra: tuple[str, ...] = ("updated_at",),
) -> dict[int, tuple[object, ...]]:
    """Every row of a target table as {id: (balance text, *extra columns)}."""
    columns = [sql.Identifier(id_column), sql.SQL("balance::text")]
    columns += [sql.Identifier(name) for name in extra]
    query = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(columns), sql.Identifier(*table.split("."))
    )
    return {int(row[0]): tuple(row[1:]) for row in pg.execute(query)}  # type: ignore[call-overload]


def balances(
    pg: PG, table: str = "user_balances", id_column: str = "telegram_id"
) -> dict[int, str]:
    """Every row of a target table as {id: balance text}."""
    rows = table_rows(pg, table, id_column, extra=())
    return {i: cast(str, row[0]) for i, row in rows.items()}  # balance::text


def exact(raw: str) -> str:
    """How numeric(_, 2) prints a valid Redis decimal: the same number, two places."""
    value = Decimal(raw).quantize(Decimal("0.01"))
    return str(abs(value) if value == 0 else value)  # numeric has no negative zero


def skipped_records(pg: PG, run_id: object) -> list[tuple[str, str | None, str]]:
    """The run's skipped records as (key, raw value, reason)."""
    rows = pg.execute(
        "SELECT key, raw_value, reason FROM balsync.skipped_records WHERE run_id = %s",
        (run_id,),
    ).fetchall()
    return [(str(k), None if r is None else str(r), str(why)) for k, r, why in rows]


def pg_state(pg: PG) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table in public and balsync (target and bookkeeping)."""
    tables = pg.execute(
        """SELECT schemaname, tablename FROM pg_tables
           WHERE schemaname IN ('public', 'balsync') ORDER BY 1, 2"""
    ).fetchall()
    assert ("public", "user_balances") in tables
    assert ("balsync", "sync_runs") in tables
    return {
        f"{schema}.{table}": sorted(
            pg.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(schema, table))),
            key=repr,
        )
        for schema, table in cast("list[tuple[str, str]]", tables)  # pg_tables' name columns
    }


def sync_run(pg: PG, run_id: object) -> dict[str, object]:
    """One row of balsync.sync_runs as a dict."""
    cur = pg.execute("SELECT * FROM balsync.sync_runs WHERE id = %s", (run_id,))
    row = cur.fetchone()
    assert row is not None, f"no sync_runs row {run_id}"
    assert cur.description is not None
    return {col.name: value for col, value in zip(cur.description, row, strict=True)}


def assert_loader_idle(pg: PG) -> None:
    """The loader's pooled connections (every other one to the test's database) are idle, not
    idle in transaction."""
    states = pg.execute(
        "SELECT state FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    ).fetchall()
    assert states, "the loader keeps a pooled connection"
    assert all(state == "idle" for (state,) in states), states


@contextmanager
def lock_held(database_url: str, table: str = "user_balances") -> Iterator[RunLock]:
    """Hold the table's run lock on a connection of our own, as a running sync would."""
    holder = Database(database_url, 5)
    lock = RunLock(holder, TableName.parse(table))
    try:
        assert lock.acquire(0)
        yield lock
    finally:
        lock.release()
        holder.close()


# -- `balsync sync --json` -----------------------------------------------------------------


def check_invariants(data: Mapping[str, object]) -> None:
    """SPEC's JSON object: its fields, and processed = inserted+updated+unchanged+skipped."""
    assert set(data) == sync_json_keys(data.get("status"))
    counts = {name: data[name] for name in COUNTERS}
    assert all(isinstance(v, int) and v >= 0 for v in counts.values()), counts
    n = cast(dict[str, int], counts)  # every value an int: asserted just above
    assert n["processed"] == (n["inserted"] + n["updated"] + n["unchanged"] + n["skipped"]), counts
    assert n["skipped"] >= n["invalid"], counts


def invoke_sync(balsync: Balsync, *args: str, code: int = 0) -> tuple[dict[str, object], Result]:
    """`balsync sync --json ARGS`, insisting on exit `code` and SPEC's JSON invariants."""
    result = balsync("sync", "--json", *args)
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    data = json.loads(result.stdout)
    check_invariants(data)
    return data, result


def sync_json(balsync: Balsync, *args: str, code: int = 0) -> dict[str, object]:
    """The JSON object of one `balsync sync --json ARGS` that exits with `code`."""
    return invoke_sync(balsync, *args, code=code)[0]


def counts_of(data: Mapping[str, object]) -> dict[str, object]:
    return {name: data[name] for name in COUNTERS}


def incremental(balsync: Balsync) -> dict[str, object]:
    """`sync --incremental` as cron runs it, without the minimum interval."""
    result = balsync("sync", "--json", "--incremental", "--min-interval", "0")
    assert result.exit_code in (0, 1), result.stderr
    return dict(json.loads(result.stdout))


# -- a terminal ----------------------------------------------------------------------------


def terminal_output(env: dict[str, str], *args: str, stream: str = "stderr") -> str:
    """Run balsync with its stderr (or stdout) on a pseudo-terminal, as a person at a shell
    does, the other stream discarded; all the terminal received, escape sequences included."""
    controller, terminal = pty.openpty()
    streams = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, stream: terminal}
    run = subprocess.Popen(
        [sys.executable, "-m", "balance_sync", *args],
        env={**os.environ, **env, "COLUMNS": "120", "TERM": "xterm"},
        stdin=subprocess.DEVNULL,
        stdout=streams["stdout"],
        stderr=streams["stderr"],
    )
    os.close(terminal)
    shown = bytearray()
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the run ended
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert run.wait(timeout=60) == 0
    return shown.decode(errors="replace")
