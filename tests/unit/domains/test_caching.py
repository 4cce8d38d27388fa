"""The caching model (SMMU option ``cache``) on the whole translation path: a real SMMU
model + domain manager, the command queue driven as a driver would, tables built here,
the sanitizer watching: CD cache keyed by (StreamID, SubstreamID), TLB keyed by ASID not
by domain, walk caches and the ``stale-walk`` rule, counters per cache, probes."""

from __future__ import annotations

import numpy as np
import pytest

from viommu_backend.domains import DomainManager
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.commands import encode_command
from viommu_backend.smmuv3.smmu_config import SmmuConfig

from tests.support.smmuv3_harness import RAM_BASE, Harness

MB2 = 1 << 21
STRTAB = RAM_BASE + 0x4_0000
TABLES = RAM_BASE + 0x8_0000
DATA = RAM_BASE + 0x20_0000
SID, SID2 = 0x20, 0x21
IOVA = 0x4000_0000


class Smmu:
    """Two streams sharing one CD table (as one master with two StreamIDs), stage 1,
    ASID 1, IOVA -> DATA (2 MiB of pages)."""

    def __init__(self, cache: str) -> None:
        self.h = Harness(SmmuConfig(cache=cache, sanitize=True))
        self.mem = self.h.mem
        self.mgr = DomainManager(lambda: self.mem)
        self.mgr.attach_smmu(self.h.smmu)
        self.seen: list[dict] = []
        self.mgr.sanitizer.listeners.append(self.seen.append)
        self.h.setup_queues()
        self.h.w64("STRTAB_BASE", STRTAB)
        self.h.w32("STRTAB_BASE_CFG", regs.layout("STRTAB_BASE_CFG").encode(FMT=0, LOG2SIZE=6))
        self.h.w32("CR0", regs.layout("CR0").encode(SMMUEN=1, CMDQEN=1, EVTQEN=1))
        self.al = b.Allocator(TABLES, 0x10_0000)
        self.pt = b.PageTable(self.mem, self.al)
        self.pt.map_range(IOVA, DATA, MB2)
        self.cd = self.al.alloc(64, 64)
        b.write_words(self.mem, self.cd, b.make_cd(self.pt.root, asid=1))
        for sid in (SID, SID2):
            self.ste(sid, self.cd)

    def ste(self, sid: int, cd: int) -> None:
        b.write_words(self.mem, STRTAB + sid * 64, b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=cd))
        self.cmd(encode_command("CFGI_STE", SID=sid, LEAF=1))

    def cmd(self, *cmds: bytes) -> None:
        self.h.submit(*cmds, encode_command("CMD_SYNC"))

    def pa(self, sid: int, iova: int = IOVA) -> int:
        t = self.mgr.translate_one(sid, None, iova)
        assert not t.fault, t
        return t.pa

    def caches(self) -> dict:
        return self.mgr.stats()["caches"]


def test_cfgi_cd_covers_the_stream_it_names_only_in_the_aggressive_model():
    for cache, sid2_sees_new in (("default", True), ("aggressive", False)):
        s = Smmu(cache)
        assert s.pa(SID) == s.pa(SID2) == DATA
        pt2 = b.PageTable(s.mem, s.al)
        pt2.map(IOVA, DATA + 0x10_0000)
        b.write_words(s.mem, s.cd, b.make_cd(pt2.root, asid=2))  # a new CD in place
        s.cmd(encode_command("CFGI_CD", SID=SID, SSID=0, LEAF=1))
        assert s.pa(SID) == DATA + 0x10_0000, cache
        assert (s.pa(SID2) == DATA + 0x10_0000) == sid2_sees_new, cache
        s.cmd(encode_command("CFGI_CD_ALL", SID=SID2))
        assert s.pa(SID2) == DATA + 0x10_0000


def test_an_asid_reused_without_invalidation_is_stale_only_under_architectural_keys():
    """The driver moves stream SID to a new CD table whose CD reuses ASID 1 over other
    tables and never invalidates ASID 1: the domain-tagged TLB hides it, the
    architectural one serves the old translation and the sanitizer reports it."""
    for cache, stale in (("default", False), ("aggressive", True)):
        s = Smmu(cache)
        assert s.pa(SID) == DATA
        pt2 = b.PageTable(s.mem, s.al)
        pt2.map(IOVA, DATA + 0x10_0000)
        cd2 = s.al.alloc(64, 64)
        b.write_words(s.mem, cd2, b.make_cd(pt2.root, asid=1))
        s.ste(SID, cd2)
        s.ste(SID2, cd2)  # the old CD table has no user left: its domain goes
        assert (s.pa(SID) == DATA) == stale, cache
        assert [v["rule"] for v in s.seen] == (["stale-tlb"] if stale else []), cache
        s.cmd(encode_command("TLBI_NH_ASID", ASID=1))
        assert s.pa(SID) == DATA + 0x10_0000


