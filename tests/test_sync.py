"""`balsync sync` on real servers: SPEC's guarantees 1-3, invalid records, batching, dry runs,
application and schema-qualified tables, the advisory lock, --min-interval and run records."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal

import psycopg
import pytest
import redis
from click.testing import Result
from psycopg import sql

import balance_sync
from balance_sync.ops.sync import _Batcher
from balance_sync.settings import TableName, resolve_settings
from balance_sync.stores.postgres.database import Database, RunLock
from balance_sync.validation import InvalidRecord
from tests.helpers import Balsync, sync_json_keys

PG = psycopg.Connection[tuple[object, ...]]
COUNTERS = ("processed", "inserted", "updated", "unchanged", "skipped", "invalid")
OLD = datetime.fromisoformat("2001-02-03T04:05:06+00:00")
MAX_ID = 9223372036854775807
WRONG_TYPES = ("hash", "list", "set", "zset", "stream")
# The default table shape, under another name.
LEDGER = """CREATE TABLE ledger.balances (
    telegram_id bigint PRIMARY KEY CHECK (telegram_id > 0),
    balance numeric(20,2) NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)"""


# -- helpers -------------------------------------------------------------------------------


def check_invariants(data: Mapping[str, object]) -> None:
    """SPEC's JSON object: its fields, and processed = inserted+updated+unchanged+skipped."""
    assert set(data) == sync_json_keys(data.get("status"))
    counts = {name: data[name] for name in COUNTERS}
    assert all(isinstance(v, int) and v >= 0 for v in counts.values()), counts
    assert counts["processed"] == (
        counts["inserted"] + counts["updated"] + counts["unchanged"] + counts["skipped"]
    ), counts
    assert counts["skipped"] >= counts["invalid"], counts


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


def seed(rds: redis.Redis, prefix: str, values: Mapping[object, str | bytes]) -> None:
    """SET prefix+suffix to each value, a few thousand keys per round trip."""
    items = [(f"{prefix}{suffix}", value) for suffix, value in values.items()]
    with rds.pipeline(transaction=False) as pipe:
        for start in range(0, len(items), 5000):
            pipe.mset(dict(items[start : start + 5000]))
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


def exact(raw: str) -> str:
    """How numeric(_, 2) prints a valid Redis decimal: the same number, two places."""
    value = Decimal(raw).quantize(Decimal("0.01"))
    return str(abs(value) if value == 0 else value)  # numeric has no negative zero


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


def balances_of(pg: PG, table: str = "user_balances", id_column: str = "telegram_id") -> dict:
    """Every row of a target table as {id: balance text}."""
    return {i: row[0] for i, row in table_rows(pg, table, id_column, extra=()).items()}


def insert_rows(pg: PG, rows: Mapping[int, str], table: str = "user_balances") -> None:
    """Pre-existing rows of the default table shape, last updated long ago."""
    with pg.cursor() as cur:
        cur.executemany(
            sql.SQL("INSERT INTO {} (telegram_id, balance, updated_at) VALUES (%s, %s, %s)").format(
                sql.Identifier(*table.split("."))
            ),
            [(i, value, OLD) for i, value in rows.items()],
        )


def skipped_records(pg: PG, run_id: object) -> list[tuple[str, str | None, str]]:
    """The run's skipped records as (key, raw value, reason)."""
    rows = pg.execute(
        "SELECT key, raw_value, reason FROM balsync.skipped_records WHERE run_id = %s",
        (run_id,),
    ).fetchall()
    return [(str(k), None if r is None else str(r), str(why)) for k, r, why in rows]


def redis_state(rds: redis.Redis, prefix: str) -> dict[bytes, tuple[object, object]]:
    """Every key under `prefix` with its serialized value (any type) and its TTL."""
    keys = sorted(rds.scan_iter(match=prefix.encode() + b"*", count=1000))
    with rds.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.dump(key)
            pipe.pttl(key)
        answers = pipe.execute()
    return {key: (answers[2 * i], answers[2 * i + 1]) for i, key in enumerate(keys)}


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
        for schema, table in tables
    }


def sync_run(pg: PG, run_id: object) -> dict[str, object]:
    """One row of balsync.sync_runs as a dict."""
    cur = pg.execute("SELECT * FROM balsync.sync_runs WHERE id = %s", (run_id,))
    row = cur.fetchone()
    assert row is not None, f"no sync_runs row {run_id}"
    assert cur.description is not None
    return {col.name: value for col, value in zip(cur.description, row, strict=True)}


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


# -- guarantee 1: exact values -------------------------------------------------------------

EDGE_VALUES = {
    1: "0.10",
    2: "-0",
    3: "999999999999999999.99",
    4: "1500",
    5: "1500.00",
    6: "42.5",
    7: "0",
    8: "0.01",
    9: "-0.00",
    10: "123456789012345678.9",
    MAX_ID: "7.07",
}


def random_values(rng: random.Random, ids: range) -> dict[int, str]:
    """Valid decimal strings of every shape SPEC allows (no sign: --allow-negative is off)."""
    values = {}
    for i in ids:
        integer = str(rng.randrange(10 ** rng.randint(1, 18)))
        shape = rng.randrange(3)
        values[i] = integer if shape == 0 else f"{integer}.{rng.randrange(10**shape):0{shape}d}"
    return values


def test_every_valid_key_lands_with_its_exact_value(initialized, rds, key_prefix, pg):
    """Guarantee 1: after exit 0 every row holds its key's exact value, ids 1..2^63-1."""
    values = {**random_values(random.Random(1), range(100, 2100)), **EDGE_VALUES}
    seed(rds, key_prefix, values)
    data = sync_json(initialized)
    assert data["status"] == "success"
    assert data["dry_run"] is False
    assert isinstance(data["run_id"], int)
    assert counts_of(data) == {
        "processed": len(values),
        "inserted": len(values),
        "updated": 0,
        "unchanged": 0,
        "skipped": 0,
        "invalid": 0,
    }
    stored = balances_of(pg)
    assert stored == {i: exact(v) for i, v in values.items()}
    assert stored[1] == "0.10"
    assert stored[2] == "0.00"
    assert stored[3] == "999999999999999999.99"
    assert stored[MAX_ID] == "7.07"


