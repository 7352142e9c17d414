"""Settings: SPEC's configuration table, resolved from options, then environment, then defaults."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.connection import parse_url

from balance_sync.errors import ConfigError
from balance_sync.settings import Settings, TableName, mask_url, resolve_settings
from tests.helpers import tmp_file


@dataclass(frozen=True)
class Row:
    """One row of SPEC's configuration table, with a value for each source."""

    attr: str  # the Settings attribute, also the option's name in `options`
    env: str
    option_value: object
    env_value: str
    from_option: object
    from_env: object
    default: object


ROWS = [
    Row(
        "redis_url",
        "BALSYNC_REDIS_URL",
        "redis://opt-host:6379/1",
        "redis://env-host:6379/2",
        "redis://opt-host:6379/1",
        "redis://env-host:6379/2",
        "redis://localhost:6379/0",
    ),
    # A flag: the option can only say yes; tests/test_cluster.py pins --cluster over "0".
    Row("cluster", "BALSYNC_REDIS_CLUSTER", True, "1", True, True, False),
    Row(
        "database_url",
        "BALSYNC_DATABASE_URL",
        "postgresql://opt@opt-host/app",
        "postgresql://env@env-host/app",
        "postgresql://opt@opt-host/app",
        "postgresql://env@env-host/app",
        "",
    ),
    Row("key_prefix", "BALSYNC_KEY_PREFIX", "opt:", "env:", "opt:", "env:", "balance:"),
    Row(
        "table",
        "BALSYNC_TABLE",
        "users",
        "billing.balances",
        TableName("users"),
        TableName("balances", "billing"),
        TableName("user_balances"),
    ),
    Row("id_column", "BALSYNC_ID_COLUMN", "uid", "user_id", "uid", "user_id", "telegram_id"),
    Row(
        "balance_column", "BALSYNC_BALANCE_COLUMN", "amount", "money", "amount", "money", "balance"
    ),
    Row(
        "log_file",
        "BALSYNC_LOG_FILE",
        "/var/log/opt.log",
        "/var/log/env.log",
        Path("/var/log/opt.log"),
        Path("/var/log/env.log"),
        None,
    ),
    Row("log_format", "BALSYNC_LOG_FORMAT", "text", "json", "text", "json", "text"),
    Row("retry_timeout", "BALSYNC_RETRY_TIMEOUT", 7.5, "12", 7.5, 12.0, 60.0),
    Row("value_format", "BALSYNC_VALUE_FORMAT", "decimal", "cents", "decimal", "cents", "decimal"),
    Row("column_unit", "BALSYNC_COLUMN_UNIT", "units", "cents", "units", "cents", None),
    Row(
        "metrics_file",
        "BALSYNC_METRICS_FILE",
        "/var/lib/opt.prom",
        "/var/lib/env.prom",
        Path("/var/lib/opt.prom"),
        Path("/var/lib/env.prom"),
        None,
    ),
    Row(
        "ping_url",
        "BALSYNC_PING_URL",
        "https://opt.example/ping",
        "https://env.example/ping",
        "https://opt.example/ping",
        "https://env.example/ping",
        None,
    ),
    Row("keep_runs", "BALSYNC_KEEP_RUNS", "60d", "5w", 60 * 86400.0, 35 * 86400.0, 90 * 86400.0),
    Row("keep_skipped", "BALSYNC_KEEP_SKIPPED", "7d", "12h", 7 * 86400.0, 43200.0, 30 * 86400.0),
]
by_setting = pytest.mark.parametrize("row", ROWS, ids=[row.attr for row in ROWS])


def test_configuration_table_covers_every_setting() -> None:
    """Every Settings field has a row here, so a new setting cannot go untested."""
    assert {row.attr for row in ROWS} == {f.name for f in fields(Settings)}


@by_setting
def test_default_applies_with_no_option_and_no_environment(row: Row) -> None:
    """With nothing given, each setting has SPEC's default."""
    assert getattr(resolve_settings({row.attr: None}, {}), row.attr) == row.default


@by_setting
def test_environment_variable_sets_the_setting(row: Row) -> None:
    """Each setting's BALSYNC_* variable is read when no option is given."""
    settings = resolve_settings({row.attr: None}, {row.env: row.env_value})
    assert getattr(settings, row.attr) == row.from_env


