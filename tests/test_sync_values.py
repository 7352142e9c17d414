"""`balsync sync` on real servers, SPEC's guarantees 1-3: exact values, rows without a key never
touched, updated_at moved only with the balance; value formats and signs."""

from __future__ import annotations

import random

from tests.helpers import (
    MAX_ID,
    OLD,
    balances,
    counts_of,
    exact,
    insert_rows,
    random_values,
    seed,
    skipped_records,
    sync_json,
    table_rows,
)

# -- guarantee 1: exact values -------------------------------------------------------------

EDGE_VALUES = {
    1: "0.10",
    2: "-0",
    3: "999999999999999999.99",
    4: "1500",
    5: "1500.00",
    6: "42.5",
    7: "0",
    8: "0.01",
    9: "-0.00",
    10: "123456789012345678.9",
    MAX_ID: "7.07",
}


def test_every_valid_key_lands_with_its_exact_value(initialized, rds, key_prefix, pg):
    """Guarantee 1: after exit 0 every row holds its key's exact value, ids 1..2^63-1."""
    values = {**random_values(random.Random(1), range(100, 2100)), **EDGE_VALUES}
    seed(rds, key_prefix, values)
    data = sync_json(initialized)
    assert data["status"] == "success"
    assert data["dry_run"] is False
    assert isinstance(data["run_id"], int)
    assert counts_of(data) == {
        "processed": len(values),
        "inserted": len(values),
        "updated": 0,
        "unchanged": 0,
        "skipped": 0,
        "invalid": 0,
    }
    stored = balances(pg)
    assert stored == {i: exact(v) for i, v in values.items()}
    assert stored[1] == "0.10"
    assert stored[2] == "0.00"
    assert stored[3] == "999999999999999999.99"
    assert stored[MAX_ID] == "7.07"


def test_changed_values_overwrite_rows_exactly(initialized, rds, key_prefix, pg):
    """Guarantee 1 on updates: every changed key's row ends with the new exact value."""
    first = random_values(random.Random(2), range(1, 1001))
    seed(rds, key_prefix, first)
    sync_json(initialized)
    second = {**first, **random_values(random.Random(3), range(1, 1001, 3)), **EDGE_VALUES}
    seed(rds, key_prefix, second)
    data = sync_json(initialized, "--force")
    assert balances(pg) == {i: exact(v) for i, v in second.items()}
    changed = sum(1 for i in first if exact(first[i]) != exact(second[i]))
    assert data["updated"] == changed
    assert data["inserted"] == 1  # MAX_ID is the only new id
    assert data["unchanged"] == len(first) - changed


# -- guarantee 2: rows without a key are never touched ------------------------------------


def test_rows_absent_from_redis_are_never_touched_nor_deleted(initialized, rds, key_prefix, pg):
    """Guarantee 2: a row with no key (or an invalid one) keeps value and updated_at."""
    insert_rows(pg, {i: f"{i}.25" for i in range(1, 61)}, updated_at=OLD)
    before = table_rows(pg)
    # Keys for 1..20 (changed), 21..25 invalid, 26..60 absent; 61..80 new.
    seed(rds, key_prefix, {i: f"{i}.50" for i in range(1, 21)})
    seed(rds, key_prefix, dict.fromkeys(range(21, 26), "not-a-number"))
    seed(rds, key_prefix, {i: f"{i}" for i in range(61, 81)})
    data = sync_json(initialized, code=1)
    assert (data["updated"], data["inserted"], data["invalid"]) == (20, 20, 5)
    after = table_rows(pg)
    assert set(after) == set(range(1, 81))
    for i in range(21, 61):
        assert after[i] == before[i], i
    for i in range(1, 21):
        assert after[i][0] == f"{i}.50"


# -- guarantee 3: updated_at moves only with the balance -----------------------------------


