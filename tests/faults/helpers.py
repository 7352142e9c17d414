"""What every fault test needs: balsync as a subprocess, seeding, and the checks that prove it.

The checks are written from SPEC, independently of balance_sync's own code: which keys are
valid, what PostgreSQL must hold, and a ledger of every write to the target table, kept by
triggers of the test's own, that shows no batch was applied twice.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import cast

import psycopg
import redis

from tests import helpers as shared

REPO = Path(__file__).resolve().parents[2]
MAX_ID = 2**63 - 1
BALANCE_LIMIT = Decimal(10) ** 18
_ID = re.compile(rb"[1-9][0-9]*")
_BALANCE = re.compile(rb"-?[0-9]+(\.[0-9]{1,2})?")
_INHERITED = ("BALSYNC_", "REDIS_", "PG")
_PROCESSES = itertools.count(1)  # names each process's output files


# -- balsync as a real process ------------------------------------------------------------


@dataclass
class Finished:
    """How one balsync process ended."""

    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def data(self) -> dict[str, object]:
        """The `--json` object on stdout."""
        return dict(json.loads(self.stdout))

    def __str__(self) -> str:
        return f"exit {self.code} after {self.seconds:.1f}s\n{self.stdout}\n{self.stderr[-3000:]}"


@dataclass
class Running:
    """A balsync process that is still going; its output goes to files, never to a pipe."""

    process: subprocess.Popen[bytes]
    out: Path
    err: Path
    started: float

    @property
    def pid(self) -> int:
        """The process id (sync_runs.pid)."""
        return self.process.pid

    def wait(self, timeout: float) -> Finished:
        """Wait for the end; a process still running after `timeout` is killed and fails."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"balsync still running after {timeout:g}s (killed); stderr:\n"
                + self.err.read_text(errors="replace")[-3000:]
            ) from None
        return self._finished(code)

    def kill_at(self, seconds: float) -> tuple[Finished, bool]:
        """kill -9 `seconds` after the start unless it ended first; (outcome, was killed)."""
        try:
            code = self.process.wait(timeout=max(0.0, self.started + seconds - time.monotonic()))
        except subprocess.TimeoutExpired:
            return self.kill(), True
        return self._finished(code), False

    def kill(self) -> Finished:
        """kill -9, as a power cut or the OOM killer would."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        return self._finished(self.process.wait(timeout=30))

    def _finished(self, code: int) -> Finished:
        return Finished(
            code,
            self.out.read_text(errors="replace"),
            self.err.read_text(errors="replace"),
            time.monotonic() - self.started,
        )


@dataclass
class Cli:
    """Starts `python -m balance_sync` with the test's servers in its environment."""

    workdir: Path
    env: dict[str, str]

    def start(self, *args: str, env: Mapping[str, str] | None = None) -> Running:
        """Start one balsync command."""
        number = next(_PROCESSES)
        out = self.workdir / f"balsync-{number}.out"
        err = self.workdir / f"balsync-{number}.err"
        environ = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED)}
        environ.pop("DATABASE_URL", None)
        environ.update(self.env)
        environ.update(env or {})
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "balance_sync", *args],
                cwd=REPO,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        return Running(process, out, err, time.monotonic())

    def run(
        self, *args: str, timeout: float = 120, env: Mapping[str, str] | None = None
    ) -> Finished:
        """Run one balsync command to its end."""
        return self.start(*args, env=env).wait(timeout)

    def sync(self, *args: str, timeout: float = 120, **kwargs: object) -> Finished:
        """`balsync sync --json --force ARGS`."""
        return self.run("sync", "--json", "--force", *args, timeout=timeout, **kwargs)  # type: ignore[arg-type]


# -- Redis --------------------------------------------------------------------------------


def seed(redis_url: str, prefix: str, balances: Mapping[int, str], chunk: int = 10_000) -> None:
    """SET prefix+id to each balance, pipelined, on a client of its own."""
    client = redis.Redis.from_url(redis_url)
    try:
        shared.seed(client, prefix, balances, chunk)
    finally:
        client.close()


def random_balance(rng: random.Random) -> str:
    """A valid, non-negative balance with 0, 1 or 2 decimals."""
    whole = rng.randrange(0, 10 ** rng.randrange(1, 13))
    decimals = rng.choice(("", ".5", ".05", ".99", ".10", ".0"))
    return f"{whole}{decimals}"


