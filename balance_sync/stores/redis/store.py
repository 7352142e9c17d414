"""Every Redis command balsync sends lives here.

Reads are plain round trips retried under the policy in `retry`; redis-py's own retries are
off so that one budget (`--retry-timeout`) bounds the whole run.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any, Literal, TypeVar, cast, get_args
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import redis.exceptions as rx
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.crc import key_slot
from redis.retry import Retry
from redis.sentinel import Sentinel

from balance_sync import retry
from balance_sync.errors import BalsyncError, ConfigError, RedisUnavailable
from balance_sync.settings import CLUSTER_SUFFIX, SENTINEL_SUFFIX, SentinelUrl, mask_url

T = TypeVar("T")

SCAN_COUNT = 1000
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
# clear-cache: delete a key only while it holds the value that was found persisted.
COMPARE_AND_DELETE = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) "
    "else return 0 end"
)

_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SUNIONSTORE', KEYS[2], KEYS[2], KEYS[1])
  redis.call('DEL', KEYS[1])
end
return redis.call('SCARD', KEYS[2])
"""

# The application (or balance_sync.writer) marks an id dirty in the same atomic step as it
# writes the balance.
_SET_AND_MARK = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return 1
"""


def dirty_keys(prefix: str) -> tuple[str, str]:
    """The dirty set and the running claim of a key prefix.

    One hash tag puts both in one cluster slot (RENAME-like moves need that), and neither
    starts with the prefix, so a full SCAN never mistakes them for balances.
    """
    tag = "{balsync:dirty:" + prefix + "}"
    return tag, tag + ":claimed"


def _flushes(commandstats: dict[str, object]) -> int:
    """FLUSHALL and FLUSHDB calls in INFO commandstats."""
    calls = 0
    for name in ("cmdstat_flushall", "cmdstat_flushdb"):
        stats = commandstats.get(name)
        if isinstance(stats, dict):
            calls += _int(stats.get("calls"))
    return calls


def trust_marker(prefix: str, table: str) -> str:
    """The key of balsync's trust marker for one target table: beside the dirty set, in
    its hash tag (one cluster slot; the ACL that allows the dirty set allows it)."""
    return dirty_keys(prefix)[0] + ":trusted:" + table


_SET_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
return 0
"""


@dataclass(slots=True)
class Page:
    """One SCAN page with its values: string keys with their bytes, other types by name."""

    values: list[tuple[bytes, bytes]] = field(default_factory=list)
    wrong_type: list[tuple[bytes, str]] = field(default_factory=list)


