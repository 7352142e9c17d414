"""Every Redis command balsync sends lives here.

Reads are plain round trips retried under the policy in `retry`; redis-py's own retries are
off so that one budget (`--retry-timeout`) bounds the whole run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar, cast

import redis
import redis.exceptions as rx
from redis.backoff import NoBackoff
from redis.retry import Retry

from balance_sync import retry
from balance_sync.errors import RedisUnavailable
from balance_sync.settings import mask_url

T = TypeVar("T")

SCAN_COUNT = 1000
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0


@dataclass(slots=True)
class Page:
    """One SCAN page with its values: string keys with their bytes, other types by name."""

    values: list[tuple[bytes, bytes]] = field(default_factory=list)
    wrong_type: list[tuple[bytes, str]] = field(default_factory=list)


class RedisStore:
    """A connection to the Redis that holds the balances, with balsync's retry budget."""

    def __init__(self, url: str, retry_timeout: float) -> None:
        self.url = url
        self.retry_timeout = retry_timeout
        self.client: redis.Redis = redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_keepalive=True,
            health_check_interval=30,
            retry=Retry(NoBackoff(), 0),
        )

    def close(self) -> None:
        """Release the connection pool."""
        self.client.close()

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return retry.call("Redis", self.retry_timeout, retry.is_transient_redis, fn)
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
        except rx.ResponseError as exc:
            if retry.is_transient_redis(exc):
                raise RedisUnavailable(
                    f"Redis at {mask_url(self.url)} stayed busy after "
                    f"{self.retry_timeout:g}s of retries: {exc}",
                    "check the server's log (loading, failover or a busy script)",
                ) from exc
            raise

    def ping(self) -> None:
        """Check that Redis answers."""
        self._call(self.client.ping)

    def scan_pages(self, prefix: str) -> Iterator[Page]:
        """Every key under `prefix` with its value, page by page (SCAN, never KEYS).

        MGET of one page travels in the same round trip as SCAN of the next, so the server
        is never waiting on us. A key can appear in two pages if the keyspace is rehashed
        during the scan; writes are idempotent, so that costs nothing but a count.
        """
        match = prefix.encode() + b"*"
        cursor, keys = self._call(partial(self._scan, 0, match))
        while keys or cursor != 0:
            if not keys:
                cursor, keys = self._call(partial(self._scan, cursor, match))
                continue
            if cursor == 0:
                values = self._call(partial(self._mget, keys))
                yield self._page(keys, values)
                return
            values, (cursor, next_keys) = self._call(
                partial(self._mget_and_scan, keys, cursor, match)
            )
            yield self._page(keys, values)
            keys = next_keys

    def _scan(self, cursor: int, match: bytes) -> tuple[int, list[bytes]]:
        next_cursor, keys = self.client.scan(cursor, match=match, count=SCAN_COUNT)
        return int(next_cursor), cast(list[bytes], keys)

    def _mget(self, keys: list[bytes]) -> list[bytes | None]:
        return cast(list[bytes | None], self.client.mget(keys))

    def _mget_and_scan(
        self, keys: list[bytes], cursor: int, match: bytes
    ) -> tuple[list[bytes | None], tuple[int, list[bytes]]]:
        pipe = self.client.pipeline(transaction=False)
        pipe.mget(keys)
        pipe.scan(cursor, match=match, count=SCAN_COUNT)
        values, (next_cursor, next_keys) = pipe.execute()
        return list(values), (int(next_cursor), list(next_keys))

    def _page(self, keys: list[bytes], values: list[bytes | None]) -> Page:
        page = Page()
        missing: list[bytes] = []
        for key, value in zip(keys, values, strict=True):
            if value is None:
                missing.append(key)
            else:
                page.values.append((key, value))
        if missing:
            # MGET answers nil both for a key of another type and for a key deleted since
            # SCAN saw it; TYPE tells them apart.
            types = self._call(partial(self._types, missing))
            for key, kind in zip(missing, types, strict=True):
                name = kind.decode() if isinstance(kind, bytes) else str(kind)
                if name != "none":
                    page.wrong_type.append((key, name))
        return page

    def _types(self, keys: list[bytes]) -> list[bytes]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.type(key)
        return list(pipe.execute())
