"""The Redis-restart guard: a Redis whose identity changed is trusted only on evidence.

Each scenario is one an operator would recognise: Redis restarts empty, the application
rebuilds a balance from zero, an incremental run in a quiet hour, a stale snapshot, a
failover in the middle of a run. Each ends with a full comparison of every row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis

from balance_sync.errors import RedisChanged
from balance_sync.ops.sync import SyncOptions, run_sync
from balance_sync.settings import Settings
from tests.helpers import Balsync, balances
from tests.support.devservers import ValkeyServer

PERSISTED = {1: "1500.00", 2: "20.00", 3: "3.00"}


@dataclass
class Restartable:
    """balsync pointed at a Valkey of the test's own, which the test restarts."""

    server: ValkeyServer
    tool: Balsync
    prefix: str

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url)

    def set(self, values: dict[int, str]) -> None:
        with self.client() as client:
            client.mset({f"{self.prefix}{i}": v for i, v in values.items()})

    def restart_empty(self) -> None:
        """Stop and start the server: nothing is on disk, so it comes back empty."""
        self.server.stop()
        self.server.start()

    def rebuilt_after_an_empty_restart(self) -> tuple[int, dict[str, object]]:
        """Redis restarts empty, a full sync finds nothing, the application rebuilds id 1
        from zero (5.00); then the sync that must not write it."""
        self.restart_empty()
        self.sync()
        self.set({1: "5.00"})
        return self.sync()

    def sync(self, *args: str) -> tuple[int, dict[str, object]]:
        result = self.tool("sync", "--json", "--force", *args)
        assert result.stdout, result.stderr
        return result.exit_code, json.loads(result.stdout)


@pytest.fixture
def own(initialized: Balsync, tmp_path: Path, key_prefix: str) -> Iterator[Restartable]:
    """Ids 1..3 synced once from a Redis of the test's own."""
    server = ValkeyServer(tmp_path / "valkey").start()
    tool = Balsync({**initialized.env, "BALSYNC_REDIS_URL": server.url})
    bench = Restartable(server, tool, key_prefix)
    bench.set(PERSISTED)
    code, data = bench.sync()
    assert (code, data["inserted"]) == (0, 3)
    yield bench
    server.stop()


def held_ids(tool: Balsync) -> list[int]:
    listed = json.loads(tool.ok("conflicts", "--json").stdout)
    return sorted(
        c["telegram_id"]
        for c in listed["conflicts"]
        if (c["kind"], c["resolution"]) == ("redis_restarted", "kept")
    )


def test_an_empty_redis_after_a_restart_is_not_trusted(own, pg):
    """A run over an empty Redis holds nothing, but must not trust it: the application
    then rebuilds 1500.00 from zero, and the next run still refuses to overwrite."""
    own.restart_empty()
    code, data = own.sync()
    assert (code, data["processed"]) == (0, 0)
    own.set({1: "5.00"})  # INCRBY on a missing key: the increment, not the balance
    code, data = own.sync()
    assert (code, data["updated"], data["skipped"]) == (1, 0, 1)
    assert held_ids(own.tool) == [1]
    assert balances(pg) == {1: "1500.00", 2: "20.00", 3: "3.00"}


def test_a_partly_rebuilt_keyspace_is_not_trusted(own, pg):
    """Keys that agree are not evidence for the keys still missing."""
    own.restart_empty()
    own.set({2: "20.00", 3: "3.00"})
    assert own.sync()[0] == 0
    own.set({1: "5.00"})
    assert own.sync()[0] == 1
    assert balances(pg) == {1: "1500.00", 2: "20.00", 3: "3.00"}


def test_an_incremental_run_never_trusts(own, pg):
    """An incremental run in a quiet hour reads nothing, so it proves nothing."""
    own.restart_empty()
    result = own.tool("sync", "--json", "--incremental", "--min-interval", "0")
    assert result.exit_code == 0, result.stderr
    own.set({1: "5.00", 2: "20.00", 3: "3.00"})
    code, data = own.sync()
    assert (code, data["updated"], data["skipped"]) == (1, 0, 1)
    assert balances(pg)[1] == "1500.00"


def test_a_dry_run_never_trusts(own, pg):
    """A dry run that finds every key agreeing writes nothing, trust included."""
    own.restart_empty()
    own.set(PERSISTED)
    assert own.sync("--dry-run")[0] == 0
    own.set({1: "5.00"})
    assert own.sync()[0] == 1
    assert balances(pg)[1] == "1500.00"


