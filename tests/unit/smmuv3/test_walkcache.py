"""The caches of the caching model (SMMU option ``cache``) on tables built here: walk
caches (what each invalidation drops, Leaf / range / scope, reads through cached table
descriptors in the scalar and batched walks, capacity and replacement) and the TLB keyed
as the architecture keys it (global entries, the TTL hint, CMD_TLBI_S2_IPA and combined
entries, FIFO replacement).  The CD cache: test_tlb.py; the whole path through the SMMU:
tests/unit/domains/test_caching.py."""

from __future__ import annotations

import numpy as np
import pytest

from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3.smmu_config import SmmuConfig
from viommu_backend.smmuv3.tlb import EL2_VMID, NO_ASID, TLB
from viommu_backend.smmuv3.walkcache import CachedWalkMemory, WalkCache
from viommu_backend.smmuv3.walker import table_path, walk, walk_one

from tests.support.smmuv3_harness import RAM_BASE
from tests.support.walker_env import BASE, memory, s1_config

MB2, GB = 1 << 21, 1 << 30


# -- walk caches on tables built here ------------------------------------------------------
class Tables:
    """A 4 KiB-granule stage-1 table (levels 0..3) mapping IOVA -> DATA, and a second
    level-3 table mapping the same IOVA -> DATA2 that a test may swap in."""

    IOVA = 0x4020_3000

    def __init__(self) -> None:
        self.mem, al = memory()
        self.pt = b.PageTable(self.mem, al, ia_bits=48)
        self.data, self.data2 = BASE + 0x200_0000, BASE + 0x300_0000
        self.pt.map_range(self.IOVA & ~(MB2 - 1), self.data, MB2)
        self.s1 = s1_config(self.pt)
        self.new_l3 = al.alloc(4096)
        for i in range(512):
            self.mem.write_u64(self.new_l3 + 8 * i, b.s1_leaf(self.data2 + (i << 12), 3))

    def swap_table(self) -> None:
        """The level-2 table descriptor of IOVA now points at the second table (the
        driver's business to invalidate)."""
        self.pt.set_desc(self.IOVA, 2, b.table_desc(self.new_l3))

    def pa(self, wc: WalkCache, asid: int = 1, iova: int = IOVA) -> int:
        mem = CachedWalkMemory(self.mem, wc.overlay("NS", 0, asid))
        t = walk_one(mem, self.s1, None, iova, write=False)
        assert not t.fault
        return t.pa

    def fill(self, wc: WalkCache, asid: int = 1) -> None:
        wc.fill("NS", 0, asid, table_path(self.mem, self.s1, None, self.IOVA))


def test_table_path_lists_the_table_descriptors_of_a_walk():
    t = Tables()
    path = table_path(t.mem, t.s1, None, t.IOVA)
    assert [(st, lvl, shift) for st, lvl, shift, *_ in path] == \
        [("s1", 0, 39), ("s1", 1, 30), ("s1", 2, 21)]
    assert path[2][4] == t.pt.desc_addr(t.IOVA, 2)
    assert path[2][5] == t.mem.read_u64(t.pt.desc_addr(t.IOVA, 2))


def test_a_changed_table_descriptor_is_used_until_a_non_leaf_invalidation_covers_it():
    t = Tables()
    wc = WalkCache()
    t.fill(wc)
    assert len(wc) == 3 and wc.misses == 3
    t.swap_table()
    off = t.IOVA & (MB2 - 1)
    assert t.pa(wc) == t.data + off  # the cached level-2 descriptor: the old table
    assert t.pa(WalkCache()) == t.data2 + off  # nothing cached: the new one
    t.fill(wc)
    assert wc.hits == 3  # the walk took every table descriptor from the cache
    kept = [dict(leaf=True),  # leaf-only: walk entries stay
            dict(leaf=False, asid=2),  # another ASID
            dict(leaf=False, vmid=1),  # another VMID
            dict(leaf=False, start=1 << 39, length=1 << 39)]  # the next level-0 span
    for kw in kept:
        args = dict(start=t.IOVA, length=0x1000, vmid=0, asid=1) | kw
        assert wc.inv_va(args.pop("start"), args.pop("length"), **args) == 0, kw
        assert t.pa(wc) == t.data + off, kw
    assert wc.inv_va(t.IOVA + MB2 - 1 - off, 1, vmid=0, asid=1, leaf=False) == 3
    assert t.pa(wc) == t.data2 + off and wc.invalidated == 3


