"""node_exporter's textfile as balsync writes it, parsed: one value per (name, labels)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

TABLE = "user_balances"
STATUS = "balsync_last_run_status"


class Metrics:
    """A parsed textfile: one value per (name, labels)."""

    def __init__(self, path: Path) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(path.read_text()):
            for sample in family.samples:
                self.samples[sample.name, frozenset(sample.labels.items())] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples[name, frozenset({"table": TABLE, **labels}.items())]

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def status(self) -> str:
        """The one status whose gauge is 1."""
        on = [s for s in ("success", "partial", "skipped", "failed") if self(STATUS, status=s)]
        assert len(on) == 1, on
        return on[0]

    def records(self) -> dict[str, float]:
        kinds = ("processed", "inserted", "updated", "unchanged", "skipped", "invalid")
        return {kind: self("balsync_last_run_records", kind=kind) for kind in kinds}
