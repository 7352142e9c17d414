"""Every human table of every command, at 80 columns and wider, with real rows and big numbers:
no number or money value is ever cut, and each value stands under its own heading."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.helpers import Balsync

MAX_ID = 9223372036854775807
TOP = "999999999999999999.99"  # the largest balance SPEC allows
BIG_COUNT = 1_234_567_890
WIDTHS = [80, 120]
RAW = "not money: a raw value a sync skips"


@dataclass
class Rendered:
    """One boxed table of a command's output, read back by column."""

    title: str
    headings: list[str]
    lines: list[list[str]] = field(default_factory=list)  # body lines, cell by cell
    sections: list[int] = field(default_factory=list)  # body line numbers after a rule

    def rows(self, anchor: str | None) -> list[dict[str, str]]:
        """Rows of a table with a header: a new row where the `anchor` cell is filled, the
        lines below it (wrapped text) joined to it (no anchor: one row); cells without spaces."""
        rows: list[list[str]] = []
        for cells in self.lines:
            if not rows or (anchor is not None and cells[self.headings.index(anchor)]):
                rows.append(list(cells))
            else:
                rows[-1] = [a + b for a, b in zip(rows[-1], cells, strict=True)]
        return [
            {h: "".join(c.split()) for h, c in zip(self.headings, r, strict=True)} for r in rows
        ]

    def pairs(self) -> list[dict[str, str]]:
        """A headless two-column table as {label: value} records, one per section; a label
        wraps with its value on its first line, a value's further lines have no label."""
        records: list[dict[str, str]] = [{}]
        label = ""
        for number, (left, right) in enumerate(self.lines):
            if number in self.sections:
                records.append({})
            if left and right:
                label = left
                records[-1][label] = right
            elif left:  # the label goes on
                value = records[-1].pop(label, "")
                label = f"{label} {left}"
                records[-1][label] = value
            elif right:  # the value goes on
                records[-1][label] += right
        return [{" ".join(k.split()): "".join(v.split()) for k, v in r.items()} for r in records]


def tables(output: str) -> list[Rendered]:
    """The boxed tables in `output`, each with the line above it as its title."""
    found: list[Rendered] = []
    previous = ""
    header: list[list[str]] = []
    table: Rendered | None = None
    for line in output.splitlines():
        edge = line[:1]
        if edge in "┏┌" and line:
            table, header = Rendered(previous.strip(), []), []
        elif table is not None and edge == "┃":
            header.append(cells(line, "┃"))
        elif table is not None and edge == "┡":
            table.headings = [
                " ".join(p for p in parts if p) for parts in zip(*header, strict=True)
            ]
        elif table is not None and edge == "├":
            table.sections.append(len(table.lines))
        elif table is not None and edge == "│":
            table.lines.append(cells(line, "│"))
        elif table is not None and edge == "└":
            found.append(table)
            table = None
        previous = line
    return found


def cells(line: str, bar: str) -> list[str]:
    return [cell.strip() for cell in line.strip()[1:-1].split(bar)]


def titled(found: list[Rendered], start: str) -> Rendered:
    (table,) = [t for t in found if t.title.startswith(start)]
    return table


def money(value: str) -> str:
    """A sum as the tables print it: thousands separated."""
    units, _, cents = value.partition(".")
    return f"{int(units):,}.{cents}" if cents else f"{int(units):,}"


def whole(output: str) -> None:
    """rich marks what it cuts with an ellipsis: there must be none."""
    assert "…" not in output, output


