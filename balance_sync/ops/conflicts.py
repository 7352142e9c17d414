"""conflicts: the rows a sync did not simply overwrite, as kept in balsync.conflicts."""

from __future__ import annotations

from dataclasses import dataclass

from balance_sync.settings import Settings
from balance_sync.stores.postgres import Conflict, Database, Ledger, Schema

DEFAULT_LIMIT = 100


@dataclass(frozen=True)
class ConflictListing:
    """The conflicts of one run; `run_id` None when no run of the table had any."""

    run_id: int | None
    conflicts: tuple[Conflict, ...] = ()

    def to_json(self) -> dict[str, object]:
        """The command's JSON object; money as exact decimal strings."""
        return {"run_id": self.run_id, "conflicts": [_conflict_json(c) for c in self.conflicts]}


def list_conflicts(
    settings: Settings, run_id: int | None, limit: int = DEFAULT_LIMIT
) -> ConflictListing:
    """The first `limit` conflicts of run `run_id`, by default of the newest run of the
    target table that had any.

    A run id without conflicts (or unknown) lists none. Raises SchemaMissing before
    `init-db`, PostgresUnavailable when PostgreSQL stays unreachable for the retry budget.
    """
    db = Database(settings.database_url, settings.retry_timeout)
    try:
        Schema(db).require_schema()
        chosen, found = Ledger(db).conflicts(settings.table, run_id, limit)
    finally:
        db.close()
    return ConflictListing(run_id=chosen, conflicts=tuple(found))


def _conflict_json(conflict: Conflict) -> dict[str, object]:
    return {
        "telegram_id": conflict.telegram_id,
        "db_value": None if conflict.db_value is None else str(conflict.db_value),
        "redis_value": str(conflict.redis_value),
        "last_written": None if conflict.last_written is None else str(conflict.last_written),
        "kind": conflict.kind,
        "resolution": conflict.resolution,
    }
