"""The first sync on real servers: the shortest path through every layer."""

import json

from tests.helpers import balances


def test_first_sync_inserts_every_valid_key(initialized, rds, key_prefix, pg):
    """A first run inserts what Redis holds and reports it in SPEC's JSON."""
    rds.mset({f"{key_prefix}1": "1500.00", f"{key_prefix}2": "42", f"{key_prefix}3": "-3.5"})
    result = initialized("sync", "--json", "--allow-negative")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["status"] == "success"
    assert (data["processed"], data["inserted"], data["updated"]) == (3, 3, 0)
    assert balances(pg) == {1: "1500.00", 2: "42.00", 3: "-3.50"}
