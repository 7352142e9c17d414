"""Redis Cluster: every primary scanned, keys read by slot, the same result as one server.

The cluster (three primaries, no replicas) belongs to this module; each test writes under its
own key prefix and syncs into its own database.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import redis
from redis.cluster import RedisCluster

from balance_sync.settings import resolve_settings
from balance_sync.stores.redis import RedisStore, TrackedWrites, adjustment_key, dirty_keys
from balance_sync.stores.redis.topology import Cluster
from balance_sync.writer import BalanceMissing, BalanceWriter
from tests import helpers
from tests.helpers import Balsync, Servers, balances
from tests.support.devservers import ValkeyCluster, free_port

pytestmark = pytest.mark.slow

Conn = psycopg.Connection[tuple[object, ...]]
COUNTERS = ("status", "processed", "inserted", "updated", "unchanged", "skipped", "invalid")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    """Three Valkey primaries sharing the 16384 slots."""
    nodes = ValkeyCluster(tmp_path_factory.mktemp("cluster")).start()
    yield nodes
    nodes.stop()


@pytest.fixture
def crc(cluster: ValkeyCluster) -> Iterator[RedisCluster]:
    """A cluster client for arranging and checking keys."""
    client = RedisCluster.from_url(cluster.node_url(0))
    yield client
    client.close()


@pytest.fixture
def cbalsync(initialized: Balsync, cluster: ValkeyCluster) -> Balsync:
    """The CLI after init-db, pointed at the cluster with a redis+cluster:// URL."""
    return Balsync({**initialized.env, "BALSYNC_REDIS_URL": cluster.url})


def sync_json(balsync: Balsync, *args: str) -> tuple[int, dict[str, Any]]:
    result = balsync("sync", "--json", "--force", *args)
    assert result.stdout, result.stderr
    return result.exit_code, json.loads(result.stdout)


def counters(data: Mapping[str, Any]) -> dict[str, Any]:
    return {name: data[name] for name in COUNTERS}


def dataset(prefix: str, size: int, seed: int = 7) -> tuple[dict[str, str], dict[int, str]]:
    """`size` valid balances plus invalid ones: (what to SET, the rows a sync must write)."""
    rng = random.Random(seed)
    valid = {i: f"{rng.randint(0, 10**7)}.{rng.randint(0, 99):02d}" for i in range(1, size + 1)}
    keys = {f"{prefix}{i}": v for i, v in valid.items()}
    keys.update(
        {
            f"{prefix}abc": "1.00",  # not an id
            f"{prefix}0": "1.00",  # id out of range
            f"{prefix}007": "1.00",  # leading zero
            f"{prefix}{size + 1}": "1.234",  # three decimals
            f"{prefix}{size + 2}": "NaN",
            f"{prefix}{size + 3}": " 5",
            f"{prefix}{size + 4}": "-1.00",  # negative without --allow-negative
        }
    )
    expected = {i: str(Decimal(v).quantize(Decimal("0.01"))) for i, v in valid.items()}
    return keys, expected


def seed(client: redis.Redis | RedisCluster, keys: Mapping[str, str], prefix: str) -> None:
    """SET every key, plus three keys of other types (invalid records)."""
    helpers.seed(client, "", keys)
    client.rpush(f"{prefix}900000001", "1")
    client.hset(f"{prefix}900000002", "balance", "1")
    client.sadd(f"{prefix}900000003", "1")


def owner(client: RedisCluster, key: str) -> str:
    """The name (host:port) of the primary that holds `key`."""
    node = client.nodes_manager.get_node_from_slot(client.keyslot(key))
    return str(node.name)


def one_key_per_node(client: RedisCluster, prefix: str, ids: Iterator[int]) -> dict[str, int]:
    """An id whose key lives on each primary, by node name."""
    found: dict[str, int] = {}
    for telegram_id in ids:
        found.setdefault(owner(client, f"{prefix}{telegram_id}"), telegram_id)
        if len(found) == 3:
            return found
    raise AssertionError("some primary holds none of the keys")


