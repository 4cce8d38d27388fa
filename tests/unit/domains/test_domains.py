"""Domain manager: object graph (attach/replace/detach, nesting, coherency, groups, faults,
refcounts) and translation / DMA over real page tables in real (memfd) guest memory."""

from __future__ import annotations

import numpy as np
import pytest

from viommu_backend.domains import (ABORT, BusyError, DmaFault, DomainError,
                                    FaultResponse, HwptNested, HwptPaging)
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.ste import decode_ste

from tests.support.domain_env import Env, LOG2SIZE, data_page
from tests.support.walker_env import BASE, SIZE


# -- object graph -------------------------------------------------------------------------------
def test_bypass_and_abort_domains():
    env = Env()
    env.set_ste(1, b.make_ste(fl.STE_CONFIG_BYPASS))
    env.set_ste(2, b.make_ste(fl.STE_CONFIG_BYPASS))
    env.set_ste(3, b.make_ste(fl.STE_CONFIG_ABORT))
    m = env.mgr
    d1, d2, d3 = m.add_device(1), m.add_device(2), m.add_device(3)
    assert isinstance(d1.hwpt, HwptPaging) and d1.hwpt.identity
    assert d1.hwpt is d2.hwpt and d1.hwpt.refcount == 2
    assert d3.hwpt is m.blocking
    t = m.translate_one(1, None, 0x1234_5678)
    assert t.fault == 0 and t.pa == 0x1234_5678
    assert m.translate_one(3, None, 0x1000).fault == ABORT
    r = m.translate(3, None, [0x1000, 0x2000])
    assert r.fault_name(0) == "ABORT" and (r.fault == ABORT).all()
    assert env.events == []  # abort is silent
    with pytest.raises(DmaFault) as ei:
        m.dma_read(3, None, data_page(0), 8)
    assert ei.value.event == "ABORT"


def test_smmu_disabled_follows_gbpa():
    env = Env(enabled=False, gbpa_abort=True)
    d = env.mgr.add_device(5)
    assert d.hwpt is env.mgr.blocking
    env.gbpa_abort = False
    env.mgr.stream_table_changed()
    assert isinstance(d.hwpt, HwptPaging) and d.hwpt.identity


def test_bad_ste_reports_c_bad_ste_each_transaction():
    env = Env()
    env.set_ste(4, b.make_ste(fl.STE_CONFIG_S1, v=0))
    d = env.mgr.add_device(4)
    assert d.hwpt is env.mgr.blocking and d.config_fault.event == "C_BAD_STE"
    assert env.mgr.translate_one(4, None, 0x1000).fault == fl.EventId.C_BAD_STE
    env.mgr.translate(4, None, np.arange(4, dtype=np.uint64) << np.uint64(12))
    assert [e["name"] for e in env.events] == ["C_BAD_STE", "C_BAD_STE"]
    assert env.events[0]["STREAMID"] == 4
    # SID beyond the table
    assert env.mgr.translate_one(1 << LOG2SIZE, None, 0).fault == fl.EventId.C_BAD_STREAMID


def test_nested_domains_shared_and_never_mixed():
    env = Env()
    pt = env.s1_table()
    cd = env.cd(pt)
    _, s2a = env.s2_table(vmid=7)
    _, s2b = env.s2_table(vmid=8)
    nested_a = b.make_ste(fl.STE_CONFIG_NESTED, s1_ctx_ptr=cd, **s2a)
    env.set_ste(10, nested_a)
    env.set_ste(11, nested_a)
    env.set_ste(12, b.make_ste(fl.STE_CONFIG_NESTED, s1_ctx_ptr=cd, **s2b))
    env.set_ste(13, b.make_ste(fl.STE_CONFIG_S2, **s2a))
    env.set_ste(14, env.s1_ste(cd))
    m = env.mgr
    d10, d11, d12, d13, d14 = (m.add_device(s) for s in (10, 11, 12, 13, 14))
    assert isinstance(d10.hwpt, HwptNested) and d10.hwpt is d11.hwpt
    pa = d10.hwpt.parent
    assert pa.nest_parent and pa.s2.vmid == 7 and pa.refcount == 2  # d13 + nested child
    # same CD table on another S2: another nested domain on another parent
    assert isinstance(d12.hwpt, HwptNested) and d12.hwpt is not d10.hwpt
    assert d12.hwpt.parent is not pa and d12.hwpt.parent.s2.vmid == 8
    # the S2-only stream with the same S2 reuses the NEST_PARENT paging domain
    assert d13.hwpt is pa
    # stage 1 only: nested on an identity NEST_PARENT
    assert isinstance(d14.hwpt, HwptNested) and d14.hwpt.parent.identity
    assert d14.hwpt.parent.nest_parent
    g = m.describe()
    assert {"sid": 10, "hwpt": d10.hwpt.id} in g["attachments"]
    kinds = sorted(h["kind"] for h in g["hwpts"])
    assert kinds == ["hwpt_blocking", "hwpt_nested", "hwpt_nested", "hwpt_nested",
                     "hwpt_paging", "hwpt_paging", "hwpt_paging"]


