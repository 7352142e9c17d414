"""Retention: `balsync prune`, pruning after a sync, and the records the guards keep.

A year of hourly runs, skipped records and conflicts is generated in SQL, then pruned to the
policy; what health, stats, `--min-interval`, the restart guard and the default views of
`skipped` and `conflicts` read must come through unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from balance_sync.ops import retention
from balance_sync.settings import DURATION_UNITS, TableName, duration_text, parse_duration
from balance_sync.stores.postgres import Database, Ledger, RedisTrust, TableLock
from tests.helpers import Balsync
from tests.support.metrics import Metrics

Conn = psycopg.Connection[tuple[object, ...]]
TABLE = TableName("user_balances")
HOURS = 365 * 24
BOOKKEEPING = ("sync_runs", "skipped_records", "conflicts", "run_batches", "restart_seen")
KEY = "public.user_balances"  # sync_runs.target_table: the table as the catalog names it
OFF = {"BALSYNC_KEEP_RUNS": "off", "BALSYNC_KEEP_SKIPPED": "off"}


def generate_year(pg: Conn, *, restart_days_ago: int | None = 200, every: int = 24) -> None:
    """A year of runs of user_balances every `every` hours, oldest first, and what hangs
    off them (hourly: 8760 runs, 18 690 skipped records, 426 conflicts).

    Every 50th run failed (and left its batch ledger); runs older than 100 days were partial
    with 3 skipped records each; every 24th run older than 150 days kept 2 conflicts. Runs
    trusted a Redis identity until `restart_days_ago`, and none since (held after a restart);
    None: they trusted none. An abandoned run 300 days old is still marked running, and
    balsync remembers 1000 written values.
    """
    trusted = 0 if restart_days_ago is None else restart_days_ago * 24
    pg.execute(
        """INSERT INTO balsync.sync_runs
               (target_table, key_prefix, started_at, finished_at, status, duration_s,
                processed, skipped, host, pid, version, redis_run_id)
           SELECT %(key)s, 'balance:', now() - make_interval(hours => h),
                  now() - make_interval(hours => h) + interval '2 seconds',
                  CASE WHEN h %% 50 = 0 THEN 'failed' WHEN h > 2400 THEN 'partial'
                       ELSE 'success' END,
                  2.0, 10, CASE WHEN h > 2400 THEN 3 ELSE 0 END, 'generated', 1, 'test',
                  CASE WHEN h %% 50 <> 0 AND h > %(trusted)s AND %(trusted)s > 0
                       THEN 'trusted-redis' END
           FROM generate_series(%(hours)s, 1, -%(every)s) AS h""",
        {"hours": HOURS, "trusted": trusted, "every": every, "key": KEY},
    )
    pg.execute(
        """INSERT INTO balsync.skipped_records (run_id, key, raw_value, reason, recorded_at)
           SELECT r.id, 'balance:bad' || k, 'x', 'not a number', r.started_at + interval '1s'
           FROM balsync.sync_runs r, generate_series(1, 3) AS k WHERE r.status = 'partial'"""
    )
    pg.execute(
        """INSERT INTO balsync.conflicts
               (run_id, telegram_id, db_value, redis_value, last_written, kind, resolution,
                recorded_at)
           SELECT r.id, k, 5, 6, 4, 'changed_in_db', 'kept', r.started_at + interval '1s'
           FROM balsync.sync_runs r, generate_series(1, 2) AS k
           WHERE r.status <> 'failed' AND r.id % 24 = 0
             AND r.started_at < now() - interval '150 days'"""
    )
    pg.execute(
        """INSERT INTO balsync.run_batches (run_id, batch_no, inserted, updated, unknown)
           SELECT id, 1, 0, 0, 0 FROM balsync.sync_runs WHERE status = 'failed'"""
    )
    pg.execute(
        """INSERT INTO balsync.restart_seen (run_id, telegram_id)
           SELECT id, k FROM balsync.sync_runs, generate_series(1, 2) AS k
           WHERE status = 'failed'"""
    )
    pg.execute(
        """INSERT INTO balsync.sync_runs
               (target_table, key_prefix, started_at, status, host, pid, version)
           VALUES (%s, 'balance:', now() - interval '300 days', 'running', 'gone', 2, 'test')""",
        (KEY,),
    )
    pg.execute(
        """INSERT INTO balsync.written (target_id, telegram_id, balance)
           SELECT balsync.target_id(%s, NULL), i, i FROM generate_series(1, 1000) AS i""",
        (KEY,),
    )
    if restart_days_ago is not None:
        pg.execute(
            "INSERT INTO balsync.redis_trust (target_table, redis_id, reason) VALUES (%s, %s, %s)",
            (KEY, "trusted-redis", "generated"),
        )


def counts(pg: Conn) -> dict[str, int]:
    """Rows of each pruned table, and of balsync.written."""
    found = {}
    for name in (*BOOKKEEPING, "written"):
        row = pg.execute(f"SELECT count(*) FROM balsync.{name}").fetchone()
        assert row is not None
        found[name] = int(row[0])  # type: ignore[call-overload]
    return found


@dataclass(frozen=True)
class Guards:
    """What the guards and the operator views read from balsync's records."""

    last_success: int | None
    trusted_redis: str | None
    running: int | None
    conflicts: tuple[int | None, list[object]]
    skipped_run: int | None
    skipped: tuple[int, list[object]]
    newest_runs: list[tuple[int, str]]


