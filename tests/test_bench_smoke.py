"""The benchmark harness (`make bench`) at a tiny N, so that it cannot rot unnoticed."""

from __future__ import annotations

import random
import sys

import psycopg
import pytest
import redis

from balance_sync.stores.redis import dirty_keys
from bench import floor
from bench.cli import main as bench_main
from bench.harness import SCENARIOS, Config, Results, render, run_bench
from bench.process import run_process
from bench.profiling import profile_scenario
from bench.report import Machine
from bench.scratch import BASE_ID, Scratch, with_redis_db
from tests.helpers import Servers


def _database_exists(servers: Servers, dbname: str) -> bool:
    with psycopg.connect(servers.postgres_admin) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
    return row is not None


def _keys_left(redis_url: str, prefix: str) -> list[bytes]:
    """The scratch keys of `prefix` still in Redis, its change-tracking set and claim too."""
    client = redis.Redis.from_url(redis_url)
    try:
        left = list(client.scan_iter(match=prefix.removesuffix("balance:") + "*", count=1000))
        return left + [key.encode() for key in dirty_keys(prefix) if client.exists(key)]
    finally:
        client.close()


@pytest.mark.slow
def test_bench_measures_every_scenario_and_leaves_nothing_behind(servers, tmp_path):
    """Every scenario, floor, RSS and incremental line is measured at N=2000 (incremental: 100
    changed among 2000 keys), and the scratch data is gone."""
    results_file = tmp_path / "results.md"
    config = Config(
        admin_url=servers.postgres_admin,
        redis_url=servers.redis,
        n=2000,
        repeat=1,
        rss_5n=True,
        naive_rows=50,
        results_path=results_file,
        command="pytest",
        checkpoint=False,  # seconds on a busy shared server; one statement, not worth them here
        incremental_keys=2000,
        incremental_changed=100,
    )
    results, text = run_bench(config)
    assert results.anomalies == []
    for name in SCENARIOS:
        scenario = results.scenarios[name]
        assert len(scenario.balsync.values) == 1
        assert scenario.balsync.median > 0
        assert all(s.median > 0 for s in scenario.end_to_end.values())
        assert all(s.median > 0 for s in scenario.write_only.values())
        assert scenario.naive.median > 0
        # A Python process with psycopg and redis loaded cannot peak under 10 MB.
        assert 10 < scenario.rss_mb.median < 1000
    assert set(results.rss_5n) == {"first", "none"}
    assert results.read_only.median > 0
    incremental = results.incremental
    assert incremental is not None
    assert (incremental.keys, incremental.changed) == (2000, 100)
    assert incremental.incremental.median > 0
    assert incremental.full.median > 0
    assert "- incremental: 100 changed among 2 000 keys: " in text
    assert "; full sync of 100 keys: " in text
    assert "target ≤ 1.46×" in text
    assert "### Targets" in text
    assert "peak RSS at 5N: " in text
    assert "- incremental sync, 100 changed among 2 000 keys: " in text
    assert "### Anomalies" not in text
    written = results_file.read_text()
    assert "- N: 2 000 keys" in written
    assert "| scenario | balsync median (min–max) | floor end-to-end |" in written
    assert "command: `pytest`" in written
    assert text in written
    assert not _database_exists(servers, results.dbname)
    assert _keys_left(servers.redis, results.prefix) == []
    assert len(incremental.scratches) == 2
    for prefix, dbname in incremental.scratches:
        assert not _database_exists(servers, dbname)
        assert _keys_left(incremental.redis_url, prefix) == []


def test_results_say_when_the_incremental_part_was_skipped():
    """With --no-incremental (Config.incremental=False) the results say it was not measured."""
    config = Config(admin_url="", redis_url="", incremental=False)
    text = render(Results(config, Machine.here("7.0", "15")))
    assert "- incremental: not measured (`--no-incremental`)" in text
    assert "- incremental sync," not in text


def test_redis_database_is_swapped_in_every_url_form():
    """The incremental part may move to another database: a path for TCP, ?db= for a socket."""
    assert with_redis_db("redis://:p%40ss@h:1/0?socket_timeout=3", 4) == (
        "redis://:p%40ss@h:1/4?socket_timeout=3"
    )
    assert with_redis_db("rediss://h", 7) == "rediss://h/7"
    assert with_redis_db("unix:///run/redis.sock?db=2", 3) == "unix:///run/redis.sock?db=3"


