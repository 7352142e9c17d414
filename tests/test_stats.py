"""`balsync stats`: run history, 24 h figures and live figures of both stores."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import cast

import psycopg
import pytest
import redis

from tests.helpers import Balsync
from tests.support.devservers import free_port

Conn = psycopg.Connection[tuple[object, ...]]


def add_run(pg: Conn, status: str, duration_s: float, started_ago: str = "1 hour") -> int:
    """A finished run record made by hand, started `started_ago` (an interval) before now."""
    row = pg.execute(
        """INSERT INTO balsync.sync_runs
               (target_table, key_prefix, started_at, finished_at, status, duration_s,
                processed, inserted, updated, skipped, host, pid, version)
           VALUES ('public.user_balances', 'balance:', now() - %s::interval,
                   now() - %s::interval + make_interval(secs => %s), %s, %s,
                   7, 3, 2, 1, 'elsewhere', 99, 'test')
           RETURNING id""",
        (started_ago, started_ago, duration_s, status, duration_s),
    ).fetchone()
    assert row is not None
    return int(cast(int, row[0]))  # sync_runs.id: a bigint


def stats_json(balsync: Balsync, *args: str) -> dict[str, object]:
    """Run `balsync stats --json`, insisting on exit 0."""
    return json.loads(balsync.ok("stats", "--json", *args).stdout)  # type: ignore[no-any-return]


def test_json_has_the_last_run_in_full_and_live_figures(
    initialized: Balsync, rds: redis.Redis, key_prefix: str
) -> None:
    """After two syncs: the last run in full, both runs, and what each store holds now."""
    rds.mset({f"{key_prefix}1": "10.50", f"{key_prefix}2": "20", f"{key_prefix}3": "bad"})
    other = key_prefix.replace("balance:", "other:")
    rds.set(f"{other}1", "99")  # not a balance key: SCAN over the prefix leaves it out
    initialized("sync")
    rds.set(f"{key_prefix}4", "0.25")
    initialized("sync", "--force")
    data = stats_json(initialized)
    last = data["last_run"]
    assert isinstance(last, dict)
    assert last["status"] == "partial"
    assert (last["processed"], last["inserted"], last["skipped"], last["invalid"]) == (4, 1, 1, 1)
    assert set(last) >= {"id", "started_at", "finished_at", "duration_s", "host", "pid", "error"}
    runs = data["runs"]
    assert isinstance(runs, list)
    assert [run["inserted"] for run in runs] == [1, 2]
    assert runs[0] == last
    assert data["redis"] == {
        "key_prefix": key_prefix,
        "balance_keys": 4,
        "used_memory": data["redis"]["used_memory"],  # type: ignore[index]
        "used_memory_human": data["redis"]["used_memory_human"],  # type: ignore[index]
    }
    assert str(data["redis"]["used_memory_human"])[-1] in "BKMG"
    assert data["postgres"] == {"rows": 3, "balance_sum": "30.75"}
    assert data["table"] == "user_balances"


def test_balance_sum_is_exact_not_a_float(initialized: Balsync, pg: Conn) -> None:
    """The sum of balances is an exact decimal string where a float would lose the cents."""
    pg.execute(
        "INSERT INTO user_balances (telegram_id, balance) VALUES "
        "(1, 999999999999999.99), (2, 0.01), (3, 0.01), (4, -0.50)"
    )
    postgres = stats_json(initialized)["postgres"]
    assert postgres == {"rows": 4, "balance_sum": "999999999999999.51"}
    # 17 significant digits: a float on the way would have printed 999999999999999.5
    assert str(float(Decimal("999999999999999.51"))) != "999999999999999.51"


def test_last_24h_counts_runs_failures_and_duration_percentiles(
    initialized: Balsync, pg: Conn
) -> None:
    """Runs and failures started within 24 h, p50/p95 by percentile_cont; older runs left out."""
    for status, duration in (("success", 1), ("success", 2), ("failed", 3), ("partial", 4)):
        add_run(pg, status, duration)
    add_run(pg, "failed", 100, started_ago="25 hours")
    window = stats_json(initialized)["last_24h"]
    assert window == {"runs": 4, "failures": 1, "p50_duration_s": 2.5, "p95_duration_s": 3.85}


def test_runs_flag_limits_the_list_newest_first(initialized: Balsync, pg: Conn) -> None:
    """--runs N lists the N newest runs, the newest first; the last run is the newest."""
    ids = [add_run(pg, "success", 1, started_ago=f"{hours} hours") for hours in (5, 4, 3, 2)]
    data = stats_json(initialized, "--runs", "2")
    runs = data["runs"]
    assert isinstance(runs, list)
    assert [run["id"] for run in runs] == [ids[3], ids[2]]
    assert data["last_run"] == runs[0]
    assert len(stats_json(initialized)["runs"]) == 4  # type: ignore[arg-type]
    assert initialized("stats", "--runs", "0").exit_code == 2


def test_no_runs_yet(initialized: Balsync) -> None:
    """Before any run: no last run, empty list, no percentiles, and the human view says so."""
    data = stats_json(initialized)
    assert data["last_run"] is None
    assert data["runs"] == []
    assert data["last_24h"] == {
        "runs": 0,
        "failures": 0,
        "p50_duration_s": None,
        "p95_duration_s": None,
    }
    assert data["postgres"] == {"rows": 0, "balance_sum": "0"}
    assert "No runs of user_balances are recorded yet." in initialized.ok("stats").stdout


def test_human_view_has_tables_and_a_duration_chart(initialized: Balsync, pg: Conn) -> None:
    """The human view: last run, runs table, figures, and bars scaled to the longest run."""
    add_run(pg, "success", 10.0, started_ago="2 hours")
    add_run(pg, "failed", 5.0, started_ago="1 hour")
    out = initialized.ok("stats").stdout
    for text in ("Last run of user_balances", "Last 2 runs", "Run durations", "Figures"):
        assert text in out
    assert "p95" in out
    bars = sorted(line.count("█") for line in out.splitlines() if "█" in line)
    assert bars == [20, 40]


def test_quiet_prints_nothing(initialized: Balsync) -> None:
    """--quiet prints nothing at all."""
    result = initialized.ok("stats", "--quiet")
    assert (result.stdout, result.stderr) == ("", "")


def test_before_init_db_exits_5(balsync: Balsync) -> None:
    """Without balsync's schema stats says to run init-db, exit 5."""
    result = balsync("stats")
    assert result.exit_code == 5
    assert "init-db" in result.stderr


@pytest.mark.parametrize(
    ("variable", "url", "code"),
    [
        ("BALSYNC_REDIS_URL", "redis://127.0.0.1:{port}/0", 3),
        ("BALSYNC_DATABASE_URL", "postgresql://balsync@127.0.0.1:{port}/app", 4),
    ],
)
def test_unreachable_store_exits_with_its_code(
    initialized: Balsync, variable: str, url: str, code: int
) -> None:
    """Redis down is exit 3, PostgreSQL down exit 4, after the retry budget."""
    env = {variable: url.format(port=free_port())}
    result = initialized("stats", "--retry-timeout", "0.3", env=env)
    assert result.exit_code == code
    assert "unavailable" in result.stderr
    assert result.stdout == ""


def test_help_has_an_example() -> None:
    """stats --help shows --runs and an example."""
    from click.testing import CliRunner

    from balance_sync.cli import cli

    text = CliRunner().invoke(cli, ["stats", "--help"]).stdout
    assert "Examples:" in text
    assert "--runs" in text