def test_nested_ste_with_s2fwb_only_where_idr3_fwb():
    """The STE arm-smmu-v3 writes for a nested domain on an SMMU with FWB (S2FWB=1, stage-2
    MemAttr 0b0110 forced Write-Back): C_BAD_STE on every transaction where the SMMU does
    not advertise FWB; translated through both stages where it does."""
    env = Env()
    pt = env.s1_table()
    pt.map(0x10_0000, BASE + 0x30_0000)
    cd = env.cd(pt)
    s2pt = b.PageTable(env.mem, env.al, ia_bits=40, start_level=1, stage2=True)
    for off in range(0, SIZE, 2 << 20):
        s2pt.map(BASE + off, BASE + off, 2 << 20, mem_attr=0b0110)
    ste = b.make_ste(fl.STE_CONFIG_NESTED, s1_ctx_ptr=cd, S2FWB=1, s2_ttb=s2pt.root,
                     s2_t0sz=24, s2_sl0=b.s2_sl0_for(12, 1), s2_vmid=9)
    env.set_ste(20, ste)
    m = env.mgr
    d = m.add_device(20)
    assert d.hwpt is m.blocking and d.config_fault.event == "C_BAD_STE"
    assert m.translate_one(20, None, 0x10_0000).fault == fl.EventId.C_BAD_STE
    assert [e["name"] for e in env.events] == ["C_BAD_STE"]
    m.fwb = True  # SMMU_IDR3.FWB
    env.set_ste(20, ste)
    assert isinstance(d.hwpt, HwptNested) and d.hwpt.parent.s2.fwb
    t = m.translate_one(20, None, 0x10_0123)
    assert t.fault == 0 and t.pa == BASE + 0x30_0123
    assert m.counters.nested_translations >= 1


def test_coherency_autodetected_from_first_device():
    env = Env()
    bypass = b.make_ste(fl.STE_CONFIG_BYPASS)
    for sid in (1, 2, 3):
        env.set_ste(sid, bypass)
    m = env.mgr
    a = m.add_device(1, can_enforce_coherency=True)
    assert a.hwpt.enforce_cache_coherency
    bdev = m.add_device(2, can_enforce_coherency=False)
    assert bdev.hwpt is not a.hwpt and not bdev.hwpt.enforce_cache_coherency
    c = m.add_device(3, can_enforce_coherency=True)
    assert c.hwpt is a.hwpt  # compatible: reused
    # explicit attach of the incompatible device to the enforcing domain is refused
    with pytest.raises(DomainError):
        m.replace(2, a.hwpt.id)
    assert bdev.hwpt is not a.hwpt


def test_replace_and_detach_free_auto_domains_and_their_tlb_entries():
    env = Env()
    pt = env.s1_table()
    pt.map(0x10000, data_page(0))
    env.set_ste(1, env.s1_ste(env.cd(pt)))
    m = env.mgr
    d = m.add_device(1)
    nested = d.hwpt
    parent = nested.parent
    assert m.translate_one(1, None, 0x10010).pa == data_page(0) + 0x10
    assert len(m.tlb) == 1
    env.set_ste(1, b.make_ste(fl.STE_CONFIG_BYPASS))
    # the identity NEST_PARENT the nested domain sat on is compatible: reused
    assert d.hwpt is parent and parent.identity and parent.refcount == 1
    assert nested.destroyed and nested.id not in m.objects and len(m.tlb) == 0
    assert m.counters.replaces == 1
    m.remove_device(1)
    assert m.counters.detaches == 1 and 1 not in m.devices
    assert parent.destroyed and parent.id not in m.objects
    assert all(h.refcount == 0 or h is m.blocking for h in m.hwpts)


