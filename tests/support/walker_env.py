"""Shared fixtures for the walker tests: guest memory, S1/S2/nested table builders and a
three-way comparison (batched walker, scalar fast path, oracle)."""

from __future__ import annotations

import numpy as np

from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import oracle
from viommu_backend.smmuv3.cd import decode_cd
from viommu_backend.smmuv3.ste import S2Config, decode_ste
from viommu_backend.smmuv3.walker import walk, walk_one

BASE = 0x4000_0000
SIZE = 64 << 20
IPA_OFF = 0x4000_0000  # nested: IPA = PA + IPA_OFF

# (granule_shift, start_level) -> S1 input bits giving that start level
S1_IA = {(12, 0): 48, (12, 1): 39, (12, 2): 30,
         (14, 0): 48, (14, 1): 47, (14, 2): 36, (14, 3): 25,
         (16, 1): 48, (16, 2): 42, (16, 3): 29}
# (granule_shift, start_level) -> S2 input bits (with concatenated start tables)
S2_IA = {(12, 0): 48, (12, 1): 40, (12, 2): 32,
         (14, 1): 48, (14, 2): 36, (14, 3): 28,
         (16, 1): 48, (16, 2): 40, (16, 3): 30}


def memory():
    mem = b.make_memory(BASE, SIZE)
    return mem, b.Allocator(BASE, SIZE // 2)


def s1_config(pt: b.PageTable, *, ips_bits: int = 48, **cd_extra):
    return decode_cd(b.make_cd(pt.root, granule_shift=pt.gs, tsz=64 - pt.ia_bits,
                               ips_bits=ips_bits, **cd_extra))


def s2_config(pt: b.PageTable, *, ps_bits: int = 48, **ste_extra) -> S2Config:
    ste = b.make_ste(0b110, s2_ttb=pt.root, s2_t0sz=64 - pt.ia_bits,
                     s2_sl0=b.s2_sl0_for(pt.gs, pt.start_level), s2_granule_shift=pt.gs,
                     s2_ps_bits=ps_bits, s2_vmid=5, **ste_extra)
    cfg = decode_ste(ste, fwb=True)  # an SMMU with SMMU_IDR3.FWB: S2FWB allowed
    assert cfg.s2 is not None
    return cfg.s2


def s2_table(mem, al, gs: int) -> b.PageTable:
    """An empty stage-2 table of granule ``gs`` at the start level the nested tests use."""
    sl = {12: 1, 14: 2, 16: 2}[gs]
    return b.PageTable(mem, al, granule_shift=gs, ia_bits=S2_IA[(gs, sl)], start_level=sl,
                       stage2=True)


def s1_table(mem, al, gs: int) -> b.PageTable:
    """An empty stage-1 table of granule ``gs`` (IA 39 / 47 / 42 bits), tables at IPA == PA."""
    return b.PageTable(mem, al, granule_shift=gs, ia_bits={12: 39, 14: 47, 16: 42}[gs])


def nested_s2(mem, al, gs: int) -> tuple[b.PageTable, S2Config]:
    """S2 mapping IPA [BASE+IPA_OFF, +SIZE) -> PA [BASE, +SIZE)."""
    pt = s2_table(mem, al, gs)
    blk = 1 << pt.shift(2)
    step = blk if gs != 16 else 1 << gs
    for off in range(0, SIZE, step):
        pt.map(BASE + IPA_OFF + off, BASE + off, step)
    return pt, s2_config(pt)


def nested_s1_builder(mem, al, gs: int, ia: int) -> b.PageTable:
    return b.PageTable(mem, al, granule_shift=gs, ia_bits=ia,
                       to_pa=lambda ipa: ipa - IPA_OFF,
                       alloc_ipa=lambda size: al.alloc(size, max(size, 1 << gs)) + IPA_OFF)


def compare(mem, s1, s2, iovas, *, write=False, priv=False, instr=False):
    """Run all three walkers; assert identical results; return the batched result."""
    iovas = np.asarray(iovas, dtype=np.uint64)
    res = walk(mem, s1, s2, iovas, write=write, priv=priv, instr=instr)
    for i, va in enumerate(iovas.tolist()):
        one = walk_one(mem, s1, s2, va, write=write, priv=priv, instr=instr)
        ref = oracle.translate(mem, s1, s2, va, write=write, priv=priv, instr=instr)
        assert one == ref, (hex(va), one, ref)
        assert res.item(i) == ref, (hex(va), res.item(i), ref)
    return res