def guards(database_url: str) -> Guards:
    """Read them the way health, stats, status, sync, `skipped` and `conflicts` do."""
    db = Database(database_url, 5)
    runs = Ledger(db)
    try:
        last = runs.last_success(TABLE)
        running = runs.running_run(TABLE)
        skipped_run = runs.newest_skipping_run(TABLE)
        return Guards(
            last_success=None if last is None else last.id,
            trusted_redis=(
                trust.redis_id if (trust := RedisTrust(db).trusted_redis(TABLE)) else None
            ),
            running=None if running is None else running.id,
            conflicts=runs.conflicts(TABLE, None, 1000),  # type: ignore[arg-type]
            skipped_run=skipped_run,
            skipped=runs.skipped_records(skipped_run, 1000) if skipped_run else (0, []),  # type: ignore[arg-type]
            newest_runs=[(run.id, run.status) for run in runs.recent_runs(TABLE, 10)],
        )
    finally:
        db.close()


def prune_json(balsync: Balsync, *args: str) -> dict[str, Any]:
    """`balsync prune --json`, insisting on exit 0."""
    return json.loads(balsync.ok("prune", "--json", *args).stdout)  # type: ignore[no-any-return]


def oldest(pg: Conn, query: str) -> float:
    """The age in days of the oldest row a query over balsync's tables returns (0: none)."""
    row = pg.execute(
        "SELECT coalesce(extract(epoch FROM now() - min(t))::float8 / 86400, 0)"
        f" FROM ({query}) AS q(t)"
    ).fetchone()
    assert row is not None
    return float(row[0])  # type: ignore[arg-type]


# -- a year of records, pruned to the policy -------------------------------------------------


