"""A matrix's results: one :class:`RunResult` per run (from the run's digest, judged
against the run's ``expect``), the final table, ``results.json`` and ``junit.xml``, and the
list of runs printed before the first boot.  What KCIDB, LAVA and the HTML report
(viommu_backend.kci, viommu_backend.report) are handed."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence
from xml.etree import ElementTree as ET

from viommu_backend.guest.report import digest
from viommu_backend.kci.checks import checks_from_markers
from viommu_backend.matrix.spec import Matrix, Run


@dataclass
class RunResult:
    index: int
    name: str
    choice: dict[str, str]
    ok: bool
    reason: str = ""
    error: str = ""
    duration: float = 0.0
    kernel: str = ""
    domain_type: str = ""
    counters: dict[str, Any] = field(default_factory=dict)
    blk: dict[str, dict[str, float]] = field(default_factory=dict)  # bs -> MB/s
    driver: dict[str, Any] = field(default_factory=dict)  # what dmesg said about the SMMU
    # the guest programs' result lines (markers with an ok, as BootSummary.checks() lists
    # them): name -> "PASS" or "FAIL: <first failed step>", for the per-check table
    guest_checks: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    log: str = ""  # the boot summary text
    checks: list[dict[str, Any]] = field(default_factory=list)  # kci.checks.Check.to_json()

    @property
    def status(self) -> str:
        return "PASS" if self.ok else "FAIL"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text and text.strip() else ""


def check_expect(expect: Mapping[str, Any], *, domain_type: str, kernel: str,
                 kmsg: Sequence[str]) -> list[str]:
    """What ``expect`` asked for that the run did not show (empty: all met)."""
    missing: list[str] = []
    if "domain_type" in expect and domain_type != expect["domain_type"]:
        missing.append(f"expected domain type {expect['domain_type']}, got {domain_type or 'none'}")
    if "kernel" in expect and not re.search(expect["kernel"], kernel):
        missing.append(f"expected kernel matching {expect['kernel']!r}, got {kernel or 'none'}")
    for pat in expect.get("kmsg", []):
        if not any(re.search(pat, line) for line in kmsg):
            missing.append(f"no kernel message matching {pat!r}")
    return missing


def result_from_summary(run_index: int, name: str, choice: dict[str, str], summary: Any,
                        expect: Mapping[str, Any] | None = None, duration: float | None = None
                        ) -> RunResult:
    """A :class:`RunResult` from a :class:`~viommu_backend.guest.report.BootSummary` (or
    anything :func:`~viommu_backend.guest.report.digest` takes), judged against ``expect``."""
    d = digest(summary)
    ok, error = d.ok, d.error
    reason = "" if ok else (_first_line(error) or "failed")
    if ok and expect:
        missing = check_expect(expect, domain_type=d.domain_type, kernel=d.kernel, kmsg=d.kmsg)
        if missing:
            ok, reason, error = False, missing[0], "\n".join(missing)
    return RunResult(
        index=run_index, name=name, choice=dict(choice), ok=ok, reason=reason, error=error,
        duration=d.duration if duration is None else duration, kernel=d.kernel,
        domain_type=d.domain_type, counters=d.counters, blk=d.blk, driver=d.driver,
        workdir=d.workdir, log=d.log,
        checks=[c.to_json() for c in checks_from_markers(d.markers, ok=ok, reason=reason)],
        guest_checks=d.guest_checks,
    )


def _fmt_rate(r: float | None) -> str:
    return "-" if r is None else f"{100 * r:.1f}%"


def _bs_label(bs: str) -> str:
    n = int(bs)
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10}K" if n % 1024 == 0 else str(n)


def format_table(results: Sequence[RunResult], axes: Sequence[str]) -> str:
    """The final table: axis values, result, key counters, MB/s per block size, reason."""
    sizes = sorted({bs for r in results for bs in r.blk}, key=int)
    head = ["#", *axes, "result", "domain", "xlat", "walks", "TLB", "cmds", "syncs", "evts", "gerr",
            *(f"MB/s {_bs_label(bs)}" for bs in sizes), "time", "reason"]
    rows = []
    for r in results:
        c = r.counters
        rows.append([
            str(r.index), *(r.choice.get(a, "") for a in axes), r.status, r.domain_type or "-",
            str(c.get("translations", "-")), str(c.get("walks", "-")), _fmt_rate(c.get("tlb_hit_rate")),
            str(c.get("commands", "-")), str(c.get("syncs", "-")), str(c.get("events", "-")),
            str(c.get("gerrors", "-")),
            *(f"{r.blk[bs]['mbps']:.1f}" if bs in r.blk else "-" for bs in sizes),
            f"{r.duration:.0f}s", r.reason[:70],
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows]
    passed = sum(r.ok for r in results)
    out.append(f"{passed}/{len(results)} passed" + (f", {len(results) - passed} FAILED" if passed != len(results) else ""))
    checks = format_check_table(results, axes)
    return "\n".join(out) + (f"\n\nguest checks per run:\n{checks}" if checks else "")


def format_check_table(results: Sequence[RunResult], axes: Sequence[str]) -> str:
    """One column per guest check (PASS, FAIL, - when the run did not report it), then the
    first failed step of each failed check; empty when no run reported checks."""
    names = list(dict.fromkeys(n for r in results for n in r.guest_checks))
    if not names:
        return ""
    head = ["#", *axes, *names]
    rows = [[str(r.index), *(r.choice.get(a, "") for a in axes),
             *(r.guest_checks.get(n, "-").split(":")[0] for n in names)] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows]
    out += [f"#{r.index} {n}: {v}" for r in results for n, v in r.guest_checks.items() if v != "PASS"]
    return "\n".join(out)


def results_json(matrix: Matrix, results: Sequence[RunResult]) -> dict[str, Any]:
    return {
        "matrix": matrix.name, "source": matrix.source, "base": matrix.base_source,
        "axes": {a.name: [v.name for v in a.values] for a in matrix.axes},
        "passed": sum(r.ok for r in results), "failed": sum(not r.ok for r in results),
        "runs": [dataclasses.asdict(r) | {"status": r.status} for r in results],
    }


def junit_xml(matrix: Matrix, results: Sequence[RunResult]) -> str:
    """JUnit XML: one testsuite (the matrix), one testcase per run."""
    suite = ET.Element("testsuite", name=f"viommu-matrix.{matrix.name}", tests=str(len(results)),
                       failures=str(sum(not r.ok for r in results)), errors="0", skipped="0",
                       time=f"{sum(r.duration for r in results):.3f}")
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="matrix", value=matrix.source)
    ET.SubElement(props, "property", name="base", value=matrix.base_source)
    for r in results:
        tc = ET.SubElement(suite, "testcase", classname=f"viommu-matrix.{matrix.name}", name=r.name,
                           time=f"{r.duration:.3f}")
        if not r.ok:
            fail = ET.SubElement(tc, "failure", message=r.reason or "failed", type="BootFailure")
            fail.text = r.error or r.reason
        out = ET.SubElement(tc, "system-out")
        out.text = r.log + (f"\nworkdir: {r.workdir}" if r.workdir else "")
    ET.indent(suite)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"


def write_results(matrix: Matrix, results: Sequence[RunResult], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    j, x = out / "results.json", out / "junit.xml"
    j.write_text(json.dumps(results_json(matrix, results), indent=2, default=str) + "\n")
    x.write_text(junit_xml(matrix, results))
    return j, x


def format_run_list(matrix: Matrix, runs: Sequence[Run]) -> str:
    lines = [f"matrix {matrix.name}: {len(runs)} run(s) from {matrix.source} (base {matrix.base_source}), "
             f"timeout {matrix.timeout:.0f} s each"]
    for r in runs:
        sets = " ".join(f"{k}={json.dumps(v)}" for k, v in r.overrides.items())
        exp = f"  expect {json.dumps(r.expect)}" if r.expect else ""
        lines.append(f"  [{r.index}] {r.name}: kernel {r.config.kernel.describe()}, "
                     f"workload {r.config.guest.workload}; {sets or '(base)'}{exp}")
    return "\n".join(lines)
