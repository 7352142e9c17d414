"""--metrics-file: node_exporter's textfile, rewritten after every sync whatever its outcome."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis

from balance_sync.monitoring.metrics import RunMetrics, previous_success, write_metrics
from tests.helpers import Balsync
from tests.support.devservers import ValkeyServer
from tests.support.metrics import TABLE, Metrics
from tests.support.netutil import closed_port

NAMES = {
    "balsync_last_run_timestamp_seconds",
    "balsync_last_success_timestamp_seconds",
    "balsync_last_run_duration_seconds",
    "balsync_last_run_records",
    "balsync_last_run_status",
    "balsync_redis_up",
    "balsync_postgres_up",
    "balsync_last_run_pruned_rows",
    "balsync_redis_restart_pending",
}
DOWN = {"BALSYNC_RETRY_TIMEOUT": "0"}
LAST_RUN = "balsync_last_run_timestamp_seconds"
LAST_SUCCESS = "balsync_last_success_timestamp_seconds"


def dead_redis() -> str:
    return f"redis://127.0.0.1:{closed_port()}/0"


def dead_postgres() -> str:
    return f"postgresql://balsync@127.0.0.1:{closed_port()}/app?connect_timeout=2"


def test_success_writes_every_metric_labelled_with_the_table(
    initialized, rds, key_prefix, tmp_path
):
    """A successful sync writes every metric, each with table=, and stdout stays JSON."""
    rds.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "20.00"})
    path = tmp_path / "balsync.prom"
    before = time.time()
    result = initialized("sync", "--json", "--metrics-file", str(path))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "success"
    metrics = Metrics(path)
    assert metrics.names == NAMES
    assert all(dict(labels)["table"] == TABLE for _, labels in metrics.samples)
    assert metrics.status() == "success"
    assert metrics.records() == {
        "processed": 2,
        "inserted": 2,
        "updated": 0,
        "unchanged": 0,
        "skipped": 0,
        "invalid": 0,
    }
    assert before <= metrics(LAST_RUN) <= time.time()
    assert metrics(LAST_SUCCESS) == metrics(LAST_RUN)
    assert 0 < metrics("balsync_last_run_duration_seconds") < 60
    assert (metrics("balsync_redis_up"), metrics("balsync_postgres_up")) == (1, 1)
    assert metrics("balsync_redis_restart_pending") == 0


def test_partial_run_counts_invalid_records_and_is_a_success_in_time(
    initialized, rds, key_prefix, tmp_path
):
    """Exit 1 (partial): status partial, invalid counted, last success moves (every valid
    balance was copied)."""
    rds.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "not money"})
    path = tmp_path / "balsync.prom"
    assert initialized("sync", "--metrics-file", str(path)).exit_code == 1
    metrics = Metrics(path)
    assert metrics.status() == "partial"
    records = metrics.records()
    assert (records["processed"], records["inserted"], records["skipped"]) == (2, 1, 1)
    assert records["invalid"] == 1
    assert metrics(LAST_SUCCESS) == metrics(LAST_RUN)


def test_skipped_run_carries_the_previous_success_time_over(initialized, rds, key_prefix, tmp_path):
    """A run skipped by --min-interval says skipped and keeps the last success time."""
    rds.set(f"{key_prefix}1", "10.00")
    path = tmp_path / "balsync.prom"
    initialized.ok("sync", "--metrics-file", str(path))
    first = Metrics(path)
    initialized.ok("sync", "--metrics-file", str(path))
    second = Metrics(path)
    assert second.status() == "skipped"
    assert second(LAST_SUCCESS) == first(LAST_SUCCESS)
    assert second(LAST_RUN) > first(LAST_RUN)
    assert second.records()["processed"] == 0


def test_redis_unreachable_reports_redis_down_and_keeps_exit_3(initialized, tmp_path):
    """Exit 3: status failed, balsync_redis_up 0, counters 0, last success carried over."""
    path = tmp_path / "balsync.prom"
    initialized.ok("sync", "--metrics-file", str(path))
    earlier = Metrics(path)(LAST_SUCCESS)
    result = initialized("sync", "--metrics-file", str(path), "--redis-url", dead_redis(), env=DOWN)
    assert result.exit_code == 3, result.stderr
    assert "Redis" in result.stderr
    metrics = Metrics(path)
    assert metrics.status() == "failed"
    assert (metrics("balsync_redis_up"), metrics("balsync_postgres_up")) == (0, 1)
    assert metrics(LAST_SUCCESS) == earlier < metrics(LAST_RUN)
    assert set(metrics.records().values()) == {0}


def test_postgres_unreachable_reports_postgres_down_and_keeps_exit_4(balsync, tmp_path):
    """Exit 4: balsync_postgres_up 0; no success known yet, so the last success time is 0."""
    path = tmp_path / "balsync.prom"
    result = balsync(
        "sync", "--metrics-file", str(path), "--database-url", dead_postgres(), env=DOWN
    )
    assert result.exit_code == 4, result.stderr
    metrics = Metrics(path)
    assert metrics.status() == "failed"
    assert (metrics("balsync_redis_up"), metrics("balsync_postgres_up")) == (1, 0)
    assert metrics(LAST_SUCCESS) == 0


def test_other_failure_is_reported_failed_with_both_servers_up(balsync, tmp_path):
    """Exit 5 (schema missing: no init-db): status failed, both servers up."""
    path = tmp_path / "balsync.prom"
    result = balsync("sync", "--metrics-file", str(path))
    assert result.exit_code == 5, result.stderr
    metrics = Metrics(path)
    assert metrics.status() == "failed"
    assert (metrics("balsync_redis_up"), metrics("balsync_postgres_up")) == (1, 1)


def test_unexpected_exception_is_reported_failed_and_exits_5(initialized, tmp_path, monkeypatch):
    """A bug in the sync (not a BalsyncError) still leaves metrics saying failed."""

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr("balance_sync.monitoring.report.run_sync", broken)
    path = tmp_path / "balsync.prom"
    result = initialized("sync", "--metrics-file", str(path))
    assert result.exit_code == 5
    assert "RuntimeError: injected" in result.stderr
    assert Metrics(path).status() == "failed"


def test_env_variable_names_the_metrics_file(initialized, tmp_path):
    """BALSYNC_METRICS_FILE works like --metrics-file."""
    path = tmp_path / "env.prom"
    initialized.ok("sync", env={"BALSYNC_METRICS_FILE": str(path)})
    assert Metrics(path).status() == "success"


def test_option_wins_over_the_environment(initialized, tmp_path):
    """--metrics-file beats BALSYNC_METRICS_FILE."""
    option, environ = tmp_path / "option.prom", tmp_path / "env.prom"
    initialized.ok(
        "sync", "--metrics-file", str(option), env={"BALSYNC_METRICS_FILE": str(environ)}
    )
    assert option.exists()
    assert not environ.exists()


def test_dry_run_writes_no_metrics(initialized, tmp_path):
    """A dry run writes nothing anywhere, the metrics file included."""
    path = tmp_path / "balsync.prom"
    initialized.ok("sync", "--dry-run", "--metrics-file", str(path))
    assert not path.exists()


def test_missing_directory_is_created(initialized, tmp_path):
    """The textfile's directory is created when absent."""
    path = tmp_path / "textfile" / "collector" / "balsync.prom"
    initialized.ok("sync", "--metrics-file", str(path))
    assert Metrics(path).status() == "success"