def test_refcounts_refuse_destroy_in_use():
    env = Env()
    m = env.mgr
    pt = env.s1_table()
    s1ctx = decode_ste(env.s1_ste(env.cd(pt))).s1
    plain = m.alloc_paging(None)
    with pytest.raises(DomainError):
        m.alloc_nested(plain, s1ctx)  # not a NEST_PARENT
    parent = m.alloc_paging(None, nest_parent=True)
    nested = m.alloc_nested(parent.id, s1ctx)
    with pytest.raises(BusyError):
        m.destroy(parent.id)
    env.set_ste(20, b.make_ste(fl.STE_CONFIG_ABORT))
    m.add_device(20)
    m.detach(20)
    m.attach(20, nested.id)
    assert nested.refcount == 1
    with pytest.raises(BusyError):
        m.destroy(nested.id)
    with pytest.raises(BusyError):
        m.attach(20, plain.id)  # already attached: replace is the way
    m.replace(20, plain.id)
    m.destroy(nested.id)
    assert nested.destroyed and parent.refcount == 0
    m.destroy(parent.id)
    with pytest.raises(BusyError):
        m.destroy(m.ioas.id)
    with pytest.raises(DomainError):
        m.destroy(nested.id)  # already gone


def test_group_attach_is_all_or_nothing_and_ste_split_reported():
    env = Env()
    bypass = b.make_ste(fl.STE_CONFIG_BYPASS)
    for sid in (30, 31):
        env.set_ste(sid, bypass)
    m = env.mgr
    a = m.add_device(30, group="g0")
    c = m.add_device(31, group="g0", can_enforce_coherency=False)
    # first device enforced coherency, the second could not: the STE path split the group
    assert a.hwpt is not c.hwpt
    assert m.split_groups() == ["g0"]
    loose = m.alloc_paging(None, enforce_cache_coherency=False)
    strict = m.alloc_paging(None, enforce_cache_coherency=True)
    with pytest.raises(DomainError):
        m.replace(30, strict.id)  # 31 cannot join: nothing moves
    assert a.hwpt is not strict and c.hwpt is not strict
    m.replace(30, loose.id)  # the whole group moves
    assert a.hwpt is loose and c.hwpt is loose and m.split_groups() == []
    m.detach(31)
    assert a.hwpt is None and c.hwpt is None and loose.refcount == 0


# -- faults -----------------------------------------------------------------------------------------
def test_page_requests_answered_and_flushed_invalid_on_replace():
    env = Env()
    pt = env.s1_table()
    env.set_ste(40, env.s1_ste(env.cd(pt)))
    m = env.mgr
    d = m.add_device(40)
    fq = d.hwpt.fault
    assert fq is not None
    p1 = m.page_request(40, None, 0x5000, prg_index=3, write=True)
    p2 = m.page_request(40, None, 0x6000, prg_index=4)
    assert len(fq) == 2 and not p1.done
    assert env.prs[0]["SID"] == 40 and env.prs[0]["PRG_INDEX"] == 3 and env.prs[0]["WRITE"] == 1
    seen = []
    p2.add_done_callback(lambda pf: seen.append(pf.response))
    m.pri_resp(40, None, 3, 2)  # CMD_PRI_RESP success
    assert p1.response is FaultResponse.SUCCESS and len(fq) == 1
    m.pri_resp(40, None, 99, 2)  # unknown group: ignored
    env.set_ste(40, b.make_ste(fl.STE_CONFIG_BYPASS))  # replace away from the fault domain
    assert p2.response is FaultResponse.INVALID and seen == [FaultResponse.INVALID]
    # identity domain has no fault queue: answered INVALID at once, nothing queued
    p3 = m.page_request(40, None, 0x7000, prg_index=5)
    assert p3.response is FaultResponse.INVALID and len(env.prs) == 2


