"""Hidden stage 2: host memory and its page tables, the guest's STEs choosing only stage 1
on a host NEST_PARENT, stage-2 faults and page requests going to the host."""

from __future__ import annotations

import numpy as np
import pytest

from viommu_backend.domains import DmaFault, DomainError, FaultResponse, HwptNested, HwptPaging
from viommu_backend.domains.host import CHUNK, POOL_BASE, HostIoas, HostMemory
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.walker import walk, walk_one

from tests.support.host_env import ABORT_STE, BASE, BYPASS, DATA, SIZE, HostEnv, page


# -- host memory and page tables ------------------------------------------------------------------
def test_reversed_layout_is_a_page_permutation_of_guest_ram():
    mem = b.make_memory(BASE, SIZE)
    host = HostMemory(lambda: mem, "reversed")
    added, removed = host.sync()
    n = SIZE // CHUNK
    assert removed == [] and len(added) == n
    assert {(ipa, pa) for ipa, pa, _, _ in added} == \
        {(BASE + i * CHUNK, BASE + (n - 1 - i) * CHUNK) for i in range(n)}
    mem.write(BASE + 0x1234, b"at IPA 0x40001234")
    assert host.space.read(BASE + (n - 1) * CHUNK + 0x1234, 17) == b"at IPA 0x40001234"
    assert host.space.read(BASE + 0x1234, 17) != b"at IPA 0x40001234"  # PA != IPA
    assert host.sync() == ([], [])  # nothing changed
    mem.remove(BASE, SIZE)
    added, removed = host.sync()
    assert added == [] and removed == [(BASE, SIZE)] and not host.space.contains(BASE, 1)


def test_host_page_table_maps_splits_unmaps_and_frees_tables():
    mem = b.make_memory(BASE, SIZE)
    ioas = HostIoas(1, lambda: mem, "reversed")
    t = ioas.new_table()
    s2 = t.s2config()
    assert ioas.host.tables == 3  # L0, L1, L2: guest RAM in 2 MiB blocks
    ipas = np.arange(BASE, BASE + SIZE, 0x3000, dtype=np.uint64)
    r = walk(ioas.memory, None, s2, ipas, write=True)
    assert not r.fault.any()
    for ipa, pa in zip(ipas.tolist()[::97], r.pa.tolist()[::97]):
        assert t.iova_to_phys(ipa) == pa == ioas.translate(ipa)
        assert ioas.host.ram_pa(ipa, 1)[0][1] == pa
    # one page out of a block: the block is split into 511 pages
    assert ioas.unmap(BASE + 0x5000, 0x1000) == 0x1000
    assert walk_one(ioas.memory, None, s2, BASE + 0x5000, write=False).fault == \
        fl.EventId.F_TRANSLATION
    assert t.iova_to_phys(BASE + 0x5000) is None and ioas.host.tables == 4
    assert t.iova_to_phys(BASE + 0x6000) == t.iova_to_phys(BASE) + 0x6000
    ioas.map(BASE + 0x5000, 0x1000, pa=page(3))  # demand paging: any RAM page will do
    assert walk_one(ioas.memory, None, s2, BASE + 0x5123, write=True).pa == page(3) + 0x123
    with pytest.raises(DomainError) as ei:
        ioas.map(BASE + 0x5000, 0x1000)
    assert ei.value.errno == "EEXIST"
    with pytest.raises(DomainError) as ei:  # the host's own table pages are not RAM
        ioas.map(0x1000_0000, 0x1000, pa=POOL_BASE)
    assert ei.value.errno == "EFAULT"
    with pytest.raises(DomainError) as ei:
        ioas.map(0x1000_0000, 0x1000)  # no RAM at that IPA: no default PA
    assert ei.value.errno == "EFAULT"
    with pytest.raises(DomainError) as ei:
        ioas.unmap(0x1000_0000, 0x1000)
    assert ei.value.errno == "ENOENT"
    with pytest.raises(DomainError):
        ioas.map(BASE + 0x800, 0x1000)  # not page aligned
    # everything away: the tables are freed down to the root
    assert ioas.unmap(BASE, SIZE) == SIZE
    assert ioas.areas() == [] and ioas.host.tables == 1
    ioas.free_table(t)
    assert ioas.host.tables == 0


def test_ioas_follows_the_clients_dma_regions():
    mem = b.make_memory(BASE, SIZE)
    ioas = HostIoas(1, lambda: mem)
    t = ioas.new_table()
    assert t.iova_to_phys(BASE) == BASE  # identity layout: PA = IPA
    unmapped = []
    ioas.on_unmap.append(lambda i, s: unmapped.append((i, s)))
    mem.remove(BASE, SIZE)  # DMA_UNMAP
    assert ioas.areas() == [] and unmapped  # noticed at the next use
    assert t.iova_to_phys(BASE) is None
    b.make_memory(BASE + SIZE, SIZE, mem)  # DMA_MAP elsewhere
    ioas.sync()
    assert t.iova_to_phys(BASE + SIZE + 8) == BASE + SIZE + 8


