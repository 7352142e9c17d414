"""Secrets never show, secrets can come from files, and hostile names and keys change no SQL.

Every command runs with password-bearing URLs, verbose and with a log file, on servers that
check passwords (a PostgreSQL and a Valkey of this module's own), and on servers that are
down or refuse the password; no password may appear on stdout, stderr or in the log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
from click.testing import CliRunner, Result
from psycopg import sql

from balance_sync.cli import cli
from balance_sync.errors import BalsyncError
from balance_sync.settings import SETTING_ENV
from balance_sync.stores.postgres import text_of
from balance_sync.stores.redis import RedisStore
from tests.helpers import Balsync, balances
from tests.support.devservers import PostgresServer, ValkeyServer, free_port
from tests.support.netutil import ping_server

PG_PASSWORD = "PgSecret456"  # noqa: S105 - the throwaway servers' own
REDIS_PASSWORD = "RedisSecret123"  # noqa: S105
WRONG_PG = "WrongPgPass777"
WRONG_REDIS = "WrongRedisPass888"
PING_SECRET = "PingSecret999"  # noqa: S105
SECRETS = (PG_PASSWORD, REDIS_PASSWORD, WRONG_PG, WRONG_REDIS, PING_SECRET)
PREFIX = "secret-test:balance:"

# Settings a test must not inherit from the machine: only what it sets may count.
_INHERITED = (
    *(name for names in SETTING_ENV.values() for name in names),
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
    "PGPASSFILE",
    "PGSERVICE",
)

# Sensible arguments per command: everything it may do, nothing that leaves this machine's
# sandbox (schedule only prints; --install would edit the user's crontab).
COMMAND_ARGS: dict[str, tuple[str, ...]] = {
    "sync": ("--force",),
    "clear-cache": ("--yes",),
    "restore": ("--yes",),
}


def commands() -> list[str]:
    """Every command of the CLI, as it stands when the tests run."""
    return sorted(cli.commands)


@dataclass(frozen=True)
class LockedServers:
    """A PostgreSQL and a Valkey that check passwords, with URLs for the app's identities."""

    pg_port: int
    redis_port: int
    redis_admin: str

    def pg_url(self, password: str = PG_PASSWORD, port: int | None = None) -> str:
        """The application's URL, with `password`."""
        return f"postgresql://u:{password}@127.0.0.1:{port or self.pg_port}/app"

    def pg_conninfo(self, password: str = PG_PASSWORD) -> str:
        """The same, as a libpq conninfo string."""
        return f"host=127.0.0.1 port={self.pg_port} user=u password={password} dbname=app"

    def redis_url(self, password: str = REDIS_PASSWORD, port: int | None = None) -> str:
        """The application's Redis URL, with `password`."""
        return f"redis://:{password}@127.0.0.1:{port or self.redis_port}/0"


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LockedServers]:
    """Servers that refuse a wrong password: PostgreSQL with scram, Valkey with requirepass."""
    base = tmp_path_factory.mktemp("locked")
    pg = PostgresServer(base / "postgres").start()
    vk = ValkeyServer(base / "valkey").start()
    try:
        with psycopg.connect(pg.url, autocommit=True) as admin:
            admin.execute("SET password_encryption = 'scram-sha-256'")
            admin.execute(
                sql.SQL("CREATE ROLE u LOGIN PASSWORD {}").format(sql.Literal(PG_PASSWORD))
            )
            admin.execute("CREATE DATABASE app OWNER u")
            # Only the admin keeps trust; everybody else must give the password.
            (pg.datadir / "pg_hba.conf").write_text(
                "local all all trust\n"
                "host all postgres 127.0.0.1/32 trust\n"
                "host all all 127.0.0.1/32 scram-sha-256\n"
            )
            admin.execute("SELECT pg_reload_conf()")
        client = redis.Redis.from_url(vk.url)
        client.config_set("requirepass", REDIS_PASSWORD)  # the module's own server
        client.close()
        yield LockedServers(
            pg.port,
            vk.port,
            f"redis://:{REDIS_PASSWORD}@127.0.0.1:{vk.port}/0",
        )
    finally:
        vk.stop()
        pg.stop()


