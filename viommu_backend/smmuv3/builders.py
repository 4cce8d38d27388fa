"""Build SMMUv3 structures in guest memory: page tables, CDs, STEs, stream/CD tables.

Used by unit/integration tests and the benchmarks (the way a guest driver would write
them).  Encodings come from the layouts in :mod:`fields`.
"""

from __future__ import annotations

import os
from typing import Callable

from viommu_backend.memory import PROT_READ, PROT_WRITE, GuestMemory
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.ste import start_level_bits


def make_memory(base: int, size: int, mem: GuestMemory | None = None) -> GuestMemory:
    """A GuestMemory with one fd-backed (memfd) read/write region at ``base``."""
    mem = mem or GuestMemory()
    fd = os.memfd_create("viommu-test", 0)
    try:
        os.ftruncate(fd, size)
        mem.add(base, size, PROT_READ | PROT_WRITE, fd=fd)
    finally:
        os.close(fd)
    return mem


class Allocator:
    """Bump allocator of zeroed, aligned chunks in [base, base+size)."""

    def __init__(self, base: int, size: int) -> None:
        self.base = self.next = base
        self.end = base + size

    def alloc(self, size: int, align: int = 4096) -> int:
        a = (self.next + align - 1) & ~(align - 1)
        if a + size > self.end:
            raise MemoryError("builder arena exhausted")
        self.next = a + size
        return a


def write_words(mem, addr: int, words: list[int]) -> None:
    mem.write(addr, b"".join(int(w).to_bytes(8, "little") for w in words))


