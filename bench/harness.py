"""The measurements: balsync and its floor, side by side, scenario by scenario.

Each repeat of a scenario is a round: Redis is changed once, then balsync and every floor
script run in turn, each on a table of its own that held Redis's previous values, each after
the same VACUUM ANALYZE and CHECKPOINT. So all of them move exactly the same rows, and a noisy
minute on the shared machine falls on both sides instead of on one.

The incremental measurement (`sync --incremental` after C tracked changes among K keys,
against a full sync of C keys) runs first, on scratch prefixes and databases of its own that
are gone before the N keys are seeded, in the Redis server's emptiest database: a full sync
SCANs every key of its database, so its baseline must not wade through keys not its own.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import floor
from bench.process import (
    STARTUP_COMMAND,
    ProcessRun,
    run_incremental_sync,
    run_process,
    run_sync,
)
from bench.report import (
    TARGET_FEW_CHANGES_RATIO,
    TARGET_FLOOR_RATIO,
    TARGET_INCREMENTAL_RATIO,
    TARGET_NAIVE_RATIO,
    TARGET_RSS_GROWTH,
    TARGET_RSS_MB,
    Machine,
    Samples,
    code_version,
    ratio,
    verdict,
    write_results,
)
from bench.scratch import BALSYNC_TABLE, Scratch, balsync_env, emptiest_database

SCENARIOS: dict[str, str] = {
    "first": "first sync (empty table)",
    "all": "every value changed",
    "one-percent": "1 % changed",
    "none": "nothing changed",
}
CHANGED_SHARE = 0.01
WRITE_CONNECTIONS = (1, 2)
RSS_5N_SCENARIOS = ("first", "none")
BALSYNC = BALSYNC_TABLE
FLOOR_TABLES = ("batched", "streamed", "write_1", "write_2", "naive")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Config:
    """One benchmark run."""

    admin_url: str
    redis_url: str
    n: int = 1_000_000
    repeat: int = 3
    rss_5n: bool = False
    naive_rows: int = 10_000
    seed: int = 1
    results_path: Path | None = None
    command: str = "python -m bench"
    checkpoint: bool = True  # CHECKPOINT before each timed run (needs a superuser or pg_checkpoint)
    incremental: bool = True  # also measure `sync --incremental`
    incremental_keys: int | None = None  # K; None: 5N
    incremental_changed: int | None = None  # C; None: N/100

    def incremental_size(self) -> tuple[int, int]:
        """(K, C): the incremental measurement changes C ids among K keys.

        5N and N/100 unless set, so the default N gives the requirement's figure: 10 000
        changed among 5 000 000 keys.
        """
        keys = 5 * self.n if self.incremental_keys is None else self.incremental_keys
        changed = self.n // 100 if self.incremental_changed is None else self.incremental_changed
        return keys, max(1, min(changed, keys))


@dataclass
class ScenarioResult:
    """Everything measured for one scenario at N."""

    balsync: Samples = field(default_factory=Samples)  # process wall time
    balsync_inside: Samples = field(default_factory=Samples)  # its own duration_s
    cpu: Samples = field(default_factory=Samples)  # user + system CPU of the process
    rss_mb: Samples = field(default_factory=Samples)
    end_to_end: dict[floor.Strategy, Samples] = field(
        default_factory=lambda: {s: Samples() for s in floor.STRATEGIES}
    )
    write_only: dict[int, Samples] = field(
        default_factory=lambda: {c: Samples() for c in WRITE_CONNECTIONS}
    )
    naive: Samples = field(default_factory=Samples)  # seconds for naive_rows rows

    def best_floor(self) -> tuple[floor.Strategy, Samples]:
        """The faster end-to-end script by median: the floor balsync is held to."""
        return min(self.end_to_end.items(), key=lambda item: item[1].median)


@dataclass
class IncrementalResult:
    """`sync --incremental` after `changed` tracked changes among `keys` keys, against a full
    sync (`--force`) of a keyspace holding only `changed` keys, every value changed."""

    keys: int
    changed: int
    incremental: Samples = field(default_factory=Samples)  # process wall time
    incremental_inside: Samples = field(default_factory=Samples)  # its own duration_s
    full: Samples = field(default_factory=Samples)
    full_inside: Samples = field(default_factory=Samples)
    redis_url: str = ""  # the server's emptiest database, where both sides ran
    redis_db: int = 0
    redis_keys: int = 0  # keys in that whole database during the full sync: SCAN visits all
    scratches: list[tuple[str, str]] = field(default_factory=list)  # (prefix, db), gone after

    @property
    def ratio(self) -> float:
        """Incremental over full, by median: the requirement's figure."""
        return self.incremental.median / self.full.median