def make_balances(count: int, seed_value: int) -> dict[int, str]:
    """`count` valid balances under distinct ids spread over the whole id range."""
    rng = random.Random(seed_value)
    ids = rng.sample(range(1, MAX_ID + 1), count)
    return {i: random_balance(rng) for i in ids}


def valid_balance(raw: bytes, *, allow_negative: bool = False) -> Decimal | None:
    """SPEC's balance rule, written independently of balance_sync.validation."""
    if not _BALANCE.fullmatch(raw) or len(raw.lstrip(b"-0").split(b".")[0]) > 18:
        return None
    value = Decimal(raw.decode())
    if abs(value) >= BALANCE_LIMIT or (value < 0 and not allow_negative):
        return None
    return value


def valid_id(suffix: bytes) -> int | None:
    """SPEC's telegram id rule: 1..2^63-1, digits only, no leading zero."""
    if not _ID.fullmatch(suffix):
        return None
    number = int(suffix)
    return number if number <= MAX_ID else None


def redis_balances(
    redis_url: str, prefix: str, *, allow_negative: bool = False
) -> tuple[dict[int, Decimal], int]:
    """Every valid balance key under `prefix` as {id: value}, and how many keys are invalid."""
    client = redis.Redis.from_url(redis_url)
    valid: dict[int, Decimal] = {}
    invalid = 0
    try:
        keys = list(client.scan_iter(match=prefix.encode() + b"*", count=5000))
        for start in range(0, len(keys), 5000):
            chunk = keys[start : start + 5000]
            for key, raw in zip(chunk, client.mget(chunk), strict=True):
                if raw is None:
                    kind = client.type(key)
                    assert kind != b"none", f"{key!r} vanished: is something still writing?"
                    invalid += 1
                    continue
                number = valid_id(key[len(prefix.encode()) :])
                # bytes: the client decodes no responses
                value = valid_balance(cast(bytes, raw), allow_negative=allow_negative)
                if number is None or value is None:
                    invalid += 1
                else:
                    valid[number] = value
    finally:
        client.close()
    return valid, invalid


# -- PostgreSQL ---------------------------------------------------------------------------


def rows(db_url: str) -> dict[int, Decimal]:
    """Every row of the target table as {id: balance}, read as text into Decimal."""
    with psycopg.connect(db_url) as conn:
        return {i: Decimal(b) for i, b in shared.balances(conn).items()}


def snapshot(db_url: str) -> dict[int, tuple[Decimal, datetime]]:
    """Every row with its updated_at."""
    with psycopg.connect(db_url) as conn:
        fetched = conn.execute(
            "SELECT telegram_id, balance::text, updated_at FROM user_balances"
        ).fetchall()
    return {int(i): (Decimal(b), at) for i, b, at in fetched}


def assert_converged(
    redis_url: str,
    db_url: str,
    prefix: str,
    *,
    allow_negative: bool = False,
    untouched: Mapping[int, Decimal] | None = None,
) -> int:
    """PostgreSQL holds exactly the valid keys of Redis: every row, every key, every cent.

    `untouched` are rows whose keys are absent from Redis (SPEC 2: never touched, never
    deleted); they must still hold these values. Returns the number of valid keys.
    """
    expected, _ = redis_balances(redis_url, prefix, allow_negative=allow_negative)
    extra = dict(untouched or {})
    assert not set(extra) & set(expected), "an untouched row has a key in Redis"
    expected.update(extra)
    actual = rows(db_url)
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    wrong = sorted(i for i in set(expected) & set(actual) if expected[i] != actual[i])
    problems = len(missing) + len(unexpected) + len(wrong)
    assert problems == 0, (
        f"{len(missing)} valid keys have no row (e.g. {missing[:5]}), "
        f"{len(unexpected)} rows have no valid key (e.g. {unexpected[:5]}), "
        f"{len(wrong)} rows differ (e.g. "
        f"{[(i, str(actual[i]), str(expected[i])) for i in wrong[:5]]})"
    )
    return len(expected) - len(extra)


# -- the write ledger: proof that no batch is applied twice ---------------------------------

