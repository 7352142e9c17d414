"""The command line: parse options, resolve settings, call the core once, render the result.

Every failure of the core arrives here as a BalsyncError and leaves as one line on stderr and
SPEC's exit code; tracebacks go to the log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click

from balance_sync import __version__
from balance_sync.cli import render
from balance_sync.errors import BalsyncError, ConfigError
from balance_sync.monitoring.logs import EXIT_CODE, FILE_ONLY, LOGGER, begin_run, setup_logging
from balance_sync.monitoring.report import SyncFailure, failed_json, failed_result, run_reported
from balance_sync.ops.clear_cache import READ_THROUGH, ClearOptions, ClearResult, clear_cache
from balance_sync.ops.estimate import expected_keys
from balance_sync.ops.health import DEFAULT_MAX_AGE, check_health
from balance_sync.ops.restore import RestoreOptions, parse_ids, run_restore
from balance_sync.ops.retention import PruneOptions, run_prune
from balance_sync.ops.schedule import Crontab, ScheduleChange, balsync_command, schedule_lines
from balance_sync.ops.schedule import install as install_schedule
from balance_sync.ops.schedule import uninstall as uninstall_schedule
from balance_sync.ops.skipped import DEFAULT_LIMIT as SKIPPED_LIMIT
from balance_sync.ops.skipped import list_skipped
from balance_sync.ops.stats import DEFAULT_RUNS, collect_stats
from balance_sync.ops.status import collect_status
from balance_sync.ops.sync import DEFAULT_BATCH_SIZE, DEFAULT_MIN_INTERVAL, SyncOptions
from balance_sync.ops.systemd import Systemctl
from balance_sync.ops.verify import DEFAULT_LIMIT, VerifyOptions, run_verify
from balance_sync.settings import (
    SETTING_ENV,
    Settings,
    duration_text,
    mask_text,
    parse_duration,
    resolve_settings,
)
from balance_sync.stopping import StopRequest
from balance_sync.stores.postgres import Database, Ledger, OnConflict, Schema

log = logging.getLogger(LOGGER)
F = TypeVar("F", bound=Callable[..., Any])


class SettingOption(click.Option):
    """A setting's option: its value goes to `resolve_settings`, never read from the
    environment by click, since settings have fallbacks (`REDIS_URL`, `REDIS_HOST`…,
    `*_FILE` secrets) and precedence rules click does not know.

    Its help shows the variables `resolve_settings` reads and the `Settings` default, so
    the help cannot drift from what balsync does.
    """

    def __init__(self, *args: Any, setting: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.setting = setting
        self.show_envvar = True

    def get_help_extra(self, ctx: click.Context) -> click.types.OptionHelpExtra:
        """click's extras, with the setting's variables and default."""
        extra = super().get_help_extra(ctx)
        extra["envvars"] = SETTING_ENV[self.setting]
        default = setting_default(self.setting)
        if default is not None:
            extra["default"] = default
        return extra


def setting_default(name: str) -> str | None:
    """A setting's default as an operator writes it, from `Settings` itself; None for none."""
    value = {f.name: f.default for f in dataclasses.fields(Settings)}[name]
    if name in ("keep_runs", "keep_skipped"):
        return "off" if value is None else duration_text(float(value))  # type: ignore[arg-type]
    if value is None or value == "" or isinstance(value, bool):
        return None
    return f"{value:g}" if isinstance(value, float) else str(value)


def _setting(setting: str, *decls: str, **attrs: Any) -> Callable[[F], F]:
    return click.option(*decls, cls=SettingOption, setting=setting, **attrs)


