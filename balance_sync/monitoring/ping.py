"""Dead man's switch: tell a monitoring service that a sync started and how it ended.

The healthchecks.io convention, which other services follow too: `URL/start` when a run
begins, then `URL/<exit code>` when it ended (0 is a success, anything else a failure, like
`URL` and `URL/fail`); the service alerts when a ping says fail or when the expected ping does
not come at all (cron stopped, the host is down). Both pings of a run carry the same
`?rid=<uuid>`, so the service pairs each end with its own start even when two runs overlap
(the hourly and the daily one at 02:00) and measures each run's duration.
A ping that cannot be delivered is a warning, never a failure of the sync: monitoring must
not be what stops balances from being persisted.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from typing import Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

from balance_sync import __version__

log = logging.getLogger(__name__)

# "start", "success" or "fail" by name, or the run's exit code.
Signal = Literal["start", "success", "fail"] | int
USER_AGENT = f"balsync/{__version__}"
TIMEOUT_S = 10.0
ATTEMPTS = 3
BACKOFF_S = 0.5  # before the second attempt; doubled before each next one


def ping_url(url: str, signal: Signal, run_id: str | None = None) -> str:
    """The URL to request for `signal`: `URL/start`, `URL`, `URL/fail` or `URL/<exit code>`.

    A query of the URL is kept; `run_id` is added to it as `rid`.
    """
    parts = urlsplit(url)
    if signal != "success":
        parts = parts._replace(path=f"{parts.path.rstrip('/')}/{signal}")
    if run_id is not None:
        rid = urlencode({"rid": run_id})
        parts = parts._replace(query=f"{parts.query}&{rid}" if parts.query else rid)
    return urlunsplit(parts)


def signal_name(signal: Signal) -> str:
    """How a log line names the ping: start, success, or fail with its exit code."""
    if isinstance(signal, str):
        return signal
    return "success" if signal == 0 else f"fail (exit {signal})"


def mask_ping_url(url: str) -> str:
    """Only scheme://host[:port]/…: a ping URL carries its secret in the path or query."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(invalid ping URL)"
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}/…"


def send(
    url: str,
    signal: Signal,
    body: bytes | None = None,
    *,
    run_id: str | None = None,
    timeout: float = TIMEOUT_S,
    attempts: int = ATTEMPTS,
    backoff: float = BACKOFF_S,
) -> bool:
    """Ping `url` for `signal` (a POST when there is a body), with retries; False on failure.

    `run_id` goes along as `?rid=`, the same for a run's start and end. A refused
    connection, a timeout or a 5xx answer is retried; a 4xx answer (a wrong or deleted
    check) is not, since a retry cannot cure it. Failures are logged as warnings.
    """
    target = ping_url(url, signal, run_id)
    shown = mask_ping_url(url)
    name = signal_name(signal)
    # Monitors show the User-Agent beside each ping: it tells which version reported.
    headers = {"User-Agent": USER_AGENT}
    if body is not None:
        headers["Content-Type"] = "application/json"
    reason = ""
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(target, data=body, headers=headers)  # noqa: S310 - http(s) only, settings check it
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                response.read()
            log.debug("ping %s sent to %s", name, shown)
            return True
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}"
            exc.close()
            if exc.code < 500:
                break
        except (urllib.error.URLError, OSError) as exc:
            cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            reason = str(cause) or type(cause).__name__
        if attempt < attempts:
            time.sleep(backoff * 2 ** (attempt - 1))
    log.warning("could not send the %s ping to %s: %s", name, shown, reason)
    return False