def test_stall_event_resume_and_stall_term():
    env = Env()
    pt = env.s1_table()
    env.set_ste(41, env.s1_ste(env.cd(pt, S=1)))
    m = env.mgr
    m.add_device(41)
    t = m.translate_one(41, None, 0x9000, write=True)
    assert t.fault == fl.EventId.F_TRANSLATION
    ev = env.events[-1]
    assert ev["name"] == "F_TRANSLATION" and ev["STALL"] == 1 and ev["RNW"] == 0
    pf = m.pending_stall(41, ev["STAG"])
    assert pf is not None and pf.addr == 0x9000
    m.resume(41, ev["STAG"], 1)  # retry
    assert pf.response is FaultResponse.SUCCESS
    with pytest.raises(DmaFault) as ei:
        m.dma_write(41, None, 0xA000, b"x")
    assert ei.value.pending is not None and not ei.value.pending.done
    m.stall_term(41)
    assert ei.value.pending.response is FaultResponse.INVALID


def test_fault_recorded_per_cd_r_bit():
    env = Env()
    pt = env.s1_table()
    env.set_ste(42, env.s1_ste(env.cd(pt, record=False)))
    env.mgr.add_device(42)
    assert env.mgr.translate_one(42, None, 0x1000).fault == fl.EventId.F_TRANSLATION
    assert env.events == []  # CD.R = 0: not recorded


# -- translation and DMA ---------------------------------------------------------------------------
def test_clean_tlb_entry_never_lets_a_write_through_without_the_dirty_update():
    """HTTU (CD.HA/HD): a read caches the writable-clean page without W; a write misses,
    walks, marks the descriptor dirty in guest memory, and only then is cached writable.
    The batched path does the same for every page of a long DMA."""
    env = Env()
    pt = env.s1_table()
    for i in range(12):
        pt.map(0x40000 + (i << 12), data_page(i), read_only=True, dbm=True, af=False)
    env.set_ste(51, env.s1_ste(env.cd(pt, asid=11, HA=1, HD=1)))
    m = env.mgr
    clean = pt.get_desc(0x40000, 3)
    assert m.translate_one(51, None, 0x40000).perm & fl.PERM_W == 0
    assert pt.get_desc(0x40000, 3) == clean | fl.PTE_AF  # accessed, still clean
    walks = m.counters.walks
    assert m.translate_one(51, None, 0x40008).fault == 0 and m.counters.walks == walks  # hit
    t = m.translate_one(51, None, 0x40010, write=True)
    assert t.fault == 0 and t.perm & fl.PERM_W and m.counters.walks == walks + 1
    assert pt.get_desc(0x40000, 3) == (clean | fl.PTE_AF) & ~fl.PTE_AP2  # dirty in memory
    m.translate_one(51, None, 0x40018, write=True)
    assert m.counters.walks == walks + 1  # now cached writable
    m.dma_write(51, None, 0x41000, b"\x5a" * (11 << 12))  # batched: 11 pages
    assert all(not pt.get_desc(0x40000 + (i << 12), 3) & fl.PTE_AP2 for i in range(12))
    assert env.mem.read(data_page(11), 4) == b"\x5a" * 4 and env.events == []


def test_ha_ignored_without_idr0_httu():
    env = Env()
    env.mgr.httu = 0  # the SMMU advertises no HTTU: CD.HA has no effect
    pt = env.s1_table()
    pt.map(0x40000, data_page(0), af=False)
    env.set_ste(52, env.s1_ste(env.cd(pt, asid=12, HA=1)))
    assert env.mgr.translate_one(52, None, 0x40000).fault == fl.EventId.F_ACCESS
    assert not pt.get_desc(0x40000, 3) & fl.PTE_AF and env.events[-1]["name"] == "F_ACCESS"


def test_s1_translation_tlb_and_invalidation():
    env = Env()
    pt = env.s1_table()
    pt.map(0x20000, data_page(1))
    pt.map(0x21000, data_page(7), read_only=True)
    env.set_ste(50, env.s1_ste(env.cd(pt, asid=9)))
    m = env.mgr
    m.add_device(50)
    assert m.translate_one(50, None, 0x20008).pa == data_page(1) + 8
    walks = m.counters.walks
    assert m.translate_one(50, None, 0x20ff0).pa == data_page(1) + 0xff0
    assert m.counters.walks == walks  # TLB hit
    t = m.translate_one(50, None, 0x21000, write=True)
    assert t.fault == fl.EventId.F_PERMISSION
    assert env.events[-1]["name"] == "F_PERMISSION"
    # remap without TLBI: the cached translation stays (as on hardware)
    pt.map(0x20000, data_page(2))
    assert m.translate_one(50, None, 0x20000).pa == data_page(1)
    m.tlbi_nh_va(vmid=0, asid=9, addr=0x20000, size=0, leaf=True, ttl=0)
    assert m.translate_one(50, None, 0x20000).pa == data_page(2)
    # batched: hits, misses and faults mixed, one event per faulting page
    n_ev = len(env.events)
    r = m.translate(50, None, [0x20004, 0x21008, 0x30000, 0x30008])
    assert r.fault[:2].tolist() == [0, 0] and r.pa[0] == data_page(2) + 4
    assert r.pa[1] == data_page(7) + 8
    assert r.fault_name(2) == r.fault_name(3) == "F_TRANSLATION"
    assert len(env.events) == n_ev + 1 and r.domain == m.devices[50].hwpt.id
    m.tlbi_nh_asid(vmid=0, asid=9)
    assert len(m.tlb) == 0


