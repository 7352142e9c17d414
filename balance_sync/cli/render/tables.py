"""The pieces every view is built from: status colours, and tables whose numbers are never
cut, at any terminal width."""

from __future__ import annotations

from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, JustifyMethod, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

STATUS_STYLE = {
    "in_sync": "green",
    "drift": "red",
    "success": "green",
    "partial": "yellow",
    "skipped": "cyan",
    "failed": "red",
    "healthy": "green",
    "degraded": "yellow",
    "unhealthy": "red",
}


def styled(status: str) -> str:
    """A status word in its colour."""
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


# Numbers are never cut, at any width: their columns neither wrap nor shrink, and the text
# columns beside them give way instead, folding where a word is longer than the column. Where
# even that leaves a text column too narrow to read, the table is stacked: one block of
# heading: value lines per row.
TEXT_MIN_WIDTH = 8


class FittingTable(Table):
    """A table with a header that stacks its rows where its numbers would not fit whole."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.show_header and self.box is not None and _needed_width(self) > options.max_width:
            yield _stacked(self)
        else:
            yield from super().__rich_console__(console, options)


def _needed_width(table: Table) -> int:
    """The width of `table` with every number whole and text columns at TEXT_MIN_WIDTH."""
    needed = len(table.columns) + 1  # the vertical lines
    for column in table.columns:
        widest = max(_cell_width(cell) for cell in (column.header, *column.cells))
        needed += 2 + (widest if column.no_wrap else min(widest, TEXT_MIN_WIDTH))
    return needed


def _cell_width(cell: RenderableType) -> int:
    if isinstance(cell, str):
        cell = Text.from_markup(cell)
    if not isinstance(cell, Text):
        return 0
    return max((cell_len(line) for line in cell.plain.splitlines()), default=0)


def _stacked(table: Table) -> Table:
    """The rows of `table` as blocks of "heading: value" lines, a rule between two rows."""
    stacked = labelled_table(str(table.title or ""), values="left")
    headings = [Text.from_markup(str(c.header)).plain.replace("\n", " ") for c in table.columns]
    columns = [list(column.cells) for column in table.columns]
    for index in range(table.row_count):
        if index:
            stacked.add_section()
        for heading, cells in zip(headings, columns, strict=True):
            stacked.add_row(heading, cells[index])
    return stacked


def number_column(table: Table, header: str, **options: Any) -> None:
    """A column of counts or money: right-aligned, never wrapped, never cut."""
    table.add_column(header, justify="right", no_wrap=True, **options)


def text_column(table: Table, header: str = "", **options: Any) -> None:
    """A column of words, keys or messages: wrapped, and folded where a word is too long."""
    table.add_column(header, overflow="fold", **options)


def labelled_table(title: str, values: JustifyMethod = "right") -> Table:
    """A two-column table of labels and values, without a header.

    Its values mix numbers and messages, so the column wraps; the labels beside it are the
    narrower column that gives way first, and a number is far narrower than the rest.
    """
    table = Table(title=title, show_header=False, title_justify="left")
    text_column(table, style="bold")
    text_column(table, justify=values)
    return table


def summary_table(title: str, status: str, reason: str = "") -> Table:
    """A two-column summary that starts with the status (and why, when skipped)."""
    table = labelled_table(title)
    table.add_row("status", styled(status))
    if status == "skipped":
        table.add_row("reason", Text(reason))
    return table
