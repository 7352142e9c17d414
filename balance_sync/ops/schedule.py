"""The cron schedule: balsync's crontab lines, its managed block in the user's crontab, and
when cron starts balsync next.

The crontab is read and written through the `crontab` command (`crontab -l`, `crontab -`),
as a person would, so cron notices the change. BALSYNC_CRONTAB_COMMAND names another
command line (`crontab -u balsync`, or a test's stand-in).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from balance_sync.errors import CrontabError

BEGIN_MARKER = "# BEGIN balsync (managed by balsync schedule)"
END_MARKER = "# END balsync"
CRONTAB_COMMAND_ENV = "BALSYNC_CRONTAB_COMMAND"
# Hourly, and a forced daily run that waits for the hourly one it meets at 02:00.
SCHEDULE = (
    ("0 * * * *", ("sync", "--quiet")),
    ("0 2 * * *", ("sync", "--force", "--wait", "1800", "--quiet")),
)
CRONTAB_TIMEOUT = 30.0

_ASSIGNMENT = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*=")
_CRON_TZ = re.compile(r"\s*CRON_TZ\s*=\s*['\"]?([^'\"\s]+)")
# `…/bin/balsync sync`, `balsync sync`, `python -m balance_sync sync`; not `$BALSYNC_ENV`
# nor a folder named balsync.
_INVOKES_BALSYNC = re.compile(r"(?:^|[\s/;&|('\"])balsync(?=$|[\s;&|)'\"])|-m\s+balance_sync\b")


@dataclass(frozen=True)
class CronEntry:
    """One crontab line that starts balsync."""

    line: str
    schedule: str  # the five time fields, or an @keyword
    command: str
    managed: bool  # inside the block `balsync schedule --install` maintains
    timezone: str | None = None  # from a CRON_TZ line above it, where the cron honours one


@dataclass(frozen=True)
class FireTime:
    """When cron starts an entry next."""

    at: datetime
    entry: CronEntry


@dataclass(frozen=True)
class InstalledSchedule:
    """What the user's crontab says about balsync; never an error, so status can show it."""

    crontab: Literal["present", "empty", "unavailable"]
    detail: str
    entries: tuple[CronEntry, ...] = ()
    next_runs: tuple[FireTime, ...] = ()


ScheduleAction = Literal["print", "install", "uninstall"]


@dataclass(frozen=True)
class ScheduleChange:
    """What `balsync schedule` printed, installed or removed."""

    action: ScheduleAction
    lines: tuple[str, ...]
    changed: bool = False
    unmanaged: tuple[str, ...] = ()  # balsync lines outside the block: each run would double

    def to_json(self) -> dict[str, object]:
        """The schedule object."""
        return {
            "action": self.action,
            "changed": self.changed,
            "lines": list(self.lines),
            "unmanaged": list(self.unmanaged),
        }