@pytest.fixture(scope="module")
def seeded(locked: LockedServers) -> LockedServers:
    """The locked servers after init-db (as the app's owner role) and a few balances."""
    client = redis.Redis.from_url(locked.redis_admin)
    client.mset({f"{PREFIX}1": "10.00", f"{PREFIX}2": "20.00", f"{PREFIX}bad": "x"})
    client.close()
    result = invoke(["init-db"], base_env(locked.pg_url(), locked.redis_url()))
    assert result.exit_code == 0, result.stderr
    result = invoke(["sync"], base_env(locked.pg_url(), locked.redis_url()))
    assert result.exit_code == 1, result.stderr  # the invalid key
    return locked


def base_env(
    database_url: str | None, redis_url: str | None, *, ping: bool = False, **extra: str
) -> dict[str, str | None]:
    """An environment with only these settings; None unsets a variable for the run.

    With `ping`, a dead man's switch URL whose path is its secret (healthchecks.io style)
    points where nothing answers; its retries cost a sync a few seconds.
    """
    env: dict[str, str | None] = dict.fromkeys(_INHERITED)
    env.update(
        {
            "BALSYNC_DATABASE_URL": database_url,
            "BALSYNC_REDIS_URL": redis_url,
            "BALSYNC_KEY_PREFIX": PREFIX,
            "BALSYNC_RETRY_TIMEOUT": "0",
        }
    )
    if ping:
        env["BALSYNC_PING_URL"] = f"http://127.0.0.1:{free_port()}/ping/{PING_SECRET}"
    env.update(extra)
    return env


def invoke(args: list[str], env: Mapping[str, str | None]) -> Result:
    """Run the CLI in-process; argv never carries a secret."""
    for arg in args:
        assert not any(secret in arg for secret in SECRETS), "a secret in argv"
    return CliRunner().invoke(cli, args, env=dict(env), catch_exceptions=False)


def assert_no_secret(result: Result, log: Path, what: str) -> None:
    """No password on stdout, stderr or in the log file."""
    log_text = log.read_text(errors="replace") if log.exists() else ""
    for where, text in (("stdout", result.stdout), ("stderr", result.stderr), ("log", log_text)):
        for secret in SECRETS:
            assert secret not in text, f"{what}: {secret} leaked on {where}:\n{text}"


def run_everywhere(env: Mapping[str, str | None], tmp_path: Path, name: str) -> dict[str, int]:
    """Every command, verbose with a text log and with --json and a JSON log; exit codes."""
    codes: dict[str, int] = {}
    for command in commands():
        for output in (["-v"], ["--json", "-v", "--log-format", "json"]):
            log = tmp_path / f"{name}-{command}-{len(output)}.log"
            args = [command, *COMMAND_ARGS.get(command, ()), *output, "--log-file", str(log)]
            result = invoke(args, env)
            assert_no_secret(result, log, f"{name}: balsync {' '.join(args)}")
            codes[command] = result.exit_code
    return codes


# -- no password in any output -------------------------------------------------------------


def test_no_secret_shows_when_every_command_succeeds(seeded: LockedServers, tmp_path):
    """Right passwords, servers up: every command runs, no password in output or log."""
    env = base_env(seeded.pg_url(), seeded.redis_url(), ping=True)
    codes = run_everywhere(env, tmp_path, "ok")
    failed = {c: code for c, code in codes.items() if code not in (0, 1)}
    assert not failed, failed


def test_no_secret_shows_with_a_conninfo_database_url(seeded: LockedServers, tmp_path):
    """A libpq conninfo string (password=…) is masked like a URL."""
    env = base_env(seeded.pg_conninfo(), seeded.redis_url())
    codes = run_everywhere(env, tmp_path, "conninfo")
    assert codes["verify"] == 0


def test_no_secret_shows_with_redis_password_from_redis_password(seeded: LockedServers, tmp_path):
    """REDIS_HOST/REDIS_PORT/REDIS_PASSWORD build the URL; the password stays hidden."""
    env = base_env(
        seeded.pg_url(),
        None,
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=str(seeded.redis_port),
        REDIS_PASSWORD=REDIS_PASSWORD,
    )
    codes = run_everywhere(env, tmp_path, "redis-parts")
    assert codes["verify"] == 0


