"""clear-cache: free Redis memory by deleting balance keys that PostgreSQL already holds.

A key goes only when its value, read as a number, equals the persisted balance, and the
delete itself is a compare-and-delete on the exact bytes that were read: a balance the
application writes between the read and the delete survives. The per-table advisory lock
keeps sync out meanwhile, so the persisted side cannot move under us either.
Memory stays constant: one SCAN page at a time.

A deleted key is a miss for the application: this is safe only where the application then
reads the balance through to PostgreSQL (`READ_THROUGH`), as balance_sync.writer does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from balance_sync.ops.session import table_session
from balance_sync.settings import Settings
from balance_sync.stores.postgres import Database, Memory, Reads, RunLock, Schema, TargetTable
from balance_sync.stores.redis import SCAN_COUNT, RedisStore
from balance_sync.validation import parse_balance, parse_id

log = logging.getLogger(__name__)

Status = Literal["success", "skipped"]
Reason = Literal["not_persisted", "differs", "invalid", "recently_used", "changed"]
REASONS: tuple[Reason, ...] = ("not_persisted", "differs", "invalid", "recently_used", "changed")
SECONDS_PER_DAY = 86_400
READ_THROUGH = (
    "Safe only where the application reads a missing balance through to PostgreSQL "
    "(balance_sync.writer with a loader does): one that takes a missing key as 0 turns a "
    "cleared balance into its next adjustment."
)


@dataclass(frozen=True)
class ClearOptions:
    """The flags of one `balsync clear-cache`."""

    dry_run: bool = False
    idle_days: int | None = None
    scan_count: int = SCAN_COUNT


@dataclass
class ClearResult:
    """What clear-cache did (or, in a dry run, would do); `to_json` is its JSON object.

    Kept keys by reason: `not_persisted` (no row), `differs` (the row holds another
    amount, or none), `invalid` (not a balance key of a valid id and value), `recently_used`
    (idle for less than --idle-days), `changed` (written between the read and the delete).
    """

    status: Status
    dry_run: bool
    scanned: int = 0
    deleted: int = 0
    kept_by_reason: dict[Reason, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    memory_freed_bytes: int | None = None
    reason: str = ""  # why the run was skipped, in words

    @property
    def kept(self) -> int:
        """Every key scanned and left in place."""
        return sum(self.kept_by_reason.values())

    def to_json(self) -> dict[str, object]:
        """The command's JSON object."""
        return {
            "status": self.status,
            "dry_run": self.dry_run,
            "scanned": self.scanned,
            "deleted": self.deleted,
            "kept": self.kept,
            "kept_by_reason": dict(self.kept_by_reason),
            "memory_freed_bytes": self.memory_freed_bytes,
        }


@dataclass(frozen=True)
class _Candidate:
    key: bytes
    raw: bytes
    telegram_id: int
    amount: Decimal


def clear_cache(settings: Settings, options: ClearOptions) -> ClearResult:
    """Delete every balance key whose value PostgreSQL already holds; keep and count the rest.

    Returns status `skipped` when another run holds the table's lock. A dry run takes no
    lock, deletes nothing, and estimates the memory it would free with MEMORY USAGE.
    """
    result = ClearResult(status="success", dry_run=options.dry_run)
    with table_session(settings, take_lock=not options.dry_run) as session:
        if session.skip_reason:
            result.status, result.reason = "skipped", session.skip_reason
            log.info("clear-cache skipped: %s on %s", result.reason, settings.table)
            return result
        redis = session.redis
        clearing = _Clearing(
            settings,
            options,
            redis,
            session.db,
            session.target,
            session.lock,
            remembered=Schema(session.db).schema_present(),
        )
        before = None if options.dry_run else redis.used_memory()
        if options.dry_run:
            result.memory_freed_bytes = 0  # summed page by page; None once unknown
        for keys in redis.scan_keys(settings.key_prefix, options.scan_count):
            clearing.clear_page(keys, result)
            log.debug(
                "clear-cache: %d scanned, %d deleted, %d kept so far",
                result.scanned,
                result.deleted,
                result.kept,
            )
        if not options.dry_run:
            after = redis.used_memory()
            if before is not None and after is not None:
                # Other clients allocate meanwhile; a negative figure would only confuse.
                result.memory_freed_bytes = max(0, before - after)
        log.info(
            "clear-cache %s: %d scanned, %d %s, %d kept %s",
            "dry run" if options.dry_run else "done",
            result.scanned,
            result.deleted,
            "would be deleted" if options.dry_run else "deleted",
            result.kept,
            {reason: n for reason, n in result.kept_by_reason.items() if n},
        )
        return result