def test_a_year_is_pruned_to_the_policy_and_what_the_guards_read_survives(
    initialized: Balsync, pg: Conn, database_url: str
) -> None:
    """90 days of runs and 30 of records are left, besides the kept runs; the guards agree."""
    generate_year(pg, every=1)
    before, seen = counts(pg), guards(database_url)
    assert seen.trusted_redis == "trusted-redis"
    data = prune_json(initialized)
    assert data["status"] == "success"
    assert data["complete"] is True
    assert (data["keep_runs"], data["keep_skipped"]) == ("90d", "30d")
    assert data["found"] == data["deleted"]
    after = counts(pg)
    assert data["deleted"] == {name: before[name] - after[name] for name in BOOKKEEPING}
    assert after["written"] == before["written"] == 1000
    assert guards(database_url) == seen
    kept = pg.execute(
        """SELECT id FROM balsync.sync_runs WHERE started_at < now() - interval '90 days'"""
    ).fetchall()
    # running, newest partial (= newest with skipped records), newest with conflicts, the
    # run that recorded the trusted Redis; the newest failed and success are recent.
    assert len(kept) == data["kept_runs"] - 2 == 4
    younger = pg.execute(
        "SELECT count(*) FROM balsync.sync_runs WHERE started_at >= now() - interval '90 days'"
    ).fetchone()
    assert younger == (90 * 24 - 1,)  # the run of exactly 90 days ago is older by now
    kept_ids = [row[0] for row in kept]
    for child in ("skipped_records", "conflicts"):
        stale = pg.execute(
            f"""SELECT count(*) FROM balsync.{child}
                WHERE recorded_at < now() - interval '30 days'
                  AND NOT run_id = ANY(%s)""",
            (kept_ids,),
        ).fetchone()
        assert stale == (0,), child
    # The kept runs older than 30 days keep theirs: the newest skipping run (as `skipped`
    # shows it), the newest conflicting one (as `conflicts` shows it), the trusted one.
    assert after["skipped_records"] == 3 * 3
    assert after["conflicts"] == 2 * 2


def test_a_run_another_table_refers_to_is_kept(initialized: Balsync, pg: Conn) -> None:
    """A table that refers to an old run by a foreign key, even one that cascades, keeps
    that run: prune never deletes into a table it does not know."""
    generate_year(pg)
    pg.execute(
        """CREATE TABLE balsync.evidence (
               target_table text PRIMARY KEY,
               run_id bigint REFERENCES balsync.sync_runs (id) ON DELETE CASCADE,
               note text NOT NULL)"""
    )
    pg.execute(
        """INSERT INTO balsync.evidence
           SELECT target_table, min(id), 'kept' FROM balsync.sync_runs GROUP BY target_table"""
    )
    prune_json(initialized)
    row = pg.execute(
        """SELECT t.note, r.started_at < now() - interval '364 days'
           FROM balsync.evidence t JOIN balsync.sync_runs r ON r.id = t.run_id"""
    ).fetchone()
    assert row == ("kept", True)


def test_a_second_prune_deletes_nothing(initialized: Balsync, pg: Conn) -> None:
    """Pruned once, the records are at the policy: a second prune finds and deletes nothing."""
    generate_year(pg)
    prune_json(initialized)
    again = prune_json(initialized)
    zeros = dict.fromkeys(BOOKKEEPING, 0)
    assert (again["found"], again["deleted"]) == (zeros, zeros)


def test_dry_run_counts_what_prune_would_delete_and_deletes_nothing(
    initialized: Balsync, pg: Conn
) -> None:
    """--dry-run reports per table what the real prune then deletes, and changes nothing."""
    generate_year(pg)
    before = counts(pg)
    dry = prune_json(initialized, "--dry-run")
    assert dry["dry_run"] is True
    assert dry["deleted"] == dict.fromkeys(BOOKKEEPING, 0)
    assert counts(pg) == before
    real = prune_json(initialized)
    assert real["deleted"] == dry["found"]
    assert all(isinstance(n, int) and n > 0 for n in dry["found"].values())


def test_older_than_replaces_the_policy(initialized: Balsync, pg: Conn) -> None:
    """--older-than 7d prunes runs and records older than a week, whatever --keep-* say."""
    generate_year(pg)
    initialized.ok("prune", "--older-than", "7d", env={"BALSYNC_KEEP_RUNS": "off"})
    assert oldest(pg, "SELECT started_at FROM balsync.sync_runs WHERE status = 'success'") < 7.1


