"""The sync loop: Redis reader → validator → PostgreSQL writer → run record.

A reader thread scans Redis and validates while the writer merges the previous batch into
PostgreSQL, so the run costs about as much as the slower of the two sides, not their sum.
Memory stays constant: at most a few batches are in flight.
"""

from balance_sync.ops.sync.model import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MIN_INTERVAL,
    BatchReport,
    Status,
    SyncOptions,
    SyncResult,
)
from balance_sync.ops.sync.run import run_sync

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MIN_INTERVAL",
    "BatchReport",
    "Status",
    "SyncOptions",
    "SyncResult",
    "run_sync",
]
