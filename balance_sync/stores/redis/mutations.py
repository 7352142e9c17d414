"""Guarded mutations: writes that hold only while a key is as balsync last saw it, so a
value the application writes meanwhile always wins (clear-cache, restore, the restart
guard's conflict resolution, and the claim of an incremental run)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property, partial
from typing import Any

from redis.commands.core import Script

from balance_sync import retry
from balance_sync.stores.redis.keys import dirty_keys
from balance_sync.stores.redis.topology import Topology

# clear-cache: delete a key only while it holds the value that was found persisted.
COMPARE_AND_DELETE = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) "
    "else return 0 end"
)

_SET_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
return 0
"""

_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SUNIONSTORE', KEYS[2], KEYS[2], KEYS[1])
  redis.call('DEL', KEYS[1])
end
return redis.call('SCARD', KEYS[2])
"""


class Mutations:
    """Compare-and-set, compare-and-delete, set-if-missing and the dirty-set claim, each
    one pipeline (one per owning primary in a cluster) under the retry budget.

    A retry after a lost reply reports the keys written by the first attempt as not
    written: the caller then believes less, never more.
    """

    def __init__(self, topology: Topology) -> None:
        self._topology = topology

    # redis-py loads a script with SCRIPT LOAD when a pipeline first needs it, and again
    # only if the server lost it (a restart, SCRIPT FLUSH).

    @cached_property
    def _set_if_equal(self) -> Script:
        return self._topology.client.register_script(_SET_IF_EQUAL)

    @cached_property
    def _compare_and_delete(self) -> Script:
        return self._topology.client.register_script(COMPARE_AND_DELETE)

    @cached_property
    def _claim(self) -> Script:
        return self._topology.client.register_script(_CLAIM)

    def set_if_equal(self, items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bool]:
        """For each (key, expected, new): SET key new (KEEPTTL) only if it still holds
        `expected`, atomically per key (a Lua script). True where the key was set."""
        if not items:
            return []

        def send(pipe: Any, i: int) -> object:
            key, expected, new = items[i]
            return self._set_if_equal(keys=[key], args=[expected, new], client=pipe)

        def run() -> list[bool]:
            keys = [item[0] for item in items]
            return [int(r) == 1 for r in self._topology.each_key(keys, send)]

        return self._topology.call(run)

    def delete_if_unchanged(self, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """For each (key, raw): DEL the key only if it still holds exactly `raw`, atomically
        per key (a Lua compare-and-delete). True where the key was deleted."""
        if not items:
            return []

        def send(pipe: Any, i: int) -> object:
            key, raw = items[i]
            return self._compare_and_delete(keys=[key], args=[raw], client=pipe)

        def run() -> list[bool]:
            keys = [key for key, _ in items]
            replies = self._topology.each_key(keys, send, raise_on_error=False)
            for reply in replies:
                if isinstance(reply, Exception) and retry.is_transient_redis(reply):
                    raise reply
            # Any other error (WRONGTYPE: the key became another type) deleted nothing.
            return [reply == 1 for reply in replies]

        return self._topology.call(run)

    def set_missing(self, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """SET key value NX for each: True where the key was absent and is now set; a key
        the application wrote meanwhile is never overwritten."""
        if not items:
            return []

        def send(pipe: Any, i: int) -> object:
            key, value = items[i]
            return pipe.set(key, value, nx=True)

        def run() -> list[bool]:
            keys = [key for key, _ in items]
            return [bool(reply) for reply in self._topology.each_key(keys, send)]

        return self._topology.call(run)

    def claim(self, prefix: str) -> int:
        """Move the ids marked dirty into the run's claim, atomically (a Lua script, both
        keys in one slot); how many are claimed. A claim left by a run that died is kept
        and merged."""
        dirty, claim = dirty_keys(prefix)
        return int(self._topology.call(partial(self._claim, keys=[dirty, claim])))

    def release_claim(self, prefix: str) -> None:
        """DEL the claim: PostgreSQL has committed every claimed id."""
        self._topology.call(lambda: self._topology.client.delete(dirty_keys(prefix)[1]))