def test_retention_off_prunes_nothing(initialized: Balsync, pg: Conn) -> None:
    """--keep-runs off --keep-skipped off: prune and sync keep everything."""
    generate_year(pg, restart_days_ago=None)
    before = counts(pg)
    data = prune_json(initialized, "--keep-runs", "off", "--keep-skipped", "off")
    assert data["found"] is None
    assert (data["keep_runs"], data["keep_skipped"]) == (None, None)
    assert "everything is kept" in initialized.ok("prune", env=OFF).stdout
    initialized.ok("sync", env={"BALSYNC_KEEP_RUNS": "0", "BALSYNC_KEEP_SKIPPED": "off"})
    assert {k: v for k, v in counts(pg).items() if k != "sync_runs"} == {
        k: v for k, v in before.items() if k != "sync_runs"
    }
    assert counts(pg)["sync_runs"] == before["sync_runs"] + 1


def test_only_records_pruned_when_runs_are_kept_for_ever(initialized: Balsync, pg: Conn) -> None:
    """--keep-runs off --keep-skipped 30d: every run stays, old records go."""
    generate_year(pg)
    before = counts(pg)
    data = prune_json(initialized, "--keep-runs", "off")
    assert data["deleted"]["sync_runs"] == 0
    assert counts(pg)["sync_runs"] == before["sync_runs"]
    assert counts(pg)["skipped_records"] == 3 * 3  # those of the kept runs


def test_prune_skips_when_another_run_holds_the_lock(
    initialized: Balsync, pg: Conn, database_url: str
) -> None:
    """Like other writers, prune takes the table's lock; held elsewhere: exit 0, skipped."""
    generate_year(pg)
    before = counts(pg)
    other_run = Database(database_url, 5)
    try:
        assert TableLock(other_run).try_lock(TABLE, 0)
        data = prune_json(initialized)
        human = initialized.ok("prune")
    finally:
        other_run.close()
    assert data["status"] == "skipped"
    assert "skipped" in human.stdout
    assert counts(pg) == before


def test_human_output_lists_each_table(initialized: Balsync, pg: Conn) -> None:
    """Without --json: the policy, and what was found and deleted per table."""
    generate_year(pg)
    result = initialized.ok("prune")
    for name in BOOKKEEPING:
        assert f"balsync.{name}" in result.stdout
    assert "90d" in result.stdout


def test_runs_of_a_table_that_no_longer_exists_are_pruned(initialized: Balsync, pg: Conn) -> None:
    """`prune --table NAME` prunes the records of a dropped table: no lock is needed there."""
    generate_year(pg)
    pg.execute("UPDATE balsync.sync_runs SET target_table = 'dropped'")
    assert prune_json(initialized)["deleted"] == dict.fromkeys(BOOKKEEPING, 0)
    data = prune_json(initialized, "--table", "dropped")
    assert data["deleted"]["sync_runs"] > 250


def test_prune_before_init_db_exits_5(balsync: Balsync) -> None:
    """No schema: one line saying to run init-db."""
    result = balsync("prune")
    assert result.exit_code == 5
    assert "init-db" in result.stderr


# -- after a sync ---------------------------------------------------------------------------------


