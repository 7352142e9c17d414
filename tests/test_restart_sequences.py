"""Sequences that once got past the Redis-restart guard, each pinned on real servers.

Each test is a sequence an operator or the application can produce, ending in a check of
what SPEC "What a sync guarantees" 7 requires: a persisted balance is never overwritten by
a value that may derive from a lost key; differing rows are held (exit 1) until there is
evidence that nothing persisted was lost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from balance_sync.stores.redis import trust_marker
from tests.helpers import Balsync, balances
from tests.support.devservers import ValkeyCluster, ValkeyServer, replicated

PERSISTED = {1: "1500.00", 2: "20.00", 3: "3.00"}


@dataclass
class Bench:
    """balsync pointed at a Valkey of the test's own."""

    server: ValkeyServer
    tool: Balsync
    prefix: str
    tmp: Path

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.server.port, db=db)

    def set(self, values: dict[int, str], db: int = 0) -> None:
        with self.client(db) as client:
            client.mset({f"{self.prefix}{i}": v for i, v in values.items()})

    def run_id(self) -> str:
        with self.client() as client:
            return str(client.info("server")["run_id"])

    def sync(self, *args: str, tool: Balsync | None = None) -> tuple[int, dict[str, object]]:
        result = (tool or self.tool)("sync", "--json", "--force", *args)
        assert result.stdout, result.stderr
        return result.exit_code, json.loads(result.stdout)

    def assert_rebuilt_balance_is_held(
        self, pg: Any, tool: Balsync | None = None, table: str = "user_balances"
    ) -> None:
        """The bot's INCRBY on user 1's missing key makes "5"; the next sync must hold it
        back (exit 1) and leave the persisted 1500.00 alone."""
        with self.client() as client:
            client.incrby(f"{self.prefix}1", 5)
        code, data = self.sync(tool=tool)
        assert balances(pg, table)[1] == "1500.00", (code, data)
        assert code == 1


@pytest.fixture
def bench(initialized: Balsync, tmp_path: Path, key_prefix: str) -> Iterator[Bench]:
    """Ids 1..3 synced once (1500.00, 20.00, 3.00) from a Valkey of the test's own."""
    server = ValkeyServer(tmp_path / "valkey").start()
    tool = Balsync({**initialized.env, "BALSYNC_REDIS_URL": server.url})
    b = Bench(server, tool, key_prefix, tmp_path)
    b.set(PERSISTED)
    code, data = b.sync()
    assert (code, data["inserted"]) == (0, 3)
    yield b
    server.stop()


# --------------------------------------------------------------------------------------
# a failover and failback (the server balsync trusts becomes a replica of a
# stale server, resyncs its whole dataset from it, and is promoted again) keeps INFO
# run_id, so balsync trusts a dataset it never read and overwrites persisted balances.
# --------------------------------------------------------------------------------------


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_failback_onto_a_resynced_server_is_not_trusted(bench, pg):
    """Sentinel-style failover and failback. The trusted primary A is demoted and replicates
    from B, a replica that had fallen behind (it still holds 1400.00 for user 1, from
    before the last sync). A drops its dataset and loads B's, then is promoted back. Same
    process, same run_id: balsync's identity check sees 'the trusted server' and copies
    the stale 1400.00 over the persisted 1500.00, exit 0. SPEC 7: a failover is an
    identity change; the dataset no longer continues what balsync last read (its
    replication id changed), so differing rows must be held (exit 1)."""
    stale = ValkeyServer(bench.tmp / "stale").start()
    try:
        with redis.Redis(host="127.0.0.1", port=stale.port) as b:
            b.mset(
                {f"{bench.prefix}{i}": v for i, v in {1: "1400.00", 2: "20.00", 3: "3.00"}.items()}
            )
        before = bench.run_id()
        with bench.client() as a:
            replid_before = a.info("replication")["master_replid"]
            a.execute_command("REPLICAOF", "127.0.0.1", str(stale.port))
            _wait_for(
                lambda: (
                    a.info("replication").get("master_link_status") == "up"
                    and a.get(f"{bench.prefix}1") == b"1400.00"
                )
            )
            a.execute_command("REPLICAOF", "NO", "ONE")
            assert a.info("replication")["master_replid"] != replid_before
        assert bench.run_id() == before  # the only identity balsync looks at
        code, data = bench.sync()
        assert balances(pg)[1] == "1500.00", (code, data)
        assert code == 1
    finally:
        stale.stop()