# -- the guest's STEs on a host NEST_PARENT ----------------------------------------------------------
def test_guest_stes_choose_stage1_only_on_the_host_parent():
    env = HostEnv()
    m = env.mgr
    env.set_ste(1, env.s1({0x10000: page(0)}))
    env.set_ste(2, BYPASS)
    env.set_ste(3, ABORT_STE)
    d1, d2, d3 = m.add_device(1), m.add_device(2), m.add_device(3)
    assert isinstance(d1.hwpt, HwptNested) and d1.hwpt.owner == "guest"
    parent = d1.hwpt.parent
    assert parent.table is not None and parent.nest_parent and parent.owner == "host"
    assert d2.hwpt is parent  # bypass: the parent's translation
    assert d3.hwpt is m.blocking
    # a stage 2 in a guest STE: C_BAD_STE (the guest's SMMU has no S2P)
    env.set_ste(4, b.make_ste(fl.STE_CONFIG_S2, s2_ttb=page(9), s2_vmid=1))
    d4 = m.add_device(4)
    assert d4.hwpt is m.blocking and d4.config_fault.event == "C_BAD_STE"
    # SMMUEN=0: the parent (GBPA bypass), or blocking (GBPA abort)
    env.enabled = False
    m.stream_table_changed()
    assert d1.hwpt is parent and d3.hwpt is parent and d4.hwpt is parent
    env.gbpa_abort = True
    m.stream_table_changed()
    assert d1.hwpt is m.blocking


def test_dma_through_guest_s1_and_host_s2_lands_where_the_guest_sees_it():
    env = HostEnv()  # reversed: a walk that skipped stage 2 would hit other memory
    m = env.mgr
    env.set_ste(5, env.s1({0x20000 + i * 4096: page(20 - i) for i in range(20)}))
    m.add_device(5)
    data = np.random.default_rng(3).integers(0, 256, 20 * 4096 - 300, np.uint8).tobytes()
    m.dma_write(5, None, 0x20000 + 100, data)  # batched path, pages scattered
    for i in range(20):
        lo = max(0, i * 4096 - 100)
        chunk = data[lo:(i + 1) * 4096 - 100]
        assert env.mem.read(page(20 - i) + (100 if i == 0 else 0), len(chunk)) == chunk
    assert m.dma_read(5, None, 0x20000 + 100, len(data)) == data
    env.mem.write(page(7), b"guest wrote this")
    assert m.dma_read(5, None, 0x20000 + 13 * 4096, 16) == b"guest wrote this"
    t, dom = m.probe(5, None, 0x20000)
    assert t.ipa == page(20) and t.pa == m.ioas.translate(page(20)) != page(20)
    assert dom == m.devices[5].hwpt.id


def test_new_parent_means_a_new_nested_hwpt():
    env = HostEnv()
    m = env.mgr
    env.set_ste(6, env.s1({0x1000: page(1)}))
    d = m.add_device(6)
    nested, auto_parent = d.hwpt, d.hwpt.parent
    p2 = m.hwpt_alloc(flags=["nest-parent"], sid=6)
    m.attach(6, p2.id)  # the host gives the device another stage-2 parent
    assert isinstance(d.hwpt, HwptNested) and d.hwpt is not nested
    assert d.hwpt.parent is p2 and d.hwpt.s1 == nested.s1  # the guest's S1, new object
    assert nested.destroyed and auto_parent.destroyed  # automatic ones went with it
    assert m.dma_read(6, None, 0x1000, 4) == env.mem.read(page(1), 4)
    env.set_ste(6, BYPASS)
    assert d.hwpt is p2  # the guest's bypass: the host's chosen parent itself


def test_stage2_faults_go_to_the_host_never_to_the_guest():
    env = HostEnv()
    m = env.mgr
    env.set_ste(7, env.s1({0x3000: page(4), 0x4000: BASE - 0x1000}))  # 2nd: no guest RAM
    m.add_device(7)
    m.ioas_unmap(page(4), 4096)
    with pytest.raises(DmaFault) as ei:
        m.dma_read(7, None, 0x3000, 8)
    assert ei.value.event == "F_TRANSLATION"
    with pytest.raises(DmaFault):
        m.dma_write(7, None, 0x4000, b"x")
    assert env.events == [] and m.counters.host_faults == 2
    # a stage-1 fault still reaches the guest's event queue
    with pytest.raises(DmaFault):
        m.dma_read(7, None, 0x9000, 8)
    assert [e["name"] for e in env.events] == ["F_TRANSLATION"]
    assert env.events[0]["INPUTADDR"] == 0x9000 and not env.events[0]["S2"]