def test_changed_values_overwrite_rows_exactly(initialized, rds, key_prefix, pg):
    """Guarantee 1 on updates: every changed key's row ends with the new exact value."""
    first = random_values(random.Random(2), range(1, 1001))
    seed(rds, key_prefix, first)
    sync_json(initialized)
    second = {**first, **random_values(random.Random(3), range(1, 1001, 3)), **EDGE_VALUES}
    seed(rds, key_prefix, second)
    data = sync_json(initialized, "--force")
    assert balances_of(pg) == {i: exact(v) for i, v in second.items()}
    changed = sum(1 for i in first if exact(first[i]) != exact(second[i]))
    assert data["updated"] == changed
    assert data["inserted"] == 1  # MAX_ID is the only new id
    assert data["unchanged"] == len(first) - changed


# -- guarantee 2: rows without a key are never touched ------------------------------------


def test_rows_absent_from_redis_are_never_touched_nor_deleted(initialized, rds, key_prefix, pg):
    """Guarantee 2: a row with no key (or an invalid one) keeps value and updated_at."""
    insert_rows(pg, {i: f"{i}.25" for i in range(1, 61)})
    before = table_rows(pg)
    # Keys for 1..20 (changed), 21..25 invalid, 26..60 absent; 61..80 new.
    seed(rds, key_prefix, {i: f"{i}.50" for i in range(1, 21)})
    seed(rds, key_prefix, dict.fromkeys(range(21, 26), "not-a-number"))
    seed(rds, key_prefix, {i: f"{i}" for i in range(61, 81)})
    data = sync_json(initialized, code=1)
    assert (data["updated"], data["inserted"], data["invalid"]) == (20, 20, 5)
    after = table_rows(pg)
    assert set(after) == set(range(1, 81))
    for i in range(21, 61):
        assert after[i] == before[i], i
    for i in range(1, 21):
        assert after[i][0] == f"{i}.50"


# -- guarantee 3: updated_at moves only with the balance -----------------------------------


def test_second_run_without_change_updates_no_row(initialized, rds, key_prefix, pg):
    """Guarantee 3: no change in Redis → updated 0, unchanged n, every updated_at kept."""
    values = {**random_values(random.Random(4), range(1, 501)), 501: "1500.00", 502: "0.10"}
    seed(rds, key_prefix, values)
    sync_json(initialized)
    pg.execute("UPDATE user_balances SET updated_at = %s", (OLD,))
    before = table_rows(pg)
    # The same amounts written differently are no change.
    seed(rds, key_prefix, {501: "1500", 502: "0.1"})
    data = sync_json(initialized, "--force")
    assert data["status"] == "success"
    assert counts_of(data) == {
        "processed": 502,
        "inserted": 0,
        "updated": 0,
        "unchanged": 502,
        "skipped": 0,
        "invalid": 0,
    }
    assert table_rows(pg) == before


def test_updated_at_moves_only_for_changed_balances(initialized, rds, key_prefix, pg):
    """Guarantee 3: exactly the rows whose balance changed get a new updated_at."""
    seed(rds, key_prefix, {i: f"{i}.00" for i in range(1, 201)})
    sync_json(initialized)
    pg.execute("UPDATE user_balances SET updated_at = %s", (OLD,))
    changed = set(range(1, 201, 7))
    seed(rds, key_prefix, {i: f"{i}.01" for i in changed})
    data = sync_json(initialized, "--force")
    assert (data["updated"], data["unchanged"]) == (len(changed), 200 - len(changed))
    after = table_rows(pg)
    moved = {i for i, (_, updated_at) in after.items() if updated_at != OLD}
    assert moved == changed
    assert all(after[i][1] > OLD for i in changed)  # type: ignore[operator]
    assert {i: b for i, (b, _) in after.items()} == {
        i: f"{i}.01" if i in changed else f"{i}.00" for i in range(1, 201)
    }


# -- invalid records -----------------------------------------------------------------------

BAD_ID_SUFFIXES = [
    "0",
    "01",
    "-5",
    "+5",
    " 5",
    "5 ",
    "abc",
    "x1",
    "1.5",
    "1_000",
    "",
    "9223372036854775808",
    "99999999999999999999",
    "\u0663",  # ARABIC-INDIC DIGIT THREE
]
BAD_VALUES = [
    "1.234",
    "1.001",
    "1e5",
    "1E5",
    "NaN",
    "nan",
    "Infinity",
    "-Infinity",
    " 1",
    "1 ",
    "1\n",
    "",
    "1,5",
    "0x10",
    "1000000000000000000",
    "-1000000000000000000",
    "-1",
    "--1",
    "1.2.3",
    "\u0661",  # ARABIC-INDIC DIGIT ONE
]