@by_setting
def test_option_beats_environment_variable(row: Row) -> None:
    """The CLI option wins over the environment for every setting."""
    settings = resolve_settings({row.attr: row.option_value}, {row.env: row.env_value})
    assert getattr(settings, row.attr) == row.from_option


def test_resolve_settings_defaults_equal_settings_defaults() -> None:
    """Nothing given at all resolves to the plain default Settings object."""
    assert resolve_settings({}, {}) == Settings()
    assert Settings().is_default_table


def test_resolve_settings_does_not_read_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the mapping passed in counts: the process environment is not consulted."""
    monkeypatch.setenv("BALSYNC_KEY_PREFIX", "from-process:")
    monkeypatch.setenv("BALSYNC_REDIS_URL", "redis://process-host:6379/0")
    settings = resolve_settings({}, {})
    assert settings.key_prefix == "balance:"
    assert settings.redis_url == "redis://localhost:6379/0"


# -- Redis URL: where it comes from ------------------------------------------------------

REDIS_PARTS = {"REDIS_HOST": "parts-host", "REDIS_PORT": "6390", "REDIS_DB": "4"}


def test_redis_option_beats_every_environment_source(tmp_path: Path) -> None:
    """--redis-url wins over BALSYNC_REDIS_URL, its _FILE, REDIS_URL and REDIS_HOST/..."""
    env = {
        "BALSYNC_REDIS_URL": "redis://balsync-env:6379/0",
        "BALSYNC_REDIS_URL_FILE": str(tmp_file(tmp_path, "r", "redis://file:6379/0\n")),
        "REDIS_URL": "redis://plain-env:6379/0",
        **REDIS_PARTS,
    }
    assert resolve_settings({"redis_url": "redis://opt:6379/0"}, env).redis_url == (
        "redis://opt:6379/0"
    )


def test_balsync_redis_url_beats_file_redis_url_and_parts(tmp_path: Path) -> None:
    """BALSYNC_REDIS_URL is the first environment source."""
    env = {
        "BALSYNC_REDIS_URL": "redis://balsync-env:6379/0",
        "BALSYNC_REDIS_URL_FILE": str(tmp_file(tmp_path, "r", "redis://file:6379/0\n")),
        "REDIS_URL": "redis://plain-env:6379/0",
        **REDIS_PARTS,
    }
    assert resolve_settings({}, env).redis_url == "redis://balsync-env:6379/0"


def test_redis_url_file_beats_redis_url_and_parts(tmp_path: Path) -> None:
    """BALSYNC_REDIS_URL_FILE comes second; its trailing newline is dropped."""
    env = {
        "BALSYNC_REDIS_URL_FILE": str(tmp_file(tmp_path, "r", "redis://file:6379/0\n")),
        "REDIS_URL": "redis://plain-env:6379/0",
        **REDIS_PARTS,
    }
    assert resolve_settings({}, env).redis_url == "redis://file:6379/0"


def test_redis_url_beats_redis_host_port_password_db() -> None:
    """REDIS_URL comes third, before the REDIS_HOST/... parts."""
    env = {"REDIS_URL": "redis://plain-env:6379/0", **REDIS_PARTS}
    assert resolve_settings({}, env).redis_url == "redis://plain-env:6379/0"


def test_redis_url_is_built_from_host_port_db() -> None:
    """REDIS_HOST/REDIS_PORT/REDIS_DB build the URL when nothing else is given."""
    assert resolve_settings({}, REDIS_PARTS).redis_url == "redis://parts-host:6390/4"


def test_redis_parts_default_the_missing_ones() -> None:
    """A lone REDIS_HOST gets port 6379 and db 0."""
    settings = resolve_settings({}, {"REDIS_HOST": "cache"})
    assert parse_url(settings.redis_url) == {"host": "cache", "port": 6379, "db": 0}


@pytest.mark.parametrize("password", ["p@ss:w/rd", "secret", "a b%c#d?e&f=g+h", "пароль"])
def test_redis_password_with_special_characters_round_trips(password: str) -> None:
    """REDIS_PASSWORD is URL-quoted, so redis-py reads back exactly the same password."""
    env = {"REDIS_HOST": "cache", "REDIS_PORT": "6380", "REDIS_PASSWORD": password, "REDIS_DB": "2"}
    parsed = parse_url(resolve_settings({}, env).redis_url)
    assert parsed == {"host": "cache", "port": 6380, "db": 2, "password": password}


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=40))
def test_any_redis_password_round_trips_through_redis_py(password: str) -> None:
    """Whatever characters REDIS_PASSWORD holds, redis-py's parse_url gets it back intact."""
    settings = resolve_settings({}, {"REDIS_HOST": "cache", "REDIS_PASSWORD": password})
    parsed = parse_url(settings.redis_url)
    assert parsed["password"] == password
    assert parsed["host"] == "cache"


