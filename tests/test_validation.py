"""The record validator: SPEC's data rules for ids and balances, on bytes, never rounding."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from balance_sync.validation import (
    InvalidRecord,
    common_page,
    parse_balance,
    parse_id,
    validate,
    validate_page,
)

PREFIX = b"balance:"
MAX_ID = 2**63 - 1
LIMIT = 10**18  # |balance| < 10^18


# -- telegram ids -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix",
    [
        pytest.param(b"0", id="zero"),
        pytest.param(b"00", id="zeros"),
        pytest.param(b"01", id="leading-zero"),
        pytest.param(b"+1", id="plus-sign"),
        pytest.param(b"-1", id="minus-sign"),
        pytest.param(b"9223372036854775808", id="2^63-overflow"),
        pytest.param(b"9999999999999999999", id="19-digits-overflow"),
        pytest.param(b"12345678901234567890", id="20-digits"),
        pytest.param(b"abc", id="letters"),
        pytest.param(b"12a", id="trailing-letter"),
        pytest.param(b"1.0", id="decimal-point"),
        pytest.param(b"1e3", id="exponent"),
        pytest.param(b"", id="empty"),
        pytest.param(b" 1", id="leading-space"),
        pytest.param(b"1 ", id="trailing-space"),
        pytest.param(b"\t1", id="tab"),
        pytest.param("١٢٣".encode(), id="arabic-indic-digits"),
        pytest.param("１２３".encode(), id="fullwidth-digits"),
        pytest.param(b"123\n", id="trailing-newline"),
        pytest.param(b"\xff1", id="non-utf8"),
    ],
)
def test_parse_id_rejects_non_canonical_ids(suffix: bytes) -> None:
    """Only a canonical decimal 1..2^63-1 is a telegram id."""
    assert parse_id(suffix) is None


@pytest.mark.parametrize(
    "suffix", [b"1", b"42", b"100", b"9223372036854775807", b"999999999999999999"]
)
def test_parse_id_accepts_canonical_ids_up_to_max_bigint(suffix: bytes) -> None:
    """1 and 2^63-1 (PostgreSQL's bigint max) are both valid ids, returned as given."""
    assert parse_id(suffix) == suffix


@given(st.integers(1, MAX_ID))
def test_parse_id_accepts_every_id_in_range(number: int) -> None:
    """Every canonical decimal of 1..2^63-1 is accepted unchanged."""
    text = str(number).encode()
    assert parse_id(text) == text


@given(st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_ID + 1)))
def test_parse_id_rejects_every_id_out_of_range(number: int) -> None:
    """Zero, negatives and anything past 2^63-1 are never ids."""
    assert parse_id(str(number).encode()) is None


@given(st.one_of(st.binary(max_size=25), st.text(alphabet="0123456789+- ", max_size=25)))
@example(b"0")
@example(b"09")
@example(b"9223372036854775807")
@example(b"9223372036854775808")
def test_parse_id_accepts_exactly_the_canonical_decimals(raw: bytes | str) -> None:
    """For any input, parse_id accepts it exactly when it is str(n) for some 1 <= n < 2^63."""
    data = raw.encode() if isinstance(raw, str) else raw
    canonical = (
        data.isascii()
        and data.isdigit()
        and str(int(data)).encode() == data
        and 1 <= int(data) <= MAX_ID
    )
    assert (parse_id(data) is not None) is canonical
    if canonical:
        assert parse_id(data) == data


# -- balances: decimal format ------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"1e5", id="exponent"),
        pytest.param(b"1E5", id="exponent-upper"),
        pytest.param(b"NaN", id="NaN"),
        pytest.param(b"nan", id="nan"),
        pytest.param(b"Infinity", id="Infinity"),
        pytest.param(b"inf", id="inf"),
        pytest.param(b"-inf", id="-inf"),
        pytest.param(b" 1", id="leading-space"),
        pytest.param(b"1 ", id="trailing-space"),
        pytest.param(b"\t1", id="leading-tab"),
        pytest.param(b"1\n", id="trailing-newline"),
        pytest.param(b"1.234", id="three-decimals"),
        pytest.param(b"1.000", id="three-zero-decimals"),
        pytest.param(b"0.001", id="a-tenth-of-a-cent"),
        pytest.param(b"1000000000000000000", id="10^18"),
        pytest.param(b"-1000000000000000000", id="-10^18"),
        pytest.param(b"1000000000000000000.00", id="10^18.00"),
        pytest.param(b"+5", id="plus-sign"),
        pytest.param(b".5", id="no-integer-part"),
        pytest.param(b"5.", id="no-fraction-digits"),
        pytest.param(b"1,5", id="comma"),
        pytest.param(b"1_000", id="underscore"),
        pytest.param(b"0x10", id="hex"),
        pytest.param(b"--5", id="double-minus"),
        pytest.param(b"-", id="lone-minus"),
        pytest.param(b"\xff\xfe", id="non-utf8"),
        pytest.param(b"1\xff", id="digit-then-non-utf8"),
        pytest.param("١٢٣".encode(), id="arabic-indic-digits"),
        pytest.param(b"1\x00", id="nul"),
    ],
)
@pytest.mark.parametrize("allow_negative", [False, True])
def test_parse_balance_rejects_what_is_not_a_plain_two_place_decimal(
    raw: bytes, allow_negative: bool
) -> None:
    """Exponents, NaN/Infinity, whitespace, >2 decimals, |v| >= 10^18 and junk are invalid."""
    reason = parse_balance(raw, allow_negative=allow_negative)
    assert isinstance(reason, str)
    assert reason


