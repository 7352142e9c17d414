"""Rendering results for people (rich) and for scripts (JSON). The core never prints."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from balance_sync.sync import BatchReport, SyncResult

_STATUS_STYLE = {
    "success": "green",
    "partial": "yellow",
    "skipped": "cyan",
    "failed": "red",
    "healthy": "green",
    "degraded": "yellow",
    "unhealthy": "red",
}


def stdout_console() -> Console:
    """Where results go."""
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def stderr_console() -> Console:
    """Where diagnostics and progress go."""
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def print_json(data: object, out: TextIO | None = None) -> None:
    """One JSON object on stdout, nothing else there."""
    (out or sys.stdout).write(json.dumps(data, default=str) + "\n")


def styled(status: str) -> str:
    """A status word in its colour."""
    return f"[{_STATUS_STYLE.get(status, 'white')}]{status}[/]"


def sync_table(result: SyncResult, target: str) -> Table:
    """The summary of one sync as a two-column table."""
    title = "Dry run: nothing was written" if result.dry_run else f"Sync of {target}"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("status", styled(result.status))
    if result.status == "skipped":
        table.add_row("reason", result.reason)
    verb = "would be " if result.dry_run else ""
    for name in ("processed", "inserted", "updated", "unchanged", "skipped", "invalid"):
        label = f"{verb}{name}" if name in ("inserted", "updated") else name
        table.add_row(label, f"{getattr(result, name):,}")
    table.add_row("duration", f"{result.duration_s:.2f} s")
    if result.run_id is not None:
        table.add_row("run id", str(result.run_id))
    return table


class SyncProgress:
    """A progress bar on stderr while a sync runs; a no-op when stderr is no terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._progress: Progress | None = None
        self._task: object = None

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
            MofNCompleteColumn(),
            TextColumn("keys"),
            TimeElapsedColumn(),
            console=stderr_console(),
            transient=True,
            redirect_stderr=True,
        )
        with progress:
            self._progress = progress
            self._task = progress.add_task("sync", total=None)
            yield self
        self._progress = None

    def update(self, report: BatchReport) -> None:
        """Advance the bar after a batch."""
        if self._progress is not None:
            self._progress.update(self._task, completed=report.total_processed)  # type: ignore[arg-type]
