"""The checks of Redis: reachable, and whether it keeps what it is written (eviction,
expiry, memory, restarts, persistence, Sentinel)."""

from __future__ import annotations

import logging

from balance_sync.ops.health.probe import ProbeState, shown, timed_ms
from balance_sync.ops.health.report import (
    MEMORY_WARN_RATIO,
    PERSISTENCE_ADVICE,
    TTL_SAMPLE_SIZE,
    UPTIME_SLACK_S,
    VALUE_SAMPLE_SIZE,
    Check,
    format_duration,
)
from balance_sync.restart_guard import restart_pending
from balance_sync.stores.postgres import RedisTrust
from balance_sync.stores.redis import Persistence
from balance_sync.validation import InvalidRecord, validate

# Every part of health logs as `balance_sync.ops.health`.
log = logging.getLogger(__package__)


class RedisChecks(ProbeState):
    """Checks that read Redis (and, for a restart, what PostgreSQL remembers of it)."""

    def redis_reachable(self) -> Check:
        self.redis.ping()  # connects, under the retry budget
        latency_ms = timed_ms(self.redis.ping)
        self.info = info = self.redis.server_info()
        return Check(
            "redis",
            ok=True,
            detail=f"{self.settings.redis_display}: version {info.version}, role {info.role}",
            latency_ms=latency_ms,
        )

    # -- risks to money in Redis ----------------------------------------------------------

    def persistence(self) -> Check:
        info = self._server()
        interval, source = self._sync_interval()
        every = f"{format_duration(interval)} ({source})"
        verdicts = [persistence_verdict(p, interval, every) for p in info.persistence]
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
            f"{shown(record.key)} = {shown(record.raw) if record.raw is not None else '-'}: "
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
        if info.uptime_s + UPTIME_SLACK_S < last.age_s:
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


def persistence_verdict(p: Persistence, interval: float, every: str) -> tuple[bool, str]:
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