_AUDIT = [
    """CREATE TABLE public.fault_ledger (
           txid bigint NOT NULL, run_id bigint NOT NULL, batch_no integer NOT NULL,
           inserted integer NOT NULL, updated integer NOT NULL, unknown integer NOT NULL)""",
    """CREATE TABLE public.fault_writes (
           txid bigint NOT NULL, op text NOT NULL, row_count bigint NOT NULL,
           changed bigint NOT NULL)""",
    """CREATE FUNCTION public.fault_copy_batch() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
           INSERT INTO public.fault_ledger
           SELECT txid_current(), n.run_id, n.batch_no, n.inserted, n.updated, n.unknown
           FROM new_rows n;
           RETURN NULL;
       END $$""",
    """CREATE TRIGGER fault_copy_batch AFTER INSERT ON balsync.run_batches
       REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
       EXECUTE FUNCTION public.fault_copy_batch()""",
    """CREATE FUNCTION public.fault_count_inserts() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
           INSERT INTO public.fault_writes
           SELECT txid_current(), 'insert', count(*), count(*) FROM new_rows
           HAVING count(*) > 0;
           RETURN NULL;
       END $$""",
    """CREATE TRIGGER fault_count_inserts AFTER INSERT ON public.user_balances
       REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
       EXECUTE FUNCTION public.fault_count_inserts()""",
    """CREATE FUNCTION public.fault_count_updates() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
           INSERT INTO public.fault_writes
           SELECT txid_current(), 'update', count(*),
                  count(*) FILTER (WHERE o.balance IS DISTINCT FROM n.balance)
           FROM old_rows o JOIN new_rows n USING (telegram_id)
           HAVING count(*) > 0;
           RETURN NULL;
       END $$""",
    """CREATE TRIGGER fault_count_updates AFTER UPDATE ON public.user_balances
       REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
       EXECUTE FUNCTION public.fault_count_updates()""",
]


def install_ledger(db_url: str) -> None:
    """Record every batch (balsync drops run_batches when a run ends) and every write."""
    with psycopg.connect(db_url, autocommit=True) as conn, conn.transaction():
        for statement in _AUDIT:
            conn.execute(statement)


def ledger_batches(db_url: str, run_id: int | None = None) -> int:
    """Batches committed so far (by one run, or by all)."""
    with psycopg.connect(db_url, connect_timeout=5) as conn:
        if run_id is None:
            row = conn.execute("SELECT count(*) FROM public.fault_ledger").fetchone()
        else:
            row = conn.execute(
                "SELECT count(*) FROM public.fault_ledger WHERE run_id = %s", (run_id,)
            ).fetchone()
    assert row is not None
    return int(row[0])


