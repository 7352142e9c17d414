"""`balsync health`: every check, every flag, every exit code, on real servers.

Checks that need a server configured otherwise (eviction policy, maxmemory, ACL, a restart,
persistence) run against a Valkey of the test's own; the shared one is never reconfigured.
The shared Redis keeps nothing on disk, so its persistence check fails: a real money risk.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
import redis

from balance_sync.ops import health
from balance_sync.ops.health import format_duration
from tests.helpers import Balsync
from tests.support.devservers import ValkeyServer, free_port

CHECKS = [
    "redis",
    "postgres",
    "schema",
    "last_sync",
    "eviction_policy",
    "key_ttl",
    "invalid_values",
    "memory",
    "redis_restart",
    "persistence",
    "bookkeeping",
    "sync_lock",
]
FAST = ("--retry-timeout", "0.3")
TABLE = "user_balances"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[ValkeyServer]:
    """A Valkey of this test's own, free to reconfigure and restart (nothing on disk)."""
    server = ValkeyServer(tmp_path / "valkey").start()
    yield server
    server.stop()


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[ValkeyServer]:
    """A Valkey of this test's own that keeps an append-only file, fsynced every second."""
    server = ValkeyServer(
        tmp_path / "durable", extra=("--appendonly", "yes", "--appendfsync", "everysec")
    ).start()
    yield server
    server.stop()


def failing(checks: dict[str, Any]) -> set[str]:
    """The names of the checks that failed."""
    return {name for name, check in checks.items() if not check["ok"]}


def health_json(balsync: Balsync, *args: str, env: dict[str, str] | None = None) -> Any:
    """Run `balsync health --json`; return (exit code, report, checks by name)."""
    result = balsync("health", "--json", *args, env=env)
    report = json.loads(result.stdout)
    assert [check["name"] for check in report["checks"]] == CHECKS
    return result.exit_code, report, {check["name"]: check for check in report["checks"]}


def insert_run(
    pg: psycopg.Connection[tuple[object, ...]],
    status: str,
    finished_ago: str,
    table: str = "public.user_balances",
) -> None:
    """A run record made by hand, finished `finished_ago` (an interval) before now."""
    pg.execute(
        """INSERT INTO balsync.sync_runs
               (target_table, key_prefix, started_at, finished_at, status, duration_s,
                host, pid, version)
           VALUES (%s, 'balance:', now() - %s::interval - interval '1 second',
                   now() - %s::interval, %s, 1.0, 'elsewhere', 1, 'test')""",
        (table, finished_ago, finished_ago, status),
    )


def test_after_a_partial_sync_only_the_shared_redis_persistence_fails(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """After a sync (partial counts as success) every check passes but persistence, since
    the shared Redis keeps nothing on disk: degraded, exit 1 (a durable one: see below)."""
    rds.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "oops"})
    assert initialized("sync").exit_code == 1
    rds.delete(f"{key_prefix}2")  # an invalid value left in Redis is a risk of its own
    code, report, checks = health_json(initialized)
    # The shared Redis keeps nothing on disk: that, and only that, is reported.
    assert failing(checks) == {"persistence"}, report
    assert (code, report["status"]) == (1, "degraded")
    assert checks["redis"]["latency_ms"] > 0
    assert checks["postgres"]["latency_ms"] > 0
    assert "role master" in checks["redis"]["detail"]
    assert "PostgreSQL" in checks["postgres"]["detail"]
    assert all(checks[name]["latency_ms"] is None for name in CHECKS[2:])
    assert "partial" in checks["last_sync"]["detail"]
    assert "none of 1 sampled balance keys" in checks["key_ttl"]["detail"]
    assert (
        "all 1 sampled balance keys hold values a sync persists"
        in (checks["invalid_values"]["detail"])
    )
    assert "noeviction" in checks["eviction_policy"]["detail"]
    assert "no restart" in checks["redis_restart"]["detail"]
    assert f"no run holds the lock on {TABLE}" == checks["sync_lock"]["detail"]