def test_walk_cache_through_the_command_queue_and_the_stale_walk_rule():
    s = Smmu("aggressive")
    assert s.pa(SID) == DATA
    new_l3 = s.al.alloc(4096)
    for i in range(512):
        s.mem.write_u64(new_l3 + 8 * i, b.s1_leaf(DATA + MB2 + (i << 12), 3))
    s.pt.set_desc(IOVA, 2, b.table_desc(new_l3))  # a new last-level table
    # the driver invalidates the leaves only (Leaf=1, TTL level 3 in the range form)
    s.cmd(encode_command("TLBI_NH_VA", ASID=1, ADDR=IOVA, LEAF=1, TG=1, TTL=3, NUM=31,
                         SCALE=4))
    assert s.pa(SID, IOVA + 0x5000) == DATA + 0x5000  # walked through the cached table
    (v,) = s.seen
    assert v["rule"] == "stale-walk" and v["now-pa"] == DATA + MB2 + 0x5000
    c = s.caches()["walk"]
    assert c["hits"] >= 3 and c["invalidated"] == 0
    s.cmd(encode_command("TLBI_NH_VA", ASID=1, ADDR=IOVA, LEAF=0))  # non-leaf
    assert s.caches()["walk"]["invalidated"] == 3
    s.cmd(encode_command("TLBI_NH_VA", ASID=1, ADDR=IOVA + 0x5000, LEAF=1))
    assert s.pa(SID, IOVA + 0x5000) == DATA + MB2 + 0x5000 and len(s.seen) == 1


def test_query_viommu_has_counters_per_cache():
    s = Smmu("aggressive")
    s.pa(SID)
    s.pa(SID)
    s.mgr.translate(SID2, None, np.arange(16, dtype=np.uint64) * np.uint64(4096)
                    + np.uint64(IOVA))
    c = s.caches()
    assert c["model"] == "aggressive" and s.mgr.stats()["tlb"]["capacity"] == 0
    assert c["config"]["hits"] == 1 and c["config"]["misses"] == 2  # a context per stream
    assert c["config"]["ste-fetches"] >= 2
    assert c["cd"]["misses"] == 2 and c["cd"]["entries"] == 2
    assert c["walk"]["entries"] == 3 and c["walk"]["misses"] == 3 and c["walk"]["hits"] >= 3
    assert Smmu("default").caches() == {"model": "default", "config": {
        "hits": 0, "misses": 0, "ste-fetches": 0, "invalidated": 0}}


def test_a_probe_fills_and_counts_nothing():
    s = Smmu("aggressive")
    before = s.caches()
    t, _ = s.mgr.probe(SID, None, IOVA)
    assert t.pa == DATA and s.caches() == before and len(s.mgr.tlb) == 0


@pytest.mark.parametrize("cache", ["default", "aggressive"])
def test_a_changed_ste_or_cd_used_after_a_sync_without_cfgi_is_stale(cache):
    """The driver rewrites the CD (a new ASID over new tables), then the STE (another CD
    table), each followed by CMD_SYNC but no CFGI: the cached configuration keeps being
    used; once a CMD_SYNC has completed since the change was seen the sanitizer reports
    it; the CFGI, late, makes it right."""
    s = Smmu(cache)
    assert s.pa(SID) == DATA
    pt2 = b.PageTable(s.mem, s.al)
    pt2.map(IOVA, DATA + 0x10_0000)
    b.write_words(s.mem, s.cd, b.make_cd(pt2.root, asid=2))
    assert s.pa(SID) == DATA and s.seen == []  # noted: a CFGI may be on its way
    s.cmd()  # CMD_SYNC alone
    assert s.pa(SID) == DATA
    (v,) = s.seen
    assert v["rule"] == "stale-cd" and v["sid"] == SID and "asid=2" in v["now"]
    s.cmd(encode_command("CFGI_CD", SID=SID, SSID=0, LEAF=1))
    assert s.pa(SID) == DATA + 0x10_0000
    # the CD's ASID (qword 0) and TTB0 (qword 1) changed at once while valid: torn too
    assert [v["rule"] for v in s.seen] == ["stale-cd", "torn-cd"]
    b.write_words(s.mem, STRTAB + SID * 64, b.make_ste(fl.STE_CONFIG_BYPASS))
    s.pa(SID)
    s.cmd()
    assert s.pa(SID) == DATA + 0x10_0000
    assert [v["rule"] for v in s.seen] == ["stale-cd", "torn-cd", "stale-ste"]
    s.cmd(encode_command("CFGI_STE", SID=SID, LEAF=1))
    assert s.pa(SID) == IOVA and len(s.seen) == 3  # bypass now


def test_a_cfgi_in_time_is_clean():
    s = Smmu("aggressive")
    s.pa(SID)
    b.write_words(s.mem, s.cd, b.make_cd(s.pt.root, asid=3))
    s.pa(SID)  # between the write and its CFGI (noted, not reported)
    s.cmd(encode_command("CFGI_CD", SID=SID, SSID=0, LEAF=1),
          encode_command("CFGI_CD", SID=SID2, SSID=0, LEAF=1))
    s.pa(SID)
    s.pa(SID2)
    s.cmd()
    assert s.pa(SID) == s.pa(SID2) == DATA and s.seen == []
