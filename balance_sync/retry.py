"""Retry policy: which faults are transient, and how long to keep trying.

Only faults that a later attempt can cure are retried: a refused, reset or timed-out
connection, a server loading its data or failing over, a serialization failure. A wrong
password or a bad statement fails at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import psycopg
import redis.exceptions as rx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# SQLSTATE classes and codes a retry can cure: connection exceptions, the server shutting
# down or starting up, too many connections, serialization failures and deadlocks.
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "57P0", "53300", "40001", "40P01")
_TRANSIENT_REDIS_REPLIES = ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY", "CLUSTERDOWN")


def is_transient_redis(exc: BaseException) -> bool:
    """True for a Redis fault that a later attempt can cure."""
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
        return False
    if isinstance(exc, rx.ConnectionError | rx.TimeoutError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, rx.ResponseError):
        return str(exc).startswith(_TRANSIENT_REDIS_REPLIES)
    return False


def is_transient_postgres(exc: BaseException) -> bool:
    """True for a PostgreSQL fault that a later attempt can cure."""
    if not isinstance(exc, psycopg.Error):
        return isinstance(exc, ConnectionError | TimeoutError)
    sqlstate = exc.sqlstate
    if sqlstate is None:
        # No SQLSTATE: the connection could not be made or broke under us. A wrong password
        # does carry one (28P01), so it is not retried.
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return sqlstate.startswith(_TRANSIENT_SQLSTATE_PREFIXES)


def _log_retry(what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: transient fault (%s), retry %d in %.1fs",
            what,
            str(exc).strip().splitlines()[0] if exc else "?",
            state.attempt_number,
            state.next_action.sleep if state.next_action else 0.0,
        )

    return before_sleep


def retrying(what: str, timeout: float, is_transient: Callable[[BaseException], bool]) -> Retrying:
    """A tenacity policy: exponential backoff with jitter, bounded by `timeout` seconds.

    The last exception is re-raised unchanged once the budget is spent, so callers turn it
    into their own typed error.
    """
    return Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_delay(timeout),
        wait=wait_exponential(multiplier=0.2, max=10.0) + wait_random(0, 0.5),
        before_sleep=_log_retry(what),
        reraise=True,
    )


def call(
    what: str,
    timeout: float,
    is_transient: Callable[[BaseException], bool],
    fn: Callable[[], T],
) -> T:
    """Call `fn` under the retry policy."""
    return retrying(what, timeout, is_transient)(fn)