def test_sync_reads_every_primary_and_matches_a_single_server(
    cbalsync: Balsync,
    crc: RedisCluster,
    rds: redis.Redis,
    servers: Servers,
    key_prefix: str,
    pg: Conn,
) -> None:
    """30 000 keys spread over all primaries: exactly the valid ones inserted, the same
    counters as a single server with the same data; a rerun updates 0; one changed key on
    each node updates exactly those."""
    keys, expected = dataset(key_prefix, 30_000)
    seed(crc, keys, key_prefix)
    per_node: dict[str, int] = {}
    for key in keys:
        per_node[owner(crc, key)] = per_node.get(owner(crc, key), 0) + 1
    assert len(per_node) == 3
    assert min(per_node.values()) > len(keys) // 4  # every primary holds its share

    code, data = sync_json(cbalsync)
    assert (code, data["status"]) == (1, "partial")
    assert data["inserted"] == len(expected)
    assert data["invalid"] == data["skipped"] == 10  # 7 bad records and 3 of other types
    assert balances(pg) == expected  # every row compared

    seed(rds, keys, key_prefix)  # the same data on one server
    single = Balsync({**cbalsync.env, "BALSYNC_TABLE": "single.user_balances"})
    single.ok("init-db")
    code_single, data_single = sync_json(single, "--redis-url", servers.redis)
    assert code_single == code
    assert counters(data_single) == counters(data)
    assert balances(pg, "single.user_balances") == expected

    code, again = sync_json(cbalsync)
    assert (code, again["inserted"], again["updated"]) == (1, 0, 0)
    assert again["unchanged"] == len(expected)

    changed = one_key_per_node(crc, key_prefix, iter(expected))
    for telegram_id in changed.values():
        crc.set(f"{key_prefix}{telegram_id}", "123456.78")
    code, data = sync_json(cbalsync)
    assert (code, data["updated"], data["inserted"]) == (1, 3, 0)
    rows = balances(pg)
    assert {i for i, v in rows.items() if v == "123456.78"} == set(changed.values())
    assert {i: v for i, v in rows.items() if i not in changed.values()} == {
        i: v for i, v in expected.items() if i not in changed.values()
    }


@pytest.mark.parametrize(
    ("args", "extra_env"),
    [
        (("--cluster",), {}),
        ((), {"BALSYNC_REDIS_CLUSTER": "1"}),
        ((), {"BALSYNC_REDIS_CLUSTER": "yes"}),
    ],
    ids=["flag", "env-1", "env-yes"],
)
def test_cluster_flag_or_env_with_a_plain_url_works_the_same(
    initialized: Balsync,
    cluster: ValkeyCluster,
    crc: RedisCluster,
    key_prefix: str,
    pg: Conn,
    args: tuple[str, ...],
    extra_env: dict[str, str],
) -> None:
    """--cluster (or BALSYNC_REDIS_CLUSTER) with redis://host:port/0 is cluster mode."""
    keys, expected = dataset(key_prefix, 500)
    seed(crc, keys, key_prefix)
    tool = Balsync({**initialized.env, **extra_env, "BALSYNC_REDIS_URL": cluster.node_url(1)})
    code, data = sync_json(tool, *args)
    assert (code, data["inserted"], data["invalid"]) == (1, len(expected), 10)
    assert balances(pg) == expected


def test_plain_url_to_a_cluster_without_cluster_mode_is_exit_2(
    initialized: Balsync, cluster: ValkeyCluster, crc: RedisCluster, key_prefix: str
) -> None:
    """One node alone cannot read keys of several slots: the error says to add --cluster."""
    seed(crc, dataset(key_prefix, 500)[0], key_prefix)
    result = initialized("sync", "--force", env={"BALSYNC_REDIS_URL": cluster.node_url(0)})
    assert result.exit_code == 2, result.stderr
    assert "is a node of a Redis Cluster" in result.stderr
    assert "add --cluster, or use a redis+cluster:// URL" in result.stderr


@pytest.mark.parametrize(
    ("url", "args", "message"),
    [
        ("redis+cluster://127.0.0.1:7000/1", (), "a Redis Cluster has only database 0, not 1"),
        ("redis://127.0.0.1:7000/2", ("--cluster",), "a Redis Cluster has only database 0, not 2"),
        ("rediss+cluster://127.0.0.1:7000/?db=3", (), "a Redis Cluster has only database 0"),
        ("unix:///tmp/redis.sock", ("--cluster",), "Redis Cluster mode needs a TCP URL"),
        ("redis+sentinel://127.0.0.1:7000/mymaster", ("--cluster",), "names Redis Sentinel"),
    ],
)
def test_cluster_url_errors_are_exit_2(
    balsync: Balsync, url: str, args: tuple[str, ...], message: str
) -> None:
    """A cluster has only db 0 and is reached over TCP; configuration errors exit 2."""
    result = balsync("sync", "--redis-url", url, *args)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr


def test_bad_cluster_env_value_is_exit_2(balsync: Balsync) -> None:
    """BALSYNC_REDIS_CLUSTER takes 1/0, true/false, yes/no, on/off only."""
    result = balsync("sync", env={"BALSYNC_REDIS_CLUSTER": "maybe"})
    assert result.exit_code == 2
    assert "BALSYNC_REDIS_CLUSTER must be 1 or 0" in result.stderr


def test_cluster_mode_against_a_single_server_is_exit_2(
    initialized: Balsync, servers: Servers
) -> None:
    """--cluster pointed at a server without cluster support says so, without retrying."""
    url = servers.redis.rsplit("/", 1)[0] + "/0"
    result = initialized("sync", "--cluster", env={"BALSYNC_REDIS_URL": url})
    assert result.exit_code == 2, result.stderr
    assert "is a single server, not a cluster node" in result.stderr


def test_unreachable_cluster_is_exit_3(balsync: Balsync) -> None:
    """No node answers within the retry budget: exit 3, nothing written."""
    url = f"redis+cluster://127.0.0.1:{free_port()}/0"
    result = balsync("sync", "--redis-url", url, "--retry-timeout", "0.5")
    assert result.exit_code == 3, result.stderr
    assert "Redis Cluster at redis+cluster://127.0.0.1" in result.stderr
    assert "unavailable" in result.stderr


def test_password_in_a_cluster_url_is_masked(balsync: Balsync) -> None:
    """The cluster error names the URL without its password."""
    url = f"redis+cluster://:s3cret@127.0.0.1:{free_port()}/0"
    result = balsync("sync", "--redis-url", url, "--retry-timeout", "0")
    assert result.exit_code == 3
    assert "s3cret" not in result.stderr
    assert "***" in result.stderr


def test_stale_slot_map_is_followed(
    cluster: ValkeyCluster, crc: RedisCluster, key_prefix: str
) -> None:
    """A slot that moved since the map was read (MOVED) is read from its new owner."""
    keys, _ = dataset(key_prefix, 300)
    seed(crc, keys, key_prefix)
    store = RedisStore(cluster.url, 5)
    try:
        store.ping()
        topology = store.topology
        assert isinstance(topology, Cluster)  # a redis+cluster:// URL
        manager = topology.client.nodes_manager  # made stale on purpose below
        primaries = topology.primaries()
        for slot, nodes in list(manager.slots_cache.items()):
            wrong = next(node for node in primaries if node.name != nodes[0].name)
            manager.slots_cache[slot] = [wrong]
        values = {
            key.decode(): value.decode()
            for page in store.scan_pages(key_prefix)
            for key, value in page.values
        }
        assert values == keys
        names = [k.encode() for k in keys]
        assert store.existing([*names, f"{key_prefix}absent".encode()]) == [True] * len(names) + [
            False
        ]
    finally:
        store.close()


def test_restart_of_one_primary_changes_the_run_id_and_holds_overwrites(
    cbalsync: Balsync, cluster: ValkeyCluster, crc: RedisCluster, key_prefix: str, pg: Conn
) -> None:
    """A primary restarted without persistence: the combined run_id changes, so the next
    run overwrites no row (exit 1) until --accept-redis-restart."""
    keys, expected = dataset(key_prefix, 300)
    seed(crc, keys, key_prefix)
    assert sync_json(cbalsync)[0] == 1
    store = RedisStore(cluster.url, 5)
    before = store.server_run_id().split(",")
    store.close()
    cluster.restart(2)
    store = RedisStore(cluster.url, 5)
    after = store.server_run_id().split(",")
    store.close()
    assert len(before) == len(after) == 3
    assert len(set(before) & set(after)) == 2  # only the restarted primary has a new id

    crc.nodes_manager.initialize()
    lost = [i for i in expected if not crc.exists(f"{key_prefix}{i}")]
    assert lost  # the restarted node came back empty
    for telegram_id in expected:
        crc.set(f"{key_prefix}{telegram_id}", "1.00")  # the application writes anew
    code, data = sync_json(cbalsync)
    assert (code, data["updated"]) == (1, 0)
    assert balances(pg) == expected  # every overwrite held
    code, data = sync_json(cbalsync, "--accept-redis-restart")
    assert data["updated"] == len(expected)
    assert set(balances(pg).values()) == {"1.00"}


