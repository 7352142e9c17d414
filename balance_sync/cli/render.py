"""Rendering results for people (rich) and for scripts (JSON). The core never prints."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any, TextIO

from rich.cells import cell_len
from rich.console import (
    Console,
    ConsoleOptions,
    Group,
    JustifyMethod,
    RenderableType,
    RenderResult,
)
from rich.markup import escape
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

from balance_sync.ops.clear_cache import READ_THROUGH, ClearResult
from balance_sync.ops.health import HealthReport, format_duration
from balance_sync.ops.restore import RestoreResult
from balance_sync.ops.retention import BookkeepingSize, PruneResult, format_bytes
from balance_sync.ops.schedule import ScheduleChange
from balance_sync.ops.skipped import SkippedListing
from balance_sync.ops.stats import StatsReport
from balance_sync.ops.status import StatusReport
from balance_sync.ops.sync import BatchReport, SyncResult
from balance_sync.ops.verify import VerifyResult, money_text
from balance_sync.stores.postgres import Conflict, RunRecord

_STATUS_STYLE = {
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


def stdout_console() -> Console:
    """Where results go."""
    return Console(file=sys.stdout, highlight=False, soft_wrap=True, emoji=False)


def stderr_console() -> Console:
    """Where diagnostics and progress go."""
    return Console(file=sys.stderr, highlight=False, soft_wrap=True, emoji=False)


def print_json(data: object, out: TextIO | None = None) -> None:
    """One JSON object on stdout, nothing else there."""
    (out or sys.stdout).write(json.dumps(data, default=str) + "\n")


def styled(status: str) -> str:
    """A status word in its colour."""
    return f"[{_STATUS_STYLE.get(status, 'white')}]{status}[/]"


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


def conflict_json(conflict: Conflict) -> dict[str, object]:
    """One conflict for `--json`; money as exact decimal strings."""
    return {
        "telegram_id": conflict.telegram_id,
        "db_value": None if conflict.db_value is None else str(conflict.db_value),
        "redis_value": str(conflict.redis_value),
        "last_written": None if conflict.last_written is None else str(conflict.last_written),
        "kind": conflict.kind,
        "resolution": conflict.resolution,
    }


def conflicts_table(run_id: int | None, conflicts: list[Conflict], prefix: str) -> Table:
    """The conflicts of a run: the key, the three values, what kind of conflict, what was done."""
    table = FittingTable(title=f"Conflicts of run {run_id}", title_justify="left")
    text_column(table, "key")
    number_column(table, "PostgreSQL")
    number_column(table, "Redis")
    number_column(table, "last\nwritten")  # two lines: the money below is often narrower
    text_column(table, "kind")
    text_column(table, "resolution")
    for c in conflicts:
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


# -- verify -------------------------------------------------------------------------------


def verify_tables(result: VerifyResult, target: str) -> list[Table]:
    """A verify's summary, then one table of examples for each kind of discrepancy found."""
    summary = labelled_table(f"Redis compared with {target}")
    summary.add_row("status", styled(result.status))
    summary.add_row("Redis keys", f"{result.redis_keys:,}")
    summary.add_row("valid keys", f"{result.valid_keys:,}")
    summary.add_row("invalid keys (ignored)", f"{result.invalid_keys:,}")
    summary.add_row("PostgreSQL rows", f"{result.pg_rows:,}")
    summary.add_row("sum in Redis", money_text(result.redis_sum))
    summary.add_row("sum in PostgreSQL", money_text(result.pg_sum))
    summary.add_row("missing in PostgreSQL", f"{result.missing_in_pg:,}")
    summary.add_row("differing", f"{result.differing:,}")
    summary.add_row("missing in Redis", f"{result.missing_in_redis:,}")
    summary.add_row("duration", f"{result.duration_s:.2f} s")
    tables = [summary]
    kinds = (
        (
            "Missing in PostgreSQL",
            result.missing_in_pg,
            [(e.key, e.redis, "") for e in result.missing_in_pg_examples],
        ),
        (
            "Differing",
            result.differing,
            [(e.key, e.redis, _or_null(e.postgres)) for e in result.differing_examples],
        ),
        (
            "Missing in Redis",
            result.missing_in_redis,
            [(e.key, "", _or_null(e.postgres)) for e in result.missing_in_redis_examples],
        ),
    )
    for title, total, rows in kinds:
        if not rows:
            continue
        shown = f"{title} (first {len(rows):,} of {total:,})" if total > len(rows) else title
        table = FittingTable(title=shown, title_justify="left")
        text_column(table, "key")
        number_column(table, "Redis")
        number_column(table, "PostgreSQL")
        for row in rows:
            # Text, not markup: a key's `[...]` or `:name:` must print as it is.
            table.add_row(*(Text(cell) for cell in row))
        tables.append(table)
    return tables


