"""balsync as a user runs it: a process of its own, timed from start to exit, with its peak RSS.

Peak RSS comes from `os.wait4(pid)`: the kernel hands back the resource usage of exactly the
child that was reaped (and of its own reaped children; balsync has none), so `ru_maxrss` is
that one process's high-water mark of resident memory, in KiB on Linux.
`getrusage(RUSAGE_CHILDREN)` would not do: it is the maximum over every child the harness
ever reaped, so a later, smaller run would report an earlier, larger one's peak. `wait4`
needs no intermediate process, no polling of /proc (which can miss the last peak) and no
/usr/bin/time (absent from slim images).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SYNC_COMMAND = (sys.executable, "-m", "balance_sync", "sync", "--force", "--json", "--quiet")
# --force would scan every key; --min-interval 0 only lifts the gate that a sync finished
# moments ago (the untimed full sync before it) would otherwise close.
INCREMENTAL_COMMAND = (
    sys.executable,
    "-m",
    "balance_sync",
    "sync",
    "--incremental",
    "--min-interval",
    "0",
    "--json",
    "--quiet",
)
STARTUP_COMMAND = (sys.executable, "-m", "balance_sync", "--version")


class RunFailed(RuntimeError):
    """balsync exited with a code other than 0 (success) or 1 (some records skipped)."""


@dataclass(frozen=True)
class ProcessRun:
    """One process: wall time from spawn to reaping, CPU time, peak RSS, exit code, stdout."""

    wall_s: float
    cpu_s: float
    max_rss_mb: float
    exit_code: int
    stdout: str

    def result(self) -> dict[str, object]:
        """balsync's JSON object."""
        data = json.loads(self.stdout)
        assert isinstance(data, dict)
        return data


def run_process(command: Sequence[str], env: Mapping[str, str]) -> ProcessRun:
    """Run `command` to its end; its stderr is kept only to explain a failure."""
    with tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=dict(env), stdout=subprocess.PIPE, stderr=stderr)
        try:
            assert proc.stdout is not None
            out = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            # Ctrl-C reaches balsync too (same process group); SIGTERM is for the rest.
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
            raise
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        if proc.returncode not in (0, 1):
            stderr.seek(0)
            raise RunFailed(
                f"{' '.join(command)} exited {proc.returncode}: "
                f"{stderr.read().decode(errors='replace').strip()[-2000:]}"
            )
    return ProcessRun(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        max_rss_mb=usage.ru_maxrss / 1024,
        exit_code=proc.returncode,
        stdout=out.decode(),
    )


def run_sync(env: Mapping[str, str]) -> ProcessRun:
    """`python -m balance_sync sync --force --json --quiet`, as cron would start it."""
    return run_process(SYNC_COMMAND, env)


def run_incremental_sync(env: Mapping[str, str]) -> ProcessRun:
    """`python -m balance_sync sync --incremental --min-interval 0 --json --quiet`."""
    return run_process(INCREMENTAL_COMMAND, env)
