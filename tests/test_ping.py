"""--ping-url: the dead man's switch, healthchecks.io style, against a local HTTP server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from balance_sync import __version__
from balance_sync.monitoring.ping import mask_ping_url, ping_url, send
from tests.support.netutil import PingServer, closed_port, ping_server


@pytest.fixture
def server() -> Iterator[PingServer]:
    """A healthchecks-like endpoint on 127.0.0.1, whose check URL carries a secret token."""
    with ping_server() as ping:
        yield ping


def test_success_pings_start_then_exit_0_with_the_summary(initialized, rds, key_prefix, server):
    """A successful run: GET URL/start before, POST URL/0 with SPEC's summary after."""
    rds.mset({f"{key_prefix}1": "1.00", f"{key_prefix}2": "2.00"})
    initialized.ok("sync", "--ping-url", server.url)
    assert server.routes() == [("GET", "/start"), ("POST", "/0")]
    summary = server.hits[1].json()
    assert summary["status"] == "success"
    assert (summary["processed"], summary["inserted"], summary["exit_code"]) == (2, 2, 0)
    assert summary["table"] == "user_balances"
    assert "error" not in summary


def test_partial_run_pings_exit_1(initialized, rds, key_prefix, server):
    """Exit 1 (records skipped) needs a look: URL/1, a failure for the monitor."""
    rds.mset({f"{key_prefix}1": "1.00", f"{key_prefix}2": "1e5"})
    assert initialized("sync", "--ping-url", server.url).exit_code == 1
    assert server.routes() == [("GET", "/start"), ("POST", "/1")]
    summary = server.hits[1].json()
    assert (summary["status"], summary["invalid"], summary["exit_code"]) == ("partial", 1, 1)


def test_skipped_run_pings_success(initialized, server):
    """A run skipped by --min-interval is a success (exit 0) for the dead man's switch."""
    initialized.ok("sync")
    initialized.ok("sync", "--ping-url", server.url)
    assert server.routes() == [("GET", "/start"), ("POST", "/0")]
    assert server.hits[1].json()["status"] == "skipped"


def test_failure_pings_exit_3_with_the_error(initialized, server):
    """Redis unreachable: URL/3 with the summary and the error; the exit code stays 3."""
    dead = f"redis://:redis-secret@127.0.0.1:{closed_port()}/0"
    result = initialized(
        "sync", "--ping-url", server.url, "--redis-url", dead, env={"BALSYNC_RETRY_TIMEOUT": "0"}
    )
    assert result.exit_code == 3, result.stderr
    assert server.routes() == [("GET", "/start"), ("POST", "/3")]
    summary = server.hits[1].json()
    assert (summary["status"], summary["exit_code"], summary["run_id"]) == ("failed", 3, None)
    assert "Redis" in str(summary["error"])
    assert b"redis-secret" not in server.hits[1].body


def test_unexpected_exception_pings_exit_5(initialized, server, monkeypatch):
    """A bug in the sync still sends URL/5, naming the exception; exit 5."""

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr("balance_sync.monitoring.report.run_sync", broken)
    assert initialized("sync", "--ping-url", server.url).exit_code == 5
    assert server.routes() == [("GET", "/start"), ("POST", "/5")]
    assert server.hits[1].json()["error"] == "RuntimeError: injected"


def test_unreachable_ping_url_warns_and_never_fails_the_sync(
    initialized, rds, key_prefix, pg, tmp_path
):
    """Nothing listening at the ping URL: warnings with the URL masked, the sync succeeds."""
    rds.set(f"{key_prefix}5", "5.00")
    port = closed_port()
    token = str(uuid.uuid4())
    log = tmp_path / "balsync.log"
    result = initialized(
        "sync", "--ping-url", f"http://127.0.0.1:{port}/{token}", "--log-file", str(log), "-v"
    )
    assert result.exit_code == 0, result.stderr
    assert f"could not send the start ping to http://127.0.0.1:{port}/…" in result.stderr
    assert f"could not send the success ping to http://127.0.0.1:{port}/…" in result.stderr
    assert token not in result.stderr + result.stdout + log.read_text()
    assert pg.execute("SELECT balance::text FROM user_balances").fetchall() == [("5.00",)]


def test_server_errors_are_retried(initialized, server):
    """A 5xx answer is retried: the ping gets through on the third attempt."""
    server.answers = [503, 502]
    initialized.ok("sync", "--ping-url", server.url)
    assert server.routes() == [("GET", "/start")] * 3 + [("POST", "/0")]
    assert len({hit.rid for hit in server.hits}) == 1  # a retry is the same ping