def test_human_output_is_a_table_of_checks(initialized: Balsync) -> None:
    """Without --json health prints a table with one row per check and the status."""
    initialized.ok("sync")
    result = initialized("health")
    assert result.exit_code == 1  # the shared Redis keeps nothing on disk
    assert "Health: degraded" in result.stdout
    for name in CHECKS:
        assert name in result.stdout


def test_missing_schema_is_degraded_and_health_creates_nothing(
    balsync: Balsync, pg: psycopg.Connection[tuple[object, ...]]
) -> None:
    """Before init-db: schema fails, the checks needing it say why, exit 1, nothing created."""
    code, report, checks = health_json(balsync)
    assert code == 1
    assert report["status"] == "degraded"
    assert not checks["schema"]["ok"]
    assert "init-db" in checks["schema"]["detail"]
    assert checks["last_sync"]["detail"].startswith("not checked: balsync's schema is missing")
    assert checks["redis"]["ok"]
    assert checks["postgres"]["ok"]
    row = pg.execute("SELECT to_regnamespace('balsync'), to_regclass('user_balances')").fetchone()
    assert row == (None, None)


def test_missing_target_table_fails_the_schema_check(initialized: Balsync) -> None:
    """A --table that does not exist fails the schema check, naming the table."""
    code, _, checks = health_json(initialized, "--table", "no_such_table")
    assert code == 1
    assert not checks["schema"]["ok"]
    assert "no_such_table" in checks["schema"]["detail"]


def test_no_successful_sync_yet_is_degraded(
    initialized: Balsync, pg: psycopg.Connection[tuple[object, ...]]
) -> None:
    """A failed run is not a successful sync: last_sync fails when nothing else is recorded."""
    insert_run(pg, "failed", "1 minute")
    code, _, checks = health_json(initialized)
    assert code == 1
    assert not checks["last_sync"]["ok"]
    assert "no successful sync" in checks["last_sync"]["detail"]
    assert "no successful sync to compare with" in checks["redis_restart"]["detail"]


def test_stale_last_sync_is_degraded(
    initialized: Balsync, pg: psycopg.Connection[tuple[object, ...]]
) -> None:
    """A last success 3 h ago is older than the default --max-age of 2 h: degraded."""
    insert_run(pg, "success", "3 hours")
    insert_run(pg, "failed", "1 minute")  # a newer failure does not count as a sync
    code, report, checks = health_json(initialized)
    assert code == 1
    assert report["status"] == "degraded"
    assert not checks["last_sync"]["ok"]
    assert "3.0 h ago" in checks["last_sync"]["detail"]
    assert "--max-age 2.0 h" in checks["last_sync"]["detail"]


def test_max_age_flag_sets_the_limit(
    initialized: Balsync, pg: psycopg.Connection[tuple[object, ...]]
) -> None:
    """--max-age moves the limit both ways: 4 h accepts a 3 h old sync, 0 rejects a fresh one."""
    insert_run(pg, "success", "3 hours")
    _, _, checks = health_json(initialized, "--max-age", "14400")
    assert checks["last_sync"]["ok"], checks["last_sync"]
    initialized.ok("sync", "--force")
    code, _, checks = health_json(initialized, "--max-age", "0")
    assert code == 1
    assert not checks["last_sync"]["ok"]
    assert initialized("health", "--max-age", "-1").exit_code == 2


