"""`balsync sync` on real servers: batching (ids present at a first sync, views, partitions,
batch sizes) and a retried batch applied once."""

from __future__ import annotations

import re

from click.testing import Result

from balance_sync.ops.sync.reading import Batch, Batcher
from balance_sync.settings import resolve_settings
from balance_sync.stores.postgres import Database, Ledger, Merge, Reads, Schema, Staged
from balance_sync.validation import InvalidRecord
from tests.helpers import (
    COUNTERS,
    LEDGER,
    OLD,
    balances,
    counts_of,
    insert_rows,
    invoke_sync,
    seed,
    skipped_records,
    sync_json,
    table_rows,
)

# -- batching ------------------------------------------------------------------------------


def test_ids_that_exist_during_a_first_sync_are_classified_as_usual(
    initialized, rds, key_prefix, pg, monkeypatch
):
    """A first sync inserts batches straight from staging; an id that exists by then (the
    application inserted it after the run began) takes the usual path, and every inserted
    row is remembered: an outside change to it later is a conflict."""
    insert_rows(pg, {1: "1.00", 2: "5.00"}, updated_at=OLD)
    monkeypatch.setattr(Reads, "is_empty", lambda self, target: True)
    seed(rds, key_prefix, {i: f"{i}.00" for i in range(1, 11)})
    data = sync_json(initialized)
    assert counts_of(data) == {
        "processed": 10,
        "inserted": 8,
        "updated": 1,
        "unchanged": 1,
        "skipped": 0,
        "invalid": 0,
    }
    assert balances(pg) == {i: f"{i}.00" for i in range(1, 11)}
    monkeypatch.undo()
    pg.execute("UPDATE user_balances SET balance = 99 WHERE telegram_id = 3")
    rds.set(f"{key_prefix}3", "4.00")
    rds.set(f"{key_prefix}4", "5.00")
    data = sync_json(initialized, "--force", code=1)
    assert (data["updated"], data["skipped"]) == (1, 1)
    assert balances(pg)[3] == "99.00"
    assert balances(pg)[4] == "5.00"


def test_a_view_over_the_balances_is_updated_by_id(initialized, rds, key_prefix, pg):
    """A view has no ctid: its rows are found by id; ids it cannot take are unknown."""
    pg.execute(
        "CREATE TABLE view_base (telegram_id bigint PRIMARY KEY, balance numeric(20,2) NOT NULL)"
    )
    pg.execute("INSERT INTO view_base VALUES (1, 1), (2, 2)")
    pg.execute("CREATE VIEW balances_view AS SELECT * FROM view_base")
    seed(rds, key_prefix, {1: "5.00", 2: "2.00", 3: "7.00"})
    data = sync_json(initialized, "--table", "balances_view", code=1)
    assert (data["inserted"], data["updated"], data["unchanged"], data["skipped"]) == (0, 1, 1, 1)
    assert balances(pg, "view_base") == {1: "5.00", 2: "2.00"}


def test_a_partitioned_table_is_synced_row_by_row(initialized, rds, key_prefix, pg):
    """Partitions repeat each other's ctids: every row is still matched by its own id."""
    pg.execute(
        """CREATE TABLE parted (telegram_id bigint PRIMARY KEY, balance numeric(20,2) NOT NULL)
           PARTITION BY HASH (telegram_id)"""
    )
    for remainder in (0, 1):
        pg.execute(
            f"CREATE TABLE parted{remainder} PARTITION OF parted "
            f"FOR VALUES WITH (MODULUS 2, REMAINDER {remainder})"
        )
    pg.execute("INSERT INTO parted SELECT g, g FROM generate_series(1, 40) g")
    seed(rds, key_prefix, {i: f"{i}.00" if i % 3 else f"{i}.50" for i in range(1, 61)})
    data = sync_json(initialized, "--table", "parted")
    assert (data["inserted"], data["updated"], data["unchanged"]) == (20, 13, 27)
    assert balances(pg, "parted") == {i: f"{i}.00" if i % 3 else f"{i}.50" for i in range(1, 61)}


def test_batches_of_common_records_are_cut_at_the_batch_size(initialized, rds, key_prefix, pg):
    """Pages of valid records take the whole-page path; batches still hold 7 records each."""
    seed(rds, key_prefix, {i: f"{i}.25" for i in range(1, 101)})
    data, result = invoke_sync(initialized, "-v", "--batch-size", "7")
    assert counts_of(data)["inserted"] == 100
    assert {i: b for i, (b, _) in table_rows(pg).items()} == {i: f"{i}.25" for i in range(1, 101)}
    sizes = [int(n) for n in re.findall(r"batch \d+: (\d+) keys", result.stderr)]
    assert sorted(sizes) == [2] + [7] * 14  # two writers finish batches in any order


