"""Settings: one frozen object resolved from options, then the environment, then defaults.

The environment is read when a command runs, never at import time, so tests and embedding
programs can pass their own mapping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

import psycopg

from balance_sync.errors import ConfigError

ValueFormat = Literal["decimal", "cents"]
# What one means in a balance column without decimal places: a unit of money, or a cent.
ColumnUnit = Literal["units", "cents"]
LogFormat = Literal["text", "json"]

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_KEY_PREFIX = "balance:"
DEFAULT_TABLE = "user_balances"
DEFAULT_RETRY_TIMEOUT = 60.0
DAY = 86400.0
DEFAULT_KEEP_RUNS = 90 * DAY
DEFAULT_KEEP_SKIPPED = 30 * DAY
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"([1-9][0-9]{0,4})([smhdw])")
RETENTION_OFF = ("off", "0")

REDIS_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)
# A Redis URL whose scheme ends so names a Redis Cluster; in cluster mode the URL always does.
CLUSTER_SUFFIX = "+cluster"
SENTINEL_SUFFIX = "+sentinel"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

# Where each setting is read from when its option is not given, first found wins; the CLI's
# help shows these names, so what it documents is what `resolve_settings` reads.
SETTING_ENV: dict[str, tuple[str, ...]] = {
    "redis_url": (
        "BALSYNC_REDIS_URL",
        "BALSYNC_REDIS_URL_FILE",
        "REDIS_URL",
        "REDIS_HOST",
        "REDIS_PORT",
        "REDIS_PASSWORD",
        "REDIS_DB",
    ),
    "cluster": ("BALSYNC_REDIS_CLUSTER",),
    "database_url": ("BALSYNC_DATABASE_URL", "BALSYNC_DATABASE_URL_FILE", "DATABASE_URL"),
    "key_prefix": ("BALSYNC_KEY_PREFIX",),
    "table": ("BALSYNC_TABLE",),
    "id_column": ("BALSYNC_ID_COLUMN",),
    "balance_column": ("BALSYNC_BALANCE_COLUMN",),
    "value_format": ("BALSYNC_VALUE_FORMAT",),
    "column_unit": ("BALSYNC_COLUMN_UNIT",),
    "retry_timeout": ("BALSYNC_RETRY_TIMEOUT",),
    "log_file": ("BALSYNC_LOG_FILE",),
    "log_format": ("BALSYNC_LOG_FORMAT",),
    "metrics_file": ("BALSYNC_METRICS_FILE",),
    "ping_url": ("BALSYNC_PING_URL",),
    "keep_runs": ("BALSYNC_KEEP_RUNS",),
    "keep_skipped": ("BALSYNC_KEEP_SKIPPED",),
}


@dataclass(frozen=True)
class TableName:
    """A target table, optionally schema-qualified; always quoted when it reaches SQL."""

    name: str
    schema: str | None = None

    @classmethod
    def parse(cls, text: str) -> TableName:
        """Parse `name` or `schema.name`; anything else is a configuration error."""
        parts = text.split(".")
        if len(parts) > 2 or not all(_IDENTIFIER.fullmatch(p) for p in parts):
            raise ConfigError(
                f"invalid table name {text!r}",
                "use name or schema.name, letters, digits and _ only",
            )
        return cls(name=parts[-1], schema=parts[0] if len(parts) == 2 else None)

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to know about where the data is and how to talk about it."""

    redis_url: str = DEFAULT_REDIS_URL  # redis+cluster:// or rediss+cluster:// in cluster mode
    cluster: bool = False  # Redis Cluster: scan every primary, route each key by its slot
    database_url: str = ""  # empty: libpq defaults and PG* variables
    key_prefix: str = DEFAULT_KEY_PREFIX
    table: TableName = TableName(DEFAULT_TABLE)
    id_column: str = "telegram_id"
    balance_column: str = "balance"
    log_file: Path | None = None
    log_format: LogFormat = "text"
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT
    value_format: ValueFormat = "decimal"
    # None: not stated. A column with decimals then holds units; one without is refused.
    column_unit: ColumnUnit | None = None
    metrics_file: Path | None = None
    ping_url: str | None = None
    # How long balsync keeps its own records, in seconds; None: for ever (retention off).
    keep_runs: float | None = DEFAULT_KEEP_RUNS
    keep_skipped: float | None = DEFAULT_KEEP_SKIPPED  # skipped records and conflicts

    @property
    def is_default_table(self) -> bool:
        """True for balsync's own table, which `init-db` creates: `user_balances` with the
        default columns, in any schema. Anything else is an application's table."""
        return (
            self.table.name == DEFAULT_TABLE
            and self.id_column == "telegram_id"
            and self.balance_column == "balance"
        )

    @property
    def redis_display(self) -> str:
        """The Redis URL with its password masked."""
        return mask_url(self.redis_url)

    @property
    def database_display(self) -> str:
        """The PostgreSQL URL or conninfo with its password masked."""
        return mask_url(self.database_url) if self.database_url else "(libpq defaults)"


