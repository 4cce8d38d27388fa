"""TLB and config cache: fills, LRU eviction, every invalidation form, range decoding."""

from __future__ import annotations

import numpy as np

from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3.tlb import EL2_VMID, NO_ASID, TLB, CdCache, tlbi_range
from viommu_backend.smmuv3.walker import walk
from tests.support.walker_env import BASE, memory, s1_config


def _fill():
    t = TLB(capacity=64)
    t.insert("d1", 1, 10, 0x1000, 0x8000, 0x1000, 3)
    t.insert("d1", 1, 10, 0x200000, 0xA00000, 0x200000, 3, level=2)
    t.insert("d1", 1, 11, 0x1000, 0x9000, 0x1000, 3)
    t.insert("d1", 1, 12, 0x3000, 0x7000, 0x1000, 3, global_=True)
    t.insert("d2", 2, NO_ASID, 0x1000, 0x5000, 0x1000, 3, stage="s2", ipa=0x1000)
    t.insert("d3", 2, 10, 0x4000, 0x6000, 0x1000, 3, stage="nested", ipa=0x1000)
    t.insert("d4", EL2_VMID, 10, 0x1000, 0x4000, 0x1000, 3)
    return t


def test_lookup_hit_miss_and_blocks():
    t = _fill()
    e = t.lookup("d1", 1, 10, 0x1abc)
    assert e is not None and e.translate(0x1abc) == 0x8abc
    e = t.lookup("d1", 1, 10, 0x3fffff)
    assert e is not None and e.size == 0x200000 and e.translate(0x3fffff) == 0xBFFFFF
    assert t.lookup("d1", 1, 10, 0x5000) is None
    assert t.lookup("d1", 2, 10, 0x1000) is None  # other VMID
    assert t.hits == 2 and t.misses == 2


def test_lru_eviction():
    t = TLB(capacity=4)
    for i in range(4):
        t.insert(0, 0, 1, i << 12, i << 12, 0x1000, 3)
    assert t.lookup(0, 0, 1, 0) is not None  # 0 becomes most recent
    t.insert(0, 0, 1, 9 << 12, 0, 0x1000, 3)
    assert t.evictions == 1 and len(t) == 4
    assert t.lookup(0, 0, 1, 1 << 12) is None and t.lookup(0, 0, 1, 0) is not None


def test_invalidate_asid_vmid_all():
    t = _fill()
    assert t.inv_asid(10, 1) == 2
    assert t.lookup("d1", 1, 10, 0x1000) is None and t.lookup("d1", 1, 11, 0x1000) is not None
    assert t.inv_asid(12, 1) == 0  # global entries survive NH_ASID
    assert t.inv_nh_all(2) == 1  # nested entry only, not the S2 one
    assert t.lookup("d2", 2, NO_ASID, 0x1000) is not None
    assert t.inv_vmid(2) == 1
    assert t.inv_el2_all() == 1
    assert t.inv_nsnh_all() == 2 and len(t) == 0


def test_invalidate_va_and_ipa():
    t = _fill()
    assert t.inv_va(0x1000, vmid=1, asid=10) == 1
    assert t.lookup("d1", 1, 11, 0x1000) is not None
    assert t.inv_va(0x3000, vmid=1, asid=10) == 1  # global entry of ASID 12 matches
    assert t.inv_va(0x1000, vmid=1, asid=None) == 1  # VAA: any ASID
    assert t.inv_va(0x300000, vmid=1, asid=10) == 1  # inside the 2M block
    t = _fill()
    assert t.inv_va(0, 0x400000, vmid=1, asid=10) == 3  # range: both entries + global
    assert t.inv_ipa(0x1000, vmid=2) == 2  # S2 entry and the nested one built from it
    assert t.inv_va(0x1000, vmid=EL2_VMID, asid=10) == 1
    assert t.invalidated == 6


def test_tlbi_range_decoding():
    assert tlbi_range(0x12345, tg=0) == (0x12345, 1)
    assert tlbi_range(0x12345, num=3, scale=1, tg=1) == (0x12000, 8 * 0x1000)
    assert tlbi_range(0x30000, num=0, scale=0, tg=3, ttl=3) == (0x30000, 0x10000)
    assert tlbi_range(0x8000, num=31, scale=2, tg=2) == (0x8000, 32 * 4 * 0x4000)


