"""`balsync clear-cache`: only persisted balances leave Redis; a write made meanwhile survives."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
import redis

from balance_sync.cli.commands import cache as cache_commands
from balance_sync.ops.clear_cache import ClearOptions, clear_cache
from balance_sync.settings import TableName, resolve_settings
from balance_sync.stores.postgres import Database, Reads, TableLock, TargetTable
from balance_sync.stores.redis import RedisStore
from tests.helpers import insert_rows
from tests.support.devservers import ValkeyServer, free_port

Pg = psycopg.Connection[tuple[object, ...]]
JSON_KEYS = {
    "status",
    "dry_run",
    "scanned",
    "deleted",
    "kept",
    "kept_by_reason",
    "memory_freed_bytes",
}
NO_KEPT = {"not_persisted": 0, "differs": 0, "invalid": 0, "recently_used": 0, "changed": 0}


def _keys(rds: redis.Redis, prefix: str) -> dict[bytes, bytes]:
    found: dict[bytes, bytes] = {}
    for key in rds.scan_iter(match=prefix + "*"):
        if rds.type(key) == b"string":
            found[key] = cast(bytes, rds.get(key))  # a string key; the client decodes nothing
    return found


def _mixed(rds: redis.Redis, pg: Pg, prefix: str) -> None:
    """Two deletable keys and one of each kind clear-cache keeps."""
    insert_rows(pg, {1: "1500.00", 2: "42.50", 3: "11.00"})
    rds.mset(
        {
            f"{prefix}1": "1500",  # equals 1500.00 as a number
            f"{prefix}2": "42.5",
            f"{prefix}3": "10",  # differs
            f"{prefix}4": "7",  # not persisted
            f"{prefix}5": "abc",  # invalid value
            f"{prefix}x": "5",  # invalid id
        }
    )
    rds.hset(f"{prefix}6", "balance", "1")  # another type: invalid


def _json(result: object) -> dict[str, Any]:
    data = json.loads(result.stdout)  # type: ignore[attr-defined]
    assert set(data) == JSON_KEYS
    return data  # type: ignore[no-any-return]


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stdin is a terminal, as when a person runs the command."""
    monkeypatch.setattr(cache_commands, "stdin_is_terminal", lambda: True)


@pytest.fixture
def own_valkey(tmp_path: Path) -> Iterator[ValkeyServer]:
    """A Valkey of the test's own, for configuration a shared server must not get."""
    server = ValkeyServer(tmp_path / "valkey").start()
    yield server
    server.stop()


def test_deletes_exactly_the_keys_whose_value_is_persisted(initialized, rds, pg, key_prefix):
    """Equal as a number goes; differing, unpersisted and invalid keys stay, counted by reason."""
    _mixed(rds, pg, key_prefix)
    result = initialized("clear-cache", "--yes", "--json")
    assert result.exit_code == 0, result.stderr
    data = _json(result)
    assert data["status"] == "success"
    assert data["dry_run"] is False
    assert (data["scanned"], data["deleted"], data["kept"]) == (7, 2, 5)
    assert data["kept_by_reason"] == {**NO_KEPT, "not_persisted": 1, "differs": 1, "invalid": 3}
    assert isinstance(data["memory_freed_bytes"], int)
    assert data["memory_freed_bytes"] >= 0
    left = _keys(rds, key_prefix)
    assert set(left) == {f"{key_prefix}{s}".encode() for s in ("3", "4", "5", "x")}
    assert rds.type(f"{key_prefix}6") == b"hash"


def test_dry_run_deletes_nothing_asks_nothing_and_estimates_memory(
    initialized, rds, pg, key_prefix
):
    """--dry-run reports the would-be deletions and their MEMORY USAGE, without a prompt."""
    _mixed(rds, pg, key_prefix)
    before = _keys(rds, key_prefix)
    result = initialized("clear-cache", "--dry-run", "--json")  # stdin is no terminal here
    assert result.exit_code == 0, result.stderr
    data = _json(result)
    assert data["dry_run"] is True
    assert (data["scanned"], data["deleted"], data["kept"]) == (7, 2, 5)
    assert isinstance(data["memory_freed_bytes"], int)
    assert data["memory_freed_bytes"] > 0
    assert _keys(rds, key_prefix) == before