# --------------------------------------------------------------------------------------
# another keyspace on the same server (database /1 instead of /0) shares the
# trusted run_id: nothing is held and every differing row is overwritten, exit 0.
# --------------------------------------------------------------------------------------


def test_another_database_on_the_same_server_is_not_trusted(bench, pg):
    """BALSYNC_REDIS_URL now points at database 1 of the same server (the staging bot's, an
    old copy, a typo). It is another keyspace behind the same address, never read by
    balsync, yet INFO run_id is the server's: the guard trusts it and overwrites
    user 1's 1500.00 with 7.00. SPEC 7: 'another server behind the same address' is an
    identity change; rows that differ must be held (exit 1)."""
    bench.set({1: "7.00", 2: "20.00", 3: "3.00"}, db=1)
    other_db = Balsync(
        {**bench.tool.env, "BALSYNC_REDIS_URL": f"redis://127.0.0.1:{bench.server.port}/1"}
    )
    code, data = bench.sync(tool=other_db)
    assert balances(pg)[1] == "1500.00", (code, data)
    assert code == 1


# --------------------------------------------------------------------------------------
# FLUSHALL (or FLUSHDB) loses every key without changing the identity; the
# application rebuilds a balance from zero and balsync overwrites the persisted one.
# --------------------------------------------------------------------------------------


def test_a_flushed_redis_is_not_trusted(bench, pg):
    """Every key is lost (FLUSHALL by an operator who took Redis for a cache) but the
    server did not restart. The bot's INCRBY on the missing key makes 5.00, and balsync
    copies it over 1500.00 with exit 0. SPEC 7: never overwrite a persisted balance with
    a value that may derive from a lost key; a full scan found every remembered key
    missing, which is evidence of loss, not of agreement."""
    with bench.client() as client:
        client.flushall()
    _code, data = bench.sync()  # an empty keyspace: 0 processed
    assert data["processed"] == 0
    bench.assert_rebuilt_balance_is_held(pg)


# --------------------------------------------------------------------------------------
# the same rows reached through a view have bookkeeping of their own: after a
# restart a sync through the view is a "first run" and trusts the new Redis.
# --------------------------------------------------------------------------------------


def test_a_view_over_the_guarded_table_does_not_bypass_a_pending_restart(bench, pg):
    """Cron syncs user_balances. Redis restarts empty; the bot rebuilds user 1 from zero
    (5.00); the restart is pending and the rows are held. Then a sync runs through
    `balances_v`, a plain view over user_balances (an application's schema, a reporting
    role): balsync knows no trust and no memory for the view's name, calls it a first
    install, trusts the new Redis and overwrites 1500.00 with 5.00, exit 0."""
    pg.execute(
        "CREATE VIEW balances_v AS SELECT telegram_id, balance, updated_at FROM user_balances"
    )
    bench.server.stop()
    bench.server.start()
    bench.set({1: "5.00"})
    code, _ = bench.sync()
    assert code == 1  # held through the table
    via_view = Balsync({**bench.tool.env, "BALSYNC_TABLE": "balances_v"})
    code, data = bench.sync(tool=via_view)
    assert balances(pg)[1] == "1500.00", (code, data)
    assert code == 1


