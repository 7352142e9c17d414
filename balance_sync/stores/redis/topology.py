"""Where balsync's commands go: one server, a Redis Cluster, or the master Sentinel names.

The choice is made once, when the store is made (`topology_for`); a topology then owns all
that differs between them: which shards a scan walks (each primary in turn in a cluster),
how a batch of keyed commands travels (one pipeline, or one per owning primary), and which
servers answer INFO.

In a cluster, keyed commands go to the owning primary in a pipeline of that node's own
connection (2-3 times faster than redis-py's ClusterPipeline, which also refuses MGET). A
reply MOVED or ASK (the slot moved since the slot map was read) is sent again through the
cluster client, which follows the redirection.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import redis
import redis.exceptions as rx
from redis.client import Pipeline
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.sentinel import Sentinel

from balance_sync.settings import CLUSTER_SUFFIX, SENTINEL_SUFFIX, SentinelUrl
from balance_sync.stores.redis.client import (
    Calls,
    ClusterCalls,
    address,
    cluster_client,
    sentinel_client,
    server_client,
)
from balance_sync.stores.redis.info import (
    as_int,
    as_text,
    combined_info,
    flush_count,
    read_server,
    server_identity,
)
from balance_sync.stores.redis.results import Identity, SentinelView, ServerInfo

T = TypeVar("T")

SCAN_COUNT = 1000

# Queues command number i on a pipeline, or runs it on the cluster client.
Send = Callable[[Any, int], object]
# A SCAN reply: the next cursor (0: done) and the keys of the page.
Scanned = tuple[int, list[bytes]]


def topology_for(url: str, retry_timeout: float) -> Topology:
    """The topology a URL names: settings gives every cluster-mode URL the redis+cluster://
    scheme and every Sentinel URL redis+sentinel://."""
    scheme = urlsplit(url).scheme
    if scheme.endswith(CLUSTER_SUFFIX):
        return Cluster(url, retry_timeout)
    if scheme.endswith(SENTINEL_SUFFIX):
        return SentinelServer(url, retry_timeout)
    return SingleServer(url, retry_timeout)


class Shard(ABC):
    """A part of the keyspace scanned on its own: the one server, or a cluster's primary."""

    @property
    @abstractmethod
    def client(self) -> redis.Redis:
        """The connection to the server holding this part."""

    def scan(self, cursor: int, match: bytes, count: int = SCAN_COUNT) -> Scanned:
        """One SCAN page of the keys matching `match`."""
        next_cursor, keys = self.client.scan(cursor, match=match, count=count)
        return int(next_cursor), cast(list[bytes], keys)

    @abstractmethod
    def read_and_scan(
        self, keys: list[bytes], cursor: int, match: bytes
    ) -> tuple[list[bytes | None], Scanned | None]:
        """The values of `keys` and, unless `cursor` is 0 (the scan is over), the next SCAN
        page, in the same round trip."""


