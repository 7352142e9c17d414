"""`status` where the shipped systemd timers start balsync: their next runs, from
`systemctl list-timers`, instead of "no crontab".

systemctl is a stand-in script on PATH that prints what systemd 252 prints (JSON) or, for
older systemd, its table; the machine's own systemd is never asked.
"""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from balance_sync.ops.systemd import parse_list_timers
from tests.helpers import Balsync

HOURLY_NEXT = datetime(2026, 12, 1, 20, 0, tzinfo=UTC)
HOURLY_LAST = datetime(2026, 12, 1, 19, 0, tzinfo=UTC)
DAILY_NEXT = datetime(2026, 12, 2, 2, 0, tzinfo=UTC)


def microseconds(moment: datetime) -> int:
    return int(moment.timestamp()) * 1_000_000


# `systemctl list-timers --all --output=json 'balsync*'` of systemd 252, the daily timer
# never fired yet.
JSON_OUTPUT = json.dumps(
    [
        {
            "next": microseconds(HOURLY_NEXT),
            "left": 3_540_000_000,
            "last": microseconds(HOURLY_LAST),
            "passed": 60_000_000,
            "unit": "balsync.timer",
            "activates": "balsync.service",
        },
        {
            "next": microseconds(DAILY_NEXT),
            "left": 25_140_000_000,
            "last": None,
            "passed": None,
            "unit": "balsync-daily.timer",
            "activates": "balsync-daily.service",
        },
    ]
)
# The same on systemd 250 and older, which ignore --output=json for list-timers.
TABLE_OUTPUT = """\
NEXT                        LEFT          LAST                        PASSED    UNIT                ACTIVATES
Tue 2026-12-01 20:00:00 UTC 59min left    Tue 2026-12-01 19:00:00 UTC 1min ago  balsync.timer       balsync.service
Wed 2026-12-02 02:00:00 UTC 6h left       n/a                         n/a       balsync-daily.timer balsync-daily.service

2 timers listed.
Pass --all to see loaded but inactive timers, too.
"""  # noqa: E501 - systemctl's own line length


def fake_systemctl(folder: Path, output: str, code: int = 0) -> dict[str, str]:
    """A `systemctl` on PATH that prints `output` for list-timers and exits with `code`; the
    environment that finds it first, and a crontab command that has no crontab."""
    folder.mkdir(exist_ok=True)
    (folder / "list-timers.out").write_text(output)
    script = folder / "systemctl"
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1" = list-timers ] || { echo "unexpected: $*" >&2; exit 2; }\n'
        f'cat "{folder}/list-timers.out"\n'
        f"exit {code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {
        "PATH": f"{folder}:{os.environ['PATH']}",
        "BALSYNC_CRONTAB_COMMAND": str(folder / "no-crontab-here"),
    }


@pytest.fixture
def systemd_host(initialized: Balsync, tmp_path: Path) -> Balsync:
    """A host where the shipped timers run balsync and no cron is installed."""
    initialized.env.update(fake_systemctl(tmp_path / "bin", JSON_OUTPUT))
    initialized.ok("sync")
    return initialized


def test_status_json_lists_the_timers_next_first(systemd_host):
    """--json: each timer with its service and next and last start, the next to fire first."""
    data = json.loads(systemd_host.ok("status", "--json").stdout)
    assert data["systemd_timers"] == [
        {
            "unit": "balsync.timer",
            "activates": "balsync.service",
            "next": HOURLY_NEXT.isoformat(),
            "last": HOURLY_LAST.isoformat(),
        },
        {
            "unit": "balsync-daily.timer",
            "activates": "balsync-daily.service",
            "next": DAILY_NEXT.isoformat(),
            "last": None,
        },
    ]


def test_status_shows_the_timers_instead_of_no_crontab(systemd_host):
    """The table names both timers and their next starts, and says nothing of a crontab."""
    out = systemd_host.ok("status", env={"COLUMNS": "120"}).stdout
    assert "systemd timers" in out
    hourly = next(line for line in out.splitlines() if "balsync.timer" in line)
    assert "balsync.service: next 2026-12-01" in hourly
    assert "last 2026-12-01" in hourly
    assert "balsync-daily.timer → balsync-daily.service: next 2026-12-02" in out
    assert "crontab" not in out


def test_without_systemd_status_reports_cron_as_before(initialized, tmp_path):
    """systemctl present but no systemd running (a container): no timers, the crontab row."""
    env = fake_systemctl(
        tmp_path / "bin", "System has not been booted with systemd as init system\n", code=1
    )
    data = json.loads(initialized.ok("status", "--json", env=env).stdout)
    assert data["systemd_timers"] == []
    assert "crontab" in initialized.ok("status", env=env).stdout


def test_older_systemd_table_is_read_too():
    """systemd before 251 prints only its table: the same timers and times come out."""
    from_table = parse_list_timers(TABLE_OUTPUT)
    from_json = parse_list_timers(JSON_OUTPUT)
    assert from_table == from_json
    assert [t.unit for t in from_table] == ["balsync.timer", "balsync-daily.timer"]
    assert from_table[1].last_at is None
