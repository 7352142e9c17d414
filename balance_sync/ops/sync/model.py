"""A sync's options, its result and its progress reports: what callers pass and get back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from balance_sync.stopping import StopRequest
from balance_sync.stores.postgres import OnConflict

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
