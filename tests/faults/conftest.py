"""Fixtures of the fault suite: a PostgreSQL and a Valkey of each test's own, and a report.

Fault tests kill, restart and cut their servers, so they never use the shared ones (nor the
BALSYNC_TEST_* variables). Measured figures (keys, kills, durations) are printed at the end
of the session, so a run of `make test-faults` reports what it proved.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.faults.helpers import Cli, install_ledger
from tests.support.devservers import PostgresServer, ValkeyServer

DATABASE = "faults"
_FIGURES: dict[str, list[str]] = {}


@dataclass
class Bench:
    """A test's own servers, and balsync pointed at them (directly or through a proxy)."""

    pg: PostgresServer
    vk: ValkeyServer
    workdir: Path
    prefix: str = "balance:"

    @property
    def db_url(self) -> str:
        """The test's database, directly."""
        return self.db_url_at(self.pg.port)

    def db_url_at(self, port: int) -> str:
        """The test's database on another port (a proxy's)."""
        return f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}"

    @property
    def redis_url(self) -> str:
        """The test's Valkey, directly."""
        return self.vk.url

    def cli(
        self,
        *,
        redis_port: int | None = None,
        pg_port: int | None = None,
        retry_timeout: float = 60,
    ) -> Cli:
        """balsync with this bench's settings; a port given routes that side through it."""
        return Cli(
            self.workdir,
            {
                "BALSYNC_DATABASE_URL": self.db_url_at(pg_port or self.pg.port),
                "BALSYNC_REDIS_URL": f"redis://127.0.0.1:{redis_port or self.vk.port}/0",
                "BALSYNC_KEY_PREFIX": self.prefix,
                "BALSYNC_RETRY_TIMEOUT": f"{retry_timeout:g}",
            },
        )

    def init_db(self, *, ledger: bool = True) -> None:
        """`balsync init-db`, then (unless the test arranges rows first) the write ledger."""
        done = self.cli().run("init-db", "--json", timeout=60)
        assert done.code == 0, done
        if ledger:
            install_ledger(self.db_url)


def _create_database(pg: PostgresServer) -> None:
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {DATABASE}")
        # devservers starts PostgreSQL with synchronous_commit=off for speed, and an
        # immediate stop then loses commits that were already acknowledged: a server
        # fault that no client can survive. The crash tests need the production default,
        # and a database setting wins over the server's command line.
        conn.execute(f"ALTER DATABASE {DATABASE} SET synchronous_commit = on")


@pytest.fixture
def bench() -> Iterator[Bench]:
    """A PostgreSQL and a Valkey of the test's own, on free loopback ports."""
    # Not pytest's tmp_path: other pytest sessions on the machine prune its numbered
    # folders, and a server whose data folder vanishes can no longer be stopped.
    folder = Path(tempfile.mkdtemp(prefix="balsync-faults-"))
    pg = PostgresServer(folder / "pg")
    vk: ValkeyServer | None = None
    try:
        pg.start()
        _create_database(pg)
        vk = ValkeyServer(folder / "vk").start()
        workdir = folder / "runs"
        workdir.mkdir()
        yield Bench(pg, vk, workdir)
    finally:
        if vk is not None:
            vk.stop(signal.SIGKILL)
        pg.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Note a measured figure; the session's summary lists them by test."""
    lines = _FIGURES.setdefault(request.node.nodeid, [])
    return lines.append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print what the fault tests measured."""
    if not _FIGURES:
        return
    terminalreporter.section("fault-injection figures")
    for nodeid, lines in _FIGURES.items():
        terminalreporter.write_line(nodeid)
        for line in lines:
            terminalreporter.write_line(f"    {line}")
