"""Redis, where the application keeps balances hot.

`store.RedisStore` is what the operations use; `topology` decides, once, between a single
server, a Redis Cluster and Sentinel; `client` connects and retries; `mutations` holds the
guarded writes; `tracking` the application's writes for `balance_sync.writer`.
"""

from balance_sync.stores.redis.keys import dirty_keys, trust_marker
from balance_sync.stores.redis.results import (
    Identity,
    Page,
    Persistence,
    SentinelView,
    ServerInfo,
    TtlSample,
)
from balance_sync.stores.redis.store import RedisStore
from balance_sync.stores.redis.topology import SCAN_COUNT
from balance_sync.stores.redis.tracking import (
    Adjustment,
    AdjustReply,
    AsyncTrackedWrites,
    ReplyLost,
    TrackedWrites,
    adjustment_key,
    write_counter_key,
)

__all__ = [
    "SCAN_COUNT",
    "AdjustReply",
    "Adjustment",
    "AsyncTrackedWrites",
    "Identity",
    "Page",
    "Persistence",
    "RedisStore",
    "ReplyLost",
    "SentinelView",
    "ServerInfo",
    "TrackedWrites",
    "TtlSample",
    "adjustment_key",
    "dirty_keys",
    "trust_marker",
    "write_counter_key",
]