def test_redis_password_never_shows_in_redis_display() -> None:
    """The masked form of a URL built from REDIS_PASSWORD hides the password."""
    settings = resolve_settings({}, {"REDIS_HOST": "cache", "REDIS_PASSWORD": "p@ss:w/rd"})
    assert "p@ss" not in settings.redis_display
    assert "p%40ss" not in settings.redis_display
    assert "cache:6379/0" in settings.redis_display


@pytest.mark.parametrize(
    "url",
    ["redis://localhost:6379/0", "rediss://cache.example:6380/1", "unix:///run/redis/redis.sock"],
)
def test_redis_schemes_redis_rediss_unix_are_accepted(url: str) -> None:
    """redis://, rediss:// (TLS) and unix:// are the Redis URLs balsync takes."""
    assert resolve_settings({"redis_url": url}, {}).redis_url == url


# -- PostgreSQL URL: where it comes from ------------------------------------------------


def test_database_option_beats_every_environment_source(tmp_path: Path) -> None:
    """--database-url wins over BALSYNC_DATABASE_URL, its _FILE and DATABASE_URL."""
    env = {
        "BALSYNC_DATABASE_URL": "postgresql://balsync-env/app",
        "BALSYNC_DATABASE_URL_FILE": str(tmp_file(tmp_path, "d", "postgresql://file/app\n")),
        "DATABASE_URL": "postgresql://plain-env/app",
    }
    settings = resolve_settings({"database_url": "postgresql://opt/app"}, env)
    assert settings.database_url == "postgresql://opt/app"


def test_balsync_database_url_beats_file_and_database_url(tmp_path: Path) -> None:
    """BALSYNC_DATABASE_URL is the first environment source."""
    env = {
        "BALSYNC_DATABASE_URL": "postgresql://balsync-env/app",
        "BALSYNC_DATABASE_URL_FILE": str(tmp_file(tmp_path, "d", "postgresql://file/app\n")),
        "DATABASE_URL": "postgresql://plain-env/app",
    }
    assert resolve_settings({}, env).database_url == "postgresql://balsync-env/app"


def test_database_url_file_beats_database_url(tmp_path: Path) -> None:
    """BALSYNC_DATABASE_URL_FILE comes second; its trailing newline is dropped."""
    env = {
        "BALSYNC_DATABASE_URL_FILE": str(
            tmp_file(tmp_path, "d", "host=db user=balsync password=s3cret sslmode=require\n")
        ),
        "DATABASE_URL": "postgresql://plain-env/app",
    }
    assert resolve_settings({}, env).database_url == (
        "host=db user=balsync password=s3cret sslmode=require"
    )


def test_database_url_is_the_last_source() -> None:
    """DATABASE_URL is read when no BALSYNC_* source is given."""
    env = {"DATABASE_URL": "postgresql://plain-env/app"}
    assert resolve_settings({}, env).database_url == "postgresql://plain-env/app"


def test_no_database_url_means_libpq_defaults() -> None:
    """Without any source the URL is empty (libpq's PG* variables), shown as such."""
    settings = resolve_settings({}, {"PGHOST": "db", "PGUSER": "balsync"})
    assert settings.database_url == ""
    assert settings.database_display == "(libpq defaults)"


def test_database_conninfo_with_sslmode_is_accepted() -> None:
    """A libpq conninfo string with sslmode= is a valid database setting."""
    conninfo = "host=db port=5432 dbname=app user=balsync sslmode=verify-full"
    assert resolve_settings({"database_url": conninfo}, {}).database_url == conninfo


