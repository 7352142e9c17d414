"""The sync loop: Redis reader → validator → PostgreSQL writer → run record.

A reader thread scans Redis and validates while the writer merges the previous batch into
PostgreSQL, so the run costs about as much as the slower of the two sides, not their sum.
Memory stays constant: at most a few batches are in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal

from balance_sync.errors import BalsyncError, PostgresUnavailable
from balance_sync.pg_store import Database, RunLock, TargetTable
from balance_sync.redis_store import RedisStore
from balance_sync.settings import Settings
from balance_sync.validation import InvalidRecord, ValidRecord, validate

log = logging.getLogger(__name__)

Status = Literal["success", "partial", "skipped", "failed"]
DEFAULT_BATCH_SIZE = 10_000
DEFAULT_MIN_INTERVAL = 300.0
SKIPPED_RECORDS_CAP = 1000
QUEUE_DEPTH = 4


@dataclass(frozen=True)
class SyncOptions:
    """The flags of one `balsync sync`."""

    dry_run: bool = False
    force: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    wait: float = 0.0
    allow_negative: bool = False
    min_interval: float = DEFAULT_MIN_INTERVAL


@dataclass
class SyncResult:
    """What a run did; `to_json` is SPEC's JSON object."""

    status: Status
    dry_run: bool
    processed: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    invalid: int = 0
    duration_s: float = 0.0
    run_id: int | None = None
    reason: str = ""  # why a run was skipped, in words

    def counters(self) -> dict[str, int]:
        """The counters as stored in the run record."""
        return {
            name: getattr(self, name)
            for name in ("processed", "inserted", "updated", "unchanged", "skipped", "invalid")
        }

    def to_json(self) -> dict[str, object]:
        """SPEC's sync object, nothing more."""
        data = asdict(self)
        del data["reason"]
        data["duration_s"] = round(self.duration_s, 3)
        return data


@dataclass(frozen=True)
class BatchReport:
    """Progress after one batch, for a progress bar or a verbose log."""

    batch_no: int
    keys: int
    inserted: int
    updated: int
    unchanged: int
    skipped: int
    total_processed: int


@dataclass
class _Batch:
    number: int
    records: list[ValidRecord] = field(default_factory=list)
    invalid: list[InvalidRecord] = field(default_factory=list)
    keys: int = 0


_DONE = object()


def run_sync(
    settings: Settings,
    options: SyncOptions,
    on_batch: Callable[[BatchReport], None] | None = None,
) -> SyncResult:
    """Run one sync as SPEC describes it, and say what it did.

    Raises RedisUnavailable (nothing more is written), PostgresUnavailable (rerunning is
    safe), or another BalsyncError; every batch committed before a failure holds exact
    values.
    """
    started = time.monotonic()
    redis = RedisStore(settings.redis_url, settings.retry_timeout)
    control = Database(settings.database_url, settings.retry_timeout)
    writer = Database(settings.database_url, settings.retry_timeout)
    lock = RunLock(control, settings.table)
    result = SyncResult(status="success", dry_run=options.dry_run)
    try:
        redis.ping()
        if not options.dry_run:
            control.require_schema()
        target = writer.describe_target(settings)
        if not options.dry_run:
            if not lock.acquire(options.wait):
                result.status, result.reason = "skipped", "another run holds the lock"
                log.info("sync skipped: %s on %s", result.reason, settings.table)
                return _finish(result, started)
            if not options.force:
                age = control.last_success_age(settings.table)
                if age is not None and age < options.min_interval:
                    result.status = "skipped"
                    result.reason = (
                        f"a sync finished {age:.0f}s ago, within --min-interval "
                        f"{options.min_interval:g}s (use --force to run anyway)"
                    )
                    log.info("sync skipped: %s", result.reason)
                    return _finish(result, started)
            result.run_id = control.start_run(settings)
        try:
            _Writing(settings, options, redis, writer, lock, target, result, on_batch).copy_all()
        except BaseException as exc:
            result.status = "failed"
            _record_failure(control, result, started, exc)
            raise
        result.status = "partial" if result.skipped else "success"
        _finish(result, started)
        if result.run_id is not None:
            control.finish_run(
                result.run_id, result.status, result.counters(), result.duration_s, None
            )
        log.info(
            "sync %s: %d processed, %d inserted, %d updated, %d unchanged, %d skipped",
            result.status,
            result.processed,
            result.inserted,
            result.updated,
            result.unchanged,
            result.skipped,
        )
        return result
    finally:
        lock.release()
        for closable in (control, writer, redis):
            closable.close()


