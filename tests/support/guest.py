"""Helpers of the guest end-to-end tests: booting a config (or matrix runs) and checking
the run left nothing behind, and the skip-or-fail rule for missing prerequisites."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from viommu_backend.guest.boot import BootSummary, run_boot
from viommu_backend.matrix import Matrix, RunResult, run_matrix


def require(condition: bool, why: str) -> None:
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"prerequisite missing under CI: {why}")
    pytest.skip(why)


def leftover_processes(workdir: Path) -> list[str]:
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in cmd:
            found.append(f"{p.name}: {cmd}")
    return found


async def boot(config, workdir: Path, **kw) -> BootSummary:
    lines: list[str] = []
    s = await run_boot(config, progress=lines.append, workdir=workdir, **kw)
    assert leftover_processes(workdir) == []
    console = s.console_log.read_text()[-3000:] if s.console_log and s.console_log.exists() else ""
    assert s.ok, "\n".join(lines) + f"\nconsole:\n{console}"
    return s


async def matrix_passes(m: Matrix, runs: list, output: Path) -> list[RunResult]:
    """Boot ``runs`` of ``m``: every one passes and leaves nothing behind."""
    lines: list[str] = []
    results = await run_matrix(m, runs, progress=lines.append, output=output)
    assert leftover_processes(output) == []
    detail = "\n".join(lines) + "\n" + "\n\n".join(r.log for r in results if not r.ok)
    assert [r.status for r in results] == ["PASS"] * len(runs), detail
    return results
