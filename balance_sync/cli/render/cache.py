"""Views of what clear-cache deleted from Redis and what restore wrote back."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from balance_sync.cli.render.tables import summary_table
from balance_sync.ops.clear_cache import READ_THROUGH, ClearResult
from balance_sync.ops.restore import RestoreResult
from balance_sync.ops.retention import format_bytes

_KEPT_LABELS = {
    "not_persisted": "not persisted",
    "differs": "differs from PostgreSQL",
    "invalid": "invalid",
    "recently_used": "recently used",
    "changed": "changed meanwhile",
}


def clear_cache_table(result: ClearResult, target: str) -> Table:
    """The summary of one clear-cache as a two-column table."""
    title = (
        "Dry run of clear-cache: nothing was deleted"
        if result.dry_run
        else f"clear-cache against {target}"
    )
    table = summary_table(title, result.status, result.reason)
    if result.status == "skipped":
        return table
    table.add_row("scanned", f"{result.scanned:,}")
    table.add_row("would be deleted" if result.dry_run else "deleted", f"{result.deleted:,}")
    table.add_row("kept", f"{result.kept:,}")
    for reason, count in result.kept_by_reason.items():
        if count:
            table.add_row(f"  {_KEPT_LABELS[reason]}", f"{count:,}")
    label = "memory it would free" if result.dry_run else "memory freed"
    table.add_row(label, _bytes_text(result.memory_freed_bytes))
    return table


def clear_cache_view(result: ClearResult, target: str) -> Group:
    """clear-cache's table; a dry run adds what clearing needs, wrapped to the terminal."""
    table = clear_cache_table(result, target)
    if not result.dry_run or result.status == "skipped":
        return Group(table)
    note = Table.grid()  # a grid wraps its text to the terminal; plain text would not here
    note.add_column(overflow="fold")
    note.add_row(Text(READ_THROUGH))
    return Group(table, note)


def restore_views(result: RestoreResult, target: str) -> list[RenderableType]:
    """restore's table; a partial restore adds where its unrestorable rows are."""
    views: list[RenderableType] = [restore_table(result, target)]
    if result.status == "partial":
        views.append(f"{result.invalid} row(s) could not be restored: see the log")
    return views


def restore_table(result: RestoreResult, target: str) -> Table:
    """The summary of one restore as a two-column table."""
    title = (
        "Dry run of restore: nothing was written" if result.dry_run else f"restore from {target}"
    )
    table = summary_table(title, result.status, result.reason)
    if result.status == "skipped":
        return table
    table.add_row("rows read", f"{result.total:,}")
    table.add_row("would be restored" if result.dry_run else "restored", f"{result.restored:,}")
    table.add_row("already present", f"{result.already_present:,}")
    if result.invalid:
        table.add_row("not restorable", f"{result.invalid:,}")
    if result.not_found:
        table.add_row("ids without a row", f"{result.not_found:,}")
    return table


def _bytes_text(count: int | None) -> str:
    if count is None:
        return "n/a"
    text = format_bytes(count)
    return text if count < 1024 else f"{text} ({count:,} B)"