class RedisStore:
    """A connection to the Redis that holds the balances, with balsync's retry budget."""

    def __init__(self, url: str, retry_timeout: float) -> None:
        self.url = url
        self.retry_timeout = retry_timeout
        # A redis+cluster:// URL (settings gives every cluster-mode URL that scheme).
        scheme = urlsplit(url).scheme
        self.cluster = scheme.endswith(CLUSTER_SUFFIX)
        self.sentinel: Sentinel | None = None
        self.service = ""  # the Sentinel service name
        self._client: redis.Redis | RedisCluster | None = None
        self._stale_slots = False
        if scheme.endswith(SENTINEL_SUFFIX):
            self._client, self.sentinel, self.service = _sentinel_client(SentinelUrl.parse(url))
        elif not self.cluster:
            self._client = redis.Redis.from_url(url, **_client_options())

    @property
    def client(self) -> redis.Redis | RedisCluster:
        """The single server's client, or the cluster's.

        A cluster client connects as it is made, to learn the nodes and their slots, so it
        is made on first use and under the retry budget, never in the constructor.
        """
        if self._client is None:
            self._client = self._call(
                partial(RedisCluster.from_url, _single_scheme(self.url), **_client_options())
            )
        return self._client

    @cached_property
    def _set_if_equal(self) -> Script:
        return self.client.register_script(_SET_IF_EQUAL)

    @cached_property
    def _claim(self) -> Script:
        return self.client.register_script(_CLAIM)

    def close(self) -> None:
        """Release the connection pool."""
        if self._client is not None:
            self._client.close()

    def _call(self, fn: Callable[[], T]) -> T:
        transient = retry.is_transient_redis
        if self.cluster:
            fn, transient = self._refreshing(fn), _is_transient_in_cluster
        try:
            return retry.call("Redis", self.retry_timeout, transient, fn)
        except (rx.AuthenticationError, rx.AuthorizationError) as exc:
            raise RedisUnavailable(
                f"Redis at {mask_url(self.url)} refused the credentials: {exc}",
                "check the password in the Redis URL",
            ) from exc
        except (rx.ConnectionError, rx.TimeoutError, OSError) as exc:
            raise RedisUnavailable(
                f"Redis at {mask_url(self.url)} is unavailable after "
                f"{self.retry_timeout:g}s of retries: {exc}",
                "check that the server runs and the URL, port and TLS settings are right",
            ) from exc
        except rx.RedisClusterException as exc:
            raise self._cluster_failure(exc) from exc
        except rx.ResponseError as exc:
            if transient(exc):
                raise RedisUnavailable(
                    f"Redis at {mask_url(self.url)} stayed busy after "
                    f"{self.retry_timeout:g}s of retries: {exc}",
                    "check the server's log (loading, failover or a busy script)",
                ) from exc
            if not self.cluster and isinstance(exc, rx.AskError | rx.ClusterCrossSlotError):
                raise ConfigError(
                    f"Redis at {mask_url(self.url)} is a node of a Redis Cluster: {exc}",
                    "add --cluster, or use a redis+cluster:// URL",
                ) from exc
            raise

    def ping(self) -> None:
        """Check that Redis answers (in cluster mode, every node)."""

        def run() -> None:
            self.client.ping()  # `client` read in here: a cluster client connects when made

        self._call(run)

    def identity(self, marker: str) -> Identity:
        """Which server answers, where its replication history stands, and the trust
        marker balsync left in this keyspace (key `marker`).

        Behind Sentinel (or any single server) the history lets a promoted replica prove
        that it holds everything its old master had; a cluster offers its run_ids only.
        The marker is gone after FLUSHALL, FLUSHDB or a restart without persistence, and
        was never in another database of the same server.
        """
        if self.cluster:
            primaries = self._primaries()
            run_id = ",".join(
                sorted(_text(self._node_info(n, "server").get("run_id")) for n in primaries)
            )
            flushes = ",".join(
                f"{n.name}={_flushes(self._node_info(n, 'commandstats'))}" for n in primaries
            )
            found = self._call(partial(self.client.get, marker))
            return Identity(run_id, marker=cast(bytes | None, found), flushes=flushes)

        def run() -> tuple[dict[str, object], dict[str, object], bytes | None]:
            pipe = self.client.pipeline(transaction=False)
            pipe.info("server")
            pipe.info("replication")
            pipe.info("commandstats")
            pipe.get(marker)
            server, replication, commands, found = pipe.execute()
            return {**server, **replication}, commands, found

        info, commands, found = self._call(run)
        return Identity(
            run_id=_text(info.get("run_id")),
            replid=_text(info.get("master_replid")),
            replid2=_text(info.get("master_replid2")),
            offset=_int(info.get("master_repl_offset")),
            second_offset=_int(info.get("second_repl_offset")),
            marker=found,
            flushes=str(_flushes(commands)),
        )

    def set_marker(self, marker: str, token: str) -> None:
        """Leave balsync's trust marker in this keyspace (it travels with replication)."""
        self._call(partial(self.client.set, marker, token))

    def server_run_id(self) -> str:
        """The server's INFO run_id: it changes whenever Redis restarts or fails over.

        In cluster mode, the run_ids of all primaries, sorted and joined with ',': a
        restart or failover of any one changes it.
        """
        if self.cluster:
            ids = (self._node_info(node, "server").get("run_id") for node in self._primaries())
            return ",".join(sorted(_text(run_id) for run_id in ids))
        info = self._call(partial(self.client.info, "server"))
        return str(info.get("run_id", ""))

    def sentinel_view(self) -> SentinelView:
        """Behind Sentinel: which sentinels answer, the master they name, and its replicas
        with how far each is behind (INFO replication on the master)."""
        assert self.sentinel is not None, "Sentinel mode only"
        answering = []
        for client in self.sentinel.sentinels:
            address = _address(client)
            try:
                client.ping()
                answering.append(address)
            except (rx.ConnectionError, rx.TimeoutError, OSError):
                continue
        host, port = self._call(partial(self.sentinel.discover_master, self.service))
        info = cast(dict[str, object], self._call(partial(self.client.info, "replication")))
        offset = _int(info.get("master_repl_offset"))
        replicas = []
        for name, value in sorted(info.items()):
            if name.startswith("slave") and isinstance(value, dict):
                behind = offset - _int(value.get("offset"))
                online = _text(value.get("state")) == "online"
                replicas.append((f"{value.get('ip')}:{value.get('port')}", online, behind))
        return SentinelView(
            sentinels=tuple(_address(c) for c in self.sentinel.sentinels),
            answering=tuple(answering),
            master=f"{host}:{port}",
            replicas=tuple(replicas),
        )

    def set_if_equal(self, items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bool]:
        """For each (key, expected, new): SET key new only if it still holds `expected`.

        Atomic per key (a Lua script), so a write the application makes meanwhile wins.
        True where the key was set. A retry after a lost reply reports keys set by the
        first attempt as not set: the caller then believes less, never more.
        """
        if not items:
            return []

        def send(pipe: Any, i: int) -> object:
            key, expected, new = items[i]
            return self._set_if_equal(keys=[key], args=[expected, new], client=pipe)

        def run() -> list[bool]:
            return [int(r) == 1 for r in self._each_key([item[0] for item in items], send)]

        return self._call(run)

    # -- change tracking (incremental sync) ---------------------------------------------

    def claim_dirty(self, prefix: str) -> int:
        """Move the ids marked dirty into the run's claim, atomically; how many are claimed.

        A claim left by a run that died is kept and merged, so its ids are synced now.
        """
        dirty, claim = dirty_keys(prefix)
        return int(self._call(partial(self._claim, keys=[dirty, claim])))

    def release_claim(self, prefix: str) -> None:
        """Forget the claimed ids: PostgreSQL has committed every one of them."""
        self._call(lambda: self.client.delete(dirty_keys(prefix)[1]))

    def dirty_pages(self, prefix: str, *, include_unclaimed: bool = False) -> Iterator[Page]:
        """The claimed ids' keys with their values, page by page (SSCAN + MGET).

        With `include_unclaimed` (a dry run, which claims nothing) the ids still waiting in
        the dirty set are read too.
        """
        dirty, claim = dirty_keys(prefix)
        sets = [claim, dirty] if include_unclaimed else [claim]
        seen: set[bytes] = set()
        raw_prefix = prefix.encode()
        for name in sets:
            cursor = 0
            while True:
                cursor, members = self._call(partial(self._sscan, name, cursor))
                if include_unclaimed:  # an id may wait in both sets
                    members = [m for m in members if m not in seen]
                    seen.update(members)
                keys = [raw_prefix + m for m in members]
                if keys:
                    yield self._page(keys, self._call(partial(self._mget, keys)))
                if cursor == 0:
                    break

    def _sscan(self, name: str, cursor: int) -> tuple[int, list[bytes]]:
        next_cursor, members = self.client.sscan(name, cursor, count=SCAN_COUNT)
        return int(next_cursor), cast(list[bytes], members)

    def scan_pages(self, prefix: str) -> Iterator[Page]:
        """Every key under `prefix` with its value, page by page (SCAN, never KEYS).

        MGET of one page travels in the same round trip as SCAN of the next, so the server
        is never waiting on us. A key can appear in two pages if the keyspace is rehashed
        during the scan; writes are idempotent, so that costs nothing but a count.

        In cluster mode every primary is scanned in turn, the same way.
        """
        match = prefix.encode() + b"*"
        if self.cluster:
            for node in self._primaries():
                yield from self._node_pages(node, match)
            return
        cursor, keys = self._call(partial(self._scan, 0, match))
        while keys or cursor != 0:
            if not keys:
                cursor, keys = self._call(partial(self._scan, cursor, match))
                continue
            if cursor == 0:
                values = self._call(partial(self._mget, keys))
                yield self._page(keys, values)
                return
            values, (cursor, next_keys) = self._call(
                partial(self._mget_and_scan, keys, cursor, match)
            )
            yield self._page(keys, values)
            keys = next_keys

    def _scan(self, cursor: int, match: bytes) -> tuple[int, list[bytes]]:
        next_cursor, keys = self.client.scan(cursor, match=match, count=SCAN_COUNT)
        return int(next_cursor), cast(list[bytes], keys)

    def _mget(self, keys: list[bytes]) -> list[bytes | None]:
        if self.cluster:
            return self._mget_by_slot(keys)[0]
        return cast(list[bytes | None], self.client.mget(keys))

    def _mget_and_scan(
        self, keys: list[bytes], cursor: int, match: bytes
    ) -> tuple[list[bytes | None], tuple[int, list[bytes]]]:
        pipe = self.client.pipeline(transaction=False)
        pipe.mget(keys)
        pipe.scan(cursor, match=match, count=SCAN_COUNT)
        values, (next_cursor, next_keys) = pipe.execute()
        return list(values), (int(next_cursor), list(next_keys))

    def _page(self, keys: list[bytes], values: list[bytes | None]) -> Page:
        if None not in values:  # the common page: every key a string, none deleted meanwhile
            return Page(values=list(zip(keys, cast(list[bytes], values), strict=True)))
        page = Page()
        missing: list[bytes] = []
        for key, value in zip(keys, values, strict=True):
            if value is None:
                missing.append(key)
            else:
                page.values.append((key, value))
        if missing:
            # MGET answers nil both for a key of another type and for a key deleted since
            # SCAN saw it; TYPE tells them apart.
            types = self._call(partial(self._types, missing))
            for key, kind in zip(missing, types, strict=True):
                name = kind.decode() if isinstance(kind, bytes) else str(kind)
                if name != "none":
                    page.wrong_type.append((key, name))
        return page

    def _types(self, keys: list[bytes]) -> list[bytes]:
        return self._each_key(keys, lambda pipe, i: pipe.type(keys[i]))

    # -- operator views: health and stats ----------------------------------------------

    def server_info(self) -> ServerInfo:
        """Version, role, uptime, memory and eviction policy of the server (INFO, CONFIG GET).

        The policy comes from CONFIG GET; where an ACL forbids CONFIG, or a managed service
        renamed it away, INFO's `maxmemory_policy` field says the same thing.

        In cluster mode, the primaries together (see `_cluster_info`).
        """
        if self.cluster:
            return _cluster_info([self._server_info(node) for node in self._primaries()])
        return self._server_info(None)

    def _server_info(self, node: ClusterNode | None) -> ServerInfo:
        """What one server says: the single server (None), or one node of the cluster."""
        client = self.client if node is None else self._cluster.get_redis_connection(node)
        info = cast(dict[str, object], self._call(client.info))
        policy_source = "CONFIG GET"
        try:
            reply = cast(
                dict[str, object],
                self._call(partial(client.config_get, "maxmemory-policy")),
            )
            policy = _text(reply.get("maxmemory-policy"))
        except rx.ResponseError:
            policy, policy_source = "", "INFO"
        if not policy:
            policy, policy_source = _text(info.get("maxmemory_policy")) or "unknown", "INFO"
        if node is not None:
            name = str(node.name)
        elif self.sentinel is not None:
            host, port = self._call(partial(self.sentinel.discover_master, self.service))
            name = f"{host}:{port} (master of {self.service})"
        else:
            name = ""
        return ServerInfo(
            version=_text(info.get("valkey_version") or info.get("redis_version")),
            role=_text(info.get("role")),
            uptime_s=_int(info.get("uptime_in_seconds")),
            run_id=_text(info.get("run_id")),
            used_memory=_int(info.get("used_memory")),
            used_memory_human=_text(info.get("used_memory_human")),
            maxmemory=_int(info.get("maxmemory")),
            maxmemory_human=_text(info.get("maxmemory_human")),
            maxmemory_policy=policy,
            policy_source=policy_source,
            persistence=(self._persistence(client, name, info),),
        )

    def _persistence(
        self, client: redis.Redis | RedisCluster, name: str, info: dict[str, object]
    ) -> Persistence:
        """How one server keeps its keys on disk: INFO persistence, and CONFIG GET save and
        appendfsync where permitted (None where not: the caller infers from INFO)."""
        configured: dict[str, str | None] = {}
        for parameter in ("save", "appendfsync"):
            try:
                reply = cast(dict[str, object], self._call(partial(client.config_get, parameter)))
                configured[parameter] = _text(reply.get(parameter)) if parameter in reply else None
            except rx.ResponseError:
                configured[parameter] = None
        save = configured["save"]
        # The server's own clock: the host running balsync may be set otherwise.
        now = _int(info.get("server_time_usec")) / 1e6 or time.time()
        last_save = _int(info.get("rdb_last_save_time"))
        return Persistence(
            server=name,
            aof_enabled=_int(info.get("aof_enabled")) == 1,
            aof_last_write_ok=_text(info.get("aof_last_write_status")) in ("ok", ""),
            appendfsync=configured["appendfsync"],
            save_rules=None if save is None else _save_rules(save),
            rdb_last_bgsave_ok=_text(info.get("rdb_last_bgsave_status")) in ("ok", ""),
            rdb_last_save_age_s=max(0.0, now - last_save) if last_save else None,
            rdb_changes_since_last_save=_int(info.get("rdb_changes_since_last_save")),
            rdb_saves=_int(info.get("rdb_saves")) if "rdb_saves" in info else None,
        )

    def database_size(self) -> int:
        """Every key of the database, whatever its name (DBSIZE; a cluster's primaries summed).

        Read in constant time: an upper bound on the balance keys, where counting them with
        SCAN would cost as much as the sync itself.
        """
        if self.cluster:
            return sum(
                int(self._call(self._cluster.get_redis_connection(node).dbsize))
                for node in self._primaries()
            )
        return int(self._call(self.client.dbsize))

    def marked_count(self, prefix: str) -> int:
        """How many ids wait in the dirty set and in a claim (SCARD): an incremental run's work."""
        return sum(int(self._call(partial(self.client.scard, name))) for name in dirty_keys(prefix))

    def count_keys(self, prefix: str) -> int:
        """How many keys lie under `prefix`, counted with SCAN (DBSIZE would count every key).

        A key met twice while the keyspace is rehashed counts twice, so the figure is exact
        only while nobody adds keys; stats need no more.
        """
        return sum(len(keys) for keys in self.scan_keys(prefix))

    def sample_ttls(self, prefix: str, limit: int) -> TtlSample:
        """The first `limit` keys under `prefix` that SCAN meets, and which of them carry a TTL."""
        sample = self._first_keys(prefix, limit)
        ttls = self._call(partial(self._ttls, sample)) if sample else []
        present = [(key, ttl) for key, ttl in zip(sample, ttls, strict=True) if ttl != -2]
        expiring = tuple(key for key, ttl in present if ttl >= 0)
        return TtlSample(sampled=len(present), with_ttl=len(expiring), examples=expiring[:3])

    def sample_values(self, prefix: str, limit: int) -> Page:
        """The first `limit` keys under `prefix` that SCAN meets, with their values, read
        without touching their idle time (`read_values`)."""
        return self.read_values(self._first_keys(prefix, limit))

    def _first_keys(self, prefix: str, limit: int) -> list[bytes]:
        seen: dict[bytes, None] = {}  # SCAN may return a key twice
        for keys in self.scan_keys(prefix):
            seen.update(dict.fromkeys(keys))
            if len(seen) >= limit:
                break
        return list(seen)[:limit]

    def _ttls(self, keys: list[bytes]) -> list[int]:
        return [int(ttl) for ttl in self._each_key(keys, lambda pipe, i: pipe.ttl(keys[i]))]

    # -- clear-cache and restore --------------------------------------------------------

    def scan_keys(self, prefix: str, count: int = SCAN_COUNT) -> Iterator[list[bytes]]:
        """Every key under `prefix`, one SCAN page at a time, without reading any value.

        Reading no value lets a caller ask OBJECT IDLETIME first: a GET would reset it.
        In cluster mode every primary is scanned in turn; a page holds one node's keys.
        """
        match = prefix.encode() + b"*"
        if self.cluster:
            for node in self._primaries():
                cursor = 0
                while True:
                    cursor, keys = self._call(partial(self._node_scan, node, cursor, match, count))
                    if keys:
                        yield keys
                    if cursor == 0:
                        break
            return

        def scan(cursor: int) -> tuple[int, list[bytes]]:
            next_cursor, keys = self.client.scan(cursor, match=match, count=count)
            return int(next_cursor), cast(list[bytes], keys)

        cursor = 0
        while True:
            cursor, keys = self._call(partial(scan, cursor))
            if keys:
                yield keys
            if cursor == 0:
                return

    def read_values(self, keys: list[bytes]) -> Page:
        """The values of `keys` (MGET); keys of another type by name, keys gone left out.

        Where the server knows CLIENT NO-TOUCH (Redis 7.2+, Valkey) the read leaves the keys'
        idle time alone, so a dry run does not make keys look used; older servers ignore it.
        """
        if not keys:
            return Page()
        if self.cluster:
            values, _ = self._call(partial(self._mget_by_slot, keys, no_touch=True))
            return self._page(keys, values)

        def run() -> list[bytes | None]:
            pipe = self.client.pipeline(transaction=False)
            pipe.client_no_touch("ON")
            pipe.mget(keys)
            pipe.client_no_touch("OFF")
            _, values, _ = pipe.execute(raise_on_error=False)
            if isinstance(values, Exception):
                raise values
            return cast(list[bytes | None], values)

        return self._page(keys, self._call(run))

    def idle_seconds(self, keys: Sequence[bytes]) -> list[int | None]:
        """OBJECT IDLETIME of each key (None: gone meanwhile), pipelined; it touches no key."""

        def run() -> list[int | None]:
            replies = self._each_key(keys, lambda pipe, i: pipe.object("idletime", keys[i]))
            return [None if idle is None else int(idle) for idle in replies]

        try:
            return self._call(run)
        except rx.ResponseError as exc:
            # Under an LFU maxmemory-policy the server keeps access counts, not idle times.
            raise ConfigError(
                f"Redis at {mask_url(self.url)} cannot tell how long keys were idle: {exc}",
                "run without --idle-days, or use an LRU or noeviction maxmemory-policy",
            ) from exc

    @cached_property
    def _compare_and_delete(self) -> Script:
        # redis-py loads it with SCRIPT LOAD when a pipeline first needs it, and again only
        # if the server lost it (a restart, SCRIPT FLUSH).
        return self.client.register_script(COMPARE_AND_DELETE)

    def delete_if_unchanged(self, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """For each (key, raw): DEL the key only if it still holds exactly `raw`.

        Atomic per key (a Lua compare-and-delete), so a value the application writes after
        `raw` was read survives. One pipeline for the lot; True where the key was deleted.
        A retry after a lost reply reports keys deleted by the first attempt as kept.
        """
        if not items:
            return []

        def send(pipe: Any, i: int) -> object:
            key, raw = items[i]
            return self._compare_and_delete(keys=[key], args=[raw], client=pipe)

        def run() -> list[bool]:
            keys = [key for key, _ in items]
            replies = self._each_key(keys, send, raise_on_error=False)
            for reply in replies:
                if isinstance(reply, Exception) and retry.is_transient_redis(reply):
                    raise reply
            # Any other error (WRONGTYPE: the key became another type) deleted nothing.
            return [reply == 1 for reply in replies]

        return self._call(run)

    def memory_usage(self, keys: Sequence[bytes]) -> int | None:
        """Bytes the keys take (MEMORY USAGE, summed), or None where the server refuses it."""
        if not keys:
            return 0

        def run() -> int:
            replies = self._each_key(keys, lambda pipe, i: pipe.memory_usage(keys[i]))
            return sum(int(used or 0) for used in replies)

        try:
            return self._call(run)
        except rx.ResponseError:
            return None

    def used_memory(self) -> int | None:
        """INFO's used_memory in bytes (summed over a cluster's primaries), or None where INFO
        is refused."""
        try:
            if self.cluster:
                return sum(
                    _int(self._node_info(node, "memory").get("used_memory"))
                    for node in self._primaries()
                )
            info = cast(dict[str, object], self._call(partial(self.client.info, "memory")))
        except rx.ResponseError:
            return None
        used = info.get("used_memory")
        return int(str(used)) if used is not None else None

    def set_missing(self, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """SET key value NX for each, pipelined: True where the key was absent and is now set.

        A key the application wrote meanwhile is never overwritten. A retry after a lost
        reply reports keys set by the first attempt as already present.
        """
        if not items:
            return []

        def send(pipe: Any, i: int) -> object:
            key, value = items[i]
            return pipe.set(key, value, nx=True)

        def run() -> list[bool]:
            keys = [key for key, _ in items]
            return [bool(reply) for reply in self._each_key(keys, send)]

        return self._call(run)

    def existing(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key exists, of whatever type, pipelined."""
        if not keys:
            return []

        def run() -> list[bool]:
            return [bool(reply) for reply in self._each_key(keys, lambda p, i: p.exists(keys[i]))]

        return self._call(run)

    # -- Redis Cluster: every primary scanned, every key sent to its slot's owner ---------
    #
    # Keyed commands go to the owning primary in a pipeline of that node's own connection
    # (2-3 times faster than redis-py's ClusterPipeline, which also refuses MGET). A reply
    # MOVED or ASK (the slot moved since the slot map was read) is sent again through the
    # cluster client, which follows the redirection.

    @property
    def _cluster(self) -> RedisCluster:
        client = self.client
        assert isinstance(client, RedisCluster), "cluster mode only"
        return client

    def _refreshing(self, fn: Callable[[], T]) -> Callable[[], T]:
        """`fn`, preceded by a new read of the slot map when the last attempt met a fault
        that may mean the cluster changed (a node down, a failover, slots moving)."""

        def attempt() -> T:
            # Not before the client exists: making it reads the slot map anyway.
            if self._stale_slots and isinstance(self._client, RedisCluster):
                self._client.nodes_manager.initialize()
            self._stale_slots = False
            try:
                return fn()
            except _TOPOLOGY_FAULTS:
                self._stale_slots = True
                raise

        return attempt

    def _cluster_failure(self, exc: rx.RedisClusterException) -> BalsyncError:
        """The error to show when the cluster client could not be made or find a node."""
        where = f"Redis Cluster at {mask_url(self.url)}"
        cause = exc.__cause__
        if isinstance(cause, rx.AuthenticationError | rx.AuthorizationError):
            return RedisUnavailable(
                f"{where} refused the credentials: {cause}", "check the password in the Redis URL"
            )
        if "cluster mode is not enabled" in str(exc).lower():
            return ConfigError(
                f"{where} is a single server, not a cluster node",
                "drop --cluster and BALSYNC_REDIS_CLUSTER, and use a redis:// URL",
            )
        return RedisUnavailable(
            f"{where} is unavailable after {self.retry_timeout:g}s of retries: {exc}",
            "check that the nodes run, that every slot is served, and the URL and TLS settings",
        )

    def _primaries(self) -> list[ClusterNode]:
        """The primaries, by name: each holds its own part of the keys."""
        nodes = self._call(lambda: list(self._cluster.get_primaries()))  # type: ignore[no-untyped-call]
        return sorted(nodes, key=lambda node: str(node.name))

    def _node_info(self, node: ClusterNode, section: str) -> dict[str, object]:
        client = self._cluster.get_redis_connection(node)
        return cast(dict[str, object], self._call(partial(client.info, section)))

    def _node_scan(
        self, node: ClusterNode, cursor: int, match: bytes, count: int = SCAN_COUNT
    ) -> tuple[int, list[bytes]]:
        client = self._cluster.get_redis_connection(node)
        next_cursor, keys = client.scan(cursor, match=match, count=count)
        return int(next_cursor), cast(list[bytes], keys)

    def _node_pages(self, node: ClusterNode, match: bytes) -> Iterator[Page]:
        """scan_pages on one primary: the MGETs of a page travel with the next SCAN."""
        cursor, keys = self._call(partial(self._node_scan, node, 0, match))
        while keys or cursor != 0:
            if not keys:
                cursor, keys = self._call(partial(self._node_scan, node, cursor, match))
                continue
            scan = None if cursor == 0 else (node, cursor, match)
            values, scanned = self._call(partial(self._mget_by_slot, keys, scan=scan))
            yield self._page(keys, values)
            if scanned is None:
                return
            cursor, keys = scanned

    def _mget_by_slot(
        self,
        keys: list[bytes],
        *,
        no_touch: bool = False,
        scan: tuple[ClusterNode, int, bytes] | None = None,
    ) -> tuple[list[bytes | None], tuple[int, list[bytes]] | None]:
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

    def _each_key(
        self, keys: Sequence[bytes], send: _Send, *, raise_on_error: bool = True
    ) -> list[Any]:
        """One command per key, pipelined: `send(pipe, i)` queues the one for keys[i].

        With `raise_on_error` False a failed command's reply is its exception. In cluster
        mode each command goes to the primary that owns its key's slot.
        """
        if self.cluster:
            replies, _ = self._routed([key_slot(key) for key in keys], send)
            if raise_on_error:
                for reply in replies:
                    if isinstance(reply, Exception):
                        raise reply
            return replies
        pipe = self.client.pipeline(transaction=False)
        for i in range(len(keys)):
            send(pipe, i)
        return list(pipe.execute(raise_on_error=raise_on_error))

    def _routed(
        self,
        slots: Sequence[int],
        send: _Send,
        *,
        no_touch: bool = False,
        tail: tuple[ClusterNode, Callable[[Pipeline], object]] | None = None,
    ) -> tuple[list[Any], Any]:
        """Command i (queued by `send(pipe, i)`) on the primary that owns slots[i]: one
        pipeline per node, replies in order, a failed command's reply its exception.

        `tail` (node, queue) adds one command at the end of that node's pipeline; its reply
        comes second. Connection faults raise, for `_call` to retry the lot.
        """
        cluster = self._cluster
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


@dataclass(frozen=True)
class Identity:
    """A Redis server's run_id and replication history (INFO server, INFO replication),
    and balsync's trust marker in the keyspace read."""

    run_id: str
    replid: str = ""
    replid2: str = ""
    offset: int = 0
    second_offset: int = -1
    marker: bytes | None = None  # balsync's trust marker, as this keyspace holds it
    # FLUSHALL and FLUSHDB calls since the server started (per primary in a cluster): a
    # flush of a node that does not hold the marker changes this instead.
    flushes: str = ""

    @property
    def seen(self) -> str:
        """The server as a run saw it, for telling later whether it is still that one."""
        return f"{self.run_id}/{self.replid}/{self.flushes}"

    def continues(self, replid: str | None, offset: int | None) -> bool:
        """True when this server provably holds every write up to `offset` of the history
        `replid`: it is that history at or past the offset, or a replica promoted from it
        after replicating past the offset (its replid2 and second_repl_offset say so)."""
        if not replid or offset is None:
            return False
        if self.replid == replid:
            return self.offset >= offset
        # second_repl_offset is the first offset of the new history: the old one ran to it.
        return self.replid2 == replid and self.second_offset > offset


@dataclass(frozen=True)
class ServerInfo:
    """What the Redis server says about itself; memory in bytes, 0 maxmemory: no limit."""

    version: str
    role: str
    uptime_s: int
    run_id: str
    used_memory: int
    used_memory_human: str
    maxmemory: int
    maxmemory_human: str
    maxmemory_policy: str
    policy_source: str  # "CONFIG GET", or "INFO" where CONFIG is not permitted
    persistence: tuple[Persistence, ...] = ()  # one per primary


@dataclass(frozen=True)
class Persistence:
    """How one primary keeps its keys across a restart (INFO persistence, CONFIG GET).

    `server` names the primary: host:port in a cluster, the master behind Sentinel, ""
    for the one server of a redis:// URL. `appendfsync` and `save_rules` are None where
    CONFIG GET is not permitted; `save_rules` are (seconds, changes) pairs, () for none.
    """

    server: str
    aof_enabled: bool
    aof_last_write_ok: bool
    appendfsync: str | None
    save_rules: tuple[tuple[int, int], ...] | None
    rdb_last_bgsave_ok: bool
    rdb_last_save_age_s: float | None
    rdb_changes_since_last_save: int
    rdb_saves: int | None  # snapshots since the server started; None before Redis 7


def _save_rules(value: str) -> tuple[tuple[int, int], ...]:
    """CONFIG GET save's "3600 1 300 100" as ((3600, 1), (300, 100)); "" is no rule."""
    numbers = [int(part) for part in value.split() if part.isdigit()]
    return tuple(zip(numbers[::2], numbers[1::2], strict=False))


@dataclass(frozen=True)
class SentinelView:
    """What the sentinels and the master they name say; replicas as (address, online,
    bytes behind the master)."""

    sentinels: tuple[str, ...]
    answering: tuple[str, ...]
    master: str
    replicas: tuple[tuple[str, bool, int], ...]


@dataclass(frozen=True)
class TtlSample:
    """A sample of balance keys: how many were looked at, how many expire, a few of those."""

    sampled: int
    with_ttl: int
    examples: tuple[bytes, ...]


def _text(value: object) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: object) -> int:
    try:
        return int(_text(value) or 0)
    except ValueError:
        return 0


# -- Redis Cluster helpers ----------------------------------------------------------------

# Queues command number i on a node's pipeline, or runs it on the cluster client.
_Send = Callable[[Any, int], object]

# Faults after which the slot map is read again before the next attempt.
_TOPOLOGY_FAULTS = (
    rx.ConnectionError,
    rx.TimeoutError,
    rx.ClusterError,
    rx.AskError,
    rx.TryAgainError,
    rx.SlotNotCoveredError,
)


def _client_options() -> dict[str, Any]:
    """The same timeouts for a single server and a cluster; redis-py's own retries off."""
    return {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "retry": Retry(NoBackoff(), 0),
    }


def _address(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"


def _sentinel_client(url: SentinelUrl) -> tuple[redis.Redis, Sentinel, str]:
    """A client of the service's master, found through the sentinels for every connection:
    after a failover the next reconnect (a retried command) reaches the new master."""
    options = _client_options()
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(url.sentinels),
        sentinel_kwargs={
            key: options[key] for key in ("socket_timeout", "socket_connect_timeout", "retry")
        },
        **options,
    )
    client = sentinel.master_for(  # type: ignore[no-untyped-call]
        url.service,
        db=url.db,
        username=url.username,
        password=url.password,
        ssl=url.tls,
    )
    return cast(redis.Redis, client), sentinel, url.service


def _single_scheme(url: str) -> str:
    """redis+cluster:// -> redis://, rediss+cluster:// -> rediss:// (what redis-py reads)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=parts.scheme.removesuffix(CLUSTER_SUFFIX)))


def _is_transient_in_cluster(exc: BaseException) -> bool:
    """is_transient_redis, plus a cluster's own passing faults: a node unreachable while the
    slot map is read, slots not covered or moving, the cluster down during a failover."""
    if retry.is_transient_redis(exc):
        return True
    if isinstance(exc, rx.SlotNotCoveredError):
        return True
    if isinstance(exc, rx.RedisClusterException):
        cause = exc.__cause__
        if isinstance(cause, rx.AuthenticationError | rx.AuthorizationError):
            return False
        return isinstance(cause, rx.ConnectionError | rx.TimeoutError | OSError)
    return isinstance(exc, rx.ClusterError | rx.AskError | rx.TryAgainError)


def _cluster_info(infos: list[ServerInfo]) -> ServerInfo:
    """One view of a cluster's primaries.

    Memory is summed (maxmemory only where every primary has a limit), uptime is the
    shortest (the latest restart), the run_id is every primary's, sorted, as
    `server_run_id` gives it; versions and policies that differ are all listed, so a mixed
    policy never reads as noeviction.
    """

    def listed(values: Iterator[str]) -> str:
        return ",".join(sorted(set(values)))

    used = sum(info.used_memory for info in infos)
    limited = all(info.maxmemory > 0 for info in infos)
    maxmemory = sum(info.maxmemory for info in infos) if limited else 0
    return ServerInfo(
        version=listed(info.version for info in infos),
        role=f"cluster of {len(infos)} primaries",
        uptime_s=min(info.uptime_s for info in infos),
        run_id=",".join(sorted(info.run_id for info in infos)),
        used_memory=used,
        used_memory_human=_human_bytes(used),
        maxmemory=maxmemory,
        maxmemory_human=_human_bytes(maxmemory),
        maxmemory_policy=listed(info.maxmemory_policy for info in infos),
        policy_source="INFO" if any(i.policy_source == "INFO" for i in infos) else "CONFIG GET",
        persistence=tuple(p for info in infos for p in info.persistence),
    )


def _human_bytes(size: int) -> str:
    """Bytes as INFO's *_human fields write them: 1023B, 1.50K, 2.00M, 3.25G."""
    if size < 1024:
        return f"{size}B"
    value = float(size)
    for unit in ("K", "M", "G", "T"):
        value /= 1024
        if value < 1024 or unit == "T":
            break
    return f"{value:.2f}{unit}"


# -- the application's writes (balance_sync.writer) ----------------------------------------

# An adjustment, applied at most once. KEYS: the balance, the adjustment's record, the
# balance's write counter and, on one server, the dirty set. ARGV: the change in cents, the
# id to mark, the value format, the records' lifetime in seconds, the persisted balance to
# start from where the key is absent ('' for none: an absent key is then reported, never
# taken as 0), and, with it, the write counter and server time the absence was reported at.
# A base read through PostgreSQL is used only while no write has touched the key since it
# was found absent: a key written, synced and deleted again meanwhile would otherwise take
# a base older than its last write.
# Every check comes before the first write: a script that stops half-way keeps its writes.
# Lua numbers are doubles, exact only up to 2^53, and a balance reaches 10^20 cents, so each
# amount travels as two exact halves of ten digits.
_ADJUST_AND_MARK = r"""
local SPLIT = 1e10

local function halves(raw, format)
  local sign, digits
  if format == 'cents' then
    sign, digits = string.match(raw, '^(%-?)(%d+)$')
  else
    local whole, fraction
    sign, whole, fraction = string.match(raw, '^(%-?)(%d+)%.(%d%d?)$')
    if not sign then
      sign, whole = string.match(raw, '^(%-?)(%d+)$')
      fraction = ''
    end
    if sign then
      whole = string.gsub(whole, '^0+', '')
      if #whole > 18 then return nil end
      digits = whole .. fraction .. string.rep('0', 2 - #fraction)
    end
  end
  if not sign then return nil end
  digits = string.gsub(digits, '^0+', '')
  if #digits > 20 then return nil end
  local unit = sign == '-' and -1 or 1
  return unit * (tonumber(string.sub(digits, 1, -11)) or 0),
         unit * (tonumber(string.sub(digits, -10)) or 0)
end

local function text(high, low, format)
  high, low = high + 0, low + 0  -- never a negative zero, which prints as '-0'
  while low < 0 do low, high = low + SPLIT, high - 1 end
  while low >= SPLIT do low, high = low - SPLIT, high + 1 end
  local sign = ''
  if high < 0 then
    sign = '-'
    if low > 0 then high, low = -high - 1, SPLIT - low else high = -high end
  end
  if high >= SPLIT then return nil end
  local digits = string.format('%.0f', low)
  if high > 0 then digits = string.format('%.0f', high) .. string.format('%010.0f', low) end
  if digits == '0' then sign = '' end
  if format == 'cents' then return sign .. digits end
  digits = string.rep('0', 3 - #digits) .. digits
  return sign .. string.sub(digits, 1, -3) .. '.' .. string.sub(digits, -2)
end

local record = redis.call('GET', KEYS[2])
if record then
  local delta, value = string.match(record, '^(%S+) (%S+)$')
  if delta == ARGV[1] then return {'done', value} end
  return {'reused', delta}
end
local raw = redis.pcall('GET', KEYS[1])
if type(raw) == 'table' then return {'invalid', 'a key of another type'} end
if not raw then
  local writes = redis.call('GET', KEYS[3]) or ''
  local now = redis.call('TIME')[1]
  if ARGV[5] == '' or writes ~= ARGV[6]
     or tonumber(now) - tonumber(ARGV[7]) >= tonumber(ARGV[4]) then
    return {'missing', writes, now}
  end
  raw = ARGV[5]
end
local high, low = halves(raw, ARGV[3])
if not high then return {'invalid', raw} end
local change_high, change_low = halves(ARGV[1], 'cents')
local value = text(high + change_high, low + change_low, ARGV[3])
if not value then return {'range', raw} end
redis.call('SET', KEYS[1], value, 'KEEPTTL')
redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[4])
if KEYS[4] then redis.call('SADD', KEYS[4], ARGV[2]) end
redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. value, 'EX', ARGV[4])
return {'applied', value}
"""
_ADJUST_SHA = hashlib.sha1(_ADJUST_AND_MARK.encode()).hexdigest()  # noqa: S324 - Redis names scripts so

AdjustStatus = Literal["applied", "done", "missing", "invalid", "range", "reused"]


@dataclass(frozen=True)
class Adjustment:
    """One adjustment as the script takes it; built alike for the sync and the async writer."""

    keys: tuple[str, ...]
    args: tuple[str | bytes, ...]

    @property
    def command(self) -> tuple[str | bytes | int, ...]:
        """EVALSHA's arguments after the script's digest."""
        return (len(self.keys), *self.keys, *self.args)


@dataclass(frozen=True)
class AdjustReply:
    """What the script answered: `applied` now, `done` before (the same adjustment id),
    `missing` key, or why it wrote nothing (`invalid`, `range`, `reused`), with its detail."""

    status: AdjustStatus
    detail: bytes = b""  # `missing`: the key's write counter when it was found absent
    at: bytes = b""  # `missing`: the server's time then, in seconds

    @classmethod
    def parse(cls, reply: object) -> AdjustReply:
        """The script's reply, whether the client decodes responses or not."""
        parts = [p if isinstance(p, bytes) else str(p).encode() for p in cast(list[Any], reply)]
        status = parts[0].decode()
        assert status in get_args(AdjustStatus), reply
        parts += [b"", b""]
        return cls(cast(AdjustStatus, status), parts[1], parts[2])


class ReplyLost(Exception):
    """The connection failed after a command was sent: it may or may not have run."""


def adjustment_key(balance_key: str, adjustment_id: str) -> str:
    """Where an applied adjustment is remembered for a while.

    The balance key's hash tag (the whole key when it has none) goes in braces, so a Redis
    Cluster keeps both keys in one slot, as one script needs; the name starts outside the
    key prefix, so no SCAN of the balances meets it.
    """
    start = balance_key.find("{")
    end = balance_key.find("}", start + 1) if start >= 0 else -1
    tag = balance_key[start + 1 : end] if start >= 0 and end > start + 1 else balance_key
    return f"balsync:adj:{{{tag}}}:{adjustment_id}"


def write_counter_key(balance_key: str) -> str:
    """The counter of the writer's writes to a balance, in the balance key's slot."""
    return adjustment_key(balance_key, "writes")


class _Tracking:
    """The keys and script arguments both writers share: one format, one set of marks."""

    def __init__(self, prefix: str, *, cluster: bool) -> None:
        self.prefix = prefix
        self.keys = dirty_keys(prefix)
        self.cluster = cluster

    def balance_key(self, telegram_id: int) -> str:
        """The balance key of an id."""
        return f"{self.prefix}{telegram_id}"

    def adjustment(
        self,
        telegram_id: int,
        change_cents: int,
        adjustment_id: str,
        value_format: str,
        *,
        record_ttl: int,
        base: bytes | None = None,
        absent: AdjustReply | None = None,
    ) -> Adjustment:
        """The script call that adds `change_cents` once, starting from `base` (what SET NX
        would put) where the key is still absent as `absent` reported it."""
        key = self.balance_key(telegram_id)
        record = adjustment_key(key, adjustment_id)
        if self.cluster and key_slot(record.encode()) != key_slot(key.encode()):
            raise ConfigError(
                f"the key prefix {self.prefix!r} has a '}}' outside a hash tag: adjustments "
                "cannot be recorded in the balance key's slot",
                "use a prefix without braces, or with a whole {hash tag}",
            )
        counter = write_counter_key(key)
        keys = (key, record, counter) if self.cluster else (key, record, counter, self.keys[0])
        args = (
            str(change_cents),
            str(telegram_id),
            value_format,
            str(record_ttl),
            base or b"",
            absent.detail if absent else b"",
            absent.at if absent else b"0",
        )
        return Adjustment(keys, args)

    def set_keys(self, telegram_id: int) -> list[str]:
        """KEYS of the set script: the balance, the dirty set, the write counter."""
        key = self.balance_key(telegram_id)
        return [key, self.keys[0], write_counter_key(key)]


class TrackedWrites(_Tracking):
    """The application's side of change tracking: write a balance and mark its id dirty in
    one atomic step, so `balsync sync --incremental` never misses a change.

    In a Redis Cluster the balance key and the dirty set live in different slots, so no
    script can touch both: the mark follows the write. A claim between the two only moves
    the id to the next run; a crash between them leaves the change to the next full scan.
    """

    def __init__(self, client: redis.Redis | RedisCluster, prefix: str) -> None:
        super().__init__(prefix, cluster=isinstance(client, RedisCluster))
        self.client = client
        self._set = client.register_script(_SET_AND_MARK)

    def set(self, telegram_id: int, value: bytes, record_ttl: int) -> None:
        """SET the balance key to `value`, count the write, and mark the id."""
        key = self.balance_key(telegram_id)
        if self.cluster:
            counter = write_counter_key(key)
            with self.client.pipeline(transaction=False) as pipe:
                pipe.set(key, value)
                pipe.incr(counter)
                pipe.expire(counter, record_ttl)
                pipe.execute()
            self.client.sadd(self.keys[0], telegram_id)
            return
        self._set(keys=self.set_keys(telegram_id), args=[value, telegram_id, record_ttl])

    def adjust(self, adjustment: Adjustment) -> AdjustReply:
        """Run the adjust script once, never retried: redis-py's own retries are bypassed,
        since a command resent after a lost reply could run twice.

        Raises ReplyLost where the connection failed after the script was sent; a failure to
        connect raises redis-py's ConnectionError (nothing was sent). In a cluster the mark
        follows an applied (or already applied) adjustment; a failed mark is ReplyLost too,
        since the retry with the same id completes it.
        """
        if isinstance(self.client, RedisCluster):
            reply = AdjustReply.parse(self._cluster_script(self.client, adjustment))
            if reply.status in ("applied", "done"):
                try:
                    self.client.sadd(self.keys[0], adjustment.args[1])
                except (rx.ConnectionError, rx.TimeoutError) as exc:
                    raise ReplyLost(str(exc)) from exc
            return reply
        client = self.client
        pool: Any = client.connection_pool
        conn = client.connection or pool.get_connection()
        try:
            return AdjustReply.parse(_script_once(conn, adjustment))
        finally:
            if client.connection is None:
                pool.release(conn)

    def _cluster_script(self, client: Any, adjustment: Adjustment) -> object:
        # A named target node turns off the cluster client's retries after connection
        # faults; MOVED and ASK (the script did not run) are still followed.
        node = client.get_node_from_key(adjustment.keys[0])
        try:
            try:
                return client.execute_command(
                    "EVALSHA", _ADJUST_SHA, *adjustment.command, target_nodes=node
                )
            except rx.NoScriptError:
                return client.execute_command(
                    "EVAL", _ADJUST_AND_MARK, *adjustment.command, target_nodes=node
                )
        except (rx.ConnectionError, rx.TimeoutError) as exc:
            raise ReplyLost(str(exc)) from exc

    def mark(self, telegram_ids: Sequence[int]) -> None:
        """Mark ids changed by other means (a bulk import, a migration)."""
        if telegram_ids:
            self.client.sadd(self.keys[0], *telegram_ids)


# redis-py's connection and cluster methods carry no annotations: they are reached as Any.


def _script_once(conn: Any, adjustment: Adjustment) -> object:
    """EVALSHA on one connection, once (EVAL where the server lost the script: NOSCRIPT
    means it ran nothing); a connection fault after sending is ReplyLost."""
    try:
        try:
            conn.send_command("EVALSHA", _ADJUST_SHA, *adjustment.command)
            return conn.read_response()
        except rx.NoScriptError:
            conn.send_command("EVAL", _ADJUST_AND_MARK, *adjustment.command)
            return conn.read_response()
    except rx.ResponseError:
        raise
    except (rx.ConnectionError, rx.TimeoutError, OSError) as exc:
        conn.disconnect()
        raise ReplyLost(str(exc)) from exc
    except BaseException:
        conn.disconnect()  # interrupted mid-reply: the connection's state is unknown
        raise


class AsyncTrackedWrites(_Tracking):
    """TrackedWrites over redis.asyncio: the same scripts, keys and marks."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        if not isinstance(client, aioredis.Redis):
            raise TypeError(
                "AsyncBalanceWriter takes a redis.asyncio.Redis; an asyncio cluster client is "
                "not supported (use BalanceWriter over redis.cluster.RedisCluster)"
            )
        super().__init__(prefix, cluster=False)
        self.client = client
        self._set = client.register_script(_SET_AND_MARK)

    async def set(self, telegram_id: int, value: bytes, record_ttl: int) -> None:
        """SET the balance key to `value`, count the write, and mark the id, in one script."""
        await self._set(keys=self.set_keys(telegram_id), args=[value, telegram_id, record_ttl])

    async def adjust(self, adjustment: Adjustment) -> AdjustReply:
        """TrackedWrites.adjust: the script once, never retried; ReplyLost after sending."""
        client = self.client
        pool: Any = client.connection_pool
        conn = client.connection or await pool.get_connection()
        try:
            return AdjustReply.parse(await _async_script_once(conn, adjustment))
        finally:
            if client.connection is None:
                await pool.release(conn)

    async def mark(self, telegram_ids: Sequence[int]) -> None:
        """Mark ids changed by other means."""
        if telegram_ids:
            await self.client.sadd(self.keys[0], *telegram_ids)


async def _async_script_once(conn: Any, adjustment: Adjustment) -> object:
    """_script_once over an asyncio connection."""
    try:
        try:
            await conn.send_command("EVALSHA", _ADJUST_SHA, *adjustment.command)
            return await conn.read_response()
        except rx.NoScriptError:
            await conn.send_command("EVAL", _ADJUST_AND_MARK, *adjustment.command)
            return await conn.read_response()
    except rx.ResponseError:
        raise
    except (rx.ConnectionError, rx.TimeoutError, OSError) as exc:
        await conn.disconnect()
        raise ReplyLost(str(exc)) from exc
    except BaseException:
        await conn.disconnect()  # cancelled mid-reply: the connection's state is unknown
        raise