def test_cd_change_needs_cfgi():
    env = Env()
    pt1, pt2 = env.s1_table(), env.s1_table()
    pt1.map(0x4000, data_page(3))
    pt2.map(0x4000, data_page(4))
    cd = env.cd(pt1, asid=1)
    env.set_ste(51, env.s1_ste(cd))
    m = env.mgr
    m.add_device(51)
    assert m.translate_one(51, None, 0x4000).pa == data_page(3)
    b.write_words(env.mem, cd, b.make_cd(pt2.root, asid=2))
    assert m.translate_one(51, None, 0x4000).pa == data_page(3)  # CD cached
    m.cd_changed(51, None)
    assert m.translate_one(51, None, 0x4000).pa == data_page(4)
    assert m.devices[51].hwpt.asids == [2]


def test_nested_translation_and_s2_invalidation():
    env = Env()
    ipa_off = 0x1_0000_0000
    s2pt, s2 = env.s2_table(vmid=3, ipa_off=ipa_off)
    # stage-1 tables live in IPA space for a nested stream
    s1pt = b.PageTable(env.mem, env.al, to_pa=lambda ipa: ipa - ipa_off,
                       alloc_ipa=lambda size: env.al.alloc(size, 4096) + ipa_off)
    s1pt.map(0x7000, data_page(5) + ipa_off)
    cd_pa = env.al.alloc(64, 64)
    b.write_words(env.mem, cd_pa, b.make_cd(s1pt.root, asid=4))
    env.set_ste(60, b.make_ste(fl.STE_CONFIG_NESTED, s1_ctx_ptr=cd_pa + ipa_off, **s2))
    m = env.mgr
    d = m.add_device(60)
    t = m.translate_one(60, None, 0x7123)
    assert t.fault == 0 and t.pa == data_page(5) + 0x123
    assert t.ipa == data_page(5) + ipa_off + 0x123
    assert len(m.tlb) == 1
    m.tlbi_s2_ipa(vmid=3, addr=data_page(5) + ipa_off, size=4096, leaf=True, ttl=0)
    assert len(m.tlb) == 0
    # SubstreamID on a stream with S1CDMax 0
    assert m.translate_one(60, 1, 0x7000).fault == fl.EventId.C_BAD_SUBSTREAMID
    assert env.events[-1]["name"] == "C_BAD_SUBSTREAMID"
    assert isinstance(d.hwpt, HwptNested)


def test_dma_read_write_scalar_and_batched_paths():
    env = Env()
    pt = env.s1_table()
    # 20 IOVA-contiguous pages scattered over PA (reverse order)
    for i in range(20):
        pt.map(0x100000 + i * 4096, data_page(40 - i))
    env.set_ste(70, env.s1_ste(env.cd(pt)))
    m = env.mgr
    m.add_device(70)
    payload = bytes(range(256)) * 32  # 8 KiB: scalar path (3 pages)
    m.dma_write(70, None, 0x100800, payload)
    assert env.mem.read(data_page(40) + 0x800, 0x800) == payload[:0x800]
    assert env.mem.read(data_page(39), 4096) == payload[0x800:0x1800]
    assert m.dma_read(70, None, 0x100800, len(payload)) == payload
    big = np.random.default_rng(1).integers(0, 256, 19 * 4096, dtype=np.uint8).tobytes()
    walks = m.counters.walks
    m.dma_write(70, None, 0x100000 + 100, big[:-200])  # batched path (19 pages)
    assert m.counters.walks > walks
    assert m.dma_read(70, None, 0x100000 + 100, len(big) - 200) == big[:-200]
    assert env.mem.read(data_page(30), 4096) == big[10 * 4096 - 100:11 * 4096 - 100]
    assert m.counters.bytes_written == len(payload) + len(big) - 200
    # a fault in the middle: nothing written, fault names the first bad page
    before = env.mem.read(data_page(40), 4096)
    with pytest.raises(DmaFault) as ei:
        m.dma_write(70, None, 0x100000, bytes(21 * 4096))
    assert ei.value.event == "F_TRANSLATION" and ei.value.iova == 0x100000 + 20 * 4096
    assert env.mem.read(data_page(40), 4096) == before
    with pytest.raises(DmaFault):
        m.dma_read(70, None, 0x100000 + 19 * 4096, 8192)  # scalar path fault