# Every setting's option, once; a command offers those of the groups it declares.
SETTING_OPTIONS: dict[str, Callable[[F], F]] = {
    "redis_url": _setting(
        "redis_url",
        "--redis-url",
        metavar="URL",
        help="Redis holding the balances. The variables are read in this order; "
        "BALSYNC_REDIS_URL_FILE names a file holding the URL, REDIS_HOST/REDIS_PORT/"
        "REDIS_PASSWORD/REDIS_DB build one.",
    ),
    "cluster": _setting(
        "cluster",
        "--cluster",
        is_flag=True,
        default=None,
        help="Redis is a Redis Cluster: scan every primary and route each key by its slot "
        "(only database 0 exists). A redis+cluster:// or rediss+cluster:// URL implies it; "
        "the variable takes 1 or 0.",
    ),
    "database_url": _setting(
        "database_url",
        "--database-url",
        metavar="URL",
        help="PostgreSQL to persist into. BALSYNC_DATABASE_URL_FILE names a file holding "
        "the URL; with none set, libpq's defaults and PG* variables.",
    ),
    "key_prefix": _setting(
        "key_prefix", "--key-prefix", metavar="PREFIX", help="Balance keys are PREFIX<telegram_id>."
    ),
    "table": _setting(
        "table", "--table", metavar="[SCHEMA.]NAME", help="Target table (may be schema-qualified)."
    ),
    "id_column": _setting("id_column", "--id-column", metavar="NAME", help="Id column."),
    "balance_column": _setting(
        "balance_column", "--balance-column", metavar="NAME", help="Balance column."
    ),
    "value_format": _setting(
        "value_format",
        "--value-format",
        type=click.Choice(["decimal", "cents"]),
        help="How Redis holds money: '1500.00' or integer cents '150000'.",
    ),
    "column_unit": _setting(
        "column_unit",
        "--column-unit",
        type=click.Choice(["units", "cents"]),
        help="What one means in the balance column: a unit of money (1500.00 is 1500) or a "
        "cent (1500.00 is 150000). Required for a column without decimal places (bigint, "
        "integer, smallint, numeric(p,0)), where balsync cannot tell them apart; a column "
        "with decimals holds units.",
    ),
    "retry_timeout": _setting(
        "retry_timeout",
        "--retry-timeout",
        type=float,
        metavar="SECONDS",
        help="How long to retry transient faults before giving up.",
    ),
    "log_file": _setting(
        "log_file",
        "--log-file",
        type=click.Path(dir_okay=False),
        metavar="PATH",
        help="Append log lines here too (logrotate-friendly).",
    ),
    "log_format": _setting(
        "log_format",
        "--log-format",
        type=click.Choice(["text", "json"]),
        help="Log line format, on stderr and in the log file; JSON lines carry the run id "
        "and the table.",
    ),
    "metrics_file": _setting(
        "metrics_file",
        "--metrics-file",
        type=click.Path(dir_okay=False),
        metavar="PATH",
        help="Write the run's metrics here for node_exporter's textfile collector "
        "(name it *.prom).",
    ),
    "ping_url": _setting(
        "ping_url",
        "--ping-url",
        metavar="URL",
        help="Dead man's switch: request URL/start, then URL/<exit code> (healthchecks.io "
        "style), both with ?rid=<run uuid>.",
    ),
    "keep_runs": _setting(
        "keep_runs",
        "--keep-runs",
        metavar="DURATION",
        help="Keep run records this long (90d, 12h, 30m, 2w), or `off`; the runs health, "
        "stats and the guards rely on are always kept.",
    ),
    "keep_skipped": _setting(
        "keep_skipped",
        "--keep-skipped",
        metavar="DURATION",
        help="Keep skipped records and conflicts this long, at most --keep-runs, or `off`.",
    ),
}

# Settings groups, by what a core function reads. The retry budget goes with each store.
REDIS = ("redis_url", "cluster", "retry_timeout")
POSTGRES = ("database_url", "retry_timeout", "table")
COLUMNS = ("id_column", "balance_column")
TARGET = (*COLUMNS, "column_unit")  # what describing the target table reads
KEYS = ("key_prefix",)
VALUES = ("value_format",)  # parsing or writing a value in Redis
RETENTION = ("keep_runs", "keep_skipped")
MONITORING = ("metrics_file", "ping_url")
LOGGING = ("log_file", "log_format")  # every command logs

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


@dataclass(frozen=True)
class Output:
    """How the user asked to be spoken to."""

    json: bool
    verbose: bool
    quiet: bool
    json_logs: bool = False  # --log-format json: stderr is for JSON lines only

    def shows_result(self, code: int) -> bool:
        """Whether to print the result's tables: unless quiet, and when quiet for a result
        that needs a look (on stderr, for cron's mail), but not among JSON log lines."""
        return not self.quiet or bool(code and not self.json_logs)


def _apply(options: tuple[Callable[[F], F], ...], fn: F) -> F:
    for option in reversed(options):
        fn = option(fn)
    return fn


