"""`balsync verify`: every valid key compared with its row, exactly, writing nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import Balsync, insert_rows, seed
from tests.support.devservers import ValkeyServer, free_port
from tests.support.locked_table import BUDGET, ENDS_WITHIN, ends_in_time, short_deadline, table_lock


def verify_json(balsync: Balsync, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `verify --json`, insist on one JSON object, and return it with the exit code."""
    result = balsync("verify", "--json", *args, env=env)
    assert result.exit_code in (0, 1), (result.exit_code, result.stdout, result.stderr)
    data: dict[str, Any] = json.loads(result.stdout)
    data["exit_code"] = result.exit_code
    return data


def test_in_sync_after_a_sync_exits_0_with_equal_sums(initialized, rds, key_prefix):
    """Right after a sync every key matches its row: status in_sync, exit 0, equal sums."""
    seed(rds, key_prefix, {"1": "1500.00", "2": "42", "3": "0.10", "4": "7.5"})
    initialized.ok("sync")
    data = verify_json(initialized)
    assert data == {
        "status": "in_sync",
        "redis_keys": 4,
        "valid_keys": 4,
        "invalid_keys": 0,
        "pg_rows": 4,
        "redis_sum": "1549.60",
        "pg_sum": "1549.60",
        "missing_in_pg": 0,
        "differing": 0,
        "missing_in_redis": 0,
        "examples": {"missing_in_pg": [], "differing": [], "missing_in_redis": []},
        "exit_code": 0,
    }


def test_in_sync_human_output_shows_status_and_totals(initialized, rds, key_prefix):
    """Without --json a summary table says in_sync and shows both sums."""
    seed(rds, key_prefix, {"1": "10.00"})
    initialized.ok("sync")
    result = initialized.ok("verify")
    assert "in_sync" in result.stdout
    assert "sum in Redis" in result.stdout
    assert "10.00" in result.stdout
    assert "Missing in PostgreSQL" not in result.stdout


def test_empty_sides_are_in_sync_with_zero_sums(initialized):
    """No key and no row: in sync, sums are "0.00"."""
    data = verify_json(initialized)
    assert (data["status"], data["redis_sum"], data["pg_sum"]) == ("in_sync", "0.00", "0.00")
    assert (data["redis_keys"], data["pg_rows"], data["exit_code"]) == (0, 0, 0)


def test_key_missing_in_postgres_is_drift(initialized, rds, key_prefix, pg):
    """A valid key without a row is reported with its id, key and Redis value; exit 1."""
    seed(rds, key_prefix, {"1": "5.00", "2": "6.25"})
    insert_rows(pg, {1: "5.00"})
    data = verify_json(initialized)
    assert (data["status"], data["exit_code"]) == ("drift", 1)
    assert (data["missing_in_pg"], data["differing"], data["missing_in_redis"]) == (1, 0, 0)
    assert data["examples"]["missing_in_pg"] == [
        {"id": 2, "key": f"{key_prefix}2", "redis": "6.25"}
    ]
    assert (data["redis_sum"], data["pg_sum"]) == ("11.25", "5.00")


def test_differing_value_is_drift_with_both_values(initialized, rds, key_prefix, pg):
    """A row whose balance is not the key's value is reported with both values; exit 1."""
    seed(rds, key_prefix, {"1": "5.00", "2": "6.25"})
    insert_rows(pg, {1: "5.00", 2: "6.26"})
    data = verify_json(initialized)
    assert (data["status"], data["exit_code"]) == ("drift", 1)
    assert (data["missing_in_pg"], data["differing"], data["missing_in_redis"]) == (0, 1, 0)
    assert data["examples"]["differing"] == [
        {"id": 2, "key": f"{key_prefix}2", "redis": "6.25", "postgres": "6.26"}
    ]


def test_row_missing_in_redis_is_drift(initialized, rds, key_prefix, pg):
    """A row whose key is absent from Redis is reported with its balance; exit 1."""
    seed(rds, key_prefix, {"1": "5.00"})
    insert_rows(pg, {1: "5.00", 77: "-3.50"})
    data = verify_json(initialized)
    assert (data["status"], data["exit_code"]) == ("drift", 1)
    assert (data["missing_in_pg"], data["differing"], data["missing_in_redis"]) == (0, 0, 1)
    assert data["examples"]["missing_in_redis"] == [
        {"id": 77, "key": f"{key_prefix}77", "postgres": "-3.50"}
    ]
    assert data["pg_sum"] == "1.50"