def _finish(result: SyncResult, started: float) -> SyncResult:
    result.duration_s = time.monotonic() - started
    return result


def _record_failure(
    control: Database, result: SyncResult, started: float, exc: BaseException
) -> None:
    """Mark the run failed, if PostgreSQL can still hear it; a killed run is marked later."""
    if result.run_id is None or isinstance(exc, PostgresUnavailable):
        return
    _finish(result, started)
    try:
        control.finish_run(
            result.run_id, "failed", result.counters(), result.duration_s, str(exc)[:2000]
        )
    except BalsyncError:
        log.warning("could not record the failure of run %s", result.run_id)


def _read_batches(settings: Settings, options: SyncOptions, redis: RedisStore) -> Iterator[_Batch]:
    """Scan, validate and group records into batches of `batch_size` valid records."""
    prefix_length = len(settings.key_prefix.encode())
    number = 1
    batch = _Batch(number)
    seen: set[bytes] = set()  # SCAN may return a key twice; a batch must not hold it twice
    for page in redis.scan_pages(settings.key_prefix):
        for key, kind in page.wrong_type:
            batch.keys += 1
            batch.invalid.append(InvalidRecord(key, None, f"key holds a {kind}, not a string"))
        for key, raw in page.values:
            if key in seen:
                continue
            seen.add(key)
            batch.keys += 1
            checked = validate(
                key,
                raw,
                prefix_length,
                value_format=settings.value_format,
                allow_negative=options.allow_negative,
            )
            if isinstance(checked, InvalidRecord):
                batch.invalid.append(checked)
                continue
            batch.records.append(checked)
            if len(batch.records) >= options.batch_size:
                yield batch
                number += 1
                batch = _Batch(number)
                seen = set()
    if batch.keys:
        yield batch


@dataclass
class _Writing:
    """The collaborators of one run's writing phase."""

    settings: Settings
    options: SyncOptions
    redis: RedisStore
    writer: Database
    lock: RunLock
    target: TargetTable
    result: SyncResult
    on_batch: Callable[[BatchReport], None] | None

    def copy_all(self) -> None:
        """Read on a thread of its own while this thread writes the previous batch."""
        batches: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
        stop = threading.Event()

        def read() -> None:
            try:
                for batch in _read_batches(self.settings, self.options, self.redis):
                    while not stop.is_set():
                        try:
                            batches.put(batch, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                batches.put(_DONE)
            except BaseException as exc:  # handed to the writing thread, which raises it
                batches.put(exc)

        reader = threading.Thread(target=read, name="balsync-reader", daemon=True)
        reader.start()
        try:
            while (item := batches.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, _Batch)
                self.write(item)
        finally:
            stop.set()
            reader.join(timeout=5)

    def write(self, batch: _Batch) -> None:
        """Merge one batch and account for it."""
        result = self.result
        counts = self.writer.apply_batch(
            self.target,
            batch.records,
            batch.invalid,
            run_id=result.run_id,
            batch_no=batch.number,
            lock=None if self.options.dry_run else self.lock,
            key_prefix=self.settings.key_prefix,
            keep_skipped=max(0, SKIPPED_RECORDS_CAP - result.skipped),
        )
        for record in batch.invalid:
            log.info("skipped %s: %s", _show(record.key), record.reason)
        for telegram_id in counts.unknown_ids:
            log.info(
                "skipped %s%d: unknown id (no row to update)",
                self.settings.key_prefix,
                telegram_id,
            )
        skipped = len(batch.invalid) + len(counts.unknown_ids)
        unchanged = len(batch.records) - counts.inserted - counts.updated - len(counts.unknown_ids)
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


def _show(key: bytes) -> str:
    return repr(key.decode("utf-8", "backslashreplace"))[:200]