def test_a_full_scan_finding_every_key_agreeing_trusts(own, pg):
    """`balsync restore` puts the missing keys back; the next full scan finds every key
    agreeing and trusts the new Redis, so ordinary changes flow again (exit 0)."""
    own.restart_empty()
    own.set({2: "20.00"})
    restored = json.loads(own.tool.ok("restore", "--json").stdout)
    assert restored["restored"] == 2
    assert own.sync()[0] == 0  # every remembered key found, none differing: trusted
    own.set({1: "1490.00"})
    code, data = own.sync()
    assert (code, data["updated"]) == (0, 1)
    assert balances(pg) == {1: "1490.00", 2: "20.00", 3: "3.00"}


def test_keys_cleared_on_purpose_do_not_block_trust(own, pg):
    """clear-cache removed key 1 on purpose; after a restart the other keys are enough."""
    own.tool.ok("clear-cache", "--yes", "--json")
    own.restart_empty()
    own.set({2: "20.00", 3: "3.00"})
    assert own.sync()[0] == 0
    own.set({2: "25.00"})
    code, data = own.sync()
    assert (code, data["updated"]) == (0, 1)
    assert balances(pg) == {1: "1500.00", 2: "25.00", 3: "3.00"}


def test_a_row_deleted_since_does_not_block_trust(own, pg):
    """A remembered id whose row an admin deleted has nothing left to lose."""
    pg.execute("DELETE FROM user_balances WHERE telegram_id = 3")
    own.restart_empty()
    own.set({1: "1500.00", 2: "20.00"})
    assert own.sync()[0] == 0
    own.set({1: "1490.00"})
    code, data = own.sync()
    assert (code, data["updated"]) == (0, 1)
    assert balances(pg) == {1: "1490.00", 2: "20.00"}


def test_pending_restart_is_shown_by_health_status_and_sync(own):
    """Until trusted, health is degraded, status and sync's summary name the restart."""
    own.restart_empty()
    own.set({1: "5.00"})
    summary = own.tool("sync", "--force")
    assert summary.exit_code == 1
    assert "restart pending" in summary.stdout
    assert "--on-conflict db" in summary.stderr
    assert "--accept-redis-restart" in summary.stderr
    health = json.loads(own.tool("health", "--json").stdout)
    check = next(c for c in health["checks"] if c["name"] == "redis_restart")
    assert not check["ok"]
    assert "pending" in check["detail"]
    status = json.loads(own.tool.ok("status", "--json").stdout)
    assert status["redis_restart_pending"] is True


def test_accepting_the_restart_trusts_redis(own, pg):
    """--accept-redis-restart: Redis wins for held rows, and is trusted from then on."""
    own.restart_empty()
    own.set({1: "5.00"})
    code, data = own.sync("--accept-redis-restart")
    assert (code, data["updated"]) == (0, 1)
    own.set({2: "21.00"})
    assert own.sync()[:1] == (0,)
    assert balances(pg) == {1: "5.00", 2: "21.00", 3: "3.00"}
    status = json.loads(own.tool.ok("status", "--json").stdout)
    assert status["redis_restart_pending"] is False


def test_a_stale_snapshot_is_resolved_in_postgres_favour(own, pg):
    """Redis came back from an old snapshot: `sync --on-conflict db` gives every held key
    PostgreSQL's value (compare-and-set), keeps PostgreSQL, and then trusts the server."""
    own.set({1: "1600.00", 2: "30.00"})
    assert own.sync()[0] == 0
    own.restart_empty()
    own.set(PERSISTED)  # the snapshot taken before the last sync
    code, _ = own.sync()
    assert code == 1
    assert held_ids(own.tool) == [1, 2]
    code, data = own.sync("--on-conflict", "db")
    assert (code, data["updated"], data["skipped"]) == (0, 0, 0)
    with own.client() as client:
        assert client.mget([f"{own.prefix}{i}" for i in (1, 2, 3)]) == [
            b"1600.00",
            b"30.00",
            b"3.00",
        ]
    assert balances(pg) == {1: "1600.00", 2: "30.00", 3: "3.00"}
    own.set({3: "4.00"})  # trusted now: an ordinary change is an ordinary update
    code, data = own.sync()
    assert (code, data["updated"]) == (0, 1)


def test_on_conflict_db_with_ids_resolves_only_those(own, pg):
    """--ids limits the resolution; the other held rows stay held."""
    own.set({1: "1600.00", 2: "30.00"})
    assert own.sync()[0] == 0
    own.restart_empty()
    own.set(PERSISTED)
    code, _ = own.sync("--on-conflict", "db", "--ids", "2")
    assert code == 1
    with own.client() as client:
        assert client.get(f"{own.prefix}1") == b"1500.00"
        assert client.get(f"{own.prefix}2") == b"30.00"
    assert held_ids(own.tool) == [1]
    assert balances(pg) == {1: "1600.00", 2: "30.00", 3: "3.00"}


