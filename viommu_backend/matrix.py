"""Configuration matrix runner for driver regression runs (``viommu-backend matrix``).

A matrix file (TOML) names a base config and a set of axes; every combination of one value
per axis is a run: the base config with the values' overrides applied, booted with
:func:`viommu_backend.guest.boot.run_boot`, one after the other::

    [matrix]
    name = "smoke"
    base = "default.toml"        # path relative to this file; omitted: the embedded default
    timeout = 240                 # seconds per run (set-up of guest images excluded)
    set = { "guest.cmdline" = "viommu.blk_bytes=1048576" }   # applied to every run
    exclude = [ { stages = "s2-only", flush = "lazy" } ]      # combinations not to run

    [[axis]]
    name = "stages"
    values = [
      { name = "s1+s2" },
      { name = "s2-only", set = { "function.viommu.options.s1p" = false } },
    ]

    [[axis]]
    name = "flush"
    values = [
      { name = "strict", expect = { domain_type = "DMA" } },
      { name = "lazy", set = { "guest.cmdline+" = "iommu.strict=0" },
        expect = { domain_type = "DMA-FQ" } },
    ]

    # in [matrix]:  exclude = [ { stages = "s2-only", flush = "lazy" } ]

Override keys are dotted paths into the config TOML: ``guest.cmdline``, ``kernel.suite``,
``function.<name>.options.<key>``, ``root_port.<name>.<key>`` (array-of-table entries are
addressed by their ``name``).  A key ending in ``+`` appends (words to a string, items to a
list) instead of replacing, so that several axes can add kernel command-line words.
Instead of ``base`` a matrix may carry the base config inline as a ``[base]`` table.

``expect`` (per axis value) checks what the guest saw: ``domain_type`` (the iommu group's
default domain type of the block device: DMA, DMA-FQ, identity), ``kmsg`` (regexes each of
which must match a kernel log line), ``kernel`` (a regex on the guest kernel version).

Every combination is expanded and validated (overrides, config, SMMU options) before the
first boot; errors name the axis and value.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import json
import math
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from xml.etree import ElementTree as ET

from viommu_backend.config import Config, ConfigError, default_config_text, parse_config
from viommu_backend.guest.report import digest
from viommu_backend.kci.checks import checks_from_markers

Progress = Callable[[str], None]
NAMED_ARRAYS = ("function", "root_port")  # arrays of tables addressed by their `name`
EXPECT_KEYS = ("domain_type", "kmsg", "kernel")
DEFAULT_TIMEOUT = 300.0
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class MatrixError(ConfigError):
    """A matrix file is malformed or one of its combinations does not make a valid config."""


# --------------------------------------------------------------------------- model
@dataclass(frozen=True)
class AxisValue:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    expect: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Axis:
    name: str
    values: tuple[AxisValue, ...]

    def value(self, name: str) -> AxisValue:
        for v in self.values:
            if v.name == name:
                return v
        raise MatrixError(f"axis {self.name!r} has no value {name!r} "
                          f"(values: {', '.join(v.name for v in self.values)})")


@dataclass(frozen=True)
class Matrix:
    name: str
    base: dict[str, Any]  # the base config, as parsed TOML
    base_source: str
    axes: tuple[Axis, ...]
    common: dict[str, Any] = field(default_factory=dict)  # overrides for every run
    excludes: tuple[dict[str, str], ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    source: str = "<string>"

    def axis(self, name: str) -> Axis:
        for a in self.axes:
            if a.name == name:
                return a
        raise MatrixError(f"no axis {name!r} (axes: {', '.join(a.name for a in self.axes)})")


@dataclass(frozen=True)
class Run:
    index: int  # 1-based, in expansion order
    choice: dict[str, str]  # axis name -> value name
    config: Config
    expect: dict[str, Any]
    overrides: dict[str, Any]

    @property
    def name(self) -> str:
        return ",".join(f"{a}={v}" for a, v in self.choice.items()) or "base"

    @property
    def slug(self) -> str:
        return f"{self.index:02d}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(self.choice.values()) or "base")


# --------------------------------------------------------------------------- parsing
def _table(obj: object, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise MatrixError(f"{where}: expected a table, got {type(obj).__name__}")
    return obj


def _only_keys(d: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    bad = sorted(set(d) - set(allowed))
    if bad:
        raise MatrixError(f"{where}: unknown key(s) {', '.join(bad)} (known: {', '.join(allowed)})")


def _label(obj: object, where: str) -> str:
    if isinstance(obj, bool) or not isinstance(obj, (str, int, float)):
        raise MatrixError(f"{where}: needs a 'name' (a string)")
    text = str(obj)
    if not re.fullmatch(r"[A-Za-z0-9_.+-]{1,40}", text):
        raise MatrixError(f"{where}: name {text!r}: letters, digits, _ . + - (max 40)")
    return text


def _expect(obj: object, where: str) -> dict[str, Any]:
    d = _table(obj, where)
    _only_keys(d, EXPECT_KEYS, where)
    out: dict[str, Any] = {}
    if "domain_type" in d:
        if not isinstance(d["domain_type"], str):
            raise MatrixError(f"{where}.domain_type: expected a string")
        out["domain_type"] = d["domain_type"]
    for key in ("kmsg", "kernel"):
        if key not in d:
            continue
        pats = [d[key]] if isinstance(d[key], str) else d[key]
        if not isinstance(pats, list) or not all(isinstance(p, str) for p in pats):
            raise MatrixError(f"{where}.{key}: expected a regex or a list of regexes")
        for p in pats:
            try:
                re.compile(p)
            except re.error as e:
                raise MatrixError(f"{where}.{key}: bad regex {p!r}: {e}") from None
        out[key] = pats if key == "kmsg" else pats[0]
    return out


def parse_matrix(data: Mapping[str, Any], source: str = "<string>") -> Matrix:
    _only_keys(data, ("matrix", "axis", "exclude", "base"), source)
    m = _table(data.get("matrix", {}), f"{source}: [matrix]")
    _only_keys(m, ("name", "base", "timeout", "set", "exclude"), f"{source}: [matrix]")
    default_name = "matrix" if source.startswith("<") else Path(source).stem
    name = _label(m.get("name", default_name), f"{source}: [matrix].name")
    timeout = m.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise MatrixError(f"{source}: [matrix].timeout: expected a positive number of seconds")

    if "base" in m and "base" in data:
        raise MatrixError(f"{source}: give either [matrix].base (a path) or a [base] table, not both")
    if "base" in data:
        base = copy.deepcopy(_table(data["base"], f"{source}: [base]"))
        base_source = f"{source} [base]"
        base_dir = Path(source).parent if Path(source).is_file() else Path.cwd()
    elif "base" in m:
        if not isinstance(m["base"], str):
            raise MatrixError(f"{source}: [matrix].base: expected a path")
        p = Path(m["base"])
        if not p.is_absolute() and Path(source).is_file():
            p = Path(source).parent / p
        try:
            base = tomllib.loads(p.read_text())
        except OSError as e:
            raise MatrixError(f"{source}: [matrix].base: cannot read {p}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise MatrixError(f"{source}: [matrix].base: {p}: invalid TOML: {e}") from None
        base_source, base_dir = str(p), p.parent
    else:
        base, base_source, base_dir = tomllib.loads(default_config_text()), "<default>", Path.cwd()
    _absolute_kernel_paths(base, base_dir)

    common = _overrides(m.get("set", {}), f"{source}: [matrix].set")

    raw_axes = data.get("axis", [])
    if not isinstance(raw_axes, list):
        raise MatrixError(f"{source}: 'axis' must be an array of tables ([[axis]])")
    axes: list[Axis] = []
    for n, raw in enumerate(raw_axes):
        where = f"{source}: [[axis]] #{n + 1}"
        a = _table(raw, where)
        if "exclude" in a:
            raise MatrixError(f"{where}: 'exclude' belongs in [matrix] (a key written after [[axis]] "
                              "belongs to that axis)")
        _only_keys(a, ("name", "values"), where)
        aname = _label(a.get("name"), where)
        where = f"{source}: axis {aname!r}"
        if any(x.name == aname for x in axes):
            raise MatrixError(f"{where}: defined twice")
        vals = a.get("values")
        if not isinstance(vals, list) or not vals:
            raise MatrixError(f"{where}: 'values' must be a non-empty list of tables")
        values: list[AxisValue] = []
        for k, rv in enumerate(vals):
            vw = f"{where} value #{k + 1}"
            v = _table(rv, vw)
            _only_keys(v, ("name", "set", "expect"), vw)
            vname = _label(v.get("name"), vw)
            vw = f"{where} value {vname!r}"
            if any(x.name == vname for x in values):
                raise MatrixError(f"{vw}: defined twice")
            values.append(AxisValue(vname, _overrides(v.get("set", {}), vw + ".set"),
                                    _expect(v.get("expect", {}), vw + ".expect")))
        axes.append(Axis(aname, tuple(values)))

    if "exclude" in data and "exclude" in m:
        raise MatrixError(f"{source}: give 'exclude' once, in [matrix]")
    raw_ex = m.get("exclude", data.get("exclude", []))
    if not isinstance(raw_ex, list):
        raise MatrixError(f"{source}: 'exclude' must be a list of tables {{axis = value, ...}}")
    matrix = Matrix(name, base, base_source, tuple(axes), common, (), float(timeout), source)
    excludes = []
    for n, rx in enumerate(raw_ex):
        ex = _table(rx, f"{source}: exclude #{n + 1}")
        if not ex:
            raise MatrixError(f"{source}: exclude #{n + 1} is empty (it would exclude every run)")
        for aname, vname in ex.items():
            try:
                matrix.axis(aname).value(str(vname))
            except MatrixError as e:
                raise MatrixError(f"{source}: exclude #{n + 1}: {e}") from None
        excludes.append({k: str(v) for k, v in ex.items()})
    return dataclasses.replace(matrix, excludes=tuple(excludes))


def _overrides(obj: object, where: str) -> dict[str, Any]:
    d = _table(obj, where)
    for key in d:
        parts = key.rstrip("+").split(".")
        if not all(_KEY_RE.match(p) for p in parts) or key.count("+") > 1:
            raise MatrixError(f"{where}: bad override key {key!r} (dotted config path, e.g. guest.cmdline)")
    return dict(d)


def _absolute_kernel_paths(base: dict[str, Any], base_dir: Path) -> None:
    kernel = base.get("kernel")
    if isinstance(kernel, dict):
        for key in ("image", "modules", "source"):
            if isinstance(kernel.get(key), str):
                kernel[key] = str((base_dir / kernel[key]).resolve())
        if isinstance(kernel.get("fragments"), list):
            kernel["fragments"] = [str((base_dir / f).resolve()) if isinstance(f, str) else f
                                   for f in kernel["fragments"]]


def loads_matrix(text: str, source: str = "<string>") -> Matrix:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MatrixError(f"{source}: invalid TOML: {e}") from None
    return parse_matrix(data, source)


def load_matrix(path: str | Path) -> Matrix:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise MatrixError(f"{path}: cannot read matrix: {e.strerror or e}") from None
    return loads_matrix(text, str(path))


# --------------------------------------------------------------------------- overrides
def apply_override(doc: dict[str, Any], key: str, value: Any) -> None:
    """Set (or, for ``key+``, append to) the dotted ``key`` of the config document ``doc``."""
    append = key.endswith("+")
    parts = key.rstrip("+").split(".")
    node: Any = doc
    walked: list[str] = []
    i = 0
    while i < len(parts) - 1:
        part = parts[i]
        walked.append(part)
        if not isinstance(node, dict):
            raise MatrixError(f"{key}: {'.'.join(walked[:-1])} is not a table")
        if node is doc and part in NAMED_ARRAYS:
            items = node.get(part, [])
            name = parts[i + 1]
            found = [t for t in items if isinstance(t, dict) and t.get("name") == name]
            if not found:
                known = [str(t.get("name")) for t in items if isinstance(t, dict)]
                raise MatrixError(f"{key}: no [[{part}]] named {name!r} in the base config "
                                  f"(have: {', '.join(known) or 'none'})")
            node = found[0]
            walked.append(name)
            i += 2
            continue
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise MatrixError(f"{key}: {'.'.join(walked)} is a value, not a table")
        node = nxt
        i += 1
    if i != len(parts) - 1 or not isinstance(node, dict):
        raise MatrixError(f"{key}: names a whole [[{parts[0]}]] entry; give a key inside it")
    leaf = parts[-1]
    if not append or leaf not in node:
        node[leaf] = list(value) if append and isinstance(value, list) else value
        return
    old = node[leaf]
    if isinstance(old, str) and isinstance(value, str):
        node[leaf] = f"{old} {value}".strip()
    elif isinstance(old, list):
        node[leaf] = old + (value if isinstance(value, list) else [value])
    else:
        raise MatrixError(f"{key}: can only append to a string or a list, "
                          f"{'.'.join(parts)} is {type(old).__name__}")


def _excluded(matrix: Matrix, choice: Mapping[str, str]) -> bool:
    return any(all(choice.get(a) == v for a, v in ex.items()) for ex in matrix.excludes)


def parse_only(filters: Sequence[str], matrix: Matrix) -> dict[str, set[str]]:
    """``NAME=VALUE`` strings -> {axis: {values}} (same axis: any of; axes: all of)."""
    out: dict[str, set[str]] = {}
    for f in filters:
        aname, sep, vname = f.partition("=")
        if not sep:
            raise MatrixError(f"--only {f!r}: expected AXIS=VALUE")
        axis = matrix.axis(aname.strip())
        for v in vname.split(","):
            axis.value(v.strip())
            out.setdefault(axis.name, set()).add(v.strip())
    return out


def expand(matrix: Matrix, only: Mapping[str, set[str]] | None = None) -> list[Run]:
    """Every non-excluded combination as a validated :class:`Run`; raises :class:`MatrixError`
    naming the axis values of the first combination that does not make a valid config."""
    runs: list[Run] = []
    combos = itertools.product(*(a.values for a in matrix.axes)) if matrix.axes else [()]
    for combo in combos:
        choice = {a.name: v.name for a, v in zip(matrix.axes, combo)}
        if _excluded(matrix, choice):
            continue
        if only and not all(choice.get(a) in vs for a, vs in only.items()):
            continue
        runs.append(_make_run(matrix, len(runs) + 1, choice, combo))
    return runs


def _make_run(matrix: Matrix, index: int, choice: dict[str, str], combo: Sequence[AxisValue]) -> Run:
    label = ", ".join(f"axis {a!r} = {v!r}" for a, v in choice.items()) or "base"
    doc = copy.deepcopy(matrix.base)
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    expect: dict[str, Any] = {}
    layers: list[tuple[str, dict[str, Any]]] = [("[matrix].set", matrix.common)]
    layers += [(f"axis {a!r} value {v.name!r}", v.overrides) for a, v in zip(choice, combo)]
    for who, overrides in layers:
        for key, value in overrides.items():
            if not key.endswith("+") and key in owner and owner[key] != "[matrix].set":
                raise MatrixError(f"{matrix.source}: {who} and {owner[key]} both set {key!r}; "
                                  f"exclude the combination or append with {key + '+'!r}")
            try:
                apply_override(doc, key, value)
            except MatrixError as e:
                raise MatrixError(f"{matrix.source}: {who}: {e}") from None
            owner[key] = who
            merged[key] = value
    for v in combo:
        for k, x in v.expect.items():
            expect[k] = expect.get(k, []) + x if k == "kmsg" else x
    source = f"<matrix {matrix.name} run {index}>"
    try:
        text = dumps_toml(doc)
        cfg = dataclasses.replace(parse_config(tomllib.loads(text), source), text=text)
    except (ConfigError, ValueError, TypeError) as e:
        raise MatrixError(f"{matrix.source}: {label}: {e}") from None
    return Run(index, choice, cfg, expect, merged)


# --------------------------------------------------------------------------- TOML out
def _toml_key(k: str) -> str:
    return k if _KEY_RE.match(k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise MatrixError(f"cannot write {type(v).__name__} {v!r} as TOML")


def dumps_toml(doc: Mapping[str, Any]) -> str:
    """A config document back to TOML text (tables, arrays of tables, scalars, lists)."""
    lines: list[str] = []

    def is_aot(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    def emit(prefix: str, table: Mapping[str, Any]) -> None:
        for k, v in table.items():
            if not isinstance(v, dict) and not is_aot(v):
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in table.items():
            path = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
            if isinstance(v, dict):
                lines.extend(["", f"[{path}]"])
                emit(path, v)
            elif is_aot(v):
                for item in v:
                    lines.extend(["", f"[[{path}]]"])
                    emit(path, item)

    emit("", doc)
    return "\n".join(lines).lstrip("\n") + "\n"


# --------------------------------------------------------------------------- results
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


# --------------------------------------------------------------------------- running
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
