"""The checks of one run, from the guest's markers: what KCIDB tests, LAVA test cases and
the HTML report are made of.

Each guest workload (``workload {"name": W}`` marker, then that workload's own markers) is a
test-suite ``viommu.W`` with one check per thing it showed:

    viommu.W.completed          the workload ran and reported no error (``error`` markers)
    viommu.enumerate.devices    PCI functions seen
    viommu.smmu.probe           the stock arm-smmu-v3 driver bound the SMMU (one per SMMU)
    viommu.hotplug.added        the hot-plugged endpoint appeared
    viommu.blk.iommu-group      the disk's PCI function is behind the IOMMU (its domain type)
    viommu.blk.bs-N             O_DIRECT write + read back at block size N, data verified
    viommu.unplug.removed       the endpoint and its disk are gone after device_del
    viommu.io.io-N              the Nth ``io`` step: written / read back / verified
    viommu.W.NAME               a guest test program's result line: any other marker NAME
                                with a boolean ``ok`` (e.g. ``sva``, ``iommufd-replace``;
                                what ``BootSummary.checks()`` lists)
    viommu.W.PROGRAM            a kernel selftest program (workload ``vfio-selftests``): ran
                                to completion with consistent KTAP, or skipped itself
    viommu.W.TEST               each of its KTAP results (``fixture.variant.test``): PASS,
                                FAIL, or SKIP with the test's reason and its cause here

plus the host's view of the run: ``viommu.boot.init`` (the kernel reached init) and
``viommu.boot.verdict`` (the whole run: QEMU, server, kernel messages, expectations).
Workloads asked for on the command line that never started are ``MISS``.

Statuses are KCIDB's: PASS, FAIL, MISS (did not run), SKIP (a selftest skipped itself).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from viommu_backend.guest.ktap import parse_ktap
from viommu_backend.guest.report import CHECKLESS_MARKERS, blk_rates
from viommu_backend.guest.vfio_selftests import skip_cause

PASS, FAIL, MISS, SKIP = "PASS", "FAIL", "MISS", "SKIP"
KTAP_STATUS = {"pass": PASS, "xfail": PASS, "skip": SKIP, "fail": FAIL, "error": FAIL, "xpass": FAIL}
ROOT = "viommu"
_NAME_RE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Check:
    workload: str
    name: str
    status: str
    detail: str = ""
    value: float | None = None  # a measurement (KCIDB test "number")
    unit: str = ""
    t: float | None = None  # seconds since the run's first marker, when the guest reported it

    @property
    def path(self) -> str:
        return f"{ROOT}.{self.workload}.{self.name}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"path": self.path}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Check:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def component(text: str) -> str:
    """A KCIDB path component (letters, digits, _ and -)."""
    return _NAME_RE.sub("_", str(text)).strip("_") or "unnamed"


def _ok(flag: object) -> str:
    return PASS if flag is True else FAIL


def _enumerate(d: Mapping[str, Any]) -> list[Check]:
    n = int(d.get("count", 0))
    return [Check("enumerate", "devices", _ok(n > 0), f"{n} PCI function(s)", n, "functions")]


def _smmu(d: Mapping[str, Any]) -> list[Check]:
    return [Check("smmu", "probe", _ok(d.get("probed")),
                  f"{d.get('node')} at {d.get('bdf') or '?'}: {'bound' if d.get('probed') else 'not bound'}")]


def _hotplug(d: Mapping[str, Any]) -> list[Check]:
    return [Check("hotplug", "added", PASS, f"{d.get('devices')} PCI function(s) after hot-plug")]


def _blk_dev(d: Mapping[str, Any]) -> list[Check]:
    grp = d.get("iommu_group") or ""
    return [Check("blk", "iommu-group", _ok(bool(grp)),
                  f"/dev/{d.get('dev')} at {d.get('bdf')}: iommu group {grp or 'none'}, "
                  f"domain {d.get('domain_type') or '-'}")]


def _blk_io(d: Mapping[str, Any]) -> list[Check]:
    mbps = blk_rates(d)["mbps"]
    return [Check("blk", f"bs-{int(d['bs'])}", _ok(d.get("match")),
                  f"{d.get('bytes')} bytes O_DIRECT write {d.get('write_ms')} ms, read {d.get('read_ms')} ms, "
                  f"data {'verified' if d.get('match') else 'MISMATCH'}", round(mbps, 3), "MB/s")]


def _unplug(d: Mapping[str, Any]) -> list[Check]:
    return [Check("unplug", "removed", _ok(d.get("blk_gone", True) is True),
                  f"{d.get('bdf')} gone in {d.get('ms')} ms", float(d.get("ms", 0)) / 1e3, "s")]


def _io(d: Mapping[str, Any]) -> list[Check]:
    op = d.get("op")
    ok = bool(d.get("write_ok")) if op == "write" else \
        bool(d.get("read_ok")) and bool(d.get("match")) and (op == "read" or bool(d.get("write_ok")))
    return [Check("io", "io", _ok(ok), f"{d.get('bytes')} bytes {d.get('op') or 'write+read'} on "
                                      f"/dev/{d.get('dev')}" + (f": {d['error']}" if d.get("error") else ""))]


def _skip_detail(reason: str) -> str:
    cause = skip_cause(reason)
    return reason + (f" ({cause})" if cause else "")


def _selftest(workload: str, d: Mapping[str, Any], lines: list[str]) -> list[Check]:
    """A selftest program (``vfio-selftest`` marker, after its ``ktap`` lines): one check
    for the program, one per KTAP result."""
    run, rc = parse_ktap(lines), d.get("rc")
    c = run.counts()
    if run.skipped is not None:
        status, detail = SKIP, _skip_detail(run.skipped)
    else:
        problems = run.problems() + ([f"exit code {rc}"] if rc != 0 else [])
        status = FAIL if problems or c["fail"] or c["error"] else PASS
        detail = ", ".join(f"{k} {v}" for k, v in c.items() if v) + "".join(f"; {p}" for p in problems)
    program = Check(workload, component(d.get("test", "selftest")), status, detail)
    return [program] + [Check(workload, component(r.name), KTAP_STATUS[r.status],
                              _skip_detail(r.reason) if r.status == "skip" else r.reason)
                        for r in run.results]


MARKER_CHECKS: dict[str, Callable[[Mapping[str, Any]], list[Check]]] = {
    "enumerate": _enumerate, "smmu": _smmu, "hotplug": _hotplug, "blk-dev": _blk_dev,
    "blk-io": _blk_io, "unplug": _unplug, "io": _io,
}


def _program_detail(data: Mapping[str, Any]) -> str:
    """A program check's error, else its other fields (shortened)."""
    if data.get("error"):
        return str(data["error"])[:500]
    rest = {k: v for k, v in data.items() if k != "ok"}
    return json.dumps(rest, separators=(",", ":"))[:300] if rest else ""


