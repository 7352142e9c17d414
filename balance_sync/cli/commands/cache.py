"""clear-cache and restore: free Redis of persisted balances, and put them back."""

from __future__ import annotations

import sys

import click

from balance_sync.cli.options import KEYS, POSTGRES, REDIS, TARGET, VALUES, command
from balance_sync.cli.output import Output, emit
from balance_sync.cli.render.cache import clear_cache_view, restore_views
from balance_sync.errors import ConfigError
from balance_sync.ops.clear_cache import READ_THROUGH, ClearOptions, ClearResult, clear_cache
from balance_sync.ops.restore import RestoreOptions, parse_ids, run_restore
from balance_sync.settings import Settings


def stdin_is_terminal() -> bool:
    """Whether a person can answer a prompt on stdin (tests stand in for one)."""
    return sys.stdin.isatty()


@click.command("clear-cache")
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
    return emit(output, result, [clear_cache_view(result, str(settings.table))])


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


@click.command("restore")
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
    return emit(output, result, restore_views(result, str(settings.table)), code=code)