def test_invalid_records_are_skipped_recorded_and_the_rest_synced(initialized, rds, key_prefix, pg):
    """Bad ids, bad values and wrong Redis types: exit 1, partial, each recorded with reason."""
    valid = random_values(random.Random(5), range(1, 2001))
    seed(rds, key_prefix, valid)
    bad: dict[str, str | None] = {}  # key → raw value (None: not a string key)
    for n, suffix in enumerate(BAD_ID_SUFFIXES):
        bad[f"{key_prefix}{suffix}"] = f"{n}.00"
    for n in range(600):
        bad[f"{key_prefix}{10_000 + n}"] = BAD_VALUES[n % len(BAD_VALUES)]
    seed(rds, "", {k: v for k, v in bad.items() if v is not None})
    for n in range(100):
        kind = WRONG_TYPES[n % len(WRONG_TYPES)]
        key = f"{key_prefix}{20_000 + n}"
        seed_wrong_type(rds, key, kind)
        bad[key] = None
    # Rows whose keys turned invalid must keep their value.
    insert_rows(pg, {10_000: "3.00", 20_000: "4.00"})
    before = table_rows(pg)

    data = sync_json(initialized, code=1)
    assert data["status"] == "partial"
    assert counts_of(data) == {
        "processed": len(valid) + len(bad),
        "inserted": len(valid),
        "updated": 0,
        "unchanged": 0,
        "skipped": len(bad),
        "invalid": len(bad),
    }
    assert balances_of(pg) == {
        **{i: exact(v) for i, v in valid.items()},
        10_000: "3.00",
        20_000: "4.00",
    }
    assert table_rows(pg)[10_000] == before[10_000]
    assert table_rows(pg)[20_000] == before[20_000]

    recorded = skipped_records(pg, data["run_id"])
    assert len(recorded) == len(bad)
    assert {key: raw for key, raw, _ in recorded} == bad
    reasons = {key: reason for key, _, reason in recorded}
    assert all(reasons.values())
    for n in range(100):
        assert WRONG_TYPES[n % len(WRONG_TYPES)] in reasons[f"{key_prefix}{20_000 + n}"]
    assert "negative" in reasons[f"{key_prefix}{10_000 + BAD_VALUES.index('-1')}"]
    run = sync_run(pg, data["run_id"])
    assert (run["status"], run["invalid"], run["skipped"]) == ("partial", len(bad), len(bad))


def test_more_than_1000_invalid_keys_keep_1000_records_and_count_all(
    initialized, rds, key_prefix, pg
):
    """skipped_records holds at most 1000 a run; `invalid` still counts every one."""
    seed(rds, key_prefix, dict.fromkeys(range(1, 51), "12.34"))
    seed(rds, key_prefix, dict.fromkeys(range(1000, 2200), "twelve"))
    data = sync_json(initialized, "--batch-size", "20", code=1)
    assert (data["invalid"], data["skipped"], data["inserted"]) == (1200, 1200, 50)
    assert data["processed"] == 1250
    count = pg.execute(
        "SELECT count(*) FROM balsync.skipped_records WHERE run_id = %s", (data["run_id"],)
    ).fetchone()
    assert count == (1000,)
    assert balances_of(pg) == dict.fromkeys(range(1, 51), "12.34")
    assert sync_run(pg, data["run_id"])["invalid"] == 1200


def test_every_invalid_key_is_recorded_below_the_cap_with_large_batches(
    initialized, rds, key_prefix, pg
):
    """Below 1000 skipped records, each one is kept, however many valid keys share its batch."""
    seed(rds, key_prefix, dict.fromkeys(range(1, 8001), "1.00"))
    bad = {f"{key_prefix}bad{i}" for i in range(60)}
    seed(rds, "", dict.fromkeys(bad, "1.00"))
    data = sync_json(initialized, "--batch-size", "1000", code=1)
    assert (data["invalid"], data["inserted"]) == (60, 8000)
    assert {key for key, _, _ in skipped_records(pg, data["run_id"])} == bad


def test_non_utf8_keys_and_values_are_skipped_and_recorded(initialized, rds, key_prefix, pg):
    """Bytes that are not UTF-8 (or hold NUL) are skipped with a reason; the run goes on."""
    prefix = key_prefix.encode()
    rds.set(prefix + b"\xff\xfe", b"1.00")
    rds.set(prefix + b"77", b"\xff\xfe")
    rds.set(prefix + b"78", b"12\x00")
    rds.set(prefix + b"79", b"\xc3\x28")
    seed(rds, key_prefix, {1: "5.55"})
    data = sync_json(initialized, code=1)
    assert (data["invalid"], data["inserted"], data["processed"]) == (4, 1, 5)
    assert balances_of(pg) == {1: "5.55"}
    recorded = {key: (raw, reason) for key, raw, reason in skipped_records(pg, data["run_id"])}
    assert len(recorded) == 4
    odd_key = next(k for k in recorded if k not in {f"{key_prefix}{i}" for i in (77, 78, 79)})
    assert odd_key.startswith(key_prefix)
    assert "xff" in odd_key
    assert recorded[odd_key][0] == "1.00"
    assert "xff" in str(recorded[f"{key_prefix}77"][0])
    assert str(recorded[f"{key_prefix}78"][0]).startswith("12")
    assert all(reason for _, reason in recorded.values())


# -- batching ------------------------------------------------------------------------------


def test_ids_that_exist_during_a_first_sync_are_classified_as_usual(
    initialized, rds, key_prefix, pg, monkeypatch
):
    """A first sync inserts batches straight from staging; an id that exists by then (the
    application inserted it after the run began) takes the usual path, and every inserted
    row is remembered: an outside change to it later is a conflict."""
    insert_rows(pg, {1: "1.00", 2: "5.00"})
    monkeypatch.setattr(Database, "is_empty", lambda self, target: True)
    seed(rds, key_prefix, {i: f"{i}.00" for i in range(1, 11)})
    data = sync_json(initialized)
    assert counts_of(data) == {
        "processed": 10,
        "inserted": 8,
        "updated": 1,
        "unchanged": 1,
        "skipped": 0,
        "invalid": 0,
    }
    assert balances_of(pg) == {i: f"{i}.00" for i in range(1, 11)}
    monkeypatch.undo()
    pg.execute("UPDATE user_balances SET balance = 99 WHERE telegram_id = 3")
    rds.set(f"{key_prefix}3", "4.00")
    rds.set(f"{key_prefix}4", "5.00")
    data = sync_json(initialized, "--force", code=1)
    assert (data["updated"], data["skipped"]) == (1, 1)
    assert balances_of(pg)[3] == "99.00"
    assert balances_of(pg)[4] == "5.00"


