"""Walker: every granule x start level x stage (S1, S2, nested) and every fault kind.
Each case runs the batched walker, the scalar fast path and the oracle (walker_env.compare)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3.fields import PERM_R, PERM_X, EventId, FaultClass
from tests.support.walker_env import (BASE, IPA_OFF, S1_IA, S2_IA, compare, memory, nested_s1_builder,
                        nested_s2, s1_config, s2_config)

OK = 0
FT, FAS, FAC, FP, FEA = (int(EventId.F_TRANSLATION), int(EventId.F_ADDR_SIZE),
                         int(EventId.F_ACCESS), int(EventId.F_PERMISSION),
                         int(EventId.F_WALK_EABT))


def _probe_set(pt, va0, npages):
    g = 1 << pt.gs
    return [va0, va0 + 123, va0 + (npages - 1) * g + g - 1, va0 + npages * g + 5]


@pytest.mark.parametrize("gs,sl", sorted(S1_IA))
def test_s1_granule_level(gs, sl):
    mem, al = memory()
    pt = b.PageTable(mem, al, granule_shift=gs, ia_bits=S1_IA[(gs, sl)])
    assert pt.start_level == sl
    s1 = s1_config(pt)
    assert s1.start_level == sl
    g = 1 << gs
    va0 = (1 << (pt.ia_bits - 1)) - 8 * g  # high in the input range
    pt.map_range(va0, BASE + 0x1000000, 4 * g)
    probes = _probe_set(pt, va0, 4) + [1 << pt.ia_bits]
    r = compare(mem, s1, None, probes, write=True)
    assert r.fault.tolist() == [OK, OK, OK, FT, FT]
    assert int(r.pa[1]) == BASE + 0x1000000 + 123
    assert int(r.pa[2]) == BASE + 0x1000000 + 4 * g - 1
    assert r.level.tolist()[:3] == [3, 3, 3]
    assert r.page_size.tolist()[:3] == [g] * 3
    assert r.level[4] == sl  # input beyond TSZ


@pytest.mark.parametrize("gs,sl", sorted(S2_IA))
def test_s2_granule_level(gs, sl):
    mem, al = memory()
    pt = b.PageTable(mem, al, granule_shift=gs, ia_bits=S2_IA[(gs, sl)], start_level=sl,
                     stage2=True)
    s2 = s2_config(pt)
    assert s2.start_level == sl
    g = 1 << gs
    ipa0 = (1 << pt.ia_bits) - 4 * g  # last pages: exercises the concatenated start table
    pt.map_range(ipa0, BASE + 0x800000, 2 * g)
    r = compare(mem, None, s2, [ipa0 + 7, ipa0 + 2 * g - 1, ipa0 + 2 * g, 1 << pt.ia_bits],
                write=True)
    assert r.fault.tolist() == [OK, OK, FT, FT]
    assert int(r.pa[0]) == BASE + 0x800000 + 7
    assert r.stage2.tolist() == [False, False, True, True]
    assert int(r.ipa[2]) == ipa0 + 2 * g
    assert r.fault_class[2] == FaultClass.IN


@pytest.mark.parametrize("gs,sl", sorted(S1_IA))
def test_nested(gs, sl):
    mem, al = memory()
    s2pt, s2 = nested_s2(mem, al, gs)
    pt = nested_s1_builder(mem, al, gs, S1_IA[(gs, sl)])
    s1 = s1_config(pt)
    g = 1 << gs
    va0 = 16 * g
    ipa_out = BASE + IPA_OFF + 0x1000000
    pt.map_range(va0, ipa_out, 2 * g)
    pt.map(va0 + 2 * g, 0x1_0000_0000, g)  # IPA outside the S2 mapping
    r = compare(mem, s1, s2, [va0 + 9, va0 + g, va0 + 2 * g + 1, va0 + 3 * g])
    assert r.fault.tolist() == [OK, OK, FT, FT]
    assert int(r.pa[0]) == BASE + 0x1000000 + 9
    assert int(r.ipa[0]) == ipa_out + 9
    assert r.stage2.tolist() == [False, False, True, False]
    assert r.fault_class[2] == FaultClass.IN and int(r.ipa[2]) == 0x1_0000_0000 + 1
    # an S1 table whose IPA is not mapped at stage 2: S2 fault of class TT with that IPA
    if sl == 3:
        return  # no S1 table descriptor to corrupt: the root comes from the CD
    addr = pt.desc_addr(va0, 2)
    bad_table = 0x2_0000_0000
    mem.write_u64(addr - IPA_OFF, b.table_desc(bad_table))
    r = compare(mem, s1, s2, [va0])
    assert r.fault[0] == FT and r.stage2[0] and r.fault_class[0] == FaultClass.TTD
    assert int(r.ipa[0]) == bad_table + 8 * ((va0 >> pt.shift(3)) & ((1 << pt.stride) - 1))


def test_blocks_and_invalid_block_levels():
    mem, al = memory()
    pt = b.PageTable(mem, al, granule_shift=12, ia_bits=48)
    s1 = s1_config(pt)
    pt.map(1 << 30, BASE, 1 << 30)  # 1G block at level 1 (OA beyond memory is fine)
    pt.map(2 << 21 | 8 << 30, BASE + (2 << 20) * 4, 1 << 21)
    pt.set_desc(1 << 39, 0, b.s1_leaf(BASE, 1) & ~2)  # block at level 0: invalid for 4K
    r = compare(mem, s1, None, [(1 << 30) + 0x12345, (2 << 21 | 8 << 30) + 77, 1 << 39])
    assert r.fault.tolist() == [OK, OK, FT]
    assert r.level.tolist() == [1, 2, 0]
    assert r.page_size.tolist()[:2] == [1 << 30, 1 << 21]
    assert int(r.pa[0]) == BASE + 0x12345
    for gs, lvl in ((14, 1), (16, 1)):
        mem, al = memory()
        pt = b.PageTable(mem, al, granule_shift=gs, ia_bits=48)
        s1 = s1_config(pt)
        va = 1 << (pt.shift(lvl) + 1)
        pt.set_desc(va, lvl, b.s1_leaf(0, 2) & ~2)
        r = compare(mem, s1, None, [va])
        assert r.fault[0] == FT and r.level[0] == lvl
        pt.map(va + (1 << pt.shift(2)), BASE, 1 << pt.shift(2))
        r = compare(mem, s1, None, [va + (1 << pt.shift(2)) + 5])
        assert r.fault[0] == OK and int(r.page_size[0]) == 1 << pt.shift(2)


def test_page_type_bit_zero_at_level3_is_translation_fault():
    mem, al = memory()
    pt = b.PageTable(mem, al)
    s1 = s1_config(pt)
    pt.set_desc(0x5000, 3, b.s1_leaf(BASE, 3) & ~2)
    r = compare(mem, s1, None, [0x5000])
    assert r.fault[0] == FT and r.level[0] == 3


def test_permissions_s1():
    mem, al = memory()
    pt = b.PageTable(mem, al)
    s1 = s1_config(pt)
    pt.map(0x1000, BASE, read_only=True)
    pt.map(0x2000, BASE, el0=False)
    pt.map(0x3000, BASE, uxn=True)
    pt.map(0x4000, BASE, pxn=True)
    vas = [0x1000, 0x2000, 0x3000, 0x4000]
    assert compare(mem, s1, None, vas).fault.tolist() == [OK, FP, OK, OK]
    assert compare(mem, s1, None, vas, write=True).fault.tolist() == [FP, FP, OK, OK]
    assert compare(mem, s1, None, vas, priv=True, write=True).fault.tolist() == [FP, OK, OK, OK]
    assert compare(mem, s1, None, vas, instr=True).fault.tolist() == [OK, OK, FP, OK]
    r = compare(mem, s1, None, vas, instr=True, priv=True)
    # priv execute of an EL0-writable page is never allowed (implicit PXN)
    assert r.fault.tolist() == [OK, OK, FP, FP]
    r = compare(mem, s1, None, [0x1000])
    assert r.perm[0] == PERM_R | PERM_X
    # hierarchical APTable: read-only / no-EL0 from the table descriptor
    addr = pt.desc_addr(0x1000, 2)
    d = mem.read_u64(addr)
    mem.write_u64(addr, d | (2 << 61))
    assert compare(mem, s1, None, [0x3000], write=True).fault.tolist() == [FP]
    mem.write_u64(addr, d | (1 << 61))
    assert compare(mem, s1, None, [0x3000]).fault.tolist() == [FP]
    mem.write_u64(addr, d | (1 << 60))
    assert compare(mem, s1, None, [0x3000, 0x4000], instr=True).fault.tolist() == [FP, FP]
    mem.write_u64(addr, d)
    # WXN: writable implies no execute
    s1w = s1_config(pt, WXN=1)
    assert compare(mem, s1w, None, [0x3000 - 0x1000 * 2 + 0x1000 * 3], instr=True).fault[0] == FP


def test_permissions_s2_and_dirty_bit():
    mem, al = memory()
    pt = b.PageTable(mem, al, ia_bits=40, start_level=1, stage2=True)
    s2 = s2_config(pt)
    pt.map(0x1000, BASE, write=False)
    pt.map(0x2000, BASE, read=False)
    pt.map(0x3000, BASE, xn=True)
    pt.map(0x4000, BASE, write=False, dbm=True)
    vas = [0x1000, 0x2000, 0x3000, 0x4000]
    assert compare(mem, None, s2, vas).fault.tolist() == [OK, FP, OK, OK]
    assert compare(mem, None, s2, vas, write=True).fault.tolist() == [FP, OK, OK, FP]
    assert compare(mem, None, s2, vas, instr=True).fault.tolist() == [OK, OK, FP, OK]
    s2hd = s2_config(pt, S2HD=1, S2HA=1)
    assert compare(mem, None, s2hd, vas, write=True).fault.tolist() == [FP, OK, OK, OK]


def test_access_flag():
    mem, al = memory()
    pt = b.PageTable(mem, al)
    pt.map(0x1000, BASE, af=False)
    r = compare(mem, s1_config(pt), None, [0x1000])
    assert r.fault[0] == FAC and r.level[0] == 3
    assert compare(mem, s1_config(pt, HA=1), None, [0x1000]).fault[0] == OK
    assert compare(mem, s1_config(pt, AFFD=1), None, [0x1000]).fault[0] == OK
    s2pt = b.PageTable(mem, al, ia_bits=40, start_level=1, stage2=True)
    s2pt.map(0x1000, BASE, af=False)
    r = compare(mem, None, s2_config(s2pt), [0x1000])
    assert r.fault[0] == FAC and r.stage2[0]
    assert compare(mem, None, s2_config(s2pt, S2AFFD=1), [0x1000]).fault[0] == OK


def test_address_size():
    mem, al = memory()
    pt = b.PageTable(mem, al)
    pt.map(0x1000, 1 << 41)  # beyond a 40-bit IPS
    pt.map(0x2000, BASE)
    s1 = s1_config(pt, ips_bits=40)
    r = compare(mem, s1, None, [0x1000, 0x2000])
    assert r.fault.tolist() == [FAS, OK] and r.level[0] == 3
    # a table descriptor pointing beyond IPS
    addr = pt.desc_addr(0x1000, 1)
    mem.write_u64(addr, b.table_desc(1 << 44))
    r = compare(mem, s1, None, [0x1000, 0x2000])
    assert r.fault.tolist() == [FAS, FAS] and r.level.tolist() == [1, 1]
    # a TTB beyond IPS
    r = compare(mem, dataclasses.replace(s1, ttb=1 << 40), None, [0x2000])
    assert r.fault[0] == FAS and r.level[0] == 0


def test_walk_external_abort():
    mem, al = memory()
    pt = b.PageTable(mem, al)
    s1 = s1_config(pt)
    addr = pt.desc_addr(0x1000, 2)
    mem.write_u64(addr, b.table_desc(0x10_0000_0000))  # next table outside guest memory
    r = compare(mem, s1, None, [0x1000, 0x2000])
    assert r.fault.tolist() == [FEA, FEA] and r.level.tolist() == [3, 3]
    # stage 2 table outside memory: flagged as stage 2
    s2pt = b.PageTable(mem, al, ia_bits=40, start_level=1, stage2=True)
    a2 = s2pt.desc_addr(0x1000, 2)
    mem.write_u64(a2, b.table_desc(0x10_0000_0000))
    r = compare(mem, None, s2_config(s2pt), [0x1000])
    assert r.fault[0] == FEA and r.stage2[0] and int(r.ipa[0]) == 0x1000


def test_epd0_disables_walks():
    mem, al = memory()
    pt = b.PageTable(mem, al)
    pt.map(0x1000, BASE)
    r = compare(mem, s1_config(pt, epd0=1), None, [0x1000])
    assert r.fault[0] == FT


def test_nested_s2_protected_table_walk():
    mem, al = memory()
    s2pt, _ = nested_s2(mem, al, 12)
    pt = nested_s1_builder(mem, al, 12, 48)
    pt.map(0x1000, BASE + IPA_OFF + 0x100000)
    s1 = s1_config(pt)
    # remap the S2 block holding the S1 root as Device memory, with S2PTW set
    root_ipa = pt.root
    blk = 1 << s2pt.shift(2)
    s2pt.map(root_ipa & ~(blk - 1), (root_ipa - IPA_OFF) & ~(blk - 1), blk, mem_attr=0)
    s2 = s2_config(s2pt)
    assert compare(mem, s1, s2, [0x1000]).fault[0] == OK
    s2p = s2_config(s2pt, S2PTW=1)
    r = compare(mem, s1, s2p, [0x1000])
    assert r.fault[0] == FP and r.stage2[0] and r.fault_class[0] == FaultClass.TTD


@pytest.mark.parametrize("mem_attr,fwb_device", [(0b1001, True), (0b0110, False)])
@pytest.mark.parametrize("fwb", [False, True])
def test_s2ptw_device_per_s2fwb(mem_attr, fwb_device, fwb):
    """S2PTW decides Device from the stage-2 MemAttr as STE.S2FWB says: 0b1001 is Normal
    (outer Write-Through) in the Armv8.0 encoding but Device (MemAttr[2] == 0) in the FWB
    one; 0b0110 (the FWB Write-Back Linux writes) is Normal in both."""
    mem, al = memory()
    s2pt, _ = nested_s2(mem, al, 12)
    pt = nested_s1_builder(mem, al, 12, 48)
    pt.map(0x1000, BASE + IPA_OFF + 0x100000)
    blk = 1 << s2pt.shift(2)
    s2pt.map(pt.root & ~(blk - 1), (pt.root - IPA_OFF) & ~(blk - 1), blk, mem_attr=mem_attr)
    s2 = s2_config(s2pt, S2PTW=1, S2FWB=int(fwb))
    assert s2.fwb == fwb
    r = compare(mem, s1_config(pt), s2, [0x1000])
    if fwb_device and fwb:
        assert r.fault[0] == FP and r.stage2[0] and r.fault_class[0] == FaultClass.TTD
    else:
        assert r.fault[0] == OK and int(r.pa[0]) == BASE + 0x100000


def test_bypass_and_empty_batch():
    mem, _ = memory()
    r = compare(mem, None, None, [0x1234])
    assert int(r.pa[0]) == 0x1234 and r.fault[0] == OK
    mem2, al = memory()
    pt = b.PageTable(mem2, al)
    r = compare(mem2, s1_config(pt), None, np.zeros(0, np.uint64))
    assert len(r) == 0


def test_large_batch_mixed():
    mem, al = memory()
    pt = b.PageTable(mem, al)
    s1 = s1_config(pt)
    pt.map_range(0x10000000, BASE + 0x100000, 64 << 12)
    rng = np.random.default_rng(1)
    vas = (0x10000000 + rng.integers(0, 80 << 12, 500)).astype(np.uint64)
    r = compare(mem, s1, None, vas)
    mapped = vas < 0x10000000 + (64 << 12)
    assert (r.fault[mapped] == 0).all() and (r.fault[~mapped] == FT).all()
    assert (r.pa[mapped] == vas[mapped] - np.uint64(0x10000000) + np.uint64(BASE + 0x100000)).all()