def _entries(wc: WalkCache) -> None:
    """Entries of five contexts: level 1 and 2 table descriptors around 1 GiB."""
    for tag, vmid, asid, stage in (("NS", 0, 1, "s1"), ("NS", 0, 2, "s1"), ("NS", 0, 1, "s2"),
                                   ("NS", 1, 1, "s1"), ("NS", EL2_VMID, 1, "s1")):
        base = 0x1000 * (vmid + 2) + 0x100 * asid + (0x10 if stage == "s2" else 0)
        wc.fill(tag, vmid, asid, [(stage, 1, 30, GB, RAM_BASE + base, 0x3),
                                  (stage, 2, 21, GB, RAM_BASE + base + 8, 0x3)])


def _left(wc: WalkCache) -> set[tuple]:
    return {(k[0][1], k[0][2], k[1]) for k in wc._map}


ALL = {(0, 1, "s1"), (0, 2, "s1"), (0, NO_ASID, "s2"), (1, 1, "s1"), (EL2_VMID, 1, "s1")}


@pytest.mark.parametrize("inv, gone", [
    (lambda w: w.inv_asid(1, 0), {(0, 1, "s1")}),  # CMD_TLBI_NH_ASID
    (lambda w: w.inv_nh_all(0), {(0, 1, "s1"), (0, 2, "s1")}),  # CMD_TLBI_NH_ALL
    (lambda w: w.inv_vmid(0), {(0, 1, "s1"), (0, 2, "s1"), (0, NO_ASID, "s2")}),  # S12_VMALL
    (lambda w: w.inv_vmid(EL2_VMID), {(EL2_VMID, 1, "s1")}),  # CMD_TLBI_EL2_ALL
    (lambda w: w.inv_nsnh_all(), ALL - {(EL2_VMID, 1, "s1")}),  # CMD_TLBI_NSNH_ALL
    (lambda w: w.inv_va(GB, 4096, vmid=0, asid=None, leaf=False),  # NH_VAA: any ASID
     {(0, 1, "s1"), (0, 2, "s1")}),
    (lambda w: w.inv_va(GB, 4096, vmid=0, asid=2, leaf=False), {(0, 2, "s1")}),  # NH_VA
    (lambda w: w.inv_va(GB, 4096, vmid=0, asid=None, leaf=True), set()),  # Leaf=1
    (lambda w: w.inv_va(0, GB, vmid=0, asid=None, leaf=False), set()),  # just below
    (lambda w: w.inv_ipa(GB, 4096, vmid=0, leaf=False), {(0, NO_ASID, "s2")}),
    (lambda w: w.inv_ipa(GB, 4096, vmid=0, leaf=True), set()),  # S2_IPA Leaf=1
    (lambda w: w.inv_ipa(GB, 4096, vmid=1, leaf=False), set()),  # VMID 1 has no stage 2
])
def test_each_invalidation_drops_exactly_the_walk_entries_in_its_scope(inv, gone):
    wc = WalkCache()
    _entries(wc)
    assert _left(wc) == ALL
    inv(wc)
    assert _left(wc) == ALL - gone


def test_range_invalidation_drops_the_levels_whose_span_it_overlaps():
    """A level-2 entry spans 2 MiB, a level-1 entry 1 GiB: a range just past the level-2
    span drops only the level-1 entry."""
    wc = WalkCache()
    _entries(wc)
    wc.inv_va(GB + MB2, 4096, vmid=0, asid=1, leaf=False)
    lv = {(k[0][2], k[2]) for k in wc._map if k[0][1] == 0 and k[1] == "s1"}
    assert lv == {(1, 2), (2, 1), (2, 2)}


@pytest.mark.parametrize("replacement, survivor", [("lru", 0), ("fifo", 1)])
def test_walk_cache_capacity_and_replacement(replacement, survivor):
    wc = WalkCache(2, replacement=replacement)
    paths = [[("s1", 2, 21, i * MB2, RAM_BASE + 8 * i, 3)] for i in range(3)]
    wc.fill("NS", 0, 1, paths[0])
    wc.fill("NS", 0, 1, paths[1])
    wc.fill("NS", 0, 1, paths[0])  # a hit: refreshes it under LRU only
    wc.fill("NS", 0, 1, paths[2])
    assert wc.evictions == 1 and wc.hits == 1
    assert set(wc.overlay("NS", 0, 1)) == {RAM_BASE + 8 * survivor, RAM_BASE + 16}


