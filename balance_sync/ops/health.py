"""Health: can balsync reach both stores, is its schema there, is the last sync recent, is
money at risk in Redis (eviction, expiring keys, memory, a restart since the last sync, a
server that keeps nothing on disk), and does a run hold the table's lock without progress.

Every check only reads. A store that cannot be reached within the retry budget is a failing
check in the report, not an exception, so a monitor always gets the whole picture; the
checks that need it are reported as not checked.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from balance_sync.errors import (
    BalsyncError,
    PostgresUnavailable,
    RedisUnavailable,
    SchemaMissing,
)
from balance_sync.ops.retention import bookkeeping_size, format_bytes
from balance_sync.restart_guard import restart_pending
from balance_sync.settings import Settings
from balance_sync.stores.postgres import Database, Ledger, RedisTrust, RunRecord, Schema, TableLock
from balance_sync.stores.redis import Persistence, RedisStore, ServerInfo
from balance_sync.validation import InvalidRecord, validate

log = logging.getLogger(__name__)

Status = Literal["healthy", "degraded", "unhealthy"]
DEFAULT_MAX_AGE = 7200.0  # two hourly runs missed
TTL_SAMPLE_SIZE = 1000
VALUE_SAMPLE_SIZE = 1000
MEMORY_WARN_RATIO = 0.9
# A running sync's lock session runs a statement every batch; one quiet for this long
# belongs to a run that died or hangs, and every run meanwhile skips.
STALE_LOCK_AFTER = 600.0
RECENT_RUNS = 10  # run starts whose gaps tell the sync interval
PERSISTENCE_ADVICE = (
    "set `appendonly yes` with `appendfsync everysec`, or `save` rules that snapshot more "
    "often than balsync syncs (e.g. `save 60 1`), in redis.conf (or CONFIG SET, then CONFIG "
    "REWRITE)"
)
# uptime_in_seconds is truncated to whole seconds; without this slack a sync that finished
# within the server's first second would look older than the server.
_UPTIME_SLACK_S = 1.0


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, whether it passed, and in words why."""

    name: str
    ok: bool
    detail: str
    latency_ms: float | None = None

    def to_json(self) -> dict[str, object]:
        """SPEC's check object."""
        return {
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
        }


@dataclass(frozen=True)
class HealthReport:
    """Every check, and whether a store could not be reached at all."""

    checks: tuple[Check, ...]
    redis_error: RedisUnavailable | None = None
    postgres_error: PostgresUnavailable | None = None

    @property
    def status(self) -> Status:
        """unhealthy: a store is unreachable; degraded: another check failed; else healthy."""
        if self.redis_error is not None or self.postgres_error is not None:
            return "unhealthy"
        return "healthy" if all(check.ok for check in self.checks) else "degraded"

    @property
    def exit_code(self) -> int:
        """SPEC's code: 0 healthy, 1 degraded, 3 Redis unreachable, 4 PostgreSQL unreachable.

        With both unreachable Redis wins: it is checked first, and it holds the money.
        """
        if self.redis_error is not None:
            return self.redis_error.exit_code
        if self.postgres_error is not None:
            return self.postgres_error.exit_code
        return 0 if self.status == "healthy" else 1

    def to_json(self) -> dict[str, object]:
        """SPEC's health object."""
        return {"status": self.status, "checks": [check.to_json() for check in self.checks]}


def check_health(
    settings: Settings, max_age: float = DEFAULT_MAX_AGE, stale_lock_after: float | None = None
) -> HealthReport:
    """Run every check once, changing nothing, and report.

    `max_age` is how many seconds ago the last successful sync may have finished;
    `stale_lock_after` (default STALE_LOCK_AFTER) how long the session holding the
    table's lock may go without a statement. An unreachable store costs at most one retry
    budget (`settings.retry_timeout`), not one per check.
    """
    redis = RedisStore(settings.redis_url, settings.retry_timeout)
    db = Database(settings.database_url, settings.retry_timeout)
    stale = STALE_LOCK_AFTER if stale_lock_after is None else stale_lock_after
    try:
        return _Probe(settings, max_age, redis, db, stale).run()
    finally:
        redis.close()
        db.close()


