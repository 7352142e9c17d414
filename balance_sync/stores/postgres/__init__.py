"""PostgreSQL, the durable store: every SQL statement balsync runs lives in this package.

A `Database` is one connection under balsync's retry budget; each family of statements is
a part that runs on one (`Schema(db)`, `Ledger(db)`, `Merge(db)`...):

- `connection`: connecting, session limits, each attempt's deadline, the retry wrapper;
- `schema`: `init-db` and its migrations, and what balsync learns of the target table;
- `lock`: the per-table advisory lock a run holds;
- `ledger`: the record of each run, its skipped records and its conflicts;
- `trust`: the Redis server trusted for each table (the restart guard's records);
- `merge`: one batch of balances into the target table, in one transaction;
- `memory`: what balsync remembers it wrote for each id;
- `reads`: what the target table holds, for the operator commands and the read-through;
- `bookkeeping`: the sizes of balsync's own tables, and pruning their old rows.

Names with a leading underscore are shared between these modules only.
"""

from balance_sync.stores.postgres.bookkeeping import (
    AGED_CHILDREN,
    RETENTION_INDEXES,
    RUN_CHILDREN,
    Bookkeeping,
    TableSize,
    bookkeeping_sizes,
)
from balance_sync.stores.postgres.connection import Database
from balance_sync.stores.postgres.ledger import Ledger, RunRecord, RunWindow, SkippedRecord
from balance_sync.stores.postgres.lock import LOCK_CLASS, LockHolder, RunLock, TableLock
from balance_sync.stores.postgres.memory import Memory
from balance_sync.stores.postgres.merge import (
    BatchCounts,
    Conflict,
    ConflictKind,
    Merge,
    MergePolicy,
    OnConflict,
    Resolution,
    Staged,
    text_of,
)
from balance_sync.stores.postgres.reads import Reads, balance_lookup, looked_up_balance
from balance_sync.stores.postgres.schema import SCHEMA, BalanceType, Schema, TargetTable
from balance_sync.stores.postgres.trust import RedisTrust, Trust

__all__ = [
    "AGED_CHILDREN",
    "LOCK_CLASS",
    "RETENTION_INDEXES",
    "RUN_CHILDREN",
    "SCHEMA",
    "BalanceType",
    "BatchCounts",
    "Bookkeeping",
    "Conflict",
    "ConflictKind",
    "Database",
    "Ledger",
    "LockHolder",
    "Memory",
    "Merge",
    "MergePolicy",
    "OnConflict",
    "Reads",
    "RedisTrust",
    "Resolution",
    "RunLock",
    "RunRecord",
    "RunWindow",
    "Schema",
    "SkippedRecord",
    "Staged",
    "TableLock",
    "TableSize",
    "TargetTable",
    "Trust",
    "balance_lookup",
    "bookkeeping_sizes",
    "looked_up_balance",
    "text_of",
]
