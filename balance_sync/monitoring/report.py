"""A sync as monitoring sees it: a start ping before it, metrics and an end ping after it.

Failed runs are reported too, before their error goes on to the CLI. Neither a ping nor the
metrics file can fail a sync or change its exit code; a dry run is reported nowhere, since
it writes nothing anywhere.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from balance_sync.errors import BalsyncError, PostgresUnavailable, RedisUnavailable
from balance_sync.monitoring.logs import RUN_CONTEXT
from balance_sync.monitoring.metrics import RunMetrics, write_metrics
from balance_sync.monitoring.ping import send
from balance_sync.ops.sync import BatchReport, SyncOptions, SyncResult, run_sync
from balance_sync.settings import Settings, mask_text

UNEXPECTED_EXIT = 5


@dataclass(frozen=True)
class SyncFailure:
    """Why a sync failed, as a machine reads it: the exit code and one masked line."""

    exit_code: int
    error: str

    @classmethod
    def of(cls, exc: BaseException) -> SyncFailure:
        """The failure an exception ends the run with (5 for one balsync did not expect)."""
        if isinstance(exc, BalsyncError):
            code, text = exc.exit_code, str(exc)
        else:
            code, text = UNEXPECTED_EXIT, f"{type(exc).__name__}: {exc}"
        # It goes to monitors and third parties: a library's text may quote a URL with its
        # password, or span lines that would break a line-oriented reader.
        return cls(code, " ".join(mask_text(text).split()))


def failed_result(*, dry_run: bool, duration_s: float) -> SyncResult:
    """The result of a run that raised; its run id when it got as far as being recorded."""
    return SyncResult(
        status="failed", dry_run=dry_run, duration_s=duration_s, run_id=RUN_CONTEXT.run_id
    )


def failed_json(result: SyncResult, failure: SyncFailure) -> dict[str, object]:
    """SPEC's sync object for a failed run, with its `exit_code` and `error`."""
    return {**result.to_json(), "exit_code": failure.exit_code, "error": failure.error}


def run_reported(
    settings: Settings,
    options: SyncOptions,
    on_batch: Callable[[BatchReport], None] | None = None,
) -> SyncResult:
    """Run one sync as `run_sync` does, reporting it to the ping URL and the metrics file.

    The end ping carries the exit code: 0 for a run that succeeded or was skipped, 1 for a
    partial run (records need a look), 3/4/5 for a failed one, whose exception is then
    re-raised. Both pings carry one run id of their own, so a monitor pairs them.
    """
    if options.dry_run or (settings.ping_url is None and settings.metrics_file is None):
        return run_sync(settings, options, on_batch)
    # Not the sync_runs id: a run that fails before it is recorded needs one as well.
    ping_id = str(uuid.uuid4())
    if settings.ping_url is not None:
        send(settings.ping_url, "start", run_id=ping_id)
    started = time.monotonic()
    try:
        result = run_sync(settings, options, on_batch)
    except Exception as exc:
        failed = failed_result(dry_run=False, duration_s=time.monotonic() - started)
        failure = SyncFailure.of(exc)
        _report(settings, ping_id, failed, failure.exit_code, failure)
        raise
    _report(settings, ping_id, result, 1 if result.status == "partial" else 0)
    return result


def _report(
    settings: Settings,
    ping_id: str,
    result: SyncResult,
    exit_code: int,
    failure: SyncFailure | None = None,
) -> None:
    if settings.metrics_file is not None:
        run = RunMetrics(
            table=str(settings.table),
            status=result.status,
            finished_at=time.time(),
            duration_s=result.duration_s,
            records=result.counters(),
            redis_up=exit_code != RedisUnavailable.exit_code,
            postgres_up=exit_code != PostgresUnavailable.exit_code,
            pruned=result.pruned,
            restart_pending=result.restart_pending,
        )
        write_metrics(settings.metrics_file, run)
    if settings.ping_url is not None:
        summary: dict[str, object] = {
            **(result.to_json() if failure is None else failed_json(result, failure)),
            "table": str(settings.table),
            "exit_code": exit_code,
        }
        body = json.dumps(summary).encode()
        send(settings.ping_url, exit_code, body, run_id=ping_id)