def test_human_summary_names_counts_reasons_and_memory(initialized, rds, pg, key_prefix):
    """Without --json a table shows what went and why the rest stayed."""
    _mixed(rds, pg, key_prefix)
    dry = initialized("clear-cache", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "Dry run" in dry.stdout
    assert "would be deleted" in dry.stdout
    assert "memory it would free" in dry.stdout
    assert "reads a missing balance through to PostgreSQL" in " ".join(dry.stdout.split())
    real = initialized("clear-cache", "--yes")
    assert real.exit_code == 0, real.stderr
    for text in ("deleted", "not persisted", "differs from PostgreSQL", "invalid", "memory freed"):
        assert text in real.stdout


def test_quiet_prints_nothing(initialized, rds, pg, key_prefix):
    """--quiet: a successful clear-cache says nothing."""
    _mixed(rds, pg, key_prefix)
    result = initialized("clear-cache", "--yes", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""


def test_exact_decimal_comparison_never_float(initialized, rds, pg, key_prefix):
    """Trailing zeros and negatives compare exactly; 0.1+0.2-style float noise cannot match."""
    insert_rows(pg, {1: "1500.10", 2: "-5.00", 3: "0.30", 4: "100000000000000000.01"})
    rds.mset(
        {
            f"{key_prefix}1": "1500.1",
            f"{key_prefix}2": "-5",
            f"{key_prefix}3": "0.3",
            f"{key_prefix}4": "100000000000000000",  # a float could not tell these apart
        }
    )
    data = _json(initialized("clear-cache", "--yes", "--json"))
    assert (data["deleted"], data["kept_by_reason"]["differs"]) == (3, 1)
    assert set(_keys(rds, key_prefix)) == {f"{key_prefix}4".encode()}


def test_cents_format_compares_minor_units(initialized, rds, pg, key_prefix):
    """--value-format cents: '150000' equals 1500.00; a decimal string is invalid there."""
    insert_rows(pg, {1: "1500.00", 2: "1500.00"})
    rds.mset({f"{key_prefix}1": "150000", f"{key_prefix}2": "1500.00"})
    data = _json(initialized("clear-cache", "--yes", "--json", "--value-format", "cents"))
    assert data["deleted"] == 1
    assert data["kept_by_reason"] == {**NO_KEPT, "invalid": 1}
    assert set(_keys(rds, key_prefix)) == {f"{key_prefix}2".encode()}


def test_compare_and_delete_keeps_a_key_whose_bytes_changed(servers, rds, key_prefix):
    """The core compare-and-delete, given a stale expected value, deletes nothing."""
    key = f"{key_prefix}1".encode()
    other = f"{key_prefix}2".encode()
    rds.mset({key: b"150", other: b"1500"})
    store = RedisStore(servers.redis, retry_timeout=5)
    try:
        # Stale: the value read was 100, the application wrote 150 since.
        assert store.delete_if_unchanged([(key, b"100")]) == [False]
        # Equal as a number is not enough: the bytes must be those read.
        assert store.delete_if_unchanged([(other, b"1500.00")]) == [False]
        assert rds.mget([key, other]) == [b"150", b"1500"]
        assert store.delete_if_unchanged([(key, b"150"), (other, b"1500")]) == [True, True]
        assert rds.exists(key, other) == 0
        assert store.delete_if_unchanged([]) == []
    finally:
        store.close()


def test_a_balance_written_between_read_and_delete_survives(
    initialized, rds, pg, key_prefix, monkeypatch
):
    """The application writes while PostgreSQL is read: the new balance stays in Redis."""
    insert_rows(pg, {1: "10.00", 2: "20.00"})
    rds.mset({f"{key_prefix}1": "10.00", f"{key_prefix}2": "20.00"})
    fetch = Reads.persisted_balances

    def fetch_then_app_writes(
        self: Reads, target: TargetTable, ids: Sequence[int]
    ) -> dict[int, Decimal | None]:
        found = fetch(self, target, ids)
        if 1 in ids:  # key 1 was read in this page; the bot credits user 1 right now
            rds.set(f"{key_prefix}1", "11.00")
        return found

    monkeypatch.setattr(Reads, "persisted_balances", fetch_then_app_writes)
    data = _json(initialized("clear-cache", "--yes", "--json"))
    assert data["deleted"] == 1
    assert data["kept_by_reason"] == {**NO_KEPT, "changed": 1}
    assert rds.get(f"{key_prefix}1") == b"11.00"
    assert rds.exists(f"{key_prefix}2") == 0


def test_confirmation_accepted_deletes(initialized, rds, pg, key_prefix, terminal):
    """At a terminal, answering y at the prompt (on stderr) deletes."""
    _mixed(rds, pg, key_prefix)
    result = initialized("clear-cache", "--json", input="y\n")
    assert result.exit_code == 0, result.stderr
    assert "Delete the keys" in result.stderr
    assert "Safe only where the application reads a missing balance through" in result.stderr
    assert key_prefix in result.stderr
    assert _json(result)["deleted"] == 2
    assert rds.exists(f"{key_prefix}1") == 0


@pytest.mark.parametrize("answer", ["n\n", "\n", ""], ids=["no", "default", "end-of-input"])
def test_confirmation_declined_deletes_nothing(initialized, rds, pg, key_prefix, terminal, answer):
    """No, the default answer, or end of input: nothing deleted, exit 0, status skipped."""
    _mixed(rds, pg, key_prefix)
    before = _keys(rds, key_prefix)
    result = initialized("clear-cache", "--json", input=answer)
    assert result.exit_code == 0, result.stderr
    data = _json(result)
    assert data["status"] == "skipped"
    assert (data["scanned"], data["deleted"], data["memory_freed_bytes"]) == (0, 0, None)
    assert _keys(rds, key_prefix) == before
    human = initialized("clear-cache", input=answer)
    assert "cancelled: nothing deleted" in human.stdout


def test_refuses_without_yes_when_stdin_is_not_a_terminal(initialized, rds, pg, key_prefix):
    """Under cron or a pipe, no --yes is exit 2 with one clear line, and nothing is deleted."""
    _mixed(rds, pg, key_prefix)
    before = _keys(rds, key_prefix)
    result = initialized("clear-cache", input="y\n")
    assert result.exit_code == 2
    assert "refusing to delete without --yes when stdin is not a terminal" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
    assert _keys(rds, key_prefix) == before


def test_idle_days_keeps_keys_touched_recently(initialized, rds, pg, key_prefix):
    """--idle-days 1 keeps freshly written keys (OBJECT IDLETIME below a day); 0 takes them."""
    insert_rows(pg, {1: "1.00", 2: "2.00"})
    rds.mset({f"{key_prefix}1": "1.00", f"{key_prefix}2": "2.00", f"{key_prefix}3": "3.00"})
    recent = _json(initialized("clear-cache", "--yes", "--json", "--idle-days", "1"))
    assert (recent["scanned"], recent["deleted"]) == (3, 0)
    assert recent["kept_by_reason"] == {**NO_KEPT, "recently_used": 3}
    assert len(_keys(rds, key_prefix)) == 3
    dry = _json(initialized("clear-cache", "--dry-run", "--json", "--idle-days", "0"))
    assert (dry["deleted"], dry["kept_by_reason"]["not_persisted"]) == (2, 1)
    anyway = _json(initialized("clear-cache", "--yes", "--json", "--idle-days", "0"))
    assert (anyway["deleted"], anyway["kept_by_reason"]["not_persisted"]) == (2, 1)
    assert set(_keys(rds, key_prefix)) == {f"{key_prefix}3".encode()}


def test_idle_days_must_be_a_whole_number_of_days(initialized):
    """--idle-days -1 or x is a usage error, exit 2."""
    for bad in ("-1", "x"):
        result = initialized("clear-cache", "--yes", "--idle-days", bad)
        assert result.exit_code == 2
        assert "--idle-days" in result.stderr


def test_idle_days_under_an_lfu_policy_is_a_clear_error(initialized, own_valkey, key_prefix):
    """An LFU server tracks no idle time: exit 2 naming the way out, nothing deleted."""
    client = redis.Redis.from_url(own_valkey.url)
    client.config_set("maxmemory-policy", "allkeys-lfu")
    client.set(f"{key_prefix}1", "1.00")
    env = {"BALSYNC_REDIS_URL": own_valkey.url}
    result = initialized("clear-cache", "--yes", "--idle-days", "1", env=env)
    assert result.exit_code == 2
    assert "cannot tell how long keys were idle" in result.stderr
    assert "--idle-days" in result.stderr
    assert client.exists(f"{key_prefix}1") == 1
    client.close()


def test_memory_is_na_where_the_server_refuses_memory_and_info(
    initialized, own_valkey, pg, key_prefix
):
    """MEMORY USAGE and INFO denied by ACL: the figure is null (n/a), the clearing still works."""
    client = redis.Redis.from_url(own_valkey.url)
    insert_rows(pg, {1: "1.00"})
    client.set(f"{key_prefix}1", "1.00")
    client.acl_setuser("default", enabled=True, nopass=True, commands=["-memory", "-info"])
    env = {"BALSYNC_REDIS_URL": own_valkey.url}
    dry = initialized("clear-cache", "--dry-run", "--json", env=env)
    assert dry.exit_code == 0, dry.stderr
    assert (_json(dry)["deleted"], _json(dry)["memory_freed_bytes"]) == (1, None)
    assert "n/a" in initialized("clear-cache", "--dry-run", env=env).stdout
    real = initialized("clear-cache", "--yes", "--json", env=env)
    assert (_json(real)["deleted"], _json(real)["memory_freed_bytes"]) == (1, None)
    assert client.exists(f"{key_prefix}1") == 0
    client.close()


def test_skips_while_a_sync_holds_the_table_lock(initialized, rds, pg, key_prefix, database_url):
    """The per-table advisory lock is taken: exit 0, status skipped, nothing deleted."""
    _mixed(rds, pg, key_prefix)
    before = _keys(rds, key_prefix)
    holder = Database(database_url, retry_timeout=5)
    try:
        assert TableLock(holder).try_lock(TableName("user_balances"), 0)
        result = initialized("clear-cache", "--yes", "--json")
        human = initialized("clear-cache", "--yes")
    finally:
        holder.close()
    assert result.exit_code == 0, result.stderr
    assert _json(result)["status"] == "skipped"
    assert "another run holds the lock" in human.stdout
    assert _keys(rds, key_prefix) == before
    assert _json(initialized("clear-cache", "--yes", "--json"))["deleted"] == 2  # lock free


def test_works_page_by_page(env, rds, pg, key_prefix, initialized):
    """Many SCAN pages: every persisted key goes, every other stays."""
    insert_rows(pg, {i: f"{i}.00" for i in range(1, 41)})
    rds.mset({f"{key_prefix}{i}": f"{i}" for i in range(1, 51)})
    settings = resolve_settings({}, env)
    result = clear_cache(settings, ClearOptions(scan_count=3))
    assert (result.scanned, result.deleted, result.kept) == (50, 40, 10)
    assert result.kept_by_reason["not_persisted"] == 10
    assert len(_keys(rds, key_prefix)) == 10


def test_application_table_with_custom_columns(balsync, rds, pg, key_prefix):
    """--table/--id-column/--balance-column: compared against the named columns."""
    pg.execute("CREATE TABLE users (id bigint PRIMARY KEY, name text, money numeric)")
    pg.execute("INSERT INTO users VALUES (1, 'a', 5), (2, 'b', NULL)")
    rds.mset({f"{key_prefix}1": "5.00", f"{key_prefix}2": "0"})
    args = ("--table", "users", "--id-column", "id", "--balance-column", "money")
    data = _json(balsync("clear-cache", "--yes", "--json", *args))
    assert data["deleted"] == 1
    assert data["kept_by_reason"] == {**NO_KEPT, "differs": 1}  # NULL vouches for nothing


def test_missing_target_table_is_exit_5_naming_init_db(balsync, rds, key_prefix):
    """No target table: one line saying to run init-db, exit 5."""
    rds.set(f"{key_prefix}1", "1")
    result = balsync("clear-cache", "--yes")
    assert result.exit_code == 5
    assert "init-db" in result.stderr
    assert rds.exists(f"{key_prefix}1") == 1


def test_redis_unavailable_is_exit_3(initialized):
    """Redis down: exit 3 after the retry budget."""
    env = {"BALSYNC_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "BALSYNC_RETRY_TIMEOUT": "0"}
    result = initialized("clear-cache", "--yes", env=env)
    assert result.exit_code == 3
    assert "Redis" in result.stderr


def test_postgres_unavailable_is_exit_4(balsync, rds, key_prefix):
    """PostgreSQL down: exit 4, and no key is touched."""
    rds.set(f"{key_prefix}1", "1")
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    result = balsync(
        "clear-cache", "--yes", env={"BALSYNC_DATABASE_URL": url, "BALSYNC_RETRY_TIMEOUT": "0"}
    )
    assert result.exit_code == 4
    assert "PostgreSQL" in result.stderr
    assert rds.exists(f"{key_prefix}1") == 1


def test_help_documents_confirmation_and_examples(balsync):
    """--help says when it asks, and shows examples."""
    result = balsync("clear-cache", "--help")
    assert result.exit_code == 0
    for text in ("--yes", "--dry-run", "--idle-days", "Example", "not a terminal"):
        assert text in result.stdout


def test_stops_without_deleting_when_a_sync_takes_the_lock_mid_run(
    initialized, rds, pg, key_prefix, database_url, monkeypatch
):
    """The lock's connection dies and a sync takes the lock: exit 5, the page is not deleted."""
    insert_rows(pg, {1: "1.00"})
    rds.set(f"{key_prefix}1", "1.00")
    thief = Database(database_url, retry_timeout=5)
    fetch = Reads.persisted_balances

    def fetch_then_lose_the_lock(
        self: Reads, target: TargetTable, ids: Sequence[int]
    ) -> dict[int, Decimal | None]:
        found = fetch(self, target, ids)
        if 1 not in ids:  # SCAN's page held none of this test's keys
            return found
        killed = pg.execute(
            """SELECT pg_terminate_backend(pid, 5000) FROM pg_locks
               WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""
        ).fetchall()
        assert killed == [(True,)]
        assert TableLock(thief).try_lock(TableName("user_balances"), 0)
        return found

    monkeypatch.setattr(Reads, "persisted_balances", fetch_then_lose_the_lock)
    try:
        result = initialized("clear-cache", "--yes")
    finally:
        thief.close()
    assert result.exit_code == 5
    assert "lost the advisory lock" in result.stderr
    assert rds.get(f"{key_prefix}1") == b"1.00"


def test_help_says_it_needs_a_read_through(initialized):
    """--help states that clearing is safe only where the application reads misses through
    to PostgreSQL, and that --dry-run says so too."""
    result = initialized("clear-cache", "--help")
    text = " ".join(result.stdout.split())
    assert "Safe only where the application reads a missing balance through to PostgreSQL" in text
    assert "--dry-run reminds you" in text