def test_unwritable_metrics_file_warns_and_the_sync_succeeds(
    initialized, rds, key_prefix, pg, tmp_path
):
    """A metrics file that cannot be written is a warning; the sync and its exit code stand."""
    rds.set(f"{key_prefix}7", "70.00")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = initialized("sync", "--metrics-file", str(blocker / "balsync.prom"))
    assert result.exit_code == 0, result.stderr
    assert "could not write the metrics file" in result.stderr
    assert pg.execute("SELECT balance::text FROM user_balances").fetchall() == [("70.00",)]


def test_file_is_replaced_by_rename_leaving_no_temporary_file(initialized, tmp_path):
    """Each run renames a new file into place (a reader never sees half a file)."""
    path = tmp_path / "balsync.prom"
    initialized.ok("sync", "--metrics-file", str(path))
    first_inode = path.stat().st_ino
    initialized.ok("sync", "--metrics-file", str(path))
    assert path.stat().st_ino != first_inode
    assert [p.name for p in tmp_path.iterdir()] == ["balsync.prom"]


def run_metrics(status: str, finished_at: float, table: str = TABLE) -> RunMetrics:
    return RunMetrics(table, status, finished_at, 0.5, {}, True, True)  # type: ignore[arg-type]


def test_last_success_is_carried_over_for_the_same_table_only(tmp_path):
    """The previous success time is looked up under this run's table label."""
    path = tmp_path / "balsync.prom"
    assert write_metrics(path, run_metrics("success", 1000.0, table="ledger.balances"))
    assert previous_success(path, "ledger.balances") == 1000.0
    assert previous_success(path, TABLE) is None
    assert write_metrics(path, run_metrics("failed", 2000.0))
    assert Metrics(path)(LAST_SUCCESS) == 0


