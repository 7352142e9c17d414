"""What a command says: its result as one JSON object or as rich views, and its failure as
one line on stderr with SPEC's exit code. Every command speaks through `emit` and `fail`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn, Protocol, TextIO

import click
from rich.console import Console, RenderableType

from balance_sync.errors import BalsyncError, ConfigError
from balance_sync.monitoring.logs import EXIT_CODE, FILE_ONLY, LOGGER
from balance_sync.settings import mask_text

log = logging.getLogger(LOGGER)


class Result(Protocol):
    """What an operation returns: a typed value that knows its JSON object."""

    def to_json(self) -> dict[str, object]:
        """The command's JSON object."""
        ...


@dataclass(frozen=True)
class Output:
    """How the user asked to be spoken to."""

    json: bool
    verbose: bool
    quiet: bool
    json_logs: bool = False  # --log-format json: stderr is for JSON lines only


def stdout_console() -> Console:
    """Where results go."""
    return Console(file=sys.stdout, highlight=False, soft_wrap=True, emoji=False)


def stderr_console() -> Console:
    """Where diagnostics and progress go."""
    return Console(file=sys.stderr, highlight=False, soft_wrap=True, emoji=False)


def print_json(data: object, out: TextIO | None = None) -> None:
    """One JSON object on stdout, nothing else there."""
    (out or sys.stdout).write(json.dumps(data, default=str) + "\n")


def emit(
    output: Output,
    result: Result,
    views: Sequence[RenderableType],
    *,
    code: int = 0,
    notes: Sequence[str] = (),
    loud: bool = False,
) -> int:
    """Print a command's result and return its exit code `code`.

    With --json the result's JSON object, else `views` on stdout, then `notes` (advice, as
    plain text) on stderr. --quiet prints nothing, except a result that needs a look
    (`code` not 0): on stderr, for cron's mail, unless stderr carries JSON log lines. A
    `loud` result is a listing the user asked for and prints on stdout even with --quiet.
    """
    if output.json:
        print_json(result.to_json())
        return code
    if loud or not output.quiet:
        console = stdout_console()
    elif code and not output.json_logs:
        console = stderr_console()
    else:
        return code
    for view in views:
        console.print(view)
    for note in notes:
        stderr_console().print(note, markup=False)
    return code


@contextlib.contextmanager
def json_on_failure(
    output: Output,
    failed: Callable[[Exception], dict[str, object]],
    errors: type[Exception] = Exception,
) -> Iterator[None]:
    """With --json, a block that raises one of `errors` still leaves one JSON object on
    stdout, `failed(exc)`; the error itself goes on to `fail`."""
    try:
        yield
    except errors as exc:
        if output.json:
            print_json(failed(exc))
        raise


def fail(exc: BalsyncError, output: Output) -> NoReturn:
    """End the command with one masked line on stderr and the error's exit code.

    The log file (cron's only witness) gets the failure too. stderr gets it once: as the
    log record where stderr carries JSON lines (a reader parses every line), else as text.
    """
    message = f"balsync: error: {exc.message}"
    if exc.hint:
        message += f" — {exc.hint}"
    message = mask_text(message)  # a library's text in it may quote a URL with its password
    if exc.__cause__ is not None and not isinstance(exc, ConfigError):
        log.debug("caused by", exc_info=exc.__cause__)
    log.error(
        "%s (exit %d)",
        message.removeprefix("balsync: "),
        exc.exit_code,
        extra={FILE_ONLY: not output.json_logs, EXIT_CODE: exc.exit_code},
    )
    if not output.json_logs:
        click.echo(message, err=True)
    sys.exit(exc.exit_code)
