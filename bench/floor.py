"""The floor: minimal scripts that do only what the job cannot avoid.

No validation, no bookkeeping, no retries, no logging: each script is what a careful engineer
would write to move the rows once, with the lessons of /work/shared/PERF-NOTES.md applied
(SCAN of page i+1 pipelined with MGET of page i; COPY into a temporary staging table; existing
ids updated with `UPDATE … FROM … WHERE balance IS DISTINCT FROM`, new ids inserted alone,
never `ON CONFLICT DO UPDATE` for every row). Each writes a table of its own defined like
balsync's `user_balances`, with the same effect (`updated_at` moves only when the balance
changes), so balsync's time over the floor's is what balsync's own machinery costs.

- `read_only`: SCAN + MGET every key, nothing else.
- `write_only`: rows prepared in memory beforehand; 1 or 2 connections, each one COPY of its
  share into a staging table, ANALYZE, one merge.
- `end_to_end`: a reader thread feeds 2 writer connections through a queue in batches of
  10 000 rows; "batched" merges each batch in its own transaction (as balsync does),
  "streamed" has each writer stream its batches into one COPY and merge once at the end.
- `naive`: GET + one upsert statement + COMMIT per row, the loop a first draft would have.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import psycopg
import redis
from psycopg import sql

from bench.scratch import ident

SCAN_COUNT = 1000
BATCH_ROWS = 10_000
QUEUE_DEPTH = 4
WRITERS = 2

Strategy = Literal["batched", "streamed"]
STRATEGIES: tuple[Strategy, ...] = ("batched", "streamed")

_STAGE_PER_BATCH = """CREATE TEMP TABLE stage (id bigint NOT NULL, balance numeric(20,2) NOT NULL)
    ON COMMIT DELETE ROWS"""
_STAGE_ONCE = """CREATE TEMP TABLE stage (id bigint NOT NULL, balance numeric(20,2) NOT NULL)
    ON COMMIT DROP"""
_UPDATE = sql.SQL("""UPDATE {table} AS t SET balance = s.balance, updated_at = now()
    FROM stage s WHERE t.telegram_id = s.id AND t.balance IS DISTINCT FROM s.balance""")
# ON CONFLICT DO NOTHING only guards a key that SCAN returned twice; no row reaches it otherwise.
_INSERT = sql.SQL("""INSERT INTO {table} (telegram_id, balance)
    SELECT s.id, s.balance FROM stage s
    WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE t.telegram_id = s.id)
    ON CONFLICT (telegram_id) DO NOTHING""")
_UPSERT_ONE = sql.SQL("""INSERT INTO {table} AS t (telegram_id, balance) VALUES (%s, %s)
    ON CONFLICT (telegram_id) DO UPDATE SET balance = EXCLUDED.balance, updated_at = now()
    WHERE t.balance IS DISTINCT FROM EXCLUDED.balance""")


@dataclass
class Counts:
    """What a floor script did: rows it moved, and what PostgreSQL reported."""

    rows: int = 0
    updated: int = 0
    inserted: int = 0

    def add(self, other: Counts) -> None:
        """Sum another writer's counts into these."""
        self.rows += other.rows
        self.updated += other.updated
        self.inserted += other.inserted


@dataclass(frozen=True)
class Batch:
    """COPY text of up to BATCH_ROWS rows: `id<TAB>balance<LF>` each."""

    payload: bytes
    rows: int


def scan_pages(client: redis.Redis, prefix: str) -> Iterator[tuple[list[bytes], list[bytes]]]:
    """(keys, values) page by page; MGET of a page rides with SCAN of the next."""
    match = prefix.encode() + b"*"
    cursor, keys = cast(tuple[int, list[bytes]], client.scan(0, match=match, count=SCAN_COUNT))
    while True:
        if cursor == 0:
            if keys:
                yield keys, cast(list[bytes], client.mget(keys))
            return
        if not keys:
            cursor, keys = cast(
                tuple[int, list[bytes]], client.scan(cursor, match=match, count=SCAN_COUNT)
            )
            continue
        pipe = client.pipeline(transaction=False)
        pipe.mget(keys)
        pipe.scan(cursor, match=match, count=SCAN_COUNT)
        values, (cursor, next_keys) = pipe.execute()
        yield keys, values
        keys = next_keys


def batches(client: redis.Redis, prefix: str, rows: int = BATCH_ROWS) -> Iterator[Batch]:
    """Every key as COPY text, `rows` rows a batch; the id is the key minus the prefix."""
    cut = len(prefix.encode())
    lines: list[bytes] = []
    for keys, values in scan_pages(client, prefix):
        lines += [b"%s\t%s\n" % (k[cut:], v) for k, v in zip(keys, values, strict=True) if v]
        while len(lines) >= rows:
            yield Batch(b"".join(lines[:rows]), rows)
            del lines[:rows]
    if lines:
        yield Batch(b"".join(lines), len(lines))


def read_only(redis_url: str, prefix: str) -> int:
    """SCAN + MGET every key under `prefix`; how many values came back."""
    client = redis.Redis.from_url(redis_url)
    try:
        return sum(
            sum(1 for v in values if v is not None) for _, values in scan_pages(client, prefix)
        )
    finally:
        client.close()