def test_client_error_is_not_retried_and_only_warns(initialized, server):
    """A 4xx answer (a wrong or deleted check) is not retried; a warning, exit 0."""
    server.answers = [404]
    result = initialized("sync", "--ping-url", server.url)
    assert result.exit_code == 0
    assert "could not send the start ping to http://127.0.0.1" in result.stderr
    assert "HTTP 404" in result.stderr
    assert server.routes() == [("GET", "/start"), ("POST", "/0")]


def test_ping_url_from_the_environment(initialized, server):
    """BALSYNC_PING_URL works like --ping-url."""
    initialized.ok("sync", env={"BALSYNC_PING_URL": server.url})
    assert server.routes() == [("GET", "/start"), ("POST", "/0")]


def test_dry_run_sends_no_ping(initialized, server):
    """A dry run writes nothing anywhere and tells no monitor anything."""
    initialized.ok("sync", "--dry-run", "--ping-url", server.url)
    assert server.hits == []


def test_ping_url_must_be_http(balsync):
    """Another scheme is a configuration error, exit 2."""
    result = balsync("sync", "--ping-url", "ftp://hc.example/abc")
    assert result.exit_code == 2
    assert "invalid ping URL" in result.stderr


def test_timeout_gives_up_and_returns_false(server):
    """A server slower than the timeout counts as a failed attempt."""
    server.delay = 1.0
    started = time.monotonic()
    assert send(server.url, "start", timeout=0.2, attempts=2, backoff=0.01) is False
    assert time.monotonic() - started < 1.0
    assert len(server.hits) == 2


@pytest.mark.parametrize(
    ("url", "signal", "expected"),
    [
        ("https://hc.example/ping/abc", "start", "https://hc.example/ping/abc/start"),
        ("https://hc.example/ping/abc/", "fail", "https://hc.example/ping/abc/fail"),
        ("https://hc.example/ping/abc", "success", "https://hc.example/ping/abc"),
        ("https://hc.example/p?key=k", "fail", "https://hc.example/p/fail?key=k"),
        ("https://hc.example/ping/abc", 0, "https://hc.example/ping/abc/0"),
        ("https://hc.example/ping/abc/", 143, "https://hc.example/ping/abc/143"),
    ],
)
def test_signal_urls_follow_the_healthchecks_convention(url, signal, expected):
    """URL/start, URL, URL/fail, URL/<exit code>; a query string stays a query string."""
    assert ping_url(url, signal) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://hc.example/ping/abc", "https://hc.example/ping/abc/1?rid=R"),
        ("https://hc.example/p?key=k", "https://hc.example/p/1?key=k&rid=R"),
    ],
)
def test_run_id_is_added_to_the_query(url, expected):
    """?rid= joins a query the URL already has."""
    assert ping_url(url, 1, run_id="R") == expected


def test_start_and_end_share_one_run_id_of_their_own(initialized, server):
    """Each run's two pings carry the same UUID; the next run another: a monitor pairs them."""
    initialized.ok("sync", "--ping-url", server.url)
    initialized.ok("sync", "--ping-url", server.url, "--force")
    rids = [hit.rid for hit in server.hits]
    assert rids[0] == rids[1]
    assert rids[2] == rids[3]
    assert rids[0] != rids[2]
    assert all(str(uuid.UUID(str(rid))) == rid for rid in rids)


def test_overlapping_runs_are_paired_by_their_run_ids(initialized, env, server):
    """The 02:00 case: two runs at once, their pings interleaved, each end beside its start."""
    server.delay = 0.2  # slow answers, so that the two runs' pings interleave
    command = [sys.executable, "-m", "balance_sync", "sync", "--quiet", "--ping-url", server.url]
    runs = [
        subprocess.Popen([*command, *extra], env={**os.environ, **env})
        for extra in ([], ["--force", "--wait", "30"])
    ]
    assert [run.wait(timeout=60) for run in runs] == [0, 0]
    pairs: dict[str | None, list[str]] = {}
    for (_, route), hit in zip(server.routes(), server.hits, strict=True):
        pairs.setdefault(hit.rid, []).append(route)
    assert len(pairs) == 2
    assert all(routes == ["/start", "/0"] for routes in pairs.values())


def test_every_ping_says_balsync_and_its_version(initialized, rds, key_prefix, server):
    """User-Agent: balsync/<version> on the start and on the end ping."""
    rds.set(f"{key_prefix}1", "1.00")
    initialized.ok("sync", "--ping-url", server.url)
    assert {hit.user_agent for hit in server.hits} == {f"balsync/{__version__}"}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hc-ping.com/0f2c9a2e-secret", "https://hc-ping.com/…"),
        ("https://user:pw@hc.example:8443/p/secret?key=s", "https://hc.example:8443/…"),
        ("http://[::1]:8000/secret", "http://[::1]:8000/…"),
    ],
)
def test_masked_ping_url_shows_only_scheme_and_host(url, shown):
    """The path, query and credentials of a ping URL never reach a log."""
    assert mask_ping_url(url) == shown