def _or_null(value: str | None) -> str:
    return "NULL" if value is None else value


# -- clear-cache, restore, skipped --------------------------------------------------------

_KEPT_LABELS = {
    "not_persisted": "not persisted",
    "differs": "differs from PostgreSQL",
    "invalid": "invalid",
    "recently_used": "recently used",
    "changed": "changed meanwhile",
}
RAW_VALUE_WIDTH = 60


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


def _bytes_text(count: int | None) -> str:
    if count is None:
        return "n/a"
    text = format_bytes(count)
    return text if count < 1024 else f"{text} ({count:,} B)"


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


def bookkeeping_table(size: BookkeepingSize) -> Table:
    """The rows and bytes of balsync's own tables, and the retention policy."""
    table = Table(title="balsync's own tables (all target tables)", title_justify="left")
    table.add_column("table")
    table.add_column("rows (estimated)", justify="right")
    table.add_column("size", justify="right")
    for t in size.tables:
        table.add_row(f"balsync.{t.name}", f"{t.rows:,}", format_bytes(t.bytes))
    table.add_row("[bold]total[/]", f"{size.rows:,}", format_bytes(size.bytes))
    table.caption = f"retention: {size.retention.describe()}"
    if size.warning:
        table.caption += f"\n[yellow]{escape(size.warning)}[/]"
    table.caption_justify = "left"
    return table


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


# -- operator commands: health, stats, status, schedule -----------------------------------

_BAR = "█"
_CHART_WIDTH = 40


def _when(moment: datetime | None) -> str:
    """A timestamp in the machine's local time."""
    return "" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:,.2f} s"


def health_table(report: HealthReport) -> Table:
    """One row per check, failing ones in red."""
    table = FittingTable(title=f"Health: {styled(report.status)}", title_justify="left")
    text_column(table, "check", style="bold")
    table.add_column("ok", justify="center", no_wrap=True)
    text_column(table, "detail")
    number_column(table, "latency")
    for check in report.checks:
        table.add_row(
            check.name,
            "[green]✓[/]" if check.ok else "[red]✗[/]",
            escape(check.detail) if check.ok else f"[red]{escape(check.detail)}[/]",
            "" if check.latency_ms is None else f"{check.latency_ms:.1f} ms",
        )
    return table


def run_table(run: RunRecord, title: str) -> Table:
    """One run record in full, as a two-column table."""
    table = labelled_table(title, values="left")
    table.add_row("run id", str(run.id))
    table.add_row("status", styled(run.status))
    table.add_row("started", _when(run.started_at))
    table.add_row("finished", _when(run.finished_at) or "not yet")
    table.add_row("duration", _seconds(run.duration_s))
    for name in ("processed", "inserted", "updated", "unchanged", "skipped", "invalid"):
        table.add_row(name, f"{getattr(run, name):,}")
    if run.error:
        table.add_row("error", f"[red]{escape(run.error)}[/]")
    table.add_row("host, pid", f"{escape(run.host)}, {run.pid}")
    table.add_row("version", run.version)
    return table


def runs_table(runs: Sequence[RunRecord]) -> Table:
    """The last runs, newest first; `changed` is inserted + updated.

    Six columns, so that counts of a billion fit 80 columns whole; each run's duration is in
    the chart below, and the last run's full counters in the table above.
    """
    table = FittingTable(title=f"Last {len(runs)} runs", title_justify="left")
    number_column(table, "id")
    text_column(table, "started")  # the date and the time wrap onto two lines if need be
    text_column(table, "status")
    for column in ("processed", "changed", "skipped"):
        number_column(table, column)
    for run in runs:
        table.add_row(
            str(run.id),
            run.started_at.astimezone().strftime("%Y-%m-%d %H:%M"),
            styled(run.status),
            f"{run.processed:,}",
            f"{run.inserted + run.updated:,}",
            f"{run.skipped:,}",
        )
    return table


def duration_chart(runs: Sequence[RunRecord]) -> Table:
    """The durations of the runs as bars of █, the longest one full width."""
    timed = [run for run in runs if run.duration_s is not None]
    longest = max((run.duration_s or 0.0 for run in timed), default=0.0)
    table = Table(title="Run durations", show_header=False, title_justify="left", box=None)
    number_column(table, "", style="bold")
    table.add_column(no_wrap=True)
    number_column(table, "")
    for run in timed:
        duration = run.duration_s or 0.0
        width = max(1, round(_CHART_WIDTH * duration / longest)) if longest > 0 else 1
        colour = _STATUS_STYLE.get(run.status, "white")
        table.add_row(str(run.id), f"[{colour}]{_BAR * width}[/]", _seconds(duration))
    return table