@dataclass
class Results:
    """The whole run."""

    config: Config
    machine: Machine
    startup: Samples = field(default_factory=Samples)
    read_only: Samples = field(default_factory=Samples)
    scenarios: dict[str, ScenarioResult] = field(
        default_factory=lambda: {name: ScenarioResult() for name in SCENARIOS}
    )
    rss_5n: dict[str, ProcessRun] = field(default_factory=dict)
    incremental: IncrementalResult | None = None
    anomalies: list[str] = field(default_factory=list)
    prefix: str = ""  # the scratch key prefix and database, gone when the run ends
    dbname: str = ""


class Bench:
    """Runs the measurements on one scratch prefix and database.

    A round is: bring every contestant's table to Redis's values (untimed; only after a
    contestant that leaves its table behind, such as the per-row loop), change Redis once
    for the scenario, then time each contestant on its own table, each after the same
    VACUUM and CHECKPOINT. One change of Redis serves every contestant, so all of them move
    exactly the same rows.
    """

    def __init__(self, config: Config, scratch: Scratch, progress: Progress) -> None:
        self.config = config
        self.scratch = scratch
        self.progress = progress
        scratch.can_checkpoint = config.checkpoint
        self.rng = random.Random(config.seed)
        self.env = balsync_env(scratch)
        redis_version, pg_version = scratch.server_versions()
        self.results = Results(config, Machine.here(redis_version, pg_version))
        self.results.prefix, self.results.dbname = scratch.prefix, scratch.dbname
        self.code_at_start = code_version()
        self.expected = {"inserted": 0, "updated": 0}
        self.tables = {name: scratch.floor_table(name) for name in FLOOR_TABLES}
        # Which tables hold every key's current value; none does before the first sync.
        self.synced: dict[str, bool] = {BALSYNC: False} | dict.fromkeys(self.tables.values(), False)

    # -- the state before a round -----------------------------------------------------

    def resync(self, table: str) -> None:
        """Bring one table to Redis's values (untimed), each with its own tool."""
        s = self.scratch
        if table == BALSYNC:
            run_sync(self.env)
        else:
            floor.end_to_end(s.redis_url, s.database_url, table, s.prefix, "streamed")
        self.synced[table] = True

    def start_round(self, scenario: str, tables: list[str]) -> None:
        """Every table of `tables` at the scenario's starting state; Redis changed once."""
        s = self.scratch
        if scenario == "first":
            if BALSYNC in tables:
                s.reset_balsync()
            for table in tables:
                if table != BALSYNC:
                    s.truncate(table)
                self.synced[table] = False
            self.expected = {"inserted": s.keys, "updated": 0}
            return
        for table in tables:
            if not self.synced[table]:
                self.resync(table)
        changed = 0
        if scenario == "all":
            s.change_all()
            changed = s.keys
        elif scenario == "one-percent":
            changed = s.change_share(CHANGED_SHARE, self.rng)
        if changed:
            self.synced = dict.fromkeys(self.synced, False)
        self.expected = {"inserted": 0, "updated": changed}

    def check(self, who: str, scenario: str, processed: int, inserted: int, updated: int) -> None:
        """Note a run that did not do the scenario's work (the figure would mean nothing)."""
        want = self.expected
        if processed < self.scratch.keys or (inserted, updated) != (
            want["inserted"],
            want["updated"],
        ):
            self.results.anomalies.append(
                f"{who} on {scenario}: processed {processed}, inserted {inserted}, updated "
                f"{updated}; expected {self.scratch.keys}, {want['inserted']}, {want['updated']}"
            )

    # -- timed runs, each on the round's state ------------------------------------------

    def balsync(self, scenario: str) -> ProcessRun:
        """One `balsync sync` process."""
        self.scratch.settle()
        run = run_sync(self.env)
        data = run.result()
        if data.get("status") != "success":
            self.results.anomalies.append(f"balsync on {scenario}: {run.stdout.strip()}")
        self.check(
            "balsync",
            scenario,
            int(data["processed"]),  # type: ignore[call-overload]
            int(data["inserted"]),  # type: ignore[call-overload]
            int(data["updated"]),  # type: ignore[call-overload]
        )
        self.synced[BALSYNC] = True
        return run

    def end_to_end(self, scenario: str, strategy: floor.Strategy) -> float:
        """One minimal end-to-end script; its seconds."""
        s, table = self.scratch, self.tables[strategy]
        s.settle()
        started = time.perf_counter()
        counts = floor.end_to_end(s.redis_url, s.database_url, table, s.prefix, strategy)
        elapsed = time.perf_counter() - started
        self.check(f"floor {strategy}", scenario, counts.rows, counts.inserted, counts.updated)
        self.synced[table] = True
        return elapsed

    def write_only(self, scenario: str, rows: list[floor.Batch], connections: int) -> float:
        """Only the COPY and merge of rows already in memory; its seconds."""
        s, table = self.scratch, self.tables[f"write_{connections}"]
        s.settle()
        started = time.perf_counter()
        counts = floor.write_only(s.database_url, table, rows, connections)
        elapsed = time.perf_counter() - started
        who = f"write-only x{connections}"
        self.check(who, scenario, counts.rows, counts.inserted, counts.updated)
        self.synced[table] = True
        return elapsed

    def naive(self, scenario: str) -> float:
        """The per-row loop on the first `naive_rows` keys; its seconds."""
        s, table = self.scratch, self.tables["naive"]
        keys = floor.first_keys(s.redis_url, s.prefix, min(self.config.naive_rows, s.keys))
        s.settle()
        started = time.perf_counter()
        floor.naive(s.redis_url, s.database_url, table, keys, s.prefix)
        elapsed = time.perf_counter() - started
        self.synced[table] = scenario == "none"
        return elapsed

    # -- incremental sync ---------------------------------------------------------------

    def expect(self, who: str, run: ProcessRun, want: tuple[int, int, int]) -> None:
        """Note a run that failed, or whose (processed, inserted, updated) is not `want`."""
        data = run.result()
        got = (
            int(data["processed"]),  # type: ignore[call-overload]
            int(data["inserted"]),  # type: ignore[call-overload]
            int(data["updated"]),  # type: ignore[call-overload]
        )
        if data.get("status") != "success" or got != want:
            self.results.anomalies.append(
                f"{who}: {run.stdout.strip()}; expected processed, inserted, updated {want}"
            )

    def timed_sync(self, scratch: Scratch, who: str, *, incremental: bool) -> ProcessRun:
        """One timed `balsync sync` on `scratch`, settled like every timed run; it must update
        exactly the C rows that changed."""
        _, changed = self.config.incremental_size()
        scratch.settle()
        env = balsync_env(scratch)
        run = run_incremental_sync(env) if incremental else run_sync(env)
        self.expect(who, run, (changed, 0, changed))
        return run

    def incremental(self) -> None:
        """C ids changed through `BalanceWriter` among K synced keys, then the timed
        `sync --incremental`; against a full sync of a keyspace of only C keys, every value
        changed, so both sides update the same number of rows. Each on a scratch of its
        own, gone when measured; the full sync's first, so that it SCANs none of the K keys.
        """
        config, say = self.config, self.progress
        keys, changed = config.incremental_size()
        redis_url, redis_db, _ = emptiest_database(config.redis_url)
        result = IncrementalResult(keys, changed, redis_url=redis_url, redis_db=redis_db)
        self.results.incremental = result
        rng = random.Random(config.seed)  # its own: the 1 % sample stays what --seed made it
        say(f"incremental sync: {changed} changed among {keys}, in Redis database {redis_db}")
        with Scratch(config.admin_url, redis_url) as small:
            small.can_checkpoint = config.checkpoint
            result.scratches.append((small.prefix, small.dbname))
            small.seed(changed)
            first = run_sync(balsync_env(small))
            self.expect(f"first sync of {changed} keys", first, (changed, changed, 0))
            result.redis_keys = int(small.client.dbsize())
            for i in range(config.repeat):
                small.change_all()
                run = self.timed_sync(small, f"full sync of {changed} keys", incremental=False)
                result.full.add(run.wall_s)
                result.full_inside.add(float(run.result()["duration_s"]))  # type: ignore[arg-type]
                say(f"[full sync of {changed} {i + 1}/{config.repeat}] {run.wall_s:.2f} s")
        with Scratch(config.admin_url, redis_url) as big:
            big.can_checkpoint = config.checkpoint
            result.scratches.append((big.prefix, big.dbname))
            say(f"seeding {keys} keys under {big.prefix} and syncing them (untimed)")
            big.seed(keys)
            first = run_sync(balsync_env(big))
            self.expect(f"first sync of {keys} keys", first, (keys, keys, 0))
            label = f"incremental, {changed} changed among {keys}"
            for i in range(config.repeat):
                big.change_tracked(changed, rng)
                run = self.timed_sync(big, label, incremental=True)
                result.incremental.add(run.wall_s)
                result.incremental_inside.add(float(run.result()["duration_s"]))  # type: ignore[arg-type]
                say(f"[{label} {i + 1}/{config.repeat}] {run.wall_s:.2f} s")

    # -- the plan -----------------------------------------------------------------------

    def round(self, scenario: str, label: str) -> None:
        """One repeat of a scenario: every contestant once."""
        result, say = self.results.scenarios[scenario], self.progress
        self.start_round(scenario, list(self.synced))
        run = self.balsync(scenario)
        result.balsync.add(run.wall_s)
        result.balsync_inside.add(float(run.result()["duration_s"]))  # type: ignore[arg-type]
        result.cpu.add(run.cpu_s)
        result.rss_mb.add(run.max_rss_mb)
        say(f"{label} balsync {run.wall_s:.2f} s, {run.max_rss_mb:.0f} MB")
        for strategy in floor.STRATEGIES:
            result.end_to_end[strategy].add(self.end_to_end(scenario, strategy))
            say(f"{label} floor {strategy} {result.end_to_end[strategy].values[-1]:.2f} s")
        rows = floor.read_all(self.scratch.redis_url, self.scratch.prefix)
        for connections in WRITE_CONNECTIONS:
            seconds = self.write_only(scenario, rows, connections)
            result.write_only[connections].add(seconds)
            say(f"{label} write-only x{connections} {seconds:.2f} s")
        del rows
        result.naive.add(self.naive(scenario))
        say(f"{label} naive {result.naive.values[-1]:.2f} s")

    def save(self) -> str:
        """Render the results so far, and write them to the results file when there is one."""
        text = render(self.results)
        config = self.config
        code = code_version()
        if code != self.code_at_start:
            code = f"{self.code_at_start} at the start, {code} at the end: the code changed mid-run"
        if config.results_path is not None:
            write_results(
                config.results_path, text, self.results.machine, config.n, config.command, code=code
            )
        return text

    def run(self) -> Results:
        """Seed, measure every scenario, and the 5N runs when asked."""
        config, r, say = self.config, self.results, self.progress
        if config.incremental:
            self.incremental()
        say(f"seeding {config.n} keys under {self.scratch.prefix}")
        self.scratch.seed(config.n)
        for i in range(config.repeat):
            r.startup.add(run_process(STARTUP_COMMAND, self.env).wall_s)
            started = time.perf_counter()
            floor.read_only(self.scratch.redis_url, self.scratch.prefix)
            r.read_only.add(time.perf_counter() - started)
            say(f"[read only {i + 1}/{config.repeat}] {r.read_only.values[-1]:.2f} s")
        for scenario in SCENARIOS:
            for i in range(config.repeat):
                self.round(scenario, f"[{scenario} {i + 1}/{config.repeat}]")
        if config.rss_5n:
            # The 5N runs take long: the figures at N are on disk before they start.
            self.save()
            say(f"seeding up to {5 * config.n} keys for the 5N runs")
            self.scratch.seed(5 * config.n)
            self.synced = dict.fromkeys(self.synced, False)
            for scenario in RSS_5N_SCENARIOS:
                self.start_round(scenario, [BALSYNC])
                run = self.balsync(scenario)
                r.rss_5n[scenario] = run
                say(f"[5N {scenario}] balsync {run.wall_s:.2f} s, {run.max_rss_mb:.0f} MB")
        return r