def test_a_sync_prunes_and_health_stats_and_min_interval_still_work(
    initialized: Balsync, pg: Conn, rds: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    """A successful sync prunes a year to the policy (log and metrics say how much); then
    health is healthy, stats lists the runs, and a sync within --min-interval is skipped."""
    generate_year(pg, restart_days_ago=None, every=1)
    rds.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "2.50"})
    before = counts(pg)
    metrics_file = tmp_path / "balsync.prom"
    # The generated memory predates any trusted Redis: the operator vouches for this one.
    result = initialized.ok(
        "sync", "-v", "--accept-redis-restart", "--metrics-file", str(metrics_file)
    )
    assert "pruned" in result.stderr
    after = counts(pg)
    assert after["sync_runs"] < before["sync_runs"] - 6000
    assert after["skipped_records"] == 2 * 3  # the newest skipping and conflicting runs'
    metrics = Metrics(metrics_file)
    for name in BOOKKEEPING:
        assert metrics("balsync_last_run_pruned_rows", bookkeeping=name) == (
            before[name] - after[name] + (1 if name == "sync_runs" else 0)
        )
    health = initialized("health", "--json")
    checks = {c["name"]: c for c in json.loads(health.stdout)["checks"]}
    # The shared Redis keeps nothing on disk: the only failing check.
    assert {n for n, c in checks.items() if not c["ok"]} == {"persistence"}, health.stdout
    assert "retention: runs 90d" in checks["bookkeeping"]["detail"]
    stats = json.loads(initialized.ok("stats", "--json").stdout)
    assert stats["last_run"]["status"] == "success"
    names = {t["name"] for t in stats["bookkeeping"]["tables"]}
    assert {*BOOKKEEPING, "written"} <= names
    assert stats["bookkeeping"]["bytes"] > 0
    assert stats["bookkeeping"]["warning"] is None
    skipped = json.loads(initialized.ok("sync", "--json").stdout)
    assert skipped["status"] == "skipped"