# -- masking ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "secret", "kept"),
    [
        ("redis://:s3cret@cache:6379/0", "s3cret", "cache:6379/0"),
        ("rediss://default:s3cret@cache.example:6380/1", "s3cret", "default:"),
        ("postgresql://app:s3cret@db:5432/app?sslmode=require", "s3cret", "sslmode=require"),
        ("postgresql://app:p%40ss%3Aw%2Frd@db/app", "p%40ss", "@db/app"),
        ("postgresql://db/app?user=app&password=s3cret", "s3cret", "postgresql://db/app"),
        ("host=x password=secret", "secret", "host=x"),
        ("host=x password = secret dbname=app", "secret", "host=x"),
        ("host=x password='se cret' user=y", "se cret", "user=y"),
        ("host=x PASSWORD=secret", "secret", "host=x"),
        ("redis://:s3cret@[::1/0", "s3cret", "redis://"),
    ],
)
def test_mask_url_hides_the_password(url: str, secret: str, kept: str) -> None:
    """mask_url hides passwords in URLs (even malformed ones) and in libpq conninfo strings."""
    masked = mask_url(url)
    assert secret not in masked
    assert kept in masked


@pytest.mark.parametrize(
    "url",
    ["redis://localhost:6379/0", "postgresql://app@db:5432/app", "host=db dbname=app", ""],
)
def test_mask_url_leaves_urls_without_password_unchanged(url: str) -> None:
    """A URL without a password is shown as given."""
    assert mask_url(url) == url


def test_settings_display_masks_both_urls() -> None:
    """Settings.redis_display and database_display never contain the password."""
    settings = resolve_settings(
        {
            "redis_url": "redis://:r3dis-secret@cache:6379/0",
            "database_url": "postgresql://app:pg-secret@db/app",
        },
        {},
    )
    assert "r3dis-secret" not in settings.redis_display
    assert "pg-secret" not in settings.database_display
    assert "cache" in settings.redis_display
    assert "db/app" in settings.database_display


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("user_balances", TableName("user_balances")),
        ("billing.user_balances", TableName("user_balances", "billing")),
        ("Users2", TableName("Users2")),
        ("_t", TableName("_t")),
    ],
)
def test_table_names_plain_and_schema_qualified(text: str, expected: TableName) -> None:
    """--table takes NAME or SCHEMA.NAME."""
    table = resolve_settings({"table": text}, {}).table
    assert table == expected
    assert str(table) == text


