"""Operators' tools the deployment tests run for real (promtool, logrotate, …).

On a developer's machine without a tool its tests are skipped, saying how to install it; in
CI (CI=true), where .ci/run installs them, a missing tool fails the test instead, so a broken
install step can never turn into a silently green run.
"""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    """Whether this is a CI run (CI=true, as CI services and .ci/run's caller set it)."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_tool(name: str, package: str) -> str:
    """The path of command `name`; skip (fail in CI) when absent, naming its Debian package."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is not None:
        return path
    message = f"{name} is not installed (Debian/Ubuntu: apt-get install {package})"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)
