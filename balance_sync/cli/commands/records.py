"""skipped, conflicts and prune: the records balsync keeps of its runs."""

from __future__ import annotations

import click

from balance_sync.cli.options import KEYS, POSTGRES, RETENTION, Duration, command
from balance_sync.cli.output import Output, emit
from balance_sync.cli.render.records import conflicts_views, prune_tables, skipped_views
from balance_sync.ops.conflicts import DEFAULT_LIMIT as CONFLICTS_LIMIT
from balance_sync.ops.conflicts import list_conflicts
from balance_sync.ops.retention import PruneOptions, run_prune
from balance_sync.ops.skipped import DEFAULT_LIMIT as SKIPPED_LIMIT
from balance_sync.ops.skipped import list_skipped
from balance_sync.settings import Settings


@click.command("skipped")
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
    return emit(output, listing, skipped_views(listing, str(settings.table)))


@click.command("conflicts")
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
    default=CONFLICTS_LIMIT,
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
    listing = list_conflicts(settings, run_id, limit)
    # Found conflicts print even with --quiet: the listing is what was asked for.
    views = conflicts_views(listing, settings.key_prefix)
    return emit(output, listing, views, loud=bool(listing.conflicts))


@click.command("prune")
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
    return emit(output, result, prune_tables(result))
