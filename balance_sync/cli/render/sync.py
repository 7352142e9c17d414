"""sync's views: its summary, where to look when it skipped records, and its progress bar."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import RenderableType
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from balance_sync.cli.output import stderr_console
from balance_sync.cli.render.tables import summary_table
from balance_sync.ops.sync import BatchReport, SyncResult


def sync_views(result: SyncResult, target: str) -> list[RenderableType]:
    """sync's table; a partial run adds where to look at what it skipped."""
    views: list[RenderableType] = [sync_table(result, target)]
    if result.status == "partial":
        views.append(skipped_hint(result))
    return views


def sync_table(result: SyncResult, target: str) -> Table:
    """The summary of one sync as a two-column table."""
    title = "Dry run: nothing was written" if result.dry_run else f"Sync of {target}"
    table = summary_table(title, result.status, result.reason)
    verb = "would be " if result.dry_run else ""
    for name in ("processed", "inserted", "updated", "unchanged", "skipped", "invalid"):
        label = f"{verb}{name}" if name in ("inserted", "updated") else name
        table.add_row(label, f"{getattr(result, name):,}")
    table.add_row("duration", f"{result.duration_s:.2f} s")
    if result.run_id is not None:
        table.add_row("run id", str(result.run_id))
    if result.restart_pending:
        held = f"{result.held:,} row(s) held"
        if result.missing_keys:
            held += f", {result.missing_keys:,} remembered key(s) missing"
        table.add_row("Redis", Text(f"restart pending: {held}", style="yellow"))
    return table


class KeysColumn(ProgressColumn):
    """`400,000 of ~500,000 keys`: the total is an estimate, and says so."""

    def render(self, task: Task) -> Text:
        """The keys read so far, and the estimate when there is one."""
        done = f"{int(task.completed):,}"
        if task.total is None:
            return Text(f"{done} keys")
        return Text(f"{done} of ~{int(task.total):,} keys")


class SyncProgress:
    """A progress bar on stderr while a sync runs; a no-op when stderr is no terminal.

    With an estimated `total` (the CLI sets it, see balance_sync.ops.estimate) it shows the
    percentage and the time left; a run that reads more than estimated raises the total as
    it goes, so the bar never passes 100%.
    """

    def __init__(self, enabled: bool, total: int | None = None) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total = total
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    @contextmanager
    def show(self) -> Iterator[SyncProgress]:
        """Show the bar for the duration of the block."""
        if not self.enabled:
            yield self
            return
        progress = Progress(
            SpinnerColumn(),
            TextColumn("syncing"),
            BarColumn(bar_width=None),
            TaskProgressColumn(),
            KeysColumn(),
            TimeElapsedColumn(),
            TextColumn("elapsed,"),
            TimeRemainingColumn(),
            TextColumn("left"),
            console=stderr_console(),
            transient=True,
            redirect_stderr=True,
        )
        with progress:
            self._progress = progress
            self._task = progress.add_task("sync", total=self.total or None)
            yield self
        self._progress = None

    def update(self, report: BatchReport) -> None:
        """Advance the bar after a batch."""
        if self._progress is None or self._task is None:
            return
        done = report.total_processed
        if self.total and done > self.total:
            self.total = done
            self._progress.update(self._task, total=done)
        self._progress.update(self._task, completed=done)


def skipped_hint(result: SyncResult) -> str:
    """Where to look when a run skipped records."""
    if result.run_id is None:
        return f"{result.skipped} record(s) would be skipped (run with -v to list them)"
    places = []
    if result.skipped - result.conflicts > 0:
        places.append(f"`balsync skipped --run {result.run_id}`")
    if result.conflicts:
        places.append(f"`balsync conflicts --run {result.run_id}`")
    return f"{result.skipped} record(s) skipped: see " + " and ".join(places)
