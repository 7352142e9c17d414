"""The options every command shares: the settings, derived from `Settings` and the
variables `resolve_settings` reads, and the output options; `command` gives a command the
ones it needs and turns its failures into one line and an exit code.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import click

from balance_sync.cli.output import Output, fail
from balance_sync.errors import BalsyncError
from balance_sync.monitoring.logs import LOGGER, begin_run, setup_logging
from balance_sync.settings import (
    SETTING_ENV,
    Settings,
    duration_text,
    parse_duration,
    resolve_settings,
)

log = logging.getLogger(LOGGER)
F = TypeVar("F", bound=Callable[..., Any])

# Held in seconds, given as text such as 90d or `off`, which `resolve_settings` parses.
DURATION_SETTINGS = ("keep_runs", "keep_skipped")

# What the help says of each setting; its option's name, kind, variables and default come
# from `Settings` and SETTING_ENV.
SETTING_DOCS: dict[str, dict[str, str]] = {
    "redis_url": {
        "metavar": "URL",
        "help": "Redis holding the balances. The variables are read in this order; "
        "BALSYNC_REDIS_URL_FILE names a file holding the URL, REDIS_HOST/REDIS_PORT/"
        "REDIS_PASSWORD/REDIS_DB build one.",
    },
    "cluster": {
        "help": "Redis is a Redis Cluster: scan every primary and route each key by its slot "
        "(only database 0 exists). A redis+cluster:// or rediss+cluster:// URL implies it; "
        "the variable takes 1 or 0.",
    },
    "database_url": {
        "metavar": "URL",
        "help": "PostgreSQL to persist into. BALSYNC_DATABASE_URL_FILE names a file holding "
        "the URL; with none set, libpq's defaults and PG* variables.",
    },
    "key_prefix": {"metavar": "PREFIX", "help": "Balance keys are PREFIX<telegram_id>."},
    "table": {"metavar": "[SCHEMA.]NAME", "help": "Target table (may be schema-qualified)."},
    "id_column": {"metavar": "NAME", "help": "Id column."},
    "balance_column": {"metavar": "NAME", "help": "Balance column."},
    "value_format": {"help": "How Redis holds money: '1500.00' or integer cents '150000'."},
    "column_unit": {
        "help": "What one means in the balance column: a unit of money (1500.00 is 1500) or a "
        "cent (1500.00 is 150000). Required for a column without decimal places (bigint, "
        "integer, smallint, numeric(p,0)), where balsync cannot tell them apart; a column "
        "with decimals holds units.",
    },
    "retry_timeout": {
        "metavar": "SECONDS",
        "help": "How long to retry transient faults before giving up.",
    },
    "log_file": {"metavar": "PATH", "help": "Append log lines here too (logrotate-friendly)."},
    "log_format": {
        "help": "Log line format, on stderr and in the log file; JSON lines carry the run id "
        "and the table.",
    },
    "metrics_file": {
        "metavar": "PATH",
        "help": "Write the run's metrics here for node_exporter's textfile collector "
        "(name it *.prom).",
    },
    "ping_url": {
        "metavar": "URL",
        "help": "Dead man's switch: request URL/start, then URL/<exit code> (healthchecks.io "
        "style), both with ?rid=<run uuid>.",
    },
    "keep_runs": {
        "metavar": "DURATION",
        "help": "Keep run records this long (90d, 12h, 30m, 2w), or `off`; the runs health, "
        "stats and the guards rely on are always kept.",
    },
    "keep_skipped": {
        "metavar": "DURATION",
        "help": "Keep skipped records and conflicts this long, at most --keep-runs, or `off`.",
    },
}


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
    if name in DURATION_SETTINGS:
        return "off" if value is None else duration_text(float(value))  # type: ignore[arg-type]
    if value is None or value == "" or isinstance(value, bool):
        return None
    return f"{value:g}" if isinstance(value, float) else str(value)


def _kind(name: str) -> dict[str, Any]:
    """The option's click kind, from the setting's type in `Settings`."""
    hint = typing.get_type_hints(Settings)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `X | None`: not set
        (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
    if name in DURATION_SETTINGS:
        return {}
    if hint is bool:
        return {"is_flag": True, "default": None}  # None: not given, the environment decides
    if typing.get_origin(hint) is Literal:
        return {"type": click.Choice(typing.get_args(hint))}
    if hint is Path:
        return {"type": click.Path(dir_okay=False)}
    if hint is float:
        return {"type": float}
    return {}


def _setting(name: str) -> Callable[[F], F]:
    return click.option(
        f"--{name.replace('_', '-')}",
        cls=SettingOption,
        setting=name,
        **_kind(name),
        **SETTING_DOCS[name],
    )


# Every setting's option, once, in the order of SETTING_ENV; a command offers those of the
# groups it declares.
SETTING_OPTIONS: dict[str, Callable[[F], F]] = {name: _setting(name) for name in SETTING_ENV}

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


def tuned(flag: str, **attrs: Any) -> Callable[[F], F]:
    """A command option operators set from an environment file: its variable is BALSYNC_
    and the option's name (`--min-interval`: BALSYNC_MIN_INTERVAL), and --help shows both
    the variable and the default."""
    envvar = "BALSYNC_" + flag.removeprefix("--").replace("-", "_").upper()
    return click.option(flag, envvar=envvar, show_envvar=True, show_default=True, **attrs)


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
            try:
                settings = resolve_settings(raw, os.environ)
                setup_logging(
                    log_file=settings.log_file,
                    log_format=settings.log_format,
                    verbose=output.verbose,
                    quiet=output.quiet,
                )
                output = dataclasses.replace(output, json_logs=settings.log_format == "json")
                if "table" in names:
                    begin_run(str(settings.table))
                code = fn(settings=settings, output=output, **kwargs)
            except BalsyncError as exc:
                fail(exc, output)
            except KeyboardInterrupt:
                click.echo(
                    "balsync: interrupted; committed batches are kept, rerun to finish", err=True
                )
                sys.exit(130)
            except Exception as exc:  # the edge: anything unexpected is exit 5, logged whole
                log.error("unexpected failure", exc_info=True)
                fail(
                    BalsyncError(
                        f"unexpected failure: {type(exc).__name__}: {exc}",
                        "the traceback is in the log (--log-file, or -v for stderr)",
                    ),
                    output,
                )
            sys.exit(code or 0)

        options = tuple(SETTING_OPTIONS[name] for name in names)
        return _apply(OUTPUT_OPTIONS, _apply(options, wrapper))

    return decorate
