"""SIGTERM (systemd, Kubernetes, `timeout`, `docker stop`) and SIGINT stop a run cleanly.

The run stops after the batch in progress, within seconds: it is recorded failed, metrics and
the fail ping go out, PostgreSQL holds whole batches only, and the next run converges.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from decimal import Decimal

import psycopg
import pytest

from balance_sync.stores.postgres import LOCK_CLASS
from tests.faults.conftest import Bench
from tests.faults.helpers import (
    assert_converged,
    assert_ledger_consistent,
    make_balances,
    redis_balances,
    rows,
    seed,
    sync_runs,
    wait_for_batches,
)
from tests.support.netutil import ping_server

pytestmark = pytest.mark.faults

KEYS = 200_000
BATCH = "500"  # many small batches: the signal lands mid-run
STOP_WITHIN = 5.0  # seconds from the signal to the exit


@pytest.mark.parametrize(
    ("signum", "code", "reason"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signal_stops_the_run_after_its_batch_and_records_it(
    bench: Bench, figures: Callable[[str], None], signum: int, code: int, reason: str
) -> None:
    """A signal mid-run: exit 128+signal within seconds, the run recorded failed with the
    reason, metrics and the fail ping sent, only whole batches in PostgreSQL; a rerun converges."""
    seed(bench.redis_url, bench.prefix, make_balances(KEYS, 15))
    bench.init_db()
    metrics = bench.workdir / "balsync.prom"
    with ping_server() as ping:
        running = bench.cli().start(
            "sync",
            "--json",
            "--force",
            "--batch-size",
            BATCH,
            env={"BALSYNC_METRICS_FILE": str(metrics), "BALSYNC_PING_URL": ping.url},
        )
        wait_for_batches(bench.db_url, 10, running)
        running.process.send_signal(signum)
        sent = time.monotonic()
        done = running.wait(timeout=60)
        took = time.monotonic() - sent
        routes = ping.routes()
        last = ping.hits[-1]
    name = signal.Signals(signum).name
    figures(f"{KEYS} keys, batch {BATCH}: {name} mid-run -> exit {done.code} in {took:.2f}s")
    assert done.code == code, done
    assert took < STOP_WITHIN, f"took {took:.1f}s"
    assert reason in done.stderr, done
    assert "Traceback" not in done.stderr, done
    assert done.data["status"] == "failed"

    [run] = sync_runs(bench.db_url)
    assert run.status == "failed"
    assert run.error is not None
    assert reason in run.error
    assert routes == [("GET", "/start"), ("POST", f"/{code}")]  # the end ping: URL/<exit code>
    assert (last.json()["status"], last.json()["exit_code"]) == ("failed", code)
    text = metrics.read_text()
    assert re.search(r'balsync_last_run_status\{[^}]*status="failed"[^}]*\} 1\.0', text), text

    # Whole batches only: every row holds its key's value, and the rows are what the
    # committed batches say they inserted.
    counts = assert_ledger_consistent(bench.db_url)
    expected, _ = redis_balances(bench.redis_url, bench.prefix)
    stored = rows(bench.db_url)
    assert 0 < len(stored) < KEYS
    assert all(expected[i] == Decimal(v) for i, v in stored.items())
    assert len(stored) % int(BATCH) == 0, len(stored)
    assert counts["inserted"] == len(stored)

    rerun = bench.cli().sync("--batch-size", "20000")
    assert rerun.code == 0, rerun
    assert assert_converged(bench.redis_url, bench.db_url, bench.prefix) == KEYS
    assert_ledger_consistent(bench.db_url)


def worker_threads(pid: int) -> list[int]:
    """The ids of a process's threads other than its main one (Linux: /proc/<pid>/task)."""
    return sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_a_signal_the_kernel_hands_to_a_worker_thread_still_stops_the_run(bench: Bench) -> None:
    """The kernel may deliver a process's SIGTERM to any of its threads; addressed to a
    thread's id, it goes to that thread. CPython runs the handler on the main thread only,
    so a main thread blocked until the writers finish would stop nothing: it must not be."""
    seed(bench.redis_url, bench.prefix, make_balances(KEYS, 17))
    bench.init_db()
    running = bench.cli().start("sync", "--json", "--force", "--batch-size", BATCH)
    wait_for_batches(bench.db_url, 10, running)
    threads = worker_threads(running.pid)
    assert threads, "a run reads and writes on threads of its own"
    os.kill(threads[-1], signal.SIGTERM)
    sent = time.monotonic()
    done = running.wait(timeout=60)
    took = time.monotonic() - sent
    assert done.code == 143, done
    assert took < STOP_WITHIN, f"took {took:.1f}s"
    assert 0 < len(rows(bench.db_url)) < KEYS
    [run] = sync_runs(bench.db_url)
    assert run.status == "failed"


def test_a_signal_while_waiting_for_the_lock_stops_at_once(bench: Bench) -> None:
    """SIGTERM during --wait: exit 143 within a second, nothing written, no run recorded."""
    seed(bench.redis_url, bench.prefix, make_balances(100, 16))
    bench.init_db()
    with psycopg.connect(bench.db_url, autocommit=True) as holder:
        holder.execute(
            "SELECT pg_advisory_lock(%s, to_regclass('user_balances')::oid::int4)", (LOCK_CLASS,)
        )
        running = bench.cli().start("sync", "--json", "--force", "--wait", "600")
        time.sleep(3)  # started, and waiting
        assert running.process.poll() is None
        running.process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        done = running.wait(timeout=30)
        took = time.monotonic() - sent
    assert done.code == 143, done
    assert took < 2.0, took
    assert rows(bench.db_url) == {}
    assert sync_runs(bench.db_url) == []