def test_balance_keys_with_a_ttl_are_reported(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """Balance keys carrying a TTL are counted in the sample and named: degraded."""
    rds.mset({f"{key_prefix}{i}": "1.00" for i in range(1, 6)})
    rds.expire(f"{key_prefix}2", 3600)
    rds.expire(f"{key_prefix}4", 3600)
    initialized.ok("sync")
    code, _, checks = health_json(initialized)
    assert code == 1
    assert not checks["key_ttl"]["ok"]
    assert "2 of 5 sampled balance keys carry a TTL" in checks["key_ttl"]["detail"]
    assert f"{key_prefix}2" in checks["key_ttl"]["detail"]


def test_values_the_sync_never_persists_are_a_money_risk(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """A float tail, a third decimal left by INCRBYFLOAT and a hash are counted
    by the sample and named, with what to do: degraded."""
    rds.mset({f"{key_prefix}{i}": "1.00" for i in range(1, 6)})
    rds.set(f"{key_prefix}6", "0.30000000000000004")  # 0.1 + 0.2 in a float, written back
    rds.set(f"{key_prefix}10", "1.10")
    rds.incrbyfloat(f"{key_prefix}10", 0.001)  # 1.101
    rds.hset(f"{key_prefix}8", "balance", "1")
    rds.set(f"{key_prefix}9", "-5.00")  # --allow-negative persists it: not named
    initialized("sync")
    code, _, checks = health_json(initialized)
    assert code == 1
    check = checks["invalid_values"]
    assert not check["ok"]
    detail = check["detail"]
    assert "3 of 9 sampled balance keys hold values the sync will never persist" in detail
    assert f"{key_prefix}6' = '0.30000000000000004'" in detail
    assert f"{key_prefix}10' = '1.101'" in detail
    assert f"{key_prefix}8' = -: a hash, not a string" in detail
    assert "INCRBYFLOAT" in detail
    assert "balsync skipped" in detail
    assert failing(checks) == {"invalid_values", "persistence"}


def test_the_value_sample_reads_in_the_value_format(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """In cents a whole number is valid and a decimal point is not."""
    rds.mset({f"{key_prefix}1": "150000", f"{key_prefix}2": "1.50"})
    initialized("sync", "--value-format", "cents")
    _, _, checks = health_json(initialized, "--value-format", "cents")
    assert "1 of 2 sampled" in checks["invalid_values"]["detail"]
    assert "whole number of cents" in checks["invalid_values"]["detail"]


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        ("allkeys-lru", "may evict any key"),
        ("volatile-lru", "keys that carry a TTL"),
        ("volatile-ttl", "keys that carry a TTL"),
    ],
)
def test_an_evicting_policy_is_degraded(
    initialized: Balsync, own_redis: ValkeyServer, policy: str, words: str
) -> None:
    """Any maxmemory-policy but noeviction is a risk; volatile-* is said to hit TTL keys only."""
    admin = redis.Redis.from_url(own_redis.url)
    admin.config_set("maxmemory-policy", policy)
    env = {"BALSYNC_REDIS_URL": own_redis.url}
    code, _, checks = health_json(initialized, env=env)
    assert code == 1
    check = checks["eviction_policy"]
    assert not check["ok"]
    assert policy in check["detail"]
    assert words in check["detail"]
    assert "no maxmemory is set yet" in check["detail"]
    assert "read from INFO" not in check["detail"]


def test_policy_falls_back_to_info_when_acl_forbids_config(
    initialized: Balsync, own_redis: ValkeyServer
) -> None:
    """A user without CONFIG still gets the policy, from INFO, and is told where it came from."""
    admin = redis.Redis.from_url(own_redis.url)
    admin.config_set("maxmemory-policy", "allkeys-lfu")
    admin.acl_setuser(
        "monitor", enabled=True, passwords=["+s3cret"], keys=["*"], commands=["+@all", "-config"]
    )
    url = f"redis://monitor:s3cret@127.0.0.1:{own_redis.port}/0"
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis.Redis.from_url(url).config_get("maxmemory-policy")
    code, _, checks = health_json(initialized, env={"BALSYNC_REDIS_URL": url})
    assert code == 1
    detail = checks["eviction_policy"]["detail"]
    assert "allkeys-lfu" in detail
    assert "read from INFO: CONFIG GET is not permitted" in detail
    assert "s3cret" not in json.dumps(checks)


def test_memory_near_maxmemory_is_degraded(initialized: Balsync, own_redis: ValkeyServer) -> None:
    """used_memory above 90% of maxmemory fails the memory check; no limit passes it."""
    env = {"BALSYNC_REDIS_URL": own_redis.url}
    _, _, checks = health_json(initialized, env=env)
    assert checks["memory"]["ok"]
    assert "no maxmemory limit" in checks["memory"]["detail"]
    admin = redis.Redis.from_url(own_redis.url)
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", used)
    code, _, checks = health_json(initialized, env=env)
    assert code == 1
    assert not checks["memory"]["ok"]
    assert "near the limit, where Redis refuses writes" in checks["memory"]["detail"]
    assert checks["eviction_policy"]["ok"]
    admin.config_set("maxmemory", used * 4)
    _, _, checks = health_json(initialized, env=env)
    assert checks["memory"]["ok"], checks["memory"]


def test_redis_restart_after_the_last_sync_is_degraded(
    initialized: Balsync, own_redis: ValkeyServer
) -> None:
    """A Redis restarted after the last successful sync is reported with its new run_id."""
    env = {"BALSYNC_REDIS_URL": own_redis.url}
    admin = redis.Redis.from_url(own_redis.url)
    admin.set(f"{initialized.env['BALSYNC_KEY_PREFIX']}1", "5.00")
    initialized.ok("sync", env=env)
    _, _, checks = health_json(initialized, env=env)
    assert checks["redis_restart"]["ok"], checks["redis_restart"]
    time.sleep(1.5)  # uptime counts whole seconds: the restart must be clearly later
    own_redis.stop()
    own_redis.start()
    run_id = redis.Redis.from_url(own_redis.url).info("server")["run_id"]
    code, report, checks = health_json(initialized, env=env)
    assert code == 1
    assert report["status"] == "degraded"
    assert not checks["redis_restart"]["ok"]
    assert "restarted" in checks["redis_restart"]["detail"]
    assert run_id in checks["redis_restart"]["detail"]


def test_redis_unreachable_exits_3_with_the_report(initialized: Balsync) -> None:
    """Redis down: exit 3, status unhealthy, the checks needing Redis say not checked."""
    env = {"BALSYNC_REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0"}
    result = initialized("health", "--json", *FAST, env=env)
    assert result.exit_code == 3
    report = json.loads(result.stdout)
    checks = {check["name"]: check for check in report["checks"]}
    assert report["status"] == "unhealthy"
    assert not checks["redis"]["ok"]
    assert "unavailable" in checks["redis"]["detail"]
    assert "hunter2" not in result.stdout
    for name in ("eviction_policy", "key_ttl", "invalid_values", "memory", "redis_restart"):
        assert checks[name] == {
            "name": name,
            "ok": False,
            "detail": "not checked: Redis is unreachable",
            "latency_ms": None,
        }
    assert checks["postgres"]["ok"]
    assert checks["schema"]["ok"]


def test_postgres_unreachable_exits_4_with_the_report(initialized: Balsync) -> None:
    """PostgreSQL down: exit 4, status unhealthy, Redis checks still run."""
    env = {"BALSYNC_DATABASE_URL": f"postgresql://balsync@127.0.0.1:{free_port()}/app"}
    result = initialized("health", "--json", *FAST, env=env)
    assert result.exit_code == 4
    report = json.loads(result.stdout)
    checks = {check["name"]: check for check in report["checks"]}
    assert report["status"] == "unhealthy"
    assert not checks["postgres"]["ok"]
    assert "unavailable" in checks["postgres"]["detail"]
    assert checks["schema"]["detail"] == "not checked: PostgreSQL is unreachable"
    assert checks["redis"]["ok"]
    assert checks["eviction_policy"]["ok"]


def test_both_unreachable_exits_3(balsync: Balsync) -> None:
    """With both stores down Redis decides the exit code: 3."""
    env = {
        "BALSYNC_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "BALSYNC_DATABASE_URL": f"postgresql://balsync@127.0.0.1:{free_port()}/app",
    }
    result = balsync("health", *FAST, env=env)
    assert result.exit_code == 3
    assert "Health: unhealthy" in result.stdout


def test_quiet_is_silent_when_healthy_and_speaks_on_stderr_otherwise(
    balsync: Balsync, durable_redis: ValkeyServer
) -> None:
    """--quiet: nothing when healthy; the table on stderr, stdout empty, when not."""
    balsync.env["BALSYNC_REDIS_URL"] = durable_redis.url
    degraded = balsync("health", "--quiet")
    assert degraded.exit_code == 1
    assert degraded.stdout == ""
    assert "Health: degraded" in degraded.stderr
    balsync.ok("init-db")
    balsync.ok("sync")
    healthy = balsync("health", "-q")
    assert healthy.exit_code == 0
    assert (healthy.stdout, healthy.stderr) == ("", "")


def test_health_changes_nothing(
    initialized: Balsync,
    rds: redis.Redis,
    key_prefix: str,
    pg: psycopg.Connection[tuple[object, ...]],
) -> None:
    """health writes no run record, no row, and leaves keys and their TTLs as they were."""
    rds.set(f"{key_prefix}1", "1.00")
    rds.set(f"{key_prefix}2", "2.00", ex=3600)
    initialized("health")
    assert pg.execute("SELECT count(*) FROM balsync.sync_runs").fetchone() == (0,)
    assert pg.execute("SELECT count(*) FROM user_balances").fetchone() == (0,)
    assert rds.ttl(f"{key_prefix}1") == -1
    assert 0 < rds.ttl(f"{key_prefix}2") <= 3600


def test_help_has_an_example() -> None:
    """health --help documents the exit codes and shows an example."""
    from click.testing import CliRunner

    from balance_sync.cli import cli

    text = CliRunner().invoke(cli, ["health", "--help"]).stdout
    assert "Examples:" in text
    assert "--max-age" in text
    assert "3 Redis unreachable" in text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(42, "42 s"), (600, "10 min"), (3 * 3600, "3.0 h"), (3 * 86400, "3.0 d")],
)
def test_format_duration_reads_like_a_person(seconds: float, text: str) -> None:
    """Durations in details are rounded to the unit a person would use."""
    assert format_duration(seconds) == text