def test_no_secret_shows_when_both_servers_are_down(tmp_path):
    """Unreachable servers: Redis first (exit 3) or PostgreSQL (exit 4), never a password."""
    port = free_port()
    env = base_env(
        f"postgresql://u:{PG_PASSWORD}@127.0.0.1:{port}/app",
        f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0",
        ping=True,
    )
    codes = run_everywhere(env, tmp_path, "down")
    assert codes["verify"] == 3
    assert codes["init-db"] == 4


def test_no_secret_shows_when_postgres_is_down(seeded: LockedServers, tmp_path):
    """PostgreSQL unreachable, Redis fine: exit 4 where it is needed, never a password."""
    env = base_env(seeded.pg_url(port=free_port()), seeded.redis_url())
    codes = run_everywhere(env, tmp_path, "pg-down")
    assert codes["verify"] == 4
    assert codes["sync"] == 4


def test_no_secret_shows_when_the_redis_password_is_wrong(seeded: LockedServers, tmp_path):
    """A wrong Redis password: exit 3 with a hint about credentials, never the password."""
    env = base_env(seeded.pg_url(), seeded.redis_url(WRONG_REDIS))
    codes = run_everywhere(env, tmp_path, "redis-wrong")
    assert codes["verify"] == 3
    assert codes["sync"] == 3
    result = invoke(["verify"], env)
    assert "refused the credentials" in result.stderr
    assert "redis://:***@" in result.stderr


def test_no_secret_shows_when_the_postgres_password_is_wrong(seeded: LockedServers, tmp_path):
    """A wrong PostgreSQL password: exit 4 at once, never the password."""
    env = base_env(seeded.pg_url(WRONG_PG), seeded.redis_url())
    codes = run_everywhere(env, tmp_path, "pg-wrong")
    assert codes["verify"] == 4
    assert codes["init-db"] == 4
    result = invoke(["init-db"], env)
    assert "password authentication failed" in result.stderr
    assert "postgresql://u:***@" in result.stderr


def test_no_secret_shows_when_no_password_is_given(seeded: LockedServers, tmp_path):
    """Servers asking for a password the URL lacks: exit 3/4, nothing leaks."""
    env = base_env(f"postgresql://u@127.0.0.1:{seeded.pg_port}/app", seeded.redis_url())
    assert run_everywhere(env, tmp_path, "pg-none")["verify"] == 4
    env = base_env(seeded.pg_url(), f"redis://127.0.0.1:{seeded.redis_port}/0")
    assert run_everywhere(env, tmp_path, "redis-none")["verify"] == 3


def test_no_secret_shows_in_retry_warnings(tmp_path):
    """While servers stay down, each retry's warning names the fault, never a password."""
    port = free_port()
    env = base_env(
        f"postgresql://u:{PG_PASSWORD}@127.0.0.1:{port}/app",
        f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0",
        BALSYNC_RETRY_TIMEOUT="1",
    )
    for command, code in (("verify", 3), ("sync", 3), ("init-db", 4)):
        log = tmp_path / f"{command}.log"
        result = invoke([command, "-v", "--log-file", str(log)], env)
        assert result.exit_code == code
        assert "transient fault" in log.read_text()
        assert_no_secret(result, log, f"{command} retrying")


# An unencoded / # ? in a password: libpq accepts `#` and `?` there and connects, so such a
# URL works, yet settings.mask_url finds no password in it and prints it whole.
UNENCODED = [
    f"redis://:{REDIS_PASSWORD}/x@127.0.0.1:{{port}}/0",
    f"redis://:{REDIS_PASSWORD}#x@127.0.0.1:{{port}}/0",
    f"postgresql://u:{PG_PASSWORD}/x@127.0.0.1:{{port}}/app",
    f"postgresql://u:{PG_PASSWORD}#x@127.0.0.1:{{port}}/app",
    f"postgresql://u:{PG_PASSWORD}?x@127.0.0.1:{{port}}/app",
]


