"""deploy/logrotate/balsync, run by the real logrotate while a real sync writes the log."""

from __future__ import annotations

import grp
import os
import pwd
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.deploy import ROOT, exec_start, option, unit
from tests.support.tools import require_tool

CONFIG = ROOT / "deploy" / "logrotate" / "balsync"
KEYS = 20_000
BATCH = 100
BATCH_LINE = re.compile(r" DEBUG balance_sync\.ops\.sync batch (\d+): ")
# The file format of --log-format text: time, pid, level, logger, message.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \d+ [A-Z]+ [\w.]+ .*")


@pytest.fixture(scope="module")
def logrotate() -> str:
    return require_tool("logrotate", "logrotate")


def shipped_paths() -> list[str]:
    """The log paths the shipped configuration rotates."""
    (header,) = [line for line in CONFIG.read_text().splitlines() if line.endswith("{")]
    return header.removesuffix("{").split()


def local_config(tmp_path: Path, log: Path) -> Path:
    """The shipped configuration, for a log under tmp_path and owned by this user."""
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    text = CONFIG.read_text().replace(" ".join(shipped_paths()), str(log))
    text = text.replace("create 0640 balsync balsync", f"create 0640 {user} {group}")
    assert str(log) in text
    assert f"create 0640 {user} {group}" in text
    path = tmp_path / "logrotate.conf"
    path.write_text(text)
    path.chmod(0o644)  # logrotate refuses a configuration others may write
    return path


def batches(path: Path) -> list[int]:
    return [
        int(m.group(1)) for line in path.read_text().splitlines() if (m := BATCH_LINE.search(line))
    ]


def force_rotation(logrotate: str, state: Path, config: Path) -> None:
    """`logrotate -f` with a state file of the test's own, as root's cron job would run it."""
    result = subprocess.run(
        [logrotate, "-f", "-s", str(state), str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_config_rotates_the_paths_balsync_is_configured_with():
    """The systemd units' and crontab.example's --log-file are the paths it rotates."""
    configured = {
        option(exec_start(unit(name)), "--log-file")
        for name in ("balsync.service", "balsync-daily.service")
    }
    configured |= set(re.findall(r"--log-file (\S+)", (ROOT / "crontab.example").read_text()))
    assert configured == set(shipped_paths())
    directives = {
        line.split()[0]
        for line in CONFIG.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    # copytruncate would lose the lines written between its copy and its truncate.
    assert "copytruncate" not in directives
    assert {"create", "delaycompress", "missingok"} <= directives


def test_forced_rotation_during_a_sync_loses_no_line(
    logrotate, initialized, env, rds, key_prefix, tmp_path
):
    """logrotate -f while a sync writes: the run goes on in the new file, every line kept once."""
    rds.mset({f"{key_prefix}{i}": f"{i}.00" for i in range(1, KEYS + 1)})
    log = tmp_path / "log" / "balsync.log"
    config = local_config(tmp_path, log)
    state = tmp_path / "logrotate.state"
    stderr = (tmp_path / "stderr").open("w")
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "balance_sync",
            "sync",
            "-v",
            "--batch-size",
            str(BATCH),
            "--log-file",
            str(log),
        ],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and len(batches(log)) >= 10):
            assert run.poll() is None, "the sync ended before any rotation"
            assert time.monotonic() < deadline, "no batch lines in the log"
            time.sleep(0.02)
        force_rotation(logrotate, state, config)
        assert run.poll() is None, "the sync ended before the rotation finished"
        assert run.wait(timeout=120) == 0
    finally:
        run.kill()
        run.wait()
        stderr.close()

    rotated = log.with_name("balsync.log.1")  # delaycompress: the newest one stays plain
    before, after = batches(rotated), batches(log)
    assert before, "the run wrote before the rotation"
    assert after, "the run went on writing after the rotation"
    assert sorted(before + after) == list(range(1, KEYS // BATCH + 1))  # each line once
    for path in (rotated, log):
        text = path.read_text()
        assert text.endswith("\n")
        assert all(LOG_LINE.fullmatch(line) for line in text.splitlines()), path
    assert "sync success: 20000 processed" in log.read_text()
    assert log.stat().st_mode & 0o777 == 0o640  # logrotate's `create`, kept by balsync

    force_rotation(logrotate, state, config)
    assert log.with_name("balsync.log.2.gz").exists()  # compressed one rotation later
