"""The deployment examples: crontab, systemd units and Kubernetes CronJobs say what README says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.deploy import ROOT, SYSTEMD, container, cronjobs, exec_start, option, unit

SECRET_FILES = {"BALSYNC_DATABASE_URL_FILE", "BALSYNC_REDIS_URL_FILE"}
DAILY_FLAGS = ["--force", "--wait", "1800"]


# -- crontab.example ---------------------------------------------------------------------------


def test_crontab_has_mailto_and_both_schedules_logging_to_a_file():
    """crontab.example: MAILTO, hourly at minute 0, a forced waiting run at 02:00, a log file."""
    lines = [
        line
        for line in (ROOT / "crontab.example").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert any(re.fullmatch(r"MAILTO=\S+", line) for line in lines)
    entries = {" ".join(line.split()[:5]): line for line in lines if line[0].isdigit()}
    assert set(entries) == {"0 * * * *", "0 2 * * *"}
    for entry in entries.values():
        assert "balsync sync" in entry
        assert "--log-file /opt/balsync/logs/balsync.log" in entry
    assert " ".join(DAILY_FLAGS) in entries["0 2 * * *"]
    assert "--force" not in entries["0 * * * *"]


# -- systemd -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timer", "calendar", "service"),
    [
        ("balsync.timer", "hourly", "balsync.service"),
        ("balsync-daily.timer", "*-*-* 02:00:00", "balsync-daily.service"),
    ],
)
def test_timers_are_persistent_and_start_their_service(timer, calendar, service):
    """Hourly and 02:00, made up after downtime, enabled under timers.target."""
    parsed = unit(timer)
    assert parsed["Timer"]["OnCalendar"] == calendar
    assert parsed["Timer"]["Persistent"] == "true"
    assert parsed["Timer"]["Unit"] == service
    assert (SYSTEMD / service).is_file()
    assert parsed["Install"]["WantedBy"] == "timers.target"


@pytest.mark.parametrize("name", ["balsync.service", "balsync-daily.service"])
def test_services_are_oneshot_sandboxed_and_read_secrets_from_a_file(name):
    """Type=oneshot, a dedicated user, EnvironmentFile for secrets, and the hardening options."""
    service = unit(name)["Service"]
    assert service["Type"] == "oneshot"
    assert service["User"] == "balsync"
    assert service["EnvironmentFile"] == "/etc/balsync/env"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"
    assert "Environment" not in service  # no secret in the unit itself
    argv = exec_start(unit(name))
    assert argv[1] == "sync"
    assert "--quiet" in argv  # the journal gets failures, the log file the rest
    assert "--redis-url" not in argv
    assert "--database-url" not in argv


@pytest.mark.parametrize("name", ["balsync.service", "balsync-daily.service"])
def test_services_may_write_their_log_and_metrics_files(name):
    """Under ProtectSystem=strict, the log and metrics directories are in ReadWritePaths."""
    argv = exec_start(unit(name))
    writable = [Path(p.lstrip("-")) for p in unit(name)["Service"]["ReadWritePaths"].split()]
    for flag in ("--log-file", "--metrics-file"):
        path = Path(option(argv, flag))
        assert path.parent in writable, (flag, path)
    assert option(argv, "--metrics-file").endswith(".prom")


def test_only_the_daily_service_forces_and_waits():
    """The daily unit runs with --force --wait 1800; the hourly one does not."""
    daily = exec_start(unit("balsync-daily.service"))
    hourly = exec_start(unit("balsync.service"))
    assert " ".join(DAILY_FLAGS) in " ".join(daily)
    assert "--force" not in hourly
    assert "--wait" not in hourly


# -- Kubernetes --------------------------------------------------------------------------------


def test_two_cronjobs_hourly_and_daily():
    """One CronJob at minute 0 every hour, one at 02:00 with --force --wait 1800."""
    jobs = cronjobs()
    schedules = {name: job["spec"]["schedule"] for name, job in jobs.items()}
    assert sorted(schedules.values()) == ["0 * * * *", "0 2 * * *"]
    for job in jobs.values():
        args = container(job)["args"]
        assert args[0] == "sync"
        if job["spec"]["schedule"] == "0 2 * * *":
            assert " ".join(DAILY_FLAGS) in " ".join(args)
        else:
            assert "--force" not in args


@pytest.mark.parametrize("name", ["balsync-hourly", "balsync-daily"])
def test_cronjob_never_overlaps_and_keeps_bounded_history(name):
    """Forbid, a starting deadline, history limits, a bounded backoff, pods never restarted."""
    spec = cronjobs()[name]["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert 0 < spec["startingDeadlineSeconds"] <= 3600
    assert 0 < spec["successfulJobsHistoryLimit"] <= 10
    assert 0 < spec["failedJobsHistoryLimit"] <= 10
    job = spec["jobTemplate"]["spec"]
    assert 0 <= job["backoffLimit"] <= 5
    assert job["template"]["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("name", ["balsync-hourly", "balsync-daily"])
def test_cronjob_reads_secrets_from_mounted_files(name):
    """The URLs come from a Secret volume via the *_FILE variables, never inline."""
    job = cronjobs()[name]
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    main = container(job)
    env = {e["name"]: e for e in main["env"]}
    assert env.keys() >= SECRET_FILES
    assert not {"BALSYNC_DATABASE_URL", "BALSYNC_REDIS_URL", "DATABASE_URL", "REDIS_URL"} & set(env)
    secret_volumes = {v["name"] for v in pod["volumes"] if "secret" in v}
    mounts = [m for m in main["volumeMounts"] if m["name"] in secret_volumes]
    assert mounts
    assert all(m.get("readOnly") for m in mounts)
    for variable in SECRET_FILES:
        path = env[variable]["value"]
        assert any(path.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), path
    ping = env.get("BALSYNC_PING_URL")
    assert ping is None or "secretKeyRef" in ping["valueFrom"]


@pytest.mark.parametrize("name", ["balsync-hourly", "balsync-daily"])
def test_cronjob_runs_as_non_root_with_bounded_memory(name):
    """Non-root, no privilege escalation, 256Mi of memory requested and as the limit."""
    job = cronjobs()[name]
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    main = container(job)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["resources"]["requests"]["memory"] == "256Mi"
    assert main["resources"]["limits"]["memory"] == "256Mi"
