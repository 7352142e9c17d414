"""The Redis-restart guard: a Redis whose identity changed is trusted only on evidence.

A Redis that restarted, failed over, or was replaced behind the same address may have lost
keys or come back from an old snapshot; an application that then rebuilds a balance from
zero makes a value that looks like any other. So while a restart is pending no row that
differs from Redis is overwritten, across runs, until balsync has evidence that nothing
persisted was lost, or the operator decides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from balance_sync.errors import RedisChanged
from balance_sync.pg_store import Database, TargetTable
from balance_sync.redis_store import RedisStore
from balance_sync.settings import TableName

log = logging.getLogger(__name__)


class GuardOptions(Protocol):
    """What the guard needs to know of a run's options."""

    @property
    def dry_run(self) -> bool: ...

    @property
    def accept_redis_restart(self) -> bool: ...

    @property
    def full_scan(self) -> bool: ...


@dataclass
class RestartGuard:
    """Whether the Redis a run reads is the one balsync trusts, and what earns it trust.

    A Redis whose identity changed (a restart, a failover, another server behind the same
    address) may have lost keys, or come back from an old snapshot, so a run overwrites
    no differing row until it is trusted. Trust comes only from evidence that nothing
    persisted was lost (a full scan that found every remembered key agreeing), or from
    the operator (--accept-redis-restart); a run that merely held nothing proves nothing.
    """

    redis: RedisStore
    control: Database
    target: TargetTable
    options: GuardOptions
    identity: str
    pending: bool

    @classmethod
    def open(
        cls, redis: RedisStore, control: Database, target: TargetTable, options: GuardOptions
    ) -> RestartGuard:
        """Compare the Redis this run reads with the trusted one; trust it where that is free."""
        table = target.table
        identity = redis.server_run_id()
        # Only a dry run comes here without the schema: nothing is persisted, nothing lost.
        schema = not options.dry_run or control.schema_present()
        trusted = control.trusted_redis(table) if schema else None
        reason = ""
        if trusted == identity:
            pending = False
        elif trusted is None and not (schema and control.remembers_any(table)):
            pending, reason = False, "first run: nothing persisted that could be lost"
        else:
            pending = True
        if pending and options.accept_redis_restart:
            pending, reason = False, "accepted by the operator (--accept-redis-restart)"
        if reason and not options.dry_run:
            control.trust_redis(table, identity, reason)
        if pending:
            log.warning(
                "Redis restart pending: the server (run_id %s…) is not the one balsync trusts "
                "(run_id %s…); new ids are inserted, but no row that differs is overwritten",
                identity[:8],
                (trusted or "none")[:8],
            )
        return cls(redis, control, target, options, identity, pending)

    def check(self) -> None:
        """Stop the run if Redis is no longer the server it started reading from."""
        now = self.redis.server_run_id()
        if now != self.identity:
            raise RedisChanged(
                f"Redis changed during the run (run_id {self.identity[:8]}… is now "
                f"{now[:8]}…): a restart or failover; the run stopped before committing more",
                "rerun `balsync sync`: it treats the new server as a restart and holds "
                "differing rows until it is trusted",
            )

    def conclude(self, held: int, run_id: int | None) -> tuple[bool, int]:
        """After a run that finished, with `held` rows held back: trust the new Redis if
        the run proved nothing was lost. Whether the restart is still pending, and how
        many remembered keys the run did not find agreeing."""
        if not self.pending:
            return False, 0
        if self.options.dry_run or not self.options.full_scan or run_id is None:
            return True, 0  # an incremental or dry run reads too little, or writes nothing
        missing = self.control.missing_after_restart(self.target, run_id)
        if held or missing:
            return True, missing
        self.check()
        self.control.trust_redis(
            self.target.table, self.identity, "full scan: every remembered key found agreeing"
        )
        log.warning(
            "Redis restart resolved: every balance balsync remembers was found agreeing; "
            "this Redis is trusted from now on"
        )
        return False, 0


def restart_pending(redis: RedisStore, db: Database, table: TableName) -> bool:
    """For operator views: True while the Redis answering now is not the trusted one."""
    trusted = db.trusted_redis(table)
    if trusted is None:
        return db.remembers_any(table)
    return trusted != redis.server_run_id()
