"""What the tests share besides fixtures: the CLI runner, the servers' addresses, reading and
writing balances, and SPEC's `sync --json` object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg
from click.testing import CliRunner, Result
from psycopg import sql

from balance_sync.cli import cli

# SPEC's `sync --json` object: exactly these keys.
SYNC_JSON_KEYS = {
    "status",
    "dry_run",
    "processed",
    "inserted",
    "updated",
    "unchanged",
    "skipped",
    "invalid",
    "duration_s",
    "run_id",
}
# What a sync object adds to SPEC's keys, by status: why it was skipped, how it failed.
SYNC_JSON_EXTRA = {"skipped": {"reason"}, "failed": {"error", "exit_code"}}


def sync_json_keys(status: object) -> set[str]:
    """The keys of a `sync --json` object of this status."""
    return SYNC_JSON_KEYS | SYNC_JSON_EXTRA.get(str(status), set())


@dataclass(frozen=True)
class Servers:
    """Where the run's servers are: a superuser PostgreSQL URL and a Redis URL."""

    postgres_admin: str
    redis: str


def with_database(url: str, dbname: str) -> str:
    """The same server URL, another database."""
    params = psycopg.conninfo.conninfo_to_dict(url)
    params["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})


class Balsync:
    """Runs the CLI in-process, as a user would, with the test's environment."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)

    def __call__(
        self, *args: str, env: Mapping[str, str] | None = None, input: str | None = None
    ) -> Result:
        runner = CliRunner()
        merged = {**self.env, **(env or {})}
        return runner.invoke(cli, list(args), env=merged, input=input, catch_exceptions=False)

    def ok(self, *args: str, **kwargs: object) -> Result:
        """Run and insist on exit 0."""
        result = self(*args, **kwargs)  # type: ignore[arg-type]
        assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
        return result


def balances(
    conn: psycopg.Connection[tuple[object, ...]], table: str = "user_balances"
) -> dict[int, str]:
    """Every row of a target table as {id: balance text}."""
    rows = conn.execute(
        sql.SQL("SELECT telegram_id, balance::text FROM {}").format(
            sql.Identifier(*table.split("."))
        )
    ).fetchall()
    return {int(i): str(b) for i, b in rows}  # type: ignore[call-overload]


def tmp_file(tmp_path: Path, name: str, text: str) -> Path:
    """Write a small file for a test."""
    path = tmp_path / name
    path.write_text(text)
    return path
