"""Validation of one Redis record: SPEC's data rules, on bytes, with no float anywhere.

The hot path handles a million records a run, so a valid record is a plain tuple of the id's
digits and the balance as PostgreSQL's text form, ready for COPY; nothing is converted to
int, float or Decimal on the way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

MAX_ID = b"9223372036854775807"
MAX_INTEGER_DIGITS = 18  # |value| < 10^18 fits numeric(20,2)

_ID = re.compile(rb"[1-9][0-9]{0,18}")
_DECIMAL = re.compile(rb"(-?)([0-9]+)(?:\.([0-9]{1,2}))?")
_TOO_PRECISE = re.compile(rb"-?[0-9]+\.[0-9]{3,}")
_CENTS = re.compile(rb"(-?)([0-9]+)")
_NUMERIC_TEXT = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?")  # PostgreSQL's numeric as text

ValueFormat = Literal["decimal", "cents"]
ValidRecord = tuple[bytes, bytes]
"""(telegram id digits, balance as a plain decimal), both ASCII and safe for COPY text."""


@dataclass(frozen=True, slots=True)
class InvalidRecord:
    """A record that is skipped, with the reason an operator reads."""

    key: bytes
    raw: bytes | None
    reason: str


def parse_id(suffix: bytes) -> bytes | None:
    """The id's digits if `suffix` is a valid telegram id (1..2^63-1, canonical), else None."""
    if _ID.fullmatch(suffix) is None:
        return None
    if len(suffix) == len(MAX_ID) and suffix > MAX_ID:
        return None
    return suffix


def _value_problem(raw: bytes) -> str:
    if not raw:
        return "empty value"
    if raw != raw.strip():
        return "value has surrounding whitespace"
    if _TOO_PRECISE.fullmatch(raw):
        return "value has more than 2 decimal places (never rounded)"
    return "value is not a plain decimal number"


def parse_balance(
    raw: bytes, *, value_format: ValueFormat = "decimal", allow_negative: bool = False
) -> bytes | str:
    """The balance as a plain decimal (bytes), or the reason it is invalid (str)."""
    if value_format == "cents":
        match = _CENTS.fullmatch(raw)
        if match is None:
            return "empty value" if not raw else "value is not a whole number of cents"
        sign, digits = match.groups()
        digits = digits.lstrip(b"0") or b"0"
        if len(digits) > MAX_INTEGER_DIGITS + 2:
            return "value out of range (|value| must be below 10^18)"
        digits = digits.rjust(3, b"0")
        amount = sign + digits[:-2] + b"." + digits[-2:]
    else:
        match = _DECIMAL.fullmatch(raw)
        if match is None:
            return _value_problem(raw)
        sign, integer, _ = match.groups()
        digits = integer.lstrip(b"0")
        if len(digits) > MAX_INTEGER_DIGITS:
            return "value out of range (|value| must be below 10^18)"
        amount = raw
    if sign and not allow_negative and amount.strip(b"-0.") != b"":
        return "negative value (allowed only with --allow-negative)"
    return amount


def redis_value(balance: str, value_format: ValueFormat) -> bytes | str:
    """A balance as PostgreSQL's text, as Redis holds it; or why it cannot be written.

    Exact string arithmetic: '1500.00' stays '1500.00' (decimal) or becomes '150000'
    (cents). A balance that needs more than two decimals is refused, never rounded.
    """
    match = _NUMERIC_TEXT.fullmatch(balance)
    if match is None:
        return "balance is not a plain decimal number"
    sign, integer, fraction = match.groups()
    fraction = fraction or ""
    if fraction[2:].strip("0"):
        return "balance has more than 2 decimal places (never rounded)"
    if value_format == "cents":
        digits = (integer + fraction[:2].ljust(2, "0")).lstrip("0") or "0"
        text = (sign if digits != "0" else "") + digits
    else:
        text = sign + integer + ("." + fraction[:2] if fraction else "")
    value = text.encode()
    checked = parse_balance(value, value_format=value_format, allow_negative=True)
    return checked if isinstance(checked, str) else value


def validate(
    key: bytes,
    raw: bytes,
    prefix_length: int,
    *,
    value_format: ValueFormat = "decimal",
    allow_negative: bool = False,
) -> ValidRecord | InvalidRecord:
    """Check one string key and its value against SPEC's data rules."""
    telegram_id = parse_id(key[prefix_length:])
    if telegram_id is None:
        return InvalidRecord(key, raw, "key does not end in a telegram id (1..9223372036854775807)")
    amount = parse_balance(raw, value_format=value_format, allow_negative=allow_negative)
    if isinstance(amount, str):
        return InvalidRecord(key, raw, amount)
    return (telegram_id, amount)


# The common case, checked in one pass: an id of at most 18 digits is always below 2^63 and a
# non-negative value of at most 18 integer digits always below 10^18, so nothing else needs
# checking. Anything else takes the full path above, with its reasons.
_ID_FORM = rb"[1-9][0-9]{0,17}"
_DECIMAL_FORM = rb"[0-9]{1,18}(?:\.[0-9]{1,2})?"
_COMMON_ID = re.compile(_ID_FORM).fullmatch
_COMMON_DECIMAL = re.compile(_DECIMAL_FORM).fullmatch
# The same forms for a whole page joined with newlines.
_COMMON_IDS = re.compile(rb"(?:%s\n)*%s" % (_ID_FORM, _ID_FORM)).fullmatch
_COMMON_DECIMALS = re.compile(rb"(?:%s\n)*%s" % (_DECIMAL_FORM, _DECIMAL_FORM)).fullmatch


def common_page(values: list[tuple[bytes, bytes]], prefix_length: int) -> list[ValidRecord] | None:
    """Every record of a page if all are in the common form, else None (use `validate_page`).

    Ids and values are each checked as one joined text by one regular expression, in C,
    not record by record in Python: on the pages most runs are made of, this is most of the
    reader's work gone. A newline inside a key or value shows in the count of separators.
    """
    if not values:
        return []
    ids = [key[prefix_length:] for key, _ in values]
    raws = [raw for _, raw in values]
    id_text, raw_text = b"\n".join(ids), b"\n".join(raws)
    separators = len(values) - 1
    if (
        id_text.count(b"\n") == separators == raw_text.count(b"\n")
        and _COMMON_IDS(id_text)
        and _COMMON_DECIMALS(raw_text)
    ):
        return list(zip(ids, raws, strict=True))
    return None


def validate_page(
    values: Iterable[tuple[bytes, bytes]],
    prefix_length: int,
    *,
    value_format: ValueFormat = "decimal",
    allow_negative: bool = False,
) -> Iterator[tuple[bytes, bytes, ValidRecord | InvalidRecord]]:
    """`validate` for a page of (key, value) pairs: each key and value with the outcome
    `validate` gives, but about twice as fast on the records most pages are made of."""
    fast = value_format == "decimal"
    common_id, common_decimal = _COMMON_ID, _COMMON_DECIMAL
    for key, raw in values:
        suffix = key[prefix_length:]
        if fast and common_id(suffix) and common_decimal(raw):
            yield key, raw, (suffix, raw)
        else:
            yield (
                key,
                raw,
                validate(
                    key,
                    raw,
                    prefix_length,
                    value_format=value_format,
                    allow_negative=allow_negative,
                ),
            )
