"""init-db and schedule: what an operator runs to set balsync up."""

from __future__ import annotations

import logging
import os
import sys

import click

from balance_sync.cli.options import COLUMNS, POSTGRES, command
from balance_sync.cli.output import Output, emit
from balance_sync.cli.render.setup import init_db_views, schedule_notes, schedule_views
from balance_sync.errors import ConfigError
from balance_sync.monitoring.logs import LOGGER
from balance_sync.ops.init_db import init_db
from balance_sync.ops.schedule import Crontab, ScheduleAction, change_schedule
from balance_sync.settings import Settings

log = logging.getLogger(LOGGER)


@click.command("init-db")
@command(POSTGRES, COLUMNS)
def init_db_command(*, settings: Settings, output: Output) -> int:
    """Create the target table (default one only) and balsync's own schema.

    Idempotent: running it again changes nothing. An existing application table given
    with --table is left alone; only the `balsync` schema is created.

    \b
    Example:
      BALSYNC_DATABASE_URL=postgresql://balsync@db/app balsync init-db
    """
    result = init_db(settings)
    return emit(output, result, init_db_views(result))


@click.command("schedule")
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
    action: ScheduleAction = "install" if install else "uninstall" if uninstall else "print"
    crontab = Crontab.from_environ(os.environ)
    change = change_schedule(crontab, action, sys.argv[0], settings.log_file)
    for line in change.unmanaged:
        log.warning(
            "the crontab also starts balsync outside the managed block, so runs double: "
            "%s (remove it with crontab -e)",
            line,
        )
    return emit(output, change, schedule_views(change), notes=schedule_notes(change))
