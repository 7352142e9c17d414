"""verify, health, stats and status: what an operator looks at; they change nothing."""

from __future__ import annotations

import os

import click

from balance_sync.cli.options import (
    KEYS,
    POSTGRES,
    REDIS,
    RETENTION,
    TARGET,
    VALUES,
    command,
    tuned,
)
from balance_sync.cli.output import Output, emit, json_on_failure
from balance_sync.cli.render.views import health_table, stats_views, status_table, verify_tables
from balance_sync.errors import BalsyncError
from balance_sync.ops.health import DEFAULT_MAX_AGE, check_health
from balance_sync.ops.schedule import Crontab
from balance_sync.ops.stats import DEFAULT_RUNS, collect_stats
from balance_sync.ops.status import collect_status
from balance_sync.ops.systemd import Systemctl
from balance_sync.ops.verify import DEFAULT_LIMIT, VerifyOptions, failed_json, run_verify
from balance_sync.settings import Settings


@click.command("verify")
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
    with json_on_failure(output, lambda _exc: failed_json(), BalsyncError):
        result = run_verify(settings, VerifyOptions(limit=limit, allow_negative=allow_negative))
    code = 0 if result.status == "in_sync" else 1
    return emit(output, result, verify_tables(result, str(settings.table)), code=code)


@click.command("health")
@tuned(
    "--max-age",
    type=click.FloatRange(min=0),
    default=DEFAULT_MAX_AGE,
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
    return emit(output, report, [health_table(report)], code=report.exit_code)


@click.command("stats")
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
    return emit(output, report, stats_views(report))


@click.command("status")
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
    return emit(output, report, [status_table(report)])