def test_tracked_changes_mark_exactly_the_changed_ids(servers):
    """change_tracked writes through BalanceWriter: new values, and exactly those ids marked."""
    with Scratch(servers.postgres_admin, servers.redis) as scratch:
        scratch.seed(500)
        keys = [scratch.key(i) for i in range(500)]
        before = scratch.client.mget(keys)
        assert scratch.change_tracked(50, random.Random(3)) == 50
        after = scratch.client.mget(keys)
        changed = {BASE_ID + i for i in range(500) if before[i] != after[i]}
        marked = scratch.client.smembers(dirty_keys(scratch.prefix)[0])
        assert len(changed) == 50
        assert {int(m) for m in marked} == changed


def test_scratch_is_removed_when_interrupted(servers):
    """Ctrl-C inside a run still deletes the scratch keys, its change-tracking set, and drops
    the scratch database."""
    scratch = Scratch(servers.postgres_admin, servers.redis)

    def interrupted_run() -> None:
        with scratch:
            scratch.seed(300)
            scratch.change_tracked(10, random.Random(1))
            assert scratch.client.exists(dirty_keys(scratch.prefix)[0])
            assert _database_exists(servers, scratch.dbname)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted_run()
    assert not _database_exists(servers, scratch.dbname)
    assert _keys_left(servers.redis, scratch.prefix) == []


def test_peak_rss_is_that_of_each_process_alone():
    """A small process after a big one reports its own peak, not the big one's."""
    big = run_process(
        [sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * (len(b) // 4096)"],
        {},
    )
    small = run_process([sys.executable, "-c", "pass"], {})
    assert big.max_rss_mb > 300
    assert small.max_rss_mb < 100


def test_floor_scripts_move_every_row(servers):
    """Each floor script writes every key once, and the second pass finds nothing to do."""
    with Scratch(servers.postgres_admin, servers.redis) as scratch:
        scratch.seed(1500)
        url, prefix = scratch.database_url, scratch.prefix
        for name in ("batched", "streamed"):
            table = scratch.floor_table(name)
            first = floor.end_to_end(scratch.redis_url, url, table, prefix, name)
            again = floor.end_to_end(scratch.redis_url, url, table, prefix, name)
            assert (first.rows, first.inserted, again.updated, again.inserted) == (1500, 1500, 0, 0)
            assert scratch.count_rows(table) == 1500
        rows = floor.read_all(scratch.redis_url, prefix)
        table = scratch.floor_table("memory")
        assert floor.write_only(url, table, rows, 2).inserted == 1500
        scratch.change_all()
        rows = floor.read_all(scratch.redis_url, prefix)
        assert floor.write_only(url, table, rows, 1).updated == 1500
        keys = floor.first_keys(scratch.redis_url, prefix, 20)
        assert floor.naive(scratch.redis_url, url, table, keys, prefix).rows == 20
        assert floor.read_only(scratch.redis_url, prefix) == 1500


def test_profile_mode_shows_every_thread_of_one_sync(servers):
    """--profile runs one sync in-process and prints a profile per thread it started."""
    config = Config(
        admin_url=servers.postgres_admin, redis_url=servers.redis, n=1000, checkpoint=False
    )
    text = profile_scenario(config, "one-percent")
    assert "## thread MainThread" in text
    assert "## thread balsync-reader" in text
    assert '"updated": 10' in text
    assert "ANOMALY" not in text
    assert "| seconds | calls | statement |" in text


def test_bench_refuses_a_meaningless_n(capsys):
    """`python -m bench --n 5` stops with a usage message before touching any server."""
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--n", "5"])
    assert "--n must be ≥ 100" in str(exit_info.value.code)


def test_bench_refuses_an_empty_incremental_keyspace():
    """`--incremental-changed 0` stops with a usage message before touching any server."""
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--n", "1000", "--incremental-changed", "0"])
    assert "--incremental-changed must be ≥ 1" in str(exit_info.value.code)
