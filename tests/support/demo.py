"""The demo's data: seed balances into Redis, then show what reached PostgreSQL.

    python -m tests.support.demo seed [N]   # N valid balances (default 100 000), a few bad records
    python -m tests.support.demo show       # what PostgreSQL holds now

Reads BALSYNC_REDIS_URL, BALSYNC_DATABASE_URL and BALSYNC_KEY_PREFIX like balsync does.
"""

from __future__ import annotations

import os
import random
import sys

import psycopg
import redis
from rich.console import Console
from rich.table import Table

BAD_RECORDS = {
    "007": "10.00",  # leading zero: not a telegram id
    "abc": "5.00",  # not a number at all
    "1000001": "1e5",  # exponent
    "1000002": "12.345",  # more than two decimals: never rounded, skipped
    "1000003": "NaN",
    "1000004": "-20.00",  # negative without --allow-negative
}


def seed(count: int) -> None:
    """Write `count` random balances and the bad records above under the prefix."""
    prefix = os.environ.get("BALSYNC_KEY_PREFIX", "balance:")
    client = redis.Redis.from_url(os.environ["BALSYNC_REDIS_URL"])
    rng = random.Random(42)
    pipe = client.pipeline(transaction=False)
    for telegram_id in range(1, count + 1):
        cents = rng.randrange(0, 10_000_000)
        pipe.set(f"{prefix}{telegram_id}", f"{cents // 100}.{cents % 100:02d}")
        if telegram_id % 10_000 == 0:
            pipe.execute()
    for suffix, value in BAD_RECORDS.items():
        pipe.set(f"{prefix}{suffix}", value)
    pipe.hset(f"{prefix}1000005", mapping={"balance": "3.00"})  # a hash, not a string
    pipe.execute()
    print(f"seeded {count:,} balances and {len(BAD_RECORDS) + 1} bad records under {prefix!r}")


def show() -> None:
    """Print the row count, the sum, a few rows and the skipped records of the last run."""
    console = Console()
    with psycopg.connect(os.environ["BALSYNC_DATABASE_URL"]) as conn:
        rows, total = conn.execute(
            "SELECT count(*), sum(balance) FROM user_balances"
        ).fetchone() or (0, 0)
        console.print(f"PostgreSQL holds {rows:,} balances summing to {total:,}")
        table = Table("telegram_id", "balance", "updated_at", title="a few rows")
        first = "SELECT telegram_id, balance, updated_at FROM user_balances ORDER BY 1 LIMIT 5"
        for row in conn.execute(first):
            table.add_row(*(str(v) for v in row))
        console.print(table)
        skipped = Table("key", "raw value", "reason", title="skipped by the last run")
        for row in conn.execute(
            """SELECT key, coalesce(raw_value, ''), reason FROM balsync.skipped_records
               WHERE run_id = (SELECT max(id) FROM balsync.sync_runs) ORDER BY id"""
        ):
            skipped.add_row(*(str(v) for v in row))
        console.print(skipped)


def main(argv: list[str]) -> int:
    """`seed [N]` or `show`."""
    if argv[:1] == ["seed"]:
        seed(int(argv[1]) if len(argv) > 1 else 100_000)
        return 0
    if argv == ["show"]:
        show()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