def run_bench(config: Config, progress: Progress = lambda line: None) -> tuple[Results, str]:
    """The whole benchmark on a scratch prefix and database that are gone afterwards.

    Returns the results and the markdown text; writes it to `config.results_path` too.
    """
    with Scratch(config.admin_url, config.redis_url) as scratch:
        bench = Bench(config, scratch, progress)
        results = bench.run()
        return results, bench.save()


# -- rendering ----------------------------------------------------------------------------


def _n(value: int) -> str:
    return f"{value:,}".replace(",", " ")


def render(r: Results) -> str:
    """The markdown: the comparison table, each side's floor, RSS, targets, details."""
    n, rows = r.config.n, r.config.naive_rows
    naive_rows = min(rows, n)
    out = [
        f"## Sync of {_n(n)} keys: balsync against the floor (median of {r.config.repeat}, "
        "min–max)",
        "",
        "| scenario | balsync median (min–max) | floor end-to-end | ratio balsync/floor "
        "| naive extrapolated | ratio naive/balsync |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in SCENARIOS.items():
        s = r.scenarios[name]
        strategy, best = s.best_floor()
        naive = s.naive.median * n / naive_rows
        out.append(
            f"| {label} | {s.balsync.show()} | {best.show()} {strategy} "
            f"| {ratio(s.balsync.median, best.median)} | {naive:.0f} s "
            f"| {ratio(naive, s.balsync.median)} |"
        )
    out += [
        "",
        "balsync: the CLI process `python -m balance_sync sync --force --json --quiet`, wall "
        "time from spawn to exit. Floor end-to-end: the faster of two minimal scripts "
        "(`bench/floor.py`), a reader thread → queue → 2 writer connections, 10 000-row "
        "batches, either merged per batch (batched) or streamed into one COPY per writer and "
        f"merged once (streamed). Naive: GET + upsert + COMMIT per row on {_n(naive_rows)} "
        f"rows, × {n / naive_rows:g}.",
        "",
        "### Each side alone",
        "",
        f"- read only (SCAN + MGET, MGET pipelined with the next SCAN, COUNT 1000): "
        f"{r.read_only.show()}",
        f"- balsync process start-up (`python -m balance_sync --version`): {r.startup.show()}",
        "- write only (rows in memory; per connection one COPY into a staging table, ANALYZE, "
        "`UPDATE … FROM … IS DISTINCT FROM`, insert of new ids):",
        "",
        "| scenario | 1 connection | 2 connections |",
        "|---|---|---|",
    ]
    for name, label in SCENARIOS.items():
        w = r.scenarios[name].write_only
        out.append(f"| {label} | {w[1].show()} | {w[2].show()} |")
    rss_n = max((max(s.rss_mb.values, default=0.0) for s in r.scenarios.values()), default=0.0)
    out += ["", "### Peak RSS of the balsync process (ru_maxrss from wait4)", ""]
    out += [
        f"- at N = {_n(n)}: {rss_n:.0f} MB at most; by scenario (median): "
        + ", ".join(f"{SCENARIOS[k]} {s.rss_mb.median:.0f} MB" for k, s in r.scenarios.items())
    ]
    growth: list[float] = []
    if r.rss_5n:
        for name, run in r.rss_5n.items():
            at_n = r.scenarios[name].rss_mb.median
            growth.append(run.max_rss_mb / at_n)
            out.append(
                f"- at 5N = {_n(5 * n)}, {SCENARIOS[name]}: {run.max_rss_mb:.0f} MB "
                f"({ratio(run.max_rss_mb, at_n)} of N) in {run.wall_s:.1f} s "
                f"({ratio(run.wall_s, r.scenarios[name].balsync.median)} of N's time)"
            )
    else:
        out.append(
            "- at 5N: still running"
            if r.config.rss_5n
            else "- at 5N: not measured (`--rss-5n`, or `make bench RSS5N=1`)"
        )
    out += _incremental(r)
    out += _targets(r, rss_n, growth)
    out += [
        "",
        "### Details (medians)",
        "",
        "| scenario | balsync duration_s (in-process) | balsync CPU user+sys | floor batched "
        f"| floor streamed | naive, {_n(naive_rows)} rows |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in SCENARIOS.items():
        s = r.scenarios[name]
        out.append(
            f"| {label} | {s.balsync_inside.show()} | {s.cpu.show()} "
            f"| {s.end_to_end['batched'].show()} | {s.end_to_end['streamed'].show()} "
            f"| {s.naive.show()} |"
        )
    if r.anomalies:
        out += ["", "### Anomalies: runs that did not do the scenario's work", ""]
        out += [f"- {line}" for line in r.anomalies]
    return "\n".join(out) + "\n"


def _incremental(r: Results) -> list[str]:
    out = ["", "### Incremental sync", ""]
    inc = r.incremental
    if inc is None:
        return [*out, "- incremental: not measured (`--no-incremental`)"]
    k, c = _n(inc.keys), _n(inc.changed)
    return [
        *out,
        f"- incremental: {c} changed among {k} keys: {inc.incremental.show()}; full sync of "
        f"{c} keys: {inc.full.show()}; ratio {ratio(inc.incremental.median, inc.full.median)}; "
        f"target ≤ {TARGET_INCREMENTAL_RATIO:g}×",
        "",
        f"Incremental: {k} keys (`--incremental-keys`, default 5N) synced once (untimed), then "
        f"{c} of them (`--incremental-changed`, default N/100; 10 000 among 5 000 000 at the "
        "default N, the requirement's figure) given new values through "
        "`balance_sync.writer.BalanceWriter` (SET and dirty mark in one script, pipelined), "
        "then the CLI process `python -m balance_sync sync --incremental --min-interval 0 "
        "--json --quiet` (`--min-interval 0`: the sync just before would make it skip; "
        f"`--force` would scan every key). Full sync of {c} keys: a prefix and database "
        "holding only those keys, synced once, then every value changed and `sync --force` as "
        f"above, so both sides update {c} rows. Both in Redis database {inc.redis_db}, the "
        "server's emptiest (a full sync SCANs every key of its database, not only its "
        f"prefix's); it held {_n(inc.redis_keys)} keys during the full sync"
        + (
            ", more than its own: their SCAN is in its time, so the ratio flatters "
            "the incremental side."
            if inc.redis_keys > inc.changed
            else "."
        )
        + " Wall time from spawn to exit, start-up included; in-process duration_s "
        f"{inc.incremental_inside.show()} and {inc.full_inside.show()}.",
    ]


def _targets(r: Results, rss_n: float, growth: list[float]) -> list[str]:
    out = ["", "### Targets", ""]
    for name, label in SCENARIOS.items():
        s = r.scenarios[name]
        _, best = s.best_floor()
        floor_ratio = s.balsync.median / best.median
        naive_ratio = s.naive.median * r.config.n / min(r.config.naive_rows, r.config.n)
        naive_ratio /= s.balsync.median
        bound = TARGET_FEW_CHANGES_RATIO if name in ("none", "one-percent") else TARGET_FLOOR_RATIO
        line = (
            f"- {label}: {floor_ratio:.2f}× the floor (≤ {bound}: "
            f"{verdict(floor_ratio <= bound)}), {naive_ratio:.0f}× faster than "
            f"naive (≥ {TARGET_NAIVE_RATIO:.0f}: {verdict(naive_ratio >= TARGET_NAIVE_RATIO)})"
        )
        if name in ("none", "one-percent"):
            read = s.balsync.median / r.read_only.median
            line += f", {read:.2f}× reading Redis alone"
        out.append(line)
    out.append(
        f"- peak RSS at N: {rss_n:.0f} MB "
        f"(≤ {TARGET_RSS_MB:.0f}: {verdict(rss_n <= TARGET_RSS_MB)})"
    )
    if r.incremental is not None:
        inc = r.incremental
        out.append(
            f"- incremental sync, {_n(inc.changed)} changed among {_n(inc.keys)} keys: "
            f"{inc.ratio:.2f}× a full sync of {_n(inc.changed)} keys (≤ "
            f"{TARGET_INCREMENTAL_RATIO:g}: {verdict(inc.ratio <= TARGET_INCREMENTAL_RATIO)})"
            + ("; its Redis database was not empty" if inc.redis_keys > inc.changed else "")
        )
    if growth:
        worst = max(growth)
        at_5n = max(run.max_rss_mb for run in r.rss_5n.values())
        out.append(
            f"- peak RSS at 5N: {at_5n:.0f} MB (≤ {TARGET_RSS_MB:.0f}: "
            f"{verdict(at_5n <= TARGET_RSS_MB)}), {worst:.2f}× N's at worst "
            f"(≤ {TARGET_RSS_GROWTH}: {verdict(worst <= TARGET_RSS_GROWTH + 1e-9)})"
        )
    if any(math.isnan(s.balsync.median) for s in r.scenarios.values()):
        out.append("- some scenario was not measured")
    return out