def test_dma_output_outside_guest_ram_is_bus_error():
    env = Env()
    pt = env.s1_table()
    pt.map(0x1000, 0x7000_0000)  # PA not backed by guest memory
    env.set_ste(71, env.s1_ste(env.cd(pt)))
    env.mgr.add_device(71)
    with pytest.raises(DmaFault) as ei:
        env.mgr.dma_read(71, None, 0x1000, 16)
    assert ei.value.event == "BUS_ERROR"
    with pytest.raises(DmaFault):
        env.mgr.dma_write(71, None, 0x1000, b"abc")


def test_ioas_unmap_flushes_cached_translations():
    env = Env()
    pt = env.s1_table()
    pt.map(0x1000, data_page(0))
    env.set_ste(72, env.s1_ste(env.cd(pt)))
    m = env.mgr
    m.add_device(72)
    m.translate_one(72, None, 0x1000)
    assert len(m.tlb) == 1 and m.ioas.areas()[0]["iova"] == hex(BASE)
    m.ioas.unmap(BASE, SIZE)
    assert len(m.tlb) == 0 and m.ioas.areas() == []
    with pytest.raises(DmaFault):
        m.dma_read(72, None, 0x1000, 4)


def test_batched_translate_matches_scalar_with_tlb_hits():
    env = Env()
    pt = env.s1_table()
    for i in range(32):
        pt.map(0x400000 + i * 4096, data_page(100 + (i * 7) % 32))
    env.set_ste(80, env.s1_ste(env.cd(pt)))
    m = env.mgr
    m.add_device(80)
    rng = np.random.default_rng(5)
    iovas = (0x400000 + rng.integers(0, 34 * 4096, 500)).astype(np.uint64)
    cold = m.translate(80, None, iovas)  # walks (and faults past page 31)
    hits = m.tlb.hits
    warm = m.translate(80, None, iovas)  # served by the TLB where translated
    assert m.tlb.hits > hits
    assert (cold.fault == warm.fault).all() and (cold.pa == warm.pa).all()
    for i in range(0, 500, 25):
        t = m.probe(80, None, int(iovas[i]))[0]
        assert (t.fault, t.pa) == (int(cold.fault[i]), int(cold.pa[i]))