def test_a_view_over_the_balances_is_updated_by_id(initialized, rds, key_prefix, pg):
    """A view has no ctid: its rows are found by id; ids it cannot take are unknown."""
    pg.execute(
        "CREATE TABLE view_base (telegram_id bigint PRIMARY KEY, balance numeric(20,2) NOT NULL)"
    )
    pg.execute("INSERT INTO view_base VALUES (1, 1), (2, 2)")
    pg.execute("CREATE VIEW balances_view AS SELECT * FROM view_base")
    seed(rds, key_prefix, {1: "5.00", 2: "2.00", 3: "7.00"})
    data = sync_json(initialized, "--table", "balances_view", code=1)
    assert (data["inserted"], data["updated"], data["unchanged"], data["skipped"]) == (0, 1, 1, 1)
    assert balances_of(pg, "view_base") == {1: "5.00", 2: "2.00"}


def test_a_partitioned_table_is_synced_row_by_row(initialized, rds, key_prefix, pg):
    """Partitions repeat each other's ctids: every row is still matched by its own id."""
    pg.execute(
        """CREATE TABLE parted (telegram_id bigint PRIMARY KEY, balance numeric(20,2) NOT NULL)
           PARTITION BY HASH (telegram_id)"""
    )
    for remainder in (0, 1):
        pg.execute(
            f"CREATE TABLE parted{remainder} PARTITION OF parted "
            f"FOR VALUES WITH (MODULUS 2, REMAINDER {remainder})"
        )
    pg.execute("INSERT INTO parted SELECT g, g FROM generate_series(1, 40) g")
    seed(rds, key_prefix, {i: f"{i}.00" if i % 3 else f"{i}.50" for i in range(1, 61)})
    data = sync_json(initialized, "--table", "parted")
    assert (data["inserted"], data["updated"], data["unchanged"]) == (20, 13, 27)
    assert balances_of(pg, "parted") == {i: f"{i}.00" if i % 3 else f"{i}.50" for i in range(1, 61)}


def test_batches_of_common_records_are_cut_at_the_batch_size(initialized, rds, key_prefix, pg):
    """Pages of valid records take the whole-page path; batches still hold 7 records each."""
    seed(rds, key_prefix, {i: f"{i}.25" for i in range(1, 101)})
    data, result = invoke_sync(initialized, "-v", "--batch-size", "7")
    assert counts_of(data)["inserted"] == 100
    assert {i: b for i, (b, _) in table_rows(pg).items()} == {i: f"{i}.25" for i in range(1, 101)}
    sizes = [int(n) for n in re.findall(r"batch \d+: (\d+) keys", result.stderr)]
    assert sorted(sizes) == [2] + [7] * 14  # two writers finish batches in any order


def test_batcher_keeps_an_id_once_per_batch_across_pages():
    """SCAN may return a key on two pages: the whole-page path defers to the per-record one."""
    batcher = _Batcher(5, keep_raw=False)
    assert batcher.add_page([(b"%d" % i, b"1.00") for i in range(1, 4)]) == []
    assert batcher.add_page([(b"3", b"1.00"), (b"4", b"1.00")]) is None  # 3 is in the batch
    assert batcher.add_page([(b"9", b"1.00"), (b"9", b"1.00")]) is None  # 9 twice in a page
    assert [r[0] for r in batcher.batch.records] == [b"1", b"2", b"3"]
    done = []
    for suffix, raw in [(b"3", b"1.00"), (b"4", b"1.00")]:
        done += batcher.add(suffix, b"k" + suffix, raw, (suffix, raw), None)
    assert [r[0] for r in batcher.batch.records] == [b"1", b"2", b"3", b"4"]
    filled = batcher.add_page([(b"%d" % i, b"1.00") for i in range(5, 12)])
    assert [[r[0] for r in b.records] for b in done + (filled or [])] == [
        [b"1", b"2", b"3", b"4", b"5"],
        [b"6", b"7", b"8", b"9", b"10"],
    ]
    # A new batch forgets the ids of the last one.
    assert [r[0] for r in batcher.batch.records] == [b"11"]
    assert batcher.add_page([(b"3", b"2.00")]) == []
    assert batcher.batch.keys == 2


def test_batch_size_7_gives_the_same_result_as_one_batch(initialized, rds, key_prefix, pg):
    """`--batch-size 7` over 100 keys: same rows and counts as one batch; -v logs batch 15."""
    pg.execute(LEDGER.replace("ledger.balances", "twin"))
    initial = {i: f"{i}.00" if i <= 20 else "0.50" for i in range(1, 41)}
    seed(rds, key_prefix, {i: f"{i}.00" for i in range(1, 101)})
    seed(rds, key_prefix, {f"bad{i}": "1.00" for i in range(5)})

    def run(table: str, *args: str) -> tuple[dict[str, object], dict, set[int], Result]:
        # Twin tables in the same state, each synced for the first time.
        insert_rows(pg, initial, table)
        # The second table synced from the same keys inherits no first-run trust of Redis:
        # the operator gives it, as for a restart.
        data, result = invoke_sync(
            initialized, "--table", table, "--accept-redis-restart", *args, code=1
        )
        after = table_rows(pg, table)
        moved = {i for i, (_, updated_at) in after.items() if updated_at != OLD}
        return counts_of(data), {i: b for i, (b, _) in after.items()}, moved, result

    small_counts, small_rows, small_moved, small = run("user_balances", "-v", "--batch-size", "7")
    one_counts, one_rows, one_moved, _ = run("twin")
    assert (
        small_counts
        == one_counts
        == {
            "processed": 105,
            "inserted": 60,
            "updated": 20,
            "unchanged": 20,
            "skipped": 5,
            "invalid": 5,
        }
    )
    assert small_rows == one_rows == {i: f"{i}.00" for i in range(1, 101)}
    assert small_moved == one_moved == set(range(21, 101))
    assert "batch 15:" in small.stderr
    assert "batch 16:" not in small.stderr


# -- dry run -------------------------------------------------------------------------------


