"""Retention: how long balsync keeps its own records, and pruning what is older.

Every run leaves a row in balsync.sync_runs, and up to 1000 skipped records and 10 000
conflicts hang off it; kept for ever they make `stats`, `skipped` and `conflicts` slower
every month. Pruning works per target table, under its lock, in small batches found by
index, bounded in time after a sync, so that a large backlog is worked off over several
runs without long locks or a burst of WAL.

Whatever their age, these are never pruned: balsync.written (the memory of written values)
and every table not named in RUN_CHILDREN (stores/postgres/bookkeeping.py), runs still
marked running, the runs the guards and the operator views read (_KEPT_RUNS there) and runs
another table refers to, with all their records.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from balance_sync.errors import SchemaMissing
from balance_sync.ops.session import LOCK_HELD
from balance_sync.settings import Settings, duration_text
from balance_sync.stores.postgres import (
    AGED_CHILDREN,
    RUN_CHILDREN,
    Bookkeeping,
    Database,
    RunLock,
    Schema,
    TableSize,
    bookkeeping_sizes,
)

log = logging.getLogger(__name__)

Status = Literal["success", "skipped"]
PRUNED_TABLES = ("sync_runs", *RUN_CHILDREN)
BATCH_ROWS = 5000  # rows a DELETE takes at most: milliseconds of locks, little WAL
BATCH_RUNS = 500  # runs deleted at once, after their records
AFTER_SYNC_SECONDS = 20.0  # what pruning may add to a sync; the rest waits for the next one
# Past this size, bookkeeping kept for ever is worth a warning in health and stats.
LARGE_BYTES = 1 << 30


@dataclass(frozen=True)
class Retention:
    """How long run records and the records of a run are kept, in seconds; None: for ever."""

    runs_s: float | None
    records_s: float | None  # skipped records and conflicts

    @classmethod
    def of(cls, settings: Settings) -> Retention:
        """The policy of `--keep-runs` and `--keep-skipped`."""
        return cls(settings.keep_runs, settings.keep_skipped)

    @property
    def enabled(self) -> bool:
        """True when some kind of record is pruned."""
        return self.runs_s is not None or self.records_s is not None

    @property
    def keeps_for_ever(self) -> bool:
        """True when some kind of record is kept for ever."""
        return self.runs_s is None or self.records_s is None

    def describe(self) -> str:
        """The policy in words, for logs and reports."""
        if not self.enabled:
            return "off: everything is kept"
        return (
            f"runs {_period(self.runs_s)}, skipped records and conflicts {_period(self.records_s)}"
        )

    def to_json(self) -> dict[str, object]:
        """The periods as durations (`90d`), null when off."""
        return {
            "keep_runs": None if self.runs_s is None else duration_text(self.runs_s),
            "keep_skipped": None if self.records_s is None else duration_text(self.records_s),
        }


def _period(seconds: float | None) -> str:
    return "kept for ever" if seconds is None else duration_text(seconds)


def _zeros() -> dict[str, int]:
    return dict.fromkeys(PRUNED_TABLES, 0)


@dataclass
class PruneResult:
    """What a prune found and deleted, per table of balsync's schema.

    `found` counts what it would delete, before deleting (None after a sync, which does not
    count first); `deleted` what went (0 in a dry run). `complete` is False when the time
    budget ran out with more to delete: the next prune goes on.
    """

    status: Status
    dry_run: bool
    table: str
    retention: Retention
    found: dict[str, int] | None = None
    deleted: dict[str, int] = field(default_factory=_zeros)
    kept_runs: int = 0
    complete: bool = True
    duration_s: float = 0.0
    reason: str = ""  # why a prune was skipped, in words

    def to_json(self) -> dict[str, object]:
        """The command's JSON object."""
        return {
            "status": self.status,
            "dry_run": self.dry_run,
            "table": self.table,
            **self.retention.to_json(),
            "found": self.found,
            "deleted": self.deleted,
            "kept_runs": self.kept_runs,
            "complete": self.complete,
            "duration_s": round(self.duration_s, 3),
        }


