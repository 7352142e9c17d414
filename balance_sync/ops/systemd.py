"""The systemd timers that start balsync (deploy/systemd/), as `systemctl list-timers` lists
them: where they run it, `status` shows their next start times instead of cron's.

systemd 251 and later print the list as JSON (`--output=json`), with exact times; older ones
print only their table, whose times are read in the machine's time zone.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

SYSTEMCTL_COMMAND_ENV = "BALSYNC_SYSTEMCTL_COMMAND"
PATTERN = "balsync*"
TIMEOUT_S = 5.0
_COLUMNS = ("NEXT", "LEFT", "LAST", "PASSED", "UNIT", "ACTIVATES")
_WHEN = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?: (\S+))?")


@dataclass(frozen=True)
class Timer:
    """One timer: its unit, the service it starts, when it fires next and fired last."""

    unit: str
    activates: str
    next_at: datetime | None
    last_at: datetime | None

    def to_json(self) -> dict[str, object]:
        """The timer for `status --json`; times in ISO 8601."""
        return {
            "unit": self.unit,
            "activates": self.activates,
            "next": None if self.next_at is None else self.next_at.isoformat(),
            "last": None if self.last_at is None else self.last_at.isoformat(),
        }


@dataclass(frozen=True)
class Systemctl:
    """The systemctl command (`systemctl --user` for a user's own timers)."""

    command: tuple[str, ...] = ("systemctl",)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Systemctl:
        """The command named by BALSYNC_SYSTEMCTL_COMMAND, else `systemctl`."""
        text = environ.get(SYSTEMCTL_COMMAND_ENV, "").split()
        return cls(tuple(text) if text else ("systemctl",))

    def balsync_timers(self) -> tuple[Timer, ...]:
        """balsync's timers, the next to fire first; none where systemd does not run."""
        try:
            done = subprocess.run(  # noqa: S603 - systemctl itself, no shell
                [*self.command, "list-timers", "--all", "--no-pager", "--output=json", PATTERN],
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return ()  # no systemctl here (cron, a container): nothing to show
        if done.returncode != 0:  # systemctl, but no systemd running ("not been booted …")
            return ()
        timers = parse_list_timers(done.stdout)
        far = datetime.max.replace(tzinfo=UTC)
        return tuple(sorted(timers, key=lambda t: (t.next_at or far, t.unit)))


def parse_list_timers(output: str) -> list[Timer]:
    """Timers from `systemctl list-timers` output: JSON, or the table of older systemd."""
    try:
        rows = json.loads(output)
    except ValueError:
        return _table(output.splitlines())
    return [
        Timer(
            unit=str(row.get("unit", "")),
            activates=str(row.get("activates", "")),
            next_at=_microseconds(row.get("next")),
            last_at=_microseconds(row.get("last")),
        )
        for row in rows
        if isinstance(row, dict)
    ]


def _microseconds(value: object) -> datetime | None:
    """systemd's JSON times: microseconds since the epoch, 0 or null for never."""
    if not isinstance(value, int) or value <= 0:
        return None
    return datetime.fromtimestamp(value / 1_000_000, UTC)


def _table(lines: Sequence[str]) -> list[Timer]:
    """The human table: columns found by the header's words, values cut at their offsets."""
    header = next((i for i, line in enumerate(lines) if line.startswith("NEXT ")), None)
    if header is None:
        return []
    starts = [lines[header].find(name) for name in _COLUMNS]
    if min(starts) < 0:
        return []
    bounds = [*zip(starts, [*starts[1:], None], strict=True)]
    timers = []
    for line in lines[header + 1 :]:
        if not line.strip():
            break  # "N timers listed." follows a blank line
        cell = {name: line[a:b].strip() for name, (a, b) in zip(_COLUMNS, bounds, strict=True)}
        timers.append(
            Timer(cell["UNIT"], cell["ACTIVATES"], _local(cell["NEXT"]), _local(cell["LAST"]))
        )
    return timers


def _local(text: str) -> datetime | None:
    """`Tue 2026-12-01 20:00:00 UTC` (or `n/a`): UTC where it says so, else local time."""
    found = _WHEN.search(text)
    if found is None:
        return None
    moment = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S")  # its zone: below
    if found.group(2) in ("UTC", "GMT"):
        return moment.replace(tzinfo=UTC)
    return moment.astimezone()  # systemctl prints the machine's own time zone