def test_operator_commands_work_in_cluster_mode(
    cbalsync: Balsync, crc: RedisCluster, key_prefix: str, pg: Conn
) -> None:
    """health, stats, verify, clear-cache and restore see the keys of every primary."""
    keys, expected = dataset(key_prefix, 600)
    seed(crc, keys, key_prefix)
    assert sync_json(cbalsync)[0] == 1

    result = cbalsync("health", "--json")
    report = json.loads(result.stdout)
    checks = {check["name"]: check for check in report["checks"]}
    # The module's nodes keep nothing on disk: the one other check that fails.
    failing = {name for name, check in checks.items() if not check["ok"]}
    assert failing == {"invalid_values", "persistence"}, report
    # The dataset's invalid keys, sampled on every primary (the negative one passes).
    assert "9 of 610 sampled balance keys" in checks["invalid_values"]["detail"]
    assert (result.exit_code, report["status"]) == (1, "degraded")
    assert "role cluster of 3 primaries" in checks["redis"]["detail"]
    assert "redis+cluster://" in checks["redis"]["detail"]

    stats = json.loads(cbalsync.ok("stats", "--json").stdout)
    assert stats["redis"]["balance_keys"] == len(keys) + 3
    assert stats["postgres"]["rows"] == len(expected)

    verify = cbalsync("verify", "--json")
    assert verify.exit_code == 0, verify.stdout
    assert json.loads(verify.stdout)["status"] == "in_sync"

    changed = one_key_per_node(crc, key_prefix, iter(expected))
    kept = changed.popitem()[1]
    crc.set(f"{key_prefix}{kept}", "99.99")  # changed since the sync: must survive
    result = cbalsync("clear-cache", "--yes", "--json")
    assert result.exit_code == 0, result.stderr
    cleared = json.loads(result.stdout)
    assert cleared["deleted"] == len(expected) - 1
    left = {
        k.decode()
        for k in crc.scan_iter(match=f"{key_prefix}*", target_nodes=RedisCluster.PRIMARIES)
    }
    assert f"{key_prefix}{kept}" in left
    assert not any(f"{key_prefix}{i}" in left for i in expected if i != kept)

    result = cbalsync("restore", "--json")
    assert result.exit_code == 0, result.stderr
    restored = json.loads(result.stdout)
    assert (restored["restored"], restored["already_present"]) == (len(expected) - 1, 1)
    for telegram_id, value in expected.items():
        want = "99.99" if telegram_id == kept else value
        assert Decimal(crc.get(f"{key_prefix}{telegram_id}").decode()) == Decimal(want)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("options", "environ", "url"),
    [
        ({"cluster": True}, {"BALSYNC_REDIS_CLUSTER": "0"}, "redis+cluster://h:7000/0"),
        ({}, {"BALSYNC_REDIS_CLUSTER": "on"}, "redis+cluster://h:7000/0"),
        ({"redis_url": "redis+cluster://h:7000"}, {"BALSYNC_REDIS_CLUSTER": "0"}, None),
        (
            {"redis_url": "rediss://:pw@h:7000/0", "cluster": True},
            {},
            "rediss+cluster://:pw@h:7000/0",
        ),
        ({"redis_url": "rediss+cluster://h:7000/0"}, {}, "rediss+cluster://h:7000/0"),
    ],
)
def test_cluster_mode_is_settled_with_the_url(
    options: dict[str, object], environ: dict[str, str], url: str | None
) -> None:
    """--cluster beats BALSYNC_REDIS_CLUSTER=0, a +cluster scheme implies cluster mode, and
    the resolved URL always carries the +cluster scheme (TLS kept)."""
    settings = resolve_settings({"redis_url": "redis://h:7000/0", **options}, {**environ})
    assert settings.cluster is True
    assert settings.redis_url == (url or options["redis_url"])


def test_plain_url_without_cluster_mode_stays_single_server() -> None:
    """No flag, no variable (or "0"), a redis:// URL: one server, the URL untouched."""
    for environ in ({}, {"BALSYNC_REDIS_CLUSTER": "0"}, {"BALSYNC_REDIS_CLUSTER": "false"}):
        settings = resolve_settings({"redis_url": "redis://h:7000/3"}, environ)
        assert (settings.cluster, settings.redis_url) == (False, "redis://h:7000/3")


