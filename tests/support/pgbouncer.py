"""A PgBouncer of the test's own, in front of the test's PostgreSQL, on a free loopback port.

PgBouncer comes from the machine (Debian/Ubuntu: apt-get install pgbouncer); without it the
tests that need it skip on a developer's machine and fail in CI (tests/support/tools.py). It
refuses to run as root, so as root it runs as `nobody`, its files handed to that user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from tests.support.devservers import free_port
from tests.support.tools import require_tool

RUN_AS = "nobody"


class PgBouncer:
    """One pgbouncer process pooling the database of `database_url` in `pool_mode`."""

    def __init__(
        self, database_url: str, pool_mode: str, pool_size: int = 4, round_robin: bool = False
    ) -> None:
        self.binary = require_tool("pgbouncer", "pgbouncer")
        self.target = psycopg.conninfo.conninfo_to_dict(database_url)
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.round_robin = round_robin
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="balsync-pgbouncer-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The pooled URL of the same database, as balsync would be given it."""
        user = self.target.get("user", "postgres")
        return f"postgresql://{user}@127.0.0.1:{self.port}/{self.target['dbname']}"

    def start(self) -> PgBouncer:
        """Write the ini, start pgbouncer in the foreground and wait until it answers."""
        user = str(self.target.get("user", "postgres"))
        upstream = " ".join(
            f"{key}={self.target[key]}"
            for key in ("host", "port", "dbname", "user", "password")
            if self.target.get(key)
        )
        (self.folder / "users.txt").write_text(f'"{user}" ""\n')
        (self.folder / "pgbouncer.ini").write_text(
            f"""[databases]
{self.target["dbname"]} = {upstream}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.folder / "users.txt"}
pool_mode = {self.pool_mode}
default_pool_size = {self.pool_size}
server_round_robin = {int(self.round_robin)}
max_client_conn = 100
ignore_startup_parameters = extra_float_digits
logfile = {self.folder / "pgbouncer.log"}
"""
        )
        options: dict[str, Any] = {}
        if os.geteuid() == 0:
            entry = pwd.getpwnam(RUN_AS)
            for path in (self.folder, *self.folder.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            options["user"] = RUN_AS
        self.process = subprocess.Popen(
            [self.binary, str(self.folder / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **options,
        )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 20) -> None:
        give_up = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"pgbouncer exited: {self.log()}") from None
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.1)

    def log(self) -> str:
        """What pgbouncer logged, for a failing test's message."""
        try:
            return (self.folder / "pgbouncer.log").read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop pgbouncer (its server connections close with it) and remove its files."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