def arrange_dry_run(rds: redis.Redis, key_prefix: str, pg: PG, balsync: Balsync) -> None:
    """After a first sync: 10 changed keys, 40 unchanged, 20 new, 5 invalid, 1 row alone."""
    seed(rds, key_prefix, {i: f"{i}.00" for i in range(1, 51)})
    insert_rows(pg, {999: "9.99"})
    sync_json(balsync)
    seed(rds, key_prefix, {i: f"{i}.10" for i in range(1, 11)})
    seed(rds, key_prefix, {i: f"{i}.00" for i in range(51, 71)})
    seed(rds, key_prefix, {"0": "1.00", "abc": "1.00", "80": "1.001", "81": "-2"})
    seed_wrong_type(rds, f"{key_prefix}82", "hash")


DRY_COUNTS = {
    "processed": 75,
    "inserted": 20,
    "updated": 10,
    "unchanged": 40,
    "skipped": 5,
    "invalid": 5,
}


def test_dry_run_reports_changes_and_writes_nothing_anywhere(initialized, rds, key_prefix, pg):
    """--dry-run: would-be counts, run_id null; PostgreSQL and Redis left identical."""
    arrange_dry_run(rds, key_prefix, pg, initialized)
    pg_before, redis_before = pg_state(pg), redis_state(rds, key_prefix)
    data = sync_json(initialized, "--dry-run", code=1)
    assert data["dry_run"] is True
    assert data["run_id"] is None
    assert data["status"] == "partial"
    assert counts_of(data) == DRY_COUNTS
    assert pg_state(pg) == pg_before
    assert redis_state(rds, key_prefix) == redis_before
    # The real run then does what the dry run said it would.
    real = sync_json(initialized, "--force", code=1)
    assert counts_of(real) == DRY_COUNTS


def test_dry_run_reports_while_another_run_holds_the_lock(
    initialized, rds, key_prefix, pg, database_url
):
    """--dry-run takes no lock: it reports even while another run holds it."""
    arrange_dry_run(rds, key_prefix, pg, initialized)
    pg_before = pg_state(pg)
    with lock_held(database_url):
        data = sync_json(initialized, "--dry-run", code=1)
    assert data["status"] == "partial"
    assert counts_of(data) == DRY_COUNTS
    assert pg_state(pg) == pg_before


# -- application tables --------------------------------------------------------------------

USERS = """CREATE TABLE users (
    id bigint PRIMARY KEY,
    username text NOT NULL,
    balance numeric(12,2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(){extra}
)"""
# A statement-level trigger fires for every INSERT statement, even one that inserts no row.
INSERT_AUDIT = """
CREATE TABLE insert_audit (at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION note_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO insert_audit DEFAULT VALUES; RETURN NULL; END $$;
CREATE TRIGGER users_insert AFTER INSERT ON users
    FOR EACH STATEMENT EXECUTE FUNCTION note_insert();
"""


def arrange_users(pg: PG, rds: redis.Redis, key_prefix: str, *, with_updated_at: bool) -> None:
    extra = ",\n    updated_at timestamptz NOT NULL DEFAULT now()" if with_updated_at else ""
    pg.execute(USERS.format(extra=extra).encode())
    pg.execute(INSERT_AUDIT.encode())
    with pg.cursor() as cur:
        cur.executemany(
            "INSERT INTO users (id, username, balance, created_at) VALUES (%s, %s, %s, %s)",
            [
                (1, "alice", "10.00", OLD),
                (2, "bob", "20.00", OLD),
                (3, "carol", "30.00", OLD),
                (4, "dave", "40.00", OLD),
                (5, "erin", "0", OLD),
            ],
        )
    pg.execute("TRUNCATE insert_audit")
    if with_updated_at:
        pg.execute("UPDATE users SET updated_at = %s", (OLD,))
    # 1 and 3 change, 2 is the same amount, 100/101/MAX_ID have no row.
    seed(rds, key_prefix, {1: "11.50", 2: "20", 3: "0.10", 100: "5.00", 101: "6", MAX_ID: "1"})


USERS_COUNTS = {
    "processed": 6,
    "inserted": 0,
    "updated": 2,
    "unchanged": 1,
    "skipped": 3,
    "invalid": 0,
}


def test_application_table_updates_existing_rows_and_skips_unknown_ids(
    balsync, rds, key_prefix, pg
):
    """--table users: existing rows updated, unknown ids skipped as 'unknown id', no INSERT."""
    arrange_users(pg, rds, key_prefix, with_updated_at=False)
    init = balsync("init-db", "--json", "--table", "users", "--id-column", "id")
    assert init.exit_code == 0, init.stderr
    before = table_rows(pg, "users", "id", extra=("username", "created_at"))

    data = sync_json(balsync, "--table", "users", "--id-column", "id", code=1)
    assert data["status"] == "partial"
    assert counts_of(data) == USERS_COUNTS
    after = table_rows(pg, "users", "id", extra=("username", "created_at"))
    assert after == {
        **before,
        1: ("11.50", "alice", OLD),
        3: ("0.10", "carol", OLD),
    }
    assert pg.execute("SELECT count(*) FROM insert_audit").fetchone() == (0,)
    recorded = skipped_records(pg, data["run_id"])
    assert {key for key, _, _ in recorded} == {f"{key_prefix}{i}" for i in (100, 101, MAX_ID)}
    assert all("unknown id" in reason for _, _, reason in recorded)


def test_application_table_updated_at_moves_only_for_changed_rows(balsync, rds, key_prefix, pg):
    """--table users with an updated_at column: it moves for changed rows only."""
    arrange_users(pg, rds, key_prefix, with_updated_at=True)
    balsync.ok("init-db", "--table", "users", "--id-column", "id")
    data = sync_json(balsync, "--table", "users", "--id-column", "id", code=1)
    assert counts_of(data) == USERS_COUNTS
    after = table_rows(pg, "users", "id")
    assert {i for i, (_, at) in after.items() if at != OLD} == {1, 3}
    assert {i: b for i, (b, _) in after.items()} == {
        1: "11.50",
        2: "20.00",
        3: "0.10",
        4: "40.00",
        5: "0.00",
    }
    assert pg.execute("SELECT count(*) FROM insert_audit").fetchone() == (0,)