def test_incremental_sync_reads_the_marked_ids_on_every_node(
    cbalsync: Balsync, crc: RedisCluster, key_prefix: str, pg: Conn
) -> None:
    """--incremental: the ids marked dirty are read by slot, wherever their keys live."""
    keys, expected = dataset(key_prefix, 300)
    seed(crc, keys, key_prefix)
    assert sync_json(cbalsync)[0] == 1
    changed = one_key_per_node(crc, key_prefix, iter(expected))
    for telegram_id in changed.values():
        crc.set(f"{key_prefix}{telegram_id}", "7.77")
    TrackedWrites(crc, key_prefix).mark(list(changed.values()))
    result = cbalsync("sync", "--json", "--incremental", "--min-interval", "0")
    data = json.loads(result.stdout)
    assert (result.exit_code, data["processed"], data["updated"]) == (0, 3, 3)
    assert {i for i, v in balances(pg).items() if v == "7.77"} == set(changed.values())


def test_health_flags_an_evicting_policy_on_any_one_primary(
    cbalsync: Balsync, cluster: ValkeyCluster
) -> None:
    """One primary with allkeys-lru among noeviction ones: the policy check fails, naming both."""
    node = redis.Redis.from_url(cluster.node_url(1))
    node.config_set("maxmemory-policy", "allkeys-lru")
    try:
        result = cbalsync("health", "--json")
    finally:
        node.config_set("maxmemory-policy", "noeviction")
        node.close()
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    assert checks["eviction_policy"]["ok"] is False
    assert "maxmemory-policy allkeys-lru,noeviction" in checks["eviction_policy"]["detail"]


def test_health_names_the_one_primary_that_keeps_nothing(
    cbalsync: Balsync, cluster: ValkeyCluster
) -> None:
    """AOF on two primaries, nothing on the third: persistence fails, naming that primary
    alone, with what to set."""
    nodes = [redis.Redis.from_url(cluster.node_url(i)) for i in range(cluster.size)]
    for node in (nodes[0], nodes[2]):
        node.config_set("appendonly", "yes")
    try:
        result = cbalsync("health", "--json")
    finally:
        for node in nodes:
            node.config_set("appendonly", "no")
            node.close()
    check = {c["name"]: c for c in json.loads(result.stdout)["checks"]}["persistence"]
    assert result.exit_code == 1
    assert check["ok"] is False
    detail = check["detail"]
    ports = cluster.ports
    assert f"127.0.0.1:{ports[1]}: no AOF and no `save` rules: it keeps nothing" in detail
    assert f"127.0.0.1:{ports[0]}: AOF on" in detail
    assert f"127.0.0.1:{ports[2]}: AOF on" in detail
    assert "`appendonly yes` with `appendfsync everysec`" in detail


def test_balance_writer_marks_writes_in_a_cluster(
    cbalsync: Balsync, crc: RedisCluster, key_prefix: str, pg: Conn
) -> None:
    """BalanceWriter works against a cluster: set, adjust and cents land, and are marked."""
    writer = BalanceWriter(crc, prefix=key_prefix)
    cents = BalanceWriter(crc, prefix=key_prefix, value_format="cents")
    for telegram_id in range(1, 31):
        writer.set(telegram_id, "1.00")
    assert writer.adjust(1, "0.25") == Decimal("1.25")
    result = cbalsync("sync", "--json", "--incremental", "--min-interval", "0")
    data = json.loads(result.stdout)
    assert (result.exit_code, data["processed"], data["inserted"]) == (0, 30, 30)
    assert balances(pg)[1] == "1.25"
    crc.set(f"{key_prefix}40", "100")
    assert cents.adjust(40, "0.05") == Decimal("1.05")
    assert crc.sismember(dirty_keys(key_prefix)[0], "40")


def test_balance_writer_applies_an_adjustment_once_in_a_cluster(
    crc: RedisCluster, key_prefix: str
) -> None:
    """In a cluster a missing key raises BalanceMissing, an adjustment id is recorded in the
    balance key's own slot and applied once, and the mark follows the write."""
    writer = BalanceWriter(crc, prefix=key_prefix)
    with pytest.raises(BalanceMissing):
        writer.adjust(50, "1")
    assert crc.exists(f"{key_prefix}50") == 0
    writer.set(50, "10.00")
    for _ in range(2):
        assert writer.adjust(50, "0.01", adjustment_id="once") == Decimal("10.01")
    assert crc.get(f"{key_prefix}50") == b"10.01"
    record = adjustment_key(f"{key_prefix}50", "once")
    assert crc.keyslot(record) == crc.keyslot(f"{key_prefix}50")
    assert crc.exists(record) == 1
    assert crc.sismember(dirty_keys(key_prefix)[0], "50")
