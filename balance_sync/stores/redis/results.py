"""What the store returns: typed values read from Redis."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Page:
    """One SCAN page with its values: string keys with their bytes, other types by name."""

    values: list[tuple[bytes, bytes]] = field(default_factory=list)
    wrong_type: list[tuple[bytes, str]] = field(default_factory=list)


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
