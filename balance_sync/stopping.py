"""A request from outside a run to stop it at its next safe point.

The core handles no signals: the CLI's handler calls `StopRequest.request`, and the run
checks the request before each batch and while it waits for the table's lock. A batch being
committed completes first, so a stopped run leaves whole batches and a run record that says
it failed, never half-written bookkeeping.
"""

from __future__ import annotations

import threading

from balance_sync.errors import Stopped


class StopRequest:
    """Set once, from any thread or a signal handler; read by the run at its safe points."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        self.exit_code = 0

    def request(self, reason: str, exit_code: int) -> None:
        """Ask the run to stop; the first request's reason and exit code are kept."""
        if not self._event.is_set():
            self.reason, self.exit_code = reason, exit_code
            self._event.set()

    @property
    def requested(self) -> bool:
        """True once a stop was asked for."""
        return self._event.is_set()

    def check(self) -> None:
        """Raise Stopped if a stop was asked for: the caller is at a safe point."""
        if self._event.is_set():
            raise Stopped(
                f"{self.reason}: stopped before the next batch",
                "batches already committed are kept; the next run finishes the job",
                exit_code=self.exit_code,
            )

    def pause(self, seconds: float) -> None:
        """Sleep up to `seconds`, waking at once, and raising Stopped, on a stop request."""
        self._event.wait(seconds)
        self.check()
