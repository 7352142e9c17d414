"""`python -m bench`: options, then the benchmark or profile mode.

Servers: BALSYNC_BENCH_DATABASE_URL (an admin URL: the harness creates and drops a database
there) and BALSYNC_BENCH_REDIS_URL, or the options. Nothing is left behind on either server,
also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from balance_sync.settings import mask_url
from bench.harness import SCENARIOS, Config, run_bench
from bench.scratch import sigterm_as_interrupt

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
RESULTS = Path(__file__).resolve().parent / "results.md"


def parser() -> argparse.ArgumentParser:
    """The options of `python -m bench`."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure `balsync sync` against the floor of the job on N scratch keys.",
    )
    p.add_argument("--n", type=int, default=1_000_000, help="keys to seed (default 1000000)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement (default 3)")
    p.add_argument("--rss-5n", action="store_true", help="also run balsync at 5N for peak RSS")
    p.add_argument(
        "--naive-rows",
        type=int,
        default=10_000,
        help="rows the per-row loop runs on before extrapolating to N (default 10000)",
    )
    p.add_argument(
        "--no-incremental",
        action="store_true",
        help="skip the incremental-sync measurement (it seeds K keys of its own, first)",
    )
    p.add_argument(
        "--incremental-keys",
        type=int,
        metavar="K",
        help="keys synced before C of them change, for `sync --incremental` "
        "(default 5N: 5000000 at the default N)",
    )
    p.add_argument(
        "--incremental-changed",
        type=int,
        metavar="C",
        help="ids changed through balance_sync.writer among the K keys; also the keys of the "
        "full sync it is compared with (at most K; default N/100: 10000 at the default N)",
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("BALSYNC_BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="admin URL of the PostgreSQL server (env BALSYNC_BENCH_DATABASE_URL)",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("BALSYNC_BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help="Redis URL (env BALSYNC_BENCH_REDIS_URL)",
    )
    p.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="skip the CHECKPOINT before each timed run (faster, noisier)",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed for the 1 %% sample")
    p.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="markdown file to write (default bench/results.md); '-' writes none",
    )
    p.add_argument(
        "--profile",
        choices=list(SCENARIOS),
        metavar="SCENARIO",
        help=f"profile one in-process sync instead: {', '.join(SCENARIOS)}",
    )
    p.add_argument("--profiler", choices=["pyinstrument", "cprofile"], default="pyinstrument")
    return p


def main(argv: list[str] | None = None) -> None:
    """Run what the options ask; progress on stderr, the table on stdout."""
    args = parser().parse_args(argv)
    if args.n < 100 or args.repeat < 1 or args.naive_rows < 1:
        sys.exit("python -m bench: --n must be ≥ 100, --repeat and --naive-rows ≥ 1")
    keys, changed = args.incremental_keys, args.incremental_changed
    if (keys is not None and keys < 1) or (changed is not None and changed < 1):
        sys.exit("python -m bench: --incremental-keys and --incremental-changed must be ≥ 1")
    argv_text = shlex.join(sys.argv[1:] if argv is None else argv)
    config = Config(
        admin_url=args.database_url,
        redis_url=args.redis_url,
        n=args.n,
        repeat=args.repeat,
        rss_5n=args.rss_5n,
        naive_rows=args.naive_rows,
        seed=args.seed,
        checkpoint=not args.no_checkpoint,
        incremental=not args.no_incremental,
        incremental_keys=keys,
        incremental_changed=changed,
        results_path=None if str(args.results) == "-" else args.results,
        command=(
            f"python -m bench {argv_text}  (PostgreSQL {mask_url(args.database_url)}, "
            f"Redis {mask_url(args.redis_url)})"
        ),
    )

    def progress(line: str) -> None:
        print(f"bench: {line}", file=sys.stderr, flush=True)

    try:
        with sigterm_as_interrupt():
            if args.profile:
                from bench.profiling import profile_scenario

                print(profile_scenario(config, args.profile, args.profiler, progress=progress))
                return
            _, text = run_bench(config, progress)
    except KeyboardInterrupt:
        sys.exit("bench: interrupted; the scratch keys and database were removed")
    print(text)
    if config.results_path is not None:
        progress(f"written to {config.results_path}")
