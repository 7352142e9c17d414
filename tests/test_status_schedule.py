"""`balsync status` and `balsync schedule`.

The crontab is reached through BALSYNC_CRONTAB_COMMAND, pointed at a small stand-in script
that keeps the crontab in a file of the test's own: the machine's real crontab is never
read or written here.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import psycopg
import pytest

from balance_sync.ops.schedule import (
    BEGIN_MARKER,
    END_MARKER,
    CronEntry,
    balsync_command,
    balsync_entries,
    next_fire_times,
    schedule_lines,
)
from balance_sync.settings import TableName
from balance_sync.stores.postgres import Database, TableLock
from tests.helpers import Balsync
from tests.support.devservers import free_port

Conn = psycopg.Connection[tuple[object, ...]]

FAKE_CRONTAB = """#!/bin/sh
# A stand-in for crontab(1): -l prints the file, - replaces it with stdin.
file="$(dirname "$0")/crontab.txt"
case "$1" in
  -l) if [ -f "$file" ]; then cat "$file"; else echo "no crontab for tester" >&2; exit 1; fi ;;
  -) cat > "$file" ;;
  *) echo "usage: crontab [-l | -]" >&2; exit 2 ;;
esac
"""


@dataclass
class FakeCrontab:
    """The stand-in crontab command and the file it keeps the crontab in."""

    command: Path
    file: Path

    @property
    def env(self) -> dict[str, str]:
        """The environment that points balsync at this crontab."""
        return {"BALSYNC_CRONTAB_COMMAND": str(self.command)}

    def text(self) -> str | None:
        """The crontab as installed, or None when there is none."""
        return self.file.read_text() if self.file.exists() else None


@pytest.fixture
def crontab(tmp_path: Path) -> FakeCrontab:
    """An empty crontab (none installed) behind a stand-in crontab command."""
    folder = tmp_path / "cron"
    folder.mkdir()
    command = folder / "crontab"
    command.write_text(FAKE_CRONTAB)
    command.chmod(0o755)
    return FakeCrontab(command, folder / "crontab.txt")


@pytest.fixture
def cron(balsync: Balsync, crontab: FakeCrontab) -> Balsync:
    """The CLI, with the stand-in crontab."""
    balsync.env.update(crontab.env)
    return balsync


def add_run(pg: Conn, status: str, host: str = "elsewhere", pid: int = 1) -> int:
    """A run record made by hand; a running one has no end yet."""
    finished = None if status == "running" else datetime.now(UTC)
    row = pg.execute(
        """INSERT INTO balsync.sync_runs
               (target_table, key_prefix, finished_at, status, duration_s, processed,
                host, pid, version)
           VALUES ('public.user_balances', 'balance:', %s, %s, %s, 12, %s, %s, 'test')
           RETURNING id""",
        (finished, status, None if finished is None else 2.5, host, pid),
    ).fetchone()
    assert row is not None
    return int(cast(int, row[0]))  # sync_runs.id: a bigint


def status_json(balsync: Balsync) -> dict[str, object]:
    """Run `balsync status --json`, insisting on exit 0."""
    return json.loads(balsync.ok("status", "--json").stdout)  # type: ignore[no-any-return]


# -- status ----------------------------------------------------------------------------------


def test_idle_status_shows_the_last_run(cron: Balsync) -> None:
    """No sync running: running false, the last run's outcome, no crontab said plainly."""
    cron.ok("init-db")
    cron.ok("sync")
    data = status_json(cron)
    assert data["running"] is False
    assert data["lock_holder"] is None
    assert data["current_run"] is None
    assert data["abandoned_run"] is None
    last = data["last_run"]
    assert isinstance(last, dict)
    assert last["status"] == "success"
    assert data["schedule"] == {
        "crontab": "empty",
        "detail": "this user has no crontab; `balsync schedule --install` adds one",
        "entries": [],
        "next_runs": [],
    }
    out = cron.ok("status").stdout
    assert "no sync is running" in out
    assert f"run {last['id']} success" in out
    assert "this user has no crontab" in out


