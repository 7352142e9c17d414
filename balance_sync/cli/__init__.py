"""The command line: parse options, resolve settings, call the core once, emit the result.

Every failure of the core arrives here as a BalsyncError and leaves as one line on stderr and
SPEC's exit code; tracebacks go to the log. The shared options are in `options`, the one way
to speak in `output`, the commands in `commands/` and their rich views in `render/`.
"""

from __future__ import annotations

import click

from balance_sync import __version__
from balance_sync.cli.commands import cache, records, setup, sync, views


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


cli.add_command(setup.init_db_command)
cli.add_command(sync.sync)
cli.add_command(records.conflicts)
cli.add_command(views.verify)
cli.add_command(cache.clear_cache_command)
cli.add_command(cache.restore)
cli.add_command(records.skipped)
cli.add_command(records.prune)
cli.add_command(views.health)
cli.add_command(views.stats)
cli.add_command(views.status)
cli.add_command(setup.schedule)


def main() -> None:
    """The console script."""
    cli(prog_name="balsync")