def _numbered(checks: list[Check]) -> list[Check]:
    """Make names unique within a workload: a second ``probe`` becomes ``probe-2``."""
    seen: dict[tuple[str, str], int] = {}
    out = []
    for c in checks:
        key = (c.workload, c.name)
        seen[key] = seen.get(key, 0) + 1
        out.append(c if seen[key] == 1 else _renamed(c, f"{c.name}-{seen[key]}"))
    return out


def _renamed(c: Check, name: str, t: float | None = None) -> Check:
    return Check(c.workload, name, c.status, c.detail, c.value, c.unit, c.t if t is None else t)


def requested_workloads(markers: Iterable[Any]) -> list[str]:
    """The workloads on the guest's command line (``viommu.workload=a,b``), from ``boot``."""
    for m in markers:
        if m.name == "boot" and isinstance(m.data, dict):
            found = re.search(r"\bviommu\.workload=(\S+)", str(m.data.get("cmdline", "")))
            if found:
                return [w.split(":")[0] for w in found.group(1).split(",") if w]
    return []


def checks_from_markers(markers: Sequence[Any], *, ok: bool, reason: str = "") -> list[Check]:
    """Every check of a run (see the module docstring), in the order the guest made them."""
    checks: list[Check] = []
    ktap: dict[str, list[str]] = {}  # selftest program -> its output so far
    errors: dict[str, list[str]] = {}
    started: list[str] = []
    current = ""
    booted = None
    t0 = markers[0].time if markers else 0.0
    for m in markers:
        data = m.data if isinstance(m.data, dict) else {}
        if m.name == "boot":
            booted = m
        elif m.name == "workload":
            current = component(data.get("name", "unnamed"))
            started.append(current)
        elif m.name == "error":
            errors.setdefault(component(data.get("workload") or current or "boot"), []).append(
                str(data.get("msg", "")))
        elif m.name == "ktap":
            ktap.setdefault(str(data.get("test")), []).append(str(data.get("line", "")))
        elif m.name == "vfio-selftest":
            checks += [_renamed(c, c.name, _t(m, t0))
                       for c in _selftest(current or "guest", data, ktap.pop(str(data.get("test")), []))]
        elif m.name in MARKER_CHECKS:
            checks += [_renamed(c, c.name, _t(m, t0)) for c in MARKER_CHECKS[m.name](data)]
        elif m.name not in CHECKLESS_MARKERS and isinstance(data.get("ok"), bool):
            checks.append(Check(current or "guest", component(m.name), _ok(data["ok"]),
                                _program_detail(data), t=_t(m, t0)))
    for w in dict.fromkeys(started):
        msgs = errors.get(w, [])
        checks.append(Check(w, "completed", FAIL if msgs else PASS, "; ".join(msgs)[:2000]))
    for w in requested_workloads(markers):
        if component(w) not in started:
            checks.append(Check(component(w), "completed", MISS, "the guest never started it"))
    head = [Check("boot", "init", PASS if booted else FAIL,
                  f"kernel {booted.data.get('kernel')}" if booted else "the guest kernel never reached init",
                  t=_t(booted, t0) if booted else None)]
    head.append(Check("boot", "verdict", PASS if ok else FAIL, reason))
    return head + _numbered(checks)


def _t(marker: Any, t0: float) -> float | None:
    t = getattr(marker, "time", None)
    return round(t - t0, 3) if isinstance(t, (int, float)) else None


def suites(checks: Iterable[Check]) -> dict[str, list[Check]]:
    """Checks grouped by workload, in first-seen order."""
    out: dict[str, list[Check]] = {}
    for c in checks:
        out.setdefault(c.workload, []).append(c)
    return out