def test_second_run_without_change_updates_no_row(initialized, rds, key_prefix, pg):
    """Guarantee 3: no change in Redis → updated 0, unchanged n, every updated_at kept."""
    values = {**random_values(random.Random(4), range(1, 501)), 501: "1500.00", 502: "0.10"}
    seed(rds, key_prefix, values)
    sync_json(initialized)
    pg.execute("UPDATE user_balances SET updated_at = %s", (OLD,))
    before = table_rows(pg)
    # The same amounts written differently are no change.
    seed(rds, key_prefix, {501: "1500", 502: "0.1"})
    data = sync_json(initialized, "--force")
    assert data["status"] == "success"
    assert counts_of(data) == {
        "processed": 502,
        "inserted": 0,
        "updated": 0,
        "unchanged": 502,
        "skipped": 0,
        "invalid": 0,
    }
    assert table_rows(pg) == before


def test_updated_at_moves_only_for_changed_balances(initialized, rds, key_prefix, pg):
    """Guarantee 3: exactly the rows whose balance changed get a new updated_at."""
    seed(rds, key_prefix, {i: f"{i}.00" for i in range(1, 201)})
    sync_json(initialized)
    pg.execute("UPDATE user_balances SET updated_at = %s", (OLD,))
    changed = set(range(1, 201, 7))
    seed(rds, key_prefix, {i: f"{i}.01" for i in changed})
    data = sync_json(initialized, "--force")
    assert (data["updated"], data["unchanged"]) == (len(changed), 200 - len(changed))
    after = table_rows(pg)
    moved = {i for i, (_, updated_at) in after.items() if updated_at != OLD}
    assert moved == changed
    assert all(after[i][1] > OLD for i in changed)  # type: ignore[operator]
    assert {i: b for i, (b, _) in after.items()} == {
        i: f"{i}.01" if i in changed else f"{i}.00" for i in range(1, 201)
    }


# -- value formats and signs ---------------------------------------------------------------


def test_cents_format_turns_integer_cents_into_exact_amounts(initialized, rds, key_prefix, pg):
    """--value-format cents: '150000' is 1500.00 exactly; non-integers are invalid."""
    seed(
        rds,
        key_prefix,
        {
            1: "150000",
            2: "1",
            3: "0",
            4: "10",
            5: "99999999999999999999",
            6: "1500.00",
            7: "100000000000000000000",
            8: "-150",
            9: "1e3",
        },
    )
    data = sync_json(initialized, "--value-format", "cents", code=1)
    assert (data["inserted"], data["invalid"]) == (5, 4)
    assert balances(pg) == {
        1: "1500.00",
        2: "0.01",
        3: "0.00",
        4: "0.10",
        5: "999999999999999999.99",
    }


def test_negative_values_need_allow_negative(initialized, rds, key_prefix, pg):
    """Negative balances are invalid by default and synced exactly with --allow-negative."""
    insert_rows(pg, {1: "1.00"}, updated_at=OLD)
    before = table_rows(pg)
    negatives = {1: "-3.5", 2: "-0.01", 3: "-999999999999999999.99"}
    seed(rds, key_prefix, {**negatives, 4: "5"})
    data = sync_json(initialized, code=1)
    assert (data["invalid"], data["inserted"]) == (3, 1)
    assert table_rows(pg)[1] == before[1]
    assert balances(pg) == {1: "1.00", 4: "5.00"}
    reasons = [reason for _, _, reason in skipped_records(pg, data["run_id"])]
    assert len(reasons) == 3
    assert all("negative" in reason for reason in reasons)

    allowed = sync_json(initialized, "--allow-negative", "--force")
    assert counts_of(allowed) == {
        "processed": 4,
        "inserted": 2,
        "updated": 1,
        "unchanged": 1,
        "skipped": 0,
        "invalid": 0,
    }
    assert balances(pg) == {1: "-3.50", 2: "-0.01", 3: "-999999999999999999.99", 4: "5.00"}