@pytest.mark.parametrize("status", ["skipped", "failed"])
def test_runs_that_did_not_succeed_keep_the_last_success(tmp_path, status):
    """skipped and failed leave the last success time as the previous file had it."""
    path = tmp_path / "balsync.prom"
    write_metrics(path, run_metrics("success", 1000.0))
    write_metrics(path, run_metrics(status, 2000.0))
    metrics = Metrics(path)
    assert (metrics(LAST_SUCCESS), metrics(LAST_RUN)) == (1000.0, 2000.0)


def test_a_garbled_previous_file_is_replaced(tmp_path):
    """A previous file that does not parse is no obstacle: it is overwritten, success 0."""
    path = tmp_path / "balsync.prom"
    path.write_bytes(b"\xff\xfe not { metrics\n")
    assert previous_success(path, TABLE) is None
    assert write_metrics(path, run_metrics("failed", 2000.0))
    assert Metrics(path).status() == "failed"


def test_restart_pending_is_written_as_one(tmp_path):
    """A run that holds rows after a Redis restart sets balsync_redis_restart_pending to 1."""
    path = tmp_path / "balsync.prom"
    run = RunMetrics(TABLE, "partial", 1000.0, 0.5, {}, True, True, restart_pending=True)
    assert write_metrics(path, run)
    assert Metrics(path)("balsync_redis_restart_pending") == 1


def test_a_pending_redis_restart_sets_the_gauge_until_it_is_accepted(
    initialized, key_prefix, tmp_path
):
    """Rows held after a restart of Redis: 1; after --accept-redis-restart: 0 again."""
    server = ValkeyServer(tmp_path / "valkey").start()
    try:
        tool = Balsync({**initialized.env, "BALSYNC_REDIS_URL": server.url})
        path = str(tmp_path / "balsync.prom")
        with redis.Redis.from_url(server.url) as client:
            client.mset({f"{key_prefix}1": "1500.00", f"{key_prefix}2": "20.00"})
        tool.ok("sync", "--force", "--metrics-file", path)
        assert Metrics(Path(path))("balsync_redis_restart_pending") == 0
        server.stop()
        server.start()  # back empty: nothing is on disk
        with redis.Redis.from_url(server.url) as client:
            client.set(f"{key_prefix}1", "5.00")
        assert tool("sync", "--force", "--metrics-file", path).exit_code == 1
        assert Metrics(Path(path))("balsync_redis_restart_pending") == 1
        tool.ok("sync", "--force", "--accept-redis-restart", "--metrics-file", path)
        assert Metrics(Path(path))("balsync_redis_restart_pending") == 0
    finally:
        server.stop()