def test_application_table_value_too_wide_for_its_column_is_skipped_not_fatal(
    balsync, rds, key_prefix, pg
):
    """A valid balance that the table's numeric(12,2) cannot hold is skipped; the rest syncs."""
    arrange_users(pg, rds, key_prefix, with_updated_at=False)
    seed(rds, key_prefix, {4: "99999999999999.00"})  # valid per SPEC, wider than numeric(12,2)
    balsync.ok("init-db", "--table", "users", "--id-column", "id")
    data = sync_json(balsync, "--table", "users", "--id-column", "id", code=1)
    assert (data["updated"], data["skipped"], data["invalid"]) == (2, 4, 0)
    assert balances_of(pg, "users", "id") == {
        1: "11.50",
        2: "20.00",
        3: "0.10",
        4: "40.00",
        5: "0.00",
    }
    assert f"{key_prefix}4" in {key for key, _, _ in skipped_records(pg, data["run_id"])}


# -- schema-qualified tables and init-db ---------------------------------------------------


def regclass(pg: PG, name: str) -> object:
    row = pg.execute("SELECT to_regclass(%s)::text", (name,)).fetchone()
    return None if row is None else row[0]


def test_schema_qualified_table_syncs(balsync, rds, key_prefix, pg):
    """--table ledger.balances: rows land there, updated_at moves only for changes."""
    pg.execute("CREATE SCHEMA ledger")
    pg.execute(LEDGER)
    init = balsync("init-db", "--json", "--table", "ledger.balances")
    assert init.exit_code == 0, init.stderr
    assert json.loads(init.stdout) == {"status": "success", "created": ["balsync schema"]}
    assert regclass(pg, "user_balances") is None

    values = {1: "1.00", 2: "2.50", MAX_ID: "999999999999999999.99"}
    seed(rds, key_prefix, values)
    data = sync_json(balsync, "--table", "ledger.balances")
    assert (data["inserted"], data["status"]) == (3, "success")
    assert balances_of(pg, "ledger.balances") == {i: exact(v) for i, v in values.items()}
    assert sync_run(pg, data["run_id"])["target_table"] == "ledger.balances"

    pg.execute("UPDATE ledger.balances SET updated_at = %s", (OLD,))
    seed(rds, key_prefix, {2: "2.51"})
    data = sync_json(balsync, "--table", "ledger.balances", "--force")
    assert (data["updated"], data["unchanged"]) == (1, 2)
    after = table_rows(pg, "ledger.balances")
    assert {i for i, (_, at) in after.items() if at != OLD} == {2}
    assert after[2][0] == "2.51"


def default_table_columns(pg: PG, table: str) -> list[tuple[object, ...]]:
    return pg.execute(
        """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull
           FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0
             AND NOT a.attisdropped ORDER BY a.attnum""",
        (table,),
    ).fetchall()


DEFAULT_COLUMNS = [
    ("telegram_id", "bigint", True),
    ("balance", "numeric(20,2)", True),
    ("updated_at", "timestamp with time zone", True),
]


def test_init_db_creates_default_table_and_is_idempotent(balsync, pg):
    """init-db creates user_balances and the balsync schema; a second run creates nothing."""
    first = balsync.ok("init-db", "--json")
    assert json.loads(first.stdout) == {
        "status": "success",
        "created": ["balsync schema", "table user_balances"],
    }
    assert default_table_columns(pg, "user_balances") == DEFAULT_COLUMNS
    for table in ("balsync.sync_runs", "balsync.skipped_records", "balsync.run_batches"):
        assert regclass(pg, table) == table
    second = balsync.ok("init-db", "--json")
    assert json.loads(second.stdout) == {"status": "success", "created": []}


@pytest.mark.parametrize(
    "args",
    [
        ("--table", "wallets"),
        ("--table", "ledger.balances"),
        ("--id-column", "id"),
        ("--balance-column", "amount"),
        ("--table", "users", "--id-column", "id"),
    ],
    ids=["other-name", "other-schema-and-name", "other-id", "other-balance", "application"],
)
def test_init_db_creates_no_table_for_a_target_that_is_not_user_balances(balsync, pg, args):
    """init-db for another table name or other columns creates only balsync's schema."""
    result = balsync.ok("init-db", "--json", *args)
    assert json.loads(result.stdout) == {"status": "success", "created": ["balsync schema"]}
    for table in ("wallets", "ledger.balances", "users", "user_balances"):
        assert regclass(pg, table) is None, table
    assert regclass(pg, "balsync.sync_runs") == "balsync.sync_runs"


@pytest.mark.parametrize("table", ["app.user_balances", "public.user_balances"])
def test_init_db_creates_user_balances_in_any_schema(balsync, rds, key_prefix, pg, table):
    """init-db --table SCHEMA.user_balances creates the schema and the default table in it."""
    result = balsync.ok("init-db", "--json", "--table", table)
    assert json.loads(result.stdout)["created"] == ["balsync schema", f"table {table}"]
    assert default_table_columns(pg, table) == DEFAULT_COLUMNS
    seed(rds, key_prefix, {7: "7.70"})
    data = sync_json(balsync, "--table", table)
    assert data["inserted"] == 1
    assert balances_of(pg, table) == {7: "7.70"}
    again = balsync.ok("init-db", "--json", "--table", table)
    assert json.loads(again.stdout)["created"] == []