def test_a_renamed_table_does_not_bypass_a_pending_restart(bench, pg):
    """The same, by a rename: bookkeeping follows the table's name, not the table. A DBA
    renames user_balances to balances (BALSYNC_TABLE follows) while a restart is pending:
    the first sync under the new name is a 'first install', trusts the new Redis and
    overwrites 1500.00 with the rebuilt-from-zero 5.00, exit 0."""
    bench.server.stop()
    bench.server.start()
    bench.set({1: "5.00"})
    assert bench.sync()[0] == 1  # held
    pg.execute("ALTER TABLE user_balances RENAME TO balances")
    renamed = Balsync({**bench.tool.env, "BALSYNC_TABLE": "balances"})
    code, data = bench.sync(tool=renamed)
    assert balances(pg, "balances")[1] == "1500.00", (code, data)
    assert code == 1


# --------------------------------------------------------------------------------------
# Sequences around those: each must hold rows back too.
# --------------------------------------------------------------------------------------


def test_an_invalid_value_for_a_remembered_id_is_no_evidence(bench, pg):
    bench.server.stop()
    bench.server.start()
    bench.set({1: "abc", 2: "20.00", 3: "3.00"})
    code, data = bench.sync()
    assert (code, data["invalid"]) == (1, 1)
    bench.set({1: "5.00"})
    assert bench.sync()[0] == 1
    assert balances(pg)[1] == "1500.00"


def test_a_wrong_type_key_for_a_remembered_id_is_no_evidence(bench, pg):
    bench.server.stop()
    bench.server.start()
    bench.set({2: "20.00", 3: "3.00"})
    with bench.client() as client:
        client.rpush(f"{bench.prefix}1", "1500.00")
    assert bench.sync()[0] == 1
    with bench.client() as client:
        client.delete(f"{bench.prefix}1")
        client.incrby(f"{bench.prefix}1", 5)
    assert bench.sync()[0] == 1
    assert balances(pg)[1] == "1500.00"


def test_holds_a_cleared_key_back_from_an_older_snapshot(bench, pg):
    bench.set({1: "1600.00"})
    assert bench.sync()[0] == 0
    bench.tool.ok("clear-cache", "--yes", "--json")
    bench.server.stop()
    bench.server.start()
    bench.set(PERSISTED)  # a snapshot from before the last sync and the clear
    assert bench.sync()[0] == 1
    assert bench.sync()[0] == 1  # still pending
    assert balances(pg)[1] == "1600.00"


def test_on_conflict_redis_does_not_resolve_a_held_row(bench, pg):
    bench.server.stop()
    bench.server.start()
    bench.set({1: "5.00", 2: "20.00", 3: "3.00"})
    assert bench.sync("--on-conflict", "redis")[0] == 1
    assert bench.sync("--on-conflict", "redis", "--ids", "1")[0] == 1
    assert bench.sync("--incremental")[0] == 1
    assert balances(pg)[1] == "1500.00"


def test_accepting_a_restart_keeps_an_admin_correction(bench, pg):
    pg.execute("UPDATE user_balances SET balance = 1400 WHERE telegram_id = 1")
    bench.server.stop()
    bench.server.start()
    bench.set(PERSISTED)
    code, _ = bench.sync("--accept-redis-restart")
    assert code == 1
    assert balances(pg)[1] == "1400.00"


def test_on_conflict_db_overtaken_by_the_bot_is_no_evidence(bench, pg, monkeypatch):
    from balance_sync.stores.redis import RedisStore

    bench.set({1: "1600.00"})
    assert bench.sync()[0] == 0
    bench.server.stop()
    bench.server.start()
    bench.set(PERSISTED)
    real = RedisStore.set_if_equal

    def bot_first(self, items):
        with bench.client() as client:
            for key, _, _ in items:
                client.set(key, "1.00")
        return real(self, items)

    monkeypatch.setattr(RedisStore, "set_if_equal", bot_first)
    assert bench.sync("--on-conflict", "db")[0] == 1
    monkeypatch.undo()
    assert bench.sync()[0] == 1
    assert balances(pg)[1] == "1600.00"