def words_of(layout, value: int) -> list[int]:
    return [(value >> (64 * i)) & (2**64 - 1) for i in range(layout.size_bits // 64)]


# -- descriptors --------------------------------------------------------------------------
def table_desc(addr: int, *, ap_table: int = 0, pxn_table: bool = False,
               xn_table: bool = False) -> int:
    return fl.PTE_TABLE.encode(Valid=1, Type=1, NLTA=addr & fl.PTE_TABLE["NLTA"].mask,
                               APTable=ap_table, PXNTable=int(pxn_table),
                               XNTable=int(xn_table))


def _oa_bits(pa: int, granule_shift: int) -> int:
    v = pa & fl.OA_MASK_48 & ~((1 << granule_shift) - 1)
    if granule_shift == 16 and pa >> 48:
        v |= ((pa >> 48) & 0xF) << 12
    return v


def s1_leaf(pa: int, level: int, *, granule_shift: int = 12, read_only: bool = False,
            el0: bool = True, af: bool = True, ng: bool = True, pxn: bool = False,
            uxn: bool = False, attr_indx: int = 0, contiguous: bool = False,
            dbm: bool = False) -> int:
    d = fl.PTE_S1.encode(Valid=1, Type=1 if level == 3 else 0, AttrIndx=attr_indx,
                         AP1=int(el0), AP2=int(read_only), SH=3, AF=int(af), nG=int(ng),
                         PXN=int(pxn), UXN=int(uxn), Contiguous=int(contiguous), DBM=int(dbm))
    return d | _oa_bits(pa, granule_shift)


def s2_leaf(pa: int, level: int, *, granule_shift: int = 12, read: bool = True,
            write: bool = True, xn: bool = False, af: bool = True, mem_attr: int = 0xF,
            dbm: bool = False) -> int:
    d = fl.PTE_S2.encode(Valid=1, Type=1 if level == 3 else 0, MemAttr=mem_attr,
                         S2AP_R=int(read), S2AP_W=int(write), SH=3, AF=int(af), XN=int(xn),
                         DBM=int(dbm))
    return d | _oa_bits(pa, granule_shift)


class PageTable:
    """A VMSAv8-64 table tree for one stage written into guest memory.

    ``to_pa`` maps the (IPA) addresses this builder allocates to where they live in guest
    memory (nested stage-1 tables live in IPA space); identity by default."""

    def __init__(self, mem, alloc: Allocator, *, granule_shift: int = 12, ia_bits: int = 48,
                 start_level: int | None = None, stage2: bool = False,
                 to_pa: Callable[[int], int] = lambda a: a,
                 alloc_ipa: Callable[[int], int] | None = None) -> None:
        self.mem = mem
        self.alloc = alloc
        self.gs = granule_shift
        self.stride = granule_shift - 3
        self.ia_bits = ia_bits
        if start_level is None:
            levels = -(-(ia_bits - granule_shift) // self.stride)
            start_level = 4 - levels
        self.start_level = start_level
        self.stage2 = stage2
        self.to_pa = to_pa
        self._alloc_ipa = alloc_ipa
        top = start_level_bits(granule_shift, start_level, ia_bits)
        self.root = self._new_table(max(8 << top, 1 << granule_shift))

    def _new_table(self, size: int | None = None) -> int:
        size = size or (1 << self.gs)
        if self._alloc_ipa is not None:
            return self._alloc_ipa(size)
        return self.alloc.alloc(size, max(size, 1 << self.gs))

    def shift(self, level: int) -> int:
        return self.gs + (3 - level) * self.stride

    def desc_addr(self, va: int, level: int, create: bool = True) -> int | None:
        """Address (as stored: IPA for nested S1) of the descriptor for ``va`` at ``level``."""
        table = self.root
        lvl = self.start_level
        while True:
            bits = start_level_bits(self.gs, lvl, self.ia_bits) if lvl == self.start_level \
                else self.stride
            addr = table + 8 * ((va >> self.shift(lvl)) & ((1 << bits) - 1))
            if lvl == level:
                return addr
            d = self.mem.read_u64(self.to_pa(addr))
            if d & 3 != 3:
                if not create:
                    return None
                nt = self._new_table()
                self.mem.write_u64(self.to_pa(addr), table_desc(nt))
                d = table_desc(nt)
            table = d & fl.PTE_TABLE["NLTA"].mask & ~((1 << self.gs) - 1)
            lvl += 1

    def set_desc(self, va: int, level: int, desc: int) -> int:
        addr = self.desc_addr(va, level)
        self.mem.write_u64(self.to_pa(addr), desc)
        return addr

    def get_desc(self, va: int, level: int) -> int | None:
        addr = self.desc_addr(va, level, create=False)
        return None if addr is None else self.mem.read_u64(self.to_pa(addr))

    def map(self, va: int, pa: int, size: int | None = None, **attrs) -> None:
        """Map one page (``size`` = granule) or block (``size`` = a level's block size)."""
        size = size or (1 << self.gs)
        level = next(lv for lv in range(4) if self.shift(lv) == size.bit_length() - 1)
        make = s2_leaf if self.stage2 else s1_leaf
        self.set_desc(va, level, make(pa, level, granule_shift=self.gs, **attrs))

    def map_range(self, va: int, pa: int, length: int, **attrs) -> None:
        g = 1 << self.gs
        for off in range(0, length, g):
            self.map(va + off, pa + off, g, **attrs)

    def unmap(self, va: int, level: int = 3) -> None:
        addr = self.desc_addr(va, level, create=False)
        if addr is not None:
            self.mem.write_u64(self.to_pa(addr), 0)


# -- CD / STE -------------------------------------------------------------------------------
_TG0_ENC = {12: 0, 16: 1, 14: 2}


def make_cd(ttb: int, *, granule_shift: int = 12, tsz: int = 16, ips_bits: int = 48,
            asid: int = 1, v: int = 1, aa64: int = 1, epd0: int = 0, epd1: int = 1,
            **extra: int) -> list[int]:
    """Words of a CD (TTB0 walk, TTB1 disabled, as Linux sets them)."""
    val = fl.CD.encode(T0SZ=tsz, TG0=_TG0_ENC[granule_shift], IR0=1, OR0=1, SH0=3,
                       EPD0=epd0, EPD1=epd1, V=v, IPS=fl.BITS_PS[ips_bits], AA64=aa64,
                       R=1, A=1, ASET=1, ASID=asid, TTB0=ttb, **extra)
    return words_of(fl.CD, val)


def make_ste(config: int, *, s1_ctx_ptr: int = 0, s1_fmt: int = 0, s1_cdmax: int = 0,
             s1_dss: int = 0, s2_ttb: int = 0, s2_vmid: int = 0, s2_t0sz: int = 16,
             s2_sl0: int = 2, s2_granule_shift: int = 12, s2_ps_bits: int = 48,
             v: int = 1, **extra: int) -> list[int]:
    """Words of an STE.  ``config`` is an STE_CONFIG_* value."""
    f: dict[str, int] = dict(V=v, Config=config)
    if config & 1:  # stage 1
        f.update(S1ContextPtr=s1_ctx_ptr, S1Fmt=s1_fmt, S1CDMax=s1_cdmax, S1DSS=s1_dss,
                 S1CIR=1, S1COR=1, S1CSH=3)
    if config & 2:  # stage 2
        f.update(S2VMID=s2_vmid, S2T0SZ=s2_t0sz, S2SL0=s2_sl0, S2IR0=1, S2OR0=1, S2SH0=3,
                 S2TG=_TG0_ENC[s2_granule_shift], S2PS=fl.BITS_PS[s2_ps_bits], S2AA64=1,
                 S2R=1, S2TTB=s2_ttb)
    f.update(extra)
    return words_of(fl.STE, fl.STE.encode(f))


def s2_sl0_for(granule_shift: int, start_level: int) -> int:
    """Inverse of ste.s2_start_level."""
    if granule_shift == 12:
        return {2: 0, 1: 1, 0: 2}[start_level]
    return {3: 0, 2: 1, 1: 2}[start_level]