def test_fill_from_walk_results():
    mem, al = memory()
    pt = b.PageTable(mem, al)
    pt.map_range(0x10000, BASE + 0x100000, 0x4000)
    iovas = np.array([0x10000, 0x10008, 0x13fff, 0x20000], np.uint64)
    res = walk(mem, s1_config(pt), None, iovas, write=False)
    t = TLB()
    assert t.insert_results("d", 0, 1, iovas, res) == 2
    assert t.lookup("d", 0, 1, 0x10010).translate(0x10010) == BASE + 0x100010
    assert t.lookup("d", 0, 1, 0x20000) is None


def test_cd_cache_keyed_by_stream_and_substream():
    c = CdCache(capacity=8)
    for sid in range(2):
        c.put(sid, None, "cd")
        c.put(sid, 0, "cd0")
        c.put(sid, 3, "cd3")
    assert c.get(1, 3) == "cd3" and c.hits == 1
    c.inv_cd(1, 0)  # CFGI_CD SSID 0 also covers no-PASID traffic
    assert c.get(1, None) is None and c.get(1, 0) is None and c.get(1, 3) == "cd3"
    assert c.get(0, 0) == "cd0"  # another stream: untouched
    c.inv_sid(1)  # CFGI_CD_ALL / CFGI_STE
    assert c.get(1, 3) is None and c.get(0, 3) == "cd3"
    c.inv_all()
    assert len(c) == 0 and c.invalidated == 6
    for i in range(20):
        c.put(i, None, i)
    assert c.evictions == 12 and c.stats()["entries"] == 8
    assert c.get(11, None) is None and c.get(12, None) == 12  # the oldest went


def test_whole_context_flushes_keep_what_survives_them():
    """NH_ASID / NH_ALL drop a context whole unless it holds global (resp. stage-2)
    entries; the per-context counts follow inserts, replacements, evictions and drops."""
    t = TLB(capacity=64)
    for i in range(8):
        t.insert("d", 0, 7, i << 12, 0x8000_0000 + (i << 12), 0x1000, 3, global_=(i == 5))
    t.insert("o", 0, 9, 0, 0x9000_0000, 0x1000, 3)  # another ASID: untouched
    assert t.inv_asid(7, 0) == 7
    assert t.lookup("d", 0, 7, 5 << 12) is not None and len(t) == 2
    # the global entry replaced by a non-global one: the context now goes whole
    t.insert("d", 0, 7, 5 << 12, 0x8000_5000, 0x1000, 3, global_=False)
    t.insert("d", 0, 7, 6 << 12, 0x8000_6000, 0x1000, 3)
    assert t.inv_asid(7, 0) == 2 and t.lookup("d", 0, 7, 5 << 12) is None
    assert t.lookup("o", 0, 9, 0) is not None and t.invalidated == 9
    # a global entry evicted: NH_ASID then drops everything that is left
    t = TLB(capacity=2)
    t.insert("d", 0, 7, 0, 0, 0x1000, 3, global_=True)
    t.insert("d", 0, 7, 1 << 12, 0, 0x1000, 3)
    t.insert("d", 0, 7, 2 << 12, 0, 0x1000, 3)  # evicts the global one
    assert t.evictions == 1 and t.inv_asid(7, 0) == 2 and len(t) == 0
    # stage-2 entries survive NH_ALL in a mixed context; S12_VMALL takes all
    t = TLB()
    t.insert("n", 3, NO_ASID, 0, 0x1000, 0x1000, 3, stage="s2", ipa=0)
    t.insert("n", 3, NO_ASID, 1 << 12, 0x2000, 0x1000, 3, stage="nested", ipa=0x5000)
    assert t.inv_nh_all(3) == 1 and t.lookup("n", 3, NO_ASID, 0) is not None
    assert t.inv_vmid(3) == 1 and len(t) == 0
    assert t.inv_asid(7, 0) == 0 and t.inv_tag("n") == 0