@pytest.fixture
def scene(initialized: Balsync, rds, key_prefix, pg) -> Balsync:
    """Real rows: top-size balances, an invalid record, conflicts in two runs, runs of a
    billion keys, a row missing in Redis and a key missing in PostgreSQL."""
    rds.mset({f"{key_prefix}{MAX_ID}": TOP, f"{key_prefix}42": "4444444.44"})
    rds.set(f"{key_prefix}77", RAW)
    initialized("sync", "--force")  # run 1: partial (the invalid record)
    pg.execute("UPDATE user_balances SET balance = 1234567.89 WHERE telegram_id = 42")
    rds.set(f"{key_prefix}42", "7654321.98")
    initialized("sync", "--force")  # run 2: the conflict on 42
    pg.execute(f"UPDATE user_balances SET balance = -{TOP} WHERE telegram_id = {MAX_ID}")
    rds.set(f"{key_prefix}{MAX_ID}", "999999999999999999.98")
    initialized("sync", "--force")  # run 3: conflicts on 42 and on the top balance
    pg.execute(
        """INSERT INTO balsync.sync_runs (target_table, key_prefix, started_at, finished_at,
               status, processed, inserted, updated, skipped, invalid, duration_s, host, pid,
               version)
           SELECT (SELECT target_table FROM balsync.sync_runs LIMIT 1), %s,  -- as recorded
               now() - g * interval '1 hour',
               now() - g * interval '1 hour' + interval '20 min', 'success', %s, %s, %s, %s, 0,
               12345.678, 'db1', 4242, '0.1.0'
           FROM generate_series(1, 3) AS g""",
        (key_prefix, BIG_COUNT, BIG_COUNT // 2, BIG_COUNT // 2, BIG_COUNT),
    )
    pg.execute("INSERT INTO user_balances VALUES (5555, 888888888888888888.88, now())")
    rds.set(f"{key_prefix}31", "31415926535.89")
    return initialized


def human(balsync: Balsync, width: int, *args: str) -> str:
    result = balsync(*args, env={"COLUMNS": str(width)})
    assert result.exit_code in (0, 1), result.stderr
    assert all(len(line) <= width for line in result.stdout.splitlines()), result.stdout
    whole(result.stdout)
    return result.stdout


def machine(balsync: Balsync, *args: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(balsync(*args, "--json").stdout)
    return data


@pytest.mark.parametrize("width", WIDTHS)
def test_conflicts_show_each_value_under_its_heading(scene, key_prefix, width):
    """conflicts: PostgreSQL, Redis and last written each under their heading; a table too
    wide for its numbers is stacked, heading beside value, rather than cut."""
    found = tables(human(scene, width, "conflicts", "--run", "2"))
    (row,) = titled(found, "Conflicts of run 2").rows(anchor="PostgreSQL")
    assert row == {
        "key": f"{key_prefix}42",
        "PostgreSQL": "1234567.89",
        "Redis": "7654321.98",
        "last written": "4444444.44",
        "kind": "changed_in_db",
        "resolution": "kept",
    }
    expected = {
        (c["db_value"], c["redis_value"], c["last_written"])
        for c in machine(scene, "conflicts", "--run", "3")["conflicts"]
    }
    assert (f"-{TOP}", "999999999999999999.98", TOP) in expected
    table = titled(tables(human(scene, width, "conflicts", "--run", "3")), "Conflicts of run 3")
    # Wide enough for three top-size amounts side by side, or stacked.
    rows = table.rows(anchor="PostgreSQL") if table.headings else table.pairs()
    shown = {(r["PostgreSQL"], r["Redis"], r["last written"]) for r in rows}
    assert shown == expected
    assert {r["key"] for r in rows} == {f"{key_prefix}42", f"{key_prefix}{MAX_ID}"}


@pytest.mark.parametrize("width", WIDTHS)
def test_stats_tables_keep_counts_of_a_billion_whole(scene, key_prefix, width):
    """stats: the runs table's counts under their headings, the last run, the figures."""
    data = machine(scene, "stats")
    found = tables(human(scene, width, "stats"))
    rows = {r["id"]: r for r in titled(found, f"Last {len(data['runs'])} runs").rows(anchor="id")}
    assert len(rows) == len(data["runs"])
    for run in data["runs"]:
        row = rows[str(run["id"])]
        assert row["processed"] == f"{run['processed']:,}"
        assert row["changed"] == f"{run['inserted'] + run['updated']:,}"
        assert row["skipped"] == f"{run['skipped']:,}"
        assert row["status"] == run["status"]
    assert f"{BIG_COUNT:,}" in {r["processed"] for r in rows.values()}
    (last,) = titled(found, "Last run of").pairs()
    for name in ("processed", "inserted", "updated", "unchanged", "skipped", "invalid"):
        assert last[name] == f"{data['last_run'][name]:,}"
    (figures,) = titled(found, "Figures").pairs()
    assert figures[f"Redis keys under {key_prefix}"] == f"{data['redis']['balance_keys']:,}"
    assert figures["PostgreSQL rows in user_balances"] == f"{data['postgres']['rows']:,}"
    assert figures["PostgreSQL sum of balances"] == money(data["postgres"]["balance_sum"])


@pytest.mark.parametrize("width", WIDTHS)
def test_verify_tables_keep_sums_and_amounts_whole(scene, key_prefix, width):
    """verify: the exact sums, and each example's amounts under Redis and PostgreSQL."""
    data = machine(scene, "verify")
    found = tables(human(scene, width, "verify"))
    (summary,) = titled(found, "Redis compared with").pairs()
    assert summary["sum in Redis"] == money(data["redis_sum"]).replace(",", "")
    assert summary["sum in PostgreSQL"] == money(data["pg_sum"]).replace(",", "")
    assert summary["Redis keys"] == f"{data['redis_keys']:,}"
    kinds = {
        "Missing in PostgreSQL": ("missing_in_pg", "redis"),
        "Differing": ("differing", "redis"),
        "Missing in Redis": ("missing_in_redis", "postgres"),
    }
    for title, (kind, anchor) in kinds.items():
        rows = titled(found, title).rows(anchor="Redis" if anchor == "redis" else "PostgreSQL")
        expected = [
            {"key": e["key"], "Redis": e.get("redis", ""), "PostgreSQL": e.get("postgres", "")}
            for e in data["examples"][kind]
        ]
        assert sorted(rows, key=str) == sorted(expected, key=str), title
    assert {"key": f"{key_prefix}5555", "Redis": "", "PostgreSQL": "888888888888888888.88"} in (
        titled(found, "Missing in Redis").rows(anchor="PostgreSQL")
    )


@pytest.mark.parametrize("width", WIDTHS)
def test_summaries_of_sync_clear_cache_restore_and_skipped_keep_their_numbers(scene, width):
    """sync --dry-run, clear-cache --dry-run, restore --dry-run, skipped, health, status."""
    sync = machine(scene, "sync", "--dry-run", "--force")
    (summary,) = titled(
        tables(human(scene, width, "sync", "--dry-run", "--force")), "Dry run"
    ).pairs()
    assert summary["processed"] == f"{sync['processed']:,}"
    assert summary["would be updated"] == f"{sync['updated']:,}"
    clear = machine(scene, "clear-cache", "--dry-run")
    found = tables(human(scene, width, "clear-cache", "--dry-run"))
    (summary,) = titled(found, "Dry run of clear-cache").pairs()
    assert summary["scanned"] == f"{clear['scanned']:,}"
    assert summary["kept"] == f"{clear['kept']:,}"
    restore = machine(scene, "restore", "--dry-run")
    (summary,) = titled(
        tables(human(scene, width, "restore", "--dry-run")), "Dry run of restore"
    ).pairs()
    assert summary["rows read"] == f"{restore['total']:,}"
    skipped = titled(tables(human(scene, width, "skipped", "--run", "1")), "Records skipped")
    (row,) = skipped.rows(anchor=None)  # every column wraps
    assert row["raw value"] == "".join(RAW.split())
    health = titled(tables(human(scene, width, "health")), "Health")
    assert {"redis", "postgres"} <= {r["check"] for r in health.rows(anchor="check")}
    status = machine(scene, "status")
    (record,) = titled(tables(human(scene, width, "status")), "Status of").pairs()
    assert f"{status['last_run']['processed']:,}processed" in record["last run"]