def test_ats_endpoint_atc_survives_tlbi_until_atc_inv():
    """An endpoint with ATS enabled on a stream with STE.EATS keeps the SMMU's answers:
    its hits never reach the SMMU, a TLBI leaves them, CMD_ATC_INV (or ATS off) drops them."""
    env = Env()
    pt = env.s1_table()
    pt.map(0x20000, data_page(1))
    pt.map(0x22000, data_page(3))
    env.set_ste(50, env.s1_ste(env.cd(pt, asid=9), EATS=1))
    m = env.mgr
    m.add_device(50)
    ats = {"on": True}
    m.ats_probes[50] = lambda: ats["on"]
    assert m.translate_one(50, None, 0x20008).pa == data_page(1) + 8
    atc = m.devices[50].atc
    assert len(atc) == 1 and atc.misses == 1
    lookups = m.tlb.hits + m.tlb.misses
    assert m.translate_one(50, None, 0x20010).pa == data_page(1) + 0x10
    assert atc.hits == 1 and m.tlb.hits + m.tlb.misses == lookups  # the SMMU saw nothing
    # the driver remaps and invalidates the TLB but not the ATC: the endpoint still uses
    # the old page (the stale translation a missing ATC_INV leaves behind)
    pt.map(0x20000, data_page(2))
    m.tlbi_nh_va(vmid=0, asid=9, addr=0x20000, size=0, leaf=True, ttl=0)
    assert m.translate_one(50, None, 0x20000).pa == data_page(1)
    # ATC_INV of another range leaves it; of this one (2^SIZE pages at ADDR) drops it
    assert m.atc_inv(sid=50, ssid=None, addr=0x40000, size=0x1000, global_=False)
    assert m.translate_one(50, None, 0x20000).pa == data_page(1)
    m.atc_inv(sid=50, ssid=None, addr=0x20000, size=0x1000, global_=False)
    assert m.translate_one(50, None, 0x20000).pa == data_page(2)
    assert atc.stats()["invalidations"] == 2 and atc.stats()["invalidated"] == 1
    assert m.stats()["atc"]["hits"] == atc.hits
    # the DMA path goes through the ATC too (page by page)
    m.translate_one(50, None, 0x22000)
    pt.map(0x22000, data_page(4))
    m.tlbi_nh_asid(vmid=0, asid=9)
    env.mem.write(data_page(3), b"old page")
    env.mem.write(data_page(4), b"new page")
    assert m.dma_read(50, None, 0x22000, 8) == b"old page"
    # ATS disabled by the driver: the ATC is emptied, the SMMU translates again
    ats["on"] = False
    assert m.dma_read(50, None, 0x22000, 8) == b"new page" and len(atc) == 0
    # ATS on but the STE does not allow it (EATS=0): the ATC is not used
    ats["on"] = True
    env.set_ste(50, env.s1_ste(env.cd(pt, asid=9)))
    m.translate_one(50, None, 0x20000)
    assert len(atc) == 0


def test_atc_invalidation_rules():
    from viommu_backend.domains.atc import ATC

    a = ATC(capacity=3)
    a.insert(None, 0x1000, 0xA000, 0x1000, 3)
    a.insert(5, 0x1000, 0xB000, 0x1000, 3)
    a.insert(6, 0x200000, 0xC00000, 0x200000, 1)  # a 2 MiB block
    assert a.lookup(6, 0x3FF008).translate(0x3FF008) == 0xDFF008
    assert a.invalidate(5, 0x1000, 0x1000) == 1 and a.lookup(None, 0x1000) is not None
    a.insert(5, 0x1000, 0xB000, 0x1000, 3)
    assert a.invalidate(None, 0, 1 << 30) == 3 and len(a) == 0  # no SubstreamID: all of them
    a.insert(5, 0x1000, 0xB000, 0x1000, 3)
    a.insert(7, 0x1000, 0xB000, 0x1000, 3)
    assert a.invalidate(5, 0x1000, 0x1000, global_=True) == 2
    for i in range(4):  # capacity 3: the oldest goes
        a.insert(None, i << 12, 0, 0x1000, 3)
    assert len(a) == 3 and a.lookup(None, 0) is None
    with pytest.raises(ValueError):
        a.insert(None, 0, 0, 0x800, 3)


def test_injected_atc_ignore_keeps_stale_entries():
    from viommu_backend.fault_injection import FaultInjector, InjectError

    env = Env()
    pt = env.s1_table()
    pt.map(0x20000, data_page(1))
    env.set_ste(50, env.s1_ste(env.cd(pt, asid=9), EATS=1))
    m = env.mgr
    m.add_device(50)
    m.ats_probes[50] = lambda: True
    inj = FaultInjector().install(m)
    m.translate_one(50, None, 0x20000)
    pt.map(0x20000, data_page(2))
    m.tlbi_nh_va(vmid=0, asid=9, addr=0x20000, size=0, leaf=True, ttl=0)
    inj.set_atc_mode(50, "ignore")
    m.atc_inv(sid=50, ssid=None, addr=0x20000, size=0x1000, global_=False)
    assert m.translate_one(50, None, 0x20000).pa == data_page(1)  # still the old page
    assert inj.injected["atc-inv-ignored"] == 1 and inj.snapshot()["atc-ignore"] == [50]
    inj.set_atc_mode(50, "normal")
    m.atc_inv(sid=50, ssid=None, addr=0x20000, size=0x1000, global_=False)
    assert m.translate_one(50, None, 0x20000).pa == data_page(2)
    with pytest.raises(InjectError):
        inj.set_atc_mode(50, "sometimes")
    with pytest.raises(InjectError):
        inj.set_atc_mode(-1, "ignore")
