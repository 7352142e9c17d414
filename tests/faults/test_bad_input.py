"""Bad input at volume: 10 000 keys, 4 000 of them invalid in every way Redis allows."""

from __future__ import annotations

import random
from collections.abc import Callable
from decimal import Decimal

import pytest
import redis

from tests.faults.conftest import Bench
from tests.faults.helpers import (
    MAX_ID,
    assert_converged,
    assert_ledger_consistent,
    random_balance,
    rows,
    skipped_records,
)

pytestmark = pytest.mark.faults

PREFIX = "fault:bälance:"  # a non-ASCII prefix too
TOTAL = 10_000
MEGABYTE_VALUE = b"7" * 1_048_576
EDGE_BAD_IDS = [b"9223372036854775808", b"0", b"-1", b"00", b"", b"09223372036854775807"]
BAD_IDS = [  # each gets random digits appended
    b"9223372036854775808",
    b"99999999999999999999",
    b"0",
    b"-",
    b"+5",
    b"007",
    b" 5",
    b"5 ",
    b"1e3",
    b"12a",
    b"0x1F",
    b"1.0",
    "١٢٣".encode(),  # Arabic-Indic digits
    "１２３".encode(),  # fullwidth digits
    "😀".encode(),
    "ид".encode(),
    b"12\x003",
    b"\xff\xfe12",  # invalid UTF-8
    b"\x00",
]
BAD_VALUES: list[tuple[bytes, str]] = [
    (b"1.234", "decimal"),
    (b"0.001", "decimal"),
    (b"1e5", "decimal"),
    (b"NaN", "decimal"),
    (b"Infinity", "decimal"),
    (b"+5", "decimal"),
    (b"1,000.00", "decimal"),
    (b"12.", "decimal"),
    (b".5", "decimal"),
    (b"0x10", "decimal"),
    (b"1_000", "decimal"),
    ("٣.٥".encode(), "decimal"),
    ("１２".encode(), "decimal"),
    ("½".encode(), "decimal"),
    ("€100".encode(), "decimal"),
    ("\u00a05".encode(), "decimal"),  # a non-ASCII space is no whitespace to strip
    (b"12\x00", "decimal"),
    (b"\xff\xfe", "decimal"),
    (b" 5", "whitespace"),
    (b"5 ", "whitespace"),
    (b"5\n", "whitespace"),
    (b"", "empty"),
    (b"-5", "negative"),
    (b"-0.01", "negative"),
    (b"1000000000000000000", "range"),
    (b"1000000000000000000.00", "range"),
    (MEGABYTE_VALUE, "range"),
]
WRONG_TYPES = ("hash", "list", "set", "zset", "stream")
EDGE_VALID = [(MAX_ID, b"999999999999999999.99"), (1, b"0"), (2, b"0.5"), (3, b"1500.00")]


def _stored_text(data: bytes) -> str:
    """How a key reads in skipped_records: text, invalid UTF-8 and NUL escaped."""
    return data.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