def test_host_page_request_round_trip():
    env = HostEnv()
    m = env.mgr
    env.set_ste(8, env.s1({0x5000: page(5)}))
    d = m.add_device(8)
    records = []
    m.faults.listeners.append(lambda fq, pf: records.append((fq.id, pf.cookie)))
    fq = m.alloc_fault_queue()
    parent = m.hwpt_alloc(flags=["nest-parent"], fault_queue=fq.id, sid=8)
    iopf = []
    m.iopf_hooks[8] = iopf.append
    m.attach(8, parent.id)
    assert iopf == [True] and d.iopf  # the host turned the endpoint's PRI on
    m.ioas_unmap(page(5), 4096)
    with pytest.raises(DmaFault):
        m.dma_write(8, None, 0x5000, b"paged in")
    pf = m.endpoint_page_request(8, None, 0x5000, write=True, prg_index=3)
    assert not pf.done and records == [(fq.id, pf.cookie)] and pf.queue == fq.id
    assert env.prs == [] and env.events == []  # the guest hears nothing of it
    assert [p.cookie for p in fq] == [pf.cookie]
    m.ioas_map(page(5), 4096)
    m.fault_respond(fq.id, pf.cookie, "success")
    assert pf.response is FaultResponse.SUCCESS and len(fq) == 0
    m.dma_write(8, None, 0x5000, b"paged in")  # the retry
    assert env.mem.read(page(5), 8) == b"paged in"
    with pytest.raises(DomainError) as ei:
        m.fault_respond(fq.id, pf.cookie, "success")  # answered already
    assert ei.value.errno == "EINVAL"
    # a stage-1 fault: the guest's PRI queue, as before
    g = m.endpoint_page_request(8, None, 0x7000, write=False, prg_index=4)
    assert not g.done and env.prs[0]["PRG_INDEX"] == 4 and len(fq) == 0
    # a page that translates by now: Success at once
    assert m.endpoint_page_request(8, None, 0x5000, write=True,
                                   prg_index=5).response is FaultResponse.SUCCESS
    m.detach(8)
    assert iopf == [True, False] and g.response is FaultResponse.INVALID


def test_host_page_request_without_a_host_queue_is_answered_invalid():
    env = HostEnv()
    m = env.mgr
    env.set_ste(9, env.s1({0x5000: page(5)}))
    m.add_device(9)
    m.ioas_unmap(page(5), 4096)
    pf = m.endpoint_page_request(9, None, 0x5000, write=False, prg_index=0)
    assert pf.response is FaultResponse.INVALID and env.prs == []


def test_probe_fills_no_cache():
    env = HostEnv()
    m = env.mgr
    env.set_ste(10, env.s1({0x6000: page(6)}))
    d = m.add_device(10)
    t, _ = m.probe(10, None, 0x6000)
    assert t.fault == 0 and m.translator.cached_contexts(10) == 0 and d.hwpt.cds == {}
    assert len(m.tlb) == 0
    assert m.translate_one(10, None, 0x6000).pa == t.pa and len(m.tlb) == 1
    # an unseen stream: its STE, then the IOAS
    env.set_ste(11, env.s1({0x6000: page(6)}), cfgi=False)
    t2, dom = m.probe(11, None, 0x6008)
    assert dom is None and t2.pa == t.pa + 8 and 11 not in m.devices


def test_without_host_s2_the_ioas_is_not_the_hosts_to_map():
    env = HostEnv(host_s2=False)
    with pytest.raises(DomainError) as ei:
        env.mgr.ioas_map(BASE, 4096)
    assert ei.value.errno == "EOPNOTSUPP"
    h = env.mgr.hwpt_alloc()
    assert isinstance(h, HwptPaging) and h.identity and env.mgr.iova_to_phys(h.id, DATA) == DATA


def test_dirty_tracking_domain_gets_its_pages_marked_dirty_by_httu():
    env = HostEnv()  # HTTU with dirty state (the default IDR0.HTTU = 2)
    m = env.mgr
    env.set_ste(12, BYPASS)
    m.add_device(12)
    h = m.hwpt_alloc(flags=["nest-parent", "dirty-tracking"], sid=12)
    assert "dirty-tracking" in h.flags() and h.s2.hd
    m.replace(12, h.id)

    def writable(ipa: int) -> bool:
        t = h.table
        table, level = t.root, 0
        while True:  # down to the leaf of ipa
            d = int(t.mem.entries(table)[(ipa >> (12 + 9 * (3 - level))) & 511])
            if level == 3 or d & 3 == 1:
                return bool(fl.PTE_S2.get(d, "S2AP_W"))
            table, level = d & fl.OA_MASK_48, level + 1

    assert not writable(page(2)) and not writable(page(3))  # writable-clean (DBM)
    m.dma_write(12, None, page(2), b"dirty")
    assert writable(page(2)) and env.mem.read(page(2), 5) == b"dirty"
    assert m.dma_read(12, None, page(3), 4) == env.mem.read(page(3), 4)
    env2 = HostEnv(httu=0)
    env2.set_ste(1, BYPASS)
    env2.mgr.add_device(1)
    with pytest.raises(DomainError) as ei:
        env2.mgr.hwpt_alloc(flags=["dirty-tracking"], sid=1)
    assert ei.value.errno == "EOPNOTSUPP"