class Topology(ABC):
    """Single server, cluster or Sentinel: scans, keyed batches and server info."""

    calls: Calls
    sentinel: Sentinel | None = None  # behind Sentinel, the sentinels

    @property
    @abstractmethod
    def client(self) -> redis.Redis | RedisCluster:
        """The single server's client, or the cluster's."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection pool."""

    def call(self, fn: Callable[[], T]) -> T:
        """`fn` under the retry budget, its failures as balsync's errors."""
        return self.calls(fn)

    @abstractmethod
    def shards(self) -> list[Shard]:
        """The parts of the keyspace, each scanned in turn."""

    def scan(self, match: bytes, count: int = SCAN_COUNT) -> Iterator[list[bytes]]:
        """Every key matching `match`, one SCAN page (of one shard) at a time."""
        for shard in self.shards():
            cursor = 0
            while True:
                cursor, keys = self.call(partial(shard.scan, cursor, match, count))
                if keys:
                    yield keys
                if cursor == 0:
                    break

    def pages(self, match: bytes) -> Iterator[tuple[list[bytes], list[bytes | None]]]:
        """Every key matching `match` with its MGET value, page by page: the MGET of one
        page travels in the same round trip as the SCAN of the next."""
        for shard in self.shards():
            cursor, keys = self.call(partial(shard.scan, 0, match))
            while keys or cursor != 0:
                if not keys:
                    cursor, keys = self.call(partial(shard.scan, cursor, match))
                    continue
                values, scanned = self.call(partial(shard.read_and_scan, keys, cursor, match))
                yield keys, values
                if scanned is None:
                    break
                cursor, keys = scanned

    @abstractmethod
    def mget(self, keys: list[bytes], *, no_touch: bool = False) -> list[bytes | None]:
        """The values of `keys`, with CLIENT NO-TOUCH around the read if asked; one attempt
        (run it under `call`)."""

    @abstractmethod
    def each_key(
        self, keys: Sequence[bytes], send: Send, *, raise_on_error: bool = True
    ) -> list[Any]:
        """One command per key, pipelined: `send(pipe, i)` queues the one for keys[i]; one
        attempt (run it under `call`). With `raise_on_error` False a failed command's reply
        is its exception."""

    @abstractmethod
    def identity(self, marker: str) -> Identity:
        """The server's run_id and replication history, and the value of key `marker`."""

    @abstractmethod
    def run_id(self) -> str:
        """INFO's run_id: of the server, or of every primary, sorted and joined with ','."""

    @abstractmethod
    def server_info(self) -> ServerInfo:
        """What the server (or the primaries together) says about itself."""

    @abstractmethod
    def used_memory(self) -> int | None:
        """INFO's used_memory in bytes (summed over primaries), None where it is missing."""

    def database_size(self) -> int:
        """DBSIZE, summed over the shards."""
        return sum(int(self.call(shard.client.dbsize)) for shard in self.shards())

    def sentinel_view(self) -> SentinelView:
        """What the sentinels say (Sentinel only)."""
        raise AssertionError("Sentinel mode only")


# -- one server ---------------------------------------------------------------------------


class _Server(Shard):
    """The whole keyspace of one server."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    @property
    def client(self) -> redis.Redis:
        return self._client

    def read_and_scan(
        self, keys: list[bytes], cursor: int, match: bytes
    ) -> tuple[list[bytes | None], Scanned | None]:
        if cursor == 0:
            return cast(list[bytes | None], self.client.mget(keys)), None
        pipe = self.client.pipeline(transaction=False)
        pipe.mget(keys)
        pipe.scan(cursor, match=match, count=SCAN_COUNT)
        values, (next_cursor, next_keys) = pipe.execute()
        return list(values), (int(next_cursor), list(next_keys))


class SingleServer(Topology):
    """The one server of a redis:// URL: every command in one pipeline."""

    def __init__(self, url: str, retry_timeout: float, client: redis.Redis | None = None) -> None:
        self.calls = Calls(url, retry_timeout)
        self._client = client if client is not None else server_client(url)

    @property
    def client(self) -> redis.Redis:
        return self._client

    def close(self) -> None:
        self._client.close()

    def shards(self) -> list[Shard]:
        return [_Server(self._client)]

    def mget(self, keys: list[bytes], *, no_touch: bool = False) -> list[bytes | None]:
        if not no_touch:
            return cast(list[bytes | None], self.client.mget(keys))
        pipe = self.client.pipeline(transaction=False)
        pipe.client_no_touch("ON")
        pipe.mget(keys)
        pipe.client_no_touch("OFF")
        _, values, _ = pipe.execute(raise_on_error=False)
        if isinstance(values, Exception):
            raise values
        return cast(list[bytes | None], values)

    def each_key(
        self, keys: Sequence[bytes], send: Send, *, raise_on_error: bool = True
    ) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for i in range(len(keys)):
            send(pipe, i)
        return list(pipe.execute(raise_on_error=raise_on_error))

    def identity(self, marker: str) -> Identity:
        """Behind Sentinel (or any single server) the history lets a promoted replica prove
        that it holds everything its old master had."""

        def run() -> tuple[dict[str, object], dict[str, object], bytes | None]:
            pipe = self.client.pipeline(transaction=False)
            pipe.info("server")
            pipe.info("replication")
            pipe.info("commandstats")
            pipe.get(marker)
            server, replication, commands, found = pipe.execute()
            return {**server, **replication}, commands, found

        return server_identity(*self.call(run))

    def run_id(self) -> str:
        info = self.call(partial(self.client.info, "server"))
        return str(info.get("run_id", ""))

    def server_info(self) -> ServerInfo:
        return read_server(self.calls, self.client, self._name)

    def _name(self) -> str:
        """How Persistence names the server: "" for the one server of a redis:// URL."""
        return ""

    def used_memory(self) -> int | None:
        info = cast(dict[str, object], self.call(partial(self.client.info, "memory")))
        used = info.get("used_memory")
        return int(str(used)) if used is not None else None


