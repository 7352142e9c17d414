"""`balsync sync --dry-run` on real servers: it reports the changes and writes nothing."""

from __future__ import annotations

import redis

from tests.helpers import (
    OLD,
    PG,
    Balsync,
    counts_of,
    insert_rows,
    lock_held,
    pg_state,
    redis_state,
    seed,
    seed_wrong_type,
    sync_json,
)

# -- dry run -------------------------------------------------------------------------------


def arrange_dry_run(rds: redis.Redis, key_prefix: str, pg: PG, balsync: Balsync) -> None:
    """After a first sync: 10 changed keys, 40 unchanged, 20 new, 5 invalid, 1 row alone."""
    seed(rds, key_prefix, {i: f"{i}.00" for i in range(1, 51)})
    insert_rows(pg, {999: "9.99"}, updated_at=OLD)
    sync_json(balsync)
    seed(rds, key_prefix, {i: f"{i}.10" for i in range(1, 11)})
    seed(rds, key_prefix, {i: f"{i}.00" for i in range(51, 71)})
    seed(rds, key_prefix, {"0": "1.00", "abc": "1.00", "80": "1.001", "81": "-2"})
    seed_wrong_type(rds, f"{key_prefix}82", "hash")


DRY_COUNTS = {
    "processed": 75,
    "inserted": 20,
    "updated": 10,
    "unchanged": 40,
    "skipped": 5,
    "invalid": 5,
}


def test_dry_run_reports_changes_and_writes_nothing_anywhere(initialized, rds, key_prefix, pg):
    """--dry-run: would-be counts, run_id null; PostgreSQL and Redis left identical."""
    arrange_dry_run(rds, key_prefix, pg, initialized)
    pg_before, redis_before = pg_state(pg), redis_state(rds, key_prefix)
    data = sync_json(initialized, "--dry-run", code=1)
    assert data["dry_run"] is True
    assert data["run_id"] is None
    assert data["status"] == "partial"
    assert counts_of(data) == DRY_COUNTS
    assert pg_state(pg) == pg_before
    assert redis_state(rds, key_prefix) == redis_before
    # The real run then does what the dry run said it would.
    real = sync_json(initialized, "--force", code=1)
    assert counts_of(real) == DRY_COUNTS


def test_dry_run_reports_while_another_run_holds_the_lock(
    initialized, rds, key_prefix, pg, database_url
):
    """--dry-run takes no lock: it reports even while another run holds it."""
    arrange_dry_run(rds, key_prefix, pg, initialized)
    pg_before = pg_state(pg)
    with lock_held(database_url):
        data = sync_json(initialized, "--dry-run", code=1)
    assert data["status"] == "partial"
    assert counts_of(data) == DRY_COUNTS
    assert pg_state(pg) == pg_before