def test_every_kind_of_drift_at_once_in_the_human_output(initialized, rds, key_prefix, pg):
    """The human report lists one table per kind of discrepancy, keys printed verbatim."""
    seed(rds, key_prefix, {"1": "1.00", "2": "2.00", "3": "3.00"})
    insert_rows(pg, {1: "1.00", 2: "2.50", 4: "4.00"})
    result = initialized("verify")
    assert result.exit_code == 1, result.stderr
    for title in ("Missing in PostgreSQL", "Differing", "Missing in Redis"):
        assert title in result.stdout
    for key in (f"{key_prefix}3", f"{key_prefix}2", f"{key_prefix}4"):
        assert key in result.stdout
    assert "drift" in result.stdout


def test_values_are_compared_as_exact_decimals_not_text_nor_float(initialized, rds, key_prefix, pg):
    """ "42" equals 42.00 and "0.1" equals 0.10, but a cent apart near 10^18 differs."""
    seed(
        rds,
        key_prefix,
        {
            "1": "42",
            "2": "0.1",
            "3": "-0",
            "4": "999999999999999999.99",
            "5": "999999999999999999.99",
        },
    )
    insert_rows(
        pg,
        {1: "42.00", 2: "0.10", 3: "0.00", 4: "999999999999999999.99", 5: "999999999999999999.98"},
    )
    # float(…99.99) == float(…99.98): a float comparison would call these equal.
    assert float("999999999999999999.99") == float("999999999999999999.98")
    data = verify_json(initialized, "--allow-negative")
    assert data["differing"] == 1
    assert data["examples"]["differing"][0]["id"] == 5


def test_sums_are_exact_beyond_float_precision(initialized, rds, key_prefix, pg):
    """Sums add as exact decimals: ten values near 10^18 plus cents lose nothing."""
    big = "999999999999999999.99"
    seed(rds, key_prefix, {str(i): big for i in range(1, 11)} | {"11": "0.01"})
    insert_rows(pg, dict.fromkeys(range(1, 11), big) | {11: "0.02"})
    data = verify_json(initialized)
    assert data["redis_sum"] == "9999999999999999999.91"
    assert data["pg_sum"] == "9999999999999999999.92"
    assert data["differing"] == 1


def test_invalid_keys_are_counted_and_ignored(initialized, rds, key_prefix, pg):
    """Keys a sync would skip count as invalid, never as drift; their rows are not missing."""
    seed(
        rds,
        key_prefix,
        {
            "1": "5.00",
            "abc": "1.00",
            "007": "1.00",
            "2": "1.005",
            "3": "NaN",
            "4": "-1.00",
        },
    )
    rds.hset(key_prefix + "5", "balance", "9.00")
    insert_rows(pg, {1: "5.00", 2: "1.00", 3: "2.00", 4: "3.00", 5: "9.00"})
    data = verify_json(initialized)
    assert (data["status"], data["exit_code"]) == ("in_sync", 0)
    assert (data["redis_keys"], data["valid_keys"], data["invalid_keys"]) == (7, 1, 6)
    assert data["missing_in_redis"] == 0  # ids 2-5 have keys, invalid ones
    assert (data["redis_sum"], data["pg_sum"]) == ("5.00", "20.00")


def test_allow_negative_compares_negative_balances(initialized, rds, key_prefix, pg):
    """A negative value is invalid (ignored) by default and compared with --allow-negative."""
    seed(rds, key_prefix, {"1": "-2.00"})
    insert_rows(pg, {1: "-3.00"})
    assert verify_json(initialized)["invalid_keys"] == 1
    data = verify_json(initialized, "--allow-negative")
    assert (data["invalid_keys"], data["differing"], data["redis_sum"]) == (0, 1, "-2.00")


def test_cents_value_format_compares_minor_units(initialized, rds, key_prefix, pg):
    """With --value-format cents, "150000" equals 1500.00 and "150001" differs as 1500.01."""
    seed(rds, key_prefix, {"1": "150000", "2": "150001", "3": "7"})
    insert_rows(pg, {1: "1500.00", 2: "1500.00", 3: "0.07"})
    data = verify_json(initialized, "--value-format", "cents")
    assert data["differing"] == 1
    assert data["examples"]["differing"] == [
        {"id": 2, "key": f"{key_prefix}2", "redis": "1500.01", "postgres": "1500.00"}
    ]
    assert data["redis_sum"] == "3000.08"
    # The same keys read as decimals are other amounts entirely.
    assert verify_json(initialized)["differing"] == 3


def test_limit_caps_the_examples_not_the_counts(initialized, rds, key_prefix, pg):
    """--limit N lists at most N examples of each kind; the counts stay complete."""
    seed(rds, key_prefix, {str(i): "1.00" for i in range(1, 6)})
    seed(rds, key_prefix, {str(i): "1.00" for i in range(11, 16)})
    insert_rows(pg, dict.fromkeys(range(11, 16), "2.00"))
    insert_rows(pg, dict.fromkeys(range(21, 26), "3.00"))
    data = verify_json(initialized, "--limit", "2")
    assert (data["missing_in_pg"], data["differing"], data["missing_in_redis"]) == (5, 5, 5)
    assert [len(v) for v in data["examples"].values()] == [2, 2, 2]
    assert [e["id"] for e in data["examples"]["missing_in_redis"]] == [21, 22]  # id order
    assert all(len(v) == 0 for v in verify_json(initialized, "--limit", "0")["examples"].values())
    default = verify_json(initialized)
    assert [len(v) for v in default["examples"].values()] == [5, 5, 5]
    human = initialized("verify", "--limit", "2")
    assert human.exit_code == 1
    assert "first 2 of 5" in human.stdout