class SentinelServer(SingleServer):
    """The master of a redis+sentinel:// URL's service, found through the sentinels."""

    sentinel: Sentinel

    def __init__(self, url: str, retry_timeout: float) -> None:
        parsed = SentinelUrl.parse(url)
        client, self.sentinel = sentinel_client(parsed)
        self.service = parsed.service
        super().__init__(url, retry_timeout, client)

    def _name(self) -> str:
        host, port = self.call(partial(self.sentinel.discover_master, self.service))
        return f"{host}:{port} (master of {self.service})"

    def sentinel_view(self) -> SentinelView:
        """Which sentinels answer, the master they name, and its replicas with how far each
        is behind (INFO replication on the master)."""
        answering = []
        for client in self.sentinel.sentinels:
            where = address(client)
            try:
                client.ping()
                answering.append(where)
            except (rx.ConnectionError, rx.TimeoutError, OSError):
                continue
        host, port = self.call(partial(self.sentinel.discover_master, self.service))
        info = cast(dict[str, object], self.call(partial(self.client.info, "replication")))
        offset = as_int(info.get("master_repl_offset"))
        replicas = []
        for name, value in sorted(info.items()):
            if name.startswith("slave") and isinstance(value, dict):
                behind = offset - as_int(value.get("offset"))
                online = as_text(value.get("state")) == "online"
                replicas.append((f"{value.get('ip')}:{value.get('port')}", online, behind))
        return SentinelView(
            sentinels=tuple(address(c) for c in self.sentinel.sentinels),
            answering=tuple(answering),
            master=f"{host}:{port}",
            replicas=tuple(replicas),
        )


# -- Redis Cluster: every primary scanned, every key sent to its slot's owner -------------


class _Node(Shard):
    """The keys of one primary of a cluster."""

    def __init__(self, cluster: Cluster, node: ClusterNode) -> None:
        self._cluster = cluster
        self.node = node

    @property
    def client(self) -> redis.Redis:
        return self._cluster.client.get_redis_connection(self.node)

    def read_and_scan(
        self, keys: list[bytes], cursor: int, match: bytes
    ) -> tuple[list[bytes | None], Scanned | None]:
        scan = None if cursor == 0 else (self.node, cursor, match)
        return self._cluster.mget_by_slot(keys, scan=scan)


