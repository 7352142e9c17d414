"""How many keys a sync is about to read: the total of a progress bar, and so its time left.

Only a guess, and never in a sync's way: it is asked for only when a person watches the bar,
with one attempt per store, and a store that does not answer leaves the bar without a total.
"""

from __future__ import annotations

import logging

from balance_sync.ops.sync import SyncOptions
from balance_sync.settings import Settings
from balance_sync.stores.postgres import Database, Ledger
from balance_sync.stores.redis import RedisStore

log = logging.getLogger(__name__)

RECENT_RUNS = 25  # a day of hourly runs and the daily full one among them


def expected_keys(settings: Settings, options: SyncOptions) -> int | None:
    """How many keys this sync will likely read; None when neither store can tell.

    An incremental run reads the ids marked changed: their count. A full scan reads about
    what the largest recent run read (the hourly runs may be incremental, the daily one
    is not), bounded by DBSIZE, the keys in the whole database; on a first run DBSIZE alone.
    """
    redis = RedisStore(settings.redis_url, retry_timeout=0)
    db = Database(settings.database_url, retry_timeout=0)
    try:
        if options.incremental and not options.force:
            return redis.marked_count(settings.key_prefix)
        bound = redis.database_size()
        try:
            runs = Ledger(db).recent_runs(settings.table, RECENT_RUNS)
        except Exception:  # no schema yet, or PostgreSQL away: the sync will say so
            runs = []
        largest = max((run.processed for run in runs if run.status != "running"), default=0)
        return min(largest, bound) if largest else bound
    except Exception as exc:  # a progress bar never stops a sync, whatever went wrong
        log.debug("no estimate of the keys to read: %s", exc)
        return None
    finally:
        redis.close()
        db.close()