def test_a_check_that_breaks_fails_without_stopping_the_others(
    initialized: Balsync, own_redis: ValkeyServer
) -> None:
    """A Redis user denied INFO: the redis check fails with the reason, the rest still run."""
    admin = redis.Redis.from_url(own_redis.url)
    admin.acl_setuser(
        "noinfo", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-info"]
    )
    env = {"BALSYNC_REDIS_URL": f"redis://noinfo:pw@127.0.0.1:{own_redis.port}/0"}
    code, report, checks = health_json(initialized, env=env)
    assert code == 1
    assert report["status"] == "degraded"
    assert checks["redis"]["detail"].startswith("check failed: NoPermissionError")
    assert checks["memory"]["detail"] == "not checked: Redis did not describe itself (INFO failed)"
    assert checks["postgres"]["ok"]


def test_a_failover_is_seen_by_its_run_id(
    initialized: Balsync, pg: psycopg.Connection[tuple[object, ...]], rds: redis.Redis
) -> None:
    """A Redis whose run_id is not the one the last sync trusted (a failover) is degraded."""
    insert_run(pg, "success", "0 seconds")
    pg.execute(
        "INSERT INTO balsync.redis_trust VALUES ('public.user_balances', %s, 'test')",
        ("f" * 40,),
    )
    code, _, checks = health_json(initialized)
    assert code == 1
    detail = checks["redis_restart"]["detail"]
    assert not checks["redis_restart"]["ok"]
    assert f"not {'f' * 40}" in detail
    assert str(rds.info("server")["run_id"]) in detail
    assert "failed over" in detail


