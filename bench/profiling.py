"""Profile mode: one sync in this process, under a profiler, on every thread it starts.

balsync reads Redis on a thread of its own while the main thread writes PostgreSQL, and a
profiler follows only the thread it was started on. So `threading.Thread.run` is wrapped for
the duration of the run: every thread balsync starts gets a profiler of its own, and each
thread's profile is printed under its name. pyinstrument (the default) samples wall time,
so the main thread's waits for the reader (`queue.get`) and for PostgreSQL show as such;
cProfile counts every call, which inflates per-record Python work but shows call counts.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import json
import os
import pstats
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import psycopg

from bench.harness import BALSYNC, Bench, Config
from bench.scratch import Scratch

Profiler = Literal["pyinstrument", "cprofile"]
SYNC_ARGS = ["sync", "--force", "--json", "--quiet"]
STATEMENT_WIDTH = 160


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _every_thread(start: Callable[[], Any], stop: Callable[[Any, str], None]) -> Iterator[None]:
    """Run `start()` at the top of every new thread and `stop(handle, name)` at its end."""
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        handle = start()
        try:
            original(self)
        finally:
            stop(handle, self.name)

    threading.Thread.run = run  # type: ignore[method-assign]
    try:
        yield
    finally:
        threading.Thread.run = original  # type: ignore[method-assign]


def _invoke_sync() -> tuple[int, str]:
    """`balsync sync --force --json --quiet` in-process: (exit code, stdout)."""
    from balance_sync.cli import cli

    out = io.StringIO()
    code: int = 0
    with contextlib.redirect_stdout(out):
        try:
            cli.main(args=SYNC_ARGS, prog_name="balsync", standalone_mode=False)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue().strip()


def _with_pyinstrument(top: int) -> tuple[int, str, float, str]:
    from pyinstrument import Profiler as Sampler

    profiles: list[tuple[str, Sampler]] = []

    def start() -> Sampler:
        profiler = Sampler(interval=0.001, async_mode="disabled")
        profiler.start()
        return profiler

    def stop(profiler: Sampler, name: str) -> None:
        profiler.stop()
        profiles.append((name, profiler))

    main = start()
    started = time.perf_counter()
    with _every_thread(start, stop):
        try:
            code, stdout = _invoke_sync()
        finally:
            stop(main, "MainThread")
    elapsed = time.perf_counter() - started
    parts = []
    for name, profiler in [profiles[-1], *profiles[:-1]]:
        tree = profiler.output_text(unicode=True, color=False, short_mode=False)
        flat = profiler.output_text(unicode=True, color=False, flat=True)
        flat_top = "\n".join(flat.splitlines()[: top + 8])
        parts.append(f"## thread {name}\n\n{tree}\n### self time, flat\n\n{flat_top}\n")
    return code, stdout, elapsed, "\n".join(parts)


def _with_cprofile(top: int) -> tuple[int, str, float, str]:
    profiles: list[cProfile.Profile] = []

    def start() -> cProfile.Profile:
        profiler = cProfile.Profile()
        profiler.enable()
        return profiler

    def stop(profiler: cProfile.Profile, name: str) -> None:
        profiler.disable()
        profiles.append(profiler)

    main = start()
    started = time.perf_counter()
    with _every_thread(start, stop):
        try:
            code, stdout = _invoke_sync()
        finally:
            stop(main, "MainThread")
    elapsed = time.perf_counter() - started
    text = io.StringIO()
    stats = pstats.Stats(profiles[0], stream=text)
    for profiler in profiles[1:]:
        stats.add(profiler)
    text.write("## all threads, by own time\n")
    stats.sort_stats("tottime").print_stats(top)
    text.write("## all threads, by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(top)
    return code, stdout, elapsed, text.getvalue()


class StatementTimes:
    """Wall time of every SQL statement balsync sends, summed by statement, all threads.

    A sampling profiler shows only that a writer waits in `Connection.execute`; this says on
    which statement. `psycopg.Connection.execute` is wrapped for the duration of the run.
    """

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}  # statement -> [seconds, calls]
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Time every `Connection.execute` while inside."""
        original = psycopg.Connection.execute
        times = self

        def execute(conn: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(conn, query, *args, **kwargs)
            finally:
                times.add(conn, query, time.perf_counter() - started)

        psycopg.Connection.execute = execute  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            psycopg.Connection.execute = original  # type: ignore[method-assign]

    def add(self, conn: Any, query: Any, seconds: float) -> None:
        """Count one statement."""
        try:
            text = query if isinstance(query, str) else query.as_string(conn)
        except (psycopg.Error, AttributeError, TypeError):
            text = repr(query)
        key = " ".join(str(text).split())[:STATEMENT_WIDTH]
        with self._lock:
            total = self.totals.setdefault(key, [0.0, 0])
            total[0] += seconds
            total[1] += 1

    def render(self, top: int) -> str:
        """The statements by total time, the costliest first."""
        rows = sorted(self.totals.items(), key=lambda item: -item[1][0])[:top]
        lines = ["## SQL statements by total wall time (both writers add up)", ""]
        lines += ["| seconds | calls | statement |", "|---|---|---|"]
        lines += [f"| {t:.2f} | {int(c)} | `{q}` |" for q, (t, c) in rows]
        return "\n".join(lines) + "\n"


def profile_scenario(
    config: Config,
    scenario: str,
    profiler: Profiler = "pyinstrument",
    top: int = 30,
    progress: Callable[[str], None] = lambda line: None,
) -> str:
    """Seed N keys, prepare `scenario`, run one sync in-process under `profiler`; the report."""
    with Scratch(config.admin_url, config.redis_url) as scratch:
        bench = Bench(config, scratch, progress)
        progress(f"seeding {config.n} keys under {scratch.prefix}")
        scratch.seed(config.n)
        progress(f"preparing {scenario}")
        bench.start_round(scenario, [BALSYNC])
        scratch.settle()
        progress(f"profiling one sync with {profiler}")
        statements = StatementTimes()
        with _environment(bench.env), statements.recording():
            run = _with_pyinstrument if profiler == "pyinstrument" else _with_cprofile
            code, stdout, elapsed, text = run(top)
        bench.check("balsync (profiled)", scenario, *_counts(stdout))
    head = [
        f"# Profile of `balsync sync` in-process: {scenario}, N = {config.n}",
        "",
        f"exit code {code}, {elapsed:.2f} s under {profiler}; result: {stdout}",
    ]
    head += [f"ANOMALY: {line}" for line in bench.results.anomalies]
    return "\n".join(head) + "\n\n" + statements.render(top) + "\n" + text


def _counts(stdout: str) -> tuple[int, int, int]:
    try:
        data = json.loads(stdout)
        return int(data["processed"]), int(data["inserted"]), int(data["updated"])
    except (ValueError, KeyError, TypeError):
        return -1, -1, -1