def _generate(
    rng: random.Random, prefix: bytes
) -> tuple[dict[bytes, bytes], dict[bytes, str], dict[bytes, str], dict[int, Decimal]]:
    """(string keys, wrong-type keys by type, expected reason word by invalid key, valid)."""
    strings: dict[bytes, bytes] = {}
    wrong: dict[bytes, str] = {}
    reasons: dict[bytes, str] = {}
    valid: dict[int, Decimal] = {}
    ids = iter(rng.sample(range(4, MAX_ID), TOTAL))
    for telegram_id, value in EDGE_VALID:
        strings[prefix + b"%d" % telegram_id] = value
        valid[telegram_id] = Decimal(value.decode())
    for bad in EDGE_BAD_IDS:
        strings[prefix + bad] = b"1.00"
        reasons[prefix + bad] = "id"
    megabyte = prefix + b"%d" % next(ids)
    strings[megabyte] = MEGABYTE_VALUE
    reasons[megabyte] = "range"
    for kind in WRONG_TYPES:  # 100 keys of each other type, under valid ids
        for _ in range(100):
            key = prefix + b"%d" % next(ids)
            wrong[key] = kind
            reasons[key] = kind
    while len(strings) + len(wrong) < TOTAL:
        roll = rng.random()
        if roll < 0.6:
            telegram_id = next(ids)
            value = random_balance(rng).encode()
            strings[prefix + b"%d" % telegram_id] = value
            valid[telegram_id] = Decimal(value.decode())
        elif roll < 0.8:
            key = prefix + rng.choice(BAD_IDS) + b"%d" % rng.randrange(10**6)
            if key in strings:
                continue
            strings[key] = random_balance(rng).encode()
            reasons[key] = "id"
        else:
            value, word = rng.choice(BAD_VALUES[:-1])
            key = prefix + b"%d" % next(ids)
            strings[key] = value
            reasons[key] = word
    return strings, wrong, reasons, valid


def _store(redis_url: str, strings: dict[bytes, bytes], wrong: dict[bytes, str]) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        items = list(strings.items())
        for start in range(0, len(items), 1000):
            client.mset(dict(items[start : start + 1000]))
        pipe = client.pipeline(transaction=False)
        for key, kind in wrong.items():
            if kind == "hash":
                pipe.hset(key, "balance", "10.00")
            elif kind == "list":
                pipe.rpush(key, "10.00")
            elif kind == "set":
                pipe.sadd(key, "10.00")
            elif kind == "zset":
                pipe.zadd(key, {"10.00": 1})
            else:
                pipe.xadd(key, {"balance": "10.00"})
        pipe.execute()
    finally:
        client.close()


def test_ten_thousand_keys_with_every_kind_of_bad_input_skip_exactly_the_invalid(
    bench: Bench, figures: Callable[[str], None]
) -> None:
    """Invalid keys are skipped with reasons (1000 kept), valid ones exact, exit 1."""
    bench.prefix = PREFIX
    prefix = PREFIX.encode()
    strings, wrong, reasons, valid = _generate(random.Random(13), prefix)
    assert len(strings) + len(wrong) == TOTAL
    _store(bench.redis_url, strings, wrong)
    bench.init_db()

    done = bench.cli().sync("--batch-size", "1000")
    assert done.code == 1, done
    result = done.data
    assert result["status"] == "partial"
    invalid = TOTAL - len(valid)
    assert (result["processed"], result["inserted"], result["updated"]) == (TOTAL, len(valid), 0)
    assert (result["invalid"], result["skipped"], result["unchanged"]) == (invalid, invalid, 0)
    assert rows(bench.db_url)[MAX_ID] == Decimal("999999999999999999.99")
    assert assert_converged(bench.redis_url, bench.db_url, PREFIX) == len(valid)
    assert_ledger_consistent(bench.db_url)

    by_text = {_stored_text(key): word for key, word in reasons.items()}
    assert len(by_text) == len(reasons)
    kept = skipped_records(bench.db_url, int(result["run_id"]))  # type: ignore[call-overload]
    assert len({key for key, _, _ in kept}) == len(kept), "a skipped record kept twice"
    for key, _raw, reason in kept:
        assert key in by_text, f"kept a record that is valid or unknown: {key!r}"
        assert by_text[key] in reason, f"{key!r}: reason {reason!r}, expected {by_text[key]!r}"
    figures(
        f"{TOTAL} keys ({len(valid)} valid, {invalid} invalid: {len(wrong)} of other types, "
        f"a 1 MiB value, bad ids incl. 2^63, 0, -1, NUL, invalid UTF-8, unicode digits); "
        f"exit 1 in {done.seconds:.1f}s, invalid={result['invalid']}, "
        f"{len(kept)} skipped records kept"
    )
    assert len(kept) == 1000, f"skipped_records holds {len(kept)} for the run, not 1000"
