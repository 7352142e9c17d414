"""Prometheus metrics of the last sync, as a textfile for node_exporter's textfile collector.

balsync is a one-shot process, so nothing can be scraped from it: each run leaves its figures
in a file that node_exporter serves until the next run replaces it. The file is written to a
temporary name and renamed, so the collector never reads half a file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

from balance_sync.ops.retention import PRUNED_TABLES
from balance_sync.ops.sync import Status

log = logging.getLogger(__name__)

RECORD_KINDS = ("processed", "inserted", "updated", "unchanged", "skipped", "invalid")
STATUSES: tuple[Status, ...] = ("success", "partial", "skipped", "failed")
# Statuses after which every valid balance is in PostgreSQL (SPEC: exit 0 or 1, not skipped).
SUCCEEDED: tuple[Status, ...] = ("success", "partial")
LAST_SUCCESS = "balsync_last_success_timestamp_seconds"
RESTART_PENDING = "balsync_redis_restart_pending"


@dataclass(frozen=True)
class RunMetrics:
    """What one run tells Prometheus."""

    table: str
    status: Status
    finished_at: float  # Unix time
    duration_s: float
    records: Mapping[str, int]
    redis_up: bool
    postgres_up: bool
    pruned: Mapping[str, int] = field(default_factory=dict)  # rows retention deleted, by table
    # Redis restarted and rows are held until an operator accepts it (`--accept-redis-restart`).
    restart_pending: bool = False


def write_metrics(path: Path, run: RunMetrics) -> bool:
    """Replace the textfile at `path` with this run's metrics; False (and a warning) on failure.

    The last success time is carried over from the file being replaced when this run did not
    succeed, so an alert on its age keeps counting across failed and skipped runs.
    """
    if run.status in SUCCEEDED:
        last_success: float | None = run.finished_at
    else:
        last_success = previous_success(path, run.table)
    registry = _registry(run, last_success)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), registry)
    except OSError as exc:
        log.warning("could not write the metrics file %s: %s", path, exc.strerror or exc)
        return False
    log.debug("metrics written to %s", path)
    return True


def previous_success(path: Path, table: str) -> float | None:
    """The last success time for `table` in an existing metrics file, None when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == LAST_SUCCESS and sample.labels.get("table") == table:
                    return float(sample.value)
    except (OSError, ValueError, UnicodeDecodeError):
        # Absent or unreadable: a broken file must not stop this run's metrics being written.
        return None
    return None


def _registry(run: RunMetrics, last_success: float | None) -> CollectorRegistry:
    registry = CollectorRegistry()

    def gauge(name: str, documentation: str, *labels: str) -> Gauge:
        return Gauge(name, documentation, ("table", *labels), registry=registry)

    one_value = (
        (
            "balsync_last_run_timestamp_seconds",
            "When the last sync ended (Unix time).",
            run.finished_at,
        ),
        (
            LAST_SUCCESS,
            "When the last sync that copied every valid balance (success or partial) ended "
            "(Unix time); 0 while none is known.",
            last_success or 0.0,
        ),
        ("balsync_last_run_duration_seconds", "How long the last sync took.", run.duration_s),
        ("balsync_redis_up", "0 when the last sync gave up on Redis (exit 3).", run.redis_up),
        (
            "balsync_postgres_up",
            "0 when the last sync gave up on PostgreSQL (exit 4).",
            run.postgres_up,
        ),
        (
            RESTART_PENDING,
            "1 while rows are held because Redis restarted, until a run with "
            "--accept-redis-restart (or evidence that nothing was lost) trusts it again.",
            run.restart_pending,
        ),
    )
    for name, documentation, value in one_value:
        gauge(name, documentation).labels(run.table).set(float(value))
    records = gauge("balsync_last_run_records", "Records of the last sync, by kind.", "kind")
    for kind in RECORD_KINDS:
        records.labels(run.table, kind).set(run.records.get(kind, 0))
    status = gauge("balsync_last_run_status", "1 for the last sync's status, else 0.", "status")
    for name in STATUSES:
        status.labels(run.table, name).set(1 if name == run.status else 0)
    pruned = gauge(
        "balsync_last_run_pruned_rows",
        "Rows of balsync's own tables that retention deleted after the last sync, by table.",
        "bookkeeping",
    )
    for name in PRUNED_TABLES:
        pruned.labels(run.table, name).set(run.pruned.get(name, 0))
    return registry