def _first(environ: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = environ.get(name)
        if value:
            return value
    return None


def _read_secret_file(environ: Mapping[str, str], name: str) -> str | None:
    path = environ.get(name)
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {name}={path}: {exc.strerror}") from exc


def _redis_from_parts(environ: Mapping[str, str]) -> str | None:
    """Build a URL from REDIS_HOST/REDIS_PORT/REDIS_PASSWORD/REDIS_DB, the seed's style."""
    names = ("REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_DB")
    if not any(environ.get(n) for n in names):
        return None
    host = environ.get("REDIS_HOST") or "localhost"
    port = environ.get("REDIS_PORT") or "6379"
    db = environ.get("REDIS_DB") or "0"
    if not port.isdigit() or not db.isdigit():
        raise ConfigError("REDIS_PORT and REDIS_DB must be whole numbers")
    password = environ.get("REDIS_PASSWORD")
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port}/{db}"


@dataclass(frozen=True)
class SentinelUrl:
    """`redis+sentinel://[[user]:password@]host:port[,host:port…]/service_name[/db]`.

    The credentials are the data servers'; the sentinels are asked without them.
    """

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        """Parse a Sentinel URL, or raise ConfigError naming what is wrong (never the password)."""
        scheme, _, rest = url.partition("://")
        netloc, _, path = rest.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        if not at:
            userinfo, hosts = "", netloc
        username, colon, password = userinfo.partition(":")
        bad = f"invalid Redis Sentinel URL {mask_url(url)}"
        hint = "redis+sentinel://[:password@]host:port[,host:port…]/service_name[/db]"
        sentinels = []
        for item in hosts.split(","):
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"{bad}: bad sentinel address {item!r}", hint)
            sentinels.append((host.strip("[]"), int(port)))
        service, _, db = path.split("?")[0].strip("/").partition("/")
        if not service or (db and not db.isdigit()):
            raise ConfigError(f"{bad}: name the service (and a database number)", hint)
        return cls(
            sentinels=tuple(sentinels),
            service=unquote(service),
            db=int(db or 0),
            username=unquote(username) or None,
            password=unquote(password) if colon else None,
            tls=scheme.startswith("rediss"),
        )


def check_redis_url(url: str) -> str:
    """Reject a Redis URL that redis-py would misread later, with a one-line reason."""
    if url.partition("://")[0].endswith(SENTINEL_SUFFIX):
        SentinelUrl.parse(url)
        return url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:  # its text may quote the password: not shown
        raise ConfigError(
            f"invalid Redis URL {mask_url(url)}: bad host or port",
            "percent-encode / # ? @ in the password",
        ) from exc
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(
            f"invalid Redis URL {mask_url(url)}",
            "it must start with redis://, rediss:// or unix:// "
            "(redis+cluster:// or rediss+cluster:// for a Redis Cluster, redis+sentinel:// "
            "or rediss+sentinel:// for Redis Sentinel)",
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"invalid Redis URL {mask_url(url)}: no host")
    return url


