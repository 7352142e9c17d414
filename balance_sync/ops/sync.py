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
from functools import partial
from operator import itemgetter
from typing import Literal

from balance_sync.errors import BalsyncError, PostgresUnavailable
from balance_sync.monitoring.logs import begin_run, bind_run_id
from balance_sync.ops.retention import prune_after_sync
from balance_sync.restart_guard import RestartGuard
from balance_sync.settings import Settings, TableName, mask_text
from balance_sync.stopping import StopRequest
from balance_sync.stores.postgres.database import (
    BalanceType,
    BatchCounts,
    Conflict,
    Database,
    MergePolicy,
    OnConflict,
    RunLock,
    TargetTable,
)
from balance_sync.stores.redis import RedisStore
from balance_sync.validation import (
    InvalidRecord,
    ValidRecord,
    common_page,
    redis_value,
    validate_page,
)

log = logging.getLogger(__name__)

Status = Literal["success", "partial", "skipped", "failed"]
DEFAULT_BATCH_SIZE = 25_000  # measured: per-batch overhead fades, memory stays small
DEFAULT_MIN_INTERVAL = 300.0
SKIPPED_RECORDS_CAP = 1000
CONFLICTS_CAP = 10_000  # a Redis restart can hold back every row; a sample is enough
QUEUE_DEPTH = 4
JOIN_ROUND_S = 0.1  # the main thread's longest wait between chances to run a signal handler
DEFAULT_WRITERS = 2  # PostgreSQL connections merging batches at once


@dataclass(frozen=True)
class SyncOptions:
    """The flags of one `balsync sync`."""

    dry_run: bool = False
    force: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    wait: float = 0.0
    allow_negative: bool = False
    min_interval: float = DEFAULT_MIN_INTERVAL
    on_conflict: OnConflict = "skip"
    accept_redis_restart: bool = False
    writers: int = DEFAULT_WRITERS
    incremental: bool = False
    resolve_ids: frozenset[int] | None = None  # --ids: the conflicts --on-conflict resolves
    # Set from outside (the CLI's signal handlers): stop before the next batch.
    stop: StopRequest = field(default_factory=StopRequest, compare=False, repr=False)

    @property
    def full_scan(self) -> bool:
        """True when the run reads every key (not only the ids marked changed)."""
        return self.force or not self.incremental


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
    conflicts: int = 0  # rows changed behind balsync's back, kept or resolved
    held: int = 0  # rows not overwritten because Redis restarted
    kept_changes: int = 0  # rows changed in PostgreSQL behind balsync's back, kept
    restart_pending: bool = False  # the Redis read is not trusted (yet) after a restart
    missing_keys: int = 0  # remembered ids not found agreeing while a restart is pending
    pruned: dict[str, int] = field(default_factory=dict)  # bookkeeping rows deleted, by table

    def counters(self) -> dict[str, int]:
        """The counters as stored in the run record."""
        return {
            name: getattr(self, name)
            for name in ("processed", "inserted", "updated", "unchanged", "skipped", "invalid")
        }

    def to_json(self) -> dict[str, object]:
        """SPEC's sync object; a skipped run adds its `reason`, since a monitor must tell a
        lock held by a long run from a recent sync."""
        data = asdict(self)
        if self.status != "skipped":
            del data["reason"]
        for extra in (
            "conflicts",
            "held",
            "kept_changes",
            "restart_pending",
            "missing_keys",
            "pruned",
        ):
            del data[extra]
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
    raw: dict[int, bytes] = field(default_factory=dict)  # only for --on-conflict db
    unfit: list[InvalidRecord] = field(default_factory=list)  # too wide for the column

    @property
    def skipped(self) -> list[InvalidRecord]:
        """Every record of the batch that is not written, with its reason."""
        return self.invalid + self.unfit


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
    begin_run(str(settings.table))  # nothing of an earlier run in this process carries over
    started = time.monotonic()
    redis = RedisStore(settings.redis_url, settings.retry_timeout)
    control = Database(settings.database_url, settings.retry_timeout)
    writers = [
        Database(settings.database_url, settings.retry_timeout) for _ in range(options.writers)
    ]
    lock: RunLock | None = None
    result = SyncResult(status="success", dry_run=options.dry_run)
    try:
        redis.ping()
        if not options.dry_run:
            control.require_schema()
        target = writers[0].describe_target(settings)
        # Keyed by the table's oid: `user_balances` and `public.user_balances` share it.
        lock = RunLock(control, target.table)
        if not options.dry_run:
            result.reason = _gate(options, control, lock, target.table)
            if result.reason:
                result.status = "skipped"
                log.info("sync skipped: %s", result.reason)
                return _finish(result, started)
            result.run_id = control.start_run(settings)
            bind_run_id(result.run_id)  # every log line from here on names its run
        try:
            guard = RestartGuard.open(
                redis,
                control,
                target,
                options,
                key_prefix=settings.key_prefix,
                run_id=result.run_id,
            )
            policy = _merge_policy(options, control, target, guard)
            if not options.dry_run:
                # Every run claims the ids marked dirty: a full scan covers them too.
                claimed = redis.claim_dirty(settings.key_prefix)
                if not options.full_scan:
                    log.info("incremental sync of %d changed id(s)", claimed)
            _Writing(
                settings, options, redis, lock, target, result, on_batch, policy, guard, writers
            ).copy_all()
            if not options.dry_run:
                guard.finish()
                redis.release_claim(settings.key_prefix)  # only now: PostgreSQL has them all
        except BaseException as exc:
            result.status = "failed"
            _record_failure(control, result, started, exc)
            raise
        result.status = "partial" if result.skipped else "success"
        result.restart_pending, result.missing_keys = guard.conclude(result.held, result.run_id)
        _finish(result, started)
        _explain(result)
        if result.run_id is not None:
            control.finish_run(
                result.run_id, result.status, result.counters(), result.duration_s, None
            )
            # Still under the table's lock; bounded in time, and never fails the sync.
            result.pruned = prune_after_sync(control, settings, lock)
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
        if lock is not None:
            lock.release()
        redis.close()
        for db in (control, *writers):
            db.close()