def test_default_limit_is_20(initialized, rds, key_prefix):
    """Without --limit at most 20 examples are listed."""
    seed(rds, key_prefix, {str(i): "1.00" for i in range(1, 31)})
    data = verify_json(initialized)
    assert data["missing_in_pg"] == 30
    assert len(data["examples"]["missing_in_pg"]) == 20


def test_negative_limit_is_a_usage_error(initialized):
    """--limit -1 exits 2 with click's message."""
    result = initialized("verify", "--limit", "-1")
    assert result.exit_code == 2
    assert "--limit" in result.stderr


def test_many_pages_and_chunks_are_all_compared(initialized, rds, key_prefix, pg):
    """Thousands of keys and rows (several SCAN pages, several cursor chunks) all count."""
    seed(rds, key_prefix, {str(i): f"{i}.01" for i in range(1, 3001)})
    pg.execute(
        """INSERT INTO user_balances (telegram_id, balance)
           SELECT g, (g || '.01')::numeric FROM generate_series(2, 3500) g"""
    )
    pg.execute("UPDATE user_balances SET balance = 0 WHERE telegram_id IN (1000, 2000)")
    data = verify_json(initialized)
    assert (data["redis_keys"], data["valid_keys"], data["pg_rows"]) == (3000, 3000, 3499)
    assert (data["missing_in_pg"], data["differing"], data["missing_in_redis"]) == (1, 2, 500)
    redis_sum = sum(range(1, 3001)) + 3000 * 0.01
    assert data["redis_sum"] == f"{redis_sum:.2f}"


def test_application_table_with_null_balance_differs(balsync, rds, key_prefix, pg):
    """An application table works with --table/--id-column; a NULL balance differs."""
    pg.execute("CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, balance numeric)")
    pg.execute("INSERT INTO users VALUES (1, 'a', 1.5), (2, 'b', NULL), (3, 'c', 9)")
    seed(rds, key_prefix, {"1": "1.50", "2": "2.00"})
    data = verify_json(balsync, "--table", "users", "--id-column", "id")
    assert (data["differing"], data["missing_in_redis"], data["pg_rows"]) == (1, 1, 3)
    assert data["examples"]["differing"] == [
        {"id": 2, "key": f"{key_prefix}2", "redis": "2.00", "postgres": None}
    ]
    assert data["pg_sum"] == "10.50"
    human = balsync("verify", "--table", "users", "--id-column", "id")
    assert "NULL" in human.stdout


def test_quiet_prints_nothing_in_sync_and_the_report_on_drift(initialized, rds, key_prefix, pg):
    """-q: silence when in sync; on drift the report goes to stderr and stdout stays empty."""
    seed(rds, key_prefix, {"1": "1.00"})
    initialized.ok("sync")
    quiet = initialized.ok("verify", "-q")
    assert (quiet.stdout, quiet.stderr) == ("", "")
    pg.execute("UPDATE user_balances SET balance = 2")
    drift = initialized("verify", "-q")
    assert drift.exit_code == 1
    assert drift.stdout == ""
    assert "Differing" in drift.stderr


def test_verbose_logs_ignored_keys_and_the_summary(initialized, rds, key_prefix, tmp_path):
    """-v with --log-file: each ignored key and the summary line reach the log."""
    seed(rds, key_prefix, {"1": "1.00", "x": "2.00"})
    log = tmp_path / "balsync.log"
    result = initialized("verify", "-v", "--log-file", str(log))
    assert result.exit_code == 1
    text = log.read_text()
    assert f"ignored '{key_prefix}x'" in text
    assert "verify drift: 2 keys (1 invalid), 0 rows" in text


def test_verify_writes_nothing_in_postgres(initialized, rds, key_prefix, pg, database_url):
    """Verify runs in a session where every transaction is read-only, and changes no row."""
    seed(rds, key_prefix, {"1": "1.00", "2": "2.00", "bad": "x"})
    insert_rows(pg, {2: "3.00", 3: "4.00"})
    before = pg.execute("SELECT * FROM user_balances ORDER BY 1").fetchall()
    runs = pg.execute("SELECT count(*) FROM balsync.sync_runs").fetchone()
    read_only = f"{database_url} options='-c default_transaction_read_only=on'"
    data = verify_json(initialized, env={"BALSYNC_DATABASE_URL": read_only})
    assert (data["missing_in_pg"], data["differing"], data["missing_in_redis"]) == (1, 1, 1)
    assert pg.execute("SELECT * FROM user_balances ORDER BY 1").fetchall() == before
    assert pg.execute("SELECT count(*) FROM balsync.sync_runs").fetchone() == runs
    assert pg.execute("SELECT count(*) FROM balsync.skipped_records").fetchone() == (0,)