def test_ids_needs_on_conflict(initialized):
    """--ids alone would do nothing: a usage error."""
    result = initialized("sync", "--ids", "1")
    assert result.exit_code == 2
    assert "--on-conflict" in result.stderr


def test_redis_changed_during_a_run_stops_before_the_next_commit(
    initialized, tmp_path, key_prefix, pg, database_url
):
    """A server change between two batches (a restart, a failover behind one address)
    stops the run before the next batch commits (exit 3); the next run holds rows."""
    server = ValkeyServer(tmp_path / "valkey").start()
    client = redis.Redis.from_url(server.url)
    values = {i: f"{i}.00" for i in range(1, 41)}
    client.mset({f"{key_prefix}{i}": v for i, v in values.items()})
    settings = Settings(
        redis_url=server.url,
        database_url=database_url,
        key_prefix=key_prefix,
        retry_timeout=10,
    )
    run_sync(settings, SyncOptions(force=True))
    client.mset({f"{key_prefix}{i}": f"{i}.50" for i in values})
    batches: list[int] = []

    def switch_after_first(report: object) -> None:
        batches.append(1)
        if len(batches) == 1:  # another server, holding the same keys, behind the same URL
            server.stop()
            server.start()
            with redis.Redis.from_url(server.url) as again:
                again.mset({f"{key_prefix}{i}": f"{i}.50" for i in values})

    with pytest.raises(RedisChanged) as raised:
        run_sync(
            settings,
            SyncOptions(force=True, batch_size=10, writers=1),
            on_batch=switch_after_first,
        )
    assert raised.value.exit_code == 3
    rows = balances(pg)
    assert sum(1 for v in rows.values() if v.endswith(".50")) == 10  # the first batch only
    with psycopg.connect(database_url) as conn:
        status = conn.execute("SELECT status FROM balsync.sync_runs ORDER BY id DESC LIMIT 1")
        assert status.fetchone() == ("failed",)
    tool = Balsync({**initialized.env, "BALSYNC_REDIS_URL": server.url})
    result = tool("sync", "--json", "--force")
    assert result.exit_code == 1  # the 30 rows that differ are held: a restart
    assert json.loads(result.stdout)["skipped"] == 30
    client.close()
    server.stop()


def test_both_spellings_of_a_table_share_the_restart_baseline(own, pg):
    """`user_balances` and `public.user_balances` are one table to every guard."""
    own.restart_empty()
    own.set({1: "5.00", 2: "20.00", 3: "3.00"})
    qualified = Balsync({**own.tool.env, "BALSYNC_TABLE": "public.user_balances"})
    result = qualified("sync", "--json", "--force")
    assert result.exit_code == 1, result.stdout
    assert balances(pg)[1] == "1500.00"


def test_both_spellings_share_min_interval(initialized, rds, key_prefix):
    """A sync under one spelling makes the next one under the other redundant."""
    rds.set(f"{key_prefix}1", "1")
    initialized.ok("sync", "--json")
    qualified = Balsync({**initialized.env, "BALSYNC_TABLE": "public.user_balances"})
    data = json.loads(qualified.ok("sync", "--json").stdout)
    assert data["status"] == "skipped"


def test_a_same_named_table_in_another_schema_has_its_own_bookkeeping(
    initialized, rds, key_prefix, pg
):
    """ledger.user_balances is another table: public's recent sync does not skip it."""
    pg.execute("CREATE SCHEMA ledger")
    pg.execute("CREATE TABLE ledger.user_balances (LIKE public.user_balances INCLUDING ALL)")
    rds.set(f"{key_prefix}1", "1")
    initialized.ok("sync", "--json")
    other = Balsync({**initialized.env, "BALSYNC_TABLE": "ledger.user_balances"})
    data = json.loads(other.ok("sync", "--json").stdout)
    assert (data["status"], data["inserted"]) == ("success", 1)
    assert balances(pg, "ledger.user_balances") == {1: "1.00"}


def test_status_and_stats_find_runs_under_either_spelling(initialized, rds, key_prefix):
    """Operator views key runs by the table itself, not by how it was spelled."""
    rds.set(f"{key_prefix}1", "1")
    qualified = Balsync({**initialized.env, "BALSYNC_TABLE": "public.user_balances"})
    qualified.ok("sync", "--json")
    status = json.loads(initialized.ok("status", "--json").stdout)
    assert status["last_run"]["status"] == "success"