def test_a_running_sync_is_shown_with_its_lock_holder(
    cron: Balsync, pg: Conn, database_url: str
) -> None:
    """A held advisory lock and a running record: backend pid, application, host, pid, since."""
    cron.ok("init-db")
    finished = add_run(pg, "success")
    running = add_run(pg, "running", host="worker-7", pid=4242)
    holder = Database(database_url, 5)  # takes the lock as a sync does
    try:
        assert TableLock(holder).try_lock(TableName("user_balances"), 0)
        backend_pid = holder.backend_pid
        data = status_json(cron)
        out = cron.ok("status").stdout
    finally:
        holder.close()
    assert data["running"] is True
    lock = data["lock_holder"]
    assert isinstance(lock, dict)
    assert lock["backend_pid"] == backend_pid
    assert lock["application_name"] == "balsync"
    assert lock["backend_start"] is not None
    current = data["current_run"]
    assert isinstance(current, dict)
    assert (current["id"], current["host"], current["pid"]) == (running, "worker-7", 4242)
    assert data["abandoned_run"] is None
    assert data["last_run"]["id"] == finished  # type: ignore[index]
    assert "a sync holds the lock" in out
    assert "worker-7" in out
    assert "4242" in out
    assert str(backend_pid) in out


def test_a_lock_on_another_table_is_not_a_running_sync(
    cron: Balsync, pg: Conn, database_url: str
) -> None:
    """Only the target table's own lock counts."""
    cron.ok("init-db")
    pg.execute("CREATE TABLE other_table (telegram_id bigint PRIMARY KEY, balance numeric)")
    other = Database(database_url, 5)
    try:
        assert TableLock(other).try_lock(TableName("other_table"), 0)
        assert status_json(cron)["running"] is False
    finally:
        other.close()


def test_a_running_record_without_a_lock_is_abandoned(cron: Balsync, pg: Conn) -> None:
    """A record marked running that nobody holds the lock for belongs to a dead process."""
    cron.ok("init-db")
    dead = add_run(pg, "running", host="gone", pid=777)
    data = status_json(cron)
    assert data["running"] is False
    assert data["abandoned_run"]["id"] == dead  # type: ignore[index]
    assert data["current_run"] is None
    assert data["last_run"] is None
    out = cron.ok("status").stdout
    assert "died" in out
    assert "none recorded" in out


def test_status_lists_balsync_entries_and_the_next_three_runs(
    cron: Balsync, crontab: FakeCrontab
) -> None:
    """Crontab entries that start balsync, managed or not, and the next 3 start times."""
    crontab.file.write_text(
        "MAILTO=ops@example.com\n"
        "BALSYNC_ENV=/etc/balsync/env\n"
        "30 4 * * * /usr/bin/backup --all\n"
        '15 * * * * . "$BALSYNC_ENV" && /opt/balsync/.venv/bin/balsync verify --quiet\n'
        f"{BEGIN_MARKER}\n"
        "0 * * * * /opt/balsync/.venv/bin/balsync sync --quiet\n"
        f"{END_MARKER}\n"
    )
    cron.ok("init-db")
    data = status_json(cron)
    schedule = data["schedule"]
    assert isinstance(schedule, dict)
    assert schedule["crontab"] == "present"
    assert schedule["detail"] == "2 crontab entries start balsync (1 managed by `balsync schedule`)"
    assert [(e["schedule"], e["managed"]) for e in schedule["entries"]] == [
        ("15 * * * *", False),
        ("0 * * * *", True),
    ]
    times = [datetime.fromisoformat(fire["at"]) for fire in schedule["next_runs"]]
    assert len(times) == 3
    assert times == sorted(times)
    assert all(t > datetime.now(UTC) for t in times)
    assert {t.minute for t in times} <= {0, 15}
    assert "/usr/bin/backup" not in json.dumps(schedule)
    out = cron.ok("status").stdout
    assert "next runs" in out
    assert "balsync verify --quiet" in out


