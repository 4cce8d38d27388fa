"""What ``viommu-backend matrix`` writes besides results.json / JUnit: ``--kcidb FILE``,
``--lava DIR`` (job definitions: written before any boot, also with ``--list``) and
``--report DIR`` (the HTML report)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

Progress = Callable[[str], None]


@dataclass
class KciOutputs:
    kcidb: Path | None = None
    lava: Path | None = None
    report: Path | None = None
    lava_repo: str | None = None
    started: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    def boot(self) -> Any:
        """The boot function for the runs: None (the default) unless a report is wanted."""
        if self.report is None:
            return None
        from viommu_backend.report.collect import reporting_boot

        return reporting_boot()

    def output_dir(self, output: Path | None) -> Path | None:
        """Where the runs keep their folders: ``--output``, else the report's folder."""
        return output if output is not None or self.report is None else self.report

    def before_runs(self, matrix: Any, runs: Sequence[Any], progress: Progress) -> None:
        if self.lava is not None:
            from viommu_backend.kci.lava import write_jobs

            paths = write_jobs(matrix, runs, self.lava, repo=self.lava_repo)
            progress(f"[matrix] LAVA job definitions: {len(paths)} in {self.lava}")

    def after_runs(self, matrix: Any, runs: Sequence[Any], results: Sequence[Any], progress: Progress) -> None:
        if self.kcidb is not None:
            from viommu_backend.kci.kcidb import kcidb_report, write_kcidb

            data = kcidb_report(matrix, runs, results, started=self.started)
            write_kcidb(self.kcidb, data)
            progress(f"[matrix] KCIDB: {self.kcidb} ({len(data['checkouts'])} checkout(s), "
                     f"{len(data['builds'])} build(s), {len(data['tests'])} test(s))")
        if self.report is not None:
            from viommu_backend.report.html import write_matrix_report

            page = write_matrix_report(matrix, runs, results, self.report)
            progress(f"[matrix] report: {page}")
