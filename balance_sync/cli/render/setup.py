"""What init-db created and what schedule printed, installed or removed."""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text

from balance_sync.ops.init_db import InitResult
from balance_sync.ops.schedule import ScheduleChange

# cron's environment holds none of balsync's variables; said on stderr beside the lines.
CRON_ENVIRONMENT = (
    "cron starts these with an almost empty environment: set BALSYNC_REDIS_URL_FILE "
    "and BALSYNC_DATABASE_URL_FILE (files of mode 600) or the URLs themselves as "
    "variable lines above the block (crontab -e)."
)


def init_db_views(result: InitResult) -> list[RenderableType]:
    """What init-db created, in one line."""
    what = ", ".join(result.created) if result.created else "nothing (all present)"
    return [f"init-db: created {what}"]


def schedule_views(change: ScheduleChange) -> list[RenderableType]:
    """What schedule did, then the crontab lines unless they were removed."""
    message = schedule_message(change)
    views: list[RenderableType] = [message] if message else []
    if change.action != "uninstall":
        views.extend(Text(line) for line in change.lines)  # Text: a path may hold `[...]`
    return views


def schedule_notes(change: ScheduleChange) -> list[str]:
    """The advice that goes with printed or installed lines."""
    return [] if change.action == "uninstall" else [CRON_ENVIRONMENT]


def schedule_message(change: ScheduleChange) -> str:
    """What `balsync schedule --install/--uninstall` did, in one line."""
    if change.action == "install":
        return (
            "installed balsync's schedule in the crontab:"
            if change.changed
            else "balsync's schedule is already installed; the crontab is unchanged:"
        )
    if change.action == "uninstall":
        return (
            "removed balsync's schedule from the crontab"
            if change.changed
            else "the crontab holds no balsync schedule; nothing to remove"
        )
    return ""