def test_status_says_when_the_crontab_has_no_balsync(cron: Balsync, crontab: FakeCrontab) -> None:
    """A crontab without balsync lines is reported, with how to add them."""
    crontab.file.write_text("30 4 * * * /usr/bin/backup\n")
    cron.ok("init-db")
    schedule = status_json(cron)["schedule"]
    assert schedule["crontab"] == "present"  # type: ignore[index]
    assert "starts no balsync" in schedule["detail"]  # type: ignore[index]


def test_status_without_crontab_installed_says_so_and_exits_0(
    balsync: Balsync, tmp_path: Path
) -> None:
    """No crontab command on the machine: status reports it instead of failing."""
    balsync.ok("init-db")
    env = {"BALSYNC_CRONTAB_COMMAND": str(tmp_path / "no" / "crontab")}
    result = balsync("status", "--json", env=env)
    assert result.exit_code == 0
    schedule = json.loads(result.stdout)["schedule"]
    assert schedule["crontab"] == "unavailable"
    assert schedule["detail"].startswith("crontab is not installed")
    assert "crontab is not installed" in balsync("status", env=env).stdout


def test_status_reports_a_crontab_that_fails(balsync: Balsync, tmp_path: Path) -> None:
    """A crontab command that fails for another reason is reported with its message."""
    failing = tmp_path / "crontab"
    failing.write_text("#!/bin/sh\necho 'you are not allowed to use this program' >&2\nexit 1\n")
    failing.chmod(0o755)
    balsync.ok("init-db")
    result = balsync("status", "--json", env={"BALSYNC_CRONTAB_COMMAND": str(failing)})
    schedule = json.loads(result.stdout)["schedule"]
    assert schedule["crontab"] == "unavailable"
    assert "you are not allowed" in schedule["detail"]


def test_status_quiet_prints_nothing(cron: Balsync) -> None:
    """--quiet prints nothing."""
    cron.ok("init-db")
    result = cron.ok("status", "-q")
    assert (result.stdout, result.stderr) == ("", "")


def test_status_before_init_db_exits_5(cron: Balsync) -> None:
    """Without balsync's schema status says to run init-db, exit 5."""
    result = cron("status")
    assert result.exit_code == 5
    assert "init-db" in result.stderr


