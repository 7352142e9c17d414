"""The PostgreSQL side of a sync: writer threads merging batches, each in its own transaction."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from balance_sync.ops.sync.model import (
    CONFLICTS_CAP,
    JOIN_ROUND_S,
    QUEUE_DEPTH,
    SKIPPED_RECORDS_CAP,
    BatchReport,
    SyncOptions,
    SyncResult,
)
from balance_sync.ops.sync.reading import DONE, Batch, read_batches
from balance_sync.restart_guard import RestartGuard
from balance_sync.settings import Settings
from balance_sync.stores.postgres import (
    BatchCounts,
    Conflict,
    Database,
    Merge,
    MergePolicy,
    RunLock,
    TargetTable,
)
from balance_sync.stores.redis import RedisStore
from balance_sync.validation import redis_value

# The run logs as one logger, `balance_sync.ops.sync`, whichever part of it speaks.
log = logging.getLogger(__package__)


@dataclass
class Writing:
    """The collaborators of one run's writing phase."""

    settings: Settings
    options: SyncOptions
    redis: RedisStore
    lock: RunLock
    target: TargetTable
    result: SyncResult
    on_batch: Callable[[BatchReport], None] | None
    policy: MergePolicy
    guard: RestartGuard
    writers: list[Database] = field(default_factory=list)
    mutex: threading.Lock = field(default_factory=threading.Lock)
    room: dict[str, int] = field(
        default_factory=lambda: {"skipped": SKIPPED_RECORDS_CAP, "conflicts": CONFLICTS_CAP}
    )

    def copy_all(self) -> None:
        """Read on a thread of its own while writer threads merge earlier batches.

        With every value changed, PostgreSQL's per-row update cost dominates and a second
        connection keeps the second core busy; with few changes the reader is the limit.
        """
        batches: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
        stop = threading.Event()
        errors: list[BaseException] = []

        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    batches.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for batch in read_batches(
                    self.settings, self.options, self.redis, self.target.balance_type
                ):
                    if not put(batch):
                        return
                put(DONE)
            except BaseException as exc:  # handed to the main thread, which raises it
                errors.append(exc)
                stop.set()

        def write(writer: Database) -> None:
            try:
                while not stop.is_set():
                    # The safe point: between this writer's batches, never inside one.
                    self.options.stop.check()
                    try:
                        item = batches.get(timeout=0.2)
                    except queue.Empty:
                        continue
                    if item is DONE:
                        put(DONE)  # the next writer needs to see it too
                        return
                    assert isinstance(item, Batch)
                    self.write(writer, item)
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        threads = [threading.Thread(target=read, name="balsync-reader", daemon=True)]
        threads += [
            threading.Thread(target=write, args=(w,), name=f"balsync-writer-{i}", daemon=True)
            for i, w in enumerate(self.writers)
        ]
        for thread in threads:
            thread.start()
        try:
            # In short rounds: CPython runs signal handlers on the main thread only, and a
            # signal the kernel hands to a worker thread waits for the main one to run
            # bytecode again; an endless join would hold a SIGTERM until the run is over.
            for thread in threads[1:]:
                while thread.is_alive():
                    thread.join(JOIN_ROUND_S)
        finally:
            stop.set()
            threads[0].join(timeout=5)
        if errors:
            raise errors[0]

    def _reserve(self, kind: str, wanted: int) -> int:
        """Room for `wanted` skipped records or conflicts in the run's record, within caps."""
        with self.mutex:
            granted = min(wanted, self.room[kind])
            self.room[kind] -= granted
            return granted

    def write(self, writer: Database, batch: Batch) -> None:
        """Merge one batch on `writer` and account for it."""
        result = self.result
        writing = not self.options.dry_run
        counts = Merge(writer).apply_batch(
            self.target,
            batch.staged,
            batch.skipped,
            run_id=result.run_id,
            batch_no=batch.number,
            lock=self.lock if writing else None,
            policy=self.policy,
            key_prefix=self.settings.key_prefix,
            reserve=self._reserve,
            before_commit=self.guard.check if writing else None,
            resolve_in_redis=partial(self._resolve_in_redis, batch) if writing else None,
        )
        for record in batch.skipped:
            log.info("skipped %s: %s", _show(record.key), record.reason)
        for telegram_id in counts.unknown_ids:
            log.info(
                "skipped %s%d: unknown id (no row to update)",
                self.settings.key_prefix,
                telegram_id,
            )
        prefix = self.settings.key_prefix
        for c in counts.conflicts:
            log.info(
                "conflict %s%d (%s): PostgreSQL %s, Redis %s, last written %s -> %s",
                prefix,
                c.telegram_id,
                c.kind,
                c.db_value,
                c.redis_value,
                c.last_written,
                c.resolution,
            )
        with self.mutex:
            self._account(batch, counts)

    def _account(self, batch: Batch, counts: BatchCounts) -> None:
        result = self.result
        skipped = len(batch.skipped) + len(counts.unknown_ids) + counts.kept
        unchanged = (
            batch.staged.count
            - counts.inserted
            - counts.updated
            - len(counts.unknown_ids)
            - counts.kept
        )
        kept = [c for c in counts.conflicts if c.resolution == "kept"]
        result.conflicts += len(counts.conflicts)
        result.held += sum(1 for c in kept if c.kind == "redis_restarted")
        result.kept_changes += sum(1 for c in kept if c.kind == "changed_in_db")
        result.processed += batch.keys
        result.inserted += counts.inserted
        result.updated += counts.updated
        result.unchanged += unchanged
        result.skipped += skipped
        result.invalid += len(batch.invalid)
        report = BatchReport(
            batch.number,
            batch.keys,
            counts.inserted,
            counts.updated,
            unchanged,
            skipped,
            result.processed,
        )
        log.debug(
            "batch %d: %d keys, %d inserted, %d updated, %d unchanged, %d skipped",
            report.batch_no,
            report.keys,
            report.inserted,
            report.updated,
            report.unchanged,
            report.skipped,
        )
        if self.on_batch is not None:
            self.on_batch(report)

    def _resolve_in_redis(self, batch: Batch, conflicts: list[Conflict]) -> set[int]:
        """Give Redis the database's value for these conflicts, each only if the key still
        holds what this run read (compare-and-set); the ids whose key was really set."""
        prefix = self.settings.key_prefix
        items: list[tuple[bytes, bytes, bytes]] = []
        ids: list[int] = []
        for c in conflicts:
            amount = self.target.balance_type.amount(c.db_value)
            value = redis_value(format(amount, "f"), self.settings.value_format)
            if isinstance(value, str):
                log.warning("Redis key %s%d left as it is: %s", prefix, c.telegram_id, value)
                continue
            raw = batch.raw[c.telegram_id]
            items.append((prefix.encode() + b"%d" % c.telegram_id, raw, value))
            ids.append(c.telegram_id)
        done = set()
        for telegram_id, was_set in zip(ids, self.redis.set_if_equal(items), strict=True):
            if was_set:
                done.add(telegram_id)
            else:
                log.info(
                    "Redis key %s%d changed after it was read: the conflict stays",
                    prefix,
                    telegram_id,
                )
        return done


def _show(key: bytes) -> str:
    return repr(key.decode("utf-8", "backslashreplace"))[:200]
