"""The command line: parse options, resolve settings, call the core once, render the result.

Every failure of the core arrives here as a BalsyncError and leaves as one line on stderr and
SPEC's exit code; tracebacks go to the log.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click

from balance_sync import __version__, render
from balance_sync.errors import BalsyncError, ConfigError
from balance_sync.logs import LOGGER, setup_logging
from balance_sync.pg_store import Database
from balance_sync.settings import Settings, resolve_settings
from balance_sync.sync import DEFAULT_BATCH_SIZE, DEFAULT_MIN_INTERVAL, SyncOptions, run_sync

log = logging.getLogger(LOGGER)
F = TypeVar("F", bound=Callable[..., Any])

SETTING_OPTIONS = (
    click.option(
        "--redis-url",
        metavar="URL",
        help="Redis holding the balances. Env: BALSYNC_REDIS_URL, REDIS_URL, "
        "REDIS_HOST/REDIS_PORT/REDIS_PASSWORD/REDIS_DB, or a file named by "
        "BALSYNC_REDIS_URL_FILE. [default: redis://localhost:6379/0]",
    ),
    click.option(
        "--database-url",
        metavar="URL",
        help="PostgreSQL to persist into. Env: BALSYNC_DATABASE_URL, DATABASE_URL, "
        "BALSYNC_DATABASE_URL_FILE, else libpq's PG* variables.",
    ),
    click.option(
        "--key-prefix",
        metavar="PREFIX",
        help="Balance keys are PREFIX<telegram_id>. Env: BALSYNC_KEY_PREFIX. [default: balance:]",
    ),
    click.option(
        "--table",
        metavar="[SCHEMA.]NAME",
        help="Target table. Env: BALSYNC_TABLE. [default: user_balances]",
    ),
    click.option(
        "--id-column",
        metavar="NAME",
        help="Id column. Env: BALSYNC_ID_COLUMN. [default: telegram_id]",
    ),
    click.option(
        "--balance-column",
        metavar="NAME",
        help="Balance column. Env: BALSYNC_BALANCE_COLUMN. [default: balance]",
    ),
    click.option(
        "--value-format",
        type=click.Choice(["decimal", "cents"]),
        help="How Redis holds money: '1500.00' or integer cents '150000'. "
        "Env: BALSYNC_VALUE_FORMAT. [default: decimal]",
    ),
    click.option(
        "--retry-timeout",
        type=float,
        metavar="SECONDS",
        help="How long to retry transient faults before giving up. "
        "Env: BALSYNC_RETRY_TIMEOUT. [default: 60]",
    ),
    click.option(
        "--log-file",
        type=click.Path(dir_okay=False),
        metavar="PATH",
        help="Append log lines here too (logrotate-friendly). Env: BALSYNC_LOG_FILE.",
    ),
    click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        help="Log line format. Env: BALSYNC_LOG_FORMAT. [default: text]",
    ),
    click.option(
        "--metrics-file",
        type=click.Path(dir_okay=False),
        metavar="PATH",
        help="Prometheus textfile to write. Env: BALSYNC_METRICS_FILE.",
    ),
    click.option("--ping-url", metavar="URL", help="Dead man's switch URL. Env: BALSYNC_PING_URL."),
)
OUTPUT_OPTIONS = (
    click.option(
        "--json",
        "json_output",
        is_flag=True,
        help="Print one JSON object on stdout and nothing else there.",
    ),
    click.option("-v", "--verbose", is_flag=True, help="Show every step on stderr."),
    click.option(
        "-q",
        "--quiet",
        is_flag=True,
        help="Print nothing on success (for cron: mail only failures).",
    ),
)
_SETTING_NAMES = (
    "redis_url",
    "database_url",
    "key_prefix",
    "table",
    "id_column",
    "balance_column",
    "value_format",
    "retry_timeout",
    "log_file",
    "log_format",
    "metrics_file",
    "ping_url",
)


@dataclass(frozen=True)
class Output:
    """How the user asked to be spoken to."""

    json: bool
    verbose: bool
    quiet: bool


def _apply(options: tuple[Callable[[F], F], ...], fn: F) -> F:
    for option in reversed(options):
        fn = option(fn)
    return fn


def command(fn: Callable[..., int | None]) -> Callable[..., None]:
    """Give a command the settings and output options, and one way to fail.

    The wrapped function receives `settings` and `output` instead of the raw options and
    returns its exit code.
    """

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> None:
        output = Output(
            json=kwargs.pop("json_output"),
            verbose=kwargs.pop("verbose"),
            quiet=kwargs.pop("quiet"),
        )
        raw = {name: kwargs.pop(name) for name in _SETTING_NAMES}
        try:
            settings = resolve_settings(raw, os.environ)
            setup_logging(
                log_file=settings.log_file,
                log_format=settings.log_format,
                verbose=output.verbose,
                quiet=output.quiet,
            )
            code = fn(settings=settings, output=output, **kwargs)
        except BalsyncError as exc:
            _fail(exc, output)
        except KeyboardInterrupt:
            click.echo(
                "balsync: interrupted; committed batches are kept, rerun to finish", err=True
            )
            sys.exit(130)
        except Exception as exc:  # the edge: anything unexpected becomes exit 5, logged whole
            log.error("unexpected failure", exc_info=True)
            _fail(
                BalsyncError(
                    f"unexpected failure: {type(exc).__name__}: {exc}",
                    "the traceback is in the log (--log-file, or -v for stderr)",
                ),
                output,
            )
        sys.exit(code or 0)

    return _apply(OUTPUT_OPTIONS, _apply(SETTING_OPTIONS, wrapper))


def _fail(exc: BalsyncError, output: Output) -> NoReturn:
    message = f"balsync: error: {exc.message}"
    if exc.hint:
        message += f" — {exc.hint}"
    if exc.__cause__ is not None and not isinstance(exc, ConfigError):
        log.debug("caused by", exc_info=exc.__cause__)
    click.echo(message, err=True)
    sys.exit(exc.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="balsync")
def cli() -> None:
    """Persist user balances from Redis into PostgreSQL, one batched run at a time.

    Cron (or a systemd timer, or a Kubernetes CronJob) starts it; nothing stays resident.
    Every setting is an option and an environment variable; the option wins.

    \b
    First time:      balsync init-db
    Every hour:      balsync sync --quiet
    Before a change: balsync sync --dry-run

    Exit codes: 0 success or skipped, 1 some records skipped, 2 usage or configuration
    error, 3 Redis unavailable, 4 PostgreSQL unavailable, 5 any other failure.
    """


@cli.command("init-db")
@command
def init_db(*, settings: Settings, output: Output) -> int:
    """Create the target table (default one only) and balsync's own schema.

    Idempotent: running it again changes nothing. An existing application table given
    with --table is left alone; only the `balsync` schema is created.

    \b
    Example:
      BALSYNC_DATABASE_URL=postgresql://balsync@db/app balsync init-db
    """
    db = Database(settings.database_url, settings.retry_timeout)
    try:
        created = db.init_db(settings)
    finally:
        db.close()
    if output.json:
        render.print_json({"status": "success", "created": created})
    elif not output.quiet:
        what = ", ".join(created) if created else "nothing (all present)"
        render.stdout_console().print(f"init-db: created {what}")
    return 0


@cli.command("sync")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Read both sides and report what would change; write nothing anywhere.",
)
@click.option("--force", is_flag=True, help="Run even if a sync finished within --min-interval.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1, max=1_000_000),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    metavar="N",
    help="Valid records merged per transaction.",
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0,
    metavar="SECONDS",
    help="Wait this long for a running sync to finish instead of skipping.",
)
@click.option("--allow-negative", is_flag=True, help="Accept negative balances.")
@click.option(
    "--min-interval",
    type=click.FloatRange(min=0),
    default=DEFAULT_MIN_INTERVAL,
    show_default=True,
    metavar="SECONDS",
    help="Skip when a sync finished this recently (cron's hourly and daily entries meet at 02:00).",
)
@command
def sync(
    *,
    settings: Settings,
    output: Output,
    dry_run: bool,
    force: bool,
    batch_size: int,
    wait: float,
    allow_negative: bool,
    min_interval: float,
) -> int:
    """Copy every balance from Redis into PostgreSQL, in batches.

    New ids are inserted, changed balances updated (updated_at only then), rows whose
    key is absent from Redis never touched. Invalid records are skipped, reported and
    kept in balsync.skipped_records; the run goes on. Only one run per table at a time:
    a run that finds another one going exits 0 as skipped.

    \b
    Examples:
      balsync sync                    # one run, a summary table
      balsync sync --dry-run -v       # what would change, batch by batch
      balsync sync --quiet            # from cron: silent unless something is wrong
      balsync sync --json | jq .status
    """
    options = SyncOptions(
        dry_run=dry_run,
        force=force,
        batch_size=batch_size,
        wait=wait,
        allow_negative=allow_negative,
        min_interval=min_interval,
    )
    progress = render.SyncProgress(enabled=not (output.json or output.quiet))
    try:
        with progress.show():
            result = run_sync(settings, options, on_batch=progress.update)
    except BalsyncError:
        if output.json:
            render.print_json(
                {
                    "status": "failed",
                    "dry_run": dry_run,
                    "processed": 0,
                    "inserted": 0,
                    "updated": 0,
                    "unchanged": 0,
                    "skipped": 0,
                    "invalid": 0,
                    "duration_s": 0.0,
                    "run_id": None,
                }
            )
        raise
    code = 1 if result.status == "partial" else 0
    if output.json:
        render.print_json(result.to_json())
    elif not output.quiet or code:
        console = render.stdout_console() if not output.quiet else render.stderr_console()
        console.print(render.sync_table(result, str(settings.table)))
        if code:
            console.print(
                f"{result.skipped} record(s) skipped: see the log, or "
                f"`balsync skipped --run {result.run_id}`"
                if result.run_id
                else f"{result.skipped} record(s) would be skipped (run with -v to list them)"
            )
    return code


def main() -> None:
    """The console script."""
    cli(prog_name="balsync")