# -- malformed settings ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"redis_url": "ftp://x"}, id="redis-scheme-ftp"),
        pytest.param({"redis_url": "http://cache:6379/0"}, id="redis-scheme-http"),
        pytest.param({"redis_url": "cache:6379"}, id="redis-no-scheme"),
        pytest.param({"redis_url": "redis://cache:notaport/0"}, id="redis-port-not-a-number"),
        pytest.param({"redis_url": "redis://cache:99999/0"}, id="redis-port-out-of-range"),
        pytest.param({"redis_url": "redis://:6379/0"}, id="redis-no-host"),
        pytest.param({"database_url": "host=x port"}, id="database-conninfo-missing-equals"),
        pytest.param({"database_url": "host='x"}, id="database-conninfo-unterminated-quote"),
        pytest.param({"database_url": "nonsense"}, id="database-garbage"),
        pytest.param({"database_url": "postgresql://[bad"}, id="database-bad-uri"),
        pytest.param({"database_url": "host=x port=notaport"}, id="database-port-not-a-number"),
        pytest.param({"table": "a.b.c"}, id="table-three-parts"),
        pytest.param({"table": "users; drop table x"}, id="table-injection"),
        pytest.param({"table": "1abc"}, id="table-leading-digit"),
        pytest.param({"table": '"quoted"'}, id="table-quoted"),
        pytest.param({"table": "a."}, id="table-empty-name"),
        pytest.param({"table": ".a"}, id="table-empty-schema"),
        pytest.param({"table": "my-table"}, id="table-dash"),
        pytest.param({"table": "x" * 64}, id="table-too-long"),
        pytest.param({"table": ""}, id="table-empty"),
        pytest.param({"id_column": ""}, id="id-column-empty"),
        pytest.param({"id_column": "id; drop"}, id="id-column-injection"),
        pytest.param({"balance_column": "1x"}, id="balance-column-leading-digit"),
        pytest.param({"key_prefix": ""}, id="prefix-empty"),
        pytest.param({"key_prefix": "balance:*"}, id="prefix-star"),
        pytest.param({"key_prefix": "bal?"}, id="prefix-question-mark"),
        pytest.param({"key_prefix": "bal[ab]"}, id="prefix-bracket"),
        pytest.param({"id_column": "x", "balance_column": "x"}, id="same-columns"),
        pytest.param({"id_column": "balance"}, id="id-column-equals-default-balance-column"),
        pytest.param({"retry_timeout": "abc"}, id="retry-abc"),
        pytest.param({"retry_timeout": "-1"}, id="retry-negative"),
        pytest.param({"retry_timeout": "nan"}, id="retry-nan"),
        pytest.param({"retry_timeout": float("nan")}, id="retry-float-nan"),
        pytest.param({"value_format": "dollars"}, id="value-format"),
        pytest.param({"column_unit": "pennies"}, id="column-unit"),
        pytest.param({"log_format": "xml"}, id="log-format"),
        pytest.param({"ping_url": "ftp://hc.example/ping"}, id="ping-url-scheme"),
    ],
)
def test_malformed_option_is_a_config_error(options: dict[str, object]) -> None:
    """Every malformed setting is a ConfigError (exit 2) with a one-line message."""
    with pytest.raises(ConfigError) as info:
        resolve_settings(options, {})
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({"BALSYNC_REDIS_URL_FILE": "/nonexistent/balsync/redis-url"}, id="redis-file"),
        pytest.param(
            {"BALSYNC_DATABASE_URL_FILE": "/nonexistent/balsync/database-url"}, id="database-file"
        ),
        pytest.param({"REDIS_URL": "ftp://x"}, id="redis-url-scheme"),
        pytest.param({"REDIS_HOST": "cache", "REDIS_PORT": "abc"}, id="redis-port"),
        pytest.param({"REDIS_DB": "zero"}, id="redis-db"),
        pytest.param({"DATABASE_URL": "host=x port"}, id="database-url"),
        pytest.param({"BALSYNC_TABLE": "a.b.c"}, id="table"),
        pytest.param({"BALSYNC_KEY_PREFIX": "*"}, id="prefix"),
        pytest.param({"BALSYNC_RETRY_TIMEOUT": "abc"}, id="retry-timeout"),
        pytest.param({"BALSYNC_VALUE_FORMAT": "float"}, id="value-format"),
        pytest.param({"BALSYNC_LOG_FORMAT": "xml"}, id="log-format"),
        pytest.param({"BALSYNC_BALANCE_COLUMN": "telegram_id"}, id="same-columns"),
    ],
)
def test_malformed_environment_is_a_config_error(environ: dict[str, str]) -> None:
    """A malformed environment variable is a ConfigError (exit 2), like a malformed option."""
    with pytest.raises(ConfigError) as info:
        resolve_settings({}, environ)
    assert info.value.exit_code == 2


def test_missing_secret_file_names_the_variable() -> None:
    """A BALSYNC_REDIS_URL_FILE that does not exist is reported by name."""
    with pytest.raises(ConfigError, match="BALSYNC_REDIS_URL_FILE"):
        resolve_settings({}, {"BALSYNC_REDIS_URL_FILE": "/nonexistent/balsync/redis-url"})


def test_config_error_never_shows_a_redis_password() -> None:
    """The message about a malformed Redis URL masks the password it carries."""
    for url in ("ftp://:s3cret@cache/0", "redis://:s3cret@cache:notaport/0"):
        with pytest.raises(ConfigError) as info:
            resolve_settings({"redis_url": url}, {})
        assert "s3cret" not in str(info.value)


def test_config_error_never_shows_a_database_password() -> None:
    """The message about a malformed PostgreSQL conninfo masks the password it carries."""
    with pytest.raises(ConfigError) as info:
        resolve_settings({"database_url": "password=s3cret host"}, {})
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("value", ["0", "0.5", "60", "3600"])
def test_retry_timeout_accepts_non_negative_seconds(value: str) -> None:
    """Any number of seconds >= 0 is a retry budget."""
    assert resolve_settings({"retry_timeout": value}, {}).retry_timeout == float(value)
