"""A matrix file: axes, excludes, overrides, and its expansion into validated runs.

:func:`load_matrix` / :func:`loads_matrix` / :func:`parse_matrix` read a matrix (the
format is in :mod:`viommu_backend.matrix`); :func:`expand` makes every combination that is
not excluded (and passes ``--only``, :func:`parse_only`) a :class:`Run`: the base config
with the values' overrides applied (:func:`apply_override`), written back to TOML and
parsed as a :class:`~viommu_backend.config.Config`, so that a run that expands is one the
backend accepts.  Errors are :class:`MatrixError` naming the axis and value.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from viommu_backend.config import Config, ConfigError, default_config_text, parse_config, parse_toml, read_file
from viommu_backend.matrix.tomlout import KEY_RE, dumps_toml

NAMED_ARRAYS = ("function", "root_port")  # arrays of tables addressed by their `name`
EXPECT_KEYS = ("domain_type", "kmsg", "kernel")
DEFAULT_TIMEOUT = 300.0


class MatrixError(ConfigError):
    """A matrix file is malformed or one of its combinations does not make a valid config."""


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
    base, base_source = _base(data, m, source)
    common = _overrides(m.get("set", {}), f"{source}: [matrix].set")
    matrix = Matrix(name, base, base_source, _axes(data.get("axis", []), source), common, (),
                    float(timeout), source)
    if "exclude" in data and "exclude" in m:
        raise MatrixError(f"{source}: give 'exclude' once, in [matrix]")
    return dataclasses.replace(matrix, excludes=_excludes(m.get("exclude", data.get("exclude", [])), matrix))


def _base(data: Mapping[str, Any], m: Mapping[str, Any], source: str) -> tuple[dict[str, Any], str]:
    """The base config document (a ``[base]`` table, the file ``[matrix].base`` names, or
    the embedded default) and where it came from; kernel paths made absolute."""
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
    return base, base_source


def _axes(raw_axes: object, source: str) -> tuple[Axis, ...]:
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
        axes.append(Axis(aname, _axis_values(a.get("values"), where)))
    return tuple(axes)


def _axis_values(vals: object, where: str) -> tuple[AxisValue, ...]:
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
    return tuple(values)


def _excludes(raw_ex: object, matrix: Matrix) -> tuple[dict[str, str], ...]:
    source = matrix.source
    if not isinstance(raw_ex, list):
        raise MatrixError(f"{source}: 'exclude' must be a list of tables {{axis = value, ...}}")
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
    return tuple(excludes)


def _overrides(obj: object, where: str) -> dict[str, Any]:
    d = _table(obj, where)
    for key in d:
        parts = key.rstrip("+").split(".")
        if not all(KEY_RE.match(p) for p in parts) or key.count("+") > 1:
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
    return parse_matrix(parse_toml(text, source, MatrixError), source)


def load_matrix(path: str | Path) -> Matrix:
    return loads_matrix(read_file(path, "matrix", MatrixError), str(path))


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