@dataclass(frozen=True)
class PruneOptions:
    """The flags of one `balsync prune`; `older_than` replaces both periods of the policy."""

    dry_run: bool = False
    older_than: float | None = None


def run_prune(settings: Settings, options: PruneOptions) -> PruneResult:
    """Prune the target table's bookkeeping to the policy (or `older_than`), under its lock.

    Counts what it would delete first, then deletes it all, however long that takes; each
    statement stays small. A dry run takes no lock and only counts; neither does a prune of
    a table that no longer exists. Returns status `skipped` when another run holds the
    lock. Raises SchemaMissing before `init-db`.
    """
    retention = Retention.of(settings)
    if options.older_than is not None:
        retention = Retention(options.older_than, options.older_than)
    started = time.monotonic()
    db = Database(settings.database_url, settings.retry_timeout)
    try:
        Schema(db).require_schema()
        result = PruneResult("success", options.dry_run, str(settings.table), retention)
        books = Bookkeeping(db, settings.table)
        lock = None
        # A table that no longer exists has no lock, and no sync that could need one.
        if not options.dry_run and books.target_exists():
            lock = RunLock(db, settings.table)
            if not lock.acquire(0):
                result.status, result.reason = "skipped", LOCK_HELD
                log.info("prune skipped: %s on %s", LOCK_HELD, settings.table)
                return result
        try:
            _Pruning(books, result, lock, None).run(count=True)
        finally:
            if lock is not None:
                lock.release()
        result.duration_s = time.monotonic() - started
        return result
    finally:
        db.close()


def prune_after_sync(db: Database, settings: Settings, lock: RunLock | None) -> dict[str, int]:
    """Prune after a sync that finished, for at most AFTER_SYNC_SECONDS; rows deleted per table.

    Never fails the sync: a failure is a warning, and the next run tries again.
    """
    result = PruneResult("success", False, str(settings.table), Retention.of(settings))
    try:
        _Pruning(Bookkeeping(db, settings.table), result, lock, AFTER_SYNC_SECONDS).run()
    except Exception as exc:  # the sync succeeded; its bookkeeping can wait for the next run
        log.warning("pruning balsync's records failed, the next run tries again: %s", exc)
        log.debug("pruning failed", exc_info=True)
    return result.deleted


