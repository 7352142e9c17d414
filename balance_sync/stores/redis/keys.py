"""The names of balsync's own keys, shared by the store and the application's writer."""

from __future__ import annotations


def dirty_keys(prefix: str) -> tuple[str, str]:
    """The dirty set and the running claim of a key prefix.

    One hash tag puts both in one cluster slot (RENAME-like moves need that), and neither
    starts with the prefix, so a full SCAN never mistakes them for balances.
    """
    tag = "{balsync:dirty:" + prefix + "}"
    return tag, tag + ":claimed"


def trust_marker(prefix: str, table: str) -> str:
    """The key of balsync's trust marker for one target table: beside the dirty set, in
    its hash tag (one cluster slot; the ACL that allows the dirty set allows it)."""
    return dirty_keys(prefix)[0] + ":trusted:" + table
