"""Every Redis command balsync sends lives here.

Reads are plain round trips retried under the policy in `retry`; redis-py's own retries are
off so that one budget (`--retry-timeout`) bounds the whole run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import TypeVar, cast

import redis
import redis.exceptions as rx
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from balance_sync import retry
from balance_sync.errors import ConfigError, RedisUnavailable
from balance_sync.settings import mask_url

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
return 1
"""
_INCRBY_AND_MARK = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return value
"""


def dirty_keys(prefix: str) -> tuple[str, str]:
    """The dirty set and the running claim of a key prefix.

    One hash tag puts both in one cluster slot (RENAME-like moves need that), and neither
    starts with the prefix, so a full SCAN never mistakes them for balances.
    """
    tag = "{balsync:dirty:" + prefix + "}"
    return tag, tag + ":claimed"


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
        self.client: redis.Redis = redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_keepalive=True,
            health_check_interval=30,
            retry=Retry(NoBackoff(), 0),
        )
        self._set_if_equal = self.client.register_script(_SET_IF_EQUAL)
        self._claim = self.client.register_script(_CLAIM)

    def close(self) -> None:
        """Release the connection pool."""
        self.client.close()

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return retry.call("Redis", self.retry_timeout, retry.is_transient_redis, fn)
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
        except rx.ResponseError as exc:
            if retry.is_transient_redis(exc):
                raise RedisUnavailable(
                    f"Redis at {mask_url(self.url)} stayed busy after "
                    f"{self.retry_timeout:g}s of retries: {exc}",
                    "check the server's log (loading, failover or a busy script)",
                ) from exc
            raise

    def ping(self) -> None:
        """Check that Redis answers."""
        self._call(self.client.ping)

    def server_run_id(self) -> str:
        """The server's INFO run_id: it changes whenever Redis restarts or fails over."""
        info = self._call(partial(self.client.info, "server"))
        return str(info.get("run_id", ""))

    def set_if_equal(self, items: Sequence[tuple[bytes, bytes, bytes]]) -> int:
        """For each (key, expected, new): SET key new only if it still holds `expected`.

        Atomic per key (a Lua script), so a write the application makes meanwhile wins.
        Returns how many keys were set.
        """
        if not items:
            return 0

        def run() -> int:
            pipe = self.client.pipeline(transaction=False)
            for key, expected, new in items:
                self._set_if_equal(keys=[key], args=[expected, new], client=pipe)
            return sum(int(r) for r in pipe.execute())

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
        self._call(partial(self.client.delete, dirty_keys(prefix)[1]))

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
        """
        match = prefix.encode() + b"*"
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
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.type(key)
        return list(pipe.execute())

    # -- operator views: health and stats ----------------------------------------------

    def server_info(self) -> ServerInfo:
        """Version, role, uptime, memory and eviction policy of the server (INFO, CONFIG GET).

        The policy comes from CONFIG GET; where an ACL forbids CONFIG, or a managed service
        renamed it away, INFO's `maxmemory_policy` field says the same thing.
        """
        info = cast(dict[str, object], self._call(self.client.info))
        policy_source = "CONFIG GET"
        try:
            reply = cast(
                dict[str, object],
                self._call(partial(self.client.config_get, "maxmemory-policy")),
            )
            policy = _text(reply.get("maxmemory-policy"))
        except rx.ResponseError:
            policy, policy_source = "", "INFO"
        if not policy:
            policy, policy_source = _text(info.get("maxmemory_policy")) or "unknown", "INFO"
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
        )

    def count_keys(self, prefix: str) -> int:
        """How many keys lie under `prefix`, counted with SCAN (DBSIZE would count every key).

        A key met twice while the keyspace is rehashed counts twice, so the figure is exact
        only while nobody adds keys; stats need no more.
        """
        match = prefix.encode() + b"*"
        cursor, keys = self._call(partial(self._scan, 0, match))
        total = len(keys)
        while cursor != 0:
            cursor, keys = self._call(partial(self._scan, cursor, match))
            total += len(keys)
        return total

    def sample_ttls(self, prefix: str, limit: int) -> TtlSample:
        """The first `limit` keys under `prefix` that SCAN meets, and which of them carry a TTL."""
        match = prefix.encode() + b"*"
        seen: dict[bytes, None] = {}
        cursor = 0
        while True:
            cursor, keys = self._call(partial(self._scan, cursor, match))
            seen.update(dict.fromkeys(keys))
            if cursor == 0 or len(seen) >= limit:
                break
        sample = list(seen)[:limit]
        ttls = self._call(partial(self._ttls, sample)) if sample else []
        present = [(key, ttl) for key, ttl in zip(sample, ttls, strict=True) if ttl != -2]
        expiring = tuple(key for key, ttl in present if ttl >= 0)
        return TtlSample(sampled=len(present), with_ttl=len(expiring), examples=expiring[:3])

    def _ttls(self, keys: list[bytes]) -> list[int]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.ttl(key)
        return [int(ttl) for ttl in pipe.execute()]

    # -- clear-cache and restore --------------------------------------------------------

    def scan_keys(self, prefix: str, count: int = SCAN_COUNT) -> Iterator[list[bytes]]:
        """Every key under `prefix`, one SCAN page at a time, without reading any value.

        Reading no value lets a caller ask OBJECT IDLETIME first: a GET would reset it.
        """
        match = prefix.encode() + b"*"

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
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.object("idletime", key)
            return [None if idle is None else int(idle) for idle in pipe.execute()]

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

        def run() -> list[bool]:
            pipe = self.client.pipeline(transaction=False)
            for key, raw in items:
                self._compare_and_delete(keys=[key], args=[raw], client=pipe)
            replies = pipe.execute(raise_on_error=False)
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
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.memory_usage(key)
            return sum(int(used or 0) for used in pipe.execute())

        try:
            return self._call(run)
        except rx.ResponseError:
            return None

    def used_memory(self) -> int | None:
        """INFO's used_memory in bytes, or None where INFO is refused."""
        try:
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

        def run() -> list[bool]:
            pipe = self.client.pipeline(transaction=False)
            for key, value in items:
                pipe.set(key, value, nx=True)
            return [bool(reply) for reply in pipe.execute()]

        return self._call(run)

    def existing(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key exists, of whatever type, pipelined."""
        if not keys:
            return []

        def run() -> list[bool]:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return [bool(reply) for reply in pipe.execute()]

        return self._call(run)


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


class TrackedWrites:
    """The application's side of change tracking: write a balance and mark its id dirty in
    one atomic step, so `balsync sync --incremental` never misses a change."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.keys = dirty_keys(prefix)
        self._set = client.register_script(_SET_AND_MARK)
        self._incrby = client.register_script(_INCRBY_AND_MARK)

    def set(self, telegram_id: int, value: bytes) -> None:
        """SET the balance key to `value` and mark the id."""
        self._set(keys=[f"{self.prefix}{telegram_id}", self.keys[0]], args=[value, telegram_id])

    def incrby(self, telegram_id: int, delta: int) -> int:
        """INCRBY an integer balance (cents) and mark the id; the new value."""
        key = f"{self.prefix}{telegram_id}"
        return int(self._incrby(keys=[key, self.keys[0]], args=[delta, telegram_id]))

    def replace(self, telegram_id: int, compute: Callable[[bytes | None], bytes]) -> bytes:
        """Read, compute and write a balance optimistically (WATCH/MULTI), marking the id.

        Retried while another client changes the key in between: no update is lost.
        """
        key = f"{self.prefix}{telegram_id}"
        while True:
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    new = compute(cast(bytes | None, pipe.get(key)))
                    pipe.multi()
                    pipe.set(key, new)
                    pipe.sadd(self.keys[0], telegram_id)
                    pipe.execute()
                    return new
                except rx.WatchError:
                    continue

    def mark(self, telegram_ids: Sequence[int]) -> None:
        """Mark ids changed by other means (a bulk import, a migration)."""
        if telegram_ids:
            self.client.sadd(self.keys[0], *telegram_ids)
