"""Redis Sentinel and replication: the master found through the sentinels, and failovers
trusted only where the promoted server's replication history proves nothing was lost."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import Balsync, balances
from tests.support.devservers import ValkeySentinels, ValkeyServer, free_port, replicated


def sync(tool: Balsync, *args: str) -> tuple[int, dict[str, object]]:
    result = tool("sync", "--json", "--force", *args)
    assert result.stdout, result.stderr
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[ValkeySentinels]:
    """A master, a replica and three sentinels of the test's own."""
    group = ValkeySentinels(tmp_path / "sentinels").start()
    yield group
    group.stop()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[ValkeyServer, ValkeyServer]]:
    """A master and its replica, without sentinels: the test promotes the replica itself."""
    master = ValkeyServer(tmp_path / "master").start()
    replica = ValkeyServer(
        tmp_path / "replica", extra=("--replicaof", "127.0.0.1", str(master.port))
    )
    try:
        replica.start()
        with redis.Redis.from_url(master.url) as client:
            client.set("balsync-test:probe", "1")
            assert replicated(client)  # the replica is attached and in sync
        yield master, replica
    finally:
        replica.stop()
        master.stop()


def test_sync_through_sentinels_and_a_clean_failover(initialized, sentinels, key_prefix, pg):
    """The master is found through the sentinels; after a failover whose promoted replica
    had replicated everything balsync read, the next run trusts it (exit 0) and syncs."""
    tool = Balsync({**initialized.env, "BALSYNC_REDIS_URL": sentinels.url})
    with redis.Redis(port=sentinels.master_port()) as master:
        master.mset({f"{key_prefix}{i}": f"{i}.00" for i in range(1, 6)})
        code, data = sync(tool)
        assert (code, data["inserted"]) == (0, 5)
        assert replicated(master)  # the replica has everything balsync read
    sentinels.failover()
    with redis.Redis(port=sentinels.master_port()) as master:
        master.set(f"{key_prefix}1", "10.00")
        code, data = sync(tool)
        # The sentinels turn the old master into the new one's replica; once it is in sync:
        assert replicated(master)
    assert (code, data["updated"], data["skipped"]) == (0, 1, 0)
    assert balances(pg) == {1: "10.00", 2: "2.00", 3: "3.00", 4: "4.00", 5: "5.00"}
    health = json.loads(tool("health", "--json").stdout)
    checks = {c["name"]: c for c in health["checks"]}
    assert checks["redis_restart"]["ok"], checks["redis_restart"]
    detail = checks["sentinel"]["detail"]
    assert f"master 127.0.0.1:{sentinels.master_port()}" in detail
    assert all(f"127.0.0.1:{port}" in detail for port in sentinels.sentinel_ports)
    assert "in sync" in detail
    # The master the sentinels name keeps nothing on disk, and is named as such.
    persistence = checks["persistence"]
    assert not persistence["ok"]
    assert persistence["detail"].startswith(
        f"127.0.0.1:{sentinels.master_port()} (master of balances): no AOF and no `save` rules"
    )


def test_a_promoted_replica_that_was_in_sync_is_trusted(initialized, pair, key_prefix, pg):
    """Another server behind balsync's URL, whose history continues what balsync read."""
    master, replica = pair
    with redis.Redis.from_url(master.url) as client:
        client.mset({f"{key_prefix}1": "1500.00", f"{key_prefix}2": "20.00"})
        assert sync(Balsync({**initialized.env, "BALSYNC_REDIS_URL": master.url}))[0] == 0
        assert replicated(client)
    with redis.Redis.from_url(replica.url) as client:
        client.replicaof("NO", "ONE")
        client.set(f"{key_prefix}2", "25.00")
    code, data = sync(Balsync({**initialized.env, "BALSYNC_REDIS_URL": replica.url}))
    assert (code, data["updated"]) == (0, 1)
    assert balances(pg) == {1: "1500.00", 2: "25.00"}


def test_a_promoted_replica_that_lagged_is_a_restart(initialized, pair, key_prefix, pg):
    """A replica cut off before balsync's last read cannot prove it has what balsync
    persisted: its stale values are held (exit 1), as after a restart."""
    master, replica = pair
    with redis.Redis.from_url(master.url) as client:
        client.mset({f"{key_prefix}1": "1500.00", f"{key_prefix}2": "20.00"})
        assert replicated(client)
    with redis.Redis.from_url(replica.url) as client:
        client.replicaof("127.0.0.1", str(free_port()))  # cut off: it keeps its history
    with redis.Redis.from_url(master.url) as client:
        client.set(f"{key_prefix}1", "1600.00")  # never reaches the replica
    assert sync(Balsync({**initialized.env, "BALSYNC_REDIS_URL": master.url}))[0] == 0
    with redis.Redis.from_url(replica.url) as client:
        client.replicaof("NO", "ONE")
        assert client.get(f"{key_prefix}1") == b"1500.00"
    code, data = sync(Balsync({**initialized.env, "BALSYNC_REDIS_URL": replica.url}))
    assert (code, data["updated"], data["skipped"]) == (1, 0, 1)
    assert balances(pg) == {1: "1600.00", 2: "20.00"}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://127.0.0.1:26379/", "name the service"),
        ("redis+sentinel://127.0.0.1:26379/balances/x", "name the service"),
        ("redis+sentinel://127.0.0.1:badport/balances", "bad sentinel address"),
        ("redis+sentinel://:s3cret@127.0.0.1/balances", "bad sentinel address"),
    ],
)
def test_bad_sentinel_urls_are_exit_2(balsync, url, message):
    """A Sentinel URL balsync cannot use is a usage error naming what is wrong, no secret."""
    result = balsync("sync", "--redis-url", url)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert "s3cret" not in result.stderr


def test_unreachable_sentinels_are_exit_3(balsync):
    """No sentinel answers: Redis is unavailable, exit 3, after the retry budget."""
    url = f"redis+sentinel://127.0.0.1:{free_port()}/balances"
    result = balsync("sync", "--redis-url", url, env={"BALSYNC_RETRY_TIMEOUT": "1"})
    assert result.exit_code == 3, result.stderr
