"""Incremental sync: the application marks changed ids; `sync --incremental` syncs only them."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
import redis

from balance_sync.stores.redis import RedisStore, dirty_keys
from balance_sync.writer import BalanceWriter
from tests.helpers import Balsync, Servers, balances


def run(balsync: Balsync, *args: str) -> dict[str, object]:
    result = balsync("sync", "--json", "--force", *args)
    assert result.exit_code in (0, 1), result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def writer(rds: redis.Redis, key_prefix: str) -> BalanceWriter:
    """The application's side of change tracking."""
    return BalanceWriter(rds, prefix=key_prefix)


def incremental(balsync: Balsync, *args: str) -> dict[str, object]:
    """`sync --incremental` without --force (which would scan everything)."""
    result = balsync("sync", "--json", "--incremental", "--min-interval", "0", *args)
    assert result.exit_code in (0, 1), result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_incremental_reads_only_marked_ids(initialized, rds, key_prefix, pg, writer):
    """Keys changed without a mark are left for the next full scan; marked ones sync now."""
    rds.mset({f"{key_prefix}{i}": "1.00" for i in range(1, 101)})
    assert run(initialized)["inserted"] == 100
    rds.set(f"{key_prefix}7", "70.00")  # written behind the tracking's back
    writer.set(8, Decimal("80.00"))
    writer.set(200, "2.50")
    data = incremental(initialized)
    assert (data["processed"], data["inserted"], data["updated"]) == (2, 1, 1)
    rows = balances(pg)
    assert (rows[7], rows[8], rows[200]) == ("1.00", "80.00", "2.50")
    assert run(initialized)["updated"] == 1  # the full scan picks up id 7


def test_incremental_releases_its_claim_after_commit(initialized, rds, key_prefix, writer):
    """After a successful run both the dirty set and the claim are gone."""
    writer.set(1, "5")
    incremental(initialized)
    dirty, claim = dirty_keys(key_prefix)
    assert rds.exists(dirty, claim) == 0
    assert incremental(initialized)["processed"] == 0


def test_claim_left_by_a_crashed_run_is_synced_next_time(
    initialized, servers: Servers, rds, key_prefix, pg, writer
):
    """A run that dies after claiming leaves the claim; the next run syncs those ids too."""
    writer.set(1, "10")
    store = RedisStore(servers.redis, 5)
    assert store.claim_dirty(key_prefix) == 1  # as a run would, then it dies
    store.close()
    writer.set(2, "20")  # marked after the claim
    data = incremental(initialized)
    assert (data["processed"], data["inserted"]) == (2, 2)
    assert balances(pg) == {1: "10.00", 2: "20.00"}


def test_failed_run_keeps_the_claim(initialized, rds, key_prefix, writer, pg):
    """A run that fails after claiming keeps the claimed ids, and the next run syncs them."""
    initialized.ok("sync", "--force", "--quiet")
    writer.set(1, "10")
    pg.execute(
        """CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'refused for the test'; END $$"""
    )
    pg.execute(
        "CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON user_balances "
        "FOR EACH ROW EXECUTE FUNCTION refuse()"
    )
    result = initialized("sync", "--incremental", "--min-interval", "0")
    assert result.exit_code == 5
    dirty, claim = dirty_keys(key_prefix)
    assert rds.sismember(claim, "1")
    pg.execute("DROP TRIGGER refuse ON user_balances")
    data = incremental(initialized)
    assert (data["processed"], data["inserted"]) == (1, 1)
    assert rds.exists(dirty, claim) == 0


def test_dry_run_claims_nothing(initialized, rds, key_prefix, writer):
    """A dry run reports the marked ids and leaves the marks in place."""
    writer.set(1, "10")
    data = incremental(initialized, "--dry-run")
    assert (data["processed"], data["inserted"]) == (1, 1)
    assert rds.sismember(dirty_keys(key_prefix)[0], "1")


def test_full_scan_clears_the_marks(initialized, rds, key_prefix, writer):
    """--force scans every key and also consumes the marks it covered."""
    writer.set(1, "10")
    data = run(initialized, "--incremental")
    assert data["inserted"] == 1
    dirty, claim = dirty_keys(key_prefix)
    assert rds.exists(dirty, claim) == 0


def test_invalid_marked_ids_are_skipped(initialized, rds, key_prefix, writer):
    """A mark whose key holds an invalid value is skipped with its reason, like a full scan."""
    rds.set(f"{key_prefix}5", "1e5")
    writer.mark([5])
    data = incremental(initialized)
    assert (data["processed"], data["invalid"], data["status"]) == (1, 1, "partial")


def test_marked_id_whose_key_was_deleted_is_ignored(initialized, rds, key_prefix, writer):
    """An id marked and then deleted from Redis is not a record: nothing is read."""
    writer.set(5, "1")
    rds.delete(f"{key_prefix}5")
    assert incremental(initialized)["processed"] == 0


def test_writer_adjust_is_exact_and_atomic(rds, key_prefix, writer):
    """adjust() adds exactly (Decimal), never through a float, and marks the id."""
    writer.set(1, "0.10")
    assert writer.adjust(1, "0.20") == Decimal("0.30")
    assert rds.get(f"{key_prefix}1") == b"0.30"
    writer.set(2, "0")
    assert writer.adjust(2, Decimal("-1.5")) == Decimal("-1.50")
    assert rds.smembers(dirty_keys(key_prefix)[0]) == {b"1", b"2"}


def test_writer_cents_adjusts_whole_cents(rds, key_prefix):
    """In cents, adjust() adds whole minor units exactly, as INCRBY would."""
    cents = BalanceWriter(rds, prefix=key_prefix, value_format="cents")
    cents.set(1, "1500.00")
    assert rds.get(f"{key_prefix}1") == b"150000"
    assert cents.adjust(1, "-0.01") == Decimal("1499.99")
    assert rds.get(f"{key_prefix}1") == b"149999"


def test_writer_refuses_floats_and_rounding(writer):
    """Money is never a float, and a third decimal is an error, not rounded."""
    with pytest.raises(TypeError):
        writer.set(1, 1.5)
    with pytest.raises(ValueError, match="two decimals"):
        writer.set(1, "1.005")


def test_dirty_keys_are_not_balance_keys(initialized, rds, key_prefix, writer):
    """The tracking keys never show up as invalid records in a full scan."""
    writer.set(1, "1")
    data = run(initialized)
    assert (data["invalid"], data["processed"]) == (0, 1)