def stats_views(report: StatsReport) -> list[RenderableType]:
    """Everything `balsync stats` shows, in reading order."""
    views: list[RenderableType] = []
    if report.last_run is None:
        views.append(f"No runs of {report.table} are recorded yet.")
    else:
        views.append(run_table(report.last_run, f"Last run of {report.table}"))
        views.append(runs_table(report.runs))
        views.append(duration_chart(report.runs))
    window = report.window
    figures = labelled_table("Figures")
    figures.add_row(f"runs, last {window.hours} h", f"{window.runs:,}")
    failures = f"{window.failures:,}"
    figures.add_row("failures", f"[red]{failures}[/]" if window.failures else failures)
    figures.add_row("duration p50", _seconds(window.p50_duration_s) or "n/a")
    figures.add_row("duration p95", _seconds(window.p95_duration_s) or "n/a")
    figures.add_row(f"Redis keys under {escape(report.key_prefix)}", f"{report.redis_keys:,}")
    figures.add_row("Redis memory", report.redis_used_memory_human)
    figures.add_row(f"PostgreSQL rows in {report.table}", f"{report.pg_rows:,}")
    figures.add_row("PostgreSQL sum of balances", f"{report.pg_balance_sum:,}")
    views.append(figures)
    if report.bookkeeping is not None:
        views.append(bookkeeping_table(report.bookkeeping))
    return views


def status_table(report: StatusReport) -> Table:
    """Whether a sync runs, how the last one ended, and when cron or systemd start the next."""
    table = labelled_table(f"Status of {report.table}", values="left")
    holder, run = report.holder, report.current_run
    if holder is None:
        table.add_row("running", "no sync is running")
    else:
        who = f"PostgreSQL backend {holder.backend_pid}"
        if holder.application_name:
            who += f" ({holder.application_name}"
            who += f" from {holder.client_addr})" if holder.client_addr else ")"
        since = run.started_at if run is not None else holder.backend_start
        table.add_row("running", f"[cyan]a sync holds the lock[/] since {_when(since)}")
        if run is not None:
            table.add_row("", f"run {run.id} on host {run.host}, pid {run.pid}")
        table.add_row("", who)
    if report.abandoned_run is not None:
        dead = report.abandoned_run
        table.add_row(
            "abandoned",
            f"[yellow]run {dead.id} (host {dead.host}, pid {dead.pid}, started "
            f"{_when(dead.started_at)}) is marked running but holds no lock: its process "
            "died; the next sync marks it failed[/]",
        )
    if report.redis_restart_pending:
        table.add_row(
            "Redis",
            "[yellow]restart pending: rows that differ are held (see `balsync health`)[/]",
        )
    last = report.last_run
    if last is None:
        table.add_row("last run", "none recorded")
    else:
        ended = _when(last.finished_at)
        if last.age_s is not None:
            ended += f" ({format_duration(last.age_s)} ago)"
        summary = (
            f"run {last.id} {styled(last.status)}, finished {ended}, "
            f"{_seconds(last.duration_s)}, {last.processed:,} processed, "
            f"{last.skipped:,} skipped"
        )
        table.add_row("last run", summary)
        if last.error:
            table.add_row("", f"[red]{escape(last.error)}[/]")
    _schedule_rows(table, report)
    return table


def _schedule_rows(table: Table, report: StatusReport) -> None:
    """What starts balsync next: its systemd timers, its crontab lines and their times."""
    schedule = report.schedule
    for number, timer in enumerate(report.timers):
        when = f"next {_when(timer.next_at)}" if timer.next_at else "not scheduled"
        if timer.last_at is not None:
            when += f", last {_when(timer.last_at)}"
        table.add_row(
            "systemd timers" if number == 0 else "",
            f"{escape(timer.unit)} → {escape(timer.activates)}: {when}",
        )
    # Where systemd starts balsync, a missing crontab is expected, not news.
    if schedule.entries or not report.timers:
        table.add_row("crontab", escape(schedule.detail))
    for entry in schedule.entries:
        table.add_row("", escape(entry.line))
    for number, fire in enumerate(schedule.next_runs):
        table.add_row(
            "next runs" if number == 0 else "",
            f"{_when(fire.at)}  {escape(fire.entry.command)}",
        )


def schedule_message(change: ScheduleChange) -> str:
    """What `balsync schedule --install/--uninstall` did, in one line."""
    if change.action == "install":
        return (
            "installed balsync's schedule in the crontab:"
            if change.changed
            else "balsync's schedule is already installed; the crontab is unchanged:"
        )
    if change.action == "uninstall":
        return (
            "removed balsync's schedule from the crontab"
            if change.changed
            else "the crontab holds no balsync schedule; nothing to remove"
        )
    return ""