def test_find_and_held_follow_invalidation_and_eviction():
    t = TLB(capacity=3)
    t.insert(1, 0, 5, 0x1000, 0x8000, 0x1000, 3)
    t.insert(1, 0, 5, 0x2000, 0x9000, 0x1000, 3)
    found = [t.find(1, 0, 5, 0x1abc), t.find(1, 0, 5, 0x2000)]
    assert None not in found and found[0][1].translate(0x1abc) == 0x8abc
    assert (t.hits, t.misses) == (0, 0)  # find counts nothing
    assert t.find(1, 0, 6, 0x1000) is None  # another ASID
    assert t.held(found) and t.hits == 2  # held counts the hits it stands for
    t.inv_va(0x2000, 1, vmid=0, asid=5)
    assert not t.held(found) and t.held(found[:1])
    t.insert(1, 0, 5, 0x1000, 0xA000, 0x1000, 3)  # refilled: another entry
    assert not t.held(found[:1])
    again = [t.find(1, 0, 5, 0x1000)]
    t.insert(1, 0, 5, 0x3000, 0, 0x1000, 3)
    t.insert(1, 0, 5, 0x4000, 0, 0x1000, 3)
    t.insert(1, 0, 5, 0x5000, 0, 0x1000, 3)  # evicts the oldest
    assert not t.held(again)


def test_range_invalidation_drops_exactly_the_overlapping_entries():
    """A TLBI_NH_VA range over many cached entries -- looked up key by key when that is
    fewer keys than the context holds, else scanned -- drops exactly the stage-1 entries
    it overlaps (4 KiB, 64 KiB and 2 MiB leaves, global entries of another ASID), as a
    brute-force overlap test over every entry says."""
    rng = np.random.default_rng(12)
    for _ in range(40):
        t = TLB(capacity=0)
        live: dict[tuple[int, int, int], bool] = {}  # (asid, va, size) -> global
        for _ in range(int(rng.integers(1, 1200))):
            size = int(rng.choice([0x1000, 0x10000, 0x200000]))
            va = int(rng.integers(0, 1 << 30)) & ~(size - 1)
            asid, glob = (10, False) if rng.random() < 0.8 else (11, bool(rng.random() < 0.5))
            t.insert("d", 1, asid, va, va, size, 3, global_=glob)
            live[(asid, va, size)] = glob  # a fill of the same key replaces the entry
        start = int(rng.integers(0, 1 << 30)) & ~0xFFF
        length = int(rng.choice([0x1000, 0x40000, 0x100000, 0x1000000]))
        gone = {k for k, g in live.items()
                if (k[0] == 10 or g) and k[1] < start + length and start < k[1] + k[2]}
        assert t.inv_va(start, length, vmid=1, asid=10) == len(gone)
        assert len(t) == len(live) - len(gone)
        for asid, va, size in live.keys() - gone:  # each survivor still translates its base
            e = t.find("d", 1, asid, va)
            assert e is not None and e[1].va <= va < e[1].va + e[1].size


def _walked(maps: list[tuple[int, int, int, bool]], iovas: list[int]):
    """Walk ``iovas`` (one per page) through 4 KiB mappings (iova, pa, length, read-only)."""
    mem, al = memory()
    pt = b.PageTable(mem, al)
    for iova, pa, length, ro in maps:
        pt.map_range(iova, pa, length, read_only=ro)
    va = np.array(iovas, np.uint64)
    return va, walk(mem, s1_config(pt), None, va, write=False)


def test_pages_continuing_one_another_fill_one_entry_per_aligned_run_size():
    """1 MiB of 4 KiB pages contiguous in IOVA and PA, both 1 MiB aligned: one entry
    translating all 256 pages; a run that is only 64 KiB aligned fills 64 KiB entries; a
    run broken by another output address or other permissions stays per page."""
    pa = BASE + 0x100000
    va, res = _walked([(0x100000, pa, 0x100000, False)],
                      [0x100000 + (i << 12) for i in range(256)][::-1])  # any order
    t = TLB()
    assert t.insert_results("d", 0, 1, va, res) == 1 and len(t) == 1
    for i in (0, 77, 255):
        e = t.lookup("d", 0, 1, 0x100000 + (i << 12) + 5)
        assert e is not None and e.size == 0x100000 and e.level == 3
        assert e.translate(0x100000 + (i << 12) + 5) == pa + (i << 12) + 5
    # 32 pages 64 KiB aligned (not 1 MiB): two 64 KiB entries
    va, res = _walked([(0x210000, BASE + 0x30000, 0x20000, False)],
                      [0x210000 + (i << 12) for i in range(32)])
    t = TLB()
    assert t.insert_results("d", 0, 1, va, res) == 2
    assert {t.lookup("d", 0, 1, 0x210000 + (i << 12)).size for i in range(32)} == {0x10000}
    # the output not contiguous at page 8, page 20 read-only: per page around them
    va, res = _walked([(0x300000, BASE + 0x200000, 0x8000, False),
                       (0x308000, BASE + 0x400000, 0xC000, False),
                       (0x314000, BASE + 0x40C000, 0x1000, True),
                       (0x315000, BASE + 0x40D000, 0xB000, False)],
                      [0x300000 + (i << 12) for i in range(32)])
    t = TLB()
    assert t.insert_results("d", 0, 1, va, res) == 32
    assert t.lookup("d", 0, 1, 0x314000).perm != t.lookup("d", 0, 1, 0x315000).perm