def test_holds_an_application_table_without_inserts_and_wider_scale(
    initialized, tmp_path, key_prefix, pg
):
    pg.execute(
        "CREATE TABLE wallets (id bigint PRIMARY KEY, balance numeric(20,4) NOT NULL, "
        "owner text NOT NULL)"
    )
    pg.execute("INSERT INTO wallets VALUES (1, 1500, 'a'), (2, 20, 'b')")
    server = ValkeyServer(tmp_path / "valkey").start()
    try:
        tool = Balsync(
            {
                **initialized.env,
                "BALSYNC_REDIS_URL": server.url,
                "BALSYNC_TABLE": "wallets",
                "BALSYNC_ID_COLUMN": "id",
            }
        )
        b = Bench(server, tool, key_prefix, tmp_path)
        b.set({1: "1500.00", 2: "20.00"})
        assert b.sync()[0] == 0
        server.stop()
        server.start()
        b.set({1: "5", 2: "20.00", 9: "1.00"})
        assert b.sync()[0] == 1
        b.set({1: "1500.00"})
        assert b.sync()[0] == 1  # id 9 unknown: skipped, still a partial run
        rows = dict(pg.execute("SELECT id, balance::text FROM wallets").fetchall())
        assert rows == {1: "1500.0000", 2: "20.0000"}
    finally:
        server.stop()


def _as_an_older_version_left_it(pg, trusted_run_id: str) -> None:
    """The schema as the version before `balsync.redis_trust` left it: the server it
    trusted recorded on its last finished run."""
    pg.execute("DROP TABLE balsync.redis_trust")
    pg.execute(
        """UPDATE balsync.sync_runs SET redis_run_id = %s
           WHERE id = (SELECT max(id) FROM balsync.sync_runs)""",
        (trusted_run_id,),
    )


def test_an_upgrade_does_not_inherit_trust_given_without_evidence(bench, pg):
    """The older version trusted a Redis after any run that held nothing: after a restart
    to an empty Redis its run_id was recorded as trusted. Upgraded (init-db migrates that
    record), the first sync must still find every remembered key before trusting it."""
    bench.server.stop()
    bench.server.start()  # empty; the older version's next run trusted it
    _as_an_older_version_left_it(pg, bench.run_id())
    bench.tool.ok("init-db")
    with bench.client() as client:
        client.incrby(f"{bench.prefix}1", 5)
    code, data = bench.sync()
    assert (code, data["skipped"]) == (1, 1)
    assert balances(pg)[1] == "1500.00"
    assert bench.sync()[0] == 1  # still pending: keys 2 and 3 were never found


def test_an_upgrade_whose_redis_still_holds_every_key_is_trusted(bench, pg):
    """An ordinary upgrade: the first full sync finds every remembered key, confirms the
    migrated trust, and holds only that run's differing rows; the next run updates them."""
    _as_an_older_version_left_it(pg, bench.run_id())
    bench.tool.ok("init-db")
    bench.set({2: "25.00"})
    code, data = bench.sync()
    assert (code, data["skipped"]) == (1, 1)
    code, data = bench.sync()
    assert (code, data["updated"]) == (0, 1)
    assert balances(pg) == {1: "1500.00", 2: "25.00", 3: "3.00"}


def test_a_view_never_trusts_an_empty_redis_after_a_restart(bench, pg):
    """user_balances is synced (1500.00 for user 1). Redis restarts and comes back empty.
    A sync through `balances_v` (a view over user_balances) is pending (it inherits the
    table's memory through the key prefix), finds no key at all, and counts 0 missing
    against the view's own, empty memory: it trusts the empty Redis. The bot's INCRBY on
    the missing key makes 5; the next sync through the view overwrites 1500.00 with 5.00,
    exit 0. SPEC 7: a Redis whose identity changed is trusted only after a full scan that
    found every remembered key; this one found none of the 3."""
    pg.execute(
        "CREATE VIEW balances_v AS SELECT telegram_id, balance, updated_at FROM user_balances"
    )
    via_view = Balsync({**bench.tool.env, "BALSYNC_TABLE": "balances_v"})
    bench.server.stop()
    bench.server.start()  # empty: every key lost
    _code, data = bench.sync(tool=via_view)
    assert data["processed"] == 0
    bench.assert_rebuilt_balance_is_held(pg, tool=via_view)