def test_init_db_migrates_runs_recorded_under_another_spelling(initialized, rds, key_prefix, pg):
    """Runs recorded before bookkeeping was keyed by the resolved table are found again."""
    rds.set(f"{key_prefix}1", "1")
    initialized.ok("sync", "--json")
    pg.execute("UPDATE balsync.sync_runs SET target_table = 'user_balances'")
    initialized.ok("init-db")
    rows = pg.execute("SELECT DISTINCT target_table FROM balsync.sync_runs").fetchall()
    assert rows == [("public.user_balances",)]


def test_a_table_reloaded_from_an_export_is_still_guarded_after_a_restart(own, pg):
    """An admin reloads user_balances from an export of its columns (TRUNCATE, INSERT: the
    same balances); Redis restarts empty; a full sync; the application rebuilds 1 from
    zero (5.00); sync. balsync still remembers what it wrote, so the empty Redis is not
    trusted and 1500.00 is held (exit 1)."""
    pg.execute("CREATE TEMP TABLE export AS SELECT telegram_id, balance FROM user_balances")
    pg.execute("TRUNCATE user_balances")
    pg.execute("INSERT INTO user_balances (telegram_id, balance) SELECT * FROM export")
    assert balances(pg) == {1: "1500.00", 2: "20.00", 3: "3.00"}
    own.restart_empty()
    own.sync()
    own.set({1: "5.00"})
    code, data = own.sync()
    assert balances(pg) == {1: "1500.00", 2: "20.00", 3: "3.00"}
    assert (code, data["updated"], data["skipped"]) == (1, 0, 1)
    assert held_ids(own.tool) == [1]


def test_restore_after_a_restart_then_sync_changes_nothing_and_updates_follow(own, pg):
    """restore puts the persisted values back into the empty Redis; the next full sync finds
    every remembered key agreeing and changes nothing; a later change is an update."""
    own.restart_empty()
    own.tool.ok("restore", "--yes", "--json")
    with own.client() as client:
        assert client.get(f"{own.prefix}1") == b"1500.00"
    code, data = own.sync()
    assert (code, data["updated"], data["skipped"]) == (0, 0, 0)
    own.set({1: "1501.00"})
    code, data = own.sync()
    assert (code, data["updated"]) == (0, 1)
    assert balances(pg)[1] == "1501.00"


def test_pruning_every_old_run_keeps_the_restart_guard(own, pg):
    """Every run aged past retention and pruned: the memory stays, and after a restart an
    empty Redis is still not trusted."""
    pg.execute("UPDATE balsync.sync_runs SET started_at = started_at - interval '400 days'")
    own.tool.ok("prune", "--json")
    own.restart_empty()
    assert own.sync()[0] == 0
    own.set({1: "5.00"})
    code, data = own.sync()
    assert (code, data["updated"], data["skipped"]) == (1, 0, 1)
    assert balances(pg)[1] == "1500.00"


def test_a_row_replaced_before_a_restart_is_still_guarded(own, pg):
    """Row 1 deleted and inserted again (its memory kept aside by init-db's trigger), then
    Redis restarts empty: the remembered key is missing, so the rebuilt 5.00 is held."""
    with pg.transaction():
        pg.execute("DELETE FROM user_balances WHERE telegram_id = 1")
        pg.execute("INSERT INTO user_balances (telegram_id, balance) VALUES (1, 1500)")
    code, _ = own.rebuilt_after_an_empty_restart()
    assert (code, balances(pg)[1]) == (1, "1500.00")


def test_cleared_keys_then_a_correction_then_a_restart(own, pg):
    """clear-cache marks the keys in their rows; a correction afterwards, then an empty
    Redis: the rebuilt balance does not overwrite the correction."""
    own.tool.ok("clear-cache", "--yes")
    pg.execute("UPDATE user_balances SET balance = 1600 WHERE telegram_id = 1")
    code, _ = own.rebuilt_after_an_empty_restart()
    assert (code, balances(pg)[1]) == (1, "1600.00")


def test_a_table_rebuilt_by_renaming_the_old_one_away_is_guarded_after_a_restart(own, pg):
    """Rename the old table away, init-db, copy the rows back, then Redis restarts empty:
    the memory set aside from the old table counts, so the rebuilt 5.00 is held."""
    pg.execute("ALTER TABLE user_balances RENAME TO user_balances_old")
    own.tool.ok("init-db")
    pg.execute("INSERT INTO user_balances SELECT * FROM user_balances_old")
    code, data = own.rebuilt_after_an_empty_restart()
    assert balances(pg) == PERSISTED, (code, data)
    assert code == 1
