"""The Redis-restart guard: a Redis whose identity changed is trusted only on evidence.

A Redis that restarted, failed over, or was replaced behind the same address may have lost
keys or come back from an old snapshot; an application that then rebuilds a balance from
zero makes a value that looks like any other. So while a restart is pending no row that
differs from Redis is overwritten, across runs, until balsync has evidence that nothing
persisted was lost, or the operator decides.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Protocol

from balance_sync.errors import RedisChanged
from balance_sync.settings import TableName
from balance_sync.stores.postgres import Database, Memory, RedisTrust, Schema, TargetTable, Trust
from balance_sync.stores.redis import Identity, RedisStore, trust_marker

log = logging.getLogger(__name__)


class GuardOptions(Protocol):
    """What the guard needs to know of a run's options."""

    @property
    def dry_run(self) -> bool: ...

    @property
    def accept_redis_restart(self) -> bool: ...

    @property
    def full_scan(self) -> bool: ...


@dataclass(frozen=True)
class Assessment:
    """How the Redis answering now stands to the one balsync trusts for a table."""

    pending: bool  # no differing row may be overwritten
    verify_only: bool = False  # trust migrated from an older version: finding every key is enough
    reason: str = ""  # why it may be trusted now, when it may


def assess(identity: Identity, trusted: Trust | None, remembered: bool) -> Assessment:
    """Compare the server read (`identity`) with the trusted one; `remembered`: balsync
    remembers balances synced from these keys, so something persisted could be lost."""
    if trusted is None:
        if remembered:
            return Assessment(pending=True)
        return Assessment(pending=False, reason="first run: nothing persisted that could be lost")
    marked = trusted.token is not None and identity.marker == trusted.token.encode()
    history = not trusted.replid or identity.replid == trusted.replid
    unflushed = trusted.flushes is None or identity.flushes == trusted.flushes
    if trusted.redis_id == identity.run_id and history and marked and unflushed:
        return Assessment(pending=False)
    if marked and identity.continues(trusted.replid, trusted.repl_offset):
        return Assessment(
            pending=False, reason="failover: its replication history continues balsync's reads"
        )
    if trusted.token is None and trusted.redis_id == identity.run_id and history and unflushed:
        return Assessment(pending=True, verify_only=True)
    return Assessment(pending=True)


