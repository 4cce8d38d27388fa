"""The guest DMA benchmark's figures and targets (``scripts/bench_guest_dma``, issue 12).

A *case* is one block size and one guest buffer layout (``guest_images/programs/blk_bench.c``:
``contiguous`` = one transparent huge page, ``scattered`` = separate 4 KiB pages, none
physically adjacent).  A run boots the same guest per vCPU count (``smp``), unmap
invalidation ``mode`` (strict, lazy) and ``path``: ``backend`` (our SMMU), ``builtin``
(QEMU's SMMUv3) and ``none`` (no IOMMU: the ceiling, one per vCPU count, mode ``""``),
and runs every case in each.  :class:`CaseRun` is one case's result (the guest's
``blk-bench`` marker and, on the backend, what the host measured over it: :class:`Host`);
:func:`verdicts` turns a run's figures into the issue's targets, each PASS, FAIL or not
measured (:class:`Verdict`).  Pure: no I/O, so the targets are unit-tested with figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from viommu_backend.config import ConfigError, parse_size

KIB, MIB = 1 << 10, 1 << 20
PATHS = ("backend", "builtin", "none")
MODES = {"strict": "iommu.strict=1", "lazy": "iommu.strict=0"}  # guest command line


@dataclass(frozen=True)
class Case:
    name: str
    bs: int
    layout: str  # "contiguous" | "scattered"

    @property
    def label(self) -> str:
        size = f"{self.bs // MIB} MiB" if self.bs >= MIB else f"{self.bs // KIB} KiB"
        return f"{size} {self.layout}"


CASES = {c.name: c for c in (Case("4k", 4 * KIB, "contiguous"), Case("64k", 64 * KIB, "contiguous"),
                             Case("1m", MIB, "contiguous"), Case("1m-scattered", MIB, "scattered"))}

# Bytes written (and read back) per case: enough requests at 4 KiB to average out, enough
# time at 1 MiB that a request's jitter does not decide the ratio
DEFAULT_BYTES = "4k=16M,64k=64M,1m=128M,1m-scattered=128M"


def process_cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process (all its threads), in seconds (clock ticks); 0 when it
    is gone.  The benchmarks' server CPU figures."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    f = stat[stat.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def case_bytes(text: str, cases: list[str]) -> dict[str, int]:
    """--bytes: one size for every case ("4M") or sizes by case name ("4k=16M,1m=128M":
    a case not named takes :data:`DEFAULT_BYTES`); each at least one request of its case."""
    sizes = {} if "=" in text else {c: parse_size(text, "--bytes") for c in cases}
    for item in (DEFAULT_BYTES + "," + text).split(",") if "=" in text else ():
        name, _, size = item.partition("=")
        if name.strip() not in CASES:
            raise ConfigError(f"--bytes: no case {name.strip()!r} (cases: {', '.join(CASES)})")
        sizes[name.strip()] = parse_size(size.strip(), f"--bytes {name.strip()}")
    out = {c: sizes[c] for c in cases}
    small = [c for c, n in out.items() if n < CASES[c].bs]
    if small:
        raise ConfigError(f"--bytes: less than one request for {', '.join(small)}")
    return out


# Targets (issue 12): backend / built-in combined MB/s at the contiguous sizes, per mode
VS_BUILTIN = {"strict": 0.7, "lazy": 1.0}
VS_BUILTIN_SIZES = (4 * KIB, 64 * KIB, MIB)
SCATTERED_VS_BUILTIN = 2.0  # at 1 MiB scattered, both modes
VS_NONE = 0.7  # backend / no IOMMU, from VS_NONE_FROM up
VS_NONE_FROM = 64 * KIB
SERVER_US_4K = 100.0  # server CPU per 4 KiB request
TRAPS_ALLOWED = 0  # trapped accesses on the map / unmap / submit path


@dataclass(frozen=True)
class Host:
    """What the host measured over one case on the backend: CPU seconds of the server,
    wall seconds, and the trapped (vfio-user message) accesses: SMMU register reads and
    writes, endpoint BAR reads (INTx ISR reads: the completion path) and writes (the
    virtio notify: the submit path)."""

    server_cpu_s: float
    wall_s: float
    smmu_reads: int
    smmu_writes: int
    bar_reads: int
    bar_writes: int

    @property
    def submit_path_traps(self) -> int:
        """Trapped accesses on the map / unmap / submit path (completion's ISR reads aside)."""
        return self.smmu_reads + self.smmu_writes + self.bar_writes


@dataclass(frozen=True)
class CaseRun:
    """One case's result: the guest's ``blk-bench`` marker (+ the host's figures)."""

    marker: Mapping[str, Any]
    host: Host | None = None

    @property
    def ok(self) -> bool:
        return bool(self.marker.get("ok")) and bool(self.marker.get("layout_ok"))

    @property
    def requests(self) -> int:
        """Requests both ways (the guest's writes plus its reads)."""
        return 2 * int(self.marker.get("requests", 0))

    @property
    def mib(self) -> float:
        """MiB moved both ways."""
        return 2 * int(self.marker.get("bytes", 0)) / MIB

    def mbps(self, what: str = "both") -> float:
        """MB/s (1e6 B/s) of the timed I/O calls: "write", "read" or "both" (write + read
        bytes over write + read time)."""
        nbytes, w, r = int(self.marker.get("bytes", 0)), self.marker.get("write_ns", 0), \
            self.marker.get("read_ns", 0)
        ns = {"write": w, "read": r, "both": w + r}[what]
        return (2 if what == "both" else 1) * nbytes * 1e3 / ns if ns else 0.0

    @property
    def server_us(self) -> float | None:
        """Server CPU per request (both ways), us."""
        if self.host is None or not self.requests:
            return None
        return 1e6 * self.host.server_cpu_s / self.requests


Key = tuple[int, str, str, str]  # (smp, mode ("" for path none), path, case name)


@dataclass
class Figures:
    """A run's case results by (smp, mode, path, case)."""

    runs: dict[Key, CaseRun] = field(default_factory=dict)

    def result(self, smp: int, mode: str, path: str, case: str) -> CaseRun | None:
        """The case's result, failed or not (path none: whatever the mode)."""
        return self.runs.get((smp, "" if path == "none" else mode, path, case))

    def get(self, smp: int, mode: str, path: str, case: str) -> CaseRun | None:
        """The case's result if it succeeded."""
        run = self.result(smp, mode, path, case)
        return run if run is not None and run.ok else None

    def ratio(self, smp: int, mode: str, case: str, other: str) -> float | None:
        mine, theirs = self.get(smp, mode, "backend", case), self.get(smp, mode, other, case)
        if mine is None or theirs is None or not theirs.mbps():
            return None
        return mine.mbps() / theirs.mbps()

    def combos(self) -> list[tuple[int, str]]:
        """(smp, mode) pairs with a backend result, in run order."""
        return list(dict.fromkeys((k[0], k[1]) for k in self.runs if k[2] == "backend"))

    def cases(self) -> list[str]:
        return list(dict.fromkeys(k[3] for k in self.runs))


@dataclass(frozen=True)
class Verdict:
    what: str
    value: float | None  # None: not measured
    limit: float
    at_least: bool  # value >= limit passes (else value <= limit)
    unit: str = "x"
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    def line(self) -> str:
        tag = {True: "PASS", False: "FAIL", None: "n/a "}[self.passed]
        fmt = (lambda v: f"{v:.2f}x") if self.unit == "x" else (lambda v: f"{v:.0f} {self.unit}".rstrip())
        got = "not measured" if self.value is None else fmt(self.value)
        return f"{tag}  {self.what}: {got} ({'>=' if self.at_least else '<='} {fmt(self.limit)})" + \
            (f"  [{self.note}]" if self.note else "")


def _ratio_verdicts(fig: Figures, smp: int, mode: str) -> list[Verdict]:
    out = []
    for name in fig.cases():
        c = CASES[name]
        where = f"smp {smp} {mode:<6} {c.label:<17}"
        if c.layout == "contiguous" and c.bs in VS_BUILTIN_SIZES:
            out.append(Verdict(f"{where} backend / built-in", fig.ratio(smp, mode, name, "builtin"),
                               VS_BUILTIN[mode], True))
        if c.layout == "scattered" and c.bs == MIB:
            out.append(Verdict(f"{where} backend / built-in", fig.ratio(smp, mode, name, "builtin"),
                               SCATTERED_VS_BUILTIN, True))
        if c.bs >= VS_NONE_FROM:
            out.append(Verdict(f"{where} backend / no IOMMU", fig.ratio(smp, mode, name, "none"),
                               VS_NONE, True))
    return out


def _host_verdicts(fig: Figures, smp: int, mode: str) -> list[Verdict]:
    four_k = next((n for n in fig.cases() if CASES[n].bs == 4 * KIB), None)
    run = fig.get(smp, mode, "backend", four_k) if four_k else None
    out = [Verdict(f"smp {smp} {mode:<6} server CPU per 4 KiB request", run.server_us if run else None,
                   SERVER_US_4K, False, "us")]
    measured = [r for n in fig.cases() if (r := fig.get(smp, mode, "backend", n)) and r.host]
    traps = sum(r.host.submit_path_traps for r in measured if r.host) if measured else None
    mib = sum(r.mib for r in measured)
    note = f"{traps / mib:.1f} per MiB over {mib:.0f} MiB" if traps is not None and mib else ""
    out.append(Verdict(f"smp {smp} {mode:<6} trapped accesses on the map/unmap/submit path", traps,
                       TRAPS_ALLOWED, False, "", note))
    return out


def verdicts(fig: Figures) -> list[Verdict]:
    """Every target of issue 12 for every (smp, mode) the run has a backend result for."""
    out = []
    for smp, mode in fig.combos():
        out += _ratio_verdicts(fig, smp, mode) + _host_verdicts(fig, smp, mode)
    return out


def mbps_table(fig: Figures, smp: int, mode: str) -> list[str]:
    """One (smp, mode): MB/s per case and path (write, read, both), the buffer's physically
    contiguous runs, and the backend's ratios to the built-in SMMU and to no IOMMU."""
    lines = [f"{'case':<18}| {'path':<8}| {'write':>8} {'read':>8} {'both':>8} | {'runs':>4} | "
             f"{'/built-in':>9} {'/none':>6}"]
    for name in fig.cases():
        for path in PATHS:
            run = fig.result(smp, mode, path, name)
            if run is None:
                continue
            row = f"{CASES[name].label:<18}| {path:<8}| "
            if run.ok:
                row += f"{run.mbps('write'):8.2f} {run.mbps('read'):8.2f} {run.mbps():8.2f} | " \
                       f"{run.marker.get('runs', 0):>4} |"
            else:
                row += f"FAILED: {run.marker.get('error') or 'no result'} |"
            if path == "backend":
                rb, rn = fig.ratio(smp, mode, name, "builtin"), fig.ratio(smp, mode, name, "none")
                row += f" {_x(rb):>9} {_x(rn):>6}"
            lines.append(row)
    return lines


def traps_table(fig: Figures, smp: int, mode: str) -> list[str]:
    """The backend's trapped accesses and server CPU per case of one (smp, mode)."""
    lines = []
    for name in fig.cases():
        run = fig.get(smp, mode, "backend", name)
        if run is None or run.host is None:
            continue
        h, mib = run.host, run.mib or 1.0
        lines.append(
            f"{CASES[name].label:<17}: map/unmap/submit {h.submit_path_traps / mib:8.1f}/MiB (SMMU reads "
            f"{h.smmu_reads}, SMMU writes {h.smmu_writes}, endpoint BAR writes {h.bar_writes}); "
            f"completion BAR reads {h.bar_reads / mib:.1f}/MiB; server CPU {run.server_us:.0f} us per "
            f"request ({run.requests} requests, {100 * h.server_cpu_s / h.wall_s if h.wall_s else 0:.0f}% "
            f"of {h.wall_s:.1f} s)")
    return lines


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def summary_line(vs: list[Verdict], seconds: float) -> str:
    passed = sum(v.passed is True for v in vs)
    failed = sum(v.passed is False for v in vs)
    unmeasured = sum(v.passed is None for v in vs)
    return (f"{passed} of {len(vs)} targets passed, {failed} failed" +
            (f", {unmeasured} not measured" if unmeasured else "") + f"; run took {seconds:.0f} s")