def test_a_renamed_table_never_trusts_an_empty_redis_after_a_restart(bench, pg):
    """The same through a rename during the incident: Redis restarts empty, the table's
    own sync is pending (3 remembered keys missing). A DBA renames user_balances to
    balances (BALSYNC_TABLE follows). The first sync under the new name finds no key,
    counts 0 missing against the new name's empty memory, and trusts the empty Redis;
    the bot's rebuilt-from-zero 5 then overwrites 1500.00."""
    bench.server.stop()
    bench.server.start()
    _code, data = bench.sync()
    assert data["processed"] == 0
    pg.execute("ALTER TABLE user_balances RENAME TO balances")
    renamed = Balsync({**bench.tool.env, "BALSYNC_TABLE": "balances"})
    bench.sync(tool=renamed)  # no key: nothing held, "every remembered key found"
    bench.assert_rebuilt_balance_is_held(pg, tool=renamed, table="balances")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ValkeyCluster]:
    nodes = ValkeyCluster(tmp_path / "cluster").start()
    yield nodes
    nodes.stop()


def test_flushall_on_one_cluster_primary_is_not_trusted(initialized, cluster, key_prefix, pg):
    """Cluster of 3 primaries; 30 users synced. An operator runs FLUSHALL on one primary
    (not the one holding balsync's marker): its users' keys are gone, run_ids and marker
    unchanged. The bot's INCRBY rebuilds one of them from 0 to 5; the next sync overwrites
    the persisted balance with 5.00, exit 0. SPEC 7 / the guard: FLUSHALL is an identity
    change (the single-server case holds rows back, test_a_flushed_redis_is_not_trusted)."""
    tool = Balsync({**initialized.env, "BALSYNC_REDIS_URL": cluster.url})
    crc = RedisCluster.from_url(cluster.node_url(0))
    try:
        expected = {i: f"{1000 + i}.00" for i in range(1, 31)}
        for i, v in expected.items():
            crc.set(f"{key_prefix}{i}", v)
        code, data = _sync(tool)
        assert (code, data["inserted"]) == (0, 30)
        marker = trust_marker(key_prefix, "public.user_balances")
        assert crc.get(marker) is not None
        marker_port = crc.get_node_from_key(marker).port
        victim = next(i for i, p in enumerate(cluster.ports) if p != marker_port)
        with redis.Redis.from_url(cluster.node_url(victim)) as node:
            node.flushall()  # one primary's keys are gone; the marker lives elsewhere
        lost = [i for i in expected if not crc.exists(f"{key_prefix}{i}")]
        assert lost
        crc.incrby(f"{key_prefix}{lost[0]}", 5)  # the bot rebuilds from nothing
        code, data = _sync(tool)
        assert balances(pg)[lost[0]] == expected[lost[0]], (code, data)
        assert code == 1
    finally:
        crc.close()


def _sync(tool: Balsync, *args: str) -> tuple[int, dict[str, object]]:
    result = tool("sync", "--json", "--force", *args)
    assert result.stdout, result.stderr
    return result.exit_code, json.loads(result.stdout)