# -- persistence: a Redis that keeps nothing loses every balance since the last sync -----------


def test_a_redis_that_keeps_nothing_is_a_money_risk_with_what_to_set(
    initialized: Balsync, own_redis: ValkeyServer
) -> None:
    """Neither AOF nor `save` rules: persistence fails, saying what a restart loses and what
    to set (appendonly yes with appendfsync everysec, or save rules): degraded, exit 1."""
    code, report, checks = health_json(initialized, env={"BALSYNC_REDIS_URL": own_redis.url})
    assert (code, report["status"]) == (1, "degraded")
    detail = checks["persistence"]["detail"]
    assert not checks["persistence"]["ok"]
    assert "no AOF and no `save` rules: it keeps nothing on disk" in detail
    assert "a restart loses every balance written since the last sync" in detail
    assert "`appendonly yes` with `appendfsync everysec`" in detail
    assert "`save` rules" in detail


def test_a_redis_with_aof_on_is_healthy(
    initialized: Balsync, durable_redis: ValkeyServer, key_prefix: str
) -> None:
    """AOF on with working writes is enough: persistence passes, and health is healthy."""
    env = {"BALSYNC_REDIS_URL": durable_redis.url}
    redis.Redis.from_url(durable_redis.url).set(f"{key_prefix}1", "1.00")
    initialized.ok("sync", env=env)
    code, report, checks = health_json(initialized, env=env)
    assert (code, report["status"]) == (0, "healthy"), report
    assert checks["persistence"]["detail"] == "AOF on, appendfsync everysec"