@pytest.mark.parametrize("raw", [b"-5", b"-0.01", b"-3.5", b"-999999999999999999.99"])
def test_parse_balance_rejects_negative_without_allow_negative(raw: bytes) -> None:
    """A negative balance is invalid unless --allow-negative, and the reason says so."""
    reason = parse_balance(raw)
    assert isinstance(reason, str)
    assert "negative" in reason


@pytest.mark.parametrize("raw", [b"-5", b"-0.01", b"-3.5", b"-999999999999999999.99"])
def test_parse_balance_accepts_negative_with_allow_negative(raw: bytes) -> None:
    """With allow_negative, a negative balance is returned exactly as written."""
    assert parse_balance(raw, allow_negative=True) == raw


def test_parse_balance_reason_for_three_decimals_says_never_rounded() -> None:
    """A value with 3 decimals is rejected for its precision, not as generic junk."""
    reason = parse_balance(b"1.234")
    assert isinstance(reason, str)
    assert "2 decimal" in reason


def test_parse_balance_reason_for_huge_value_says_out_of_range() -> None:
    """10^18 is rejected as out of range."""
    reason = parse_balance(b"1000000000000000000")
    assert isinstance(reason, str)
    assert "range" in reason


def test_parse_balance_reason_for_whitespace_names_whitespace() -> None:
    """Surrounding whitespace is named as the problem."""
    reason = parse_balance(b" 1")
    assert isinstance(reason, str)
    assert "whitespace" in reason


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"0", id="zero"),
        pytest.param(b"-0", id="minus-zero"),
        pytest.param(b"-0.00", id="minus-zero-cents"),
        pytest.param(b"0.1", id="one-decimal"),
        pytest.param(b"0.01", id="one-cent"),
        pytest.param(b"42", id="integer"),
        pytest.param(b"1500.00", id="two-decimals"),
        pytest.param(b"007.50", id="leading-zeros"),
        pytest.param(b"999999999999999999.99", id="max"),
        pytest.param(b"999999999999999999", id="max-integer"),
        pytest.param(b"0000000000000000000001.5", id="many-leading-zeros"),
    ],
)
def test_parse_balance_accepts_plain_decimals_unchanged(raw: bytes) -> None:
    """A valid balance comes back byte for byte, '-0' and leading zeros included."""
    assert parse_balance(raw) == raw


_fraction = st.text(alphabet="0123456789", min_size=0, max_size=2)


def _decimal_text(integer: int, fraction: str) -> str:
    return f"{integer}.{fraction}" if fraction else str(integer)


@given(st.integers(-(LIMIT - 1), LIMIT - 1), _fraction)
@example(LIMIT - 1, "99")
@example(-(LIMIT - 1), "99")
@example(0, "")
def test_parse_balance_returns_any_valid_decimal_exactly(integer: int, fraction: str) -> None:
    """Every decimal below 10^18 with 0-2 decimals is returned as is: never rounded."""
    text = _decimal_text(integer, fraction)
    result = parse_balance(text.encode(), allow_negative=True)
    assert result == text.encode()
    assert isinstance(result, bytes)
    assert Decimal(result.decode()) == Decimal(text)


@given(st.integers(0, LIMIT - 1), _fraction)
def test_parse_balance_accepts_non_negative_decimals_without_flag(
    integer: int, fraction: str
) -> None:
    """Without allow_negative, every non-negative valid decimal is still accepted exactly."""
    text = _decimal_text(integer, fraction).encode()
    assert parse_balance(text) == text


