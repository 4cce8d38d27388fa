"""Running a matrix: the guest images made once per kernel, then every run booted
(``jobs`` at a time, each within the matrix's timeout, its boot lines in its own
``boot.log``), and ``viommu-backend matrix`` from file to exit status (:func:`main_matrix`)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from viommu_backend.config import Config, ConfigError
from viommu_backend.matrix.report import RunResult, format_run_list, format_table, result_from_summary, write_results
from viommu_backend.matrix.spec import MatrixError, Matrix, Run, expand, load_matrix, parse_only

Progress = Callable[[str], None]
BootFn = Callable[..., Any]  # async (config, *, progress, workdir) -> BootSummary


@dataclass
class _Failed:
    """A BootSummary stand-in for runs that never produced one (timeout, set-up failure)."""
    error: str
    ok: bool = False
    kernel: str = ""
    backend: dict[str, Any] | None = None
    workdir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def marks(self, name: str) -> list[Any]:
        return []

    def format(self) -> str:
        return f"run failed: {self.error}"


async def prepare(runs: Sequence[Run], progress: Progress) -> dict[tuple[Any, ...], str]:
    """Make the guest image of every distinct kernel/modules once, before the timed runs;
    returns {key: error} for the ones that could not be made."""
    from viommu_backend.guest.setup import ensure_guest_tools
    from viommu_backend.guest.toolroot import SetupError

    errors: dict[tuple[Any, ...], str] = {}
    seen: set[tuple[Any, ...]] = set()
    for r in runs:
        key = _image_key(r.config)
        if key in seen:
            continue
        seen.add(key)
        try:
            quiet = not r.config.kernel.built  # a kernel build takes minutes: show its progress
            tools = await asyncio.to_thread(ensure_guest_tools, r.config,
                                            progress=(lambda _m: None) if quiet else progress)
            progress(f"[matrix] guest image for {r.config.kernel.describe()}: kernel {tools.image.kernel_version}")
        except (SetupError, ConfigError, OSError) as e:
            errors[key] = f"guest set-up for kernel {r.config.kernel.describe()} failed: {e}"
            progress(f"[matrix] {errors[key]}")
    return errors


def _image_key(cfg: Config) -> tuple[Any, ...]:
    return (cfg.kernel, cfg.guest.modules)


async def run_matrix(matrix: Matrix, runs: Sequence[Run], *, progress: Progress = print,
                     output: Path | None = None, boot: BootFn | None = None,
                     verbose: bool = False, setup: bool = True, jobs: int = 1) -> list[RunResult]:
    """Boot every run, ``jobs`` at a time; one :class:`RunResult` each, in run order (never
    raises for a failed run).  With ``jobs`` > 1 each run prints one line when it ends and
    its boot lines go to its ``boot.log`` only (``verbose``: also to ``progress``, prefixed)."""
    if boot is None:
        from viommu_backend.guest.boot import run_boot as boot
    setup_errors = await prepare(runs, progress) if setup else {}
    slots = asyncio.Semaphore(max(1, jobs))
    t_all = time.monotonic()
    if jobs > 1:
        progress(f"[matrix] {len(runs)} run(s), {jobs} at a time")

    async def one(run: Run) -> RunResult:
        async with slots:
            return await _run_one(matrix, run, len(runs), boot, progress, output, verbose,
                                  setup_errors, parallel=jobs > 1)

    results = list(await asyncio.gather(*(one(r) for r in runs)))
    progress(f"[matrix] {len(runs)} run(s) in {time.monotonic() - t_all:.0f} s")
    return results


class _RunLog:
    """A run's boot lines: kept for its boot.log (written as they come when the run has a
    folder) and, verbose, echoed to the matrix's progress."""

    def __init__(self, path: Path | None, echo: Progress | None, prefix: str) -> None:
        self.lines: list[str] = []
        self.path, self.echo, self.prefix = path, echo, prefix
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(line + "\n")
        if self.echo is not None:
            self.echo(self.prefix + line)


async def _run_one(matrix: Matrix, run: Run, total: int, boot: BootFn, progress: Progress,
                   output: Path | None, verbose: bool, setup_errors: Mapping[tuple[Any, ...], str],
                   parallel: bool) -> RunResult:
    head = f"[{run.index}/{total}] {run.name}"
    if not parallel:
        progress(f"{head} ...")
    workdir = output / "runs" / run.slug if output is not None else None
    prefix = f"[{run.index}] " if parallel else "    "
    sink = _RunLog(workdir / "boot.log" if workdir is not None else None,
                   progress if verbose else None, prefix)
    t0 = time.monotonic()
    if _image_key(run.config) in setup_errors:
        summary: Any = _Failed(setup_errors[_image_key(run.config)])
    else:
        try:
            summary = await asyncio.wait_for(boot(run.config, progress=sink, workdir=workdir),
                                             matrix.timeout)
        except asyncio.TimeoutError:
            summary = _Failed(f"timeout: no result after {matrix.timeout:.0f} s", workdir=workdir)
    res = result_from_summary(run.index, run.name, run.choice, summary, run.expect,
                              duration=time.monotonic() - t0)
    c = res.counters
    extra = (f"domain {res.domain_type or '-'}, {c.get('translations', 0)} translations, "
             f"{c.get('commands', 0)} commands, {c.get('events', 0)} events") if c else ""
    where = f" [log {sink.path}]" if parallel and sink.path is not None else ""
    progress(f"{head}: {res.status} in {res.duration:.1f} s"
             + (f" ({extra})" if extra else "") + (f": {res.reason}" if res.reason else "") + where)
    return res


def main_matrix(path: Path, *, only: Sequence[str] = (), list_only: bool = False,
                output: Path | None = None, timeout: float | None = None, verbose: bool = False,
                progress: Progress = print, jobs: int = 1, outputs: Any = None) -> int:
    """``viommu-backend matrix``: 0 all runs passed, 1 some failed, 2 bad matrix.
    ``outputs``: a :class:`viommu_backend.kci.outputs.KciOutputs` (KCIDB, LAVA, report)."""
    matrix = load_matrix(path)
    if timeout is not None:
        matrix = dataclasses.replace(matrix, timeout=timeout)
    runs = expand(matrix, parse_only(only, matrix))
    if not runs:
        raise MatrixError(f"{matrix.source}: no runs left after excludes and --only")
    progress(format_run_list(matrix, runs))
    if outputs is not None:
        outputs.before_runs(matrix, runs, progress)
    if list_only:
        return 0
    if outputs is not None:
        output = outputs.output_dir(output)
    results = asyncio.run(run_matrix(matrix, runs, progress=progress, output=output, verbose=verbose,
                                      jobs=jobs, boot=outputs.boot() if outputs is not None else None))
    progress("")
    progress(format_table(results, [a.name for a in matrix.axes]))
    if output is not None:
        j, x = write_results(matrix, results, output)
        progress(f"[matrix] results: {j} {x}")
    if outputs is not None:
        outputs.after_runs(matrix, runs, results, progress)
    return 0 if all(r.ok for r in results) else 1