def test_an_invalidation_of_one_page_of_a_run_drops_the_whole_entry():
    va, res = _walked([(0x100000, BASE + 0x100000, 0x100000, False)],
                      [0x100000 + (i << 12) for i in range(256)])
    t = TLB()
    t.insert_results("d", 0, 1, va, res)
    assert t.inv_va(0x180000, vmid=0, asid=1) == 1
    assert all(t.find("d", 0, 1, 0x100000 + (i << 12)) is None for i in range(256))


def _per_page(runs: list) -> list:
    """lookup_runs' result, one entry (or None) per page."""
    return [e for e, count in runs for _ in range(count)]


def test_lookup_runs_serves_the_pages_of_one_entry_and_counts_each():
    va, res = _walked([(0x100000, BASE + 0x100000, 0x100000, False)],
                      [0x100000 + (i << 12) for i in range(256)])
    t = TLB()
    t.insert_results("d", 0, 1, va, res)
    t.insert("d", 0, 1, 0x300000, BASE + 0x9000, 0x1000, 3)
    pages = [(0x100000 >> 12) + i for i in range(256)] + [0x200, 0x300]
    got = _per_page(t.lookup_runs("d", 0, 1, pages))
    assert got[:256] == [t.find("d", 0, 1, 0x100000)[1]] * 256
    assert got[256] is None and got[257] is not None and got[257].pa == BASE + 0x9000
    assert t.hits == 257 and t.misses == 1


def test_lookup_runs_gives_a_run_per_entry_and_per_stretch_of_misses():
    """A 1 MiB run entry, then pages no entry holds, then two 4 KiB entries one after the
    other: four runs -- consecutive misses are one run, distinct entries are not merged."""
    va, res = _walked([(0x100000, BASE + 0x100000, 0x100000, False)],
                      [0x100000 + (i << 12) for i in range(256)])
    t = TLB()
    t.insert_results("d", 0, 1, va, res)
    a = t.insert("d", 0, 1, 0x205000, BASE + 0x7000, 0x1000, 3)
    b_ = t.insert("d", 0, 1, 0x206000, BASE + 0x8000, 0x1000, 3)
    pages = list(range(0x100, 0x200)) + list(range(0x200, 0x205)) + [0x205, 0x206]
    runs = t.lookup_runs("d", 0, 1, pages)
    assert [(e.size if e else None, n) for e, n in runs] == [(0x100000, 256), (None, 5),
                                                              (0x1000, 1), (0x1000, 1)]
    assert runs[2][0] is a and runs[3][0] is b_
    assert t.hits == 258 and t.misses == 5
    assert t.lookup_runs("d", 0, 1, []) == []


def test_lookup_runs_finds_what_a_lookup_per_page_finds():
    """Over random contents (4 KiB to 2 MiB entries, global ones in the architectural
    model), lookup_runs gives every page the entry find gives it, or one that also
    translates it (a larger entry the page before hit), and counts one hit or miss per page."""
    rng = np.random.default_rng(3)
    for architectural in (False, True):
        for _ in range(30):
            t = TLB(capacity=0, architectural=architectural)
            for _ in range(int(rng.integers(0, 60))):
                size = int(rng.choice([0x1000, 0x10000, 0x100000, 0x200000]))
                va = int(rng.integers(0, 1 << 24)) & ~(size - 1)
                t.insert("d", 1, int(rng.choice([5, 6])), va, va + (1 << 30), size, 3,
                         global_=bool(rng.random() < 0.3))
            first = int(rng.integers(0, 1 << 12))
            pages = list(range(first, first + int(rng.integers(1, 600))))
            want = [t.find("d", 1, 5, pg << 12) for pg in pages]
            hits, misses = t.hits, t.misses
            got = _per_page(t.lookup_runs("d", 1, 5, pages))
            for pg, w, g in zip(pages, want, got):
                assert (w is None) == (g is None), hex(pg)
                assert g is None or g.translate(pg << 12) == w[1].translate(pg << 12)
            assert t.hits - hits == sum(w is not None for w in want)
            assert t.misses - misses == sum(w is None for w in want)