@pytest.mark.parametrize("template", UNENCODED)
def test_a_password_with_unencoded_url_characters_is_masked(tmp_path, template):
    """A password that holds / # or ? unencoded is masked in errors like any other."""
    url = template.format(port=free_port())
    redis_side = url.startswith("redis")
    env = base_env(None if redis_side else url, url if redis_side else None)
    log = tmp_path / "unencoded.log"
    result = invoke(["verify", "-v", "--log-file", str(log)], env)
    assert result.exit_code in (2, 3, 4)
    assert_no_secret(result, log, url)


@pytest.mark.parametrize("option", ["--redis-url", "--database-url"])
def test_a_url_given_as_an_option_is_masked_too(seeded: LockedServers, tmp_path, option):
    """Given on the command line anyway (not recommended), a URL is still masked in output."""
    port = free_port()
    url = (
        f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"
        if option == "--redis-url"
        else f"postgresql://u:{PG_PASSWORD}@127.0.0.1:{port}/app"
    )
    log = tmp_path / "option.log"
    env = base_env(seeded.pg_url(), seeded.redis_url())
    result = CliRunner().invoke(cli, ["health", option, url, "-v", "--log-file", str(log)], env=env)
    assert result.exit_code in (3, 4)
    assert_no_secret(result, log, f"health {option}")
    assert f"127.0.0.1:{port}" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{REDIS_PASSWORD}@127.0.0.1:notaport/0",
        f"ftp://:{REDIS_PASSWORD}@127.0.0.1/0",
        f"redis://:{REDIS_PASSWORD}@/0",
    ],
)
def test_a_malformed_redis_url_is_rejected_masked(url, tmp_path):
    """A malformed Redis URL is exit 2 with its password masked."""
    log = tmp_path / "bad.log"
    result = invoke(["verify", "-v", "--log-file", str(log)], base_env(None, url))
    assert result.exit_code == 2
    assert "Redis URL" in result.stderr
    assert_no_secret(result, log, url)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:{PG_PASSWORD}@127.0.0.1:notaport/app",
        f"host=127.0.0.1 password={PG_PASSWORD} nosuchoption=1",
        f"host=127.0.0.1 password='{PG_PASSWORD}' dbname",
    ],
)
def test_a_malformed_database_url_is_rejected_masked(url, tmp_path):
    """A malformed PostgreSQL URL or conninfo is exit 2 with its password masked."""
    log = tmp_path / "bad.log"
    result = invoke(["verify", "-v", "--log-file", str(log)], base_env(url, None))
    assert result.exit_code == 2
    assert_no_secret(result, log, url)


# -- secrets from files --------------------------------------------------------------------


def secret_file(tmp_path: Path, name: str, text: str) -> Path:
    """A file as Docker or Kubernetes mounts a secret: mode 600, a trailing newline."""
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_urls_from_secret_files_work_end_to_end(seeded: LockedServers, tmp_path):
    """BALSYNC_DATABASE_URL_FILE and BALSYNC_REDIS_URL_FILE alone: init-db, sync, verify."""
    env = base_env(
        None,
        None,
        BALSYNC_DATABASE_URL_FILE=str(secret_file(tmp_path, "db", seeded.pg_url())),
        BALSYNC_REDIS_URL_FILE=str(secret_file(tmp_path, "redis", seeded.redis_url())),
    )
    log = tmp_path / "files.log"
    for args, codes in ((["init-db"], (0,)), (["sync", "--force"], (1,)), (["verify"], (0,))):
        result = invoke([*args, "-v", "--log-file", str(log)], env)
        assert result.exit_code in codes, (args, result.exit_code, result.stderr)
        assert_no_secret(result, log, f"{args} from files")


def test_secret_file_loses_to_the_url_variable(seeded: LockedServers, tmp_path):
    """BALSYNC_REDIS_URL wins over BALSYNC_REDIS_URL_FILE (a file with a wrong password)."""
    env = base_env(
        seeded.pg_url(),
        seeded.redis_url(),
        BALSYNC_REDIS_URL_FILE=str(secret_file(tmp_path, "redis", seeded.redis_url(WRONG_REDIS))),
    )
    assert invoke(["verify"], env).exit_code == 0