def read_all(redis_url: str, prefix: str) -> list[Batch]:
    """Every row in memory (untimed preparation of `write_only`)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return list(batches(client, prefix))
    finally:
        client.close()


def _merge(
    conn: psycopg.Connection[tuple[object, ...]], table: str, *, big: bool
) -> tuple[int, int]:
    """The UPDATE of changed rows, then the INSERT of new ids; inside the caller's transaction.

    Join methods are pinned, each for a measured reason:
    - A 10 000-row batch against a big target must probe the target's index; with the
      default random_page_cost (4, a spinning disk) the planner hash-joins the whole target
      instead, on every batch (quadratic over the run: 5x slower at 500 000 keys).
    - The planner trusts the target's statistics, and a table that was empty when last
      analyzed (a first sync) looks empty to it. It then finds new ids with a nested loop
      that scans the whole target for every staged row while the same statement, and the
      other writer, grow it: quadratic again (100 000 rows took 80 s). So the INSERT of a
      batch may not scan the target, and one big merge hashes it once.
    """
    if big:
        conn.execute("SET LOCAL enable_nestloop = off")
    else:
        conn.execute("SET LOCAL random_page_cost = 1.1")
        # enable_seqscan = off works by adding 10^10 to a plan's cost, which then passes
        # jit_above_cost: 70 ms of JIT compilation for a 12 ms statement.
        conn.execute("SET LOCAL jit = off")
    updated = conn.execute(_UPDATE.format(table=ident(table))).rowcount
    if not big:
        conn.execute("SET LOCAL enable_seqscan = off")
    inserted = conn.execute(_INSERT.format(table=ident(table))).rowcount
    return updated, inserted


def _write_streamed(database_url: str, table: str, take: Callable[[], Batch | None]) -> Counts:
    """One COPY of every batch `take` hands out, then ANALYZE and one merge, one transaction."""
    counts = Counts()
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        conn.execute(_STAGE_ONCE)
        with conn.cursor().copy("COPY stage (id, balance) FROM STDIN") as copy:
            while (batch := take()) is not None:
                copy.write(batch.payload)
                counts.rows += batch.rows
        # One big merge: the planner needs the staging table's size to pick a hash join.
        conn.execute("ANALYZE stage")
        counts.updated, counts.inserted = _merge(conn, table, big=True)
    return counts


def _write_batched(database_url: str, table: str, take: Callable[[], Batch | None]) -> Counts:
    """Each batch in its own transaction: COPY into staging, merge, commit."""
    counts = Counts()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(_STAGE_PER_BATCH)
        while (batch := take()) is not None:
            with conn.transaction():
                with conn.cursor().copy("COPY stage (id, balance) FROM STDIN") as copy:
                    copy.write(batch.payload)
                # No ANALYZE here: a small staging table must stay a nested-loop probe.
                updated, inserted = _merge(conn, table, big=False)
            counts.rows += batch.rows
            counts.updated += updated
            counts.inserted += inserted
    return counts


def _run_threads(targets: Sequence[Callable[[], Counts | None]]) -> Counts:
    """Run each target on a thread; sum their counts; re-raise the first failure."""
    total = Counts()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def wrap(target: Callable[[], Counts | None]) -> None:
        try:
            counts = target()
        except BaseException as exc:  # re-raised on the calling thread below
            with lock:
                errors.append(exc)
            return
        if counts is not None:
            with lock:
                total.add(counts)

    threads = [threading.Thread(target=wrap, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return total


def write_only(database_url: str, table: str, rows: Sequence[Batch], connections: int) -> Counts:
    """Merge rows already in memory over `connections` connections, each its own share."""
    shares = [iter(rows[i::connections]) for i in range(connections)]

    def writer(share: Iterator[Batch]) -> Callable[[], Counts]:
        return lambda: _write_streamed(database_url, table, lambda: next(share, None))

    return _run_threads([writer(share) for share in shares])


def end_to_end(
    redis_url: str, database_url: str, table: str, prefix: str, strategy: Strategy = "batched"
) -> Counts:
    """A reader thread → a queue → WRITERS writer connections, BATCH_ROWS rows a batch."""
    handoff: queue.Queue[Batch | None] = queue.Queue(maxsize=QUEUE_DEPTH)
    failed = threading.Event()

    def put(item: Batch | None) -> None:
        while not failed.is_set():
            try:
                handoff.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def take() -> Batch | None:
        while not failed.is_set():
            try:
                return handoff.get(timeout=0.2)
            except queue.Empty:
                continue
        return None

    def read() -> None:
        client = redis.Redis.from_url(redis_url)
        try:
            for batch in batches(client, prefix):
                if failed.is_set():
                    return
                put(batch)
        except BaseException:
            failed.set()
            raise
        finally:
            client.close()
            for _ in range(WRITERS):
                put(None)

    write = _write_streamed if strategy == "streamed" else _write_batched

    def writer() -> Counts:
        try:
            return write(database_url, table, take)
        except BaseException:
            failed.set()
            raise

    return _run_threads([read, *[writer] * WRITERS])


def naive(
    redis_url: str, database_url: str, table: str, keys: Sequence[bytes], prefix: str
) -> Counts:
    """GET, one upsert and COMMIT per key: the per-row loop, for the extrapolation."""
    cut = len(prefix.encode())
    upsert = _UPSERT_ONE.format(table=ident(table))
    counts = Counts()
    client = redis.Redis.from_url(redis_url)
    try:
        with psycopg.connect(database_url) as conn:
            for key in keys:
                value = cast(bytes | None, client.get(key))
                if value is None:
                    continue
                written = conn.execute(upsert, (int(key[cut:]), value.decode())).rowcount
                conn.commit()
                counts.rows += 1
                counts.updated += written
    finally:
        client.close()
    return counts


def first_keys(redis_url: str, prefix: str, count: int) -> list[bytes]:
    """The first `count` keys SCAN returns (untimed preparation of `naive`)."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys: list[bytes] = []
        for page, _ in scan_pages(client, prefix):
            keys += page
            if len(keys) >= count:
                break
        return keys[:count]
    finally:
        client.close()
