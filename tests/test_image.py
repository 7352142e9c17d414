"""The Dockerfile for deploy/kubernetes: its install steps work, and it agrees with the manifest.

No container engine runs here, so the build stage's steps run on this machine instead: its
COPY lines copy the same files into a scratch build context, its RUN lines (a venv, pip) run
with the image's venv path pointing into a temporary folder, and `balsync` must then work.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.deploy import ROOT, container, cronjobs

DOCKERFILE = ROOT / "Dockerfile"
VENV = "/opt/balsync/.venv"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    argument: str


def stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions, continuation lines joined, one list per FROM."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found: list[list[Instruction]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        keyword, _, argument = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            found.append([])
        if found:
            found[-1].append(Instruction(keyword.upper(), " ".join(argument.split())))
    return found


def final_stage() -> list[Instruction]:
    return stages()[-1]


def only(stage: list[Instruction], keyword: str) -> str:
    (argument,) = [i.argument for i in stage if i.keyword == keyword]
    return argument


def pods() -> list[dict[str, Any]]:
    return [job["spec"]["jobTemplate"]["spec"]["template"]["spec"] for job in cronjobs().values()]


def copy_into_context(origin: Path, workdir: Path, destination: str) -> None:
    """COPY as Docker does it: a folder's contents into the destination, a file into a
    destination folder (ending in /) or as the destination."""
    target = workdir / destination
    if origin.is_dir():
        shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
        return
    if destination.endswith("/"):
        target.mkdir(parents=True, exist_ok=True)
        target /= origin.name
    shutil.copy2(origin, target)


@pytest.mark.slow
def test_build_stage_installs_a_working_balsync(tmp_path):
    """The build stage's COPY and RUN steps, run here, give a venv whose balsync works."""
    build, _ = stages()
    context, venv = tmp_path / "src", tmp_path / "venv"
    workdir = tmp_path
    runs = 0
    for step in build:
        if step.keyword == "WORKDIR":
            assert step.argument == "/src"  # the scratch context stands in for it
            workdir = context
            workdir.mkdir()
        elif step.keyword == "COPY":
            *sources, destination = shlex.split(step.argument)
            for source in sources:
                copy_into_context(ROOT / source, workdir, destination)
        elif step.keyword == "RUN":
            assert VENV in step.argument, f"a build step outside the venv: {step.argument}"
            command = step.argument.replace(VENV, str(venv))
            command = command.replace("python -m venv", f"{shlex.quote(sys.executable)} -m venv")
            result = subprocess.run(  # noqa: S602 - the Dockerfile's own shell line
                command, shell=True, cwd=workdir, capture_output=True, text=True, check=False
            )
            assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-2000:])
            runs += 1
    assert runs >= 2  # the venv, then pip
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    shown = subprocess.run(
        [venv / "bin" / "balsync", "--help"], env=env, capture_output=True, text=True, check=False
    )
    assert shown.returncode == 0, shown.stderr
    assert "Usage: balsync" in shown.stdout
    assert "sync" in shown.stdout
    # A regular install, not a link back to the source tree, bytecode compiled at build time.
    installed = subprocess.run(
        [venv / "bin" / "python", "-c", "import balance_sync; print(balance_sync.__file__)"],
        env=env,
        cwd=tmp_path,  # not the repository, whose balance_sync/ would shadow the install
        capture_output=True,
        text=True,
        check=True,
    )
    package = Path(installed.stdout.strip()).parent
    assert package.is_relative_to(venv)
    assert list((package / "cli" / "__pycache__").glob("__init__.*.pyc"))


def test_image_runs_balsync_as_the_manifests_command():
    """ENTRYPOINT is balsync on the venv's PATH; the CronJobs' command is the same."""
    stage = final_stage()
    entrypoint = json.loads(only(stage, "ENTRYPOINT"))
    assert entrypoint == ["balsync"]
    env = only(stage, "ENV")
    assert f"PATH={VENV}/bin:$PATH" in env
    assert f"COPY --from=build {VENV} {VENV}" in [
        f"COPY {i.argument}" for i in stage if i.keyword == "COPY"
    ]
    for job in cronjobs().values():
        assert container(job)["command"] == entrypoint


def test_image_user_is_the_manifests_non_root_uid():
    """USER is numeric and non-root, created with that uid, and is runAsUser/runAsGroup."""
    stage = final_stage()
    uid, gid = (int(part) for part in only(stage, "USER").split(":"))
    assert uid != 0
    assert gid != 0
    creating = only(stage, "RUN")
    assert f"--uid {uid}" in creating
    assert f"--gid {gid}" in creating
    for pod in pods():
        context = pod["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid)
        assert context["runAsNonRoot"] is True


def test_image_writes_only_where_the_manifest_mounts_a_volume():
    """Read-only root: TMPDIR is an emptyDir, no mount hides the venv, no secret in ENV."""
    env = only(final_stage(), "ENV")
    tmpdir = re.search(r"TMPDIR=(\S+)", env)
    assert tmpdir is not None
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "BALSYNC_" not in env  # secrets come from the mounted files, never the image
    for job in cronjobs().values():
        main = container(job)
        pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert main["securityContext"]["readOnlyRootFilesystem"] is True
        empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
        assert mounts.get(tmpdir.group(1)) in empty_dirs
        assert not any(VENV.startswith(path.rstrip("/") + "/") for path in mounts)


def test_manifest_names_the_image_make_image_builds():
    """The CronJobs' image is `make image`'s default tag, the package's version."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    dry = subprocess.run(
        ["make", "-n", "image"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MAKEFLAGS": ""},
    )
    assert f"build -t balsync:{version} ." in dry.stdout
    for job in cronjobs().values():
        assert container(job)["image"] == f"balsync:{version}"
