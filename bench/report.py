"""The results: medians with their spread, the comparison table, and bench/results.md."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# What balsync is held to; every figure is judged against these.
TARGET_FLOOR_RATIO = 1.3  # balsync at most 1.3 times the minimal end-to-end script
TARGET_FEW_CHANGES_RATIO = 1.1  # and 1.1 times where few or no values changed
TARGET_NAIVE_RATIO = 100.0  # balsync at least 100 times faster than the per-row loop
TARGET_RSS_MB = 80.0  # peak RSS at N and at 5N
TARGET_RSS_GROWTH = 1.1  # flat: peak RSS at 5N at most 1.1 times N's
# 10 000 changed of 5 000 000 keys, against a full sync of 10 000: no worse than 1.46x,
# what it measured before the memory moved into the rows.
TARGET_INCREMENTAL_RATIO = 1.46


@dataclass
class Samples:
    """Repeated measurements of one thing, in seconds (or MB)."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        """Record one measurement."""
        self.values.append(value)

    @property
    def median(self) -> float:
        """The median: what the table quotes on a noisy machine."""
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def low(self) -> float:
        """The smallest measurement."""
        return min(self.values) if self.values else float("nan")

    @property
    def high(self) -> float:
        """The largest measurement."""
        return max(self.values) if self.values else float("nan")

    def show(self, unit: str = "s") -> str:
        """Median, then min and max in brackets; a dash when nothing was measured."""
        if not self.values:
            return "—"
        if len(self.values) == 1:
            return f"{self.median:.2f} {unit}"
        return f"{self.median:.2f} {unit} ({self.low:.2f}–{self.high:.2f})"


def ratio(a: float, b: float) -> str:
    """a/b to two digits, or a dash when either is missing."""
    if not b or math.isnan(a) or math.isnan(b):
        return "—"
    return f"{a / b:.2f}×" if a / b < 10 else f"{a / b:.0f}×"


def verdict(ok: bool) -> str:
    """A target met or missed, greppable."""
    return "MET" if ok else "MISSED"


@dataclass(frozen=True)
class Machine:
    """Where the figures come from."""

    nproc: int
    memory_gib: float
    python: str
    redis_version: str
    postgres_version: str

    @classmethod
    def here(cls, redis_version: str, postgres_version: str) -> Machine:
        """This machine, with the servers' versions as they report them."""
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return cls(
            nproc=os.cpu_count() or 0,
            memory_gib=pages / 2**30,
            python=platform.python_version(),
            redis_version=redis_version,
            postgres_version=postgres_version,
        )


def code_version() -> str:
    """The commit measured, and whether the work tree had changes on top of it."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"],  # noqa: S607 - git from PATH, as a user has it
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return described + (" (uncommitted changes included)" if described.endswith("-dirty") else "")


def write_results(
    path: Path, text: str, machine: Machine, n: int, command: str, *, code: str
) -> None:
    """bench/results.md: the date, N, the machine, the servers, the command, the tables."""
    head = [
        "# balsync benchmark",
        "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- N: {n:,} keys".replace(",", " "),
        f"- machine: {machine.nproc} cores (nproc), {machine.memory_gib:.1f} GiB memory, "
        f"Python {machine.python}, {platform.platform()}",
        f"- servers: Redis {machine.redis_version}, PostgreSQL {machine.postgres_version}",
        f"- command: `{command}`",
        f"- code: {code}",
        "- a shared, noisy machine: quote medians and ratios, treat each figure as ±20 %",
        "",
    ]
    path.write_text("\n".join(head) + "\n" + text)