def test_status_with_postgres_unreachable_exits_4(cron: Balsync) -> None:
    """PostgreSQL down: exit 4 after the retry budget; status does not need Redis."""
    env = {
        "BALSYNC_DATABASE_URL": f"postgresql://balsync@127.0.0.1:{free_port()}/app",
        "BALSYNC_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    result = cron("status", "--retry-timeout", "0.3", env=env)
    assert result.exit_code == 4
    assert "PostgreSQL" in result.stderr


# -- cron arithmetic and crontab parsing ----------------------------------------------------


def entry(schedule: str, timezone: str | None = None) -> CronEntry:
    """A crontab entry starting balsync on `schedule`."""
    return CronEntry(f"{schedule} balsync sync", schedule, "balsync sync", False, timezone)


def test_next_fire_times_merge_entries_in_order() -> None:
    """The next 3 times over all entries, soonest first, each with its entry (local time)."""
    now = datetime(2024, 1, 1, 1, 30).astimezone()
    hourly, daily = entry("0 * * * *"), entry("0 2 * * *")
    fires = next_fire_times([hourly, daily], now, 3)
    assert [(f.at.hour, f.at.minute) for f in fires] == [(2, 0), (2, 0), (3, 0)]
    assert {fires[0].entry, fires[1].entry} == {hourly, daily}
    assert all(f.at.tzinfo is not None for f in fires)


def test_next_fire_times_honour_cron_tz_and_skip_reboot() -> None:
    """An entry under CRON_TZ is computed on that zone's clock; @reboot has no next time."""
    now = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    fires = next_fire_times([entry("0 2 * * *", "Asia/Tokyo"), entry("@reboot")], now, 2)
    assert [f.at.astimezone(UTC) for f in fires] == [
        datetime(2024, 6, 1, 17, 0, tzinfo=UTC),
        datetime(2024, 6, 2, 17, 0, tzinfo=UTC),
    ]


def test_balsync_entries_find_only_lines_that_start_balsync() -> None:
    """Comments, variables, other jobs and $BALSYNC_ENV alone are not balsync entries."""
    text = (
        "# 0 * * * * balsync sync\n"
        "CRON_TZ=Europe/Berlin\n"
        "BALSYNC_ENV=/etc/balsync/env\n"
        '5 * * * * . "$BALSYNC_ENV" && /usr/bin/other\n'
        "5 * * * * /opt/balsync/bin/run-other\n"
        "@daily /usr/local/bin/balsync sync --force\n"
        "0 3 * * 1 cd /srv && python -m balance_sync verify\n"
        "*/5 * * * * balsync status --quiet\n"
        "@reboot\n"
    )
    entries = balsync_entries(text)
    assert [e.schedule for e in entries] == ["@daily", "0 3 * * 1", "*/5 * * * *"]
    assert {e.timezone for e in entries} == {"Europe/Berlin"}
    assert not any(e.managed for e in entries)


# -- schedule ------------------------------------------------------------------------------


def test_schedule_prints_the_lines_and_touches_no_crontab(
    cron: Balsync, crontab: FakeCrontab
) -> None:
    """Without flags: the block with the hourly and daily lines by absolute path; no crontab."""
    result = cron.ok("schedule")
    lines = result.stdout.splitlines()
    assert lines[0] == BEGIN_MARKER
    assert lines[-1] == END_MARKER
    hourly, daily = lines[1], lines[2]
    assert hourly.startswith("0 * * * * /")
    assert hourly.endswith(" sync --quiet")
    assert daily.startswith("0 2 * * * /")
    assert daily.endswith(" sync --force --wait 1800 --quiet")
    assert "empty environment" in result.stderr
    assert crontab.text() is None


def test_scheduled_command_runs_this_installation(cron: Balsync) -> None:
    """The program in the lines is an absolute path that starts this balsync."""
    data = json.loads(cron.ok("schedule", "--json").stdout)
    assert data["action"] == "print"
    assert data["changed"] is False
    hourly = shlex.split(data["lines"][1])
    program = hourly[5 : hourly.index("sync")]
    assert Path(program[0]).is_absolute()
    done = subprocess.run([*program, "--version"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "balsync" in done.stdout


def test_log_file_setting_is_passed_as_an_absolute_path(
    cron: Balsync, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--log-file (relative here) reaches both lines as an absolute, quoted path; % escaped."""
    monkeypatch.chdir(tmp_path)
    data = json.loads(cron.ok("schedule", "--json", "--log-file", "logs/100% sync.log").stdout)
    expected = shlex.quote(str(tmp_path / "logs" / "100% sync.log")).replace("%", r"\%")
    for line in data["lines"][1:3]:
        assert line.endswith(f" --log-file {expected}")


def test_install_twice_gives_one_block_and_keeps_other_entries(
    cron: Balsync, crontab: FakeCrontab
) -> None:
    """--install adds the block once, after the other lines, which stay untouched."""
    original = "MAILTO=ops@example.com\n30 4 * * * /usr/bin/backup --all\n"
    crontab.file.write_text(original)
    first = cron.ok("schedule", "--install")
    assert "installed balsync's schedule" in first.stdout
    installed = crontab.text()
    assert installed is not None
    assert installed.startswith(original + "\n" + BEGIN_MARKER + "\n")
    assert installed.endswith(END_MARKER + "\n")
    second = json.loads(cron.ok("schedule", "--install", "--json").stdout)
    assert second["action"] == "install"
    assert second["changed"] is False
    assert crontab.text() == installed
    assert installed.count(BEGIN_MARKER) == 1
    assert "already installed" in cron.ok("schedule", "--install").stdout


def test_install_into_no_crontab_creates_one(cron: Balsync, crontab: FakeCrontab) -> None:
    """With no crontab yet, --install writes one holding just the block."""
    data = json.loads(cron.ok("schedule", "--install", "--json").stdout)
    assert data["changed"] is True
    assert crontab.text() == "\n".join(data["lines"]) + "\n"


def test_install_replaces_an_older_block_in_place(cron: Balsync, crontab: FakeCrontab) -> None:
    """An older block is replaced where it stands; the lines around it stay in order."""
    crontab.file.write_text(
        "MAILTO=ops@example.com\n"
        f"{BEGIN_MARKER}\n"
        "0 * * * * /old/bin/balsync sync\n"
        f"{END_MARKER}\n"
        "30 4 * * * /usr/bin/backup\n"
    )
    data = json.loads(cron.ok("schedule", "--install", "--json").stdout)
    assert data["changed"] is True
    assert (
        crontab.text()
        == "\n".join(["MAILTO=ops@example.com", *data["lines"], "30 4 * * * /usr/bin/backup"])
        + "\n"
    )


def test_uninstall_removes_only_the_block(cron: Balsync, crontab: FakeCrontab) -> None:
    """--uninstall after --install gives back the crontab as it was; again, nothing changes."""
    original = "MAILTO=ops@example.com\n30 4 * * * /usr/bin/backup --all\n"
    crontab.file.write_text(original)
    cron.ok("schedule", "--install")
    result = cron.ok("schedule", "--uninstall")
    assert "removed balsync's schedule" in result.stdout
    assert crontab.text() == original
    again = json.loads(cron.ok("schedule", "--uninstall", "--json").stdout)
    assert (again["action"], again["changed"]) == ("uninstall", False)
    assert "nothing to remove" in cron.ok("schedule", "--uninstall").stdout
    assert crontab.text() == original


def test_uninstall_without_a_crontab_changes_nothing(cron: Balsync, crontab: FakeCrontab) -> None:
    """--uninstall when the user has no crontab: nothing to do, none created."""
    data = json.loads(cron.ok("schedule", "--uninstall", "--json").stdout)
    assert data["changed"] is False
    assert crontab.text() is None


def test_install_warns_about_balsync_lines_outside_the_block(
    cron: Balsync, crontab: FakeCrontab
) -> None:
    """A hand-written balsync line next to the block would double every run: warned."""
    crontab.file.write_text("0 * * * * /opt/balsync/.venv/bin/balsync sync --quiet\n")
    result = cron.ok("schedule", "--install")
    assert "outside the managed block" in result.stderr
    assert "/opt/balsync/.venv/bin/balsync sync --quiet" in result.stderr
    data = json.loads(cron.ok("schedule", "--install", "--json").stdout)
    assert data["unmanaged"] == ["0 * * * * /opt/balsync/.venv/bin/balsync sync --quiet"]


def test_install_and_uninstall_together_is_a_usage_error(
    cron: Balsync, crontab: FakeCrontab
) -> None:
    """--install with --uninstall: exit 2, crontab untouched."""
    result = cron("schedule", "--install", "--uninstall")
    assert result.exit_code == 2
    assert "exclude each other" in result.stderr
    assert crontab.text() is None


@pytest.mark.parametrize("flag", ["--install", "--uninstall"])
def test_without_crontab_installed_exits_5(balsync: Balsync, tmp_path: Path, flag: str) -> None:
    """No crontab command: --install and --uninstall say so clearly, exit 5."""
    env = {"BALSYNC_CRONTAB_COMMAND": str(tmp_path / "missing" / "crontab")}
    result = balsync("schedule", flag, env=env)
    assert result.exit_code == 5
    assert "crontab is not installed" in result.stderr
    assert balsync("schedule", env=env).exit_code == 0  # printing needs no crontab


@pytest.mark.parametrize(
    "block",
    [
        f"{BEGIN_MARKER}\n0 * * * * balsync sync\n",
        f"0 * * * * balsync sync\n{END_MARKER}\n",
        f"{BEGIN_MARKER}\n{BEGIN_MARKER}\n{END_MARKER}\n",
    ],
)
def test_a_broken_block_is_refused_and_left_alone(
    cron: Balsync, crontab: FakeCrontab, block: str
) -> None:
    """Unmatched markers: exit 5 with what to fix; the crontab is not rewritten."""
    text = "30 4 * * * /usr/bin/backup\n" + block
    crontab.file.write_text(text)
    for flag in ("--install", "--uninstall"):
        result = cron("schedule", flag)
        assert result.exit_code == 5
        assert "block in the crontab is broken" in result.stderr
    assert crontab.text() == text


def test_a_crontab_that_refuses_the_new_text_exits_5(balsync: Balsync, tmp_path: Path) -> None:
    """`crontab -` failing (e.g. cron rejects the file) is exit 5 with its message."""
    command = tmp_path / "crontab"
    command.write_text(
        '#!/bin/sh\n[ "$1" = "-l" ] && exit 0\necho "errors in crontab file" >&2\nexit 1\n'
    )
    command.chmod(0o755)
    result = balsync("schedule", "--install", env={"BALSYNC_CRONTAB_COMMAND": str(command)})
    assert result.exit_code == 5
    assert "errors in crontab file" in result.stderr


def test_quiet_install_prints_nothing(cron: Balsync, crontab: FakeCrontab) -> None:
    """--quiet --install installs silently."""
    result = cron.ok("schedule", "--install", "--quiet")
    assert (result.stdout, result.stderr) == ("", "")
    assert crontab.text() is not None


def test_crontab_command_may_carry_arguments(balsync: Balsync, crontab: FakeCrontab) -> None:
    """BALSYNC_CRONTAB_COMMAND is a command line (e.g. `crontab -u balsync`), split like a shell."""
    wrapper = crontab.command.parent / "with-user"
    wrapper.write_text(
        f'#!/bin/sh\n[ "$1" = "-u" ] || exit 9\nshift 2\nexec {crontab.command} "$@"\n'
    )
    wrapper.chmod(0o755)
    env = {"BALSYNC_CRONTAB_COMMAND": f"{wrapper} -u balsync"}
    balsync.ok("schedule", "--install", env=env)
    assert BEGIN_MARKER in (crontab.text() or "")


def test_balsync_command_prefers_the_running_program(tmp_path: Path) -> None:
    """argv[0] named balsync is resolved; `python -m balance_sync` stays a module run."""
    program = tmp_path / "bin" / "balsync"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\n")
    link = tmp_path / "balsync"
    link.symlink_to(program)
    assert balsync_command(str(link)) == (str(program.resolve()),)
    main = Path(sys.modules["balance_sync"].__file__ or "").parent / "__main__.py"
    assert balsync_command(str(main)) == (sys.executable, "-m", "balance_sync")
    fallback = balsync_command("/usr/bin/pytest")
    assert Path(fallback[0]).is_absolute()


def test_schedule_lines_quote_paths() -> None:
    """A program path with a space is quoted for the shell cron runs the line with."""
    lines = schedule_lines(("/opt/my apps/balsync",), None)
    assert lines[1] == "0 * * * * '/opt/my apps/balsync' sync --quiet"


@pytest.mark.parametrize("command", ["status", "schedule"])
def test_help_has_an_example(command: str) -> None:
    """status and schedule --help show examples."""
    from click.testing import CliRunner

    from balance_sync.cli import cli

    text = CliRunner().invoke(cli, [command, "--help"]).stdout
    assert "Examples:" in text