@dataclass
class _Pruning:
    """One prune's progress against its time budget (None: until done)."""

    books: Bookkeeping
    result: PruneResult
    lock: RunLock | None
    budget_s: float | None
    started: float = field(default_factory=time.monotonic)

    def run(self, *, count: bool = False) -> None:
        """Find the cutoffs and the kept runs, count if asked, then delete (unless a dry run)."""
        books, result, retention = self.books, self.result, self.result.retention
        if not retention.enabled:
            log.info("retention is off for %s: nothing is pruned", result.table)
            return
        if not books.indexed():
            raise SchemaMissing(
                "balsync's schema predates retention: its indexes are missing",
                "run `balsync init-db` again as the database owner; pruning waits until then",
            )
        kept = books.kept_runs()
        result.kept_runs = len(kept)
        records = None if retention.records_s is None else books.cutoff(retention.records_s)
        runs = None if retention.runs_s is None else books.cutoff(retention.runs_s)
        if count or result.dry_run:
            result.found = self._count(kept, runs, records)
            log.info(
                "prune of %s (%s): %s to delete, %d run(s) kept whatever their age",
                result.table,
                retention.describe(),
                _counts(result.found),
                len(kept),
            )
        if result.dry_run:
            return
        if records is not None:
            for child in AGED_CHILDREN:
                delete = functools.partial(books.delete_aged, child, records, kept, BATCH_ROWS)
                self._drain(child, delete)
        if runs is not None:
            self._delete_old_runs(runs, kept)
        result.duration_s = time.monotonic() - self.started
        busy = any(result.deleted.values()) or not result.complete
        log.log(
            logging.INFO if busy else logging.DEBUG,  # an hourly line of zeros says nothing
            "pruned %s of %s in %.2fs%s",
            _counts(result.deleted),
            result.table,
            result.duration_s,
            "" if result.complete else "; more is left for the next run",
        )

    def _count(
        self, kept: list[int], runs: datetime | None, records: datetime | None
    ) -> dict[str, int]:
        found = _zeros()
        if records is not None:
            for child in AGED_CHILDREN:
                found[child] += self.books.count_aged(child, records, kept)
        if runs is not None:
            found["sync_runs"] = self.books.count_old_runs(runs, kept)
            for child in RUN_CHILDREN:
                aged = records if child in AGED_CHILDREN else None
                found[child] += self.books.count_of_old_runs(child, runs, kept, aged)
        return found

    def _delete_old_runs(self, cutoff: datetime, kept: list[int]) -> None:
        """Old runs a batch at a time: first their records, in batches, then the runs."""
        while self._in_time():
            runs = self.books.old_runs(cutoff, kept, BATCH_RUNS)
            if not runs:
                return
            for child in RUN_CHILDREN:
                delete = functools.partial(self.books.delete_children, child, runs, BATCH_ROWS)
                self._drain(child, delete)
            if not self.result.complete:
                return
            self._check_lock()
            self.result.deleted["sync_runs"] += self.books.delete_runs(runs)

    def _drain(self, table: str, delete: Callable[[], int]) -> None:
        """Delete batch after batch of `table` until one comes back short or time is up."""
        while self._in_time():
            self._check_lock()
            deleted = delete()
            self.result.deleted[table] += deleted
            if deleted < BATCH_ROWS:
                return

    def _in_time(self) -> bool:
        if self.budget_s is not None and time.monotonic() - self.started > self.budget_s:
            self.result.complete = False
        return self.result.complete

    def _check_lock(self) -> None:
        if self.lock is not None:
            self.lock.holder_pid()  # raises LockLost if another run took the table


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {table}" for table, n in counts.items())


@dataclass(frozen=True)
class BookkeepingSize:
    """The size of balsync's own tables, for every target table together, and the policy."""

    tables: tuple[TableSize, ...]
    retention: Retention

    @property
    def rows(self) -> int:
        """Rows of all of balsync's tables."""
        return sum(t.rows for t in self.tables)

    @property
    def bytes(self) -> int:
        """Bytes of all of balsync's tables, indexes included."""
        return sum(t.bytes for t in self.tables)

    @property
    def warning(self) -> str:
        """Why these tables need attention (retention off and they are large), or ''."""
        prunable = sum(t.bytes for t in self.tables if t.name in PRUNED_TABLES)
        if not self.retention.keeps_for_ever or prunable <= LARGE_BYTES:
            return ""
        return (
            f"retention is off ({self.retention.describe()}) and run records, skipped "
            f"records and conflicts take {format_bytes(prunable)}: stats, skipped and "
            "conflicts slow down as they grow; set --keep-runs and --keep-skipped "
            "(BALSYNC_KEEP_RUNS, BALSYNC_KEEP_SKIPPED) or run `balsync prune --older-than 90d`"
        )

    def to_json(self) -> dict[str, object]:
        """Each table's rows and bytes, the totals, the policy and the warning (or null)."""
        return {
            "tables": [{"name": t.name, "rows": t.rows, "bytes": t.bytes} for t in self.tables],
            "rows": self.rows,
            "bytes": self.bytes,
            "retention": self.retention.to_json(),
            "warning": self.warning or None,
        }


def bookkeeping_size(db: Database, settings: Settings) -> BookkeepingSize:
    """How large balsync's own tables are, with the retention policy of `settings`."""
    return BookkeepingSize(tuple(bookkeeping_sizes(db)), Retention.of(settings))


def format_bytes(count: int) -> str:
    """A size as a person reads it: 512 B, 4.2 MiB, 1.3 GiB."""
    size, unit = float(count), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{count:,} B" if unit == "B" else f"{size:.1f} {unit}"
