"""The operator's views: verify's comparison, health, stats and status."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from rich.console import RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from balance_sync.cli.render.tables import (
    STATUS_STYLE,
    FittingTable,
    labelled_table,
    number_column,
    styled,
    text_column,
)
from balance_sync.ops.health import HealthReport, format_duration
from balance_sync.ops.retention import BookkeepingSize, format_bytes
from balance_sync.ops.stats import StatsReport
from balance_sync.ops.status import StatusReport
from balance_sync.ops.verify import VerifyResult, money_text
from balance_sync.stores.postgres import RunRecord


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
        colour = STATUS_STYLE.get(run.status, "white")
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
