"""Connecting to Redis: the client a URL names, its connection options, and every command
sent under balsync's retry budget with its failures turned into balsync's errors.

redis-py's own retries are off so that one budget (`--retry-timeout`) bounds the whole run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.exceptions as rx
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from balance_sync import retry
from balance_sync.errors import BalsyncError, ConfigError, RedisUnavailable
from balance_sync.settings import CLUSTER_SUFFIX, SentinelUrl, mask_url

T = TypeVar("T")

SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0

# Faults after which a cluster's slot map is read again before the next attempt.
TOPOLOGY_FAULTS = (
    rx.ConnectionError,
    rx.TimeoutError,
    rx.ClusterError,
    rx.AskError,
    rx.TryAgainError,
    rx.SlotNotCoveredError,
)


def client_options() -> dict[str, Any]:
    """The same timeouts for a single server and a cluster; redis-py's own retries off."""
    return {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "retry": Retry(NoBackoff(), 0),
    }


def server_client(url: str) -> redis.Redis:
    """A client of the one server of a redis:// or rediss:// URL (it connects when used)."""
    return redis.Redis.from_url(url, **client_options())


def cluster_client(url: str) -> RedisCluster:
    """A client of the cluster of a redis+cluster:// URL: it connects as it is made, to learn
    the nodes and their slots."""
    return RedisCluster.from_url(_single_scheme(url), **client_options())


def sentinel_client(url: SentinelUrl) -> tuple[redis.Redis, Sentinel]:
    """A client of the service's master, found through the sentinels for every connection:
    after a failover the next reconnect (a retried command) reaches the new master."""
    options = client_options()
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(url.sentinels),
        sentinel_kwargs={
            key: options[key] for key in ("socket_timeout", "socket_connect_timeout", "retry")
        },
        **options,
    )
    client = sentinel.master_for(  # type: ignore[no-untyped-call]
        url.service,
        db=url.db,
        username=url.username,
        password=url.password,
        ssl=url.tls,
    )
    return cast(redis.Redis, client), sentinel


def address(client: redis.Redis) -> str:
    """host:port of the server a client connects to."""
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"


def _single_scheme(url: str) -> str:
    """redis+cluster:// -> redis://, rediss+cluster:// -> rediss:// (what redis-py reads)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=parts.scheme.removesuffix(CLUSTER_SUFFIX)))


class Calls:
    """Commands of one server sent under the retry budget; a failure that outlasts it, or
    that no retry can cure, raised as balsync's error naming the (masked) URL."""

    def __init__(self, url: str, retry_timeout: float) -> None:
        self.url = url
        self.retry_timeout = retry_timeout

    def __call__(self, fn: Callable[[], T]) -> T:
        """`fn`, retried while it fails with a fault a later attempt can cure."""
        try:
            return retry.call("Redis", self.retry_timeout, self.transient, self.attempt(fn))
        except (rx.AuthenticationError, rx.AuthorizationError) as exc:
            raise RedisUnavailable(
                f"Redis at {mask_url(self.url)} refused the credentials: {exc}",
                "check the password in the Redis URL",
            ) from exc
        except (rx.ConnectionError, rx.TimeoutError, OSError) as exc:
            raise RedisUnavailable(
                f"Redis at {mask_url(self.url)} is unavailable after "
                f"{self.retry_timeout:g}s of retries: {exc}",
                "check that the server runs and the URL, port and TLS settings are right",
            ) from exc
        except rx.RedisClusterException as exc:
            raise self._cluster_failure(exc) from exc
        except rx.ResponseError as exc:
            if self.transient(exc):
                raise RedisUnavailable(
                    f"Redis at {mask_url(self.url)} stayed busy after "
                    f"{self.retry_timeout:g}s of retries: {exc}",
                    "check the server's log (loading, failover or a busy script)",
                ) from exc
            misplaced = self.misplaced(exc)
            if misplaced is not None:
                raise misplaced from exc
            raise

    def transient(self, exc: BaseException) -> bool:
        """True for a fault that a later attempt can cure."""
        return retry.is_transient_redis(exc)

    def attempt(self, fn: Callable[[], T]) -> Callable[[], T]:
        """One attempt of `fn`: the hook where a topology prepares each try."""
        return fn

    def misplaced(self, exc: rx.ResponseError) -> BalsyncError | None:
        """The error for a reply that says the URL names another kind of deployment."""
        if isinstance(exc, rx.AskError | rx.ClusterCrossSlotError):
            return ConfigError(
                f"Redis at {mask_url(self.url)} is a node of a Redis Cluster: {exc}",
                "add --cluster, or use a redis+cluster:// URL",
            )
        return None

    def _cluster_failure(self, exc: rx.RedisClusterException) -> BalsyncError:
        """The error to show when the cluster client could not be made or find a node."""
        where = f"Redis Cluster at {mask_url(self.url)}"
        cause = exc.__cause__
        if isinstance(cause, rx.AuthenticationError | rx.AuthorizationError):
            return RedisUnavailable(
                f"{where} refused the credentials: {cause}", "check the password in the Redis URL"
            )
        if "cluster mode is not enabled" in str(exc).lower():
            return ConfigError(
                f"{where} is a single server, not a cluster node",
                "drop --cluster and BALSYNC_REDIS_CLUSTER, and use a redis:// URL",
            )
        return RedisUnavailable(
            f"{where} is unavailable after {self.retry_timeout:g}s of retries: {exc}",
            "check that the nodes run, that every slot is served, and the URL and TLS settings",
        )


class ClusterCalls(Calls):
    """Calls to a Redis Cluster: its passing faults retried too, and the slot map read again
    (`refresh`) before an attempt that follows a fault that may mean the cluster changed
    (a node down, a failover, slots moving)."""

    def __init__(self, url: str, retry_timeout: float, refresh: Callable[[], None]) -> None:
        super().__init__(url, retry_timeout)
        self._refresh = refresh
        self._stale_slots = False

    def transient(self, exc: BaseException) -> bool:
        """is_transient_redis, plus a cluster's own passing faults: a node unreachable while
        the slot map is read, slots not covered or moving, the cluster down in a failover."""
        if retry.is_transient_redis(exc):
            return True
        if isinstance(exc, rx.SlotNotCoveredError):
            return True
        if isinstance(exc, rx.RedisClusterException):
            cause = exc.__cause__
            if isinstance(cause, rx.AuthenticationError | rx.AuthorizationError):
                return False
            return isinstance(cause, rx.ConnectionError | rx.TimeoutError | OSError)
        return isinstance(exc, rx.ClusterError | rx.AskError | rx.TryAgainError)

    def attempt(self, fn: Callable[[], T]) -> Callable[[], T]:
        """`fn`, preceded by a new read of the slot map when the last attempt met a fault
        in TOPOLOGY_FAULTS."""

        def attempt() -> T:
            if self._stale_slots:
                self._refresh()
            self._stale_slots = False
            try:
                return fn()
            except TOPOLOGY_FAULTS:
                self._stale_slots = True
                raise

        return attempt

    def misplaced(self, exc: rx.ResponseError) -> BalsyncError | None:
        """None: a cluster follows its own redirections."""
        return None