def test_pruning_after_a_sync_stops_when_its_time_is_up(
    initialized: Balsync, pg: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of time, a sync leaves the rest for the next run and still exits 0."""
    generate_year(pg, restart_days_ago=None)
    before = counts(pg)
    monkeypatch.setattr(retention, "AFTER_SYNC_SECONDS", 0.0)
    result = initialized.ok("sync", "-v")
    assert "more is left for the next run" in result.stderr
    assert counts(pg)["skipped_records"] == before["skipped_records"]
    monkeypatch.setattr(retention, "AFTER_SYNC_SECONDS", 60.0)
    initialized.ok("sync", "--force")
    assert counts(pg)["skipped_records"] == 2 * 3  # the newest skipping and conflicting runs'


@pytest.fixture
def failing_delete(pg: Conn) -> None:
    """PostgreSQL refuses every DELETE on balsync.conflicts (a trigger that raises)."""
    pg.execute(
        """CREATE FUNCTION balsync.refuse() RETURNS trigger LANGUAGE plpgsql AS
           $$BEGIN RAISE EXCEPTION 'deletes refused'; END$$"""
    )
    pg.execute(
        """CREATE TRIGGER refuse BEFORE DELETE ON balsync.conflicts
           FOR EACH STATEMENT EXECUTE FUNCTION balsync.refuse()"""
    )


def test_a_failing_prune_does_not_fail_the_sync(
    initialized: Balsync, pg: Conn, rds: redis.Redis, key_prefix: str, failing_delete: None
) -> None:
    """Pruning that fails after a successful sync is a warning; the sync's exit code stays."""
    generate_year(pg)
    rds.set(f"{key_prefix}1", "10.00")
    result = initialized("sync", "--json", "--accept-redis-restart")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "success"
    assert "pruning balsync's records failed" in result.stderr
    assert pg.execute("SELECT count(*) FROM user_balances").fetchone() == (1,)


def test_a_failing_prune_command_exits_5(
    initialized: Balsync, pg: Conn, failing_delete: None
) -> None:
    """The command itself reports the failure: one line, exit 5."""
    generate_year(pg)
    result = initialized("prune")
    assert result.exit_code == 5
    assert "deletes refused" in result.stderr


def test_without_the_indexes_of_init_db_nothing_is_pruned(
    initialized: Balsync, pg: Conn, rds: redis.Redis, key_prefix: str
) -> None:
    """Before `init-db` adds its indexes, prune says to run it and a sync only warns."""
    generate_year(pg)
    pg.execute("DROP INDEX balsync.conflicts_recorded")
    before = counts(pg)
    result = initialized("prune")
    assert result.exit_code == 5
    assert "balsync init-db" in result.stderr
    rds.set(f"{key_prefix}1", "10.00")
    synced = initialized("sync", "--accept-redis-restart")
    assert synced.exit_code == 0, synced.stderr
    assert "pruning waits" in synced.stderr
    assert counts(pg)["skipped_records"] == before["skipped_records"]
    initialized.ok("init-db")
    assert prune_json(initialized)["deleted"]["skipped_records"] > 0


# -- health and stats show the size -------------------------------------------------------------


def test_health_and_stats_warn_when_retention_is_off_and_tables_are_large(
    initialized: Balsync, rds: redis.Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention off and past the size limit: health is degraded, stats says so too."""
    rds.set(f"{key_prefix}1", "1.00")
    initialized.ok("sync")
    monkeypatch.setattr(retention, "LARGE_BYTES", 0)
    health = initialized("health", "--json", env=OFF)
    assert health.exit_code == 1
    check = {c["name"]: c for c in json.loads(health.stdout)["checks"]}["bookkeeping"]
    assert not check["ok"]
    assert "retention is off" in check["detail"]
    stats = json.loads(initialized.ok("stats", "--json", env=OFF).stdout)
    assert "balsync prune" in stats["bookkeeping"]["warning"]
    human = initialized.ok("stats", env=OFF)
    assert "balsync.sync_runs" in human.stdout
    assert "retention is off" in human.stdout
    # With the default policy: no warning.
    default = json.loads(initialized("health", "--json").stdout)
    assert {c["name"]: c for c in default["checks"]}["bookkeeping"]["ok"]


# -- durations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45s", 45), ("30m", 1800), ("12h", 43200), ("90d", 7776000), ("2w", 1209600)],
)
def test_durations_have_a_unit(text: str, seconds: float) -> None:
    """s, m, h, d and w; the canonical text comes back in the largest unit."""
    assert parse_duration(text) == seconds
    assert parse_duration(duration_text(seconds)) == seconds


@given(st.integers(1, 99_999), st.sampled_from(sorted(DURATION_UNITS)))
def test_any_whole_number_with_a_unit_parses_and_prints_back(number: int, unit: str) -> None:
    """N<unit> is N times the unit; its canonical text parses to the same seconds."""
    seconds = parse_duration(f"{number}{unit}")
    assert seconds == number * DURATION_UNITS[unit]
    assert parse_duration(duration_text(seconds)) == seconds


@given(st.text(max_size=8))
def test_anything_else_is_refused(text: str) -> None:
    """Text that is not digits then one unit letter raises ValueError, never parses."""
    body, unit = text[:-1], text[-1:]
    if body.isascii() and body.isdigit() and not body.startswith("0") and unit in DURATION_UNITS:
        return
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["90", "1.5d", "-3d", "0d", "3x", "d", " 9d", "9 d", "9D"])
def test_bad_older_than_is_a_usage_error(balsync: Balsync, text: str) -> None:
    """Anything but a whole number and a unit: click's usage error, exit 2."""
    result = balsync("prune", "--older-than", text)
    assert result.exit_code == 2
    assert "invalid duration" in result.stderr


@pytest.mark.parametrize(
    ("settings_env", "words"),
    [
        ({"BALSYNC_KEEP_RUNS": "forever"}, "invalid duration"),
        ({"BALSYNC_KEEP_SKIPPED": "90"}, "invalid duration"),
        ({"BALSYNC_KEEP_SKIPPED": "120d"}, "longer than --keep-runs 90d"),
        ({"BALSYNC_KEEP_SKIPPED": "off"}, "--keep-skipped off is longer"),
    ],
)
def test_bad_retention_setting_exits_2_with_one_line(
    balsync: Balsync, settings_env: dict[str, str], words: str
) -> None:
    """A malformed period, or records kept longer than their runs: exit 2, one line."""
    result = balsync("prune", env=settings_env)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("balsync: error:")
    assert words in lines[0]