@dataclass(frozen=True)
class Crontab:
    """The current user's crontab, through the crontab command."""

    command: tuple[str, ...] = ("crontab",)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Crontab:
        """The crontab named by BALSYNC_CRONTAB_COMMAND, else the user's own."""
        text = environ.get(CRONTAB_COMMAND_ENV, "").strip()
        return cls(tuple(shlex.split(text)) if text else ("crontab",))

    def read(self) -> str | None:
        """The crontab's text, or None when the user has none."""
        done = self._run("-l", None)
        if done.returncode != 0:
            # Every cron (vixie, cronie, busybox) says "no crontab for USER" and exits 1.
            if "no crontab" in done.stderr.lower():
                return None
            raise CrontabError(
                f"`{self._shown} -l` failed: {_first_line(done.stderr)}",
                "check that this user may use cron (cron.allow, cron.deny)",
            )
        return done.stdout

    def write(self, text: str) -> None:
        """Replace the crontab with `text` (cron checks it and refuses a malformed one)."""
        done = self._run("-", text)
        if done.returncode != 0:
            raise CrontabError(
                f"`{self._shown} -` refused the new crontab: {_first_line(done.stderr)}",
                "the crontab was left as it was",
            )

    @property
    def _shown(self) -> str:
        return shlex.join(self.command)

    def _run(self, arg: str, stdin: str | None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(  # noqa: S603 - the user's own crontab command, no shell
                [*self.command, arg],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=CRONTAB_TIMEOUT,
                check=False,
            )
        except FileNotFoundError as exc:
            raise CrontabError(
                f"crontab is not installed (no `{self.command[0]}` command)",
                "install cron (Debian: apt-get install cron), or use a systemd timer or a "
                f"Kubernetes CronJob (see deploy/); {CRONTAB_COMMAND_ENV} names another command",
            ) from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CrontabError(f"cannot run `{self._shown} {arg}`: {exc}") from exc


def balsync_command(argv0: str) -> tuple[str, ...]:
    """How cron should start this installation of balsync: by an absolute path.

    `argv0` is how this process was started (`sys.argv[0]`).
    """
    started = Path(argv0)
    if started.name == "balsync" and started.is_file():
        return (str(started.resolve()),)
    if started.name == "__main__.py" and started.parent.name == "balance_sync":
        return (sys.executable, "-m", "balance_sync")
    found = shutil.which("balsync")
    if found:
        return (str(Path(found).resolve()),)
    return (sys.executable, "-m", "balance_sync")


def schedule_lines(command: Sequence[str], log_file: Path | None) -> tuple[str, ...]:
    """balsync's crontab block: markers, the hourly and the daily entry."""
    program = shlex.join(command)
    log = f" --log-file {shlex.quote(str(log_file.absolute()))}" if log_file else ""
    entries = (f"{when} {program} {shlex.join(args)}{log}" for when, args in SCHEDULE)
    # cron turns an unescaped % in a command into a newline.
    return (BEGIN_MARKER, *(entry.replace("%", r"\%") for entry in entries), END_MARKER)


def install(crontab: Crontab, lines: Sequence[str]) -> ScheduleChange:
    """Put balsync's block into the crontab, replacing an earlier one in place; idempotent.

    Every other line stays as it was.
    """
    current = crontab.read() or ""
    outside, at = _split(current)
    if at is None:
        before, after = outside, []
        if before and before[-1].strip():
            before = [*before, ""]
    else:
        before, after = outside[:at], outside[at:]
    text = _join([*before, *lines, *after])
    changed = text != current
    if changed:
        crontab.write(text)
    return ScheduleChange("install", tuple(lines), changed, _unmanaged(outside))


def uninstall(crontab: Crontab, lines: Sequence[str]) -> ScheduleChange:
    """Remove balsync's block from the crontab, leaving every other line; idempotent."""
    current = crontab.read()
    if current is None:
        return ScheduleChange("uninstall", tuple(lines))
    outside, at = _split(current)
    if at is None:
        return ScheduleChange("uninstall", tuple(lines), False, _unmanaged(outside))
    if at > 0 and not outside[at - 1].strip() and (at == len(outside) or not outside[at].strip()):
        del outside[at - 1]  # the blank line `install` put before the block
    crontab.write(_join(outside))
    return ScheduleChange("uninstall", tuple(lines), True, _unmanaged(outside))


def change_schedule(
    crontab: Crontab,
    action: ScheduleAction,
    argv0: str,
    log_file: Path | None,
) -> ScheduleChange:
    """balsync's lines for this installation (`argv0`), printed only, installed or removed.

    Raises CrontabError when the crontab command fails or the crontab's block is broken.
    """
    lines = schedule_lines(balsync_command(argv0), log_file)
    if action == "install":
        return install(crontab, lines)
    if action == "uninstall":
        return uninstall(crontab, lines)
    return ScheduleChange("print", lines)


def balsync_entries(text: str) -> list[CronEntry]:
    """The lines of a crontab that start balsync, with the CRON_TZ in force for each."""
    entries: list[CronEntry] = []
    managed = False
    timezone: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped == BEGIN_MARKER:
            managed = True
            continue
        if stripped == END_MARKER:
            managed = False
            continue
        if not stripped or stripped.startswith("#"):
            continue
        if _ASSIGNMENT.match(line):
            tz = _CRON_TZ.match(line)
            if tz:
                timezone = tz.group(1)
            continue
        if stripped.startswith("@"):
            parts = stripped.split(None, 1)
            schedule, command = parts[0], parts[1] if len(parts) > 1 else ""
        else:
            parts = stripped.split(None, 5)
            if len(parts) < 6:
                continue
            schedule, command = " ".join(parts[:5]), parts[5]
        if managed or _INVOKES_BALSYNC.search(command):
            entries.append(CronEntry(stripped, schedule, command, managed, timezone))
    return entries


def next_fire_times(entries: Iterable[CronEntry], now: datetime, count: int = 3) -> list[FireTime]:
    """The next `count` times cron starts any of `entries` after `now` (an aware datetime).

    cron reads the time fields as wall-clock time of the machine (or of CRON_TZ), so they
    are computed on that clock and then made aware.
    """
    times: list[FireTime] = []
    for entry in entries:
        if not croniter.is_valid(entry.schedule):  # @reboot, or a line cron rejects too
            continue
        zone = _zone(entry.timezone)
        start = now.astimezone(zone) if zone else now.astimezone().replace(tzinfo=None)
        it = croniter(entry.schedule, start)
        for _ in range(count):
            at = it.get_next(datetime)
            times.append(FireTime(at if zone else at.astimezone(), entry))
    times.sort(key=lambda fire: fire.at)
    return times[:count]


def installed_schedule(crontab: Crontab, now: datetime, count: int = 3) -> InstalledSchedule:
    """What the crontab holds for balsync and when it fires next; a missing cron is said."""
    try:
        text = crontab.read()
    except CrontabError as exc:
        return InstalledSchedule("unavailable", exc.message)
    if text is None:
        return InstalledSchedule(
            "empty", "this user has no crontab; `balsync schedule --install` adds one"
        )
    entries = tuple(balsync_entries(text))
    if not entries:
        return InstalledSchedule(
            "present",
            "the crontab starts no balsync; `balsync schedule --install` adds the entries",
        )
    managed = sum(entry.managed for entry in entries)
    detail = f"{len(entries)} crontab entr{'y' if len(entries) == 1 else 'ies'} start balsync"
    if managed:
        detail += f" ({managed} managed by `balsync schedule`)"
    return InstalledSchedule(
        "present", detail, entries, tuple(next_fire_times(entries, now, count))
    )


def _split(text: str) -> tuple[list[str], int | None]:
    """The crontab's lines without balsync's block(s), and where the first block stood."""
    outside: list[str] = []
    at: int | None = None
    inside = False
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped == BEGIN_MARKER:
            if inside:
                raise _broken(f"line {number} opens a second block before the first is closed")
            inside = True
            at = len(outside) if at is None else at
        elif stripped == END_MARKER:
            if not inside:
                raise _broken(f"line {number} closes a block that was never opened")
            inside = False
        elif not inside:
            outside.append(line)
    if inside:
        raise _broken(f"the block opened by {BEGIN_MARKER!r} is never closed")
    return outside, at


def _broken(what: str) -> CrontabError:
    return CrontabError(
        f"balsync's block in the crontab is broken: {what}",
        f"fix it with `crontab -e` ({BEGIN_MARKER!r} … {END_MARKER!r}), then run this again",
    )


def _unmanaged(lines: Sequence[str]) -> tuple[str, ...]:
    return tuple(entry.line for entry in balsync_entries("\n".join(lines)))


def _join(lines: Sequence[str]) -> str:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    # cron ignores a last line without its newline.
    return "\n".join(lines) + "\n" if lines else ""


def _zone(name: str | None) -> ZoneInfo | None:
    if name is None:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else "no message"