def test_secret_file_wins_over_the_generic_variables(seeded: LockedServers, tmp_path):
    """BALSYNC_DATABASE_URL_FILE wins over DATABASE_URL (holding a wrong password)."""
    env = base_env(
        None,
        seeded.redis_url(),
        BALSYNC_DATABASE_URL_FILE=str(secret_file(tmp_path, "db", seeded.pg_url())),
        DATABASE_URL=seeded.pg_url(WRONG_PG),
    )
    assert invoke(["verify"], env).exit_code == 0


@pytest.mark.parametrize("variable", ["BALSYNC_DATABASE_URL_FILE", "BALSYNC_REDIS_URL_FILE"])
def test_unreadable_secret_file_is_exit_2_naming_the_variable(tmp_path, variable):
    """A secret file that does not exist: exit 2, the variable and path named."""
    missing = tmp_path / "nope"
    # mypy checks a ** dict's values against every keyword, `ping: bool` too; this one is a
    # variable's name, never "ping".
    env = base_env(None, None, **{variable: str(missing)})  # type: ignore[arg-type]
    result = invoke(["verify"], env)
    assert result.exit_code == 2
    assert variable in result.stderr
    assert str(missing) in result.stderr


def test_a_secret_file_s_contents_never_show_when_wrong(seeded: LockedServers, tmp_path):
    """A file holding a URL with a wrong password: exit 4, the password nowhere."""
    env = base_env(
        None,
        seeded.redis_url(),
        BALSYNC_DATABASE_URL_FILE=str(secret_file(tmp_path, "db", seeded.pg_url(WRONG_PG))),
    )
    codes = run_everywhere(env, tmp_path, "file-wrong")
    assert codes["verify"] == 4


def test_argv_holds_no_secret_in_a_real_process(seeded: LockedServers, tmp_path):
    """`python -m balance_sync verify` with secrets from the environment only: its argv,
    as a process list would show it, holds none."""
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED}
    env.update(
        {k: v for k, v in base_env(seeded.pg_url(), seeded.redis_url()).items() if v is not None}
    )
    args = [sys.executable, "-m", "balance_sync", "verify", "--json"]
    process = subprocess.run(
        args, check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert process.returncode == 0, process.stderr
    assert json.loads(process.stdout)["status"] == "in_sync"
    assert not any(secret in " ".join(args) for secret in SECRETS)
    assert not any(secret in process.stdout + process.stderr for secret in SECRETS)


# -- hostile names ---------------------------------------------------------------------------

HOSTILE_NAMES = [
    ("--table", "user_balances; DROP TABLE user_balances"),
    ("--table", 'user_balances"; DROP TABLE user_balances; --'),
    ("--table", "a.b.c"),
    ("--table", "public.user_balances --"),
    ("--table", ""),
    ("--table", "user balances"),
    ("--id-column", "telegram_id) ; DROP TABLE user_balances; --"),
    ("--id-column", 'telegram_id"'),
    ("--balance-column", "balance = 0 --"),
    ("--balance-column", "balance\x00"),
]


@pytest.mark.parametrize("command", commands())
def test_hostile_table_or_column_name_is_exit_2_for_every_command(initialized, pg, command):
    """Every command rejects each hostile name before any SQL runs (as invalid, or as no
    option of a command that reads no such name); the table stays."""
    offered = {opt for param in cli.commands[command].params for opt in param.opts}
    for option, value in HOSTILE_NAMES:
        result = initialized(command, option, value)
        assert result.exit_code == 2, (option, value, result.exit_code, result.stderr)
        expected = "invalid" if option in offered else f"No such option '{option}'"
        assert expected in result.stderr
    assert pg.execute("SELECT to_regclass('user_balances') IS NOT NULL").fetchone() == (True,)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BALSYNC_TABLE", "x; DROP TABLE user_balances"),
        ("BALSYNC_ID_COLUMN", "id; --"),
        ("BALSYNC_BALANCE_COLUMN", "balance'"),
    ],
)
def test_hostile_name_from_the_environment_is_exit_2(initialized, variable, value):
    """A hostile name from the environment is rejected the same way."""
    result = initialized("sync", env={variable: value})
    assert result.exit_code == 2
    assert "invalid" in result.stderr


