"""Batched walker on dense address ranges: the per-prefix grouping, the per-table stage-2
translation (nested) and the uniform-descriptor shortcut must give exactly the scalar and
oracle results, faults included (walker_env.compare checks all three per address)."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3.fields import EventId, FaultClass
from tests.support.walker_env import (BASE, IPA_OFF, S1_IA, S2_IA, compare, memory, nested_s1_builder,
                        nested_s2, s1_config, s1_table, s2_config, s2_table)

FT, FP, FEA = int(EventId.F_TRANSLATION), int(EventId.F_PERMISSION), int(EventId.F_WALK_EABT)
_settings = settings(max_examples=20, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


def _dense_tree(pt, rng, window: int, va0: int, n_pages: int):
    """Pages, blocks, holes, garbage and odd attributes packed into ``[va0, va0+window)``."""
    g = 1 << pt.gs
    blk = 1 << pt.shift(2)
    late = []  # garbage table pointers go in last (the builder walks existing tables)
    for _ in range(n_pages):
        va = va0 + int(rng.integers(0, window // g)) * g
        kind = int(rng.integers(0, 10))
        attrs: dict = {"af": bool(rng.integers(0, 6))}
        if pt.stage2:
            attrs.update(read=bool(rng.integers(0, 4)), write=bool(rng.integers(0, 2)))
        else:
            attrs.update(read_only=bool(rng.integers(0, 3) == 0), el0=True,
                         ng=bool(rng.integers(0, 2)))
        pa = BASE + int(rng.integers(0, 1 << 16)) * g
        if kind == 0 and pt.start_level <= 2:  # block (or invalid block level)
            pt.map(va & ~(blk - 1), pa & ~(blk - 1), blk, **attrs)
        elif kind == 1:
            pt.set_desc(va, 3, 0)
        elif kind == 2:  # garbage leaf, maybe far outside memory / beyond OAS
            pt.set_desc(va, 3, int(rng.integers(0, 2**63)) | 1)
        elif kind == 3 and pt.start_level <= 2:  # garbage table pointer at level 2
            late.append((va, int(rng.integers(0, 2**48)) & ~(g - 1) | 3))
        else:
            pt.map(va, pa, g, **attrs)
    for va, desc in late:
        pt.set_desc(va, 2, desc)


def _dense_vas(rng, va0: int, window: int, n: int, ia_bits: int) -> np.ndarray:
    vas = va0 + rng.integers(0, window, n, dtype=np.uint64)
    dups = rng.choice(vas, n // 4)
    out = np.concatenate([vas, dups, [1 << ia_bits]]).astype(np.uint64)
    return rng.permutation(out)


@_settings
@given(seed=st.integers(0, 2**32 - 1), key=st.sampled_from(sorted(S1_IA)),
       write=st.booleans(), ips=st.sampled_from([32, 40, 48]))
def test_s1_dense(seed, key, write, ips):
    rng = np.random.default_rng(seed)
    mem, al = memory()
    gs, _ = key
    pt = b.PageTable(mem, al, granule_shift=gs, ia_bits=S1_IA[key])
    window = min(4 << pt.shift(2), 1 << pt.ia_bits)
    va0 = int(rng.integers(0, (1 << pt.ia_bits) // window)) * window
    _dense_tree(pt, rng, window, va0, 40)
    vas = _dense_vas(rng, va0, window, 240, pt.ia_bits)
    compare(mem, s1_config(pt, ips_bits=ips, HA=int(rng.integers(0, 2))), None, vas,
            write=write)


@_settings
@given(seed=st.integers(0, 2**32 - 1), key=st.sampled_from(sorted(S2_IA)),
       write=st.booleans(), ps=st.sampled_from([40, 48]))
def test_s2_dense(seed, key, write, ps):
    rng = np.random.default_rng(seed)
    mem, al = memory()
    gs, sl = key
    pt = b.PageTable(mem, al, granule_shift=gs, ia_bits=S2_IA[key], start_level=sl,
                     stage2=True)
    window = min(4 << pt.shift(2), 1 << pt.ia_bits)
    va0 = int(rng.integers(0, (1 << pt.ia_bits) // window)) * window
    _dense_tree(pt, rng, window, va0, 40)
    vas = _dense_vas(rng, va0, window, 240, pt.ia_bits)
    r = compare(mem, None, s2_config(pt, ps_bits=ps), vas, write=write)
    bad = r.fault != 0
    assert (r.ipa[bad] == vas[bad]).all()  # S2 faults report each element's own IPA


@_settings
@given(seed=st.integers(0, 2**32 - 1), gs=st.sampled_from([12, 14, 16]), write=st.booleans())
def test_nested_dense(seed, gs, write):
    """Dense S1 over an S2 that leaves some S1 table pages unmapped or unreadable."""
    rng = np.random.default_rng(seed)
    mem, al = memory()
    s2pt = s2_table(mem, al, gs)
    g = 1 << gs
    s1pt = s1_table(mem, al, gs)
    window = 4 << s1pt.shift(2)
    _dense_tree(s1pt, rng, window, 0, 40)
    for page in range(BASE, al.next + g, g):
        k = int(rng.integers(0, 16))
        s2pt.map(page, page, g, af=k != 0, read=k != 1)
    for _ in range(16):  # some S1 outputs land here, the rest fault at S2
        ipa = BASE + int(rng.integers(0, 1 << 16)) * g
        s2pt.map(ipa, ipa, g, write=bool(rng.integers(0, 2)))
    vas = _dense_vas(rng, 0, window, 240, s1pt.ia_bits)
    compare(mem, s1_config(s1pt), s2_config(s2pt), vas, write=write)


def test_uniform_pages_blocks_and_duplicates():
    """Uniform leaves (classified once), blocks finishing at the grouped level, repeated
    addresses (grouped down to the leaf level) and an unreadable table."""
    mem, al = memory()
    pt = b.PageTable(mem, al)
    va0 = 0x80_0000_0000
    pt.map_range(va0, BASE + 0x200000, 512 << 12)  # one full level-3 table
    pt.map(va0 + (1 << 21), BASE + (4 << 21), 1 << 21)  # a 2M block
    pt.map_range(va0 + (2 << 21), BASE + 0x600000, 512 << 12, read_only=True)
    pt.set_desc(va0 + (3 << 21), 2, b.table_desc(0x10_0000_0000))  # table outside memory
    s1 = s1_config(pt)
    rng = np.random.default_rng(7)
    vas = (va0 + rng.integers(0, 4 << 21, 600)).astype(np.uint64)
    r = compare(mem, s1, None, vas, write=True)
    region = (vas - np.uint64(va0)) >> np.uint64(21)
    assert (r.fault[region <= 1] == 0).all()
    assert (r.fault[region == 2] == FP).all()
    assert (r.fault[region == 3] == FEA).all()
    blk = region == 1
    assert (r.pa[blk] == vas[blk] - np.uint64(va0 + (1 << 21)) + np.uint64(BASE + (4 << 21))).all()
    assert (r.page_size[blk] == 1 << 21).all() and (r.page_size[region == 0] == 4096).all()
    few = np.repeat(np.array([va0 + 5, va0 + 0x1234, va0 + (1 << 21) + 77], np.uint64), 50)
    r = compare(mem, s1, None, few)
    assert r.pa.tolist()[::50] == [BASE + 0x200005, BASE + 0x201234, BASE + (4 << 21) + 77]


def test_nested_grouped_table_fault_reports_descriptor_ipa():
    mem, al = memory()
    _, s2 = nested_s2(mem, al, 12)
    pt = nested_s1_builder(mem, al, 12, 48)
    va0 = 0x40_0000_0000
    pt.map_range(va0, BASE + IPA_OFF + 0x100000, 512 << 12)
    bad_table = 0x3_0000_0000  # IPA not mapped at stage 2
    mem.write_u64(pt.desc_addr(va0 + (1 << 21), 2) - IPA_OFF, b.table_desc(bad_table))
    s1 = s1_config(pt)
    vas = va0 + np.arange(0, 2 << 21, 1 << 13, dtype=np.uint64)
    r = compare(mem, s1, s2, vas)
    hi = vas >= np.uint64(va0 + (1 << 21))
    assert (r.fault[~hi] == 0).all()
    assert (r.fault[hi] == FT).all() and r.stage2[hi].all()
    assert (r.fault_class[hi] == FaultClass.TTD).all()
    idx = (vas[hi] >> np.uint64(12)) & np.uint64(511)
    assert (r.ipa[hi] == np.uint64(bad_table) + idx * np.uint64(8)).all()


def test_nested_64k_s1_over_4k_s2():
    """S1 tables bigger than an S2 page: stage 2 per descriptor address."""
    mem, al = memory()
    _, s2 = nested_s2(mem, al, 12)
    pt = nested_s1_builder(mem, al, 16, 42)
    va0 = 0x100_0000_0000 >> 2
    pt.map_range(va0, BASE + IPA_OFF + 0x400000, 64 << 16)
    vas = va0 + np.arange(0, 80 << 16, 1 << 14, dtype=np.uint64)
    r = compare(mem, s1_config(pt), s2, vas)
    assert (r.fault[vas < np.uint64(va0 + (64 << 16))] == 0).all()
    assert (r.fault[vas >= np.uint64(va0 + (64 << 16))] == FT).all()


def test_52bit_output_and_table_attributes():
    """64K granule with a 52-bit OA (OA[51:48] in descriptor bits [15:12]) and hierarchical
    table attributes that differ between tables, over uniform and mixed leaves."""
    mem, al = memory()
    pt = b.PageTable(mem, al, granule_shift=16, ia_bits=48)
    va0 = 0x7000_0000_0000
    hi_pa = 0x000F_1234_0000_0000
    for i in range(64):
        pt.map(va0 + (i << 16), hi_pa + (i << 16), 1 << 16)
    pt.map(va0 + (1 << 29), hi_pa + (1 << 29), 1 << 29)  # 512M block
    for i in range(64):
        pt.map(va0 + (2 << 29) + (i << 16), hi_pa + (i << 16), 1 << 16, read_only=i % 3 == 0)
    for blk in (2, 3):  # level-2 tables under read-only / no-EL0 table attributes
        ntl = pt.get_desc(va0 + (blk << 29), 2)
        if ntl is None or blk == 3:
            pt.map(va0 + (blk << 29), BASE + 0x100000, 1 << 16)
        addr = pt.desc_addr(va0 + (blk << 29), 2)
        d = mem.read_u64(addr)
        mem.write_u64(addr, b.table_desc(d & ~0xFFFF & ((1 << 48) - 1),
                                         ap_table=2 if blk == 2 else 1))
    rng = np.random.default_rng(3)
    vas = (va0 + rng.integers(0, 4 << 29, 300)).astype(np.uint64)
    vas = np.concatenate([vas, va0 + rng.integers(0, 64 << 16, 200).astype(np.uint64)])
    for ips in (48, 52):
        s1 = dataclasses.replace(s1_config(pt), ips_bits=ips)  # SMMU OAS 52
        for write in (False, True):
            r = compare(mem, s1, None, vas, write=write)
            first = vas < np.uint64(va0 + (64 << 16))
            assert (r.fault[first] == 0).all()
            # OA[51:48] only counts with a 52-bit output size
            assert (r.pa[first] >> np.uint64(48) == (0xF if ips == 52 else 0)).all()


def test_nested_table_attributes_with_stage2_table_faults():
    mem, al = memory()
    s2pt, s2 = nested_s2(mem, al, 12)
    pt = nested_s1_builder(mem, al, 12, 48)
    va0 = 0x40_0000_0000
    for k in range(4):
        pt.map_range(va0 + (k << 21), BASE + IPA_OFF + 0x2000000, 16 << 12)
        addr = pt.desc_addr(va0 + (k << 21), 2) - IPA_OFF
        d = mem.read_u64(addr)
        mem.write_u64(addr, b.table_desc(d & ~0xFFF & ((1 << 48) - 1), ap_table=k % 2 * 2))
    # make the level-3 table of block 3 unreadable at stage 2
    t3 = pt.get_desc(va0 + (3 << 21), 2) & ~0xFFF & ((1 << 48) - 1)
    blk0 = t3 & ~((1 << 21) - 1)
    for page in range(blk0, blk0 + (1 << 21), 1 << 12):  # split the 2M S2 block
        s2pt.map(page, page - IPA_OFF, 1 << 12, read=page != t3)
    vas = va0 + (np.arange(4, dtype=np.uint64) << np.uint64(21))[:, None] + \
        (np.arange(16, dtype=np.uint64) << np.uint64(12))[None, :]
    vas = vas.reshape(-1)
    vas = np.concatenate([vas, vas + np.uint64(8)])
    for write in (False, True):
        r = compare(mem, s1_config(pt), s2_config(s2pt), vas, write=write)
        blk = (vas - np.uint64(va0)) >> np.uint64(21)
        assert r.stage2[blk == 3].all() and (r.fault_class[blk == 3] == FaultClass.TTD).all()
        assert (r.fault[blk == 0] == 0).all()
        assert (r.fault[blk == 1] == (FP if write else 0)).all()