def _gate(options: SyncOptions, control: Database, lock: RunLock, table: TableName) -> str:
    """Why this run must not go ahead (another one runs, or one finished recently), or ''."""
    if not lock.acquire(options.wait, options.stop.pause):
        return f"another run holds the lock on {table}"
    if not options.force:
        age = control.last_success_age(table)
        if age is not None and age < options.min_interval:
            return (
                f"a sync finished {age:.0f}s ago, within --min-interval "
                f"{options.min_interval:g}s (use --force to run anyway)"
            )
    return ""


def _merge_policy(
    options: SyncOptions, control: Database, target: TargetTable, guard: RestartGuard
) -> MergePolicy:
    """Hold every overwrite while a Redis restart is pending; insert first when the table is
    empty and takes inserts (a first sync)."""
    return MergePolicy(
        on_conflict=options.on_conflict,
        hold_updates=guard.pending,
        resolve_ids=options.resolve_ids,
        insert_first=not options.dry_run and target.can_insert and control.is_empty(target),
    )


def _explain(result: SyncResult) -> None:
    if result.restart_pending:
        missing = (
            f"; {result.missing_keys} remembered key(s) are missing from Redis or invalid"
            if result.missing_keys
            else ""
        )
        log.warning(
            "Redis restart pending: %d balance(s) differ from PostgreSQL and were not "
            "overwritten%s. Redis may have come back empty or from an old snapshot. "
            "PostgreSQL is right: `balsync restore` puts its balances into keys missing from "
            "Redis (SET NX, no existing key changes), and `balsync sync --on-conflict db "
            "[--ids ID,…]` gives the differing keys PostgreSQL's value (compare-and-set); "
            "the next full sync that finds every key agreeing trusts this Redis. Redis is "
            "right: `balsync sync --accept-redis-restart` overwrites the held rows with "
            "Redis's values and trusts it. See `balsync conflicts`.",
            result.held,
            missing,
        )
    kept = result.kept_changes
    if kept:
        log.warning(
            "%d row(s) were changed in PostgreSQL since balsync last wrote them and were kept "
            "(see `balsync conflicts`; `--on-conflict redis` or `db` decides for them)",
            kept,
        )


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
            result.run_id,
            "failed",
            result.counters(),
            result.duration_s,
            mask_text(str(exc))[:2000],  # a library's text may quote a URL with its password
        )
    except BalsyncError:
        log.warning("could not record the failure of run %s", result.run_id)


