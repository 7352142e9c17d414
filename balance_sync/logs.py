"""Logging: one line per event to stderr, and optionally to a log file, as text or JSON.

Tracebacks go to the log file (or to stderr with --verbose); a person at a terminal sees
one line per problem.
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


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": mask_text(record.getMessage()),
        }
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

    stderr = _StderrHandler()
    if verbose:
        stderr.setLevel(logging.DEBUG)
        stderr.setFormatter(
            JsonFormatter()
            if log_format == "json"
            else MaskingFormatter("%(asctime)s %(levelname)s %(message)s")
        )
    else:
        stderr.setLevel(logging.ERROR if quiet else logging.WARNING)
        stderr.setFormatter(OneLineFormatter())
        # The CLI prints its own one-line message for a failure; the traceback is the log's.
        stderr.addFilter(lambda record: record.exc_info is None)
    stderr.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
    logger.addHandler(stderr)

    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            # WatchedFileHandler reopens the file after logrotate moves it.
            handler = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot open log file {log_file}: {exc.strerror}") from exc
        handler.setLevel(logging.DEBUG if verbose else logging.INFO)
        handler.setFormatter(
            JsonFormatter()
            if log_format == "json"
            else MaskingFormatter("%(asctime)s %(process)d %(levelname)s %(name)s %(message)s")
        )
        logger.addHandler(handler)