def test_init_db_leaves_an_existing_target_table_alone(balsync, pg):
    """init-db where user_balances already exists neither recreates nor alters it."""
    pg.execute("CREATE TABLE user_balances (telegram_id bigint PRIMARY KEY, balance numeric(9,2))")
    pg.execute("INSERT INTO user_balances VALUES (1, 1.00)")
    result = balsync.ok("init-db", "--json")
    assert json.loads(result.stdout)["created"] == ["balsync schema"]
    assert default_table_columns(pg, "user_balances") == [
        ("telegram_id", "bigint", True),
        ("balance", "numeric(9,2)", False),
    ]
    assert balances_of(pg) == {1: "1.00"}


# -- hostile names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("--table", 'users"; drop table x; --'),
        ("--table", "a.b.c"),
        ("--id-column", 'id"; drop table x; --'),
        ("--balance-column", "balance; drop table x"),
    ],
    ids=["table", "three-part-table", "id-column", "balance-column"],
)
def test_hostile_names_exit_2_before_any_sql(initialized, pg, rds, key_prefix, args):
    """A table or column name that is not an identifier is a usage error (exit 2), no SQL."""
    pg.execute("CREATE TABLE x (i int)")
    seed(rds, key_prefix, {1: "1.00"})
    result = initialized("sync", "--json", *args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "invalid" in result.stderr
    assert regclass(pg, "x") == "x"
    assert pg.execute("SELECT count(*) FROM balsync.sync_runs").fetchone() == (0,)
    assert balances_of(pg) == {}
    # With an unreachable PostgreSQL the answer is the same, at once: nothing was tried.
    started = time.monotonic()
    offline = initialized(
        "sync", *args, env={"BALSYNC_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    )
    assert offline.exit_code == 2, offline.stderr
    assert time.monotonic() - started < 2


# -- the advisory lock ---------------------------------------------------------------------


def test_sync_skips_at_once_while_another_run_holds_the_lock(
    initialized, rds, key_prefix, pg, database_url
):
    """Guarantee 5: lock taken → exit 0, status skipped, quickly, nothing written."""
    seed(rds, key_prefix, {1: "1.00"})
    with lock_held(database_url):
        started = time.monotonic()
        data = sync_json(initialized)
        elapsed = time.monotonic() - started
    assert data["status"] == "skipped"
    assert data["run_id"] is None
    assert elapsed < 3
    assert balances_of(pg) == {}
    assert pg.execute("SELECT count(*) FROM balsync.sync_runs").fetchone() == (0,)


def test_wait_1_still_skips_after_about_a_second(initialized, rds, key_prefix, pg, database_url):
    """--wait 1 waits for the lock about a second, then skips with exit 0."""
    seed(rds, key_prefix, {1: "1.00"})
    with lock_held(database_url):
        started = time.monotonic()
        data = sync_json(initialized, "--wait", "1")
        elapsed = time.monotonic() - started
    assert data["status"] == "skipped"
    assert 0.9 <= elapsed < 4
    assert balances_of(pg) == {}


def test_wait_10_runs_once_the_lock_is_released(initialized, rds, key_prefix, pg, database_url):
    """--wait 10 succeeds when the holder lets go after a second."""
    seed(rds, key_prefix, {1: "1.00", 2: "2.00"})
    with lock_held(database_url) as lock:
        timer = threading.Timer(1.0, lock.release)
        started = time.monotonic()
        timer.start()
        try:
            data = sync_json(initialized, "--wait", "10")
        finally:
            timer.join()
        elapsed = time.monotonic() - started
    assert data["status"] == "success"
    assert 0.9 <= elapsed < 8
    assert balances_of(pg) == {1: "1.00", 2: "2.00"}


def test_lock_covers_the_table_however_it_is_named(initialized, rds, key_prefix, pg, database_url):
    """Guarantee 5: a run on public.user_balances waits for a run on user_balances."""
    seed(rds, key_prefix, {1: "1.00"})
    with lock_held(database_url, "user_balances"):
        data = sync_json(initialized, "--table", "public.user_balances")
    assert data["status"] == "skipped"
    assert balances_of(pg) == {}


# -- --min-interval ------------------------------------------------------------------------


def test_min_interval_skips_a_redundant_run_unless_forced(initialized, rds, key_prefix, pg):
    """Right after a success the next sync is skipped (exit 0); --force and 0 run it."""
    seed(rds, key_prefix, {1: "1.00"})
    assert sync_json(initialized)["status"] == "success"
    seed(rds, key_prefix, {1: "2.00"})
    skipped = sync_json(initialized)
    assert skipped["status"] == "skipped"
    assert skipped["run_id"] is None
    assert balances_of(pg) == {1: "1.00"}
    forced = sync_json(initialized, "--force")
    assert (forced["status"], forced["updated"]) == ("success", 1)
    assert balances_of(pg) == {1: "2.00"}
    seed(rds, key_prefix, {1: "3.00"})
    assert sync_json(initialized)["status"] == "skipped"
    zero = sync_json(initialized, "--min-interval", "0")
    assert (zero["status"], zero["updated"]) == ("success", 1)
    assert balances_of(pg) == {1: "3.00"}


# -- run records ---------------------------------------------------------------------------


def test_each_run_records_times_status_counters_host_pid_version(initialized, rds, key_prefix, pg):
    """balsync.sync_runs: one row per non-dry run with times, status, counters, origin."""
    seed(rds, key_prefix, {1: "1.00", 2: "2.00", "bad": "1.00"})
    partial = sync_json(initialized, code=1)
    seed(rds, key_prefix, {1: "1.50"})
    sync_json(initialized, "--dry-run", code=1)
    rds.delete(f"{key_prefix}bad")
    success = sync_json(initialized, "--force")
    ids = [row[0] for row in pg.execute("SELECT id FROM balsync.sync_runs ORDER BY id")]
    assert ids == [partial["run_id"], success["run_id"]]
    for data in (partial, success):
        run = sync_run(pg, data["run_id"])
        assert run["status"] == data["status"]
        assert {name: run[name] for name in COUNTERS} == counts_of(data)
        assert run["started_at"] <= run["finished_at"]  # type: ignore[operator]
        assert run["duration_s"] == pytest.approx(data["duration_s"], abs=0.01)
        assert (run["host"], run["pid"]) == (socket.gethostname(), os.getpid())
        assert run["version"] == balance_sync.__version__
        assert (run["target_table"], run["key_prefix"]) == ("public.user_balances", key_prefix)
        assert run["error"] is None
    first, second = sync_run(pg, partial["run_id"]), sync_run(pg, success["run_id"])
    assert first["finished_at"] <= second["started_at"]  # type: ignore[operator]


def test_a_run_left_running_is_marked_abandoned_by_the_next(initialized, rds, key_prefix, pg):
    """A 'running' row of a dead process becomes failed/abandoned when the next run starts."""
    insert = """INSERT INTO balsync.sync_runs
                    (target_table, key_prefix, started_at, status, host, pid, version)
                VALUES (%s, %s, now() - interval '1 hour', 'running', 'gone', 1, '0')
                RETURNING id"""
    dead = pg.execute(insert, ("public.user_balances", key_prefix)).fetchone()
    other = pg.execute(insert, ("other_table", key_prefix)).fetchone()
    assert dead is not None
    assert other is not None
    seed(rds, key_prefix, {1: "1.00"})
    data = sync_json(initialized)
    assert data["status"] == "success"
    run = sync_run(pg, dead[0])
    assert run["status"] == "failed"
    assert run["finished_at"] is not None
    assert "abandoned" in str(run["error"])
    assert sync_run(pg, other[0])["status"] == "running"  # another table's run is not ours


# -- value formats and signs ---------------------------------------------------------------


def test_cents_format_turns_integer_cents_into_exact_amounts(initialized, rds, key_prefix, pg):
    """--value-format cents: '150000' is 1500.00 exactly; non-integers are invalid."""
    seed(
        rds,
        key_prefix,
        {
            1: "150000",
            2: "1",
            3: "0",
            4: "10",
            5: "99999999999999999999",
            6: "1500.00",
            7: "100000000000000000000",
            8: "-150",
            9: "1e3",
        },
    )
    data = sync_json(initialized, "--value-format", "cents", code=1)
    assert (data["inserted"], data["invalid"]) == (5, 4)
    assert balances_of(pg) == {
        1: "1500.00",
        2: "0.01",
        3: "0.00",
        4: "0.10",
        5: "999999999999999999.99",
    }


def test_negative_values_need_allow_negative(initialized, rds, key_prefix, pg):
    """Negative balances are invalid by default and synced exactly with --allow-negative."""
    insert_rows(pg, {1: "1.00"})
    before = table_rows(pg)
    negatives = {1: "-3.5", 2: "-0.01", 3: "-999999999999999999.99"}
    seed(rds, key_prefix, {**negatives, 4: "5"})
    data = sync_json(initialized, code=1)
    assert (data["invalid"], data["inserted"]) == (3, 1)
    assert table_rows(pg)[1] == before[1]
    assert balances_of(pg) == {1: "1.00", 4: "5.00"}
    reasons = [reason for _, _, reason in skipped_records(pg, data["run_id"])]
    assert len(reasons) == 3
    assert all("negative" in reason for reason in reasons)

    allowed = sync_json(initialized, "--allow-negative", "--force")
    assert counts_of(allowed) == {
        "processed": 4,
        "inserted": 2,
        "updated": 1,
        "unchanged": 1,
        "skipped": 0,
        "invalid": 0,
    }
    assert balances_of(pg) == {1: "-3.50", 2: "-0.01", 3: "-999999999999999999.99", 4: "5.00"}


# -- a retried batch -----------------------------------------------------------------------


def test_a_retried_batch_is_never_applied_twice(initialized, env, key_prefix, pg):
    """apply_batch twice for (run, batch 1): the retry reports the first counts, writes nothing."""
    settings = resolve_settings({}, env)
    insert_rows(pg, {1: "1.00", 2: "2.00", 3: "3.00"})
    records = [(b"1", b"1.00"), (b"2", b"2.50"), (b"3", b"3.50"), (b"4", b"4"), (b"5", b"5.05")]
    invalid = [InvalidRecord(f"{key_prefix}6".encode(), b"1e3", "not a plain decimal")]
    db = Database(settings.database_url, settings.retry_timeout)
    try:
        run_id = db.start_run(settings)
        target = db.describe_target(settings)

        def apply() -> tuple[int, int, list[int]]:
            counts = db.apply_batch(
                target,
                records,
                invalid,
                run_id=run_id,
                batch_no=1,
                lock=None,
                key_prefix=key_prefix,
                reserve=lambda kind, wanted: wanted,
            )
            return counts.inserted, counts.updated, counts.unknown_ids

        assert apply() == (2, 2, [])
        assert balances_of(pg) == {1: "1.00", 2: "2.50", 3: "3.50", 4: "4.00", 5: "5.05"}
        # The application writes between the commit and the retry; a re-applied batch
        # would overwrite its change or bring back the row it deleted.
        pg.execute(
            "UPDATE user_balances SET balance = 7.77, updated_at = %s WHERE telegram_id = 2", (OLD,)
        )
        pg.execute("DELETE FROM user_balances WHERE telegram_id = 5")
        before = table_rows(pg)
        assert apply() == (2, 2, [])
        assert table_rows(pg) == before
        assert 5 not in before
        ledger = pg.execute(
            "SELECT batch_no, inserted, updated, unknown FROM balsync.run_batches"
            " WHERE run_id = %s",
            (run_id,),
        ).fetchall()
        assert ledger == [(1, 2, 2, 0)]
        assert len(skipped_records(pg, run_id)) == 1
        counters = dict.fromkeys(COUNTERS, 0)
        db.finish_run(run_id, "success", counters, 0.1, None)
    finally:
        db.close()
    assert pg.execute(
        "SELECT count(*) FROM balsync.run_batches WHERE run_id = %s", (run_id,)
    ).fetchone() == (0,)