def test_rdb_snapshots_more_often_than_syncs_pass_and_rarer_ones_fail(
    initialized: Balsync, tmp_path: Path, pg: psycopg.Connection[tuple[object, ...]]
) -> None:
    """`save` rules are compared with the sync interval the run records show: a 60 s rule
    under 5-minute syncs passes, a 3600 s rule alone fails, naming the rule."""
    server = ValkeyServer(tmp_path / "rdb", extra=("--save", "60 1")).start()
    try:
        env = {"BALSYNC_REDIS_URL": server.url}
        insert_run(pg, "success", "10 minutes")
        insert_run(pg, "success", "5 minutes")
        insert_run(pg, "success", "0 seconds")
        code, _, checks = health_json(initialized, env=env)
        assert checks["persistence"]["ok"], checks["persistence"]
        assert checks["persistence"]["detail"].startswith("no AOF; save 60 1, last saved")
        redis.Redis.from_url(server.url).config_set("save", "3600 1")
        code, _, checks = health_json(initialized, env=env)
        assert code == 1
        detail = checks["persistence"]["detail"]
        assert "no AOF; save 3600 1" in detail
        assert "no `save` rule snapshots within the sync interval (every 5 min" in detail
    finally:
        server.stop()


def test_a_failed_rdb_snapshot_is_degraded(initialized: Balsync, tmp_path: Path) -> None:
    """A server whose last BGSAVE failed (its `dir` gone) is named as not persisting."""
    folder = tmp_path / "vanishing"
    # With the default `stop-writes-on-bgsave-error yes` the server then refuses even PING
    # (MISCONF), and the redis check fails with that message instead.
    server = ValkeyServer(
        folder, extra=("--save", "60 1", "--stop-writes-on-bgsave-error", "no")
    ).start()
    try:
        admin = redis.Redis.from_url(server.url)
        admin.set("balsync-test:probe", "1")
        shutil.rmtree(folder)  # the server works in there: the snapshot has nowhere to go
        admin.bgsave()
        deadline = time.monotonic() + 20
        while admin.info("persistence")["rdb_last_bgsave_status"] != "err":
            assert time.monotonic() < deadline, admin.info("persistence")
            time.sleep(0.1)
        code, _, checks = health_json(initialized, env={"BALSYNC_REDIS_URL": server.url})
        assert code == 1
        detail = checks["persistence"]["detail"]
        assert not checks["persistence"]["ok"]
        assert "the last RDB snapshot failed (rdb_last_bgsave_status err)" in detail
        assert "permissions of its `dir`" in detail
    finally:
        # A server with save rules refuses to shut down when its final snapshot fails.
        redis.Redis.from_url(server.url).config_set("save", "")
        server.stop()


def test_without_config_get_persistence_is_read_from_info(
    initialized: Balsync, own_redis: ValkeyServer
) -> None:
    """A user denied CONFIG: no snapshot since start and unsaved changes still tell that
    the server keeps nothing."""
    admin = redis.Redis.from_url(own_redis.url)
    admin.acl_setuser(
        "monitor", enabled=True, passwords=["+s3cret"], keys=["*"], commands=["+@all", "-config"]
    )
    admin.set("balsync-test:probe", "1")
    url = f"redis://monitor:s3cret@127.0.0.1:{own_redis.port}/0"
    code, _, checks = health_json(initialized, env={"BALSYNC_REDIS_URL": url})
    assert code == 1
    detail = checks["persistence"]["detail"]
    assert "no AOF and no RDB snapshot since the server started" in detail
    assert "CONFIG GET is not permitted" in detail