def test_verify_sends_redis_only_read_commands(initialized, pg, tmp_path: Path):
    """On a Valkey of the test's own, a user allowed only SCAN/MGET/TYPE/EXISTS/PING/INFO
    is enough for verify, and no key changes (value or TTL)."""
    server = ValkeyServer(tmp_path / "valkey").start()
    try:
        admin = redis.Redis.from_url(server.url)
        admin.execute_command(
            "ACL", "SETUSER", "reader", "on", ">ReaderPass1", "resetkeys", "~balance:*",
            "resetchannels", "-@all", "+ping", "+info", "+scan", "+mget", "+type", "+exists",
            "+client|setinfo",
        )  # fmt: skip
        admin.mset({"balance:1": "1.00", "balance:2": "2.00", "balance:x": "y"})
        admin.expire("balance:2", 3600)
        admin.hset("balance:3", "v", "1")
        insert_rows(pg, {1: "1.00", 2: "2.50", 4: "4.00"})
        before = {k: (admin.dump(k), admin.ttl(k) > 0) for k in admin.keys("*")}
        url = f"redis://reader:ReaderPass1@127.0.0.1:{server.port}/0"
        data = verify_json(
            initialized, env={"BALSYNC_REDIS_URL": url, "BALSYNC_KEY_PREFIX": "balance:"}
        )
        assert (data["redis_keys"], data["invalid_keys"]) == (4, 2)
        assert (data["differing"], data["missing_in_redis"]) == (1, 1)
        after = {k: (admin.dump(k), admin.ttl(k) > 0) for k in admin.keys("*")}
        assert after == before
        admin.close()
    finally:
        server.stop()


def test_missing_target_table_exits_5_with_a_hint(balsync):
    """No target table (init-db never ran): exit 5 and a line naming the table."""
    result = balsync("verify")
    assert result.exit_code == 5
    assert "user_balances does not exist" in result.stderr
    assert "init-db" in result.stderr


def test_unreachable_redis_exits_3(initialized):
    """Redis refusing connections: exit 3 and one line saying so."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = initialized("verify", "--redis-url", url, "--retry-timeout", "0")
    assert result.exit_code == 3
    assert result.stderr.startswith("balsync: error: Redis at")
    assert "unavailable" in result.stderr


def test_unreachable_postgres_exits_4(initialized):
    """PostgreSQL refusing connections: exit 4 and one line saying so."""
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    result = initialized("verify", "--database-url", url, "--retry-timeout", "0")
    assert result.exit_code == 4
    assert result.stderr.startswith("balsync: error: PostgreSQL at")


@pytest.mark.parametrize("side", ["redis", "postgres"])
def test_json_on_failure_is_one_failed_object(initialized, side):
    """--json on an unreachable server still prints one object, status failed, no counts."""
    port = free_port()
    option, url, code = (
        ("--redis-url", f"redis://127.0.0.1:{port}/0", 3)
        if side == "redis"
        else ("--database-url", f"postgresql://postgres@127.0.0.1:{port}/x", 4)
    )
    result = initialized("verify", "--json", option, url, "--retry-timeout", "0")
    assert result.exit_code == code
    data = json.loads(result.stdout)
    assert data["status"] == "failed"
    assert data["missing_in_pg"] is None
    assert data["examples"] == {"missing_in_pg": [], "differing": [], "missing_in_redis": []}


def test_a_locked_table_ends_verify_with_exit_4_instead_of_hanging(
    initialized, rds, key_prefix, pg, database_url, monkeypatch
):
    """Another session holds the table ACCESS EXCLUSIVE while verify streams its rows: exit 4
    after about one deadline, one line naming PostgreSQL."""
    insert_rows(pg, {1: "1.00", 2: "2.00"})  # no keys: the Redis pass reads no row, the stream does
    short_deadline(monkeypatch)
    with table_lock(database_url) as lock:
        result, took = ends_in_time(
            lock, lambda: initialized("verify", "--json", "--retry-timeout", BUDGET)
        )
    assert result.exit_code == 4, (result.stdout, result.stderr)
    assert json.loads(result.stdout)["status"] == "failed"
    assert "PostgreSQL" in result.stderr
    assert took < ENDS_WITHIN, f"took {took:.1f}s"
    assert verify_json(initialized)["missing_in_redis"] == 2
