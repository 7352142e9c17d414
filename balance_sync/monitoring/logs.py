"""Logging: one line per event to stderr, and optionally to a log file, as text or JSON.

Tracebacks go to the log file (or to stderr with --verbose); a person at a terminal sees
one line per problem. With the JSON format stderr carries JSON lines too (a container has
no log file), each with the run id and the target table.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import UTC, datetime
from pathlib import Path

from balance_sync.errors import ConfigError
from balance_sync.settings import LogFormat, mask_text

LOGGER = "balance_sync"
FILE_ONLY = "balsync_file_only"  # a record's extra: the CLI already told stderr
EXIT_CODE = "balsync_exit_code"  # a record's extra: the exit code a failure ends with


class RunContext(logging.Filter):
    """Stamps every record with the run it belongs to: the target table and the run id.

    Process-wide state, not a contextvar: the sync's reader and writer threads log too, and
    a thread does not inherit its starter's context. One process is one command.
    """

    def __init__(self) -> None:
        super().__init__()
        self.table: str | None = None
        self.run_id: int | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        record.balsync_table = self.table
        record.balsync_run_id = self.run_id
        return True


RUN_CONTEXT = RunContext()


def begin_run(table: str | None) -> None:
    """From now on the logs are about `table`, and no run is recorded yet."""
    RUN_CONTEXT.table = table
    RUN_CONTEXT.run_id = None


def bind_run_id(run_id: int) -> None:
    """From now on the logs are about this recorded run."""
    RUN_CONTEXT.run_id = run_id


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "run_id": getattr(record, "balsync_run_id", None),
            "table": getattr(record, "balsync_table", None),
            "message": mask_text(record.getMessage()),
        }
        exit_code = getattr(record, EXIT_CODE, None)
        if exit_code is not None:
            data["exit_code"] = exit_code
        if record.exc_info:
            data["traceback"] = mask_text(self.formatException(record.exc_info))
        return json.dumps(data, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is now, so a progress bar can print lines above itself."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _: object) -> None:
        pass


class OneLineFormatter(logging.Formatter):
    """The message alone, without a traceback: for a person reading stderr."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_text(f"balsync: {record.getMessage()}")


class MaskingFormatter(logging.Formatter):
    """A text line, traceback included, with every password quoted in it masked."""

    def format(self, record: logging.LogRecord) -> str:
        # A traceback and a library's message may quote a URL with its password.
        return mask_text(super().format(record))


def setup_logging(
    *, log_file: Path | None, log_format: LogFormat, verbose: bool, quiet: bool
) -> None:
    """Configure the package logger for one command; safe to call again (tests do)."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    # A new command is a new run: nothing of the previous one (tests run many) carries over.
    begin_run(None)

    stderr = _StderrHandler()
    # On the handlers, not the logger: a logger's filters skip its children's records.
    stderr.addFilter(RUN_CONTEXT)
    stderr.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    if log_format == "json":
        # A log shipper reads every line, the failure too (the CLI then prints no text line
        # of its own), and a container's stderr is its only log: the traceback stays in.
        stderr.setFormatter(JsonFormatter())
    else:
        stderr.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
        if verbose:
            stderr.setFormatter(MaskingFormatter("%(asctime)s %(levelname)s %(message)s"))
        else:
            stderr.setFormatter(OneLineFormatter())
            # The CLI prints its own one-line message for a failure; the traceback is the log's.
            stderr.addFilter(lambda record: record.exc_info is None)
    logger.addHandler(stderr)

    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            # WatchedFileHandler reopens the file after logrotate moves it.
            handler = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot open log file {log_file}: {exc.strerror}") from exc
        handler.addFilter(RUN_CONTEXT)
        handler.setLevel(logging.DEBUG if verbose else logging.INFO)
        handler.setFormatter(
            JsonFormatter()
            if log_format == "json"
            else MaskingFormatter("%(asctime)s %(process)d %(levelname)s %(name)s %(message)s")
        )
        logger.addHandler(handler)