def format_duration(seconds: float) -> str:
    """A duration as a person reads it: 42 s, 12 min, 3.5 h, 2.1 d."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


class _NotChecked(Exception):
    """A check could not run because an earlier one broke."""


class _Probe:
    """The state one health run shares between its checks."""

    def __init__(
        self,
        settings: Settings,
        max_age: float,
        redis: RedisStore,
        db: Database,
        stale_lock_after: float = STALE_LOCK_AFTER,
    ) -> None:
        self.settings = settings
        self.max_age = max_age
        self.stale_lock_after = stale_lock_after
        self.redis = redis
        self.db = db
        self.info: ServerInfo | None = None
        self.redis_error: RedisUnavailable | None = None
        self.postgres_error: PostgresUnavailable | None = None
        self.schema_error: SchemaMissing | None = None
        self.last: RunRecord | None = None

    def run(self) -> HealthReport:
        checks = tuple(
            self._guard(name, check)
            for name, check in (
                ("redis", self.redis_reachable),
                ("postgres", self.postgres_reachable),
                ("schema", self.schema),
                ("last_sync", self.last_sync),
                ("eviction_policy", self.eviction_policy),
                ("key_ttl", self.key_ttl),
                ("invalid_values", self.invalid_values),
                ("memory", self.memory),
                ("redis_restart", self.redis_restart),
                ("persistence", self.persistence),
                ("bookkeeping", self.bookkeeping),
                ("sync_lock", self.sync_lock),
                *((("sentinel", self.sentinel),) if self.redis.sentinel is not None else ()),
            )
        )
        return HealthReport(checks, self.redis_error, self.postgres_error)

    def _guard(self, name: str, check: Callable[[], Check]) -> Check:
        """Run one check; an unreachable store or a broken check becomes a failing line."""
        try:
            return check()
        except RedisUnavailable as exc:
            if exc is self.redis_error:
                detail = "not checked: Redis is unreachable"
            else:
                self.redis_error, detail = exc, _sentence(exc)
        except PostgresUnavailable as exc:
            if exc is self.postgres_error:
                detail = "not checked: PostgreSQL is unreachable"
            else:
                self.postgres_error, detail = exc, _sentence(exc)
        except SchemaMissing as exc:
            detail = f"not checked: {exc.message}"
        except _NotChecked as exc:
            detail = f"not checked: {exc}"
        except Exception as exc:  # a check that breaks fails, and the others still run
            log.warning("health check %s failed: %s", name, exc, exc_info=True)
            detail = f"check failed: {type(exc).__name__}: {exc}"
        return Check(name, ok=False, detail=detail)

    def _server(self) -> ServerInfo:
        if self.info is None:
            if self.redis_error is not None:
                raise self.redis_error
            raise _NotChecked("Redis did not describe itself (INFO failed)")
        return self.info

    def _require_schema(self) -> None:
        if self.postgres_error is not None:
            raise self.postgres_error
        if self.schema_error is not None:
            raise self.schema_error

    # -- reachability ---------------------------------------------------------------------

    def redis_reachable(self) -> Check:
        self.redis.ping()  # connects, under the retry budget
        latency_ms = _timed_ms(self.redis.ping)
        self.info = info = self.redis.server_info()
        return Check(
            "redis",
            ok=True,
            detail=f"{self.settings.redis_display}: version {info.version}, role {info.role}",
            latency_ms=latency_ms,
        )

    def postgres_reachable(self) -> Check:
        self.db.ping()
        latency_ms = _timed_ms(self.db.ping)
        version = self.db.server_version()
        return Check(
            "postgres",
            ok=True,
            detail=f"{self.settings.database_display}: PostgreSQL {version}",
            latency_ms=latency_ms,
        )

    # -- PostgreSQL -----------------------------------------------------------------------

    def schema(self) -> Check:
        if self.postgres_error is not None:
            raise self.postgres_error
        try:
            Schema(self.db).require_schema()
            Schema(self.db).describe_target(self.settings)
        except SchemaMissing as exc:
            self.schema_error = exc
            return Check("schema", ok=False, detail=_sentence(exc))
        return Check(
            "schema",
            ok=True,
            detail=f"schema balsync and table {self.settings.table} are present",
        )

    def last_sync(self) -> Check:
        self._require_schema()
        table = self.settings.table
        self.last = last = Ledger(self.db).last_success(table)
        if last is None or last.age_s is None:
            return Check(
                "last_sync",
                ok=False,
                detail=f"no successful sync of {table} is recorded; run `balsync sync`",
            )
        ago = format_duration(last.age_s)
        if last.age_s > self.max_age:
            return Check(
                "last_sync",
                ok=False,
                detail=f"the last successful sync (run {last.id}, {last.status}) finished "
                f"{ago} ago, more than --max-age {format_duration(self.max_age)}: "
                "is cron starting balsync? (`balsync status`)",
            )
        return Check(
            "last_sync",
            ok=True,
            detail=f"the last successful sync (run {last.id}, {last.status}) finished {ago} ago",
        )

    def bookkeeping(self) -> Check:
        self._require_schema()
        size = bookkeeping_size(self.db, self.settings)
        detail = (
            f"balsync's tables hold about {size.rows:,} rows in {format_bytes(size.bytes)}; "
            f"retention: {size.retention.describe()}"
        )
        if size.warning:
            return Check("bookkeeping", ok=False, detail=f"{detail}: {size.warning}")
        return Check("bookkeeping", ok=True, detail=detail)

    def sync_lock(self) -> Check:
        self._require_schema()
        table = self.settings.table
        holder = TableLock(self.db).lock_holder(table)
        if holder is None:
            return Check("sync_lock", ok=True, detail=f"no run holds the lock on {table}")
        run = Ledger(self.db).running_run(table)
        session = (
            f"backend pid {holder.backend_pid} ({holder.application_name or 'no application'}"
            f" from {holder.client_addr or 'a local socket'}, {holder.state or 'state hidden'})"
        )
        what = (
            f"run {run.id} (host {run.host}, pid {run.pid}, started "
            f"{format_duration(_age_s(run.started_at, holder.state_change, holder.quiet_s))} "
            "ago)"
            if run is not None
            else "a session with no running sync recorded (restore, clear-cache, or another client)"
        )
        if holder.quiet_s is None:
            return Check(
                "sync_lock",
                ok=True,
                detail=f"{what} holds the lock on {table} through {session}; how long it has "
                "been quiet is hidden from this role (grant pg_read_all_stats to tell)",
            )
        quiet = format_duration(holder.quiet_s)
        if holder.quiet_s <= self.stale_lock_after:
            return Check(
                "sync_lock",
                ok=True,
                detail=f"{what} holds the lock on {table} through {session}, last active "
                f"{quiet} ago",
            )
        where = f" on host {run.host}" if run is not None else ""
        pid = f"process {run.pid}{where}" if run is not None else "its client"
        return Check(
            "sync_lock",
            ok=False,
            detail=f"{what} holds the lock on {table} through {session}, but that session "
            f"has done nothing for {quiet}, more than {format_duration(self.stale_lock_after)}"
            ": a sync that makes progress touches it every batch, and every run skips while "
            f"it is held. If {pid} is gone or hung, end the session: SELECT "
            f"pg_terminate_backend({holder.backend_pid}); else wait: PostgreSQL ends a dead "
            "client's balsync session by itself within minutes (keepalives, "
            "idle_session_timeout)",
        )

    def _sync_interval(self) -> tuple[float, str]:
        """How often syncs start: the median gap between the recent runs' starts, else
        --max-age (the longest the operator lets pass between syncs); and where it came from."""
        if self.postgres_error is None and self.schema_error is None:
            runs = Ledger(self.db).recent_runs(self.settings.table, RECENT_RUNS)
            gaps = sorted(
                (newer.started_at - older.started_at).total_seconds()
                for newer, older in itertools.pairwise(runs)
            )
            if gaps:
                return max(1.0, gaps[len(gaps) // 2]), "the recent runs' interval"
        return self.max_age, "--max-age"

    # -- risks to money in Redis ----------------------------------------------------------

    def persistence(self) -> Check:
        info = self._server()
        interval, source = self._sync_interval()
        every = f"{format_duration(interval)} ({source})"
        verdicts = [_persistence_verdict(p, interval, every) for p in info.persistence]
        named = len(verdicts) > 1 or any(p.server for p in info.persistence)
        parts = [
            f"{p.server or self.settings.redis_display}: {text}" if named else text
            for p, (_, text) in zip(info.persistence, verdicts, strict=True)
        ]
        ok = all(safe for safe, _ in verdicts)
        detail = "; ".join(parts) or "the server did not describe its persistence"
        if not ok:
            detail += (
                ": a restart loses every balance written since the last sync that Redis did "
                f"not persist; {PERSISTENCE_ADVICE}"
            )
        return Check("persistence", ok=ok, detail=detail)

    def eviction_policy(self) -> Check:
        info = self._server()
        policy = info.maxmemory_policy
        source = (
            " (read from INFO: CONFIG GET is not permitted)" if info.policy_source == "INFO" else ""
        )
        if policy == "noeviction":
            return Check(
                "eviction_policy",
                ok=True,
                detail="maxmemory-policy noeviction: a full Redis refuses writes rather than "
                f"evict balance keys{source}",
            )
        if policy.startswith("volatile-"):
            risk = (
                "when memory is full Redis evicts keys that carry a TTL, so balance keys "
                "with a TTL can vanish before a sync persists them"
            )
        elif policy.startswith("allkeys-"):
            risk = "when memory is full Redis may evict any key, balance keys included"
        else:
            risk = "balsync cannot tell whether Redis may evict balance keys"
        if info.maxmemory == 0:
            risk += " (no maxmemory is set yet, so it applies once one is)"
        return Check(
            "eviction_policy",
            ok=False,
            detail=f"maxmemory-policy {policy}: {risk}; set noeviction{source}",
        )

    def key_ttl(self) -> Check:
        self._server()
        prefix = self.settings.key_prefix
        sample = self.redis.sample_ttls(prefix, TTL_SAMPLE_SIZE)
        if sample.sampled == 0:
            return Check("key_ttl", ok=True, detail=f"no balance keys under {prefix!r} to sample")
        if sample.with_ttl == 0:
            return Check(
                "key_ttl",
                ok=True,
                detail=f"none of {sample.sampled} sampled balance keys carries a TTL",
            )
        examples = ", ".join(key.decode("utf-8", "backslashreplace") for key in sample.examples)
        return Check(
            "key_ttl",
            ok=False,
            detail=f"{sample.with_ttl} of {sample.sampled} sampled balance keys carry a TTL "
            f"(e.g. {examples}): when one expires, a balance changed since the last sync "
            "is lost with it",
        )

    def invalid_values(self) -> Check:
        self._server()
        prefix = self.settings.key_prefix
        page = self.redis.sample_values(prefix, VALUE_SAMPLE_SIZE)
        sampled = len(page.values) + len(page.wrong_type)
        if sampled == 0:
            return Check(
                "invalid_values", ok=True, detail=f"no balance keys under {prefix!r} to sample"
            )
        prefix_length = len(prefix.encode())
        invalid: list[InvalidRecord] = []
        for key, raw in page.values:
            # The sync's own rules. A negative balance passes: --allow-negative persists
            # it, and only values that no sync ever writes are named here.
            outcome = validate(
                key,
                raw,
                prefix_length,
                value_format=self.settings.value_format,
                allow_negative=True,
            )
            if isinstance(outcome, InvalidRecord):
                invalid.append(outcome)
        invalid += [
            InvalidRecord(k, None, f"a {kind}, not a string") for k, kind in page.wrong_type
        ]
        if not invalid:
            return Check(
                "invalid_values",
                ok=True,
                detail=f"all {sampled} sampled balance keys hold values a sync persists",
            )
        examples = "; ".join(
            f"{_shown(record.key)} = {_shown(record.raw) if record.raw is not None else '-'}: "
            f"{record.reason}"
            for record in invalid[:3]
        )
        return Check(
            "invalid_values",
            ok=False,
            detail=f"{len(invalid)} of {sampled} sampled balance keys hold values the sync "
            f"will never persist (e.g. {examples}): every change to those balances stays out "
            "of PostgreSQL and is lost with Redis; correct each key to a plain decimal with "
            "at most 2 places, and stop what wrote it: a float tail such as "
            "0.30000000000000004 or a third decimal comes from float arithmetic (INCRBYFLOAT, "
            "a float in the application), which balance_sync.writer never does; `balsync "
            "skipped` lists every such key after the next sync",
        )

    def memory(self) -> Check:
        info = self._server()
        if info.maxmemory <= 0:
            return Check(
                "memory", ok=True, detail=f"{info.used_memory_human} used, no maxmemory limit"
            )
        ratio = info.used_memory / info.maxmemory
        detail = f"{info.used_memory_human} of maxmemory {info.maxmemory_human} used ({ratio:.0%})"
        if ratio <= MEMORY_WARN_RATIO:
            return Check("memory", ok=True, detail=detail)
        consequence = (
            "refuses writes (the bot's balance updates fail)"
            if info.maxmemory_policy == "noeviction"
            else "evicts keys"
        )
        return Check(
            "memory",
            ok=False,
            detail=f"{detail}: near the limit, where Redis {consequence}",
        )

    def sentinel(self) -> Check:
        view = self.redis.sentinel_view()
        silent = [s for s in view.sentinels if s not in view.answering]
        replicas = [
            f"{address} {'in sync' if online and not behind else f'behind by {behind} bytes'}"
            if online
            else f"{address} not connected"
            for address, online, behind in view.replicas
        ]
        in_sync = any(online and not behind for _, online, behind in view.replicas)
        detail = (
            f"sentinels {', '.join(view.sentinels)}"
            + (f" ({', '.join(silent)} not answering)" if silent else "")
            + f"; master {view.master}; replicas: {', '.join(replicas) or 'none'}"
        )
        if not in_sync:
            detail += (
                ": no replica holds everything the master has, so a failover now would lose "
                "balances written since the last sync"
            )
        return Check("sentinel", ok=in_sync and not silent, detail=detail)

    def redis_restart(self) -> Check:
        info = self._server()
        self._require_schema()
        up = f"up {format_duration(info.uptime_s)}, run_id {info.run_id}"
        # A failover lands on a server that may have been up for days: its run_id tells.
        if restart_pending(self.redis, self.db, self.settings.table, self.settings.key_prefix):
            trust = RedisTrust(self.db).trusted_redis(self.settings.table)
            trusted = trust.redis_id if trust is not None else "none recorded"
            return Check(
                "redis_restart",
                ok=False,
                detail=f"Redis run_id is {info.run_id}, not {trusted} as balsync trusts: it "
                "restarted or failed over since. Restart pending: syncs overwrite no row that "
                "differs from Redis until a full sync finds every remembered balance agreeing "
                "(`balsync restore` puts missing keys back), or `balsync sync --on-conflict "
                "db` (PostgreSQL wins) or `--accept-redis-restart` (Redis wins) decides",
            )
        last = self.last
        if last is None or last.age_s is None:
            return Check(
                "redis_restart",
                ok=True,
                detail=f"{up}; no successful sync to compare with",
            )
        if info.uptime_s + _UPTIME_SLACK_S < last.age_s:
            return Check(
                "redis_restart",
                ok=False,
                detail=f"Redis restarted {format_duration(info.uptime_s)} ago (run_id "
                f"{info.run_id}), after the last successful sync finished "
                f"{format_duration(last.age_s)} ago: balances written in between are lost "
                "unless Redis persisted them; compare `balsync stats` key and row counts",
            )
        return Check(
            "redis_restart",
            ok=True,
            detail=f"{up}: no restart since the last successful sync",
        )


def _persistence_verdict(p: Persistence, interval: float, every: str) -> tuple[bool, str]:
    """Whether one primary keeps what it was written across a restart, and in words why.

    AOF with working writes is enough. Without it, RDB snapshots must be configured, succeed,
    and come more often than syncs do: a balance lives only in Redis until the next sync.
    Where CONFIG GET is not permitted, INFO tells whether snapshots were ever taken.
    """
    failed = []
    if not p.rdb_last_bgsave_ok:
        # With stop-writes-on-bgsave-error (the default) Redis also refuses the bot's writes.
        failed.append(
            "the last RDB snapshot failed (rdb_last_bgsave_status err): check the server's "
            "log, and the space and permissions of its `dir`"
        )
    if p.aof_enabled:
        if not p.aof_last_write_ok:
            failed.append("AOF is on but its writes fail (aof_last_write_status err)")
            return False, "; ".join(failed)
        fsync = f", appendfsync {p.appendfsync}" if p.appendfsync else ""
        return not failed, "; ".join([f"AOF on{fsync}", *failed])
    unsaved = p.rdb_changes_since_last_save
    age = p.rdb_last_save_age_s
    stale = (
        f"{unsaved:,} changes not saved for {format_duration(age)}, longer than syncs come "
        f"(every {every})"
        if unsaved and age is not None and age > interval
        else ""
    )
    rules = p.save_rules
    if rules is None:  # CONFIG GET not permitted
        # Before Redis 7 INFO does not count snapshots: then only their age can tell.
        if p.rdb_saves == 0 and unsaved:
            return False, (
                f"no AOF and no RDB snapshot since the server started, {unsaved:,} changes "
                "unsaved (read from INFO: CONFIG GET is not permitted): it keeps nothing"
            )
        taken = "an unknown number of" if p.rdb_saves is None else f"{p.rdb_saves}"
        described = f"no AOF; {taken} RDB snapshots since the server started (read from INFO)"
    elif not rules:
        return False, "no AOF and no `save` rules: it keeps nothing on disk"
    else:
        shown = " ".join(f"{seconds} {changes}" for seconds, changes in rules)
        described = f"no AOF; save {shown}"
        shortest = min(seconds for seconds, _ in rules)
        if shortest > interval:
            failed.append(f"no `save` rule snapshots within the sync interval (every {every})")
    if stale:
        failed.append(stale)
    if age is not None:
        described += f", last saved {format_duration(age)} ago"
    return not failed, "; ".join([described, *failed])


def _age_s(started: datetime, state_change: datetime | None, quiet_s: float | None) -> float:
    """Seconds since `started`, by the database's clock where the holder's figures give it."""
    if state_change is not None and quiet_s is not None:
        return max(0.0, (state_change - started).total_seconds() + quiet_s)
    return max(0.0, (datetime.now(UTC) - started).total_seconds())


def _timed_ms(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def _shown(raw: bytes) -> str:
    return repr(raw.decode("utf-8", "backslashreplace"))[:60]


def _sentence(exc: BalsyncError) -> str:
    return f"{exc.message} — {exc.hint}" if exc.hint else exc.message
