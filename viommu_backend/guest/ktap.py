"""KTAP (the kernel's TAP dialect, what kselftest programs print) into per-test results.

    run = parse_ktap(lines)
    run.results        # KtapResult(number, name, status, reason, output) per test line
    run.counts()       # {"pass": n, "fail": n, "skip": n, "xfail": n, "xpass": n, "error": n}
    run.problems()     # what does not add up: plan vs results, the "# Totals:" line
    run.skipped        # "1..0 # SKIP why": the program found nothing to test

A result line is ``ok N NAME`` or ``not ok N NAME``, optionally followed by ``# DIRECTIVE
text``: ``SKIP`` / ``XFAIL`` / ``XPASS`` (on ``ok``) and ``error`` (on ``not ok``); any
other text after ``#`` is a diagnostic (kselftest_harness prints ``#  reason`` for a
failed test).  The lines since the previous result (the harness's ``#  RUN`` / ``#  OK``
lines and whatever the test printed) are kept as that test's output.  Only top-level
results count: indented lines (nested subtests) are output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

STATUSES = ("pass", "fail", "skip", "xfail", "xpass", "error")
_RESULT = re.compile(r"^(not ok|ok) (\d+)(?: (.*))?$")
_PLAN = re.compile(r"^1\.\.(\d+)(?:\s*#\s*[Ss][Kk][Ii][Pp]\b\s*(.*))?")
_TOTALS = re.compile(r"^# Totals: (.*)$")
_DIRECTIVES = {"ok": {"skip": "skip", "xfail": "xfail", "xpass": "xpass", "todo": "xfail"},
               "not ok": {"error": "error", "skip": "skip"}}


@dataclass(frozen=True)
class KtapResult:
    number: int
    name: str
    status: str  # one of STATUSES
    reason: str = ""  # the directive's or diagnostic's text (why it was skipped, ...)
    output: tuple[str, ...] = ()  # the lines printed since the previous result


@dataclass(frozen=True)
class KtapRun:
    version: str | None = None  # "TAP version 13" / "KTAP version 1"
    plan: int | None = None
    results: tuple[KtapResult, ...] = ()
    totals: dict[str, int] | None = None  # the "# Totals:" line, as printed
    trailing: tuple[str, ...] = field(default=())  # lines after the last result
    skipped: str | None = None  # "1..0 # SKIP reason": the whole program skipped, why

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for r in self.results:
            out[r.status] += 1
        return out

    def by_status(self, status: str) -> list[KtapResult]:
        return [r for r in self.results if r.status == status]

    def problems(self) -> list[str]:
        """Why the output is not a complete, consistent KTAP run (empty: it is)."""
        out = []
        if self.version is None and self.skipped is None:  # ksft_exit_skip() prints no version
            out.append("no TAP/KTAP version line")
        if self.plan is None:
            out.append("no plan line (1..N)")
        elif self.plan != len(self.results):
            out.append(f"plan 1..{self.plan} but {len(self.results)} result(s)")
        numbers = [r.number for r in self.results]
        if numbers != list(range(1, len(numbers) + 1)):
            out.append(f"results not numbered 1..{len(numbers)}")
        if self.totals is not None:
            counts = self.counts()
            # kselftest counts XFAIL/XPASS/skip as printed; "skip" in Totals is every SKIP
            mismatch = {k: (v, counts.get(k, 0)) for k, v in self.totals.items()
                        if k in counts and v != counts[k]}
            if mismatch:
                out.append("# Totals disagree with the result lines: "
                           + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in mismatch.items()))
        return out


def parse_result(line: str) -> tuple[str, int, str, str] | None:
    """``(status, number, name, reason)`` of a top-level result line, else None."""
    m = _RESULT.match(line.rstrip())
    if not m:
        return None
    verdict, number, rest = m.group(1), int(m.group(2)), m.group(3) or ""
    name, _, directive = rest.partition(" #")
    status = "pass" if verdict == "ok" else "fail"
    reason = directive.strip()
    word = reason.split(" ", 1)[0].lower()
    if word in _DIRECTIVES[verdict]:
        status = _DIRECTIVES[verdict][word]
        reason = reason[len(word):].strip()
    return status, number, name.strip(), reason


def parse_totals(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", text)}


def parse_ktap(lines: Iterable[str]) -> KtapRun:
    version: str | None = None
    plan: int | None = None
    skipped: str | None = None
    totals: dict[str, int] | None = None
    results: list[KtapResult] = []
    pending: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if version is None and re.match(r"^(TAP|KTAP) version \S+", line):
            version = line
            continue
        if plan is None and (m := _PLAN.match(line)):
            plan, skipped = int(m.group(1)), m.group(2)
            continue
        if m := _TOTALS.match(line):
            totals = parse_totals(m.group(1))
            continue
        parsed = parse_result(line)
        if parsed is None:
            pending.append(line)
            continue
        status, number, name, reason = parsed
        results.append(KtapResult(number, name, status, reason, tuple(pending)))
        pending = []
    return KtapRun(version, plan, tuple(results), totals, tuple(pending), skipped)


def runs_from_lines(tagged: Iterable[tuple[str, str]]) -> dict[str, KtapRun]:
    """``(program, line)`` pairs (a guest passes each program's output on line by line)
    into one parsed run per program, in order of first appearance."""
    lines: dict[str, list[str]] = {}
    for program, line in tagged:
        lines.setdefault(program, []).append(line)
    return {program: parse_ktap(ls) for program, ls in lines.items()}
