"""skipped: the records a sync run skipped, as kept in balsync.skipped_records."""

from __future__ import annotations

from dataclasses import dataclass, field

from balance_sync.errors import ConfigError
from balance_sync.settings import Settings
from balance_sync.stores.postgres import Database, Ledger, Schema, SkippedRecord

DEFAULT_LIMIT = 100


@dataclass(frozen=True)
class SkippedListing:
    """The skipped records of one run; `run_id` None when the table has had no run yet.

    `total` counts every record kept for the run, `records` the first `limit` of them.
    """

    run_id: int | None
    total: int = 0
    records: list[SkippedRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        """The command's JSON object: full stored values, times in ISO 8601."""
        return {
            "run_id": self.run_id,
            "records": [
                {
                    "key": record.key,
                    "raw_value": record.raw_value,
                    "reason": record.reason,
                    "recorded_at": record.recorded_at.isoformat(),
                }
                for record in self.records
            ],
        }


def list_skipped(
    settings: Settings, run_id: int | None, limit: int = DEFAULT_LIMIT
) -> SkippedListing:
    """The records run `run_id` skipped, the first `limit` of them.

    Without `run_id`: the newest run of the target table that skipped any, else its
    newest run (with nothing to list), else no run at all.

    Raises SchemaMissing before `init-db`, ConfigError for a run id that does not exist.
    """
    db = Database(settings.database_url, settings.retry_timeout)
    try:
        Schema(db).require_schema()
        if run_id is None:
            run_id = Ledger(db).newest_skipping_run(settings.table)
            if run_id is None:
                return SkippedListing(run_id=None)
        elif not Ledger(db).run_exists(run_id):
            raise ConfigError(f"no run with id {run_id}", "`balsync stats` lists the recent runs")
        total, records = Ledger(db).skipped_records(run_id, limit)
        return SkippedListing(run_id=run_id, total=total, records=records)
    finally:
        db.close()