def cluster_url(url: str, cluster: bool) -> tuple[str, bool]:
    """Settle cluster mode: asked for (`--cluster`), or implied by a `+cluster` scheme.

    In cluster mode the URL is returned with its `+cluster` scheme, so that whatever opens
    it knows; a cluster has only database 0 and is reached over TCP.
    """
    parts = urlsplit(url)
    if parts.scheme.endswith(SENTINEL_SUFFIX):
        if cluster:
            raise ConfigError(
                f"{mask_url(url)} names Redis Sentinel, which serves one master, not a cluster",
                "drop --cluster and BALSYNC_REDIS_CLUSTER",
            )
        return url, False
    if not cluster and not parts.scheme.endswith(CLUSTER_SUFFIX):
        return url, False
    if parts.scheme == "unix":
        raise ConfigError(
            f"Redis Cluster mode needs a TCP URL, not {mask_url(url)}",
            "use redis+cluster://host:port/0 (or drop --cluster for a single server)",
        )
    db = parts.path.strip("/") or "".join(parse_qs(parts.query).get("db", []))
    if db not in ("", "0"):
        raise ConfigError(
            f"invalid Redis URL {mask_url(url)}: a Redis Cluster has only database 0, not {db}",
            "end the URL with /0 (or drop --cluster and redis+cluster:// for a single server)",
        )
    scheme = parts.scheme.removesuffix(CLUSTER_SUFFIX) + CLUSTER_SUFFIX
    return urlunsplit(parts._replace(scheme=scheme)), True


def check_database_url(url: str) -> str:
    """Reject a PostgreSQL URL or conninfo string that libpq cannot parse."""
    if not url:
        return url
    hint = "use postgresql://user@host:port/dbname or a libpq conninfo string"
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"invalid PostgreSQL URL {mask_url(url)}", hint) from exc
    # libpq checks numbers only when it connects, which would look like an outage (exit 4).
    for name in ("port", "connect_timeout"):
        value = str(params.get(name) or "")
        if value and not all(p.isdigit() and 0 < int(p) < 65536 for p in value.split(",")):
            raise ConfigError(f"invalid PostgreSQL URL {mask_url(url)}: bad {name}", hint)
    return url


# scheme://user: ... up to the last @ (the password may itself hold @, / or #)
_USERINFO_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*:).*@", re.DOTALL)
_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_url(url: str) -> str:
    """Hide the password of a URL or libpq conninfo string; everything else stays readable.

    Works on the raw text, not a parsed URL: libpq accepts a password with an unencoded
    `/`, `?` or `#`, where a URL parser would end the host part early and show the rest.
    """
    return _CONNINFO_PASSWORD.sub(r"\1***", _USERINFO_PASSWORD.sub(r"\1***@", url))


# A URL's password inside free text (an exception's message): the userinfo after `user:` up
# to the last @ before a blank, since the password may itself hold @, / or # unencoded.
_TEXT_USERINFO_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#\s]*:)\S*@")


def mask_text(text: str) -> str:
    """Hide every password in free text: URLs and conninfo strings quoted by any message.

    For what balsync does not compose itself (an exception's text from a library), before
    it goes anywhere a person or another service reads it: the run record, a ping, a log.
    """
    return _CONNINFO_PASSWORD.sub(r"\1***", _TEXT_USERINFO_PASSWORD.sub(r"\1***@", text))


def _number(raw: object, name: str, *, minimum: float) -> float:
    try:
        value = float(str(raw))
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number of seconds, not {raw!r}") from exc
    if not value >= minimum:  # also rejects NaN
        raise ConfigError(f"{name} must be at least {minimum:g}, not {raw!r}")
    return value