def test_a_restart_between_verification_and_trust_is_not_trusted(bench, pg, monkeypatch):
    """Redis restarted; the operator put the keys back (1500.00, 20.00, 3.00), so the next
    full sync finds every remembered key agreeing and `conclude` verifies the identity.
    Right then Redis restarts again and comes back empty (an OOM kill, a supervisor
    restart). `set_marker` retries until the new, empty server answers, writes the marker
    there, and its identity is recorded as trusted: a server no scan ever read. The bot's
    INCRBY makes 5 and the next sync overwrites 1500.00, exit 0. SPEC 7."""
    from balance_sync.stores.redis import RedisStore

    bench.server.stop()
    bench.server.start()
    bench.set(PERSISTED)  # everything back: this server earns trust by a full scan
    real = RedisStore.set_marker
    restarted: list[bool] = []

    def restart_first(self, marker, token):
        if not restarted:
            restarted.append(True)
            bench.server.stop()
            bench.server.start()  # empty again, a new run_id
        return real(self, marker, token)

    monkeypatch.setattr(RedisStore, "set_marker", restart_first)
    bench.sync()
    monkeypatch.undo()
    assert restarted
    bench.assert_rebuilt_balance_is_held(pg)


def test_a_snapshot_older_than_a_pending_runs_inserts_is_not_a_clean_failover(
    initialized, tmp_path, key_prefix, pg
):
    """A master with a replication backlog (a replica attached once). Users 1..3 synced and
    trusted. The master saves a snapshot (marker inside). The marker is then deleted (an
    operator cleaning `{balsync:*}` keys, or another installation's first run writing its
    own token there): the restart guard is pending. New user 9 (50.00) is inserted by the
    next sync, which holds user 2's change and stays pending, recording no offset. The
    master crashes and restarts from the snapshot: user 9 is gone, the old marker is back,
    replid2/second_repl_offset continue the trusted history past the recorded offset, so
    balsync calls it a clean failover and trusts it. The bot's INCRBY rebuilds user 9
    from 0 and the next sync overwrites the persisted 50.00 with 5.00, exit 0. SPEC 7."""
    master, replica = _with_backlog(tmp_path)
    try:
        client = redis.Redis.from_url(master.url, socket_timeout=30)
        tool = Balsync({**initialized.env, "BALSYNC_REDIS_URL": master.url})
        client.mset({f"{key_prefix}{i}": v for i, v in PERSISTED.items()})
        assert _sync(tool)[0] == 0
        client.set("balsync-test:other", "x")  # the bot's traffic moves the offset on
        client.save()  # the snapshot: the trusted marker is in it
        marker = trust_marker(key_prefix, "public.user_balances")
        assert client.delete(marker) == 1
        client.mset({f"{key_prefix}9": "50.00", f"{key_prefix}2": "25.00"})
        code, data = _sync(tool)  # pending: user 9 inserted, user 2 held
        assert (code, data["inserted"], data["skipped"]) == (1, 1, 1)
        assert balances(pg)[9] == "50.00"
        client.close()
        import signal

        master.stop(signal.SIGKILL)
        master.start()  # loads the snapshot: no user 9, the old marker
        client = redis.Redis.from_url(master.url)
        assert client.get(f"{key_prefix}9") is None
        code, data = _sync(tool)
        reason = pg.execute("SELECT reason FROM balsync.redis_trust").fetchone()
        assert reason is None or not str(reason[0]).startswith("failover"), reason
        client.incrby(f"{key_prefix}9", 5)  # the bot rebuilds user 9 from nothing
        code, data = _sync(tool)
        client.close()
        assert balances(pg)[9] == "50.00", (code, data)
        assert code == 1
    finally:
        replica.stop()
        master.stop()


