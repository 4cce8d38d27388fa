"""Batched walker == scalar fast path == oracle on random tables and random addresses."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from viommu_backend.smmuv3 import builders as b
from tests.support.walker_env import (BASE, S1_IA, S2_IA, compare, memory, s1_config, s1_table, s2_config,
                        s2_table)

_settings = settings(max_examples=25, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


def _random_tree(pt, rng, n):
    """Random mix of valid/invalid pages, blocks, AF/permission bits and garbage entries."""
    g = 1 << pt.gs
    span = 1 << pt.ia_bits
    vas = []
    for _ in range(n):
        va = int(rng.integers(0, span // g)) * g
        kind = int(rng.integers(0, 6))
        pa = BASE + int(rng.integers(0, 1 << 20)) * g
        if kind == 0 and pt.start_level <= 2 and not pt.stage2 or kind == 0:
            lvl = 2 if (pt.gs == 12 or pt.start_level <= 2) and pt.start_level <= 2 else 3
        else:
            lvl = 3
        attrs = {"af": bool(rng.integers(0, 4))}
        if pt.stage2:
            attrs.update(read=bool(rng.integers(0, 3)), write=bool(rng.integers(0, 2)),
                         xn=bool(rng.integers(0, 2)))
        else:
            attrs.update(read_only=bool(rng.integers(0, 2)), el0=bool(rng.integers(0, 4)),
                         uxn=bool(rng.integers(0, 2)), pxn=bool(rng.integers(0, 2)),
                         ng=bool(rng.integers(0, 2)))
        if kind == 5:  # garbage descriptor, maybe pointing outside memory
            pt.set_desc(va, lvl, int(rng.integers(0, 2**63)) | 1)
        elif kind == 4:
            pt.set_desc(va, lvl, 0)
        else:
            pt.map(va & ~((1 << pt.shift(lvl)) - 1), pa & ~((1 << pt.shift(lvl)) - 1),
                   1 << pt.shift(lvl), **attrs)
        vas.append(va + int(rng.integers(0, g)))
    extra = rng.integers(0, span, size=n, dtype=np.uint64)
    return np.concatenate([np.array(vas, np.uint64), extra, extra | np.uint64(span)])


@_settings
@given(seed=st.integers(0, 2**32 - 1), key=st.sampled_from(sorted(S1_IA)),
       write=st.booleans(), priv=st.booleans(), instr=st.booleans(),
       ips=st.sampled_from([32, 40, 48]))
def test_s1_random(seed, key, write, priv, instr, ips):
    rng = np.random.default_rng(seed)
    mem, al = memory()
    gs, sl = key
    pt = b.PageTable(mem, al, granule_shift=gs, ia_bits=S1_IA[key])
    vas = _random_tree(pt, rng, 24)
    compare(mem, s1_config(pt, ips_bits=ips, HA=int(rng.integers(0, 2)),
                           WXN=int(rng.integers(0, 2))),
            None, vas, write=write, priv=priv, instr=instr and not write)


@_settings
@given(seed=st.integers(0, 2**32 - 1), key=st.sampled_from(sorted(S2_IA)),
       write=st.booleans(), ps=st.sampled_from([40, 48]))
def test_s2_random(seed, key, write, ps):
    rng = np.random.default_rng(seed)
    mem, al = memory()
    gs, sl = key
    pt = b.PageTable(mem, al, granule_shift=gs, ia_bits=S2_IA[key], start_level=sl,
                     stage2=True)
    vas = _random_tree(pt, rng, 24)
    compare(mem, None, s2_config(pt, ps_bits=ps), vas, write=write)


@_settings
@given(seed=st.integers(0, 2**32 - 1), gs=st.sampled_from([12, 14, 16]), write=st.booleans())
def test_nested_random(seed, gs, write):
    """Random S2 (some holes/faults) under a random S1 whose tables sit in IPA == PA space."""
    rng = np.random.default_rng(seed)
    mem, al = memory()
    s2pt = s2_table(mem, al, gs)
    # identity-map the table arena at S2 (with a few pages faulting) so S1 walks can proceed
    g = 1 << gs
    s1pt = s1_table(mem, al, gs)
    vas = _random_tree(s1pt, rng, 16)
    for page in range(BASE, al.next + g, g):
        k = int(rng.integers(0, 12))
        s2pt.map(page, page, g, af=k != 0, read=k != 1)
    for _ in range(16):  # S1 outputs land here
        ipa = BASE + int(rng.integers(0, 1 << 20)) * g
        s2pt.map(ipa, ipa, g, write=bool(rng.integers(0, 2)))
    compare(mem, s1_config(s1pt), s2_config(s2pt), vas, write=write)
