"""The Redis side of a sync: scan, validate, and group records into batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from operator import itemgetter

from balance_sync.ops.sync.model import SyncOptions
from balance_sync.settings import Settings
from balance_sync.stores.postgres import BalanceType, Staged
from balance_sync.stores.redis import RedisStore
from balance_sync.validation import InvalidRecord, ValidRecord, common_page, validate_page


@dataclass
class Batch:
    number: int
    records: list[ValidRecord] = field(default_factory=list)  # while the batch fills
    staged: Staged = field(default_factory=Staged)  # once it is full: the records as text
    invalid: list[InvalidRecord] = field(default_factory=list)
    keys: int = 0
    raw: dict[int, bytes] = field(default_factory=dict)  # only for --on-conflict db
    unfit: list[InvalidRecord] = field(default_factory=list)  # too wide for the column

    def seal(self) -> Batch:
        """The batch, full: its records turned into the text COPY takes, the objects freed.
        Queued and in-flight batches are most of a run's memory otherwise."""
        self.staged = Staged.of(self.records)
        self.records = []
        return self

    @property
    def skipped(self) -> list[InvalidRecord]:
        """Every record of the batch that is not written, with its reason."""
        return self.invalid + self.unfit


DONE = object()  # the end of the batches, passed from the reader to each writer


def read_batches(
    settings: Settings, options: SyncOptions, redis: RedisStore, column: BalanceType
) -> Iterator[Batch]:
    """Scan, validate and group records into batches of `batch_size` valid records.

    A value the target's balance column cannot hold exactly (an application table's
    narrower numeric or integer column) is invalid too: skipped, never rounded. A column in
    cents gets each amount as its exact number of cents.
    """
    prefix_length = len(settings.key_prefix.encode())
    # Pages of common records take a path with no per-record Python; `raw` is kept per
    # record only for --on-conflict db, and other columns check or convert every value.
    bulk = settings.value_format == "decimal" and column.exact and options.on_conflict != "db"
    batcher = Batcher(options.batch_size, keep_raw=options.on_conflict == "db")
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
        yield batcher.batch.seal()


_first = itemgetter(0)


@dataclass
class Batcher:
    """Groups records into batches of `size` valid records, each id at most once a batch.

    SCAN may return a key twice. Ids stand for keys: every key has the same prefix.
    """

    size: int
    keep_raw: bool
    batch: Batch = field(default_factory=lambda: Batch(1))
    seen: set[bytes] = field(default_factory=set)

    def _full(self) -> Batch:
        done = self.batch
        self.batch = Batch(done.number + 1)
        self.seen = set()
        return done.seal()

    def add_wrong_type(self, key: bytes, kind: str) -> None:
        """A key of another type than string: skipped, and counted invalid."""
        self.batch.keys += 1
        self.batch.invalid.append(InvalidRecord(key, None, f"key holds a {kind}, not a string"))

    def add_page(self, records: list[ValidRecord]) -> list[Batch] | None:
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
    ) -> Iterator[Batch]:
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
