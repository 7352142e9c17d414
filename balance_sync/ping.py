"""Dead man's switch: tell a monitoring service that a sync started and how it ended.

The healthchecks.io convention, which other services follow too: `URL/start` when a run
begins, `URL` when it succeeded, `URL/fail` when it failed; the service alerts when a ping
says fail or when the expected ping does not come at all (cron stopped, the host is down).
A ping that cannot be delivered is a warning, never a failure of the sync: monitoring must
not be what stops balances from being persisted.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

Signal = Literal["start", "success", "fail"]
TIMEOUT_S = 10.0
ATTEMPTS = 3
BACKOFF_S = 0.5  # before the second attempt; doubled before each next one


def ping_url(url: str, signal: Signal) -> str:
    """The URL to request for `signal`: `URL/start`, `URL` or `URL/fail`; a query is kept."""
    if signal == "success":
        return url
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{signal}"))


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
    timeout: float = TIMEOUT_S,
    attempts: int = ATTEMPTS,
    backoff: float = BACKOFF_S,
) -> bool:
    """Ping `url` for `signal` (a POST when there is a body), with retries; False on failure.

    A refused connection, a timeout or a 5xx answer is retried; a 4xx answer (a wrong or
    deleted check) is not, since a retry cannot cure it. Failures are logged as warnings.
    """
    target = ping_url(url, signal)
    shown = mask_ping_url(url)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    reason = ""
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(target, data=body, headers=headers)  # noqa: S310 - http(s) only, settings check it
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                response.read()
            log.debug("ping %s sent to %s", signal, shown)
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
    log.warning("could not send the %s ping to %s: %s", signal, shown, reason)
    return False
