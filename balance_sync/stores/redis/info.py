"""What a server says about itself: INFO and CONFIG GET read into balsync's values."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import cast

import redis
import redis.exceptions as rx

from balance_sync.stores.redis.client import Calls
from balance_sync.stores.redis.results import Identity, Persistence, ServerInfo


def read_server(calls: Calls, client: redis.Redis, name: Callable[[], str]) -> ServerInfo:
    """Version, role, uptime, memory and eviction policy of one server (INFO, CONFIG GET),
    `name` telling how Persistence names it.

    The policy comes from CONFIG GET; where an ACL forbids CONFIG, or a managed service
    renamed it away, INFO's `maxmemory_policy` field says the same thing.
    """
    info = cast(dict[str, object], calls(client.info))
    policy_source = "CONFIG GET"
    try:
        reply = cast(dict[str, object], calls(partial(client.config_get, "maxmemory-policy")))
        policy = as_text(reply.get("maxmemory-policy"))
    except rx.ResponseError:
        policy, policy_source = "", "INFO"
    if not policy:
        policy, policy_source = as_text(info.get("maxmemory_policy")) or "unknown", "INFO"
    return ServerInfo(
        version=as_text(info.get("valkey_version") or info.get("redis_version")),
        role=as_text(info.get("role")),
        uptime_s=as_int(info.get("uptime_in_seconds")),
        run_id=as_text(info.get("run_id")),
        used_memory=as_int(info.get("used_memory")),
        used_memory_human=as_text(info.get("used_memory_human")),
        maxmemory=as_int(info.get("maxmemory")),
        maxmemory_human=as_text(info.get("maxmemory_human")),
        maxmemory_policy=policy,
        policy_source=policy_source,
        persistence=(_persistence(calls, client, name(), info),),
    )


def server_identity(
    info: dict[str, object], commandstats: dict[str, object], marker: bytes | None
) -> Identity:
    """One server's identity from INFO server and replication (`info`), INFO commandstats
    and the trust marker's value."""
    return Identity(
        run_id=as_text(info.get("run_id")),
        replid=as_text(info.get("master_replid")),
        replid2=as_text(info.get("master_replid2")),
        offset=as_int(info.get("master_repl_offset")),
        second_offset=as_int(info.get("second_repl_offset")),
        marker=marker,
        flushes=str(flush_count(commandstats)),
    )


def _persistence(
    calls: Calls,
    client: redis.Redis,
    name: str,
    info: dict[str, object],
) -> Persistence:
    """How one server keeps its keys on disk: INFO persistence, and CONFIG GET save and
    appendfsync where permitted (None where not: the caller infers from INFO)."""
    configured: dict[str, str | None] = {}
    for parameter in ("save", "appendfsync"):
        try:
            reply = cast(dict[str, object], calls(partial(client.config_get, parameter)))
            configured[parameter] = as_text(reply.get(parameter)) if parameter in reply else None
        except rx.ResponseError:
            configured[parameter] = None
    save = configured["save"]
    # The server's own clock: the host running balsync may be set otherwise.
    now = as_int(info.get("server_time_usec")) / 1e6 or time.time()
    last_save = as_int(info.get("rdb_last_save_time"))
    return Persistence(
        server=name,
        aof_enabled=as_int(info.get("aof_enabled")) == 1,
        aof_last_write_ok=as_text(info.get("aof_last_write_status")) in ("ok", ""),
        appendfsync=configured["appendfsync"],
        save_rules=None if save is None else parse_save_rules(save),
        rdb_last_bgsave_ok=as_text(info.get("rdb_last_bgsave_status")) in ("ok", ""),
        rdb_last_save_age_s=max(0.0, now - last_save) if last_save else None,
        rdb_changes_since_last_save=as_int(info.get("rdb_changes_since_last_save")),
        rdb_saves=as_int(info.get("rdb_saves")) if "rdb_saves" in info else None,
    )


def parse_save_rules(value: str) -> tuple[tuple[int, int], ...]:
    """CONFIG GET save's "3600 1 300 100" as ((3600, 1), (300, 100)); "" is no rule."""
    numbers = [int(part) for part in value.split() if part.isdigit()]
    return tuple(zip(numbers[::2], numbers[1::2], strict=False))


def as_text(value: object) -> str:
    """An INFO or CONFIG field as text ("" for none), whether the client decodes replies."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def as_int(value: object) -> int:
    """An INFO field as a number, 0 where it is absent or not one."""
    try:
        return int(as_text(value) or 0)
    except ValueError:
        return 0


def flush_count(commandstats: dict[str, object]) -> int:
    """FLUSHALL and FLUSHDB calls in INFO commandstats."""
    calls = 0
    for name in ("cmdstat_flushall", "cmdstat_flushdb"):
        stats = commandstats.get(name)
        if isinstance(stats, dict):
            calls += as_int(stats.get("calls"))
    return calls


def combined_info(infos: list[ServerInfo]) -> ServerInfo:
    """One view of a cluster's primaries.

    Memory is summed (maxmemory only where every primary has a limit), uptime is the
    shortest (the latest restart), the run_id is every primary's, sorted, as
    `RedisStore.server_run_id` gives it; versions and policies that differ are all listed,
    so a mixed policy never reads as noeviction.
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
