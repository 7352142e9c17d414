"""Runs started at the same moment as real processes: guarantee 5 (never overlap) and init-db."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
KEYS = 20_000


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """`python -m balance_sync ARGS` as a process of its own, with the test's environment."""
    return subprocess.Popen(
        [sys.executable, "-m", "balance_sync", *args],
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stdout, stderr


def exact(raw: str) -> str:
    value = Decimal(raw).quantize(Decimal("0.01"))
    return str(abs(value) if value == 0 else value)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4])
def test_concurrent_syncs_never_overlap_and_converge(initialized, rds, key_prefix, pg, processes):
    """N `sync --force` at once: all exit 0, success runs never overlap, rows equal Redis."""
    rng = random.Random(processes)
    values = {i: f"{rng.randrange(10**9)}.{rng.randrange(100):02d}" for i in range(1, KEYS + 1)}
    items = list(values.items())
    with rds.pipeline(transaction=False) as pipe:
        for begin in range(0, KEYS, 5000):
            pipe.mset({f"{key_prefix}{i}": v for i, v in items[begin : begin + 5000]})
        pipe.execute()

    runs = [start(initialized.env, "sync", "--json", "--force") for _ in range(processes)]
    outcomes = [finish(process) for process in runs]
    results = []
    for code, stdout, stderr in outcomes:
        assert code == 0, (code, stdout, stderr)
        data = json.loads(stdout)
        total = data["inserted"] + data["updated"] + data["unchanged"] + data["skipped"]
        assert data["processed"] == total
        assert data["skipped"] >= data["invalid"]
        assert data["status"] in ("success", "skipped"), data
        results.append(data)

    successes = [data for data in results if data["status"] == "success"]
    assert successes
    # Every key was inserted once, by whichever run came first, and never rewritten.
    assert sum(data["inserted"] for data in successes) == KEYS
    assert sum(data["updated"] for data in successes) == 0

    rows = pg.execute(
        """SELECT id, status, started_at, finished_at FROM balsync.sync_runs
           WHERE status IN ('success', 'partial') ORDER BY started_at"""
    ).fetchall()
    assert {data["run_id"] for data in successes} <= {row[0] for row in rows}
    assert all(row[1] == "success" for row in rows)
    for earlier, later in itertools.pairwise(rows):
        assert earlier[3] <= later[2], (earlier, later)
    assert pg.execute(
        "SELECT count(*) FROM balsync.sync_runs WHERE status = 'running'"
    ).fetchone() == (0,)

    stored = pg.execute(sql.SQL("SELECT telegram_id, balance::text FROM user_balances")).fetchall()
    assert {int(i): b for i, b in stored} == {i: exact(v) for i, v in values.items()}


@pytest.mark.parametrize("processes", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_concurrent_init_db_all_succeed(env, pg, processes):
    """N `init-db` at once all exit 0 and leave one complete schema."""
    outcomes = [finish(p) for p in [start(env, "init-db", "--json") for _ in range(processes)]]
    created = []
    for code, stdout, stderr in outcomes:
        assert code == 0, (code, stdout, stderr)
        data = json.loads(stdout)
        assert data["status"] == "success"
        created += data["created"]
    # Each thing was created by exactly one of them.
    assert sorted(created) == ["balsync schema", "table user_balances"]
    for table in (
        "user_balances",
        "balsync.sync_runs",
        "balsync.skipped_records",
        "balsync.run_batches",
    ):
        assert pg.execute("SELECT to_regclass(%s)::text", (table,)).fetchone() == (table,)
