"""smmuv3.ptdump (leaf descriptors of a stage, bounded and paged) and smmuv3.stream_view
(query-viommu-stream's decoding: STE -> CDs -> mappings) over tables built in guest memory."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.ptdump import MAX_TABLES, leaves, perms
from viommu_backend.smmuv3.stream_view import describe_stream
from viommu_backend.smmuv3.walker import walk_one

from tests.support.walker_env import (BASE, IPA_OFF, memory, nested_s1_builder, nested_s2, s1_config, s1_table,
                        s2_config, s2_table)

DATA = BASE + (40 << 20)


def all_leaves(mem, cfg, limit=3, **kw):
    """Every leaf, read page by page of ``limit``."""
    out, start, pages = [], 0, 0
    while start is not None:
        page = leaves(mem, cfg, start=start, limit=limit, **kw)
        out += page.leaves
        start = page.next
        pages += 1
        assert pages < 1000
    return out, pages


@pytest.mark.parametrize("gs", [12, 14, 16])
def test_stage1_leaves_in_order_agree_with_the_walker(gs):
    mem, al = memory()
    pt = s1_table(mem, al, gs)
    g = 1 << gs
    block = 1 << pt.shift(2)
    maps = [(0x10 * g, DATA, g), (0x11 * g, DATA + 5 * g, g), (3 * block, BASE, block),
            ((1 << (pt.ia_bits - 1)) + 7 * g, DATA + 9 * g, g)]
    for va, pa, size in maps:
        pt.map(va, pa, size, read_only=(va == 0x11 * g))
    cfg = s1_config(pt)
    got, pages = all_leaves(mem, cfg, limit=3)
    assert pages == 2
    assert [(lf.iova, lf.oa, lf.size) for lf in got] == sorted(maps)
    for lf in got:
        t = walk_one(mem, cfg, None, lf.iova + 8, write=False)
        assert t.fault == 0 and t.pa == lf.oa + 8 and t.page_size == lf.size and t.level == lf.level
    ro = next(lf for lf in got if lf.iova == 0x11 * g)
    assert perms(ro, False) & fl.PERM_W == 0 and perms(got[0], False) & fl.PERM_W
    assert ro.attrs(False)["AP2"] == 1 and "OA" not in ro.attrs(False)


def test_start_in_the_middle_and_limits():
    mem, al = memory()
    pt = s1_table(mem, al, 12)
    for i in range(20):
        pt.map(0x100000 + i * 0x1000, DATA + i * 0x1000)
    cfg = s1_config(pt)
    page = leaves(mem, cfg, start=0x105000, limit=4)
    assert [lf.iova for lf in page.leaves] == [0x105000, 0x106000, 0x107000, 0x108000]
    assert page.next == 0x109000 and page.tables == 3  # L1, L2, L3 of a 39-bit table
    assert leaves(mem, cfg, start=0x100000 + 20 * 0x1000).leaves == []
    assert leaves(mem, cfg, start=1 << 39).leaves == []
    assert len(leaves(mem, cfg, limit=10**9).leaves) == 20  # clamped to MAX_LIMIT, all fit


def test_stage2_with_concatenated_start_tables():
    mem, al = memory()
    pt = s2_table(mem, al, 12)  # 4K granule, start level 1, 40-bit IPA: two concatenated tables
    g = 1 << 12
    maps = [(0, DATA, g), ((1 << 39) + g, DATA + g, g), (1 << 31, BASE, 1 << 30)]
    for va, pa, size in maps:
        pt.map(va, pa, size, write=(va != 0))
    cfg = s2_config(pt)
    got, _ = all_leaves(mem, cfg, limit=2)
    assert [(lf.iova, lf.oa, lf.size) for lf in got] == sorted(maps)
    assert perms(got[0], True) == fl.PERM_R | fl.PERM_X and perms(got[1], True) & fl.PERM_W


def test_nested_stage1_tables_are_read_through_stage2():
    mem, al = memory()
    s2pt, s2 = nested_s2(mem, al, 12)
    s1 = nested_s1_builder(mem, al, 12, 39)
    s1.map(0x4000, DATA + IPA_OFF)
    cfg = s1_config(s1)
    assert leaves(mem, cfg).errors  # table addresses are IPAs: not readable as PAs
    to_pa = lambda ipa: walk_one(mem, None, s2, ipa, write=False).pa  # noqa: E731
    page = leaves(mem, cfg, table_pa=to_pa)
    assert [(lf.iova, lf.oa) for lf in page.leaves] == [(0x4000, DATA + IPA_OFF)] and not page.errors


def test_tables_outside_memory_and_huge_sparse_trees_are_bounded():
    mem, al = memory()
    pt = s1_table(mem, al, 12)
    pt.map(0x1000, DATA)
    pt.set_desc(0x40_0000_0000, 1, b.table_desc(0x10_0000_0000))  # a table the guest never had
    page = leaves(mem, s1_config(pt))
    assert [lf.iova for lf in page.leaves] == [0x1000]
    assert page.errors == ["level 2 table at 0x1000000000 is outside guest memory"]
    # a tree of more tables than one call reads: the page ends early with a resume point
    empty = al.alloc(4096)
    for i in range(MAX_TABLES + 10):
        pt.set_desc((i + 2) << 21, 2, b.table_desc(empty))  # empty L3 tables (all the same one)
    page = leaves(mem, s1_config(pt), limit=1024)
    assert page.tables == MAX_TABLES and page.next is not None


# -------------------------------------------------------------------------- stream_view
STRTAB = BASE + (56 << 20)  # above the tables walker_env's allocator hands out


@dataclass
class Table:
    enabled: bool = True
    base: int = STRTAB
    fmt: int = regs.STRTAB_FMT_LINEAR
    log2size: int = 9
    split: int = 0


def ste(mem, sid, words):
    b.write_words(mem, STRTAB + sid * fl.STE_SIZE, words)


def cd_at(mem, addr, pt, asid):
    b.write_words(mem, addr, b.make_cd(pt.root, asid=asid, tsz=64 - pt.ia_bits))


def test_a_stage1_stream_with_substreams():
    mem, al = memory()
    cds = al.alloc(64 * 8, 4096)
    tables = []
    for ssid in (0, 2, 5):
        pt = s1_table(mem, al, 12)
        for i in range(ssid + 1):
            pt.map(0x10000 + i * 0x1000, DATA + (ssid << 16) + i * 0x1000)
        cd_at(mem, cds + ssid * 64, pt, asid=10 + ssid)
        tables.append(pt)
    ste(mem, 0x100, b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=cds, s1_cdmax=3))
    out = describe_stream(mem, Table(), 0x100, max_ssids=2, limit=4)
    assert out["config"] == "s1" and out["ste"]["fields"]["S1CDMax"] == 3
    assert out["cd-table"] == {"address": cds, "format": 0, "cdmax": 3, "s1dss": 0}
    assert [s["ssid"] for s in out["substreams"]] == [0, 2] and out["next-ssid"] == 3
    s2 = out["substreams"][1]
    assert s2["fields"]["ASID"] == 12 and s2["stage1"]["asid"] == 12
    maps = s2["stage1"]["mappings"]
    assert [(m["iova"], m["pa"], m["size"], m["perm"]) for m in maps] == [
        (0x10000 + i * 0x1000, DATA + (2 << 16) + i * 0x1000, 0x1000, "rwx") for i in range(3)]
    assert s2["stage1"]["next"] is None
    rest = describe_stream(mem, Table(), 0x100, ssid=out["next-ssid"], limit=4)
    assert [s["ssid"] for s in rest["substreams"]] == [5] and rest["next-ssid"] is None
    five = rest["substreams"][0]["stage1"]
    assert len(five["mappings"]) == 4 and five["next"] == 0x14000


def test_stage2_nested_bypass_and_bad_stes():
    mem, al = memory()
    s2pt = s2_table(mem, al, 12)
    s2pt.map(0x8000_0000, DATA, 1 << 21)
    s2cfg = dict(s2_ttb=s2pt.root, s2_t0sz=64 - s2pt.ia_bits, s2_sl0=b.s2_sl0_for(12, s2pt.start_level),
                 s2_vmid=7)
    ste(mem, 1, b.make_ste(fl.STE_CONFIG_S2, **s2cfg))
    out = describe_stream(mem, Table(), 1)
    assert out["config"] == "s2" and out["stage2"]["vmid"] == 7
    assert [(m["iova"], m["pa"], m["size"]) for m in out["stage2"]["mappings"]] == [(0x8000_0000, DATA, 1 << 21)]
    assert "substreams" not in out

    _, s2 = nested_s2(mem, al, 12)
    s1 = nested_s1_builder(mem, al, 12, 39)
    s1.map(0x4000, DATA + IPA_OFF)
    cd_ipa = al.alloc(64, 64) + IPA_OFF
    b.write_words(mem, cd_ipa - IPA_OFF, b.make_cd(s1.root, asid=3, tsz=25))
    nested = dict(s2_ttb=s2.ttb, s2_t0sz=s2.t0sz, s2_sl0=s2.sl0, s2_vmid=9)
    ste(mem, 2, b.make_ste(fl.STE_CONFIG_NESTED, s1_ctx_ptr=cd_ipa, **nested))
    out = describe_stream(mem, Table(), 2)
    m = out["substreams"][0]["stage1"]["mappings"]
    assert out["config"] == "nested" and m == [dict(m[0], iova=0x4000, ipa=DATA + IPA_OFF, pa=DATA)]

    ste(mem, 3, b.make_ste(fl.STE_CONFIG_BYPASS))
    assert describe_stream(mem, Table(), 3)["config"] == "bypass"
    ste(mem, 4, b.make_ste(fl.STE_CONFIG_S1, v=0))
    bad = describe_stream(mem, Table(), 4)
    assert bad["event"] == "C_BAD_STE" and "STE.V == 0" in bad["error"] and "ste" in bad
    assert describe_stream(mem, Table(), 600)["event"] == "C_BAD_STREAMID"
    assert describe_stream(mem, Table(enabled=False), 1) == {"sid": 1, "config": "smmu-disabled"}
    assert describe_stream(mem, Table(base=0x7_0000_0000), 1)["event"] == "F_STE_FETCH"