def _flag(raw: str | None, name: str) -> bool:
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0 (true/false, yes/no, on/off), not {raw!r}")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as `90d`, `12h`, `30m`, `2w` or `45s`; ValueError otherwise.

    A bare number is refused: `90` could mean seconds or days, and a retention period
    read the wrong way deletes history that cannot come back.
    """
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"invalid duration {text!r}: give a whole number and a unit, "
            "e.g. 90d, 12h, 30m, 2w (s m h d w)"
        )
    return float(int(match[1]) * DURATION_UNITS[match[2]])


def duration_text(seconds: float) -> str:
    """A duration in the largest unit that divides it: 7776000 → `90d`, 1209600 → `2w`."""
    for unit, size in sorted(DURATION_UNITS.items(), key=lambda item: -item[1]):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _retention(raw: str | None, name: str, default: float) -> float | None:
    """A retention period: a duration, or `off` (or `0`) to keep for ever."""
    if raw is None:
        return default
    if raw.strip().lower() in RETENTION_OFF:
        return None
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}", "or `off` to keep everything") from exc


def _check_retention(keep_runs: float | None, keep_skipped: float | None) -> None:
    """Skipped records and conflicts go with their run, so they cannot outlive it."""
    if keep_runs is not None and (keep_skipped is None or keep_skipped > keep_runs):
        skipped = "off" if keep_skipped is None else duration_text(keep_skipped)
        raise ConfigError(
            f"--keep-skipped {skipped} is longer than --keep-runs {duration_text(keep_runs)}: "
            "skipped records and conflicts are deleted with their run",
            "keep them no longer than the runs, or set --keep-runs off too",
        )


def _or_default(value: str | None, default: str) -> str:
    # Only an absent setting takes the default; an empty one (`--table "$UNSET"`) is an error.
    return default if value is None else value


def _choice(raw: str, name: str, allowed: tuple[str, ...]) -> str:
    if raw not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {raw!r}")
    return raw


def _column_unit(raw: str | None) -> ColumnUnit | None:
    if raw is None:
        return None
    return _choice(raw, "column unit", ("units", "cents"))  # type: ignore[return-value]


def resolve_settings(options: Mapping[str, object | None], environ: Mapping[str, str]) -> Settings:
    """Resolve every setting: the option wins, then the environment, then the default.

    `options` holds the CLI's values by setting name, None where the option was not given.
    """

    def pick(option: str, *env: str) -> str | None:
        value = options.get(option)
        if value is not None:
            return str(value)
        return _first(environ, *(env or SETTING_ENV[option]))

    redis_url = (
        pick("redis_url", "BALSYNC_REDIS_URL")
        or _read_secret_file(environ, "BALSYNC_REDIS_URL_FILE")
        or _first(environ, "REDIS_URL")
        or _redis_from_parts(environ)
        or DEFAULT_REDIS_URL
    )
    database_url = (
        pick("database_url", "BALSYNC_DATABASE_URL")
        or _read_secret_file(environ, "BALSYNC_DATABASE_URL_FILE")
        or _first(environ, "DATABASE_URL")
        or ""
    )
    key_prefix = pick("key_prefix")
    if key_prefix is None:
        key_prefix = DEFAULT_KEY_PREFIX
    if not key_prefix or any(c in key_prefix for c in "*?[]\\"):
        raise ConfigError(
            f"invalid key prefix {key_prefix!r}", "it must be non-empty, without * ? [ ] or \\"
        )
    columns = {}
    for option, default in (("id_column", "telegram_id"), ("balance_column", "balance")):
        column = pick(option)
        column = default if column is None else column
        if not _IDENTIFIER.fullmatch(column):
            raise ConfigError(f"invalid column name {column!r}", "letters, digits and _ only")
        columns[option] = column
    if columns["id_column"] == columns["balance_column"]:
        raise ConfigError("the id column and the balance column must differ")

    log_file = pick("log_file")
    metrics_file = pick("metrics_file")
    ping_url = pick("ping_url")
    if ping_url and urlsplit(ping_url).scheme not in ("http", "https"):
        # The URL itself is not printed: its path is often the check's secret token.
        raise ConfigError("invalid ping URL: it must start with http:// or https://")
    keep_runs = _retention(pick("keep_runs"), "--keep-runs/BALSYNC_KEEP_RUNS", DEFAULT_KEEP_RUNS)
    keep_skipped = _retention(
        pick("keep_skipped"),
        "--keep-skipped/BALSYNC_KEEP_SKIPPED",
        DEFAULT_KEEP_SKIPPED,
    )
    _check_retention(keep_runs, keep_skipped)
    redis_url, cluster = cluster_url(
        check_redis_url(redis_url),
        _flag(pick("cluster"), "BALSYNC_REDIS_CLUSTER"),
    )
    return Settings(
        redis_url=redis_url,
        cluster=cluster,
        database_url=check_database_url(database_url),
        key_prefix=key_prefix,
        table=TableName.parse(_or_default(pick("table"), DEFAULT_TABLE)),
        id_column=columns["id_column"],
        balance_column=columns["balance_column"],
        log_file=Path(log_file) if log_file else None,
        log_format=_choice(  # type: ignore[arg-type]
            pick("log_format") or "text", "log format", ("text", "json")
        ),
        retry_timeout=_number(
            pick("retry_timeout") or DEFAULT_RETRY_TIMEOUT,
            "retry timeout",
            minimum=0,
        ),
        value_format=_choice(  # type: ignore[arg-type]
            pick("value_format") or "decimal",
            "value format",
            ("decimal", "cents"),
        ),
        column_unit=_column_unit(pick("column_unit")),
        metrics_file=Path(metrics_file) if metrics_file else None,
        ping_url=ping_url or None,
        keep_runs=keep_runs,
        keep_skipped=keep_skipped,
    )