# -- hostile keys and values -----------------------------------------------------------------

HOSTILE_SUFFIXES: list[bytes] = [
    b"1'); DROP TABLE user_balances; --",
    b"'); DROP TABLE user_balances; --",
    b"1; DELETE FROM user_balances",
    b"1' OR '1'='1",
    b'quote"double',
    b"tab\there",
    b"new\nline",
    b"5\n",
    b" 6",
    b"7\t",
    b"back\\slash",
    b"\\N",
    b"\\.",
    b"8\\.\n",
    b"nul\x00byte",
    b"9\x00",
    b"\xff\xfe not utf-8",
    b"[bold]markup[/bold]",
    b"[/red]",
    b":smile: $(id) `id`",
]
HOSTILE_VALUES: list[bytes] = [
    b"'); DROP TABLE user_balances; --",
    b"1; DELETE FROM user_balances",
    b"1\t2",
    b"5\n",
    b"\\N",
    b"1\x00",
    b"1.00'); --",
    b"1e3",
]


@dataclass
class Hostile:
    """What the hostile-key test seeded: each key by its bytes, and the valid one."""

    keys: list[bytes]
    valued: dict[bytes, bytes]


@pytest.fixture
def hostile(initialized: Balsync, rds: redis.Redis, key_prefix: str, pg) -> Hostile:
    """Rows 1 and 2 that Redis lacks, a valid key 3, and keys and values meant to break SQL."""
    pg.execute("INSERT INTO user_balances (telegram_id, balance) VALUES (1, 10), (2, 20)")
    prefix = key_prefix.encode()
    keys = [prefix + suffix for suffix in HOSTILE_SUFFIXES]
    valued = {prefix + b"%d" % (100 + i): value for i, value in enumerate(HOSTILE_VALUES)}
    rds.mset(dict.fromkeys(keys, b"1.00"))
    rds.mset(valued)
    rds.set(prefix + b"3", b"30.00")
    return Hostile(keys, valued)


def test_hostile_keys_and_values_change_no_sql(initialized, pg, hostile: Hostile):
    """The table survives, other rows are unchanged, only the valid key lands."""
    result = initialized("sync", "--json")
    assert result.exit_code == 1, result.stderr
    data = json.loads(result.stdout)
    assert (data["inserted"], data["invalid"]) == (1, len(hostile.keys) + len(hostile.valued))
    assert balances(pg) == {1: "10.00", 2: "20.00", 3: "30.00"}
    tables = pg.execute(
        "SELECT count(*) FROM pg_tables WHERE schemaname IN ('public', 'balsync')"
    ).fetchone()
    assert tables is not None
    assert tables[0] >= 4


def test_hostile_keys_are_kept_verbatim_ish_with_reasons(initialized, pg, hostile: Hostile):
    """Each hostile key is in skipped_records as text (NUL and bad UTF-8 escaped), with a
    reason; each hostile value next to its valid key."""
    initialized("sync")
    rows = pg.execute("SELECT key, raw_value, reason FROM balsync.skipped_records").fetchall()
    stored = {key: (raw, reason) for key, raw, reason in rows}
    for key in hostile.keys:
        assert text_of(key) in stored, key
        assert stored[text_of(key)][1].startswith("key does not end in a telegram id")
    for key, value in hostile.valued.items():
        raw, reason = stored[text_of(key)]
        assert raw == text_of(value)
        assert reason
    assert "\x00" not in "".join(stored)
    assert text_of(b"nul\x00byte") == "nul\\x00byte"


def test_hostile_keys_render_safely_in_every_report(initialized, pg, hostile: Hostile, tmp_path):
    """skipped, verify and a verbose sync print hostile keys without crashing or markup."""
    log = tmp_path / "hostile.log"
    sync = initialized("sync", "-v", "--log-file", str(log))
    assert sync.exit_code == 1, sync.stderr
    assert "DROP TABLE" in log.read_text()
    # Wide enough that no key is cut: what shows is what the key holds, markup and all.
    listed = initialized("skipped", "--limit", "1000", env={"COLUMNS": "400"})
    assert listed.exit_code in (0, 1), listed.stderr
    assert "[/red]" in listed.stdout
    assert "[bold]markup[/bold]" in listed.stdout
    data = json.loads(initialized("skipped", "--json", "--limit", "1000").stdout)
    assert "'); DROP TABLE user_balances; --" in json.dumps(data)
    verify = initialized("verify", "--json")
    assert json.loads(verify.stdout)["invalid_keys"] == len(hostile.keys) + len(hostile.valued)