def _until(predicate, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_accept_redis_restart_accepts_only_the_server_the_operator_saw(bench, pg):
    """Redis restarted (server X) and the guard holds user 1's 1400.00 against 1500.00.
    The operator checks X, decides Redis is right, and runs `sync --accept-redis-restart
    --wait 60` while the cron run still holds the table's lock. Meanwhile Redis restarts
    again and comes back empty (server Y). The waiting run accepts Y, which nobody looked
    at; the bot's INCRBY then rebuilds user 1 from 0 and the next cron sync overwrites
    1500.00 with 5.00, exit 0. SPEC 7: trusted only on evidence or by the operator, who
    accepted X, not Y."""
    import threading

    import psycopg

    bench.server.stop()
    bench.server.start()
    bench.set({1: "1400.00", 2: "20.00", 3: "3.00"})  # server X, inspected by the operator
    assert bench.sync()[0] == 1
    holder = psycopg.connect(bench.tool.env["BALSYNC_DATABASE_URL"], autocommit=True)
    holder.execute(
        "SELECT pg_advisory_lock(1650551923, to_regclass('public.user_balances')::oid::int4)"
    )

    def cron_run_finishes_while_redis_restarts() -> None:
        bench.server.stop()
        bench.server.start()  # server Y: empty
        holder.execute(
            "SELECT pg_advisory_unlock(1650551923, to_regclass('public.user_balances')::oid::int4)"
        )

    timer = threading.Timer(1.0, cron_run_finishes_while_redis_restarts)
    timer.start()
    try:
        bench.sync("--accept-redis-restart", "--wait", "60")
    finally:
        timer.join()
        holder.close()
    bench.assert_rebuilt_balance_is_held(pg)


def test_holds_a_restart_from_a_snapshot_older_than_the_last_sync(
    initialized, tmp_path, key_prefix, pg
):
    """With a backlog, Valkey reloads a stale RDB as replid2 = the old history and
    second_repl_offset = the snapshot's offset + 1: below the offset balsync recorded, so
    no 'clean failover'; the stale value is held."""
    import signal

    master, replica = _with_backlog(tmp_path)
    try:
        client = redis.Redis.from_url(master.url, socket_timeout=30)
        tool = Balsync({**initialized.env, "BALSYNC_REDIS_URL": master.url})
        client.mset({f"{key_prefix}{i}": v for i, v in PERSISTED.items()})
        assert _sync(tool)[0] == 0
        client.save()
        client.set(f"{key_prefix}1", "1600.00")
        assert _sync(tool)[0] == 0
        client.close()
        master.stop(signal.SIGKILL)
        master.start()
        code, _ = _sync(tool)
        assert code == 1
        assert balances(pg)[1] == "1600.00"
    finally:
        replica.stop()
        master.stop()


def test_holds_another_installation_overwriting_the_marker(bench, pg, database_url):
    """A second balsync (another database, same prefix and table name) trusts the same
    Redis and overwrites the marker: the first one is pending and holds, never trusts."""
    import psycopg
    from psycopg import sql

    from tests.helpers import with_database

    other = with_database(database_url, "balsync_other_install")
    admin = psycopg.connect(database_url, autocommit=True)
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS balsync_other_install"))
    admin.execute(sql.SQL("CREATE DATABASE balsync_other_install"))
    try:
        second = Balsync({**bench.tool.env, "BALSYNC_DATABASE_URL": other})
        second.ok("init-db")
        assert bench.sync(tool=second)[0] == 0  # its first run: trusts, new marker token
        bench.set({1: "1.00"})
        code, _ = bench.sync()
        assert code == 1  # held: the marker is not ours
        assert balances(pg)[1] == "1500.00"
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS balsync_other_install WITH (FORCE)"))
        admin.close()


def _with_backlog(tmp_path: Path) -> tuple[ValkeyServer, ValkeyServer]:
    """A master that once had a replica in sync (so it keeps a replication backlog, and
    reloads a snapshot as a continuation of its history), the replica stopped again."""
    master = ValkeyServer(tmp_path / "master").start()
    replica = ValkeyServer(
        tmp_path / "replica", extra=("--replicaof", "127.0.0.1", str(master.port))
    ).start()
    with redis.Redis.from_url(replica.url) as r:
        _until(lambda: r.info("replication").get("master_link_status") == "up")
    with redis.Redis.from_url(master.url, socket_timeout=30) as client:
        client.set("balsync-test:probe", "1")
        assert replicated(client)  # the backlog exists from now on
    replica.stop()
    return master, replica