@dataclass
class _Clearing:
    """The collaborators of one clear-cache."""

    settings: Settings
    options: ClearOptions
    redis: RedisStore
    db: Database
    target: TargetTable
    lock: RunLock | None  # None in a dry run
    remembered: bool = False  # balsync's schema exists: it remembers what it wrote

    def clear_page(self, keys: list[bytes], result: ClearResult) -> None:
        """Clear one SCAN page (a dry run: count it, and the memory it would free)."""
        keys = list(dict.fromkeys(keys))  # SCAN may repeat a key within a page
        if self.options.idle_days is not None:
            keys = self._idle_enough(keys, result)
        page = self.redis.read_values(keys)
        result.scanned += len(page.wrong_type)
        result.kept_by_reason["invalid"] += len(page.wrong_type)
        candidates = self._candidates(page.values, result)
        persisted = Reads(self.db).persisted_balances(
            self.target, [c.telegram_id for c in candidates]
        )
        doomed: list[_Candidate] = []
        for candidate in candidates:
            if candidate.telegram_id not in persisted:
                result.kept_by_reason["not_persisted"] += 1
            elif persisted[candidate.telegram_id] != candidate.amount:
                result.kept_by_reason["differs"] += 1
            else:
                doomed.append(candidate)
        if not doomed:
            return
        if self.lock is None:
            result.deleted += len(doomed)
            usage = self.redis.memory_usage([c.key for c in doomed])
            freed = result.memory_freed_bytes
            result.memory_freed_bytes = None if freed is None or usage is None else freed + usage
            return
        self.lock.holder_pid()  # raises LockLost if a sync took the table meanwhile
        deleted = self.redis.delete_if_unchanged([(c.key, c.raw) for c in doomed])
        if self.remembered:
            # Removed on purpose: after a Redis restart their absence is no sign of loss.
            Memory(self.db).mark_cleared(
                self.target,
                [c.telegram_id for c, gone in zip(doomed, deleted, strict=True) if gone],
            )
        for candidate, gone in zip(doomed, deleted, strict=True):
            if gone:
                result.deleted += 1
            else:
                result.kept_by_reason["changed"] += 1
                log.info("kept %s: its value changed after it was read", _show(candidate.key))

    def _idle_enough(self, keys: list[bytes], result: ClearResult) -> list[bytes]:
        """The keys idle for at least --idle-days; the others are counted as kept."""
        assert self.options.idle_days is not None
        threshold = self.options.idle_days * SECONDS_PER_DAY
        idle = self.redis.idle_seconds(keys)
        old: list[bytes] = []
        for key, seconds in zip(keys, idle, strict=True):
            if seconds is None:
                continue  # deleted since SCAN saw it
            if seconds >= threshold:
                old.append(key)
            else:
                result.scanned += 1
                result.kept_by_reason["recently_used"] += 1
        return old

    def _candidates(
        self, values: list[tuple[bytes, bytes]], result: ClearResult
    ) -> list[_Candidate]:
        """Balance keys of a valid id and value, with the amount their bytes stand for."""
        prefix_length = len(self.settings.key_prefix.encode())
        candidates: list[_Candidate] = []
        for key, raw in values:
            result.scanned += 1
            telegram_id = parse_id(key[prefix_length:])
            # Negative amounts are compared too: whether sync accepts them is not the
            # question here, only whether PostgreSQL holds the same amount.
            amount = parse_balance(
                raw, value_format=self.settings.value_format, allow_negative=True
            )
            if telegram_id is None or isinstance(amount, str):
                result.kept_by_reason["invalid"] += 1
                continue
            candidates.append(_Candidate(key, raw, int(telegram_id), Decimal(amount.decode())))
        return candidates


def _show(key: bytes) -> str:
    return repr(key.decode("utf-8", "backslashreplace"))[:200]