def test_batched_walk_reads_through_cached_table_descriptors():
    """The numpy walk (grouped and per element, window and gather loads) sees the cached
    descriptor as the scalar walk does."""
    t = Tables()
    wc = WalkCache()
    t.fill(wc)
    t.swap_table()
    mem = CachedWalkMemory(t.mem, wc.overlay("NS", 0, 1))
    page = t.IOVA & ~(MB2 - 1)
    for va in (np.arange(512, dtype=np.uint64) * np.uint64(4096) + np.uint64(page),
               np.array([t.IOVA, t.IOVA + 0x8000], dtype=np.uint64)):
        r = walk(mem, t.s1, None, va, write=False)
        assert (r.fault == 0).all()
        assert (r.pa == va - np.uint64(page) + np.uint64(t.data)).all()
    got, ok = mem.gather_u64(np.array([t.pt.desc_addr(t.IOVA, 2)], dtype=np.uint64))
    assert ok.all() and int(got[0]) != t.mem.read_u64(t.pt.desc_addr(t.IOVA, 2))


# -- the TLB keyed as the architecture keys it --------------------------------------------
def test_global_entries_hit_for_every_asid_and_survive_asid_invalidation():
    t = TLB(0, architectural=True)
    t.insert("NS", 0, 1, 0x1000, 0x8000_1000, 0x1000, 3, global_=True)
    t.insert("NS", 0, 1, 0x2000, 0x8000_2000, 0x1000, 3)
    assert t.lookup("NS", 0, 2, 0x1000) is not None  # another ASID, same VMID
    assert t.lookup("NS", 1, 2, 0x1000) is None  # another VMID
    assert t.lookup("NS", 0, 2, 0x2000) is None  # nG: that ASID's only
    t.inv_asid(1, 0)
    assert t.lookup("NS", 0, 3, 0x1000) is not None and t.lookup("NS", 0, 1, 0x2000) is None
    t.inv_va(0x1000, 1, vmid=0, asid=7)  # NH_VA of any ASID covers a global entry
    assert t.lookup("NS", 0, 3, 0x1000) is None
    d = TLB()  # the default model: global entries stay with the ASID that filled them
    d.insert(5, 0, 1, 0x1000, 0x8000_1000, 0x1000, 3, global_=True)
    assert d.lookup(5, 0, 2, 0x1000) is None


@pytest.mark.parametrize("architectural, nested_left", [(True, True), (False, False)])
def test_s2_ipa_keeps_combined_entries_when_architectural(architectural, nested_left):
    t = TLB(0, architectural=architectural)
    t.insert("NS", 3, 1, 0x1000, 0x8000_1000, 0x1000, 3, stage="nested", ipa=0x5000)
    t.insert("NS", 3, NO_ASID, 0x5000, 0x8000_1000, 0x1000, 3, stage="s2", ipa=0x5000)
    t.inv_ipa(0x5000, 0x1000, vmid=3)
    assert t.lookup("NS", 3, NO_ASID, 0x5000) is None
    assert (t.lookup("NS", 3, 1, 0x1000) is not None) == nested_left


@pytest.mark.parametrize("architectural, ttl, left", [
    (True, 3, {2}),  # hint: the leaf is at level 3: the level-2 block need not go
    (True, 2, {3}),
    (True, 0, set()),  # no hint
    (False, 3, set()),  # the default model ignores hints
])
def test_ttl_hint_names_the_level_of_the_leaves_invalidated(architectural, ttl, left):
    t = TLB(0, architectural=architectural)
    t.insert("NS", 0, 1, 0, 0x8000_0000, MB2, 3, level=2)
    t.insert("NS", 0, 1, MB2, 0x9000_0000, 0x1000, 3, level=3)
    t.inv_va(0, 2 * MB2, vmid=0, asid=1, leaf=True, ttl=ttl)
    assert {e.level for e in (t.lookup("NS", 0, 1, 0), t.lookup("NS", 0, 1, MB2)) if e} \
        == left


def test_fifo_tlb_evicts_the_oldest_fill_even_if_used():
    t = TLB(2, replacement="fifo")
    t.insert("NS", 0, 1, 0x1000, 0x1000, 0x1000, 3)
    t.insert("NS", 0, 1, 0x2000, 0x2000, 0x1000, 3)
    assert t.lookup("NS", 0, 1, 0x1000) is not None
    t.insert("NS", 0, 1, 0x3000, 0x3000, 0x1000, 3)
    assert t.lookup("NS", 0, 1, 0x1000) is None and t.lookup("NS", 0, 1, 0x2000) is not None


def test_cache_options_are_checked():
    for bad in (dict(cache="huge"), dict(cache_replacement="random"), dict(tlb_entries=-2),
                dict(walk_cache_entries=-1)):
        with pytest.raises(ValueError):
            SmmuConfig(**bad)