def command(
    *groups: tuple[str, ...],
) -> Callable[[Callable[..., int | None]], Callable[..., None]]:
    """Give a command the options of the settings groups it reads (logging always), the
    output options, and one way to fail.

    A setting outside its groups is no option of the command: given, it is click's usage
    error (exit 2) rather than accepted and ignored. Its environment variable is still
    read, and harmless, since the command never looks at the value. The wrapped function
    receives `settings` and `output` instead of the raw options and returns its exit code.
    """
    wanted = {name for group in (*groups, LOGGING) for name in group}
    names = tuple(name for name in SETTING_OPTIONS if name in wanted)  # help in one order

    def decorate(fn: Callable[..., int | None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> None:
            output = Output(
                json=kwargs.pop("json_output"),
                verbose=kwargs.pop("verbose"),
                quiet=kwargs.pop("quiet"),
            )
            raw = {name: kwargs.pop(name) for name in names}
            json_logs = False
            try:
                settings = resolve_settings(raw, os.environ)
                setup_logging(
                    log_file=settings.log_file,
                    log_format=settings.log_format,
                    verbose=output.verbose,
                    quiet=output.quiet,
                )
                json_logs = settings.log_format == "json"
                output = dataclasses.replace(output, json_logs=json_logs)
                if "table" in names:
                    begin_run(str(settings.table))
                code = fn(settings=settings, output=output, **kwargs)
            except BalsyncError as exc:
                _fail(exc, output, json_logs=json_logs)
            except KeyboardInterrupt:
                click.echo(
                    "balsync: interrupted; committed batches are kept, rerun to finish", err=True
                )
                sys.exit(130)
            except Exception as exc:  # the edge: anything unexpected is exit 5, logged whole
                log.error("unexpected failure", exc_info=True)
                _fail(
                    BalsyncError(
                        f"unexpected failure: {type(exc).__name__}: {exc}",
                        "the traceback is in the log (--log-file, or -v for stderr)",
                    ),
                    output,
                    json_logs=json_logs,
                )
            sys.exit(code or 0)

        options = tuple(SETTING_OPTIONS[name] for name in names)
        return _apply(OUTPUT_OPTIONS, _apply(options, wrapper))

    return decorate


def _fail(exc: BalsyncError, output: Output, *, json_logs: bool) -> NoReturn:
    message = f"balsync: error: {exc.message}"
    if exc.hint:
        message += f" — {exc.hint}"
    message = mask_text(message)  # a library's text in it may quote a URL with its password
    if exc.__cause__ is not None and not isinstance(exc, ConfigError):
        log.debug("caused by", exc_info=exc.__cause__)
    # The log file (cron's only witness) gets the failure too. stderr gets it once: as this
    # record where it carries JSON lines (a reader parses every line), else as text below.
    log.error(
        "%s (exit %d)",
        message.removeprefix("balsync: "),
        exc.exit_code,
        extra={FILE_ONLY: not json_logs, EXIT_CODE: exc.exit_code},
    )
    if not json_logs:
        click.echo(message, err=True)
    sys.exit(exc.exit_code)


# How a stop signal is named in the run record, and its exit code (128 + the signal).
_STOP_SIGNALS = {
    signal.SIGTERM: ("terminated by SIGTERM", 143),
    signal.SIGINT: ("interrupted by SIGINT", 130),
}


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT ask `stop` to stop the run at its next safe
    point instead of killing it; a second signal ends the process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may handle signals (an embedding program's worker)
        return

    def handler(signum: int, _frame: object) -> None:
        if stop.requested:  # asked twice: the operator wants out now; guarantee 4 holds
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        stop.request(*_STOP_SIGNALS[signal.Signals(signum)])

    previous = {number: signal.signal(number, handler) for number in _STOP_SIGNALS}
    try:
        yield
    finally:
        for number, action in previous.items():
            signal.signal(number, action)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="balsync")
def cli() -> None:
    """Persist user balances from Redis into PostgreSQL, one batched run at a time.

    Cron (or a systemd timer, or a Kubernetes CronJob) starts it; nothing stays resident.
    Every setting is an option and an environment variable; the option wins. Each
    command takes the settings it reads; its --help shows their variables and defaults.

    \b
    First time:      balsync init-db
    Every hour:      balsync sync --quiet
    Before a change: balsync sync --dry-run

    Exit codes: 0 success or skipped, 1 some records skipped, 2 usage or configuration
    error, 3 Redis unavailable, 4 PostgreSQL unavailable, 5 any other failure, 130
    interrupted (SIGINT), 143 terminated (SIGTERM); a run stopped by a signal is recorded
    failed, after its batch in progress.
    """


@cli.command("init-db")
@command(POSTGRES, COLUMNS)
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
        created = Schema(db).init_db(settings)
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
    envvar="BALSYNC_BATCH_SIZE",
    show_envvar=True,
    type=click.IntRange(min=1, max=1_000_000),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    metavar="N",
    help="Valid records merged per transaction.",
)
@click.option(
    "--wait",
    envvar="BALSYNC_WAIT",
    show_envvar=True,
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    metavar="SECONDS",
    help="Wait this long for a running sync to finish instead of skipping.",
)
@click.option("--allow-negative", is_flag=True, help="Accept negative balances.")
@click.option(
    "--min-interval",
    envvar="BALSYNC_MIN_INTERVAL",
    show_envvar=True,
    type=click.FloatRange(min=0),
    default=DEFAULT_MIN_INTERVAL,
    show_default=True,
    metavar="SECONDS",
    help="Skip when a sync finished this recently (cron's hourly and daily entries meet at 02:00).",
)
@click.option(
    "--on-conflict",
    envvar="BALSYNC_ON_CONFLICT",
    show_envvar=True,
    type=click.Choice(["skip", "redis", "db"]),
    default="skip",
    show_default=True,
    help="A row changed in PostgreSQL since balsync last wrote it: keep it and report it "
    "(skip), overwrite it with Redis (redis), or keep it and give Redis its value (db).",
)
@click.option(
    "--incremental",
    is_flag=True,
    help="Sync only the ids the application marked as changed (balance_sync.writer); "
    "--force still scans every key.",
)
@click.option(
    "--ids",
    metavar="ID,ID,...",
    help="With --on-conflict: resolve only these ids' conflicts; the others stay held.",
)
@click.option(
    "--accept-redis-restart",
    is_flag=True,
    help="Redis restarted and you checked that it holds the right balances: Redis wins "
    "for the held rows, and this Redis is trusted from now on.",
)
@command(REDIS, POSTGRES, TARGET, KEYS, VALUES, RETENTION, MONITORING)
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
    on_conflict: OnConflict,
    accept_redis_restart: bool,
    incremental: bool,
    ids: str | None,
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

    A row changed in PostgreSQL behind balsync's back (an admin correction) is a conflict:
    kept and listed by `balsync conflicts` (exit 1) unless --on-conflict says otherwise.

    After a Redis restart or failover no row that differs is overwritten (new ids are
    still inserted), since Redis may have come back empty or from an old snapshot. The
    restart stays pending, across runs, until a full sync finds every balance balsync
    remembers agreeing, or the operator decides:

    \b
      balsync restore                   # PostgreSQL's value into keys missing from Redis
      balsync sync --on-conflict db     # PostgreSQL wins: its value into each held key
      balsync sync --accept-redis-restart   # Redis wins: trust it, overwrite held rows

    SIGTERM (exit 143) or Ctrl-C (exit 130) stops the run after the batch in progress; it
    is recorded failed, and metrics and the fail ping go out.
    """
    started = time.monotonic()
    try:  # every failure, a usage one too, still leaves one JSON object on stdout
        if ids is not None and on_conflict == "skip":
            raise ConfigError(
                "--ids without --on-conflict does nothing",
                "--ids chooses the conflicts that --on-conflict redis|db resolves",
            )
        options = SyncOptions(
            dry_run=dry_run,
            force=force,
            batch_size=batch_size,
            wait=wait,
            allow_negative=allow_negative,
            min_interval=min_interval,
            on_conflict=on_conflict,
            accept_redis_restart=accept_redis_restart,
            incremental=incremental,
            resolve_ids=None if ids is None else frozenset(parse_ids(ids)),
        )
        progress = render.SyncProgress(enabled=not (output.json or output.quiet))
        if progress.enabled:  # a person watches: worth two quick reads for a total and time left
            progress.total = expected_keys(settings, options)
        with stop_on_signals(options.stop), progress.show():
            result = run_reported(settings, options, on_batch=progress.update)
    except Exception as exc:
        if output.json:
            failed = failed_result(dry_run=dry_run, duration_s=time.monotonic() - started)
            render.print_json(failed_json(failed, SyncFailure.of(exc)))
        raise
    code = 1 if result.status == "partial" else 0
    if output.json:
        render.print_json(result.to_json())
    elif output.shows_result(code):
        console = render.stdout_console() if not output.quiet else render.stderr_console()
        console.print(render.sync_table(result, str(settings.table)))
        if code:
            console.print(render.skipped_hint(result))
    return code


@cli.command("conflicts")
@click.option(
    "--run",
    "run_id",
    type=int,
    metavar="ID",
    help="A run id [default: the last run with conflicts].",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    metavar="N",
    help="List at most N conflicts.",
)
@command(POSTGRES, KEYS)
def conflicts(*, settings: Settings, output: Output, run_id: int | None, limit: int) -> int:
    """List rows a sync did not simply overwrite, and why.

    A conflict is a row changed in PostgreSQL since balsync last wrote it
    (`changed_in_db`: an admin correction, the application's fallback path), or a row that
    differed after a Redis restart (`redis_restarted`). The resolution says what the run
    did: kept the row (the default), overwrote it with Redis, or kept it and gave Redis
    its value (`sync --on-conflict redis|db`).

    \b
    Examples:
      balsync conflicts
      balsync conflicts --run 42 --json
    """
    db = Database(settings.database_url, settings.retry_timeout)
    try:
        Schema(db).require_schema()
        chosen, found = Ledger(db).conflicts(settings.table, run_id, limit)
    finally:
        db.close()
    if output.json:
        render.print_json({"run_id": chosen, "conflicts": [render.conflict_json(c) for c in found]})
    elif not found:
        if not output.quiet:
            render.stdout_console().print("no conflicts")
    else:
        render.stdout_console().print(render.conflicts_table(chosen, found, settings.key_prefix))
    return 0


@cli.command("verify")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=DEFAULT_LIMIT,
    show_default=True,
    metavar="N",
    help="List at most N examples of each kind of discrepancy.",
)
@click.option(
    "--allow-negative",
    is_flag=True,
    help="Count negative balances as valid, as `sync --allow-negative` does.",
)
@command(REDIS, POSTGRES, TARGET, KEYS, VALUES)
def verify(*, settings: Settings, output: Output, limit: int, allow_negative: bool) -> int:
    """Compare every balance key in Redis with PostgreSQL; exit 1 on any drift.

    Reports keys missing in PostgreSQL, balances that differ (compared as exact
    decimals), rows whose key is missing in Redis, the invalid keys a sync would skip
    (counted, not drift), and the sum of balances on each side. Reads both sides in
    batches with constant memory and writes nothing anywhere. On a live system a
    balance that moved since the last sync differs too: run it right after a sync.

    \b
    Examples:
      balsync verify                  # a summary and the first 20 of each discrepancy
      balsync verify --limit 0 -q     # from cron: silent unless something drifted
      balsync verify --json | jq '.missing_in_pg, .differing, .missing_in_redis'
    """
    try:
        result = run_verify(settings, VerifyOptions(limit=limit, allow_negative=allow_negative))
    except BalsyncError:
        if output.json:
            render.print_json(
                {
                    "status": "failed",
                    **dict.fromkeys(
                        (
                            "redis_keys",
                            "valid_keys",
                            "invalid_keys",
                            "pg_rows",
                            "redis_sum",
                            "pg_sum",
                            "missing_in_pg",
                            "differing",
                            "missing_in_redis",
                        )
                    ),
                    "examples": {"missing_in_pg": [], "differing": [], "missing_in_redis": []},
                }
            )
        raise
    code = 0 if result.status == "in_sync" else 1
    if output.json:
        render.print_json(result.to_json())
    elif output.shows_result(code):
        console = render.stdout_console() if not output.quiet else render.stderr_console()
        for table in render.verify_tables(result, str(settings.table)):
            console.print(table)
    return code


# -- clear-cache, restore, skipped ---------------------------------------------------------


def stdin_is_terminal() -> bool:
    """Whether a person can answer a prompt on stdin (tests stand in for one)."""
    return sys.stdin.isatty()


@cli.command("clear-cache")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Report what would be deleted, the memory it would free and what clearing needs; "
    "delete nothing.",
)
@click.option(
    "--yes",
    is_flag=True,
    help="Delete without asking (required when stdin is not a terminal, as under cron).",
)
@click.option(
    "--idle-days",
    type=click.IntRange(min=0),
    metavar="N",
    help="Delete only keys nobody has read or written for N days (OBJECT IDLETIME).",
)
@command(REDIS, POSTGRES, TARGET, KEYS, VALUES)
def clear_cache_command(
    *, settings: Settings, output: Output, dry_run: bool, yes: bool, idle_days: int | None
) -> int:
    """Free Redis memory: delete balance keys whose value PostgreSQL already holds.

    Safe only where the application reads a missing balance through to PostgreSQL
    (balance_sync.writer with a loader does): one that takes a missing key as 0 turns a
    cleared balance into its next adjustment. --dry-run reminds you.

    A key is deleted only when its value equals the persisted balance as a number ('1500'
    equals 1500.00), by an atomic compare-and-delete on the exact bytes read: a balance
    written meanwhile survives. Keys not persisted yet, differing, invalid or (with
    --idle-days) recently used are kept and counted by reason. It takes sync's per-table
    lock, so it never runs beside a sync; if one runs, it exits 0 as skipped.

    It asks before deleting unless --yes, and without --yes refuses (exit 2) when stdin is
    not a terminal. Answering no deletes nothing and exits 0. --dry-run needs no answer.

    Idle time counts reads as well as writes. A sync reads every key, so with an hourly
    sync no key is idle for days unless the server and sync read without touching keys.

    \b
    Examples:
      balsync clear-cache --dry-run             # what would go, and the memory it would free
      balsync clear-cache                       # asks, then deletes
      balsync clear-cache --yes --idle-days 30  # unattended: keys untouched for 30 days
      balsync clear-cache --yes --json | jq .deleted
    """
    options = ClearOptions(dry_run=dry_run, idle_days=idle_days)
    if not dry_run and not yes and not _confirmed(settings):
        result = ClearResult(status="skipped", dry_run=False, reason="cancelled: nothing deleted")
    else:
        result = clear_cache(settings, options)
    if output.json:
        render.print_json(result.to_json())
    elif not output.quiet:
        render.stdout_console().print(render.clear_cache_view(result, str(settings.table)))
    return 0


def _confirmed(settings: Settings) -> bool:
    if not stdin_is_terminal():
        raise ConfigError(
            "refusing to delete without --yes when stdin is not a terminal",
            "pass --yes to delete, or --dry-run to see what would go",
        )
    question = (
        f"{READ_THROUGH}\nDelete the keys {settings.key_prefix}* at {settings.redis_display} "
        f"whose value {settings.table} already holds?"
    )
    try:
        return click.confirm(question, err=True)
    except click.Abort:  # end of input or Ctrl-C at the prompt: a no
        click.echo(err=True)
        return False


@cli.command("restore")
@click.option(
    "--dry-run", is_flag=True, help="Count the keys that would be restored; write nothing."
)
@click.option(
    "--ids",
    metavar="ID,ID,...",
    help="Only these telegram ids, comma-separated. [default: every row]",
)
@click.option(
    "--yes",
    is_flag=True,
    help="Accepted for symmetry with clear-cache; restore never asks (it only adds keys).",
)
@command(REDIS, POSTGRES, TARGET, KEYS, VALUES)
def restore(
    *, settings: Settings, output: Output, dry_run: bool, ids: str | None, yes: bool
) -> int:
    """Copy balances from PostgreSQL into Redis where the key is missing.

    The fallback for the day Redis comes back empty. Each key is written with SET NX, so
    a balance the application wrote meanwhile is never overwritten; values are written in
    --value-format ('1500.00', or '150000' in cents), exactly. Rows stream from a
    server-side cursor, so memory stays constant. It takes sync's per-table lock; if a
    sync or clear-cache runs, it exits 0 as skipped.

    It asks no confirmation: it only adds keys that are missing, never changes or deletes
    one. Exit 1 when some rows could not be written exactly (more than two decimals, no
    number); they are logged.

    \b
    Examples:
      balsync restore --dry-run          # how many keys are missing
      balsync restore                    # write them
      balsync restore --ids 1001,1002    # only these users
      balsync restore --json | jq .restored
    """
    del yes  # restore only adds missing keys, so there is nothing to confirm
    options = RestoreOptions(dry_run=dry_run, ids=None if ids is None else parse_ids(ids))
    result = run_restore(settings, options)
    code = 1 if result.status == "partial" else 0
    if output.json:
        render.print_json(result.to_json())
    elif output.shows_result(code):
        console = render.stdout_console() if not output.quiet else render.stderr_console()
        console.print(render.restore_table(result, str(settings.table)))
        if code:
            console.print(f"{result.invalid} row(s) could not be restored: see the log")
    return code


@cli.command("skipped")
@click.option(
    "--run",
    "run_id",
    type=click.IntRange(min=1),
    metavar="ID",
    help="A run id. [default: the last run that skipped records]",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=SKIPPED_LIMIT,
    show_default=True,
    metavar="N",
    help="List at most N records.",
)
@command(POSTGRES)
def skipped(*, settings: Settings, output: Output, run_id: int | None, limit: int) -> int:
    """List the records a sync run skipped: key, raw value and reason.

    By default the last run of the target table that skipped any records. The table cuts
    raw values to 60 characters; --json gives them as stored (up to 200 bytes). An
    unknown --run is exit 2. Needs balsync's schema (`balsync init-db`).

    \b
    Examples:
      balsync skipped
      balsync skipped --run 42 --limit 1000
      balsync skipped --json | jq -r '.records[].key'
    """
    listing = list_skipped(settings, run_id, limit)
    if output.json:
        render.print_json(listing.to_json())
    elif output.quiet:
        pass
    elif not listing.records:
        where = f"run {listing.run_id}" if listing.run_id is not None else "any run"
        render.stdout_console().print(f"no skipped records in {where} of {settings.table}")
    else:
        render.stdout_console().print(render.skipped_table(listing))
    return 0


class Duration(click.ParamType[float]):
    """A duration such as 90d, 12h, 30m or 2w, as seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """Seconds, or click's usage error (exit 2) naming the forms it accepts."""
        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@cli.command("prune")
@click.option(
    "--older-than",
    type=Duration(),
    metavar="DURATION",
    help="Prune what is older than this (90d, 12h, 30m, 2w) instead of what --keep-runs "
    "and --keep-skipped say.",
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@command(POSTGRES, RETENTION)
def prune(*, settings: Settings, output: Output, older_than: float | None, dry_run: bool) -> int:
    """Delete balsync's own records older than the retention policy, now.

    Every sync that finishes (success or partial) prunes already, for at most 20 s; this command is
    for an operator's own schedule, or once after an upgrade with years of records. It
    counts what it would delete per table, then deletes it all, in batches of 5000 rows.
    Run records go after --keep-runs (default 90d), skipped records and conflicts after
    --keep-skipped (default 30d); --older-than replaces both. Never deleted: the memory
    of written values, runs still running, and per target table the last run of each
    status, the last successful one, the one the restart guard trusts, and the last runs
    with skipped records and with conflicts, all with their records.

    It takes sync's per-table lock; if a sync runs, it exits 0 as skipped. Redis is not
    needed.

    \b
    Examples:
      balsync prune --dry-run               # what would go, per table
      balsync prune                         # delete to the policy
      balsync prune --older-than 30d --json | jq .deleted
    """
    result = run_prune(settings, PruneOptions(dry_run=dry_run, older_than=older_than))
    if output.json:
        render.print_json(result.to_json())
    elif not output.quiet:
        console = render.stdout_console()
        for table in render.prune_tables(result):
            console.print(table)
    return 0


# -- operator commands: health, stats, status, schedule -----------------------------------


@cli.command("health")
@click.option(
    "--max-age",
    envvar="BALSYNC_MAX_AGE",
    show_envvar=True,
    type=click.FloatRange(min=0),
    default=DEFAULT_MAX_AGE,
    show_default=True,
    metavar="SECONDS",
    help="Degraded when the last successful sync finished longer ago than this "
    "(two hourly runs missed).",
)
@command(REDIS, POSTGRES, TARGET, KEYS, VALUES, RETENTION)
def health(*, settings: Settings, output: Output, max_age: float) -> int:
    """Check both stores, the schema, the last sync, and the risks to money in Redis.

    Changes nothing. One row per check: Redis and PostgreSQL reachable (latency,
    version), balsync's schema and the target table present, the last successful sync
    younger than --max-age, and what operators miss: a maxmemory-policy that can evict
    balance keys, balance keys carrying a TTL (a sample of 1000), Redis memory above 90%
    of maxmemory, Redis restarted since the last successful sync, a Redis primary that
    would lose balances on a restart (no AOF, no save rules shorter than the sync
    interval, a failed snapshot), the size of balsync's own tables (degraded when
    retention is off and they pass 1 GiB), and the table's lock held by a session that
    has done nothing for 10 minutes (named, with the backend to terminate).

    Exit 0 healthy, 1 degraded (a check failed), 3 Redis unreachable, 4 PostgreSQL
    unreachable (after --retry-timeout); the report is printed in every case.

    \b
    Examples:
      balsync health
      balsync health --json | jq '.checks[] | select(.ok | not)'
      balsync health --quiet --retry-timeout 10   # for a monitor: silent when healthy
    """
    report = check_health(settings, max_age)
    code = report.exit_code
    if output.json:
        render.print_json(report.to_json())
    elif output.shows_result(code):
        console = render.stdout_console() if not output.quiet else render.stderr_console()
        console.print(render.health_table(report))
    return code


@cli.command("stats")
@click.option(
    "--runs",
    type=click.IntRange(min=1, max=1000),
    default=DEFAULT_RUNS,
    show_default=True,
    metavar="N",
    help="How many recent runs to list and chart.",
)
@command(REDIS, POSTGRES, TARGET, KEYS, RETENTION)
def stats(*, settings: Settings, output: Output, runs: int) -> int:
    """Show the last run, the last N runs, the last 24 h, and what each store holds now.

    The last run in full; a table and a bar chart of the last N runs; runs, failures
    and p50/p95 duration over 24 h; balance keys in Redis (counted with SCAN), rows and
    the exact sum of balances in PostgreSQL, Redis memory, and the rows and bytes of
    balsync's own tables with the retention policy. Changes nothing. In --json the sum is
    a decimal string, never a float.

    \b
    Examples:
      balsync stats
      balsync stats --runs 48
      balsync stats --json | jq -r .postgres.balance_sum
    """
    report = collect_stats(settings, runs)
    if output.json:
        render.print_json(report.to_json())
    elif not output.quiet:
        console = render.stdout_console()
        for view in render.stats_views(report):
            console.print(view)
    return 0


@cli.command("status")
@command(REDIS, POSTGRES, KEYS)
def status(*, settings: Settings, output: Output) -> int:
    """Say whether a sync is running, how the last one ended, and when the next ones start.

    A running sync is the holder of the target table's advisory lock: its PostgreSQL
    backend, and host, pid and start from its run record. The next three start times
    come from this user's crontab (`crontab -l`, the lines that start balsync), and
    balsync's systemd timers from `systemctl list-timers 'balsync*'`
    (BALSYNC_SYSTEMCTL_COMMAND names another, e.g. `systemctl --user`); without either,
    status says so. Changes nothing; Redis is not needed.

    \b
    Examples:
      balsync status
      balsync status --json | jq .running
    """
    report = collect_status(
        settings, Crontab.from_environ(os.environ), systemctl=Systemctl.from_environ(os.environ)
    )
    if output.json:
        render.print_json(report.to_json())
    elif not output.quiet:
        render.stdout_console().print(render.status_table(report))
    return 0


@cli.command("schedule")
@click.option("--install", is_flag=True, help="Add the lines to this user's crontab.")
@click.option("--uninstall", is_flag=True, help="Remove them from this user's crontab.")
@command()
def schedule(*, settings: Settings, output: Output, install: bool, uninstall: bool) -> int:
    """Print balsync's crontab lines, or install or remove them in this user's crontab.

    Hourly at minute 0 `balsync sync --quiet`, daily at 02:00 a forced run that waits
    for the hourly one (`--force --wait 1800`), both by this installation's absolute
    path, with --log-file when one is set. --install and --uninstall edit only the block
    between `# BEGIN balsync (managed by balsync schedule)` and `# END balsync`, leave
    every other line alone, and can run again safely. BALSYNC_CRONTAB_COMMAND names
    another crontab command (e.g. `crontab -u balsync`).

    \b
    Examples:
      balsync schedule                                   # just print the lines
      balsync schedule --install --log-file /var/log/balsync/balsync.log
      balsync schedule --uninstall
    """
    if install and uninstall:
        raise ConfigError("--install and --uninstall exclude each other", "give one of them")
    lines = schedule_lines(balsync_command(sys.argv[0]), settings.log_file)
    crontab = Crontab.from_environ(os.environ)
    if install:
        change = install_schedule(crontab, lines)
    elif uninstall:
        change = uninstall_schedule(crontab, lines)
    else:
        change = ScheduleChange("print", lines)
    for line in change.unmanaged:
        log.warning(
            "the crontab also starts balsync outside the managed block, so runs double: "
            "%s (remove it with crontab -e)",
            line,
        )
    if output.json:
        render.print_json(change.to_json())
        return 0
    if output.quiet:
        return 0
    console = render.stdout_console()
    message = render.schedule_message(change)
    if message:
        console.print(message)
    if change.action != "uninstall":
        for line in change.lines:
            console.print(line, markup=False)
        render.stderr_console().print(
            "cron starts these with an almost empty environment: set BALSYNC_REDIS_URL_FILE "
            "and BALSYNC_DATABASE_URL_FILE (files of mode 600) or the URLs themselves as "
            "variable lines above the block (crontab -e).",
            markup=False,
        )
    return 0


def main() -> None:
    """The console script."""
    cli(prog_name="balsync")
