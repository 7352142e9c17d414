"""The store the operations use: each operation written once, on top of the topology the
URL names (`topology`) and the guarded writes (`mutations`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import cast

import redis
import redis.exceptions as rx
from redis.cluster import RedisCluster

from balance_sync.errors import ConfigError
from balance_sync.settings import mask_url
from balance_sync.stores.redis.keys import dirty_keys
from balance_sync.stores.redis.mutations import Mutations
from balance_sync.stores.redis.results import Identity, Page, SentinelView, ServerInfo, TtlSample
from balance_sync.stores.redis.topology import SCAN_COUNT, topology_for


class RedisStore:
    """A connection to the Redis that holds the balances, with balsync's retry budget."""

    def __init__(self, url: str, retry_timeout: float) -> None:
        self.url = url
        self.retry_timeout = retry_timeout
        self.topology = topology_for(url, retry_timeout)
        self.sentinel = self.topology.sentinel
        self._mutations = Mutations(self.topology)

    @property
    def client(self) -> redis.Redis | RedisCluster:
        """The single server's client, or the cluster's (made on first use)."""
        return self.topology.client

    def close(self) -> None:
        """Release the connection pool."""
        self.topology.close()

    def ping(self) -> None:
        """Check that Redis answers (in cluster mode, every node)."""

        def run() -> None:
            self.client.ping()  # `client` read in here: a cluster client connects when made

        self.topology.call(run)

    # -- the restart guard ---------------------------------------------------------------

    def identity(self, marker: str) -> Identity:
        """Which server answers, where its replication history stands, and the trust
        marker balsync left in this keyspace (key `marker`).

        Behind Sentinel (or any single server) the history lets a promoted replica prove
        that it holds everything its old master had; a cluster offers its run_ids only.
        The marker is gone after FLUSHALL, FLUSHDB or a restart without persistence, and
        was never in another database of the same server.
        """
        return self.topology.identity(marker)

    def set_marker(self, marker: str, token: str) -> None:
        """Leave balsync's trust marker in this keyspace (it travels with replication)."""
        self.topology.call(partial(self.client.set, marker, token))

    def server_run_id(self) -> str:
        """The server's INFO run_id: it changes whenever Redis restarts or fails over.

        In cluster mode, the run_ids of all primaries, sorted and joined with ',': a
        restart or failover of any one changes it.
        """
        return self.topology.run_id()

    def set_if_equal(self, items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bool]:
        """For each (key, expected, new): SET key new only if it still holds `expected`.

        Atomic per key, so a write the application makes meanwhile wins. True where the key
        was set; a retry after a lost reply reports keys set by the first attempt as not set.
        """
        return self._mutations.set_if_equal(items)

    # -- reading the balances --------------------------------------------------------------

    def scan_pages(self, prefix: str) -> Iterator[Page]:
        """Every key under `prefix` with its value, page by page (SCAN, never KEYS).

        MGET of one page travels in the same round trip as SCAN of the next, so the server
        is never waiting on us. A key can appear in two pages if the keyspace is rehashed
        during the scan; writes are idempotent, so that costs nothing but a count.

        In cluster mode every primary is scanned in turn, the same way.
        """
        for keys, values in self.topology.pages(prefix.encode() + b"*"):
            yield self._page(keys, values)

    def scan_keys(self, prefix: str, count: int = SCAN_COUNT) -> Iterator[list[bytes]]:
        """Every key under `prefix`, one SCAN page at a time, without reading any value.

        Reading no value lets a caller ask OBJECT IDLETIME first: a GET would reset it.
        In cluster mode every primary is scanned in turn; a page holds one node's keys.
        """
        return self.topology.scan(prefix.encode() + b"*", count)

    def read_values(self, keys: list[bytes]) -> Page:
        """The values of `keys` (MGET); keys of another type by name, keys gone left out.

        Where the server knows CLIENT NO-TOUCH (Redis 7.2+, Valkey) the read leaves the keys'
        idle time alone, so a dry run does not make keys look used; older servers ignore it.
        """
        if not keys:
            return Page()
        values = self.topology.call(partial(self.topology.mget, keys, no_touch=True))
        return self._page(keys, values)

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
            types = self.topology.call(
                partial(self.topology.each_key, missing, lambda pipe, i: pipe.type(missing[i]))
            )
            for key, kind in zip(missing, types, strict=True):
                name = kind.decode() if isinstance(kind, bytes) else str(kind)
                if name != "none":
                    page.wrong_type.append((key, name))
        return page

    # -- change tracking (incremental sync) ---------------------------------------------

    def claim_dirty(self, prefix: str) -> int:
        """Move the ids marked dirty into the run's claim, atomically; how many are claimed.

        A claim left by a run that died is kept and merged, so its ids are synced now.
        """
        return self._mutations.claim(prefix)

    def release_claim(self, prefix: str) -> None:
        """Forget the claimed ids: PostgreSQL has committed every one of them."""
        self._mutations.release_claim(prefix)

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
                cursor, members = self.topology.call(partial(self._sscan, name, cursor))
                if include_unclaimed:  # an id may wait in both sets
                    members = [m for m in members if m not in seen]
                    seen.update(members)
                keys = [raw_prefix + m for m in members]
                if keys:
                    values = self.topology.call(partial(self.topology.mget, keys))
                    yield self._page(keys, values)
                if cursor == 0:
                    break

    def _sscan(self, name: str, cursor: int) -> tuple[int, list[bytes]]:
        next_cursor, members = self.client.sscan(name, cursor, count=SCAN_COUNT)
        return int(next_cursor), cast(list[bytes], members)

    def marked_count(self, prefix: str) -> int:
        """How many ids wait in the dirty set and in a claim (SCARD): an incremental run's work."""
        call = self.topology.call
        return sum(int(call(partial(self.client.scard, name))) for name in dirty_keys(prefix))

    # -- operator views: health and stats ----------------------------------------------

    def server_info(self) -> ServerInfo:
        """Version, role, uptime, memory, eviction policy and persistence of the server
        (INFO, CONFIG GET); in cluster mode, the primaries together."""
        return self.topology.server_info()

    def sentinel_view(self) -> SentinelView:
        """Behind Sentinel: which sentinels answer, the master they name, and its replicas
        with how far each is behind (INFO replication on the master)."""
        return self.topology.sentinel_view()

    def database_size(self) -> int:
        """Every key of the database, whatever its name (DBSIZE; a cluster's primaries summed).

        Read in constant time: an upper bound on the balance keys, where counting them with
        SCAN would cost as much as the sync itself.
        """
        return self.topology.database_size()

    def used_memory(self) -> int | None:
        """INFO's used_memory in bytes (summed over a cluster's primaries), or None where INFO
        is refused."""
        try:
            return self.topology.used_memory()
        except rx.ResponseError:
            return None

    def count_keys(self, prefix: str) -> int:
        """How many keys lie under `prefix`, counted with SCAN (DBSIZE would count every key).

        A key met twice while the keyspace is rehashed counts twice, so the figure is exact
        only while nobody adds keys; stats need no more.
        """
        return sum(len(keys) for keys in self.scan_keys(prefix))

    def sample_ttls(self, prefix: str, limit: int) -> TtlSample:
        """The first `limit` keys under `prefix` that SCAN meets, and which of them carry a TTL."""
        sample = self._first_keys(prefix, limit)
        ttls = self.topology.call(partial(self._ttls, sample)) if sample else []
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
        replies = self.topology.each_key(keys, lambda pipe, i: pipe.ttl(keys[i]))
        return [int(ttl) for ttl in replies]

    # -- clear-cache and restore --------------------------------------------------------

    def idle_seconds(self, keys: Sequence[bytes]) -> list[int | None]:
        """OBJECT IDLETIME of each key (None: gone meanwhile), pipelined; it touches no key."""

        def run() -> list[int | None]:
            replies = self.topology.each_key(keys, lambda pipe, i: pipe.object("idletime", keys[i]))
            return [None if idle is None else int(idle) for idle in replies]

        try:
            return self.topology.call(run)
        except rx.ResponseError as exc:
            # Under an LFU maxmemory-policy the server keeps access counts, not idle times.
            raise ConfigError(
                f"Redis at {mask_url(self.url)} cannot tell how long keys were idle: {exc}",
                "run without --idle-days, or use an LRU or noeviction maxmemory-policy",
            ) from exc

    def delete_if_unchanged(self, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """For each (key, raw): DEL the key only if it still holds exactly `raw`.

        Atomic per key, so a value the application writes after `raw` was read survives.
        True where the key was deleted; a retry after a lost reply reports keys deleted by
        the first attempt as kept.
        """
        return self._mutations.delete_if_unchanged(items)

    def set_missing(self, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """SET key value NX for each, pipelined: True where the key was absent and is now set.

        A key the application wrote meanwhile is never overwritten. A retry after a lost
        reply reports keys set by the first attempt as already present.
        """
        return self._mutations.set_missing(items)

    def memory_usage(self, keys: Sequence[bytes]) -> int | None:
        """Bytes the keys take (MEMORY USAGE, summed), or None where the server refuses it."""
        if not keys:
            return 0

        def run() -> int:
            replies = self.topology.each_key(keys, lambda pipe, i: pipe.memory_usage(keys[i]))
            return sum(int(used or 0) for used in replies)

        try:
            return self.topology.call(run)
        except rx.ResponseError:
            return None

    def existing(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key exists, of whatever type, pipelined."""
        if not keys:
            return []

        def run() -> list[bool]:
            replies = self.topology.each_key(keys, lambda pipe, i: pipe.exists(keys[i]))
            return [bool(reply) for reply in replies]

        return self.topology.call(run)
