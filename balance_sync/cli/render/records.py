"""Views of balsync's own records: conflicts, skipped records, and what prune deleted."""

from __future__ import annotations

from decimal import Decimal

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from balance_sync.cli.render.tables import FittingTable, number_column, summary_table, text_column
from balance_sync.ops.conflicts import ConflictListing
from balance_sync.ops.retention import PruneResult
from balance_sync.ops.skipped import SkippedListing

RAW_VALUE_WIDTH = 60


def conflicts_views(listing: ConflictListing, prefix: str) -> list[RenderableType]:
    """The conflicts of a run as a table, or a line saying there are none."""
    return [conflicts_table(listing, prefix)] if listing.conflicts else ["no conflicts"]


def conflicts_table(listing: ConflictListing, prefix: str) -> Table:
    """The conflicts of a run: the key, the three values, what kind of conflict, what was done."""
    table = FittingTable(title=f"Conflicts of run {listing.run_id}", title_justify="left")
    text_column(table, "key")
    number_column(table, "PostgreSQL")
    number_column(table, "Redis")
    number_column(table, "last\nwritten")  # two lines: the money below is often narrower
    text_column(table, "kind")
    text_column(table, "resolution")
    for c in listing.conflicts:
        table.add_row(
            Text(f"{prefix}{c.telegram_id}"),  # Text, not markup: a prefix may hold `[...]`
            _money(c.db_value),
            _money(c.redis_value),
            _money(c.last_written),
            c.kind,
            c.resolution,
        )
    return table


def _money(value: Decimal | None) -> str:
    return "" if value is None else str(value)


def skipped_views(listing: SkippedListing, target: str) -> list[RenderableType]:
    """The skipped records of a run as a table, or a line saying there are none."""
    if not listing.records:
        where = f"run {listing.run_id}" if listing.run_id is not None else "any run"
        return [f"no skipped records in {where} of {target}"]
    return [skipped_table(listing)]


def skipped_table(listing: SkippedListing) -> Table:
    """The skipped records of one run; values cut to RAW_VALUE_WIDTH characters."""
    shown = len(listing.records)
    title = f"Records skipped by run {listing.run_id}"
    if listing.total > shown:
        title += f" (first {shown:,} of {listing.total:,}; --limit shows more, --json in full)"
    table = FittingTable(title=title, title_justify="left")
    for column in ("key", "raw value", "reason", "recorded at"):
        text_column(table, column)
    for record in listing.records:
        raw = "—" if record.raw_value is None else _cut(record.raw_value, RAW_VALUE_WIDTH)
        # Text, not markup: a key or value holding `[...]` must print as it is.
        table.add_row(
            Text(record.key),
            Text(raw),
            Text(record.reason),
            record.recorded_at.isoformat(sep=" ", timespec="seconds"),
        )
    return table


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def prune_tables(result: PruneResult) -> list[Table]:
    """A prune's summary, then what it found and deleted in each of balsync's tables."""
    title = (
        "Dry run of prune: nothing was deleted"
        if result.dry_run
        else f"prune of balsync's records of {result.table}"
    )
    summary = summary_table(title, result.status, result.reason)
    if result.status == "skipped":
        return [summary]
    summary.add_row("retention", result.retention.describe())
    summary.add_row("runs kept whatever their age", f"{result.kept_runs:,}")
    if not result.complete:
        summary.add_row("complete", "[yellow]no: time ran out, run it again[/]")
    summary.add_row("duration", f"{result.duration_s:.2f} s")
    rows = Table(title="Rows per table", title_justify="left")
    rows.add_column("table")
    rows.add_column("older than the policy", justify="right")
    if not result.dry_run:
        rows.add_column("deleted", justify="right")
    for name, deleted in result.deleted.items():
        found = "" if result.found is None else f"{result.found[name]:,}"
        rows.add_row(f"balsync.{name}", found, *([] if result.dry_run else [f"{deleted:,}"]))
    return [summary, rows]