@dataclass
class RestartGuard:
    """Whether the Redis a run reads is the one balsync trusts, and what earns it trust.

    The server is the one trusted while its run_id, its replication id and balsync's trust
    marker in the keyspace are unchanged: a restart, a failover or failback, FLUSHALL, or
    another server or database behind the same address changes one of them. Another one
    may have lost keys or come back from an old snapshot, so a run overwrites no differing
    row until it is trusted. Trust comes only from evidence that nothing persisted was
    lost: a replication history that provably continues what balsync last read (a clean
    failover), a full scan that found every remembered key agreeing, or the operator
    (--accept-redis-restart). A run that merely held nothing proves nothing.
    """

    redis: RedisStore
    control: Database
    target: TargetTable
    options: GuardOptions
    marker: str  # the trust marker's key
    key_prefix: str
    identity: Identity
    assessment: Assessment

    @property
    def pending(self) -> bool:
        """True while no row that differs from Redis may be overwritten."""
        return self.assessment.pending

    @classmethod
    def open(
        cls,
        redis: RedisStore,
        control: Database,
        target: TargetTable,
        options: GuardOptions,
        *,
        key_prefix: str,
        run_id: int | None,
    ) -> RestartGuard:
        """Compare the Redis this run reads with the trusted one; trust it where that is free."""
        table = target.table
        # Only a dry run comes here without the schema: nothing is persisted, nothing lost.
        schema = not options.dry_run or Schema(control).schema_present()
        marker = trust_marker(key_prefix, control.key(table))
        identity = redis.identity(marker)
        trusted = RedisTrust(control).trusted_redis(table) if schema else None
        remembered = schema and Memory(control).remembers_any(table, key_prefix)
        found = assess(identity, trusted, remembered)
        if found.pending and run_id is not None:
            RedisTrust(control).record_seen(run_id, identity.seen)
        if found.pending and options.accept_redis_restart:
            found = _accepted(control, table, identity, run_id)
        guard = cls(redis, control, target, options, marker, key_prefix, identity, found)
        if found.reason and not options.dry_run:
            guard._trust(found.reason)
        if found.pending and not options.dry_run:
            # This run commits values from a server no history vouches for: from now on only
            # a full scan or the operator may trust again, never a replication offset.
            Memory(control).forget_history(table)
        if found.pending:
            log.warning(
                "Redis restart pending: the server read (run_id %s…) is not the one balsync "
                "trusts (run_id %s…); new ids are inserted, but no row that differs is "
                "overwritten",
                identity.run_id[:8],
                (trusted.redis_id if trusted else "none")[:8],
            )
        return guard

    def _trust(self, reason: str) -> None:
        """Trust the server read from now on: a new marker in Redis, then the record; only
        if the server that took the marker is still the one that was judged."""
        token = uuid.uuid4().hex
        self.redis.set_marker(self.marker, token)
        now = self.redis.identity(self.marker)
        judged = self.identity
        if (now.run_id, now.replid, now.flushes) != (judged.run_id, judged.replid, judged.flushes):
            raise _changed(judged, now)
        self.identity = now
        RedisTrust(self.control).trust_redis(
            self.target.table,
            Trust(now.run_id, now.replid or None, now.offset, token, now.flushes),
            reason,
        )
        log.info("trusting Redis run_id %s…: %s", self.identity.run_id[:8], reason)

    def check(self) -> Trust | None:
        """Stop the run if Redis is no longer the server it started reading from; else, for
        a trusted server, how far its history has come (recorded with each batch)."""
        now = self.redis.identity(self.marker)
        start = self.identity
        if (now.run_id, now.replid, now.marker, now.flushes) != (
            start.run_id,
            start.replid,
            start.marker,
            start.flushes,
        ):
            raise _changed(start, now)
        if self.pending:
            return None
        return Trust(now.run_id, now.replid or None, now.offset)

    def finish(self) -> None:
        """At the end of a run: the server is still the one it read, and that is recorded."""
        position = self.check()
        if position is not None and not self.options.dry_run:
            Memory(self.control).record_read(self.target.table, position)

    def conclude(self, held: int, run_id: int | None) -> tuple[bool, int]:
        """After a run that finished, with `held` rows held back: trust the new Redis if
        the run proved nothing was lost. Whether the restart is still pending, and how
        many remembered keys the run did not find."""
        if not self.pending:
            return False, 0
        if self.options.dry_run or not self.options.full_scan or run_id is None:
            return True, 0  # an incremental or dry run reads too little, or writes nothing
        missing = Memory(self.control).missing_after_restart(self.target, run_id, self.key_prefix)
        if missing or (held and not self.assessment.verify_only):
            return True, missing
        self.check()
        self._trust(
            "full scan: every remembered key found"
            + ("" if self.assessment.verify_only else ", each agreeing")
        )
        log.warning(
            "Redis restart resolved: every balance balsync remembers was found in Redis; "
            "this Redis is trusted from now on"
        )
        return False, 0


def _changed(before: Identity, now: Identity) -> RedisChanged:
    return RedisChanged(
        f"Redis changed during the run (run_id {before.run_id[:8]}… is now "
        f"{now.run_id[:8]}…, or its replication id, flush count or balsync's marker changed): "
        "a restart, failover or flush; the run stopped before committing more",
        "rerun `balsync sync`: it treats the new server as a restart unless its "
        "replication history proves that nothing was lost",
    )


def _accepted(
    control: Database, table: TableName, identity: Identity, run_id: int | None
) -> Assessment:
    """--accept-redis-restart, for the server the operator saw: where a run has held rows
    since balsync last trusted Redis, the server that run read."""
    seen = RedisTrust(control).last_seen_redis(table, run_id)
    if seen is not None and seen != identity.seen:
        log.warning(
            "--accept-redis-restart ignored: Redis (run_id %s…) is not the server the last "
            "run read; look at this one, then accept it again",
            identity.run_id[:8],
        )
        return Assessment(pending=True)
    return Assessment(pending=False, reason="accepted by the operator (--accept-redis-restart)")


def restart_pending(redis: RedisStore, db: Database, table: TableName, key_prefix: str) -> bool:
    """For operator views: True while the Redis answering now is not the trusted one."""
    identity = redis.identity(trust_marker(key_prefix, db.key(table)))
    trusted = RedisTrust(db).trusted_redis(table)
    return assess(identity, trusted, Memory(db).remembers_any(table, key_prefix)).pending