@given(
    st.integers(-(10**30), 10**30),
    st.text(alphabet="0123456789", min_size=3, max_size=30),
    st.booleans(),
)
@example(1, "000", False)
@example(0, "001", True)
def test_parse_balance_rejects_any_value_with_three_or_more_decimals(
    integer: int, fraction: str, allow_negative: bool
) -> None:
    """3+ digits after the point is invalid, even when they are zeros: nothing is rounded."""
    result = parse_balance(f"{integer}.{fraction}".encode(), allow_negative=allow_negative)
    assert isinstance(result, str)


@given(st.integers(min_value=LIMIT), _fraction, st.booleans())
def test_parse_balance_rejects_any_value_of_10_to_18_or_more(
    magnitude: int, fraction: str, negative: bool
) -> None:
    """|value| >= 10^18 is out of range, with or without a fraction or a sign."""
    text = ("-" if negative else "") + _decimal_text(magnitude, fraction)
    assert isinstance(parse_balance(text.encode(), allow_negative=True), str)


# -- balances: cents format --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"150000", b"1500.00"),
        (b"5", b"0.05"),
        (b"50", b"0.50"),
        (b"100", b"1.00"),
        (b"0", b"0.00"),
        (b"007", b"0.07"),
        (b"99999999999999999999", b"999999999999999999.99"),
    ],
)
def test_cents_become_a_two_place_decimal(raw: bytes, expected: bytes) -> None:
    """Integer cents are turned into the exact decimal amount."""
    assert parse_balance(raw, value_format="cents") == expected


def test_negative_cents_with_allow_negative() -> None:
    """'-5' cents is -0.05 when negatives are allowed."""
    assert parse_balance(b"-5", value_format="cents", allow_negative=True) == b"-0.05"


def test_negative_cents_without_allow_negative_is_invalid() -> None:
    """'-5' cents is a negative balance and invalid by default."""
    reason = parse_balance(b"-5", value_format="cents")
    assert isinstance(reason, str)
    assert "negative" in reason


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"1.5", id="decimal-point"),
        pytest.param(b"1500.00", id="decimal-amount"),
        pytest.param(b"", id="empty"),
        pytest.param(b"1e5", id="exponent"),
        pytest.param(b"+5", id="plus-sign"),
        pytest.param(b" 5", id="leading-space"),
        pytest.param(b"5\n", id="trailing-newline"),
        pytest.param(b"NaN", id="nan"),
        pytest.param(b"100000000000000000000", id="10^20"),
        pytest.param(b"-100000000000000000000", id="-10^20"),
        pytest.param(b"\xff", id="non-utf8"),
    ],
)
def test_cents_rejects_what_is_not_whole_cents_in_range(raw: bytes) -> None:
    """Cents must be a whole number below 10^20 (10^18 in money)."""
    assert isinstance(parse_balance(raw, value_format="cents", allow_negative=True), str)


@given(st.integers(-(10**20 - 1), 10**20 - 1))
@example(10**20 - 1)
@example(-(10**20 - 1))
@example(1)
def test_cents_equal_the_amount_divided_by_100_exactly(cents: int) -> None:
    """For every cents value in range, Decimal(result) == Decimal(cents) / 100, 2 places."""
    result = parse_balance(str(cents).encode(), value_format="cents", allow_negative=True)
    assert isinstance(result, bytes)
    assert Decimal(result.decode()) == Decimal(cents) / 100
    assert len(result.split(b".")[1]) == 2


@given(st.integers(min_value=10**20), st.booleans())
def test_cents_of_10_to_20_or_more_are_out_of_range(magnitude: int, negative: bool) -> None:
    """10^20 cents (10^18 in money) or more is invalid."""
    text = f"{'-' if negative else ''}{magnitude}".encode()
    assert isinstance(parse_balance(text, value_format="cents", allow_negative=True), str)


# -- whole records -------------------------------------------------------------------------


def test_validate_returns_id_and_amount_for_a_valid_record() -> None:
    """A valid record is the tuple (id digits, balance text), ready for COPY."""
    assert validate(PREFIX + b"42", b"1500.00", len(PREFIX)) == (b"42", b"1500.00")


def test_validate_converts_cents_in_a_record() -> None:
    """The value format applies to whole records too."""
    assert validate(PREFIX + b"7", b"150000", len(PREFIX), value_format="cents") == (
        b"7",
        b"1500.00",
    )