def _read_batches(
    settings: Settings, options: SyncOptions, redis: RedisStore, column: BalanceType
) -> Iterator[_Batch]:
    """Scan, validate and group records into batches of `batch_size` valid records.

    A value the target's balance column cannot hold exactly (an application table's
    narrower numeric or integer column) is invalid too: skipped, never rounded. A column in
    cents gets each amount as its exact number of cents.
    """
    prefix_length = len(settings.key_prefix.encode())
    # Pages of common records take a path with no per-record Python; `raw` is kept per
    # record only for --on-conflict db, and other columns check or convert every value.
    bulk = settings.value_format == "decimal" and column.exact and options.on_conflict != "db"
    batcher = _Batcher(options.batch_size, keep_raw=options.on_conflict == "db")
    if options.incremental and not options.force:
        pages = redis.dirty_pages(settings.key_prefix, include_unclaimed=options.dry_run)
    else:
        pages = redis.scan_pages(settings.key_prefix)
    for page in pages:
        for key, kind in page.wrong_type:
            batcher.add_wrong_type(key, kind)
        records = common_page(page.values, prefix_length) if bulk else None
        filled = batcher.add_page(records) if records is not None else None
        if filled is not None:
            yield from filled
            continue
        for key, raw, checked in validate_page(
            page.values,
            prefix_length,
            value_format=settings.value_format,
            allow_negative=options.allow_negative,
        ):
            problem = None
            record = checked
            if not column.exact and not isinstance(checked, InvalidRecord):
                held = column.to_column(checked[1])
                if isinstance(held, str):
                    problem = held
                else:
                    record = (checked[0], held)
            yield from batcher.add(key[prefix_length:], key, raw, record, problem)
    if batcher.batch.keys:
        yield batcher.batch


_first = itemgetter(0)


@dataclass
class _Batcher:
    """Groups records into batches of `size` valid records, each id at most once a batch.

    SCAN may return a key twice. Ids stand for keys: every key has the same prefix.
    """

    size: int
    keep_raw: bool
    batch: _Batch = field(default_factory=lambda: _Batch(1))
    seen: set[bytes] = field(default_factory=set)

    def _full(self) -> _Batch:
        done = self.batch
        self.batch = _Batch(done.number + 1)
        self.seen = set()
        return done

    def add_wrong_type(self, key: bytes, kind: str) -> None:
        """A key of another type than string: skipped, and counted invalid."""
        self.batch.keys += 1
        self.batch.invalid.append(InvalidRecord(key, None, f"key holds a {kind}, not a string"))

    def add_page(self, records: list[ValidRecord]) -> list[_Batch] | None:
        """Add a page of valid records and return the batches it filled; None (nothing
        added) if an id repeats, in the page or in the batch being filled."""
        ids = set(map(_first, records))
        if len(ids) != len(records) or not self.seen.isdisjoint(ids):
            return None
        filled = []
        start = 0
        while start < len(records):
            chunk = records[start : start + self.size - len(self.batch.records)]
            start += len(chunk)
            self.batch.records += chunk
            self.batch.keys += len(chunk)
            self.seen.update(map(_first, chunk))
            if len(self.batch.records) >= self.size:
                filled.append(self._full())
        return filled

    def add(
        self,
        suffix: bytes,
        key: bytes,
        raw: bytes,
        checked: ValidRecord | InvalidRecord,
        unfit: str | None,
    ) -> Iterator[_Batch]:
        """Add one record as `validate` judged it; `unfit`: why the column cannot hold it."""
        if suffix in self.seen:
            return
        self.seen.add(suffix)
        batch = self.batch
        batch.keys += 1
        if unfit:  # valid by SPEC's rules, so skipped but not counted invalid
            batch.unfit.append(InvalidRecord(key, raw, unfit))
        elif isinstance(checked, InvalidRecord):
            batch.invalid.append(checked)
        else:
            batch.records.append(checked)
            if self.keep_raw:
                batch.raw[int(checked[0])] = raw
            if len(batch.records) >= self.size:
                yield self._full()


@dataclass
class _Writing:
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
                for batch in _read_batches(
                    self.settings, self.options, self.redis, self.target.balance_type
                ):
                    if not put(batch):
                        return
                put(_DONE)
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
                    if item is _DONE:
                        put(_DONE)  # the next writer needs to see it too
                        return
                    assert isinstance(item, _Batch)
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

    def write(self, writer: Database, batch: _Batch) -> None:
        """Merge one batch on `writer` and account for it."""
        result = self.result
        writing = not self.options.dry_run
        counts = writer.apply_batch(
            self.target,
            batch.records,
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

    def _account(self, batch: _Batch, counts: BatchCounts) -> None:
        result = self.result
        skipped = len(batch.skipped) + len(counts.unknown_ids) + counts.kept
        unchanged = (
            len(batch.records)
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

    def _resolve_in_redis(self, batch: _Batch, conflicts: list[Conflict]) -> set[int]:
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
