"""`balsync sync` on real servers: invalid records are skipped, recorded and counted, the rest
synced."""

from __future__ import annotations

import random

from tests.helpers import (
    OLD,
    balances,
    counts_of,
    exact,
    insert_rows,
    random_values,
    seed,
    seed_wrong_type,
    skipped_records,
    sync_json,
    sync_run,
    table_rows,
)

WRONG_TYPES = ("hash", "list", "set", "zset", "stream")

# -- invalid records -----------------------------------------------------------------------

BAD_ID_SUFFIXES = [
    "0",
    "01",
    "-5",
    "+5",
    " 5",
    "5 ",
    "abc",
    "x1",
    "1.5",
    "1_000",
    "",
    "9223372036854775808",
    "99999999999999999999",
    "\u0663",  # ARABIC-INDIC DIGIT THREE
]
BAD_VALUES = [
    "1.234",
    "1.001",
    "1e5",
    "1E5",
    "NaN",
    "nan",
    "Infinity",
    "-Infinity",
    " 1",
    "1 ",
    "1\n",
    "",
    "1,5",
    "0x10",
    "1000000000000000000",
    "-1000000000000000000",
    "-1",
    "--1",
    "1.2.3",
    "\u0661",  # ARABIC-INDIC DIGIT ONE
]


def test_invalid_records_are_skipped_recorded_and_the_rest_synced(initialized, rds, key_prefix, pg):
    """Bad ids, bad values and wrong Redis types: exit 1, partial, each recorded with reason."""
    valid = random_values(random.Random(5), range(1, 2001))
    seed(rds, key_prefix, valid)
    bad: dict[str, str | None] = {}  # key → raw value (None: not a string key)
    for n, suffix in enumerate(BAD_ID_SUFFIXES):
        bad[f"{key_prefix}{suffix}"] = f"{n}.00"
    for n in range(600):
        bad[f"{key_prefix}{10_000 + n}"] = BAD_VALUES[n % len(BAD_VALUES)]
    seed(rds, "", {k: v for k, v in bad.items() if v is not None})
    for n in range(100):
        kind = WRONG_TYPES[n % len(WRONG_TYPES)]
        key = f"{key_prefix}{20_000 + n}"
        seed_wrong_type(rds, key, kind)
        bad[key] = None
    # Rows whose keys turned invalid must keep their value.
    insert_rows(pg, {10_000: "3.00", 20_000: "4.00"}, updated_at=OLD)
    before = table_rows(pg)

    data = sync_json(initialized, code=1)
    assert data["status"] == "partial"
    assert counts_of(data) == {
        "processed": len(valid) + len(bad),
        "inserted": len(valid),
        "updated": 0,
        "unchanged": 0,
        "skipped": len(bad),
        "invalid": len(bad),
    }
    assert balances(pg) == {
        **{i: exact(v) for i, v in valid.items()},
        10_000: "3.00",
        20_000: "4.00",
    }
    assert table_rows(pg)[10_000] == before[10_000]
    assert table_rows(pg)[20_000] == before[20_000]

    recorded = skipped_records(pg, data["run_id"])
    assert len(recorded) == len(bad)
    assert {key: raw for key, raw, _ in recorded} == bad
    reasons = {key: reason for key, _, reason in recorded}
    assert all(reasons.values())
    for n in range(100):
        assert WRONG_TYPES[n % len(WRONG_TYPES)] in reasons[f"{key_prefix}{20_000 + n}"]
    assert "negative" in reasons[f"{key_prefix}{10_000 + BAD_VALUES.index('-1')}"]
    run = sync_run(pg, data["run_id"])
    assert (run["status"], run["invalid"], run["skipped"]) == ("partial", len(bad), len(bad))


def test_more_than_1000_invalid_keys_keep_1000_records_and_count_all(
    initialized, rds, key_prefix, pg
):
    """skipped_records holds at most 1000 a run; `invalid` still counts every one."""
    seed(rds, key_prefix, dict.fromkeys(range(1, 51), "12.34"))
    seed(rds, key_prefix, dict.fromkeys(range(1000, 2200), "twelve"))
    data = sync_json(initialized, "--batch-size", "20", code=1)
    assert (data["invalid"], data["skipped"], data["inserted"]) == (1200, 1200, 50)
    assert data["processed"] == 1250
    count = pg.execute(
        "SELECT count(*) FROM balsync.skipped_records WHERE run_id = %s", (data["run_id"],)
    ).fetchone()
    assert count == (1000,)
    assert balances(pg) == dict.fromkeys(range(1, 51), "12.34")
    assert sync_run(pg, data["run_id"])["invalid"] == 1200


def test_every_invalid_key_is_recorded_below_the_cap_with_large_batches(
    initialized, rds, key_prefix, pg
):
    """Below 1000 skipped records, each one is kept, however many valid keys share its batch."""
    seed(rds, key_prefix, dict.fromkeys(range(1, 8001), "1.00"))
    bad = {f"{key_prefix}bad{i}" for i in range(60)}
    seed(rds, "", dict.fromkeys(bad, "1.00"))
    data = sync_json(initialized, "--batch-size", "1000", code=1)
    assert (data["invalid"], data["inserted"]) == (60, 8000)
    assert {key for key, _, _ in skipped_records(pg, data["run_id"])} == bad


def test_non_utf8_keys_and_values_are_skipped_and_recorded(initialized, rds, key_prefix, pg):
    """Bytes that are not UTF-8 (or hold NUL) are skipped with a reason; the run goes on."""
    prefix = key_prefix.encode()
    rds.set(prefix + b"\xff\xfe", b"1.00")
    rds.set(prefix + b"77", b"\xff\xfe")
    rds.set(prefix + b"78", b"12\x00")
    rds.set(prefix + b"79", b"\xc3\x28")
    seed(rds, key_prefix, {1: "5.55"})
    data = sync_json(initialized, code=1)
    assert (data["invalid"], data["inserted"], data["processed"]) == (4, 1, 5)
    assert balances(pg) == {1: "5.55"}
    recorded = {key: (raw, reason) for key, raw, reason in skipped_records(pg, data["run_id"])}
    assert len(recorded) == 4
    odd_key = next(k for k in recorded if k not in {f"{key_prefix}{i}" for i in (77, 78, 79)})
    assert odd_key.startswith(key_prefix)
    assert "xff" in odd_key
    assert recorded[odd_key][0] == "1.00"
    assert "xff" in str(recorded[f"{key_prefix}77"][0])
    assert str(recorded[f"{key_prefix}78"][0]).startswith("12")
    assert all(reason for _, reason in recorded.values())