def wait_for_batches(db_url: str, at_least: int, running: Running, timeout: float = 90) -> int:
    """Poll until `at_least` batches are committed in all; fail if balsync ends first."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(db_url, autocommit=True, connect_timeout=5) as conn:
        while True:
            row = conn.execute("SELECT count(*) FROM public.fault_ledger").fetchone()
            count = int(row[0]) if row else 0
            if count >= at_least:
                return count
            if running.process.poll() is not None:
                raise AssertionError(f"balsync ended before {at_least} batches: {running.wait(1)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"only {count} batches after {timeout:g}s")
            time.sleep(0.05)


@dataclass
class Run:
    """One row of balsync.sync_runs."""

    id: int
    status: str
    pid: int
    started_at: datetime
    finished_at: datetime | None
    counters: dict[str, int] = field(default_factory=dict)
    error: str | None = None


def sync_runs(db_url: str) -> list[Run]:
    """Every recorded run, oldest first."""
    with psycopg.connect(db_url) as conn:
        fetched = conn.execute(
            """SELECT id, status, pid, started_at, finished_at, error, processed, inserted,
                      updated, unchanged, skipped, invalid
               FROM balsync.sync_runs ORDER BY id"""
        ).fetchall()
    names = ("processed", "inserted", "updated", "unchanged", "skipped", "invalid")
    return [
        Run(r[0], r[1], r[2], r[3], r[4], dict(zip(names, r[6:], strict=True)), r[5])
        for r in fetched
    ]


def assert_ledger_consistent(db_url: str) -> dict[str, int]:
    """No batch applied twice, no write outside a recorded batch, every count true.

    - each write to the target happened in a transaction that recorded its batch;
    - each recorded batch's counts are what its transaction did to the rows;
    - a finished run's counters are the sums over its batches, and add up as SPEC says;
    - a failed run never claims more than its batches did.
    (No application writes the target in these tests, so ON CONFLICT never fires.)
    """
    with psycopg.connect(db_url) as conn:
        stray = conn.execute(
            """SELECT DISTINCT w.txid FROM public.fault_writes w
               LEFT JOIN public.fault_ledger l USING (txid) WHERE l.txid IS NULL"""
        ).fetchall()
        assert not stray, f"writes outside any recorded batch, transactions {stray[:5]}"
        twice = conn.execute(
            """SELECT run_id, batch_no, count(*) FROM public.fault_ledger
               GROUP BY run_id, batch_no HAVING count(*) > 1"""
        ).fetchall()
        assert not twice, f"batches recorded twice: {twice[:5]}"
        untrue = conn.execute(
            """SELECT l.run_id, l.batch_no, l.inserted, l.updated,
                      coalesce(sum(w.row_count) FILTER (WHERE w.op = 'insert'), 0),
                      coalesce(sum(w.changed) FILTER (WHERE w.op = 'update'), 0),
                      coalesce(sum(w.row_count - w.changed) FILTER (WHERE w.op = 'update'), 0)
               FROM public.fault_ledger l LEFT JOIN public.fault_writes w USING (txid)
               GROUP BY l.txid, l.run_id, l.batch_no, l.inserted, l.updated
               HAVING l.inserted <> coalesce(sum(w.row_count) FILTER (WHERE w.op = 'insert'), 0)
                   OR l.updated <> coalesce(sum(w.changed) FILTER (WHERE w.op = 'update'), 0)
                   OR coalesce(sum(w.row_count - w.changed)
                               FILTER (WHERE w.op = 'update'), 0) <> 0"""
        ).fetchall()
        assert not untrue, (
            "batches whose recorded counts differ from what they wrote "
            f"(run, batch, inserted, updated, rows inserted, rows changed, rows rewritten "
            f"unchanged): {untrue[:5]}"
        )
        sums = {
            run_id: (int(i), int(u), int(n))
            for run_id, i, u, n in conn.execute(
                """SELECT run_id, sum(inserted), sum(updated), count(*)
                   FROM public.fault_ledger GROUP BY run_id"""
            ).fetchall()
        }
        totals = conn.execute(
            """SELECT count(*), coalesce(sum(inserted), 0), coalesce(sum(updated), 0)
               FROM public.fault_ledger"""
        ).fetchone()
    assert totals is not None
    for run in sync_runs(db_url):
        inserted, updated, _ = sums.get(run.id, (0, 0, 0))
        c = run.counters
        if run.status in ("success", "partial"):
            assert (c["inserted"], c["updated"]) == (inserted, updated), (
                f"run {run.id} reports {c}, its batches wrote {inserted} inserts, {updated} updates"
            )
            assert c["processed"] == c["inserted"] + c["updated"] + c["unchanged"] + c["skipped"]
        else:
            assert c["inserted"] <= inserted, (run, inserted)
            assert c["updated"] <= updated, (run, updated)
    return {"batches": int(totals[0]), "inserted": int(totals[1]), "updated": int(totals[2])}


def skipped_records(db_url: str, run_id: int) -> list[tuple[str, str | None, str]]:
    """(key, raw_value, reason) of each skipped record kept for a run."""
    with psycopg.connect(db_url) as conn:
        return [
            (str(k), None if r is None else str(r), str(why))
            for k, r, why in conn.execute(
                "SELECT key, raw_value, reason FROM balsync.skipped_records WHERE run_id = %s",
                (run_id,),
            ).fetchall()
        ]


def overlaps(runs: Iterable[Run]) -> list[tuple[int, int]]:
    """Pairs of runs whose [started_at, finished_at] intervals overlap."""
    ordered = sorted(runs, key=lambda r: r.started_at)
    found = []
    for n, later in enumerate(ordered):
        for earlier in ordered[:n]:
            assert earlier.finished_at is not None, f"run {earlier.id} never finished"
            if later.started_at < earlier.finished_at:
                found.append((earlier.id, later.id))
    return found
