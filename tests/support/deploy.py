"""The deployment examples as data: systemd units, their ExecStart, the Kubernetes CronJobs."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
SYSTEMD = ROOT / "deploy" / "systemd"
KUBERNETES = ROOT / "deploy" / "kubernetes" / "cronjob.yaml"


class _CaseSensitiveParser(configparser.ConfigParser):
    def optionxform(self, optionstr: str) -> str:
        return optionstr  # systemd keys are case-sensitive


def unit(name: str) -> configparser.ConfigParser:
    """A systemd unit file, parsed leniently (systemd allows repeated keys)."""
    parser = _CaseSensitiveParser(strict=False, interpolation=None)
    parser.read_string((SYSTEMD / name).read_text())
    return parser


def exec_start(service: configparser.ConfigParser) -> list[str]:
    """ExecStart as argv, its backslash-continued lines joined."""
    return shlex.split(service["Service"]["ExecStart"].replace("\\\n", " "))


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def cronjobs() -> dict[str, dict[str, Any]]:
    """The CronJobs of cronjob.yaml by name."""
    documents = [d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d]
    assert {d["kind"] for d in documents} == {"CronJob"}
    return {d["metadata"]["name"]: d for d in documents}


def container(job: dict[str, Any]) -> dict[str, Any]:
    only: dict[str, Any]
    (only,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return only
