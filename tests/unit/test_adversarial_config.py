"""Adversarial (property-based) tests of the TOML config and matrix loaders: the shipped
qemu_configs/*.toml with random damage (values replaced by random scalars / lists /
tables, keys dropped or added), and random TOML text, give a Config / Matrix or a
ConfigError / MatrixError with a message, never another exception type."""

from __future__ import annotations

import copy
import tomllib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from viommu_backend.config import ConfigError, loads_config, parse_config
from viommu_backend.matrix import MatrixError, expand, loads_matrix, parse_matrix
from tests.support import REPO

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

CONFIGS = {p.name: tomllib.loads(p.read_text()) for p in sorted((REPO / "qemu_configs").glob("*.toml"))}
MATRICES = {k: v for k, v in CONFIGS.items() if k.startswith("matrix")}
PLAIN = {k: v for k, v in CONFIGS.items() if not k.startswith("matrix")}
PLAIN["builtin-default.toml"] = tomllib.loads(
    (REPO / "viommu_backend" / "data" / "default.toml").read_text())

SCALAR = (st.none() | st.booleans() | st.integers(-2**65, 2**65) | st.floats(allow_nan=True)
          | st.text(max_size=10) | st.sampled_from(["1G", "0", "-1M", "4K", "99T", "x", "",
                                                    "smmuv3", "testdev", "virtio-blk", "rp0"]))
VALUE = st.recursive(SCALAR, lambda k: st.lists(k, max_size=3)
                     | st.dictionaries(st.text(max_size=6), k, max_size=3), max_leaves=8)

def _paths(doc, prefix=()):
    """Every (path) to a value in a nested dict/list document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))

@st.composite
def damaged(draw, docs: dict):
    name = draw(st.sampled_from(sorted(docs)))
    doc = copy.deepcopy(docs[name])
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(doc))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.integers(0, 2))
        if op == 0:
            parent[path[-1]] = draw(VALUE)
        elif op == 1:
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(VALUE)
        else:
            parent.append(draw(VALUE))
    return name, doc

def _ok_error(e: Exception) -> None:
    assert isinstance(e, ConfigError) and str(e), repr(e)

@SETTINGS
@given(case=damaged(PLAIN))
def test_damaged_config(case):
    name, doc = case
    try:
        parse_config(doc, name)
    except ConfigError as e:
        _ok_error(e)

@SETTINGS
@given(case=damaged(MATRICES))
def test_damaged_matrix(case):
    name, doc = case
    try:
        m = parse_matrix(doc, name)
        expand(m)
    except ConfigError as e:  # MatrixError is a ConfigError
        _ok_error(e)

TOMLISH = st.lists(st.one_of(
    st.sampled_from(["[machine]", "[[function]]", "[[root_port]]", "[iommu]", "[guest]",
                     "[[axis]]", "[base]", "[[axis.value]]", "[kernel]", "[[exclude]]"]),
    st.tuples(st.sampled_from(["name", "kind", "slot", "port", "memory", "cpus", "chassis",
                               "options", "values", "x"]),
              st.sampled_from(["1", '"a"', "true", "[1, 2]", "{a = 1}", '"1G"', "-5",
                               "1e400", '"rp0"', '"smmuv3"', "[", '"\\u0000"'])
              ).map(lambda kv: f"{kv[0]} = {kv[1]}"),
    st.text(max_size=20)), max_size=12).map("\n".join)

@SETTINGS
@given(text=TOMLISH)
def test_random_toml_text(text):
    for loader in (loads_config, loads_matrix):
        try:
            loader(text)
        except ConfigError as e:
            _ok_error(e)
    try:
        loads_matrix(text)
    except MatrixError as e:
        assert str(e)
    except ConfigError as e:
        _ok_error(e)