def test_hostile_key_prefix_is_only_data(initialized, rds, key_prefix, pg):
    """A prefix full of SQL and quotes is matched in Redis and stored as data, nothing more."""
    prefix = key_prefix + "x'); DROP TABLE user_balances; --\":"
    rds.set(prefix.encode() + b"5", b"5.00")
    rds.set(prefix.encode() + b"x", b"5.00")
    result = initialized("sync", "--key-prefix", prefix)
    assert result.exit_code == 1, result.stderr
    assert balances(pg) == {5: "5.00"}
    row = pg.execute("SELECT key_prefix FROM balsync.sync_runs ORDER BY id DESC LIMIT 1")
    assert row.fetchone() == (prefix,)


# -- no password in the run record or the ping body ------------------------------------------

# Texts a failure may carry from a library: a URL with its password, also unencoded / # ? @,
# in the middle of a sentence, and a conninfo string.
LEAKY_TEXTS = {
    "url": f"connection to postgresql://u:{PG_PASSWORD}@127.0.0.1:5432/app failed",
    "redis-url": f"cannot reach redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0, giving up",
    "unencoded-slash": f"cannot reach redis://:{REDIS_PASSWORD}/x@127.0.0.1:6379/0",
    "unencoded-hash": f"cannot reach redis://:{REDIS_PASSWORD}#x@127.0.0.1:6379/0",
    "unencoded-question-mark": f"bad postgresql://u:{PG_PASSWORD}?x@127.0.0.1/app: no",
    "unencoded-at": f"bad postgresql://u:{PG_PASSWORD}@x@127.0.0.1/app: no",
    "conninfo": f"conninfo host=127.0.0.1 password={PG_PASSWORD} dbname=app rejected",
    "conninfo-quoted": f"conninfo host=127.0.0.1 password='{PG_PASSWORD} x' dbname=app rejected",
}


@pytest.mark.parametrize("unexpected", [True, False], ids=["unexpected", "balsync-error"])
@pytest.mark.parametrize("text", LEAKY_TEXTS.values(), ids=LEAKY_TEXTS.keys())
def test_a_failure_s_password_stays_out_of_the_run_record_and_the_ping(
    seeded: LockedServers, tmp_path, monkeypatch, unexpected: bool, text: str
):
    """A run failing with a password in its exception text: sync_runs.error and the fail
    ping's body (received on loopback) hold the failure, masked; so do output and log."""

    def fail(*_: object) -> int:
        # A fault a real server cannot be made to produce: a library quoting the URL.
        raise RuntimeError(text) if unexpected else BalsyncError(text)

    monkeypatch.setattr(RedisStore, "claim_dirty", fail)
    log = tmp_path / "failed.log"
    with ping_server() as ping:
        env = base_env(seeded.pg_url(), seeded.redis_url(), BALSYNC_PING_URL=ping.url)
        result = invoke(["sync", "--force", "-v", "--log-file", str(log)], env)
        assert result.exit_code == 5, result.stderr
        assert ping.routes() == [("GET", "/start"), ("POST", "/5")]  # the exit code
        body = ping.hits[-1].body.decode()
    with psycopg.connect(seeded.pg_url(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT status, error FROM balsync.sync_runs ORDER BY id DESC LIMIT 1"
        ).fetchone()
    assert row is not None
    status, error = row
    assert status == "failed"
    for secret in SECRETS:
        assert secret not in str(error), error
        assert secret not in body, body
    # What the failure says is kept, only the password is gone.
    assert "***" in str(error)
    assert "***" in json.loads(body)["error"]
    assert ("rejected" if "conninfo" in text else "127.0.0.1") in str(error)
    assert_no_secret(result, log, text)
