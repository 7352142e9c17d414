"""restore: copy balances from PostgreSQL into Redis, only where the key is missing.

The fallback for the day Redis comes back empty. Every key is written with SET NX, so a
balance the application wrote meanwhile is never overwritten. Rows stream from a
server-side cursor a batch at a time, so memory stays constant. The per-table advisory lock
keeps sync and clear-cache out while the rows are copied: otherwise a sync could persist a
newer balance and clear-cache delete its key behind the snapshot being copied, and the
older balance would come back.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Literal

from balance_sync.errors import ConfigError
from balance_sync.ops.session import table_session
from balance_sync.settings import Settings
from balance_sync.stores.postgres import Memory, Reads, RunLock, Schema, TargetTable
from balance_sync.stores.redis import RedisStore
from balance_sync.validation import parse_id, redis_value

log = logging.getLogger(__name__)

Status = Literal["success", "partial", "skipped"]
DEFAULT_BATCH_SIZE = 1000


@dataclass(frozen=True)
class RestoreOptions:
    """The flags of one `balsync restore`; `ids` None means every row."""

    dry_run: bool = False
    ids: tuple[int, ...] | None = None
    batch_size: int = DEFAULT_BATCH_SIZE


@dataclass
class RestoreResult:
    """What restore did (or, in a dry run, would do); `to_json` is its JSON object.

    `total` counts the rows read, `total = restored + already_present + invalid`;
    `invalid` counts rows whose balance cannot be written exactly in the value format,
    `not_found` the ids of --ids that have no row.
    """

    status: Status
    dry_run: bool
    total: int = 0
    restored: int = 0
    already_present: int = 0
    invalid: int = 0
    not_found: int = 0
    reason: str = ""  # why the run was skipped, in words

    def to_json(self) -> dict[str, object]:
        """The command's JSON object."""
        return {
            "status": self.status,
            "dry_run": self.dry_run,
            "total": self.total,
            "restored": self.restored,
            "already_present": self.already_present,
            "invalid": self.invalid,
            "not_found": self.not_found,
        }


def parse_ids(text: str) -> tuple[int, ...]:
    """The telegram ids of `--ids 1,2,3`, each checked against SPEC; a repeated id once."""
    items = [item.strip() for item in text.split(",")]
    ids: dict[int, None] = {}
    for item in items:
        if parse_id(item.encode()) is None:
            raise ConfigError(
                f"invalid --ids {text!r}: {item!r} is not a telegram id",
                "give comma-separated whole numbers 1..9223372036854775807, e.g. --ids 1,2,3",
            )
        ids[int(item)] = None
    return tuple(ids)


def run_restore(settings: Settings, options: RestoreOptions) -> RestoreResult:
    """Write every persisted balance whose Redis key is missing, with SET NX.

    Returns status `skipped` when another run holds the table's lock, `partial` when some
    rows could not be written exactly. A dry run takes no lock and writes nothing: it
    counts the keys that are missing. Negative balances are restored as they stand.
    """
    result = RestoreResult(status="success", dry_run=options.dry_run)
    with table_session(settings, take_lock=not options.dry_run) as session:
        if session.skip_reason:
            result.status, result.reason = "skipped", session.skip_reason
            log.info("restore skipped: %s on %s", result.reason, settings.table)
            return result
        lock, control, target = session.lock, session.control, session.target
        # Closed before its connection is, even when Redis fails mid-way.
        with contextlib.closing(
            Reads(session.db).stream_balances(target, options.ids, options.batch_size)
        ) as batches:
            memory = Memory(control) if lock and Schema(control).schema_present() else None
            for rows in batches:
                restored = _restore_batch(
                    settings, session.redis, lock, rows, result, target=target
                )
                if memory is not None:
                    memory.remember(target, restored)
        if options.ids is not None:
            result.not_found = max(0, len(options.ids) - result.total)
        result.status = "partial" if result.invalid else "success"
        log.info(
            "restore %s: %d rows, %d %s, %d already present, %d invalid",
            "dry run" if options.dry_run else "done",
            result.total,
            result.restored,
            "would be restored" if options.dry_run else "restored",
            result.already_present,
            result.invalid,
        )
        return result


def _restore_batch(
    settings: Settings,
    redis: RedisStore,
    lock: RunLock | None,
    rows: list[tuple[int, str | None]],
    result: RestoreResult,
    *,
    target: TargetTable,
) -> list[tuple[int, str]]:
    """SET NX one batch of rows (a dry run, `lock` None, only asks which keys exist).

    Returns the (id, balance) of each key it set, the balance as the column holds it.
    """
    prefix = settings.key_prefix.encode()
    items: list[tuple[bytes, bytes]] = []
    sources: list[tuple[int, str]] = []
    for telegram_id, balance in rows:
        result.total += 1
        key = prefix + b"%d" % telegram_id
        if balance is None:
            value: bytes | str = "balance is NULL"
        else:
            value = redis_value(target.balance_type.amount_text(balance), settings.value_format)
        if isinstance(value, str):
            result.invalid += 1
            log.warning("not restored %s: %s (%r)", key.decode(), value, balance)
            continue
        items.append((key, value))
        sources.append((telegram_id, str(balance)))
    restored: list[tuple[int, str]] = []
    if lock is None:
        present = redis.existing([key for key, _ in items])
        missing = present.count(False)
    else:
        lock.holder_pid()  # raises LockLost if another run took the table meanwhile
        done = redis.set_missing(items)
        restored = [source for source, was_set in zip(sources, done, strict=True) if was_set]
        missing = len(restored)
    result.restored += missing
    result.already_present += len(items) - missing
    log.debug(
        "restore: %d rows, %d restored, %d already present so far",
        result.total,
        result.restored,
        result.already_present,
    )
    return restored