# -- the table's lock, held by a session that makes no progress --------------------------------

LOCK = "SELECT pg_advisory_lock(1650551923, to_regclass('public.user_balances')::oid::int4)"


def insert_running_run(pg: psycopg.Connection[tuple[object, ...]], started_ago: str) -> int:
    """A run record still marked running, started `started_ago` before now."""
    row = pg.execute(
        """INSERT INTO balsync.sync_runs (target_table, key_prefix, started_at, status,
                                          host, pid, version)
           VALUES ('public.user_balances', 'balance:', now() - %s::interval, 'running',
                   'deadhost', 4242, 'test')
           RETURNING id""",
        (started_ago,),
    ).fetchone()
    assert row is not None
    return int(cast(int, row[0]))  # sync_runs.id: a bigint


def test_a_lock_held_without_progress_is_degraded_naming_the_backend(
    initialized: Balsync,
    database_url: str,
    pg: psycopg.Connection[tuple[object, ...]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The table's lock held by a session quiet for longer than the limit, with a running
    run record: sync_lock fails, naming the run, its host and pid, and the backend to
    terminate; once terminated, the lock is free and the check passes."""
    with psycopg.connect(database_url, autocommit=True, application_name="balsync") as holder:
        holder.execute(LOCK)
        run_id = insert_running_run(pg, "1 hour")
        pid = holder.info.backend_pid
        _, _, checks = health_json(initialized)
        assert checks["sync_lock"]["ok"], checks["sync_lock"]
        assert f"run {run_id} (host deadhost, pid 4242" in checks["sync_lock"]["detail"]
        assert "last active" in checks["sync_lock"]["detail"]

        monkeypatch.setattr(health, "STALE_LOCK_AFTER", 0.5)
        time.sleep(1.2)
        code, _, checks = health_json(initialized)
        assert code == 1
        detail = checks["sync_lock"]["detail"]
        assert not checks["sync_lock"]["ok"]
        assert f"run {run_id} (host deadhost, pid 4242, started 60 min ago)" in detail
        assert f"backend pid {pid} (balsync from 127.0.0.1, idle)" in detail
        assert "has done nothing for" in detail
        assert "process 4242 on host deadhost" in detail
        assert f"SELECT pg_terminate_backend({pid})" in detail

        pg.execute("SELECT pg_terminate_backend(%s)", (pid,))
    _, _, checks = health_json(initialized)
    assert checks["sync_lock"] == {
        "name": "sync_lock",
        "ok": True,
        "detail": f"no run holds the lock on {TABLE}",
        "latency_ms": None,
    }


def test_without_config_get_snapshots_taken_recently_pass(
    initialized: Balsync, tmp_path: Path
) -> None:
    """A user denied CONFIG, on a server that snapshots: INFO's count of snapshots and the
    age of the last one say it persists."""
    server = ValkeyServer(tmp_path / "snapshots", extra=("--save", "60 1")).start()
    try:
        admin = redis.Redis.from_url(server.url)
        admin.acl_setuser(
            "monitor", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-config"]
        )
        admin.set("balsync-test:probe", "1")
        admin.bgsave()
        deadline = time.monotonic() + 20
        while admin.info("persistence")["rdb_changes_since_last_save"]:
            assert time.monotonic() < deadline, admin.info("persistence")
            time.sleep(0.1)
        url = f"redis://monitor:pw@127.0.0.1:{server.port}/0"
        _, _, checks = health_json(initialized, env={"BALSYNC_REDIS_URL": url})
        assert checks["persistence"]["ok"], checks["persistence"]
        assert checks["persistence"]["detail"].startswith(
            "no AOF; 1 RDB snapshots since the server started (read from INFO), last saved"
        )
    finally:
        server.stop()