def test_batcher_keeps_an_id_once_per_batch_across_pages():
    """SCAN may return a key on two pages: the whole-page path defers to the per-record one."""
    batcher = Batcher(5, keep_raw=False)
    assert batcher.add_page([(b"%d" % i, b"1.00") for i in range(1, 4)]) == []
    assert batcher.add_page([(b"3", b"1.00"), (b"4", b"1.00")]) is None  # 3 is in the batch
    assert batcher.add_page([(b"9", b"1.00"), (b"9", b"1.00")]) is None  # 9 twice in a page
    assert [r[0] for r in batcher.batch.records] == [b"1", b"2", b"3"]
    done: list[Batch] = []
    for suffix, raw in [(b"3", b"1.00"), (b"4", b"1.00")]:
        done += batcher.add(suffix, b"k" + suffix, raw, (suffix, raw), None)
    assert [r[0] for r in batcher.batch.records] == [b"1", b"2", b"3", b"4"]
    filled = batcher.add_page([(b"%d" % i, b"1.00") for i in range(5, 12)])
    assert [
        [r.split(b"\t")[0] for r in b.staged.text.splitlines()] for b in done + (filled or [])
    ] == [
        [b"1", b"2", b"3", b"4", b"5"],
        [b"6", b"7", b"8", b"9", b"10"],
    ]
    # A new batch forgets the ids of the last one.
    assert [r[0] for r in batcher.batch.records] == [b"11"]
    assert batcher.add_page([(b"3", b"2.00")]) == []
    assert batcher.batch.keys == 2


def test_batch_size_7_gives_the_same_result_as_one_batch(initialized, rds, key_prefix, pg):
    """`--batch-size 7` over 100 keys: same rows and counts as one batch; -v logs batch 15."""
    pg.execute(LEDGER.replace("ledger.balances", "twin"))
    initial = {i: f"{i}.00" if i <= 20 else "0.50" for i in range(1, 41)}
    seed(rds, key_prefix, {i: f"{i}.00" for i in range(1, 101)})
    seed(rds, key_prefix, {f"bad{i}": "1.00" for i in range(5)})

    def run(
        table: str, *args: str
    ) -> tuple[dict[str, object], dict[int, object], set[int], Result]:
        # Twin tables in the same state, each synced for the first time.
        insert_rows(pg, initial, table, updated_at=OLD)
        # The second table synced from the same keys inherits no first-run trust of Redis:
        # the operator gives it, as for a restart.
        data, result = invoke_sync(
            initialized, "--table", table, "--accept-redis-restart", *args, code=1
        )
        after = table_rows(pg, table)
        moved = {i for i, (_, updated_at) in after.items() if updated_at != OLD}
        return counts_of(data), {i: b for i, (b, _) in after.items()}, moved, result

    small_counts, small_rows, small_moved, small = run("user_balances", "-v", "--batch-size", "7")
    one_counts, one_rows, one_moved, _ = run("twin")
    assert (
        small_counts
        == one_counts
        == {
            "processed": 105,
            "inserted": 60,
            "updated": 20,
            "unchanged": 20,
            "skipped": 5,
            "invalid": 5,
        }
    )
    assert small_rows == one_rows == {i: f"{i}.00" for i in range(1, 101)}
    assert small_moved == one_moved == set(range(21, 101))
    assert "batch 15:" in small.stderr
    assert "batch 16:" not in small.stderr


# -- a retried batch -----------------------------------------------------------------------


def test_a_retried_batch_is_never_applied_twice(initialized, env, key_prefix, pg):
    """apply_batch twice for (run, batch 1): the retry reports the first counts, writes nothing."""
    settings = resolve_settings({}, env)
    insert_rows(pg, {1: "1.00", 2: "2.00", 3: "3.00"}, updated_at=OLD)
    records = [(b"1", b"1.00"), (b"2", b"2.50"), (b"3", b"3.50"), (b"4", b"4"), (b"5", b"5.05")]
    invalid = [InvalidRecord(f"{key_prefix}6".encode(), b"1e3", "not a plain decimal")]
    db = Database(settings.database_url, settings.retry_timeout)
    try:
        run_id = Ledger(db).start_run(settings)
        target = Schema(db).describe_target(settings)

        def apply() -> tuple[int, int, list[int]]:
            counts = Merge(db).apply_batch(
                target,
                Staged.of(records),
                invalid,
                run_id=run_id,
                batch_no=1,
                lock=None,
                key_prefix=key_prefix,
                reserve=lambda kind, wanted: wanted,
            )
            return counts.inserted, counts.updated, counts.unknown_ids

        assert apply() == (2, 2, [])
        assert balances(pg) == {1: "1.00", 2: "2.50", 3: "3.50", 4: "4.00", 5: "5.05"}
        # The application writes between the commit and the retry; a re-applied batch
        # would overwrite its change or bring back the row it deleted.
        pg.execute(
            "UPDATE user_balances SET balance = 7.77, updated_at = %s WHERE telegram_id = 2", (OLD,)
        )
        pg.execute("DELETE FROM user_balances WHERE telegram_id = 5")
        before = table_rows(pg)
        assert apply() == (2, 2, [])
        assert table_rows(pg) == before
        assert 5 not in before
        ledger = pg.execute(
            "SELECT batch_no, inserted, updated, unknown FROM balsync.run_batches"
            " WHERE run_id = %s",
            (run_id,),
        ).fetchall()
        assert ledger == [(1, 2, 2, 0)]
        assert len(skipped_records(pg, run_id)) == 1
        counters = dict.fromkeys(COUNTERS, 0)
        Ledger(db).finish_run(run_id, "success", counters, 0.1, None)
    finally:
        db.close()
    assert pg.execute(
        "SELECT count(*) FROM balsync.run_batches WHERE run_id = %s", (run_id,)
    ).fetchone() == (0,)