class Cluster(Topology):
    """The primaries of a redis+cluster:// URL, each holding its own part of the keys."""

    def __init__(self, url: str, retry_timeout: float) -> None:
        self._url = url
        self._client: RedisCluster | None = None
        self.calls = ClusterCalls(url, retry_timeout, self._refresh_slots)

    @property
    def client(self) -> RedisCluster:
        """A cluster client connects as it is made, to learn the nodes and their slots, so it
        is made on first use and under the retry budget, never in the constructor."""
        if self._client is None:
            self._client = self.call(partial(cluster_client, self._url))
        return self._client

    def _refresh_slots(self) -> None:
        # Not before the client exists: making it reads the slot map anyway.
        if self._client is not None:
            self._client.nodes_manager.initialize()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def primaries(self) -> list[ClusterNode]:
        """The primaries, by name: each holds its own part of the keys."""
        nodes = self.call(lambda: list(self.client.get_primaries()))  # type: ignore[no-untyped-call]
        return sorted(nodes, key=lambda node: str(node.name))

    def shards(self) -> list[Shard]:
        return [_Node(self, node) for node in self.primaries()]

    def _node_info(self, node: ClusterNode, section: str) -> dict[str, object]:
        client = self.client.get_redis_connection(node)
        return cast(dict[str, object], self.call(partial(client.info, section)))

    def identity(self, marker: str) -> Identity:
        """A cluster offers its run_ids only; its flushes are counted per primary."""
        primaries = self.primaries()
        run_id = ",".join(
            sorted(as_text(self._node_info(n, "server").get("run_id")) for n in primaries)
        )
        flushes = ",".join(
            f"{n.name}={flush_count(self._node_info(n, 'commandstats'))}" for n in primaries
        )
        found = self.call(partial(self.client.get, marker))
        return Identity(run_id, marker=cast(bytes | None, found), flushes=flushes)

    def run_id(self) -> str:
        ids = (self._node_info(node, "server").get("run_id") for node in self.primaries())
        return ",".join(sorted(as_text(run_id) for run_id in ids))

    def server_info(self) -> ServerInfo:
        """The primaries together (see `combined_info`)."""
        infos = []
        for node in self.primaries():
            client = self.client.get_redis_connection(node)
            infos.append(read_server(self.calls, client, partial(str, node.name)))
        return combined_info(infos)

    def used_memory(self) -> int | None:
        return sum(
            as_int(self._node_info(node, "memory").get("used_memory")) for node in self.primaries()
        )

    def mget(self, keys: list[bytes], *, no_touch: bool = False) -> list[bytes | None]:
        return self.mget_by_slot(keys, no_touch=no_touch)[0]

    def mget_by_slot(
        self,
        keys: list[bytes],
        *,
        no_touch: bool = False,
        scan: tuple[ClusterNode, int, bytes] | None = None,
    ) -> tuple[list[bytes | None], Scanned | None]:
        """The values of `keys`: one MGET per slot (keys of one MGET must share a slot), the
        MGETs of a node in one pipeline, with CLIENT NO-TOUCH around them if asked; `scan`
        (node, cursor, match) rides along on that node's pipeline, its page returned too."""
        by_slot: dict[int, list[bytes]] = {}
        for key in keys:
            by_slot.setdefault(key_slot(key), []).append(key)
        groups = list(by_slot.values())
        tail = None
        if scan is not None:
            node, cursor, match = scan
            tail = (node, lambda pipe: pipe.scan(cursor, match=match, count=SCAN_COUNT))
        replies, scanned = self._routed(
            list(by_slot), lambda pipe, i: pipe.mget(groups[i]), no_touch=no_touch, tail=tail
        )
        found: dict[bytes, bytes | None] = {}
        for group, reply in zip(groups, replies, strict=True):
            if isinstance(reply, Exception):
                raise reply
            found.update(zip(group, reply, strict=True))
        page = None
        if scan is not None:
            if isinstance(scanned, Exception):
                raise scanned
            next_cursor, next_keys = scanned
            page = (int(next_cursor), list(next_keys))
        return [found[key] for key in keys], page

    def each_key(
        self, keys: Sequence[bytes], send: Send, *, raise_on_error: bool = True
    ) -> list[Any]:
        """Each command goes to the primary that owns its key's slot."""
        replies, _ = self._routed([key_slot(key) for key in keys], send)
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies

    def _routed(
        self,
        slots: Sequence[int],
        send: Send,
        *,
        no_touch: bool = False,
        tail: tuple[ClusterNode, Callable[[Pipeline], object]] | None = None,
    ) -> tuple[list[Any], Any]:
        """Command i (queued by `send(pipe, i)`) on the primary that owns slots[i]: one
        pipeline per node, replies in order, a failed command's reply its exception.

        `tail` (node, queue) adds one command at the end of that node's pipeline; its reply
        comes second. Connection faults raise, for `call` to retry the lot.
        """
        cluster = self.client
        batches: dict[str, tuple[ClusterNode, list[int]]] = {}
        tail_node, queue_tail = tail if tail is not None else (None, None)
        if tail_node is not None:
            batches[tail_node.name] = (tail_node, [])
        for i, slot in enumerate(slots):
            node = cluster.nodes_manager.get_node_from_slot(slot)
            batches.setdefault(node.name, (node, []))[1].append(i)
        replies: list[Any] = [None] * len(slots)
        tail_reply: Any = None
        for name, (node, indexes) in batches.items():
            pipe = cluster.get_redis_connection(node).pipeline(transaction=False)
            if no_touch:
                pipe.client_no_touch("ON")
            for i in indexes:
                send(pipe, i)
            if no_touch:
                pipe.client_no_touch("OFF")
            with_tail = tail_node is not None and name == tail_node.name
            if with_tail and queue_tail is not None:
                queue_tail(pipe)
            results = pipe.execute(raise_on_error=False)
            if with_tail:
                tail_reply = results.pop()
            # An old server refuses CLIENT NO-TOUCH; the read then touches, as it always did.
            own = results[1:-1] if no_touch else results
            for i, reply in zip(indexes, own, strict=True):
                replies[i] = reply
        for i, reply in enumerate(replies):
            if isinstance(reply, rx.AskError):  # MovedError too
                try:
                    replies[i] = send(cluster, i)
                except rx.ResponseError as exc:
                    replies[i] = exc
        return replies, tail_reply
