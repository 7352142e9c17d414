"""`balsync skipped`: the records a run skipped, from balsync.skipped_records."""

from __future__ import annotations

import json
from typing import cast

import psycopg

Pg = psycopg.Connection[tuple[object, ...]]
WIDE = {"COLUMNS": "250"}  # a wide terminal: rich wraps cells to the width it is given


def _run(
    pg: Pg, skipped: list[tuple[str, str | None, str]], table: str = "public.user_balances"
) -> int:
    """Record a finished run of `table` with these (key, raw value, reason) records."""
    row = pg.execute(
        """INSERT INTO balsync.sync_runs (target_table, key_prefix, status, host, pid, version,
                                          finished_at, skipped)
           VALUES (%s, 'balance:', %s, 'test', 1, 'test', now(), %s) RETURNING id""",
        (table, "partial" if skipped else "success", len(skipped)),
    ).fetchone()
    assert row is not None
    run_id = int(cast(int, row[0]))  # sync_runs.id: a bigint
    for key, raw, reason in skipped:
        pg.execute(
            """INSERT INTO balsync.skipped_records (run_id, key, raw_value, reason)
               VALUES (%s, %s, %s, %s)""",
            (run_id, key, raw, reason),
        )
    return run_id


def _json(result: object) -> dict[str, object]:
    assert result.exit_code == 0, result.stderr  # type: ignore[attr-defined]
    data = json.loads(result.stdout)  # type: ignore[attr-defined]
    assert set(data) == {"run_id", "records"}
    return data  # type: ignore[no-any-return]


def test_lists_what_a_sync_skipped(initialized, rds, key_prefix):
    """After a partial sync, its invalid keys are listed with raw value and reason."""
    rds.mset({f"{key_prefix}1": "1.00", f"{key_prefix}2": "abc", f"{key_prefix}3": "1.001"})
    rds.hset(f"{key_prefix}4", "x", "1")
    sync = initialized("sync", "--json")
    assert sync.exit_code == 1, sync.stderr
    run_id = json.loads(sync.stdout)["run_id"]
    data = _json(initialized("skipped", "--json"))
    assert data["run_id"] == run_id
    records = {r["key"]: r for r in data["records"]}  # type: ignore[attr-defined]
    assert set(records) == {f"{key_prefix}{i}" for i in (2, 3, 4)}
    assert records[f"{key_prefix}2"]["raw_value"] == "abc"
    assert "plain decimal" in records[f"{key_prefix}2"]["reason"]
    assert "more than 2 decimal places" in records[f"{key_prefix}3"]["reason"]
    assert records[f"{key_prefix}4"]["raw_value"] is None
    for record in data["records"]:  # type: ignore[attr-defined]
        assert set(record) == {"key", "raw_value", "reason", "recorded_at"}
        assert record["recorded_at"][:2] == "20"


def test_default_is_the_last_run_that_skipped_records(initialized, pg):
    """A later clean run does not hide the last run with skipped records."""
    first = _run(pg, [("balance:1", "x", "bad")])
    wanted = _run(pg, [("balance:2", "y", "worse")])
    _run(pg, [])
    _run(pg, [("balance:9", "z", "another table")], table="other_balances")
    data = _json(initialized("skipped", "--json"))
    assert data["run_id"] == wanted
    assert [r["key"] for r in data["records"]] == ["balance:2"]  # type: ignore[attr-defined]
    older = _json(initialized("skipped", "--run", str(first), "--json"))
    assert [r["reason"] for r in older["records"]] == ["bad"]  # type: ignore[attr-defined]


def test_table_shows_key_value_reason_and_time(initialized, pg):
    """The human table names the run and shows each record."""
    run_id = _run(pg, [("balance:2", "abc", "value is not a plain decimal number")])
    result = initialized("skipped", env=WIDE)
    assert result.exit_code == 0, result.stderr
    assert f"run {run_id}" in result.stdout
    for text in ("balance:2", "abc", "value is not a plain decimal number"):
        assert text in result.stdout


def test_long_raw_values_are_cut_in_the_table_but_whole_in_json(initialized, pg):
    """The table shows about 60 characters of a raw value; --json the stored value in full."""
    raw = "9" * 150
    _run(pg, [("balance:1", raw, "value out of range")])
    table = initialized("skipped", env=WIDE)
    assert "9" * 59 + "…" in table.stdout
    assert "9" * 61 not in table.stdout
    data = _json(initialized("skipped", "--json"))
    assert data["records"][0]["raw_value"] == raw  # type: ignore[index]


def test_markup_in_keys_and_values_prints_literally(initialized, pg):
    """A key or value holding rich markup is shown as it is, not styled or swallowed."""
    _run(pg, [("balance:[bold]1", "[red]x[/red]", "bad")])
    result = initialized("skipped")
    assert "balance:[bold]1" in result.stdout
    assert "[red]x[/red]" in result.stdout


def test_limit_caps_the_listing_and_says_how_many_there_are(initialized, pg):
    """--limit 2 of 3: two records, in the order they were met; the title says 2 of 3."""
    _run(pg, [(f"balance:{i}", str(i), "bad") for i in range(1, 4)])
    data = _json(initialized("skipped", "--limit", "2", "--json"))
    assert [r["key"] for r in data["records"]] == ["balance:1", "balance:2"]  # type: ignore[attr-defined]
    assert "first 2 of 3" in initialized("skipped", "--limit", "2").stdout


def test_a_run_without_skipped_records(initialized, pg):
    """--run of a clean run, or only clean runs: 'no skipped records', exit 0, empty list."""
    clean = _run(pg, [])
    data = _json(initialized("skipped", "--json"))
    assert data == {"run_id": clean, "records": []}
    result = initialized("skipped", "--run", str(clean))
    assert result.exit_code == 0
    assert "no skipped records" in result.stdout


def test_no_run_at_all(initialized):
    """No run yet: 'no skipped records', exit 0; JSON run_id null and an empty list."""
    assert _json(initialized("skipped", "--json")) == {"run_id": None, "records": []}
    result = initialized("skipped")
    assert result.exit_code == 0
    assert "no skipped records" in result.stdout


def test_quiet_prints_nothing(initialized, pg):
    """--quiet lists nothing on stdout."""
    _run(pg, [("balance:1", "x", "bad")])
    result = initialized("skipped", "--quiet")
    assert result.exit_code == 0
    assert result.stdout == ""


def test_unknown_run_is_exit_2(initialized):
    """--run of an id that does not exist: one line, exit 2."""
    result = initialized("skipped", "--run", "424242")
    assert result.exit_code == 2
    assert "no run with id 424242" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_malformed_run_and_limit_are_exit_2(initialized):
    """--run 0, --run x, --limit 0: usage errors, exit 2."""
    for args in (("--run", "0"), ("--run", "x"), ("--limit", "0")):
        result = initialized("skipped", *args)
        assert result.exit_code == 2, args


def test_without_balsync_schema_says_to_run_init_db(balsync):
    """Before init-db: exit 5 and the advice to run `balsync init-db`."""
    result = balsync("skipped")
    assert result.exit_code == 5
    assert "balsync init-db" in result.stderr


def test_help_has_examples(balsync):
    """--help explains the default run and shows examples."""
    result = balsync("skipped", "--help")
    assert result.exit_code == 0
    for text in ("--run", "--limit", "Example"):
        assert text in result.stdout
