"""init-db: create balsync's own schema and, for the default target, the table itself."""

from __future__ import annotations

from dataclasses import dataclass

from balance_sync.settings import Settings
from balance_sync.stores.postgres import Database, Schema


@dataclass(frozen=True)
class InitResult:
    """What one init-db created, in creation order; empty when everything was present."""

    created: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        """The command's JSON object: init-db either succeeds or raises."""
        return {"status": "success", "created": list(self.created)}


def init_db(settings: Settings) -> InitResult:
    """Create balsync's schema and, when the target is the default table, that table.

    Idempotent: a second run creates nothing. An application's table (any other --table or
    columns) is never created or changed. Raises PostgresUnavailable when PostgreSQL stays
    unreachable for the retry budget, BalsyncError when the user may not create objects.
    """
    db = Database(settings.database_url, settings.retry_timeout)
    try:
        return InitResult(created=tuple(Schema(db).init_db(settings)))
    finally:
        db.close()
