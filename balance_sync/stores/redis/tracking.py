"""The application's writes (`balance_sync.writer`): a balance SET and its id marked dirty
in one step, and adjustments applied at most once, so `balsync sync --incremental` never
misses a change.

They run on the application's own client (redis.Redis, redis.asyncio.Redis or
redis.cluster.RedisCluster), outside balsync's retry budget.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import redis
import redis.asyncio as aioredis
import redis.exceptions as rx
from redis.cluster import RedisCluster
from redis.crc import key_slot

from balance_sync.errors import ConfigError
from balance_sync.stores.redis.keys import dirty_keys

# The application (or balance_sync.writer) marks an id dirty in the same atomic step as it
# writes the balance.
_SET_AND_MARK = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return 1
"""

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

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.keys = dirty_keys(prefix)

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
        args = (
            str(change_cents),
            str(telegram_id),
            value_format,
            str(record_ttl),
            base or b"",
            absent.detail if absent else b"",
            absent.at if absent else b"0",
        )
        return Adjustment(self._script_keys(key, adjustment_key(key, adjustment_id)), args)

    def _script_keys(self, key: str, record: str) -> tuple[str, ...]:
        """KEYS of the adjust script: on one server the dirty set comes last, for the
        script to mark the id in the same atomic step."""
        return (key, record, write_counter_key(key), self.keys[0])

    def set_keys(self, telegram_id: int) -> list[str]:
        """KEYS of the set script: the balance, the dirty set, the write counter."""
        key = self.balance_key(telegram_id)
        return [key, self.keys[0], write_counter_key(key)]


class TrackedWrites(_Tracking):
    """The application's side of change tracking: write a balance and mark its id dirty in
    one atomic step, so `balsync sync --incremental` never misses a change.

    Made for one server (a redis.Redis, Sentinel's master included) or for a Redis Cluster
    (a redis.cluster.RedisCluster): the client's kind picks the subclass, once.
    """

    client: redis.Redis | RedisCluster

    def __new__(cls, client: redis.Redis | RedisCluster, prefix: str) -> TrackedWrites:
        """The writes for the client's kind of deployment."""
        kind = _ClusterWrites if isinstance(client, RedisCluster) else _ServerWrites
        return super().__new__(kind)

    def __init__(self, client: redis.Redis | RedisCluster, prefix: str) -> None:
        super().__init__(prefix)
        self._set = client.register_script(_SET_AND_MARK)

    def set(self, telegram_id: int, value: bytes, record_ttl: int) -> None:
        """SET the balance key to `value`, count the write, and mark the id."""
        raise NotImplementedError

    def adjust(self, adjustment: Adjustment) -> AdjustReply:
        """Run the adjust script once, never retried: redis-py's own retries are bypassed,
        since a command resent after a lost reply could run twice.

        Raises ReplyLost where the connection failed after the script was sent; a failure to
        connect raises redis-py's ConnectionError (nothing was sent).
        """
        raise NotImplementedError

    def mark(self, telegram_ids: Sequence[int]) -> None:
        """Mark ids changed by other means (a bulk import, a migration)."""
        if telegram_ids:
            self.client.sadd(self.keys[0], *telegram_ids)


class _ServerWrites(TrackedWrites):
    """One server: each script marks the id in the same atomic step as it writes."""

    client: redis.Redis

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        super().__init__(client, prefix)
        self.client = client

    def set(self, telegram_id: int, value: bytes, record_ttl: int) -> None:
        """SET the balance key to `value`, count the write, and mark the id, in one script."""
        self._set(keys=self.set_keys(telegram_id), args=[value, telegram_id, record_ttl])

    def adjust(self, adjustment: Adjustment) -> AdjustReply:
        """The script once, on one connection of the pool (TrackedWrites.adjust)."""
        client = self.client
        pool: Any = client.connection_pool
        conn = client.connection or pool.get_connection()
        try:
            return AdjustReply.parse(_script_once(conn, adjustment))
        finally:
            if client.connection is None:
                pool.release(conn)


class _ClusterWrites(TrackedWrites):
    """A Redis Cluster: the balance key and the dirty set live in different slots, so no
    script can touch both and the mark follows the write. A claim between the two only
    moves the id to the next run; a crash between them leaves the change to the next full
    scan."""

    client: RedisCluster

    def __init__(self, client: RedisCluster, prefix: str) -> None:
        super().__init__(client, prefix)
        self.client = client

    def _script_keys(self, key: str, record: str) -> tuple[str, ...]:
        """The balance, its record and its write counter, all in the balance key's slot."""
        if key_slot(record.encode()) != key_slot(key.encode()):
            raise ConfigError(
                f"the key prefix {self.prefix!r} has a '}}' outside a hash tag: adjustments "
                "cannot be recorded in the balance key's slot",
                "use a prefix without braces, or with a whole {hash tag}",
            )
        return (key, record, write_counter_key(key))

    def set(self, telegram_id: int, value: bytes, record_ttl: int) -> None:
        """SET the balance key and count the write in one pipeline, then mark the id."""
        key = self.balance_key(telegram_id)
        counter = write_counter_key(key)
        with self.client.pipeline(transaction=False) as pipe:  # type: ignore[no-untyped-call]
            pipe.set(key, value)
            pipe.incr(counter)
            pipe.expire(counter, record_ttl)
            pipe.execute()
        self.client.sadd(self.keys[0], telegram_id)

    def adjust(self, adjustment: Adjustment) -> AdjustReply:
        """The script once on the owning primary; the mark follows an applied (or already
        applied) adjustment. A failed mark is ReplyLost too, since the retry with the same
        id completes it."""
        reply = AdjustReply.parse(self._script(adjustment))
        if reply.status in ("applied", "done"):
            try:
                self.client.sadd(self.keys[0], adjustment.args[1])
            except (rx.ConnectionError, rx.TimeoutError) as exc:
                raise ReplyLost(str(exc)) from exc
        return reply

    def _script(self, adjustment: Adjustment) -> object:
        # A named target node turns off the cluster client's retries after connection
        # faults; MOVED and ASK (the script did not run) are still followed.
        client: Any = self.client
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
        super().__init__(prefix)
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