@pytest.mark.parametrize("suffix", [b"0", b"01", b"abc", b"", b"9223372036854775808"])
def test_validate_names_a_bad_id_with_its_key_and_raw_value(suffix: bytes) -> None:
    """A key without a valid telegram id is an InvalidRecord carrying key, value and reason."""
    key = PREFIX + suffix
    result = validate(key, b"10", len(PREFIX))
    assert isinstance(result, InvalidRecord)
    assert (result.key, result.raw) == (key, b"10")
    assert "telegram id" in result.reason


@pytest.mark.parametrize("raw", [b"1e5", b"1.234", b"-5", b"", b" 1"])
def test_validate_names_a_bad_value_with_its_key_and_raw_value(raw: bytes) -> None:
    """A bad balance is an InvalidRecord carrying key, value and a non-empty reason."""
    key = PREFIX + b"42"
    result = validate(key, raw, len(PREFIX))
    assert isinstance(result, InvalidRecord)
    assert (result.key, result.raw) == (key, raw)
    assert result.reason


def test_validate_accepts_negative_only_with_allow_negative() -> None:
    """allow_negative reaches the balance check through validate."""
    assert isinstance(validate(PREFIX + b"1", b"-3.5", len(PREFIX)), InvalidRecord)
    assert validate(PREFIX + b"1", b"-3.5", len(PREFIX), allow_negative=True) == (b"1", b"-3.5")


@given(
    key=st.binary(max_size=40),
    raw=st.binary(max_size=40),
    prefix_length=st.integers(0, 12),
    value_format=st.sampled_from(["decimal", "cents"]),
    allow_negative=st.booleans(),
)
def test_validate_never_raises_on_any_bytes(
    key: bytes, raw: bytes, prefix_length: int, value_format: str, allow_negative: bool
) -> None:
    """Whatever bytes Redis holds, validate answers with a record or an InvalidRecord."""
    result = validate(
        key,
        raw,
        prefix_length,
        value_format=value_format,  # type: ignore[arg-type]
        allow_negative=allow_negative,
    )
    if isinstance(result, InvalidRecord):
        assert result.key == key
        assert result.raw == raw
        assert isinstance(result.reason, str)
        assert result.reason
    else:
        assert isinstance(result, tuple)
        telegram_id, amount = result
        assert parse_id(telegram_id) == telegram_id
        assert 1 <= int(telegram_id) <= MAX_ID
        assert abs(Decimal(amount.decode("ascii"))) < LIMIT


@given(
    st.lists(
        st.tuples(
            st.one_of(
                st.integers(0, 2**64).map(lambda i: str(i).encode()),
                st.from_regex(rb"\A-?0*[0-9]{0,20}\Z"),
                st.binary(max_size=8),
            ),
            st.one_of(
                st.from_regex(rb"\A-?[0-9]{0,21}(\.[0-9]{0,3})?\Z"),
                st.binary(max_size=8),
            ),
        ),
        max_size=20,
    ),
    st.sampled_from(["decimal", "cents"]),
    st.booleans(),
)
def test_validate_page_agrees_with_validate(pairs, value_format, allow_negative):
    """The fast path of a page gives, record for record, what `validate` gives."""
    prefix = b"balance:"
    values = [(prefix + suffix, raw) for suffix, raw in pairs]
    fast = list(
        validate_page(values, len(prefix), value_format=value_format, allow_negative=allow_negative)
    )
    slow = [
        (
            key,
            raw,
            validate(
                key, raw, len(prefix), value_format=value_format, allow_negative=allow_negative
            ),
        )
        for key, raw in values
    ]
    assert fast == slow
    # The whole-page path (decimal values only) answers only for a page that is all valid,
    # and then the same.
    whole = common_page(values, len(prefix)) if value_format == "decimal" else None
    if whole is not None:
        assert [(k, r, c) for (k, r), c in zip(values, whole, strict=True)] == slow


def test_common_page_takes_a_page_of_common_records_whole():
    """A page of plain ids and amounts comes back as records; one odd record refuses it."""
    prefix = b"balance:"
    page = [(prefix + b"%d" % (10**17 + i), b"%d.%02d" % (i, i % 100)) for i in range(500)]
    assert common_page(page, len(prefix)) == [(key[len(prefix) :], raw) for key, raw in page]
    for odd in (b"1.005", b" 1.00", b"-1.00", b"", b"1e3"):
        assert common_page([*page, (prefix + b"7", odd)], len(prefix)) is None
    assert common_page([*page, (prefix + b"07", b"1.00")], len(prefix)) is None
    assert common_page([], len(prefix)) == []
